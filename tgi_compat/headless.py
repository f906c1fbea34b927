"""``tgi-compat --headless ...``: data-parallel engines for a front end on another node.

vLLM's own headless mode (``vllm serve --headless``) runs ``--data-parallel-size-local``
engine processes that connect to the front end at ``--data-parallel-address`` /
``--data-parallel-rpc-port`` as ranks ``--data-parallel-start-rank`` onwards. Run through
tgi-compat, those engines get exactly the set-up the front end's own engines get (TGI's
logits processors, grammar defaults, KV-cache default on CPU, LoRA adapters), since each
engine builds its configuration from its own node's flags.
"""

from __future__ import annotations

import dataclasses
import logging

from tgi_compat.config import Config

logger = logging.getLogger("tgi_compat.headless")

def run_headless(config: Config) -> int:
    """Run this node's engines until SIGTERM/SIGINT (vLLM's headless loop)."""
    from vllm.entrypoints.cli.serve import run_headless as vllm_run_headless
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from tgi_compat.server import config_engine_args

    engine_args, _ = config_engine_args(config)
    # vLLM's serve namespace (its headless path reads a few serve-only options), with
    # every engine field replaced by ours.
    ns = make_arg_parser(FlexibleArgumentParser()).parse_args(
        ["--model", engine_args.model, "--headless", *config.engine_flags]
    )
    for field in dataclasses.fields(engine_args):
        setattr(ns, field.name, getattr(engine_args, field.name))
    ns.api_server_count = 0  # what `vllm serve --headless` sets: no API server here
    vllm_run_headless(ns)
    return 0
