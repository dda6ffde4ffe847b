"""The OpenAI-compatible HTTP server: FastAPI routes over one Runner (uvicorn serves them).

    POST /v1/chat/completions, /v1/completions   OpenAI bodies -> ChatCompletionRequest / CompletionRequest; the
                                                 Runner's response body back, or server-sent events of its stream's
                                                 chunks ending in [DONE] (the Runner hands both over as dicts:
                                                 each is serialised once, here)
    GET  /v1/models, /health, /metrics           the served model; liveness (503 while loading); prometheus

The Runner calls block, so they run in the thread pool; a stream's chunks are pulled there one by one. A client that
goes away aborts its request (the streamer is closed; a waiting non-stream call is aborted by id) at the next engine
step. Errors are OpenAI's JSON, {"error": {"message", "type", "param", "code"}}: 400 for a bad field (named in
"param"), 401 without the API key, 404 for an unknown route or model, 413 for a body over the limit, 503 while the
model loads, 500 only for bugs. Field mapping and what is ignored: fields.py and the README.
"""
import argparse
import asyncio
import json
import logging
import os
import threading
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException

from .. import cli
from ..runner import RequestAborted
from .fields import APIError, chat_request, completion_request, include_usage, param_of
from .metrics import Metrics

log = logging.getLogger("mistralrs")
MAX_BODY_BYTES = 4 << 20


def error(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status)


