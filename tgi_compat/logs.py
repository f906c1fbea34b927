"""Logging: TGI's ``LOG_LEVEL`` (``--log-level``) read as TGI reads it, and the one logging
set-up for our loggers, uvicorn's and vLLM's (in every process vLLM starts).

TGI hands ``LOG_LEVEL`` to Rust's ``EnvFilter`` (``launcher/src/main.rs``,
``router/src/logging.rs``): comma-separated directives, each a level (``trace``, ``debug``,
``info``, ``warn``, ``error``, ``off``, or ``0``-``5``) or ``target=level`` (a bare target
means ``trace``). Plain ``warn``/``info``/``debug`` are rewritten by TGI to its own two
targets at that level. Components no directive reaches are off; an empty value is ``info``.

Here TGI's targets are our three components: ``text_generation_router`` is tgi-compat's
front end and its HTTP server (``tgi_compat``, ``uvicorn``); ``text_generation_launcher``
is tgi-compat and the engine whose logs TGI's launcher relays (``tgi_compat``, ``vllm``);
``text_generation_server`` (TGI's model server) is ``vllm``. A component logs at the most
verbose level of the TGI parts it stands for (a part without a directive: the plain level).
Our own names (``tgi_compat``, ``uvicorn``, ``vllm``) are taken too and win over TGI's. Python has no
``trace``: it logs as ``debug``. Targets of TGI's Rust dependencies (``tokio=debug``) and
span filters change nothing here and a start-up line says so; a word that is neither a
level nor a target we know is a configuration error.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

COMPONENTS = ("tgi_compat", "uvicorn", "vllm")
OFF = logging.CRITICAL + 10  # above every record
LEVELS = {
    "off": OFF, "0": OFF,
    "error": logging.ERROR, "1": logging.ERROR,
    "warn": logging.WARNING, "2": logging.WARNING,
    "info": logging.INFO, "3": logging.INFO,
    "debug": logging.DEBUG, "4": logging.DEBUG,
    "trace": logging.DEBUG, "5": logging.DEBUG,
    # Python's spellings, for Python users' habits.
    "warning": logging.WARNING, "critical": logging.CRITICAL,
}
# TGI's targets (the crate, first segment of a `a::b` path) -> the part of TGI it names.
TGI_TARGETS = {
    "text_generation_router": "router",
    "text_generation_router_v2": "router",
    "text_generation_router_v3": "router",
    "text_generation_launcher": "launcher",
    "text_generation_server": "server",
}
# Our components -> the parts of TGI they stand for. A component logs at the most verbose
# level of its parts (each part: its directive, else the plain level, else off).
PARTS = {"tgi_compat": ("router", "launcher"), "uvicorn": ("router",), "vllm": ("launcher", "server")}
# TGI's rewrite of a plain level (launcher/src/main.rs, router/src/logging.rs).
TGI_PLAIN = ("warn", "info", "debug")
_TARGET = re.compile(r"[A-Za-z_][\w\-]*(?:(?:::|\.)[\w\-]+)*")


@dataclass(frozen=True)
class LogLevels:
    """``LOG_LEVEL`` read: the level of each component and the directives that change nothing."""

    text: str
    levels: dict[str, int] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()

    def __str__(self) -> str:  # how a start-up line shows the setting
        return self.text

    def name(self, component: str) -> str:
        """The component's level as a ``logging`` level name (``off`` as CRITICAL: vLLM's
        env var takes names only)."""
        return logging.getLevelName(min(self.levels[component], logging.CRITICAL))

    def notice(self, source: str) -> str | None:
        """The start-up line when part of the setting changes nothing here."""
        if not self.ignored:
            return None
        shown = ", ".join(f"`{d}`" for d in self.ignored)
        levels = " ".join(f"{c}={self._word(c)}" for c in COMPONENTS)
        return (f"`{source}`: {shown} {'has' if len(self.ignored) == 1 else 'have'} no effect here (tgi-compat's "
                f"logs are tgi_compat, uvicorn and vllm; TGI's text_generation_router/_launcher/_server map onto "
                f"them); levels: {levels}")

    def _word(self, component: str) -> str:
        level = self.levels[component]
        return "off" if level >= OFF else logging.getLevelName(level).lower()


def parse_log_levels(text: str) -> LogLevels:
    """``LOG_LEVEL`` in TGI's syntax -> ``LogLevels``; ValueError for what cannot be read."""
    raw = text.strip()
    if raw in TGI_PLAIN:  # TGI: its own targets at that level, nothing else
        raw = f"text_generation_launcher={raw},text_generation_router={raw}"
    directives = [d.strip() for d in raw.split(",") if d.strip()]
    if not directives:
        return LogLevels(text, dict.fromkeys(COMPONENTS, logging.INFO))
    default: int | None = None
    parts: dict[str, int] = {}  # TGI's part (router, launcher, server) -> its directive's level
    own: dict[str, int] = {}  # component -> level from its own name (wins over TGI's targets)
    ignored: list[str] = []
    for directive in directives:
        # The level follows the last `=` outside a span filter (`target[span{field=value}]=level`).
        cut = directive.rfind("=")
        if cut < directive.rfind("]"):
            cut = -1
        target, sep, level_word = (directive[:cut], "=", directive[cut + 1:]) if cut >= 0 else (directive, "", "")
        target = target.strip()
        if not sep:  # a level, or a bare target (= trace)
            if target.lower() in LEVELS:
                default = LEVELS[target.lower()]
                continue
            level_word = "trace"
        level = LEVELS.get(level_word.strip().lower())
        if level is None:
            raise ValueError(f"invalid log level '{level_word.strip()}' in '{directive}' "
                             f"(levels: trace, debug, info, warn, error, off)")
        if "[" in target or "{" in target:  # span filters: no spans here
            ignored.append(directive)
            continue
        if not _TARGET.fullmatch(target):
            raise ValueError(f"invalid log directive '{directive}' (expected LEVEL or TARGET=LEVEL)")
        root = re.split(r"::|\.", target, maxsplit=1)[0]
        if root in COMPONENTS:
            own[root] = level
        elif root in TGI_TARGETS:
            parts[TGI_TARGETS[root]] = level
        elif not sep:  # a lone unknown word is a mistyped level far more often than a target
            raise ValueError(f"invalid log level '{target}' (levels: trace, debug, info, warn, error, off; "
                             f"or TARGET=LEVEL)")
        else:
            ignored.append(directive)
    fallback = OFF if default is None else default
    levels = {c: own.get(c, min(parts.get(p, fallback) for p in PARTS[c])) for c in COMPONENTS}
    return LogLevels(text, levels, tuple(ignored))


