"""TGI's ``POST /vertex`` (router/src/vertex.rs), also mounted at ``AIP_PREDICT_ROUTE``.

``{"instances": [...]}``: each instance is ``{"inputs", "parameters"}`` (tried first, as
serde's untagged enum does) or a chat request. Every instance is one generation through
the shared core (``Infer.run``: its own permit, validation, engine request, metrics and
log line), all run concurrently; the answer is ``{"predictions": [text, ...]}`` in
instance order. As TGI: no instances -> 422 ``Input validation error``; any instance that
fails -> 500 ``Incomplete generation`` (after all of them ended, TGI's ``join_all``).

Unlike TGI, which keeps only ``max_new_tokens`` and ``seed`` of an instance's
``parameters``, every TGI generate parameter is honoured (Google's own notebooks send
``temperature`` / ``top_p``); ``do_sample`` stays on unless the instance sets it, as TGI
always samples here.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import orjson
import pydantic
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from starlette.responses import Response
from starlette.routing import Match

from tgi_compat.body import parse_json_body
from tgi_compat.errors import RequestIncompleteError, RouteError, TGIError, json_data_error
from tgi_compat.openai.protocol import ChatRequest
from tgi_compat.openapi import json_body, responses
from tgi_compat.tgi.infer import CLIENT_GONE, RequestContext, until_disconnect
from tgi_compat.tgi.protocol import GenerateParameters, GenerateRequest, _default_parameters, _Strict


class VertexGenerateInstance(_Strict):
    inputs: str = Field(examples=["What is Deep Learning?"])
    parameters: GenerateParameters | None = Field(
        None, description="TGI's generate parameters, all honoured (TGI reads only `max_new_tokens` and `seed`); "
        "`do_sample` is true unless given.")


class VertexRequest(_Strict):
    """For the OpenAPI document; bodies are parsed instance by instance (``parse_instances``)."""

    instances: list[VertexGenerateInstance | ChatRequest] = Field(
        description="Each `{inputs, parameters}` (tried first) or a chat request.")


class VertexResponse(BaseModel):
    predictions: list[str] = Field(description="The generated text of each instance, in order.")


class _VertexBody(_Strict):
    instances: list[Any]


logger = logging.getLogger("tgi_compat")

_NO_INSTANCES = ("Input validation error", "Input validation error")


def parse_instances(body: _VertexBody) -> list[VertexGenerateInstance | ChatRequest]:
    """serde's untagged ``VertexInstance``: the generate shape first, then a chat request."""
    out: list[VertexGenerateInstance | ChatRequest] = []
    for i, instance in enumerate(body.instances):
        raw = json.dumps(instance)  # the stdlib's: any integer (orjson stops at 64 bits; pydantic bounds them)
        for model in (VertexGenerateInstance, ChatRequest):
            try:
                out.append(model.model_validate_json(raw))
                break
            except pydantic.ValidationError:
                continue
        else:
            raise json_data_error(f"instances[{i}]: data did not match any variant of untagged enum VertexInstance")
    return out


def instance_parameters(given: GenerateParameters | None) -> GenerateParameters:
    """The parameters an instance runs with: all of TGI's, sampling unless it says otherwise."""
    if given is None:
        return _default_parameters()
    if "do_sample" in given.model_fields_set:
        return given
    return given.model_copy(update={"do_sample": True})


