"""``tgi-compat`` / ``python -m tgi_compat``: TGI's launcher flags, then vLLM's."""

from __future__ import annotations

import logging
import sys

from tgi_compat.config import ConfigError, build_parser, parse_config


def _print_help() -> None:
    build_parser().print_help()
    print("\nvLLM engine flags (passed through untouched; TGI flags above map onto some of them):\n")
    from tgi_compat.engine import engine_arg_parser

    engine_arg_parser().print_help()


def setup_logging(level: str, json_output: bool) -> None:
    handler = logging.StreamHandler()
    if json_output:
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("tgi_compat")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def main(argv: list[str] | None = None) -> int:
    try:
        config, help_requested = parse_config(argv)
    except ConfigError as e:
        print(f"tgi-compat: error: {e}", file=sys.stderr)
        return 2
    if help_requested:
        _print_help()
        return 0
    setup_logging(config.log_level, config.json_output)
    from tgi_compat.server import run

    try:
        return run(config)
    except ConfigError as e:
        print(f"tgi-compat: error: {e}", file=sys.stderr)
        return 2