JSON_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def logging_dict_config(levels: LogLevels, json_output: bool) -> dict:
    """One logging set-up for our loggers, uvicorn's and vLLM's (all processes)."""
    formatter = (
        {"()": "pythonjsonlogger.json.JsonFormatter", "fmt": JSON_FORMAT}
        if json_output
        else {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    )
    handler = {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stdout"}
    names = {"tgi_compat": "tgi_compat", "uvicorn": "uvicorn", "uvicorn.error": "uvicorn", "vllm": "vllm"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"default": handler},
        "loggers": {
            name: {"handlers": ["default"], "level": levels.levels[component], "propagate": False}
            for name, component in names.items()
        },
    }


def setup_logging(levels: LogLevels, json_output: bool, environ=None) -> dict:
    """Configure logging in this process and for vLLM's processes (by environment).
    Raises ConfigError (never a traceback) when it cannot be done."""
    import json
    import logging.config
    import os
    import tempfile

    from tgi_compat.config import ConfigError

    environ = os.environ if environ is None else environ
    config = logging_dict_config(levels, json_output)
    try:
        logging.config.dictConfig(config)
    except (ValueError, TypeError, AttributeError, ImportError) as e:
        raise ConfigError(f"cannot set up logging{' (--json-output)' * json_output}: {e}") from None
    # vLLM's processes configure their own logging: its level by env var (an explicit one wins),
    # and with --json-output our whole set-up by file.
    environ.setdefault("VLLM_LOGGING_LEVEL", levels.name("vllm"))
    if json_output and not environ.get("VLLM_LOGGING_CONFIG_PATH"):
        path = os.path.join(tempfile.gettempdir(), f"tgi-compat-logging-{os.getpid()}.json")
        try:
            with open(path, "w") as f:
                json.dump(config, f)
        except OSError as e:
            raise ConfigError(f"cannot write vLLM's logging set-up to {path}: {e.strerror or e}") from None
        environ["VLLM_LOGGING_CONFIG_PATH"] = path
    return config