class VertexServing:
    """One ``/vertex`` request over the shared core and the chat mapping of the OpenAI routes."""

    def __init__(self, infer, openai):
        self.infer = infer
        self.openai = openai

    async def predict(self, instances: list, request: Request, route: str) -> Response:
        r = RequestContext(request, route)
        if not instances:
            return self.infer.refuse(r, RouteError(*_NO_INSTANCES))
        runs: list[tuple[GenerateRequest, bool]] = []  # (request, add_special_tokens)
        for instance in instances:
            if isinstance(instance, VertexGenerateInstance):
                params = instance_parameters(instance.parameters)
                runs.append((GenerateRequest(inputs=instance.inputs, parameters=params), True))
                continue
            try:  # TGI's ChatRequest::try_into_generate: a template error ends the request here
                gen_req, _using_tools = self.openai.chat_request(instance)
            except TGIError as e:
                return self.infer.refuse(r, e)
            runs.append((gen_req, False))
        contexts = [r] + [RequestContext(request, route, request_id=r.id) for _ in runs[1:]]
        try:
            result = await until_disconnect(request, self._run_all(runs, contexts))
        except TGIError as e:
            return e.response(headers=r.headers)
        if result is CLIENT_GONE:
            return Response(status_code=499)
        # TGI sends no timing headers here (an empty HeaderMap).
        return Response(orjson.dumps({"predictions": result}), media_type="application/json", headers=r.headers)

    async def _run_all(self, runs: list[tuple[GenerateRequest, bool]], contexts: list[RequestContext]) -> list[str]:
        results = await asyncio.gather(
            *(self.infer.run(g, c, add_special_tokens=special) for (g, special), c in zip(runs, contexts)),
            return_exceptions=True,
        )
        predictions = []
        for (gen_req, _), result in zip(runs, results):
            if isinstance(result, TGIError):  # already counted and logged as what it was
                raise RequestIncompleteError()
            if isinstance(result, BaseException):
                raise result
            gen, _t = result
            text = gen.generated_text()
            predictions.append(gen_req.inputs + text if gen_req.parameters.return_full_text else text)
        return predictions


_RESPONSES = responses(
    {200: ("The generated text of each instance, in instance order", VertexResponse)},
    {422: {"error": "Input validation error", "error_type": "Input validation error"},
     500: {"error": "Incomplete generation", "error_type": "Incomplete generation"}},
)
_DESCRIPTION = (
    "Google Vertex AI's prediction shape. Each instance is one generation under its own permit; all run "
    "concurrently. No instances: 422 `Input validation error`; a chat instance whose template fails: 422 "
    "`template_error`; any instance failing (validation, overload, generation): 500 `Incomplete generation` "
    "(as TGI). Also served at `AIP_PREDICT_ROUTE` when set (without `--api-key`, as TGI)."
)


def predict_endpoint(route: str):
    """The handler of ``route`` (``/vertex``, or Vertex AI's ``AIP_PREDICT_ROUTE``)."""

    async def vertex(request: Request) -> Response:
        body = await parse_json_body(request, _VertexBody)
        instances = parse_instances(body)
        return await request.app.state.vertex.predict(instances, request, route)

    return vertex


def build_router(auth) -> APIRouter:
    router = APIRouter(tags=["Text Generation Inference"])
    router.add_api_route(
        "/vertex",
        predict_endpoint("/vertex"),
        methods=["POST"],
        summary="Generate tokens from Vertex request",
        description=_DESCRIPTION,
        dependencies=[Depends(auth)],
        responses=_RESPONSES,
        openapi_extra=json_body(VertexRequest),
    )
    return router


def mount_aip_routes(app, config) -> None:
    """Vertex AI's ``AIP_PREDICT_ROUTE`` (POST, as ``/vertex``) and ``AIP_HEALTH_ROUTE`` (GET,
    as ``/health``), without ``--api-key`` as in TGI's ``google`` build. A route that an
    existing one already answers keeps the existing one, and a start-up line says so (TGI's
    router panics on such a conflict)."""
    health = next(route.endpoint for route in app.routes if getattr(route, "path", None) == "/health")
    wanted = (("POST", config.aip_predict_route, predict_endpoint(config.aip_predict_route or "")),
              ("GET", config.aip_health_route, health))
    for method, path, endpoint in wanted:
        if path is None:
            continue
        scope = {"type": "http", "method": method, "path": path, "root_path": ""}
        taken = next((route for route in app.routes if route.matches(scope)[0] == Match.FULL), None)
        if taken is not None:
            logger.warning("Vertex AI: %s %s is already a route (%s); it keeps its own handler",
                           method, path, getattr(taken, "path", path))
            continue
        app.add_api_route(path, endpoint, methods=[method], include_in_schema=False)
        logger.info("Vertex AI: %s %s serves %s", method, path, "/vertex" if method == "POST" else "/health")
