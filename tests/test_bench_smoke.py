"""The benchmark harness still runs end to end (a smoke run: seconds of load, no timings
asserted; a benchmark is not a test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.topology

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_smoke(tmp_path):
    out = subprocess.run(
        # Eager, as the tests' other servers: every cell starts an engine (conftest.EAGER).
        [sys.executable, "benchmarks/bench.py", "--smoke", "--results", str(tmp_path), "--engine-flags=--enforce-eager"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = json.loads((tmp_path / "latest.json").read_text())
    assert set(results["cells"]) == {"tgi_stream", "tgi_generate", "vllm_stream", "in_process", "front_end"}
    for cell in results["cells"].values():
        for level in cell.values():
            assert level["errors"] == 0 and level["tokens"] == level["requests"] * results["tokens"]
    assert "| tgi-compat /generate_stream |" in (tmp_path / "latest.md").read_text()
