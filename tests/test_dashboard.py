"""Static checks on dashboards/tgi-compat-grafana.json (no server, no engine).

Every metric a panel queries must be one `/metrics` actually exposes: TGI's own names
(exactly as TGI spells them: counters have no `_total`) or vLLM's `vllm:*` names as
registered by the installed vLLM (prometheus_client adds `_total` to its Counters).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

DASHBOARD = Path(__file__).resolve().parent.parent / "dashboards" / "tgi-compat-grafana.json"
DS_VAR = "DS_PROMETHEUS"
DS_REF = "${%s}" % DS_VAR

# The TGI-named series tgi-compat exports (base names, as TGI names them).
TGI_COUNTERS = {
    "tgi_request_count",
    "tgi_request_success",
    "tgi_request_failure",  # label err
    "tgi_batch_inference_count",  # label method
    "tgi_batch_inference_success",
    "tgi_batch_inference_failure",
    "tgi_batch_concat",  # label reason
}
TGI_HISTOGRAMS = {
    "tgi_request_duration",
    "tgi_request_validation_duration",
    "tgi_request_queue_duration",
    "tgi_request_inference_duration",
    "tgi_request_mean_time_per_token_duration",
    "tgi_request_generated_tokens",
    "tgi_request_input_length",
    "tgi_request_max_new_tokens",
    "tgi_batch_next_size",
    "tgi_batch_inference_duration",  # label method
    "tgi_batch_forward_duration",  # label method
    "tgi_batch_decode_duration",  # label method
    "tgi_batch_filter_duration",  # label method
    "tgi_batch_concat_duration",
}
TGI_GAUGES = {
    "tgi_queue_size",
    "tgi_batch_current_size",
    "tgi_batch_current_max_tokens",
    "tgi_batch_max_total_tokens",
}
TGI_SUMMARIES = {"tgi_request_skipped_tokens"}
TGI_ALLOWED = TGI_COUNTERS | TGI_HISTOGRAMS | TGI_GAUGES | TGI_SUMMARIES

TGI_RE = re.compile(r"\btgi_[a-z0-9_]+")
VLLM_RE = re.compile(r"vllm:[a-z0-9_:]+")


def strip_suffix(name: str, suffixes: tuple[str, ...]) -> tuple[str, str]:
    for s in suffixes:
        if name.endswith(s):
            return name[: -len(s)], s
    return name, ""


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict]):
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []))


def exprs(dash: dict) -> list[tuple[str, str]]:
    out = []
    for p in all_panels(dash["panels"]):
        for t in p.get("targets", []):
            if "expr" in t:
                out.append((p.get("title", "?"), t["expr"]))
    return out


@pytest.fixture(scope="module")
def vllm_loggers_source() -> str:
    spec = importlib.util.find_spec("vllm")  # locates the package without importing it
    assert spec is not None and spec.submodule_search_locations, "vllm is not installed"
    path = Path(list(spec.submodule_search_locations)[0]) / "v1" / "metrics" / "loggers.py"
    assert path.is_file(), f"{path} not found: vLLM moved its metric definitions"
    return path.read_text()


def test_top_level_keys(dashboard):
    for key in ("title", "uid", "panels", "templating"):
        assert dashboard.get(key), key
    assert dashboard["panels"], "no panels"


def test_datasource_variable(dashboard):
    ds_vars = [v for v in dashboard["templating"]["list"] if v["name"] == DS_VAR]
    assert len(ds_vars) == 1
    assert ds_vars[0]["type"] == "datasource" and ds_vars[0]["query"] == "prometheus"


def test_datasource_references_use_variable(dashboard):
    refs = []
    for p in all_panels(dashboard["panels"]):
        if p["type"] == "row":
            if "datasource" in p:
                refs.append((p["title"], p["datasource"]))
            continue
        refs.append((p["title"], p.get("datasource")))
        refs += [(p["title"], t.get("datasource")) for t in p["targets"]]
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            refs.append((v["name"], v.get("datasource")))
    for where, ds in refs:
        assert isinstance(ds, dict), f"{where}: missing datasource"
        assert ds.get("uid") == DS_REF and ds.get("type") == "prometheus", f"{where}: {ds}"


def test_panels_have_title_and_targets(dashboard):
    ids = []
    for p in all_panels(dashboard["panels"]):
        assert p.get("title"), p
        assert "gridPos" in p, p["title"]
        ids.append(p["id"])
        if p["type"] == "row":
            continue
        targets = p.get("targets") or []
        assert targets, f"{p['title']}: no targets"
        for t in targets:
            assert t.get("expr"), f"{p['title']}: target without expr"
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), p["title"]
    assert len(ids) == len(set(ids)), "duplicate panel ids"


def test_tgi_metric_names(dashboard):
    seen = set()
    for title, expr in exprs(dashboard):
        for name in TGI_RE.findall(expr):
            assert not name.endswith("_total"), f"{title}: TGI counters have no _total suffix: {name}"
            base, suffix = strip_suffix(name, ("_bucket", "_sum", "_count"))
            if base not in TGI_ALLOWED:  # e.g. tgi_request_count itself ends in _count
                base, suffix = name, ""
            assert base in TGI_ALLOWED, f"{title}: {name} is not an exported TGI metric"
            if suffix == "_bucket":
                assert base in TGI_HISTOGRAMS, f"{title}: {base} has no _bucket series"
            elif suffix:
                assert base in TGI_HISTOGRAMS | TGI_SUMMARIES, f"{title}: {name}"
            seen.add(base)
    # The panels reproduced from TGI's dashboard.
    for name in ("tgi_request_success", "tgi_request_failure", "tgi_request_duration", "tgi_queue_size",
                 "tgi_request_mean_time_per_token_duration", "tgi_batch_current_size",
                 "tgi_request_input_length", "tgi_request_generated_tokens", "tgi_batch_inference_duration"):
        assert name in seen, name


def test_vllm_metric_names(dashboard, vllm_loggers_source):
    types = dict(
        (name, kind)
        for kind, name in re.findall(r'_(counter|gauge|histogram)_cls\(\s*name="(vllm:[a-z0-9_:]+)"', vllm_loggers_source)
    )
    seen = 0
    for title, expr in exprs(dashboard):
        for name in VLLM_RE.findall(expr):
            seen += 1
            base, suffix = strip_suffix(name, ("_total", "_bucket", "_sum", "_count"))
            assert f'"{base}"' in vllm_loggers_source, f"{title}: {name} ({base}) not in vllm's loggers.py"
            kind = types.get(base)
            if kind == "counter":
                assert suffix == "_total", f"{title}: counter {base} is exposed as {base}_total"
            elif kind == "gauge":
                assert suffix == "", f"{title}: gauge {name}"
            elif kind == "histogram":
                assert suffix in ("_bucket", "_sum", "_count"), f"{title}: histogram {name}"
    assert seen, "no vllm: panels"
