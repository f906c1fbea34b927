"""Unit tests of the CLI/env configuration."""

from __future__ import annotations

import pytest

import tgi_compat
from tgi_compat.cli import main
from tgi_compat.config import ConfigError
from tgi_compat.launcher import parse_config


def test_defaults_match_tgi():
    config, _ = parse_config([])
    assert config.port == 3000 and config.hostname == "0.0.0.0"
    assert (config.max_stop_sequences, config.max_top_n_tokens, config.max_best_of) == (4, 5, 2)
    assert config.max_concurrent_requests == 128
    assert config.payload_limit == 2_000_000
    assert config.model_id is None


def test_env_vars_and_flags(monkeypatch):
    monkeypatch.setenv("MODEL_ID", "org/model")
    monkeypatch.setenv("PORT", "80")
    monkeypatch.setenv("MAX_CONCURRENT_REQUESTS", "7")
    config, _ = parse_config(["--port", "9000"])
    assert config.model_id == "org/model"
    assert config.port == 9000  # the flag wins over the env var
    assert config.max_concurrent_requests == 7


def test_engine_flags_pass_through_and_tgi_mapping():
    config, _ = parse_config(["--num-shard", "2", "--dtype", "bfloat16", "--enforce-eager", "--max-num-seqs", "8"])
    assert config.engine_flags == ["--enforce-eager", "--max-num-seqs", "8"]
    assert config.engine_overrides == {"dtype": "bfloat16", "tensor_parallel_size": 2}


def test_max_total_tokens_sets_engine_context_unless_given():
    config, _ = parse_config(["--max-total-tokens", "512"])
    assert config.engine_overrides == {"max_model_len": 512}
    config, _ = parse_config(["--max-total-tokens", "512", "--max-model-len", "1024"])
    assert config.engine_overrides == {}


def test_rejects_inconsistent_limits():
    with pytest.raises(ConfigError, match=r"`max_input_tokens`\(10\) must be < `max_total_tokens`\(10\)"):
        parse_config(["--max-input-tokens", "10", "--max-total-tokens", "10"])


def test_engine_args_parse_with_vllm():
    from tgi_compat.engine import build_engine_args
    from tgi_compat.tiny_model import build_tiny_model

    model = str(build_tiny_model())
    config, _ = parse_config(["--num-shard", "1", "--max-num-seqs", "8", "--max-total-tokens", "256"])
    args = build_engine_args(model, config.engine_flags, config.engine_overrides)
    assert args.model == model and args.max_num_seqs == 8
    assert args.tensor_parallel_size == 1 and args.max_model_len == 256


def test_version_flag_prints_both_versions(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.strip() == f"tgi-compat {tgi_compat.__version__} (TGI API {tgi_compat.TGI_VERSION})"


def test_embedded_model_names():
    assert parse_config(["--model-id", "embedded:tiny-vlm"])[0].model_id == "embedded:tiny-vlm"
    assert parse_config(["--model-id", "embedded:tiny"])[0].model_id == "embedded:tiny"
    with pytest.raises(ConfigError, match="unknown embedded model `nope`; embedded models: tiny, tiny-vlm"):
        parse_config(["--model-id", "embedded:nope"])


def test_image_flags(monkeypatch):
    c = parse_config([])[0]
    assert (c.max_image_fetch_size, c.image_fetch_timeout, c.max_images_per_request) == (1073741824, 10.0, 8)
    assert c.image_fetch_allow == ()
    monkeypatch.setenv("IMAGE_FETCH_ALLOW", "127.0.0.0/8,images.internal")
    monkeypatch.setenv("MAX_IMAGE_FETCH_SIZE", "1000")
    c = parse_config([])[0]
    assert c.image_fetch_allow == ("127.0.0.0/8", "images.internal")
    assert c.max_image_fetch_size == 1000
    # The flag wins over the env var, as clap's `env` does.
    assert parse_config(["--image-fetch-allow", "10.0.0.0/8"])[0].image_fetch_allow == ("10.0.0.0/8",)
    with pytest.raises(ConfigError, match="`max_images_per_request` must be > 0"):
        parse_config(["--max-images-per-request", "0"])


def test_connection_guard_flags(monkeypatch):
    config, _ = parse_config([])
    assert (config.send_timeout, config.request_read_timeout, config.max_connections) == (60.0, 60.0, None)
    monkeypatch.setenv("SEND_TIMEOUT", "5")
    monkeypatch.setenv("MAX_CONNECTIONS", "300")
    config, _ = parse_config(["--request-read-timeout", "7"])
    assert (config.send_timeout, config.request_read_timeout, config.max_connections) == (5.0, 7.0, 300)
    with pytest.raises(ConfigError, match="`max_connections` must be >= `max_concurrent_requests`"):
        parse_config(["--max-connections", "10", "--max-concurrent-requests", "20"])
    with pytest.raises(ConfigError, match="must be > 0"):
        parse_config(["--send-timeout", "0"])


def test_max_connections_fits_the_fd_limit():
    import resource

    from tgi_compat.connection import FD_RESERVE, resolve_max_connections

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert resolve_max_connections(None, 128) == 1024 or soft < 1024 + FD_RESERVE
    assert resolve_max_connections(None, 512) >= 512
    if hard != resource.RLIM_INFINITY:
        with pytest.raises(ConfigError, match="raise `ulimit -n` or lower --max-connections"):
            resolve_max_connections(hard, 128)
