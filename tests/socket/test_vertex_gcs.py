"""A Vertex AI-shaped start of the real server process (on the scripted engine: the subject
is the start, not the engine): only Vertex's variables (``AIP_HTTP_PORT``,
``AIP_PREDICT_ROUTE``, ``AIP_HEALTH_ROUTE``, ``AIP_STORAGE_URI``) and a local GCS emulator
holding the tiny model's files. The model is downloaded, byte for byte, before the engine
starts, then served at Vertex's routes and at ``/vertex``. That vLLM serves a local model
directory is the engine tier's every test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, STARTUP_TIMEOUT, free_port, wait_http_ok
from tests.gcs_emulator import gcs_emulator, upload_dir, vertex_env

from tgi_compat.tiny_model import build_tiny_model

pytestmark = pytest.mark.socket

PREDICT = "/v1/endpoints/123/deployedModels/456:predict"
HEALTH = "/v1/endpoints/123/deployedModels/456"


def test_vertex_deployment_from_gcs(tmp_path):
    model = build_tiny_model()
    port = free_port()
    log_dir = Path(os.environ.get("TGI_COMPAT_TEST_LOGS", ROOT / ".test-logs"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"vertex-gcs-{port}.log"
    with gcs_emulator() as url:
        names = upload_dir(url, model, "tiny/v1")
        env = vertex_env(url, tmp_path, AIP_HTTP_PORT=str(port), AIP_PREDICT_ROUTE=PREDICT, AIP_HEALTH_ROUTE=HEALTH,
                         AIP_STORAGE_URI="gs://models/tiny/v1")
        base = {k: v for k, v in os.environ.items() if not k.startswith(("AIP_", "MODEL_ID", "PORT", "HF_MODEL"))}
        # Not Vertex's: a free metrics port (TGI's 9000 may be taken on a shared test machine).
        full = {**base, "PYTHONUNBUFFERED": "1", "PROMETHEUS_PORT": str(free_port()), **env}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "tests.socket.scripted_server"], env=full, cwd=ROOT, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        try:
            assert wait_http_ok(f"http://127.0.0.1:{port}{HEALTH}", STARTUP_TIMEOUT, proc), log_path.read_text()[-3000:]
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
                instances = [{"inputs": "Hello", "parameters": {"max_new_tokens": 4, "temperature": 0.7, "seed": 1}},
                             {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}]
                r = http.post(PREDICT, json={"instances": instances})
                assert r.status_code == 200, r.text
                predictions = r.json()["predictions"]
                assert len(predictions) == 2 and all(isinstance(p, str) and p for p in predictions)
                # The same instance and seed: the same text on /vertex.
                r = http.post("/vertex", json={"instances": instances[:1]})
                assert (r.status_code, r.json()["predictions"]) == (200, predictions[:1])
                assert http.get(HEALTH).status_code == 200
                assert http.get("/health").status_code == 200
                served = http.get("/info").json()["model_id"]
            local = tmp_path / "tgi-compat-gcs" / "models" / "tiny" / "v1"
            assert served == str(local)
            assert sorted(p.name for p in local.iterdir()) == sorted(n.rsplit("/", 1)[1] for n in names)
            for f in local.iterdir():
                assert f.read_bytes() == (model / f.name).read_bytes(), f.name
            assert sorted(p.name for p in local.parent.iterdir()) == ["v1"]  # no partial directory left
            text = log_path.read_text()
            assert "downloaded gs://models/tiny/v1" in text
            assert f"Vertex AI: POST {PREDICT} serves /vertex" in text
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
    assert proc.returncode == 0, log_path.read_text()[-3000:]
