"""OpenAPI helpers: request bodies from pydantic models, documented error statuses.

Routes parse their bodies themselves (TGI's exact body errors, §1.1), so FastAPI does
not see the request models; ``json_body`` documents them and ``install`` puts their
schemas into ``components.schemas``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from tgi_compat.tgi.protocol import ErrorResponse

_REF = "#/components/schemas/{model}"
_models: dict[str, type[BaseModel]] = {}

# Example bodies of the generation routes' error statuses, shared by their routers.
VALIDATION_EXAMPLE = {"error": "Input validation error: `temperature` must be strictly positive", "error_type": "validation"}
OVERLOADED_EXAMPLE = {"error": "Model is overloaded", "error_type": "overloaded"}
GENERATION_EXAMPLE = {"error": "Request failed during generation: the engine died", "error_type": "generation"}
INCOMPLETE_EXAMPLE = {"error": "Incomplete generation", "error_type": "incomplete_generation"}

_BODY_ERRORS = {
    400: "Failed to parse the request body as JSON: expected value at line 1 column 1",
    413: "Failed to buffer the request body: length limit exceeded (2000000 bytes)",
    415: "Expected request with `Content-Type: application/json`",
}


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    _models[model.__name__] = model
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}},
        }
    }


def responses(
    ok: dict[int, tuple[str, Any]], errors: dict[int, dict[str, str]], *, stream: bool = False
) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    for status, (description, model) in ok.items():
        media = "text/event-stream" if stream else "application/json"
        entry: dict[str, Any] = {"description": description, "model": model}
        if stream:
            entry["content"] = {media: {"schema": {"$ref": _REF.format(model=model.__name__)}}}
        out[status] = entry
    for status, example in errors.items():
        out[status] = {"description": example["error_type"], "model": ErrorResponse, "content": {"application/json": {"example": example}}}
    for status, text in _BODY_ERRORS.items():
        out[status] = {"description": "Body rejected (plain text)", "content": {"text/plain": {"example": text}}}
    out[422] = out.get(422) or {}
    out[422].setdefault("description", "Body of the wrong shape (plain text)")
    if "content" not in out[422] or "text/plain" not in out[422]["content"]:
        out[422].setdefault("content", {})["text/plain"] = {
            "example": "Failed to deserialize the JSON body into the target type: inputs: Field required"
        }
    return out


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, model in _models.items():
            model_schema = model.model_json_schema(ref_template=_REF)
            for def_name, definition in model_schema.pop("$defs", {}).items():
                components.setdefault(def_name, definition)
            components[name] = model_schema
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
