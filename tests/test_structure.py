"""The package's structural contracts: which layer imports which, one default per flag, and
the uvicorn internals the connection guards override (pinned, so an upgrade that moves them
fails here rather than in production)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path

import uvicorn
from packaging.specifiers import SpecifierSet
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tgi_compat.config import Config
from tgi_compat.connection import GuardedHttpProtocol
from tgi_compat.launcher import FLAGS

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tgi_compat"

# Flags whose value is consumed while parsing (merged into another field, or only checked).
PARSE_ONLY = {"max-input-length": "merged into max_input_tokens", "ngrok": "checked", "ngrok-authtoken": "checked",
              "ngrok-edge": "checked"}


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_core_does_not_import_the_connection_layer():
    # The connection guards write the drop record and read it back (connection.drop_record,
    # handed to Infer by server.py); the generation core knows nothing of sockets.
    assert "tgi_compat.connection" not in imports_of(PACKAGE / "tgi" / "infer.py")


def test_config_does_not_import_the_launcher():
    # launcher.py builds Config; config.py is the result only (no import cycle).
    for module in ("config.py", "logs.py"):
        assert "tgi_compat.launcher" not in imports_of(PACKAGE / module), module


def config_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def test_every_flag_maps_to_a_config_field_with_the_same_default():
    fields = {f.name: f for f in dataclasses.fields(Config)}
    mismatched, missing = [], []
    for flag in FLAGS:
        if flag.field is None or flag.name in PARSE_ONLY:
            continue
        if flag.field not in fields:
            missing.append(flag.name)
            continue
        default = config_default(fields[flag.field])
        given = flag.parse(flag.default) if isinstance(flag.default, str) and flag.parse is not str else flag.default
        if flag.default is None and default in (None, False, (), []):
            continue
        if flag.kind in ("list", "append") and given is not None:
            given = type(default)(given) if default is not None else given
        if given != default:
            mismatched.append(f"{flag.flag}: Flag.default {flag.default!r}, Config {default!r}")
    assert not missing, f"flags without a Config field (add one, or list them in PARSE_ONLY): {missing}"
    assert not mismatched, mismatched


def test_parse_only_flags_really_have_no_config_field():
    fields = {f.name for f in dataclasses.fields(Config)}
    by_name = {f.name: f for f in FLAGS}
    for name in PARSE_ONLY:
        assert name in by_name and by_name[name].field not in fields


def test_uvicorn_internals_the_guards_override_exist():
    """connection.py subclasses uvicorn's httptools protocol: each method it overrides must
    still exist there with the same parameters, and the attributes it reads must still be set."""
    overridden = [name for name, value in vars(GuardedHttpProtocol).items()
                  if inspect.isfunction(value) and hasattr(HttpToolsProtocol, name)]
    own = {name for name, value in vars(GuardedHttpProtocol).items() if inspect.isfunction(value)}
    assert {"connection_made", "connection_lost", "data_received", "on_headers_complete", "on_message_complete",
            "on_response_complete", "pause_writing", "_start_asgi_task"} <= set(overridden)
    for name in overridden:
        ours = inspect.signature(getattr(GuardedHttpProtocol, name))
        if any(p.kind is p.VAR_POSITIONAL for p in ours.parameters.values()):
            continue  # passes everything through
        theirs = inspect.signature(getattr(HttpToolsProtocol, name))
        assert list(ours.parameters) == list(theirs.parameters), name
    source = inspect.getsource(HttpToolsProtocol)
    read = set(re.findall(r"self\.([a-z_]+)", inspect.getsource(GuardedHttpProtocol)))
    set_by_us = set(re.findall(r"self\.([a-z_]+)\s*(?::[^=]+)?=", inspect.getsource(GuardedHttpProtocol)))
    declared = set(getattr(GuardedHttpProtocol, "__annotations__", {}))  # e.g. guard, bound per server
    theirs = read - set_by_us - own - declared
    missing = sorted(a for a in theirs if f"self.{a}" not in source)
    assert not missing, f"uvicorn's HttpToolsProtocol no longer has: {missing}"


def test_uvicorn_is_pinned_below_the_next_minor_release():
    text = (ROOT / "pyproject.toml").read_text()
    spec = SpecifierSet(re.search(r'"uvicorn\[standard\]([^"]*)"', text).group(1))
    assert uvicorn.__version__ in spec
    major, minor = (int(p) for p in uvicorn.__version__.split(".")[:2])
    assert f"{major}.{minor + 1}.0" not in spec, "an upper bound keeps an untested uvicorn out"
