"""``tgi-compat`` / ``python -m tgi_compat``: TGI's launcher flags, then vLLM's."""

from __future__ import annotations

import sys

from tgi_compat.config import ConfigError, EmbeddedModelError, parse_config


def _print_help() -> None:
    from tgi_compat.launcher import help_text

    print(help_text())
    print("\nvLLM engine flags (passed to vLLM; where they set what a TGI flag set, they win):\n", flush=True)
    from tgi_compat.engine import engine_arg_parser

    engine_arg_parser().print_help()


JSON_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def logging_dict_config(level: str, json_output: bool) -> dict:
    """One logging set-up for our loggers, uvicorn's and vLLM's (all processes)."""
    formatter = (
        {"()": "pythonjsonlogger.json.JsonFormatter", "fmt": JSON_FORMAT}
        if json_output
        else {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    )
    handler = {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stdout"}
    logger = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"default": handler},
        "loggers": {name: dict(logger) for name in ("tgi_compat", "uvicorn", "uvicorn.error", "vllm")},
    }


def setup_logging(level: str, json_output: bool) -> dict:
    import json
    import logging.config
    import os
    import tempfile

    config = logging_dict_config(level, json_output)
    logging.config.dictConfig(config)
    if json_output and not os.environ.get("VLLM_LOGGING_CONFIG_PATH"):
        # vLLM reads this in every process it starts (engine core, workers).
        path = os.path.join(tempfile.gettempdir(), f"tgi-compat-logging-{os.getpid()}.json")
        with open(path, "w") as f:
            json.dump(config, f)
        os.environ["VLLM_LOGGING_CONFIG_PATH"] = path
    return config


def main(argv: list[str] | None = None) -> int:
    try:
        config, help_requested = parse_config(argv)
    except ConfigError as e:
        print(f"tgi-compat: error: {e}", file=sys.stderr)
        return 2
    if help_requested:
        _print_help()
        return 0
    log_config = setup_logging(config.log_level, config.json_output)
    import logging

    from tgi_compat.launcher import apply_process_env, environment_report

    logger = logging.getLogger("tgi_compat")
    if config.print_env:
        logger.info("%s", environment_report())
    for notice in config.notices:
        logger.info("%s", notice)
    apply_process_env(config)
    try:
        if config.headless:  # engines only, for a front end on another node
            from tgi_compat.headless import run_headless

            return run_headless(config)
        from tgi_compat.server import run

        return run(config, log_config=log_config)
    except ConfigError as e:
        print(f"tgi-compat: error: {e}", file=sys.stderr)
        return 2
    except EmbeddedModelError as e:
        print(f"tgi-compat: error: {e}", file=sys.stderr)
        return 1
