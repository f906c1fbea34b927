"""How TGI deployments start: LOG_LEVEL in TGI's syntax, TGI's environment-only variables
(PREFIX_CACHING, ATTENTION, ...), and the `text-generation-launcher` console script.
Pure, plus `python -m tgi_compat` processes that exit before anything starts."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import tomllib
from importlib.metadata import EntryPoint, PackageNotFoundError, distribution
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tgi_compat import launcher
from tgi_compat.config import ConfigError
from tgi_compat.launcher import parse_config
from tgi_compat.logs import OFF, logging_dict_config, parse_log_levels, setup_logging

D, I, W, E = logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR


# --- LOG_LEVEL ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,levels",
    [
        ("", (I, I, I)),  # unset / empty: info
        ("info", (I, I, I)),  # TGI: its two targets at info -> every component here
        ("warn", (W, W, W)),
        ("debug", (D, D, D)),
        ("trace", (D, D, D)),  # a global level; Python has no trace
        ("TRACE", (D, D, D)),
        ("error", (E, E, E)),
        ("off", (OFF, OFF, OFF)),
        ("4", (D, D, D)),  # env_filter's numeric levels
        ("warning", (W, W, W)),  # Python's spelling
        ("info,text_generation_router=debug", (D, D, I)),  # the router: front end and HTTP server
        ("warn,text_generation_launcher=debug", (D, W, D)),  # the launcher relays the engine's logs
        ("text_generation_router=debug", (D, D, OFF)),  # env_filter: nothing else is enabled
        ("text_generation_router::server=debug,info", (D, D, I)),  # a module path: its crate
        ("warn,text_generation_server=debug", (W, W, D)),  # TGI's model server is the engine
        ("debug,text_generation_router=warn", (D, W, D)),  # tgi_compat is the launcher too (debug)
        ("info,text_generation_server=warn", (I, I, I)),  # TGI's launcher relays the server's logs at info
        ("info,text_generation_router=debug,uvicorn=warn", (D, W, I)),  # our own names win over TGI's
        ("error,vllm=debug,tgi_compat=info", (I, E, D)),
        ("text_generation_launcher", (D, OFF, D)),  # a bare target: trace
        ("info , text_generation_router = debug ,", (D, D, I)),
    ],
)
def test_log_level_in_tgis_syntax(text, levels):
    parsed = parse_log_levels(text)
    assert (parsed.levels["tgi_compat"], parsed.levels["uvicorn"], parsed.levels["vllm"]) == levels
    assert parsed.ignored == ()


def test_log_level_targets_that_change_nothing_are_named_at_start_up():
    config, _ = parse_config([], {"LOG_LEVEL": "info,text_generation_router=debug,tokio=warn,h2=off"})
    assert config.log_level.levels == {"tgi_compat": D, "uvicorn": D, "vllm": I}
    assert config.log_level.ignored == ("tokio=warn", "h2=off")
    [line] = [n for n in config.notices if "LOG_LEVEL" in n]
    assert line.startswith("`LOG_LEVEL=info,text_generation_router=debug,tokio=warn,h2=off`: `tokio=warn`, `h2=off` have no effect")
    assert "levels: tgi_compat=debug uvicorn=debug vllm=info" in line
    config, _ = parse_config(["--log-level", "debug,[{otel.kind=server}]=trace"], {})  # a span filter
    assert config.log_level.levels["tgi_compat"] == D and config.log_level.ignored == ("[{otel.kind=server}]=trace",)
    assert any(n.startswith("`--log-level debug,[{otel.kind=server}]=trace`: ") for n in config.notices)
    assert parse_log_levels("info,[{otel.kind=server}]").ignored == ("[{otel.kind=server}]",)  # no level: trace
    assert not [n for n in parse_config([], {"LOG_LEVEL": "info,text_generation_router=debug"})[0].notices]


@pytest.mark.parametrize(
    "argv,env,message",
    [
        ([], {"LOG_LEVEL": "verbose"}, "invalid log level 'verbose' (levels: trace, debug, info, warn, error, off; or TARGET=LEVEL) for 'LOG_LEVEL'"),
        ([], {"LOG_LEVEL": "info,text_generation_router=loud"}, "invalid log level 'loud' in 'text_generation_router=loud'"),
        (["--log-level", "=debug"], {}, "invalid log directive '=debug' (expected LEVEL or TARGET=LEVEL) for '--log-level'"),
        (["--log-level", "a b=info"], {}, "invalid log directive 'a b=info'"),
    ],
)
def test_unreadable_log_level_is_a_config_error(argv, env, message):
    with pytest.raises(ConfigError) as e:
        parse_config(argv, env)
    assert message in str(e.value)


def test_flag_beats_env_for_log_level():
    config, _ = parse_config(["--log-level", "warn"], {"LOG_LEVEL": "debug"})
    assert config.log_level.levels == {"tgi_compat": W, "uvicorn": W, "vllm": W}


@pytest.fixture
def restore_logging():
    names = ("tgi_compat", "uvicorn", "uvicorn.error", "vllm")
    saved = {n: (lg.level, list(lg.handlers), lg.propagate) for n in names if (lg := logging.getLogger(n))}
    yield
    for name, (level, handlers, propagate) in saved.items():
        lg = logging.getLogger(name)
        lg.setLevel(level)
        lg.handlers[:] = handlers
        lg.propagate = propagate


def test_setup_applies_levels_here_and_to_vllms_processes(restore_logging, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path))
    levels = parse_log_levels("info,text_generation_router=debug,vllm=error")
    env: dict[str, str] = {}
    setup_logging(levels, json_output=False, environ=env)
    assert logging.getLogger("tgi_compat").level == D and logging.getLogger("uvicorn.error").level == D
    assert logging.getLogger("vllm").level == E
    assert env == {"VLLM_LOGGING_LEVEL": "ERROR"}  # vLLM's processes read their level from it
    env = {"VLLM_LOGGING_LEVEL": "DEBUG"}  # an explicit vLLM setting wins
    setup_logging(parse_log_levels("off"), json_output=True, environ=env)
    assert env["VLLM_LOGGING_LEVEL"] == "DEBUG"
    written = json.loads(Path(env["VLLM_LOGGING_CONFIG_PATH"]).read_text())
    assert written["loggers"]["vllm"]["level"] == OFF and written == logging_dict_config(parse_log_levels("off"), True)
    assert logging.getLogger("tgi_compat").level == OFF


def test_setup_failure_is_a_config_error_not_a_traceback(restore_logging, monkeypatch):
    monkeypatch.setitem(sys.modules, "pythonjsonlogger", None)  # --json-output's formatter missing
    with pytest.raises(ConfigError, match=r"cannot set up logging \(--json-output\)"):
        setup_logging(parse_log_levels("info"), json_output=True, environ={})


def _run(args: list[str], env: dict[str, str], timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    return out, time.monotonic() - start


@pytest.mark.parametrize("value", ["verbose", "info,router=", "debug,text_generation_router=loud"])
def test_unreadable_log_level_exits_2_with_one_line(value):
    out, elapsed = _run(["-m", "tgi_compat", "--port", "0"], {"LOG_LEVEL": value})
    print(f"LOG_LEVEL={value}: exit {out.returncode} after {elapsed:.2f} s")
    assert out.returncode == 2, out
    assert "Traceback" not in out.stderr and out.stdout == ""
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("tgi-compat: error: invalid log ") and line.endswith("for 'LOG_LEVEL'")


# --- TGI's environment-only variables ------------------------------------------------------------


@pytest.mark.parametrize(
    "env,expected",
    [
        ({"PREFIX_CACHING": "0"}, False),
        ({"PREFIX_CACHING": "false"}, False),
        ({"PREFIX_CACHING": "1"}, True),
        ({"PREFIX_CACHING": "True"}, True),
        ({"USE_PREFIX_CACHING": "0"}, False),  # TGI 2's name
        ({"PREFIX_CACHING": "1", "USE_PREFIX_CACHING": "0"}, True),  # TGI 3's name wins
    ],
)
def test_prefix_caching_maps_to_vllms_switch(env, expected):
    config, _ = parse_config([], env)
    assert config.engine_overrides == {"enable_prefix_caching": expected}
    assert config.notices == []  # mapped: nothing to say


def test_explicit_vllm_prefix_caching_flag_wins_and_says_so():
    # vLLM's own parser reads the flags: the field PREFIX_CACHING sets is the one vLLM's flags set.
    config, _ = parse_config(["--enable-prefix-caching"], {"PREFIX_CACHING": "0"})
    assert "enable_prefix_caching" not in config.engine_overrides
    assert config.notices == ["vLLM flag `--enable-prefix-caching` wins over `PREFIX_CACHING=false`"]
    config, _ = parse_config(["--no-enable-prefix-caching"], {"USE_PREFIX_CACHING": "1"})
    assert config.notices == ["vLLM flag `--no-enable-prefix-caching` wins over `USE_PREFIX_CACHING=true`"]
    config, _ = parse_config(["--no-enable-prefix-caching"], {"PREFIX_CACHING": "0"})  # agreeing
    assert config.notices == [] and "enable_prefix_caching" not in config.engine_overrides


@pytest.mark.parametrize(
    "var,value,says",
    [
        ("ATTENTION", "paged", "vLLM picks its attention backend"),
        ("ATTENTION", "flashinfer", "`--attention-backend`"),
        ("PREFILL_CHUNKING", "false", "vLLM chunks long prompts by itself"),
        ("USE_FLASH_ATTENTION", "false", "vLLM picks its attention backend"),
        ("DISABLE_EXLLAMA", "True", "GPTQ kernels"),
        ("EXLLAMA_VERSION", "1", "GPTQ kernels"),
        ("TGI_WIGGLE_ROOM", "0.8", "`--cuda-memory-fraction`"),
    ],
)
def test_engine_only_variables_say_they_change_nothing(var, value, says):
    config, _ = parse_config([], {var: value})
    [line] = config.notices
    assert line.startswith(f"`{var}={value}` has no effect here: ") and says in line, line
    assert config.engine_overrides == {}


@pytest.mark.parametrize("env,message", [({"ATTENTION": "fast"}, "for 'ATTENTION'"),
                                         ({"PREFIX_CACHING": "maybe"}, "for 'PREFIX_CACHING'"),
                                         ({"TGI_WIGGLE_ROOM": "most"}, "for 'TGI_WIGGLE_ROOM'")])
def test_unreadable_tgi_variables_are_config_errors(env, message):
    with pytest.raises(ConfigError, match=message):
        parse_config([], env)


def test_environment_only_variables_have_no_flag():
    for name in ("--prefix-caching", "--attention"):
        with pytest.raises(ConfigError, match="neither a TGI launcher flag nor a vLLM engine flag"):
            parse_config([name, "0"], {})
    text = launcher.help_text()
    assert "PREFIX_CACHING, USE_PREFIX_CACHING\n" in text and "\n  ATTENTION\n" in text


# --- text-generation-launcher ------------------------------------------------------------------


def test_text_generation_launcher_is_the_same_program():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["text-generation-launcher"] == scripts["tgi-compat"]
    entry = EntryPoint("text-generation-launcher", scripts["text-generation-launcher"], "console_scripts")
    from tgi_compat.cli import main

    assert entry.load() is main
    # What pip's generated script runs, as TGI manifests call it.
    module, func = entry.value.split(":")
    wrapper = f"import sys; sys.argv[0] = 'text-generation-launcher'; from {module} import {func}; sys.exit({func}())"
    out, _ = _run(["-c", wrapper, "--version"], {})
    assert out.returncode == 0 and out.stdout.startswith("tgi-compat "), out
    out, _ = _run(["-c", wrapper, "--max-batch-size", "lots"], {})
    assert out.returncode == 2 and "invalid value 'lots'" in out.stderr


def test_installed_scripts_when_installed_from_this_checkout():
    """Where this checkout is the installed distribution (`make install`, the fresh-clone CI),
    both scripts are on PATH beside the interpreter and run."""
    try:
        dist = distribution("tgi-compat")
    except PackageNotFoundError:
        dist = None
    origin = json.loads((dist and dist.read_text("direct_url.json")) or "{}").get("url")
    if origin != ROOT.as_uri():
        # Another checkout is installed (a worktree on a shared venv): its scripts are not this one's.
        return
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    installed = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert installed == declared
    for name in declared:
        out = subprocess.run([str(Path(sys.executable).parent / name), "--version"], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.startswith("tgi-compat "), (name, out)
