"""Which chat template is served, by TGI's precedence (router/src/server.rs, infer/mod.rs):
chat_template.json beside the tokenizer, then the tokenizer config's template
(--tokenizer-config-path's file instead of the model's), then processor_config.json's; and
the start-up line naming the source. Model directories are written by the test from the
embedded tiny model's tokenizer; the app runs in-process on the scripted engine."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from tests.unit.scripted_engine import ScriptedEngine, tiny_tokenizer_dir
from tgi_compat.chat_template import load_chat_template
from tgi_compat.config import ConfigError
from tgi_compat.tokens import Tokenizer

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
STANDALONE = "JSON{% for m in messages %}[{{ m.content }}]{% endfor %}{{ eos_token }}"
IN_TOKENIZER = "TOK{% for m in messages %}({{ m.content }}){% endfor %}"


def model_dir(tmp_path: Path, *, tokenizer_template: str | None = None, standalone=None, processor=None) -> Path:
    """A tokenizer directory: the tiny model's tokenizer, its template only where asked."""
    target = tmp_path / "model"
    target.mkdir()
    source = tiny_tokenizer_dir()
    shutil.copy(source / "tokenizer.json", target)
    config = json.loads((source / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)  # chat_template.jinja is not copied either
    if tokenizer_template is not None:
        config["chat_template"] = tokenizer_template
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    if standalone is not None:
        (target / "chat_template.json").write_text(standalone if isinstance(standalone, str) else json.dumps(standalone))
    if processor is not None:
        (target / "processor_config.json").write_text(json.dumps(processor))
    return target


def hf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


async def templated(h) -> tuple[int, dict]:
    r = await h.client.post("/chat_tokenize", json=CHAT)
    return r.status_code, r.json()


async def test_template_only_in_chat_template_json_is_served(app_factory, tmp_path, caplog):
    path = model_dir(tmp_path, standalone={"chat_template": STANDALONE})
    logging.getLogger("tgi_compat").addHandler(caplog.handler)  # whatever the logger's propagation
    try:
        with caplog.at_level(logging.INFO, logger="tgi_compat"):
            h = await app_factory(engine=ScriptedEngine(Tokenizer(hf_tokenizer(path))))
    finally:
        logging.getLogger("tgi_compat").removeHandler(caplog.handler)
    status, body = await templated(h)
    assert status == 200 and body["templated_text"] == "JSON[hi]</s>"
    r = await h.client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text
    assert h.engine.requests[-1].prompt_ids == h.engine.tokenizer.encode_no_special("JSON[hi]</s>")
    assert f"chat template: chat_template.json ({path / 'chat_template.json'})" in caplog.messages


async def test_without_any_template_chat_is_template_not_found(app_factory, tmp_path):
    path = model_dir(tmp_path)
    h = await app_factory(engine=ScriptedEngine(Tokenizer(hf_tokenizer(path))))
    r = await h.client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 422 and r.json() == {"error": "Template error: template not found", "error_type": "template_error"}
    assert load_chat_template(hf_tokenizer(path))[1] == "none: chat requests answer 422 `template not found`"


async def test_chat_template_json_overrides_the_tokenizers_and_the_config_paths(app_factory, tmp_path):
    path = model_dir(tmp_path, tokenizer_template=IN_TOKENIZER, standalone={"chat_template": STANDALONE})
    h = await app_factory(engine=ScriptedEngine(Tokenizer(hf_tokenizer(path))))
    assert (await templated(h))[1]["templated_text"] == "JSON[hi]</s>"
    # TGI: --tokenizer-config-path replaces tokenizer_config.json (its bos/eos tokens too),
    # and chat_template.json still overrides its template.
    other = tmp_path / "other_config.json"
    other.write_text(json.dumps({"chat_template": "CFG{{ messages[0].content }}", "eos_token": {"content": "<END>"}}))
    h = await app_factory("--tokenizer-config-path", str(other), engine=ScriptedEngine(Tokenizer(hf_tokenizer(path))))
    assert (await templated(h))[1]["templated_text"] == "JSON[hi]<END>"


def test_precedence_and_the_source_named(tmp_path):
    other = tmp_path / "other_config.json"
    other.write_text(json.dumps({"chat_template": "CFG{{ messages[0].content }}{{ eos_token }}", "eos_token": "<END>"}))
    path = model_dir(tmp_path, tokenizer_template=IN_TOKENIZER)
    tok = hf_tokenizer(path)
    template, origin = load_chat_template(tok)
    assert template.render([{"role": "user", "content": "hi"}]) == "TOK(hi)"
    assert origin == "the tokenizer's config (tokenizer_config.json / chat_template.jinja)"
    template, origin = load_chat_template(tok, str(other))
    assert template.render([{"role": "user", "content": "hi"}]) == "CFGhi<END>"
    assert origin == f"--tokenizer-config-path {other}"
    # Named templates: TGI takes "default".
    (path / "chat_template.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": STANDALONE}]}))
    template, origin = load_chat_template(tok, str(other))
    assert template.render([{"role": "user", "content": "hi"}]) == "JSON[hi]<END>"
    assert origin == f"chat_template.json ({path / 'chat_template.json'})"


