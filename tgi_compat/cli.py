"""``tgi-compat`` (also ``text-generation-launcher``, TGI's name) / ``python -m tgi_compat``:
TGI's launcher flags, then vLLM's."""

from __future__ import annotations

import sys

from tgi_compat.config import ConfigError, EmbeddedModelError
from tgi_compat.launcher import parse_config


def _print_help() -> None:
    from tgi_compat.launcher import help_text

    print(help_text())
    print("\nvLLM engine flags (passed to vLLM; where they set what a TGI flag set, they win):\n", flush=True)
    from tgi_compat.engine import engine_arg_parser

    engine_arg_parser().print_help()


def main(argv: list[str] | None = None) -> int:
    try:
        config, help_requested = parse_config(argv)
    except ConfigError as e:
        print(f"tgi-compat: error: {e}", file=sys.stderr)
        return 2
    if help_requested:
        _print_help()
        return 0
    from tgi_compat.logs import setup_logging

    try:
        log_config = setup_logging(config.log_level, config.json_output)
    except ConfigError as e:
        print(f"tgi-compat: error: {e}", file=sys.stderr)
        return 2
    import logging

    from tgi_compat.launcher import apply_process_env, environment_report

    logger = logging.getLogger("tgi_compat")
    if config.print_env:
        logger.info("%s", environment_report())
    for notice in config.notices:
        logger.info("%s", notice)
    apply_process_env(config)
    from tgi_compat.gcs import DownloadError

    try:
        if config.headless:  # engines only, for a front end on another node
            from tgi_compat.headless import run_headless

            if config.storage_uri:  # AIP_STORAGE_URI: these engines serve the same copy (server.run does it otherwise)
                from tgi_compat.gcs import download_model

                config.model_id = str(download_model(config.storage_uri, timeout=config.storage_timeout))
            return run_headless(config)
        from tgi_compat.server import run

        return run(config, log_config=log_config)
    except ConfigError as e:
        print(f"tgi-compat: error: {e}", file=sys.stderr)
        return 2
    # Valid command lines that could not be served: exit 1, as TGI's launcher when a download
    # fails (Vertex AI's AIP_STORAGE_URI, as Google's entrypoint; an embedded model's build).
    except (DownloadError, EmbeddedModelError) as e:
        print(f"tgi-compat: error: {e}", file=sys.stderr)
        return 1