class Server:
    """The app and what it serves: `runner` is None until the model has loaded."""

    def __init__(self, model_name: str, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES):
        self.model_name, self.api_key, self.max_body_bytes = model_name, api_key, max_body_bytes
        self.runner = None
        self.load_error: str | None = None
        self.metrics = Metrics(lambda: self.runner.stats() if self.runner is not None else None)
        self.app = self._routes(FastAPI(title="mistralrs", docs_url=None, redoc_url=None, openapi_url=None))

    def _routes(self, app: FastAPI) -> FastAPI:
        app.middleware("http")(self._guard)
        app.exception_handler(HTTPException)(lambda _, e: error(e.status_code, str(e.detail), "not_found_error"
                                                                 if e.status_code == 404 else "invalid_request_error"))
        app.exception_handler(Exception)(self._bug)
        app.get("/health")(self.health)
        app.get("/metrics")(self.prometheus)
        app.get("/v1/models")(self.models)
        app.post("/v1/chat/completions")(self.chat)
        app.post("/v1/completions")(self.completions)
        return app

    async def _guard(self, request: Request, call_next):
        """API key, body size and loading checks before any route; a request count after."""
        path = request.url.path
        if self.api_key is not None and path != "/health" and (
                request.headers.get("authorization") != f"Bearer {self.api_key}"):
            return error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error",
                         code="invalid_api_key")
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.max_body_bytes:
            return error(413, f"the body has {size} bytes; the limit is {self.max_body_bytes}")
        if self.runner is None and path.startswith("/v1/"):
            if self.load_error is not None:
                return error(500, f"the model failed to load: {self.load_error}", "internal_error")
            return error(503, "the model is still loading", "service_unavailable")
        response = await call_next(request)
        self.metrics.requests.labels(path if path.startswith("/v1/") else "other", str(response.status_code)).inc()
        return response

    async def _bug(self, request: Request, e: Exception) -> JSONResponse:
        log.exception("server bug on %s", request.url.path)
        return error(500, f"internal error: {type(e).__name__}: {e}", "internal_error")

    async def health(self):
        if self.load_error is not None:
            return JSONResponse({"status": "failed", "error": self.load_error}, 500)
        if self.runner is None:
            return JSONResponse({"status": "loading"}, 503)
        return {"status": "ok"}

    async def prometheus(self):
        body, content_type = self.metrics.exposition()
        return Response(body, media_type=content_type)

    async def models(self):
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "mistralrs"}]}

    async def chat(self, request: Request):
        return await self._serve(request, chat_request, self.runner.chat_completion)

    async def completions(self, request: Request):
        return await self._serve(request, completion_request, self.runner.completion)

    async def _serve(self, request: Request, make, send):
        try:
            body = await self._body(request)
            if body.get("model") not in (self.model_name, None):
                raise APIError(404, f"model {body.get('model')!r} is not served here; GET /v1/models lists "
                                    f"{self.model_name!r}", "model", "model_not_found", "not_found_error")
            req, ignored = make(body, self.model_name)
        except APIError as e:
            return error(e.status, e.message, e.type, e.param, e.code)
        headers = {"x-mistralrs-ignored-fields": ",".join(ignored)} if ignored else {}
        start = time.perf_counter()
        try:
            result = await self._send(request, send, req)
        except (ValueError, TypeError) as e:  # what only the Runner can check: prompt length, token ids, grammar
            return error(400, str(e), param=param_of(str(e)))
        except TimeoutError as e:
            return error(408, str(e), "timeout")
        except RequestAborted as e:  # its client went away (nginx's 499: nobody reads it)
            return error(499, str(e), "aborted")
        if req.stream:
            return StreamingResponse(self._events(result, include_usage(body), start), headers=headers,
                                     media_type="text/event-stream")
        self.metrics.served(result.get("usage"), time.perf_counter() - start)
        return JSONResponse(result, headers=headers)

    async def _body(self, request: Request) -> dict:
        raw = await request.body()
        if len(raw) > self.max_body_bytes:
            raise APIError(413, f"the body has {len(raw)} bytes; the limit is {self.max_body_bytes}")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, f"the body must be a JSON object, got {type(body).__name__}")
        return body

    async def _send(self, request: Request, send, req):
        """send(req) in the thread pool; a client that disconnects before the answer aborts the request."""
        if req.stream:
            return await run_in_threadpool(send, req)
        call = asyncio.ensure_future(run_in_threadpool(send, req))
        while not call.done():
            await asyncio.wait([call], timeout=0.1)
            if not call.done() and await request.is_disconnected():
                self.runner.abort(req.request_id)
                break
        return await call

    async def _events(self, streamer, usage_chunk: bool, start: float):
        """The stream's chunks as server-sent events. Each choice's last chunk carries its usage in our Runner's
        stream; OpenAI sends usage only in one extra chunk (with stream_options.include_usage), so it is moved
        there. Leaving early (a disconnect) closes the streamer, which aborts the request."""
        prompt = completion = 0
        last = first = None
        body = {}
        try:
            async for body in iterate_in_threadpool(streamer.bodies()):
                now = time.perf_counter()
                self.metrics.token_gap(now - (last or start), first=first is None)
                first, last = first or now, now
                use = body.pop("usage", None)
                if use:
                    prompt, completion = use["prompt_tokens"], completion + use["completion_tokens"]
                yield f"data: {json.dumps(body)}\n\n"
            if usage_chunk:
                end = {**body, "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                                        "total_tokens": prompt + completion}}
                yield f"data: {json.dumps(end)}\n\n"
            self.metrics.served({"prompt_tokens": prompt, "completion_tokens": completion}, None)
        except Exception as e:  # the request failed in the engine: an error event, then the end
            yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
        finally:
            streamer.close()  # aborts the request unless it has ended
        yield "data: [DONE]\n\n"


def serve(load, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_body_bytes: int = MAX_BODY_BYTES) -> None:
    """Listen at once (503 while loading), load(), then serve until interrupted."""
    import uvicorn
    server = Server(model_name, api_key, max_body_bytes)

    def loading():
        try:
            server.runner = load()
            log.info("serving %s on http://%s:%d/v1", model_name, host, port)
        except Exception as e:  # the server stays up to say so (/health 500), rather than vanish
            log.exception("loading the model failed")
            server.load_error = f"{type(e).__name__}: {e}"
    threading.Thread(target=loading, name="mistralrs-load", daemon=True).start()
    try:
        uvicorn.run(server.app, host=host, port=port, log_level="info")
    finally:
        if server.runner is not None:
            server.runner.close()


def main(argv=None) -> None:
    """mistralrs-server / python -m mistralrs serve: the loader flags of python -m mistralrs, plus where to listen."""
    ap = argparse.ArgumentParser(prog="mistralrs-server", description="The OpenAI-compatible server. With no model "
                                 "flag it serves the built-in demo model.")
    cli.add_model_args(ap)
    ap.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", help="require 'Authorization: Bearer <key>' on every route but /health")
    ap.add_argument("--served-model-name", help="the model name clients send (default: the model id or file)")
    ap.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    name = a.served_model_name or a.gguf or a.model_id or cli.DEMO_MODEL.name
    if int(os.environ.get("RANK", "0")) > 0:  # torchrun's other ranks: no HTTP, they serve rank 0's steps
        cli.load(a)
        return
    serve(lambda: cli.load(a), name, a.host, a.port, a.api_key, a.max_body_bytes)