@pytest.mark.parametrize("content", ["{not json", json.dumps({"template": "x"}), json.dumps(["x"])])
def test_unreadable_chat_template_json_is_skipped_with_a_warning(tmp_path, caplog, content):
    path = model_dir(tmp_path, tokenizer_template=IN_TOKENIZER, standalone=content)
    logging.getLogger("tgi_compat").addHandler(caplog.handler)
    try:
        template, origin = load_chat_template(hf_tokenizer(path))
    finally:
        logging.getLogger("tgi_compat").removeHandler(caplog.handler)
    assert template.render([{"role": "user", "content": "hi"}]) == "TOK(hi)"  # as TGI: warned, then ignored
    assert origin.startswith("the tokenizer's config")
    assert any(r.levelno == logging.WARNING and "chat_template.json" in r.getMessage() for r in caplog.records)


def test_processor_config_template_is_the_last_resort(tmp_path):
    path = model_dir(tmp_path, processor={"chat_template": STANDALONE, "image_seq_len": 4})
    template, origin = load_chat_template(hf_tokenizer(path))
    assert template.render([{"role": "user", "content": "hi"}]) == "JSON[hi]</s>"
    assert origin == f"processor_config.json ({path / 'processor_config.json'})"


def test_hub_model_reads_chat_template_json_from_the_cache(tmp_path, monkeypatch):
    """A Hub id: the cached snapshot's chat_template.json, offline."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read at import: HF_HUB_OFFLINE=1
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / ("1" * 40)
    snapshot.parent.mkdir(parents=True)
    shutil.copytree(model_dir(tmp_path, standalone={"chat_template": STANDALONE}), snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("1" * 40)

    class HubTokenizer:  # what load_chat_template reads of a tokenizer loaded by Hub id
        name_or_path, chat_template, bos_token, eos_token = "org/tiny", None, "<s>", "</s>"

    template, origin = load_chat_template(HubTokenizer, cache_dir=str(tmp_path / "hub"))
    assert origin == f"chat_template.json ({snapshot / 'chat_template.json'})"
    assert template.render([{"role": "user", "content": "hi"}]) == "JSON[hi]</s>"
    HubTokenizer.name_or_path = "org/absent"  # nothing cached, offline: no file, no error
    assert load_chat_template(HubTokenizer, cache_dir=str(tmp_path / "hub"))[0] is None


async def test_a_template_that_does_not_compile_stops_start_up(app_factory, tmp_path):
    path = model_dir(tmp_path, standalone={"chat_template": "{% for m in messages %}"})
    with pytest.raises(ConfigError, match=r"the chat template from chat_template.json \(.*\) does not compile"):
        await app_factory(engine=ScriptedEngine(Tokenizer(hf_tokenizer(path))))
