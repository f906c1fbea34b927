"""The real server process (``tgi_compat.server.run``: uvicorn with the connection guards,
lifespan, SIGTERM drain, metrics listener, exit codes) on a scripted engine, for the socket tier:

    python -m tests.socket.scripted_server <tgi-compat flags>

The engine is ``tests/unit/scripted_engine.py``'s ``ScriptedEngine`` (the embedded tiny
model's tokenizer, no vLLM process). Each request chooses what the engine does by a marker
in its prompt (the decoded prompt ids, so chat templates do not hide it):

- none: ``max_new_tokens`` tokens of ``" a"``, then finish reason "length";
- ``[block]``: one token, then nothing until the request is aborted;
- ``[stall]``: one token, then nothing until the next ``POST /_scripted/release``, then the rest;
- ``[drain]``: one token, then nothing until the server drains (SIGTERM), then the rest;
- ``[eos]``: three tokens, then the EOS token (finish reason "stop");
- ``[fail]``: two tokens, then the engine raises mid-stream;
- ``[pace=S]``: S seconds between engine outputs (default: ``$SCRIPTED_STEP_SECONDS``, or 0).

Pacing and waits are asyncio sleeps/events inside the server: nothing busy-loops. Test-only
routes: ``GET /_scripted/state`` (every request the engine got: its id, prompt and its length, max_tokens,
temperature, seed and structured-output constraint; every abort; every output iterator
closed before its end; the live ones), ``POST /_scripted/release`` (ends ``[stall]``s),
``POST /_scripted/die`` (the engine dies as vLLM's does: ``errored``, every live request
raises ``EngineDeadError``).
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from contextlib import aclosing

from tests.unit.scripted_engine import Script, ScriptedEngine, preload, tiny_tokenizer

PACE_ENV = "SCRIPTED_STEP_SECONDS"
_PACE = re.compile(r"\[pace=([0-9.]+)\]")


class SocketScriptedEngine(ScriptedEngine):
    """``ScriptedEngine`` with scripts chosen by prompt markers, pacing, stalls and death."""

    def __init__(self, *args, pace: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.pace = pace
        self.prompts: dict[str, str] = {}
        self.released = asyncio.Event()
        self.dead = asyncio.Event()
        self.lifecycle = None  # the app's Lifecycle, for [drain]
        self.script_for = self._by_marker

    def _by_marker(self, req) -> Script:
        prompt = self.tokenizer.decode(req.prompt_ids, skip_special_tokens=False)
        self.prompts[req.request_id] = prompt
        n = req.sampling.max_tokens
        if "[block]" in prompt:
            return Script.tokens([self.filler], block=True)
        if "[eos]" in prompt:  # three tokens then EOS (vLLM's finish reason "stop")
            return Script.tokens([self.filler] * 3 + [self.tokenizer.eos_token_id], finish="stop")
        if "[fail]" in prompt:
            return Script.tokens([self.filler] * 3, fail=RuntimeError("scripted failure"), fail_after=2)
        return Script.tokens([self.filler] * n)

    async def _hold(self, prompt: str) -> None:
        """Where a [stall] or [drain] request waits after its first output."""
        if "[stall]" in prompt:
            await self.released.wait()
        elif "[drain]" in prompt:
            while not (self.lifecycle is not None and self.lifecycle.draining) and not self.dead.is_set():
                await asyncio.sleep(0.01)

    async def _replay(self, req, script):
        from vllm.v1.engine.exceptions import EngineDeadError

        prompt = self.prompts.get(req.request_id, "")
        m = _PACE.search(prompt)
        pace = float(m.group(1)) if m else self.pace
        async with aclosing(super()._replay(req, script)) as outputs:
            k = 0
            async for out in outputs:
                if self.dead.is_set():
                    raise EngineDeadError()
                yield out
                k += 1
                if k == 1:
                    await self._hold(prompt)
                if pace:
                    await asyncio.sleep(pace)
            if self.dead.is_set():
                raise EngineDeadError()

    def die(self) -> None:
        self.errored = True
        self.dead.set()
        self.release_all()  # blocked requests wake, then raise EngineDeadError
        self.released.set()

    def state(self) -> dict:
        return {
            "requests": [{"id": r.request_id, "prompt": self.prompts.get(r.request_id, ""),
                          "prompt_tokens": len(r.prompt_ids),
                          "max_tokens": r.sampling.max_tokens, "temperature": r.sampling.temperature,
                          "seed": r.sampling.seed, "structured": r.structured} for r in self.requests],
            "aborts": list(self.aborts),
            "closed": list(self.closed),
            "live": list(self.live),
        }


def scripted_routes(engine: SocketScriptedEngine):
    from fastapi import APIRouter
    from starlette.responses import JSONResponse

    router = APIRouter(prefix="/_scripted", include_in_schema=False)

    @router.get("/state")
    async def state():
        return JSONResponse(engine.state())

    @router.post("/release")
    async def release():
        # Wakes the [stall]s waiting now (set() resolves their waits); later ones stall again.
        engine.released.set()
        engine.released.clear()
        return JSONResponse({})

    @router.post("/die")
    async def die():
        engine.die()
        return JSONResponse({})

    return router


def main(argv: list[str] | None = None) -> int:
    from tgi_compat import server
    from tgi_compat.config import ConfigError
    from tgi_compat.launcher import parse_config
    from tgi_compat.logs import setup_logging

    try:
        config, _ = parse_config(argv)
    except ConfigError as e:
        print(f"scripted_server: error: {e}", file=sys.stderr)
        return 2
    log_config = setup_logging(config.log_level, config.json_output)
    preload()
    engine = SocketScriptedEngine(tiny_tokenizer(), max_model_len=8192,
                                  pace=float(os.environ.get(PACE_ENV) or 0))
    create_app = server.create_app

    def create_scripted_app(*args, **kwargs):
        # run() builds the app; the test-only routes and the drain hook go onto it here.
        app = create_app(*args, **kwargs)
        app.include_router(scripted_routes(engine))
        engine.lifecycle = app.state.lifecycle
        return app

    server.create_app = create_scripted_app
    try:
        return server.run(config, log_config=log_config, engine=engine)
    except ConfigError as e:
        print(f"scripted_server: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
