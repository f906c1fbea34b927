"""Sharded engines: TGI's --num-shard (vLLM tensor parallelism), vLLM's
--pipeline-parallel-size, and vLLM's Ray executor against a Ray cluster started apart
(``ray start --head`` on loopback, as a cluster the server joins). Each server shards the
tiny model over two workers and serves our logits processors (typical_p, watermark),
grammars and a LoRA adapter through them.

On a CPU host each worker is bound to its own core with vLLM's VLLM_CPU_OMP_THREADS_BIND.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys

import httpx
import pytest

from tests.conftest import EAGER, ServerProcess, free_port

pytestmark = [pytest.mark.topology, pytest.mark.timeout(600)]


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _bind() -> dict[str, str]:
    return {"VLLM_CPU_OMP_THREADS_BIND": "0|1"} if _on_cpu() else {}


# What vllm-cpu 0.32 answers (checked on a 2-core x86_64 host):
PP_ON_CPU = ("needs a GPU machine: vllm-cpu 0.32's CPU model runner keeps no intermediate tensors for "
             "pipeline stage 2 (its worker fails `assert self.intermediate_tensors is not None` in "
             "sync_and_gather_intermediate_tensors on the first request)")
RAY_ON_CPU = "needs a GPU machine: vllm-cpu 0.32 refuses Ray ('current platform cpu does not support ray.')"


def _serve(flags: list[str], log_name: str, env: dict[str, str] | None = None):
    from tgi_compat.tiny_lora import build_tiny_lora
    from tgi_compat.tiny_model import build_tiny_model

    adapter = build_tiny_lora(build_tiny_model(), f"/tmp/tgi-compat-test-lora-{os.getpid()}")
    server = ServerProcess(["--max-total-tokens", "512", "--lora-adapters", f"tiny-lora={adapter}", *EAGER, *flags],
                           env={**_bind(), **(env or {})}, log_name=log_name)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop(signal.SIGKILL)


def _generate(url: str, **parameters) -> dict:
    r = httpx.post(f"{url}/generate", json={"inputs": "Once upon a time", "parameters": {"max_new_tokens": 12, **parameters}}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _serves_every_feature(url: str) -> None:
    greedy = _generate(url)["generated_text"]
    assert greedy == _generate(url)["generated_text"]  # deterministic across the shards
    # Our logits processors run in every worker's sampler.
    typical = [_generate(url, typical_p=0.5, do_sample=True, seed=7)["generated_text"] for _ in range(2)]
    assert typical[0] == typical[1]
    marked = [_generate(url, watermark=True, seed=3, do_sample=True)["generated_text"] for _ in range(2)]
    assert marked[0] == marked[1]
    # Grammars (structured outputs) and the LoRA adapter.
    digits = _generate(url, grammar={"type": "regex", "value": "[0-9]{5}"})["generated_text"]
    assert re.fullmatch(r"[0-9]{5}", digits), digits
    lora = _generate(url, adapter_id="tiny-lora")["generated_text"]
    assert lora != greedy and lora == _generate(url, adapter_id="tiny-lora")["generated_text"]
    details = _generate(url, details=True, decoder_input_details=True)["details"]
    assert details["generated_tokens"] == 12 and details["prefill"][0]["logprob"] is None


def _workers(server: ServerProcess) -> int:
    import psutil

    return sum("Worker" in " ".join(c.cmdline()) or "Worker" in c.name()
               for c in psutil.Process(server.proc.pid).children(recursive=True))


@pytest.fixture(scope="module")
def tensor_parallel():
    yield from _serve(["--num-shard", "2"], "tp")


def test_num_shard_is_tensor_parallel_and_serves_every_feature(tensor_parallel):
    info = httpx.get(f"{tensor_parallel.url}/info", timeout=30).json()
    assert info["max_total_tokens"] == 512
    assert _workers(tensor_parallel) >= 2
    assert "tensor_parallel_size=2" in tensor_parallel.log_path.read_text()
    _serves_every_feature(tensor_parallel.url)


@pytest.fixture(scope="module")
def pipeline_parallel(tensor_parallel):
    if _on_cpu():
        pytest.skip(PP_ON_CPU)
    tensor_parallel.stop(signal.SIGKILL)  # one sharded server at a time on small hosts
    yield from _serve(["--pipeline-parallel-size", "2"], "pp")


def test_pipeline_parallel_serves_every_feature(pipeline_parallel):
    assert "pipeline_parallel_size=2" in pipeline_parallel.log_path.read_text()
    _serves_every_feature(pipeline_parallel.url)


@pytest.fixture(scope="module")
def ray_cluster(tensor_parallel, tmp_path_factory):
    if _on_cpu():
        pytest.skip(RAY_ON_CPU)
    tensor_parallel.stop(signal.SIGKILL)
    ray = shutil.which("ray", path=os.path.dirname(sys.executable))
    assert ray, "ray is missing: it comes with the cuda extra"
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    temp = tmp_path_factory.mktemp("ray")
    subprocess.run([ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
                    "--include-dashboard", "false", "--temp-dir", str(temp)], check=True, env=env, timeout=180,
                   capture_output=True)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, timeout=120, capture_output=True)


@pytest.fixture(scope="module")
def ray_server(ray_cluster):
    yield from _serve(["--num-shard", "2", "--distributed-executor-backend", "ray"], "ray",
                      env={"RAY_ADDRESS": ray_cluster, "RAY_USAGE_STATS_ENABLED": "0"})


def test_ray_executor_on_an_existing_cluster(ray_server, ray_cluster):
    # The workers are Ray actors of the cluster started above, not the server's children.
    assert _workers(ray_server) == 0
    log = ray_server.log_path.read_text()
    # vLLM names its executor in the engine's config line (a bare "ray" would match "array").
    assert "RayDistributedExecutor" in log or re.search(r"distributed_executor_backend=['\"]?ray\b", log), log[-3000:]
    _serves_every_feature(ray_server.url)
