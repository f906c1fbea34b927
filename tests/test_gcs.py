"""AIP_STORAGE_URI failures end the process before anything starts (no engine, no port
served): a prefix with no objects, a storage endpoint that refuses connections, a Vertex
deployment without a model; and the download itself against a local GCS emulator
(relative paths kept, nothing half-written left behind)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port
from tests.gcs_emulator import gcs_emulator, upload_dir, vertex_env

from tgi_compat.gcs import DownloadError, download_model, parse_gs_uri


def run_cli(env: dict[str, str], timeout: float = 60) -> tuple[int, str, float]:
    """``python -m tgi_compat`` with only ``env`` on top of a clean environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AIP_", "MODEL_ID", "PORT", "HF_MODEL"))}
    full = {**base, "PYTHONUNBUFFERED": "1", "PROMETHEUS_PORT": str(free_port()), **env}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "tgi_compat"], env=full, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stderr, time.monotonic() - started


def leftovers(tmp: Path) -> list[str]:
    root = tmp / "tgi-compat-gcs"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_missing_object_is_an_error_exit(tmp_path):
    with gcs_emulator() as url:
        env = vertex_env(url, tmp_path, AIP_STORAGE_URI="gs://models/nothing-here", AIP_HTTP_PORT=str(free_port()))
        code, stderr, took = run_cli(env)
    assert code == 1, stderr
    assert stderr.strip().splitlines()[-1] == "tgi-compat: error: no objects under gs://models/nothing-here"
    assert leftovers(tmp_path) == ["models"]  # the bucket's parent directory only: nothing half-written
    assert took < 30


def test_closed_port_is_a_bounded_error_exit(tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = vertex_env(closed, tmp_path, AIP_STORAGE_URI="gs://models/tiny", AIP_HTTP_PORT=str(free_port()),
                     STORAGE_TIMEOUT="2")
    code, stderr, took = run_cli(env)
    assert code == 1, stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("tgi-compat: error: cannot download gs://models/tiny: RetryError: Timeout of 2.0s exceeded")
    assert "ConnectionError" in line
    assert leftovers(tmp_path) == ["models"]
    assert took < 30  # the retry deadline, not google-cloud-storage's default 120 s


@pytest.mark.parametrize(("env", "message"), [
    ({"AIP_HTTP_PORT": "8080", "AIP_PREDICT_ROUTE": "/p"},
     "Vertex AI variables are set (AIP_HTTP_PORT, AIP_PREDICT_ROUTE) but no model is: set "
     "AIP_STORAGE_URI=gs://BUCKET/PATH (the model's files) or MODEL_ID; the embedded test model is never served on Vertex AI"),
    ({"AIP_STORAGE_URI": "s3://bucket/model"},
     "invalid value 's3://bucket/model': not a gs:// URI: 's3://bucket/model' for 'AIP_STORAGE_URI'"),
    ({"AIP_HTTP_PORT": "eighty", "MODEL_ID": "m"}, "invalid value 'eighty': not a port number for 'AIP_HTTP_PORT'"),
    ({"AIP_HEALTH_ROUTE": "health", "MODEL_ID": "m"},
     "invalid value 'health': a route must start with '/' for 'AIP_HEALTH_ROUTE'"),
])
def test_vertex_configuration_errors(tmp_path, env, message):
    code, stderr, took = run_cli({"TMPDIR": str(tmp_path), **env})
    assert (code, stderr.strip()) == (2, f"tgi-compat: error: {message}")
    assert took < 15  # before vLLM is imported


def test_download_keeps_paths_and_replaces_whole(tmp_path, monkeypatch):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "weights.bin").write_bytes(os.urandom(100_000))
    target = tmp_path / "out" / "model"
    with gcs_emulator() as url:
        upload_dir(url, src, "m/v1")
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
        monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "test")
        got = download_model("gs://models/m/v1/", timeout=5, target=target)
        assert got == target
        assert (target / "sub" / "weights.bin").read_bytes() == (src / "sub" / "weights.bin").read_bytes()
        assert (target / "config.json").read_text() == "{}"
        (target / "stale.txt").write_text("from an earlier download")
        download_model("gs://models/m/v1", timeout=5, target=target)  # replaced whole, not merged
        assert sorted(p.name for p in target.iterdir()) == ["config.json", "sub"]
        with pytest.raises(DownloadError, match="no objects under gs://models/m/v2"):
            download_model("gs://models/m/v2", timeout=5, target=tmp_path / "out" / "other")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model"]  # no partial directory


def test_parse_gs_uri():
    assert parse_gs_uri("gs://b") == ("b", "")
    assert parse_gs_uri("gs://b/a/b/") == ("b", "a/b")
    for bad in ("s3://b/x", "gs://", "/local/path"):
        with pytest.raises(ValueError):
            parse_gs_uri(bad)
