"""The HTTP routes (``../shared/DESIGN.md``, HTTP API) and the gate every request passes first.

The gate is plain ASGI middleware, in front of FastAPI's routing, so its answers come before any parsing: 401
without the bearer token (every path but ``/healthz``), 413 for a body over ``serve.max_body_bytes``. It also
counts every request by endpoint and status, times it, and logs one line per request: method, endpoint, status,
body size, latency -- never the body.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from typing import TYPE_CHECKING

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse, StreamingResponse

from serve_apps import errors, metrics, openai_api, schemas
from serve_apps.errors import error_body

if TYPE_CHECKING:
    from serve_apps.ingress import Ingress

log = logging.getLogger("ray.serve.meddr")  # under "ray.serve": Serve writes it to the replica logs

OPEN_PATHS = frozenset({"/healthz"})
ENDPOINTS = frozenset(  # metric tags: these paths, everything else is "other" (a tag per URL would grow forever)
    {"/healthz", "/v1/models", "/v1/diagnose", "/v1/vqa", "/v1/report", "/v1/chat/completions"}
    | {"/docs", "/openapi.json"}
)


def build_api(ingress: "Ingress") -> FastAPI:
    app = FastAPI(
        title="MedDr",
        description="Retrieval-augmented medical diagnosis, VQA and report generation (He et al., 2024).",
        version="1",
    )
    errors.install(app)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models", response_model=schemas.ModelList)
    async def models() -> schemas.ModelList:
        return schemas.ModelList(data=[schemas.ModelCard(id=ingress.model_id, created=ingress.created)])

    @app.post("/v1/diagnose", response_model=schemas.DiagnoseResponse)
    async def diagnose(body: schemas.DiagnoseRequest, response: Response):
        result, answer = await ingress.diagnose(body)
        _provenance(response, answer)
        return result

    @app.post("/v1/vqa", response_model=schemas.VQAResponse)
    async def vqa(body: schemas.VQARequest, response: Response):
        result, answer = await ingress.vqa(body)
        _provenance(response, answer)
        return result

    @app.post("/v1/report", response_model=schemas.ReportResponse)
    async def report(body: schemas.ReportRequest, response: Response):
        result, answer = await ingress.report(body)
        _provenance(response, answer)
        return result

    @app.post("/v1/chat/completions")
    async def chat_completions(body: openai_api.ChatRequest):
        answer = await ingress.chat(body)
        if body.stream:
            response = StreamingResponse(
                openai_api.stream_chunks(answer, ingress.model_id), media_type="text/event-stream"
            )
        else:
            response = JSONResponse(openai_api.completion(answer, ingress.model_id))
        _provenance(response, answer)
        return response

    s = ingress.cfg.serve
    app.add_middleware(
        Gate, auth_sha256=ingress.auth_sha256, max_body_bytes=s.max_body_bytes, route_prefix=s.route_prefix
    )
    return app


def _provenance(response: Response, answer) -> None:
    """Which index version and adapter answered (hot-swap checks read these; not part of the JSON contract)."""
    response.headers["x-meddr-model-revision"] = answer.model_revision
    if answer.index_version:
        response.headers["x-meddr-index-version"] = answer.index_version


class Gate:
    """ASGI middleware: auth, body limit, metrics and the per-request log line."""

    def __init__(self, app, *, auth_sha256: str, max_body_bytes: int, route_prefix: str = "/"):
        self.app = app
        self.auth_sha256 = auth_sha256
        self.max_body_bytes = max_body_bytes
        self.route_prefix = route_prefix.rstrip("/")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # lifespan
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        path = self._path(scope)
        endpoint = path if path in ENDPOINTS else "other"
        status, size = [500], [0]

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if path not in OPEN_PATHS and not self._authorized(scope):
                await _reply(send_counted, 401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                             {"www-authenticate": "Bearer"})  # fmt: skip
                return
            body = await self._read_body(scope, receive)
            if body is None:
                await _reply(send_counted, 413, f"the request body is larger than {self.max_body_bytes:,} bytes")
                return
            size[0] = len(body)
            await self.app(scope, _replay(body, receive), send_counted)
        finally:
            elapsed = time.perf_counter() - started
            m = metrics.ingress()
            m.requests.inc(tags={"endpoint": endpoint, "status": str(status[0])})
            m.latency.observe(elapsed, tags={"endpoint": endpoint})
            # Serve prefixes the line with the replica and the request id
            log.info("%s %s -> %d, %d body bytes, %.0f ms", scope.get("method"), endpoint, status[0], size[0],
                     1000 * elapsed)  # fmt: skip

    def _path(self, scope) -> str:
        path = scope.get("path", "")
        root = scope.get("root_path", "") or self.route_prefix
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        return path

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() != "bearer" or not token.strip():
                    return False
                digest = hashlib.sha256(token.strip().encode()).hexdigest()
                return hmac.compare_digest(digest, self.auth_sha256)
        return False

    async def _read_body(self, scope, receive):
        """The whole body, or None as soon as it is over the limit (by Content-Length, or while reading)."""
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                return None
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return b"".join(chunks)
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive):
    sent = [False]

    async def replayed():
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # then whatever comes next (a disconnect)

    return replayed


async def _reply(send, status: int, message: str, headers=None) -> None:
    payload = json.dumps(error_body(status, message)).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw_headers += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})
