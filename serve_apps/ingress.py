"""The ``Ingress`` deployment: the HTTP front. It checks every request (auth, body size, schema, the image) before
anything reaches the model, turns it into a :class:`~serve_apps.generator.Query`, and shapes the answer.

Auth: a bearer token. Its SHA-256 comes from where the application was built (:mod:`serve_apps.meddr` reads the
variable named by ``serve.auth_token_env`` there), or else from the same variable on the replica's node; the
token itself never travels with the deployment. With neither, the replica refuses to start: a service that
answers anyone is never the fallback.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from typing import Optional, Tuple

import ray
import ray.exceptions
from ray import serve
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    RequestCancelledError,
)

from meddr_ray.retrieval import rag
from meddr_ray.config import Config
from meddr_ray.metrics import map_to_label
from serve_apps import api, openai_api, schemas
from serve_apps.errors import ApiError, replica_id, request_id
from serve_apps.generator import Answer, Query
from serve_apps.images import IntakeImage, read_image

log = logging.getLogger("ray.serve.meddr")  # under "ray.serve": Serve writes it to the replica logs

# A replica that went away mid-request, or no capacity now: the client may retry (503), not a bug (500).
_RETRYABLE = (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    RequestCancelledError,
    ray.exceptions.ActorDiedError,
    ray.exceptions.ActorUnavailableError,
)


class AuthNotConfigured(RuntimeError):
    """The token's environment variable is set neither where the app was built nor on the replica's node."""


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    def __init__(self, generator, cfg: Config, auth_sha256: Optional[str] = None):
        self._generator = generator  # DeploymentHandle of the Generator
        self.cfg = cfg
        self.auth_sha256 = auth_sha256 or self._token_from_node(cfg.serve.auth_token_env)
        self.model_id = cfg.serve.model_name
        self.created = int(time.time())

    @staticmethod
    def _token_from_node(variable: str) -> str:
        token = os.environ.get(variable, "").strip()
        if not token:
            raise AuthNotConfigured(
                f"no API token: set the environment variable {variable} (serve.auth_token_env) where the "
                f"application is built or on every node, e.g. export {variable}=$(python -c "
                f"'import secrets; print(secrets.token_urlsafe(32))')"
            )
        return token_sha256(token)

    def __serve_build_asgi_app__(self):
        return api.build_api(self)

    def describe(self) -> dict:
        """This replica's Serve id and actor, and the model id it serves (through ``serve.get_app_handle``)."""
        return {"replica": replica_id(), "actor_id": ray.get_runtime_context().get_actor_id(), "model": self.model_id}

    # ------------------------------------------------------------------------------------------ steps

    async def intake(self, value: str, field: str = "image") -> IntakeImage:
        """The request's image, checked and normalised off the event loop (decoding a large image takes time)."""
        s = self.cfg.serve
        image = await asyncio.to_thread(
            read_image, value, field=field, max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels
        )
        log.info("image %d bytes, %dx%d", image.received_bytes, image.width, image.height)
        return image

    async def ask(self, query: Query) -> Answer:
        try:
            answer = await self._generator.answer.remote(query)
        except Exception as exc:  # noqa: BLE001 - log the type only: a message may quote what it was given
            cause = getattr(exc, "cause", None) or exc  # a RayTaskError carries the remote exception as its cause
            if isinstance(exc, _RETRYABLE) or isinstance(cause, _RETRYABLE):
                log.warning("request %s: a replica is unavailable (%s)", query.request_id, type(cause).__name__)
                raise ApiError(503, "the model is busy or restarting; retry shortly", code="unavailable",
                               headers={"retry-after": "1"}) from None  # fmt: skip
            log.error("request %s: generator failed: %s", query.request_id, type(cause).__name__)
            raise ApiError(500, f"the model failed on this request (request {query.request_id})") from None
        if answer.error:  # the request asked for something the service cannot give (a dataset not indexed)
            raise ApiError(400, answer.error, param="rag_datasets", code="invalid_value")
        return answer

    def use_rag(self, asked: Optional[bool]) -> bool:
        return self.cfg.serve.rag if asked is None else asked

    # ----------------------------------------------------------------------------------------- tasks

    async def task_query(self, task: str, req, **fields) -> Query:
        """The query of a task endpoint: its image read and checked, the request's modality (else the one the image
        names, e.g. a DICOM Modality tag), retrieval on or off as asked."""
        image = await self.intake(req.image)
        return Query(
            task,
            image.data,
            modality=req.modality or image.modality,
            rag=self.use_rag(req.rag),
            rag_datasets=tuple(req.rag_datasets or ()),
            request_id=request_id() or "-",
            **fields,
        )

    async def diagnose(self, req: schemas.DiagnoseRequest) -> Tuple[schemas.DiagnoseResponse, Answer]:
        query = await self.task_query("diagnosis", req, labels=tuple(req.labels), top_k=req.top_k)
        answer = await self.ask(query)
        diagnosis = req.labels[map_to_label(answer.text, req.labels)]  # MultiMedEval's BLEU-1 mapping
        vote = rag.vote(answer.neighbours) if query.rag else None
        body = schemas.DiagnoseResponse(
            diagnosis=diagnosis, text=answer.text, vote=vote, evidence=_evidence(answer)
        )
        return body, answer

    async def vqa(self, req: schemas.VQARequest) -> Tuple[schemas.VQAResponse, Answer]:
        answer = await self.ask(await self.task_query("vqa", req, question=req.question))
        return schemas.VQAResponse(answer=answer.text, evidence=_evidence(answer)), answer

    async def report(self, req: schemas.ReportRequest) -> Tuple[schemas.ReportResponse, Answer]:
        answer = await self.ask(await self.task_query("report", req))
        return schemas.ReportResponse(report=answer.text, evidence=_evidence(answer)), answer

    async def chat(self, req: openai_api.ChatRequest) -> Answer:
        """The OpenAI-style conversation as a VQA query (see :mod:`serve_apps.openai_api`)."""
        if req.model != self.model_id:
            raise ApiError(
                404,
                f"field 'model': no such model here; this server serves {self.model_id!r} (GET /v1/models)",
                param="model",
                code="model_not_found",
            )
        if req.stream:
            openai_api.check_streaming_options(req)
        turn = openai_api.read_turn(req)
        limit = openai_api.max_new_tokens(req, self.cfg.serve.generation.max_new_tokens)
        image = await self.intake(turn.image_url, field=turn.image_field)
        query = Query(
            "vqa",
            image.data,
            modality=image.modality,
            question=turn.question,
            rag=self.use_rag(req.rag),
            max_new_tokens=limit,
            temperature=req.temperature,
            top_p=req.top_p,
            request_id=request_id() or "-",
        )
        return await self.ask(query)


def _evidence(answer: Answer):
    return [schemas.Evidence(**n.evidence()) for n in answer.neighbours]
