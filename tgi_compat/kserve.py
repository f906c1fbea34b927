"""KServe's v2 inference protocol as TGI serves it (router/src/kserve.rs, TGI's ``kserve``
cargo feature; registered here always).

- ``GET /v2``: server metadata; ``GET /v2/health/live``: ``{"live": true}``.
- ``GET /v2/health/ready`` and ``GET /v2/models/{m}/versions/{v}/ready``: ``{"live": true}``
  (TGI's field name) when the engine is healthy, as ``/health`` decides; otherwise 503 with
  ``/health``'s body (TGI answers 200 unconditionally).
- ``GET /v2/models/{m}/versions/{v}``: model metadata; any name and version (TGI checks none).
- ``POST /v2/models/{m}/versions/{v}/infer``: each input's ``data`` (UTF-8 bytes as a JSON
  array of numbers) is one generation with the request's ``parameters``, all concurrent,
  each under its own permit; each output is ``{"name", "shape": [1, n], "datatype": "BYTES",
  "data": [...]}``. Errors as TGI: bad UTF-8 -> 422 ``utf8`` (Rust's message); inputs and
  outputs of different lengths -> 422 ``length mismatch``; any generation failing -> 500
  ``Incomplete generation``. Unlike TGI (completion order), outputs keep the inputs' order.
"""

from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

import tgi_compat
from tgi_compat.body import parse_json_body
from tgi_compat.errors import RequestIncompleteError, RouteError, TGIError, UnhealthyError
from tgi_compat.openapi import json_body, responses
from tgi_compat.tgi.infer import CLIENT_GONE, RequestContext, all_or_nothing, until_disconnect
from tgi_compat.tgi.protocol import U64, ErrorResponse, GenerateParameters, GenerateRequest, _default_parameters, _Strict

U8 = Annotated[int, Field(ge=0, le=255)]


class Input(_Strict):
    name: str = Field(examples=["input-0"])
    shape: list[U64] = Field(examples=[[1, 22]])
    datatype: str = Field(examples=["BYTES"])
    data: list[U8] = Field(description="The prompt's UTF-8 bytes.", examples=[list(b"What is Deep Learning?")])


class Output(_Strict):
    name: str = Field(examples=["output-0"])


class InferenceRequest(_Strict):
    id: str = Field(examples=["request-1"])
    parameters: GenerateParameters = Field(
        default_factory=_default_parameters, description="TGI's generate parameters, for every input.")
    inputs: list[Input]
    outputs: list[Output] = Field(description="One per input, in the same order.")


class OutputChunk(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[int] = Field(description="The generated text's UTF-8 bytes.")


class InferenceOutput(BaseModel):
    id: str
    outputs: list[OutputChunk]


class LiveResponse(BaseModel):
    live: bool


class ReadyResponse(BaseModel):
    live: bool = Field(description="TGI's field name (KServe's protocol says `ready`).")


class MetadataServerResponse(BaseModel):
    name: str
    version: str
    extensions: list[str]


def utf8_error(data: bytes) -> str | None:
    """Rust's ``Utf8Error`` text for invalid UTF-8 (TGI's ``error``), None when valid."""
    try:
        data.decode("utf-8")
        return None
    except UnicodeDecodeError as e:
        if e.reason == "unexpected end of data":
            return f"incomplete utf-8 byte sequence from index {e.start}"
        return f"invalid utf-8 sequence of {e.end - e.start} bytes from index {e.start}"


def _json(body) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


async def _ready(request: Request) -> Response:
    state = request.app.state
    problem = await state.lifecycle.health_problem(state.engine)
    if problem is None:
        return _json({"live": True})
    return UnhealthyError().response(headers={"x-health-problem": problem})


_READY_RESPONSES = {
    200: {"description": "The engine is ready", "model": ReadyResponse},
    503: {"description": "Not ready (as /health: engine down, stalled or draining)", "model": ErrorResponse,
          "content": {"application/json": {"example": UnhealthyError().body()}}},
}


async def infer(request: Request, model_name: str, model_version: str) -> Response:
    req = await parse_json_body(request, InferenceRequest)
    r = RequestContext(request, "/v2/models/{model_name}/versions/{model_version}/infer")
    prompts = []
    for i in req.inputs:
        data = bytes(i.data)
        if (problem := utf8_error(data)) is not None:
            return RouteError(problem, "utf8").response(headers=r.headers)
        prompts.append(data.decode("utf-8"))
    if len(prompts) != len(req.outputs):
        return RouteError("Inputs and outputs length mismatch", "length mismatch").response(headers=r.headers)
    gen_reqs = [GenerateRequest(inputs=p, parameters=req.parameters) for p in prompts]
    contexts = [r] + [RequestContext(request, r.route, request_id=r.id) for _ in gen_reqs[1:]]
    core = request.app.state.infer
    try:
        result = await until_disconnect(request, all_or_nothing([core.run(g, c) for g, c in zip(gen_reqs, contexts)]))
    except TGIError:  # already counted and logged as what it was
        return RequestIncompleteError().response(headers=r.headers)
    if result is CLIENT_GONE:
        return Response(status_code=499)
    outputs = []
    for (gen, _t), gen_req, output in zip(result, gen_reqs, req.outputs):
        text = gen.generated_text()
        if gen_req.parameters.return_full_text:
            text = gen_req.inputs + text
        data = list(text.encode("utf-8"))
        outputs.append({"name": output.name, "shape": [1, len(data)], "datatype": "BYTES", "data": data})
    # TGI sends no timing headers here (an empty HeaderMap).
    return Response(orjson.dumps({"id": req.id, "outputs": outputs}), media_type="application/json", headers=r.headers)


def build_router(auth) -> APIRouter:
    router = APIRouter(tags=["Text Generation Inference"])
    models = "/v2/models/{model_name}/versions/{model_version}"

    @router.get("/v2", summary="KServe server metadata", responses={200: {"model": MetadataServerResponse}})
    async def server_metadata() -> Response:
        return _json({"name": "text-generation-inference", "version": tgi_compat.TGI_VERSION,
                      "extensions": ["health", "models", "metrics"]})

    @router.get("/v2/health/live", summary="KServe liveness", responses={200: {"model": LiveResponse}})
    async def live() -> Response:
        return _json({"live": True})

    router.add_api_route("/v2/health/ready", _ready, methods=["GET"], summary="KServe readiness",
                         responses=_READY_RESPONSES)

    @router.get(models, summary="KServe model metadata (any model name and version, as TGI)",
                responses={200: {"model": MetadataServerResponse}})
    async def model_metadata(model_name: str, model_version: str) -> Response:
        return _json({"name": model_name, "version": model_version, "extensions": ["infer", "ready"]})

    router.add_api_route(models + "/ready", _ready, methods=["GET"], summary="KServe model readiness",
                         responses=_READY_RESPONSES)
    router.add_api_route(
        models + "/infer",
        infer,
        methods=["POST"],
        summary="KServe inference: one generation per input",
        description="Inputs are UTF-8 bytes; each output carries the generated text's bytes. Behind `--api-key` "
        "(TGI leaves it open, but registers it only in its `kserve` build).",
        dependencies=[Depends(auth)],
        responses=responses(
            {200: ("The generated text of each input", InferenceOutput)},
            {422: {"error": "invalid utf-8 sequence of 1 bytes from index 0", "error_type": "utf8"},
             500: {"error": "Incomplete generation", "error_type": "Incomplete generation"}},
        ),
        openapi_extra=json_body(InferenceRequest),
    )
    return router
