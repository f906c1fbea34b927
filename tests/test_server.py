"""Start-up checks of the served limits against the engine (pure function)."""

from __future__ import annotations

import pytest

from tgi_compat.config import ConfigError
from tgi_compat.launcher import parse_config
from tgi_compat.server import bind_host, resolve_limits


def test_limits_default_from_the_engine_context():
    config, _ = parse_config([])
    assert resolve_limits(config, 4096) == (4095, 4096)


def test_limits_checked_against_the_engine_context():
    config, _ = parse_config(["--max-total-tokens", "5000"])
    with pytest.raises(ConfigError, match=r"`max_total_tokens` \(5000\) must be <= the model's context length \(4096\)"):
        resolve_limits(config, 4096)
    config, _ = parse_config(["--max-input-tokens", "4096"])
    with pytest.raises(ConfigError, match=r"`max_input_tokens` \(4096\) must be < `max_total_tokens` \(4096\)"):
        resolve_limits(config, 4096)


def test_hostname_falls_back_like_tgi():
    assert bind_host("127.0.0.1") == "127.0.0.1"
    assert bind_host("::1") == "::1"
    assert bind_host("a1b2c3d4e5f6") == "0.0.0.0"  # a container's HOSTNAME
