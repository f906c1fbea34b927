"""The scripted engine is held to the real one: both provide every member of the
``EngineClient`` protocol, of the same kind (attribute, property, method, coroutine)."""

from __future__ import annotations

import ast
import inspect

from tests.unit.scripted_engine import ScriptedEngine
from tgi_compat.engine import Engine, EngineClient


def protocol_members() -> dict[str, str]:
    """Member name -> "data", "sync" or "async"."""
    members = {name: "data" for name in EngineClient.__annotations__}
    for name, value in vars(EngineClient).items():
        if isinstance(value, property):
            members[name] = "data"
        elif inspect.iscoroutinefunction(value):
            members[name] = "async"
        elif inspect.isfunction(value) and not name.startswith("_"):
            members[name] = "sync"
    return members


def kind_on_class(cls, name: str, init_assigned: set[str]) -> str | None:
    value = inspect.getattr_static(cls, name, None)
    if value is None:
        return "data" if name in init_assigned else None
    if isinstance(value, property):
        return "data"
    return "async" if inspect.iscoroutinefunction(value) else "sync"


def assigned_in_init(cls) -> set[str]:
    """Attributes ``__init__`` assigns (``self.x = ...`` / ``self.x: T = ...``)."""
    tree = ast.parse(inspect.getsource(cls.__init__).strip().replace("\n    ", "\n"))
    names = set()
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for t in targets:
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                names.add(t.attr)
    return names


def test_protocol_is_not_empty():
    members = protocol_members()
    assert {"generate", "abort", "check_health", "tokenizer", "errored", "adapters"} <= set(members)
    assert members["generate"] == "sync" and members["abort"] == "async" and members["errored"] == "data"


def test_engine_and_scripted_engine_provide_every_member_of_the_same_kind():
    members = protocol_members()
    for cls in (Engine, ScriptedEngine):
        init = assigned_in_init(cls)
        wrong = {name: (kind, kind_on_class(cls, name, init)) for name, kind in members.items()
                 if kind_on_class(cls, name, init) != kind}
        assert not wrong, f"{cls.__name__} differs from EngineClient (member: (protocol, class)): {wrong}"
