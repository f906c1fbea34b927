"""Request bodies parsed as TGI's axum ``Json`` extractor parses them (§1.1).

Failures here are plain text, not ``{error, error_type}``, exactly as axum answers:
415 for a missing or non-JSON content type, 400 for a JSON syntax error (also bad
UTF-8 and nesting deeper than the parser allows), 422 for a well-formed body of the
wrong shape.
"""

from __future__ import annotations

from typing import TypeVar

import pydantic
from pydantic import BaseModel
from starlette.requests import Request

from tgi_compat.errors import json_data_error, json_syntax_error, unsupported_content_type

M = TypeVar("M", bound=BaseModel)


def is_json_content_type(value: str | None) -> bool:
    if not value:
        return False
    mime = value.split(";", 1)[0].strip().lower()
    return mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))


async def parse_json_body(request: Request, model: type[M]) -> M:
    if not is_json_content_type(request.headers.get("content-type")):
        raise unsupported_content_type()
    raw = await request.body()
    try:
        return model.model_validate_json(raw)
    except pydantic.ValidationError as e:
        raise _body_error(e) from None


async def parse_json_body_union(request: Request, models: tuple[type[BaseModel], ...], name: str) -> BaseModel:
    """serde's untagged enum: the first model the body fits wins."""
    if not is_json_content_type(request.headers.get("content-type")):
        raise unsupported_content_type()
    raw = await request.body()
    first: pydantic.ValidationError | None = None
    for model in models:
        try:
            return model.model_validate_json(raw)
        except pydantic.ValidationError as e:
            if any(err["type"] == "json_invalid" for err in e.errors(include_url=False, include_input=False)):
                raise _body_error(e) from None
            first = first or e
    raise json_data_error(f"data did not match any variant of untagged enum {name}") from None


def _body_error(e: pydantic.ValidationError):
    errors = e.errors(include_url=False, include_input=False)
    for err in errors:
        if err["type"] == "json_invalid":
            return json_syntax_error(err["msg"].removeprefix("Invalid JSON: "))
    parts = []
    for err in errors[:3]:
        loc = ".".join(str(x) for x in err["loc"])
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return json_data_error("; ".join(parts))
