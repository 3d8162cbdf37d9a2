"""The ``Generator`` deployment: the student (base + the run's LoRA adapter) answering batches of requests.

One ``@serve.batch`` call takes the requests that arrived together and:

1. runs the vision tower once over their images (:meth:`VisionLanguageModel.encode_images`): the same pass gives
   each image's retrieval key and the features generation uses -- the paper's point (section 3.3) that retrieval
   costs no extra encoder pass;
2. sends the keys of the requests with retrieval on to the ``Retriever`` in one call;
3. builds each prompt with its retrieved context (:func:`meddr_ray.retrieval.rag.rag_prompt`) and generates every answer
   in one ``generate`` per distinct decoding setting, reusing the features of step 1.

A new adapter rolls out through ``reconfigure`` (``user_config`` ``{"adapter_dir": ...}``): the new model is
loaded beside the old one, checked against the index's encoder, then swapped in with one assignment; a batch
already running finishes on the model it started with.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import ray
from ray import serve

from meddr_ray.config import Config, GenerationConfig
from meddr_ray.model import VisionLanguageModel, default_adapter, load_model
from meddr_ray.retrieval import rag
from meddr_ray.retrieval.format import IndexArtifactError
from serve_apps import metrics
from serve_apps.errors import replica_id
from serve_apps.images import model_image

log = logging.getLogger("ray.serve.meddr")  # under "ray.serve": Serve writes it to the replica logs

USER_CONFIG_KEYS = ("adapter_dir", "max_batch_size", "batch_wait_timeout_s")
MAX_FAILED_MODEL_CALLS = 3
"""Consecutive failed model calls (vision pass or generation) after which ``check_health`` fails and Serve replaces
the replica. Requests are checked before they get here, so a failing model means the replica, not the input, is
broken; a failing retriever call does not count (that is the retriever's health)."""


@dataclass(frozen=True)
class Query:
    """One request as the generator takes it: checked image bytes and the task's fields."""

    task: str
    """diagnosis | vqa | report."""
    image: bytes
    """PNG or JPEG bytes accepted by :func:`serve_apps.images.read_image`."""
    modality: Optional[str] = None
    labels: Tuple[str, ...] = ()
    """diagnosis: the possible labels."""
    question: Optional[str] = None
    """vqa: the question."""
    rag: bool = True
    """Retrieve neighbours and put their annotations into the prompt."""
    top_k: Optional[int] = None
    """Neighbours to retrieve; default the task's ``rag.top_k_*``."""
    rag_datasets: Tuple[str, ...] = ()
    """Retrieve only images of these datasets; empty: the config's ``rag.datasets`` (empty: the whole index)."""
    max_new_tokens: Optional[int] = None
    """At most the service's ``serve.generation.max_new_tokens``."""
    temperature: Optional[float] = None
    """Sampling temperature; 0 or None: greedy."""
    top_p: Optional[float] = None
    request_id: str = "-"


@dataclass(frozen=True)
class Answer:
    text: str
    tokens: int
    """Tokens generated."""
    max_new_tokens: int
    """The limit it was generated under (tokens == max_new_tokens: cut off)."""
    neighbours: List[rag.Neighbor]
    """The retrieved cases, nearest first; empty without retrieval."""
    index_version: Optional[str]
    model_revision: str
    """Which adapter answered (its folder's name, or ``base``)."""
    error: Optional[str] = None
    """Why the request could not be answered as asked (a retrieval scope the index does not hold); text empty."""


class _Student(NamedTuple):
    """A loaded model and where its adapter came from; replaced as a whole by ``reconfigure``."""

    model: VisionLanguageModel
    adapter_dir: Optional[str]
    revision: str
    fingerprint: str


def run_adapter_dir(cfg: Config) -> Optional[str]:
    """The run's trained adapter (``train.adapter_dir``, default ``<run_dir>/adapter``), or None before training."""
    return default_adapter(cfg.layout.adapter_dir)


def _load_student(cfg: Config, adapter_dir: Optional[str]) -> _Student:
    model = load_model(cfg.student, adapter_dir)
    revision = os.path.basename(os.path.normpath(adapter_dir)) if adapter_dir else "base"
    return _Student(model, adapter_dir, revision, model.encoder_fingerprint())


@serve.deployment(name="Generator")
class Generator:
    async def __init__(self, retriever, cfg: Config):
        self._retriever = retriever  # DeploymentHandle of the Retriever
        self._cfg = cfg
        self._failed_model_calls = 0  # consecutive; a replica whose model keeps failing is replaced
        self._student = await asyncio.to_thread(_load_student, cfg, run_adapter_dir(cfg))
        await self._check_index(self._student)
        self._set_batching(cfg.serve.max_batch_size, cfg.serve.batch_wait_timeout_s)
        log.info("generator: %s (%s) ready", cfg.student.name, self._student.revision)

    # ------------------------------------------------------------------------------------------- requests

    async def answer(self, query: Query) -> Answer:
        return await self._answer_batch(query)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)  # both set from the config in __init__
    async def _answer_batch(self, queries: List[Query]) -> List[Answer]:
        student = self._student  # the whole batch on one model, whatever reconfigure does meanwhile
        started = time.perf_counter()
        images = await asyncio.to_thread(lambda: [model_image(q.image) for q in queries])
        encoding = await self._model_call(student.model.encode_images, images)
        version, neighbours, retrieval_s, errors = await self._retrieve(queries, encoding.keys, student.fingerprint)
        prompts = [self._prompt(q, n) for q, n in zip(queries, neighbours)]
        gens = [self._generation(q) for q in queries]
        outputs = await self._model_call(_generate_grouped, student.model, prompts, gens, encoding)
        elapsed = time.perf_counter() - started

        m = metrics.generator()
        m.batch_size.observe(len(queries))
        m.batch_latency.observe(elapsed)
        for q, out in zip(queries, outputs):
            m.tokens.inc(out["tokens"], tags={"task": q.task})
        log.info(
            "generator: batch of %d (%s), retrieval %.1f ms, total %.0f ms",
            len(queries), " ".join(q.request_id for q in queries), 1000 * retrieval_s, 1000 * elapsed,
        )  # fmt: skip
        return [
            Answer(
                text=out["text"],
                tokens=out["tokens"],
                max_new_tokens=gen.max_new_tokens,
                neighbours=ns or [],
                index_version=version if ns is not None else None,
                model_revision=student.revision,
                error=error,
            )
            for out, gen, ns, error in zip(outputs, gens, neighbours, errors)
        ]

    async def _model_call(self, fn, *args):
        """Run a model step off the event loop (other requests keep queueing for the next batch meanwhile);
        count consecutive failures, which only a broken replica has (requests are checked before they come)."""
        try:
            result = await asyncio.to_thread(fn, *args)
        except Exception:
            self._failed_model_calls += 1
            raise
        self._failed_model_calls = 0
        return result

    def _k(self, query: Query) -> int:
        return query.top_k or rag.top_k_for(query.task, self._cfg.rag)

    def _scope(self, query: Query) -> Tuple[str, ...]:
        return tuple(sorted(set(query.rag_datasets or self._cfg.rag.datasets)))

    async def _retrieve(self, queries: Sequence[Query], keys, fingerprint: str):
        """One Retriever call per retrieval scope among the batch's queries with retrieval on (one, as a rule);
        None for the others. A scope the index does not hold fails only its own queries, with the reason."""
        neighbours: List[Optional[List[rag.Neighbor]]] = [None] * len(queries)
        errors: List[Optional[str]] = [None] * len(queries)
        scopes: Dict[Tuple[str, ...], List[int]] = {}
        for i, q in enumerate(queries):
            if q.rag:
                scopes.setdefault(self._scope(q), []).append(i)
        if not scopes:
            return None, neighbours, 0.0, errors
        started = time.perf_counter()
        version = None
        for scope, wanted in scopes.items():
            k = max(self._k(queries[i]) for i in wanted)
            try:
                version, rows = await self._retriever.search.remote(keys[wanted], k, fingerprint, list(scope) or None)
            except rag.UnknownDatasetError as exc:  # Ray re-raises the remote error as its own type too
                cause = getattr(exc, "cause", None) or exc
                for i in wanted:  # the message does not quote the request (the names asked for)
                    errors[i] = (f"field 'rag_datasets': names a dataset the index (version {cause.version}) holds "
                                 f"no images of; it holds {cause.known}")  # fmt: skip
                continue
            for i, row in zip(wanted, rows):
                neighbours[i] = row[: self._k(queries[i])]
        elapsed = time.perf_counter() - started
        metrics.generator().retrieval_latency.observe(elapsed)
        return version, neighbours, elapsed, errors

    def _prompt(self, query: Query, neighbours: Optional[List[rag.Neighbor]]) -> str:
        rag_cfg = self._cfg.rag
        if query.task == "diagnosis" and query.top_k:
            rag_cfg = dataclasses.replace(rag_cfg, top_k_diagnosis=query.top_k)
        return rag.rag_prompt(
            query.task, neighbours, rag_cfg, modality=query.modality, options=query.labels, question=query.question
        )

    def _generation(self, query: Query) -> GenerationConfig:
        gen = self._cfg.serve.generation
        changes: Dict[str, Any] = {}
        if query.max_new_tokens:
            changes["max_new_tokens"] = min(query.max_new_tokens, gen.max_new_tokens)
        if query.temperature is not None:
            changes.update(do_sample=query.temperature > 0, temperature=query.temperature or 1.0)
        if query.top_p is not None:
            changes["top_p"] = query.top_p
        return dataclasses.replace(gen, **changes) if changes else gen

    # ----------------------------------------------------------------------------------------- rollout

    async def reconfigure(self, user_config: Dict[str, Any]) -> None:
        """``adapter_dir`` (a PEFT adapter folder; null: the base model), ``max_batch_size``,
        ``batch_wait_timeout_s``. A new adapter is loaded and checked before it replaces the old one."""
        unknown = sorted(set(user_config) - set(USER_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"Generator user_config: unknown keys {unknown}; known: {list(USER_CONFIG_KEYS)}")
        self._set_batching(
            user_config.get("max_batch_size", self._cfg.serve.max_batch_size),
            user_config.get("batch_wait_timeout_s", self._cfg.serve.batch_wait_timeout_s),
        )
        if "adapter_dir" not in user_config:
            return
        adapter_dir = user_config["adapter_dir"] or None
        if adapter_dir == self._student.adapter_dir:
            return
        fresh = await asyncio.to_thread(_load_student, self._cfg, adapter_dir)
        await self._check_index(fresh)  # raises: the old model stays
        self._student = fresh  # the one assignment a batch can observe
        log.info("generator: now answering with adapter %s", fresh.revision)

    def _set_batching(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        self._answer_batch.set_max_batch_size(int(max_batch_size))
        self._answer_batch.set_batch_wait_timeout_s(float(batch_wait_timeout_s))

    async def _check_index(self, student: _Student) -> None:
        """Refuse a model whose vision encoder is not the one the index was built with: its keys would find
        unrelated cases. (Fine-tuning that leaves the vision tower frozen keeps the fingerprint.)"""
        info = await self._retriever.describe.remote()
        dim = student.model.embed_dim
        if info["encoder_fingerprint"] != student.fingerprint or info["dim"] != dim:
            raise IndexArtifactError(
                f"index version {info['version']} was built with encoder {info['encoder_fingerprint']} "
                f"(dimension {info['dim']}), but the student with adapter {student.revision!r} has encoder "
                f"{student.fingerprint} (dimension {dim}): rebuild the index with `meddr-ray index` for it"
            )

    def describe(self) -> Dict[str, Any]:
        """This replica: its Serve id and actor, and the model it answers with (operators and rollout checks ask)."""
        return {
            "replica": replica_id(),
            "actor_id": ray.get_runtime_context().get_actor_id(),
            "model": self._cfg.student.name,
            "revision": self._student.revision,
            "adapter_dir": self._student.adapter_dir,
            "encoder_fingerprint": self._student.fingerprint,
        }

    def check_health(self) -> None:
        if self._failed_model_calls >= MAX_FAILED_MODEL_CALLS:
            raise RuntimeError(f"the model failed {self._failed_model_calls} times in a row; replacing this replica")


def _generate_grouped(
    model: VisionLanguageModel, prompts: Sequence[str], gens: Sequence[GenerationConfig], encoding
) -> List[dict]:
    """``model.generate`` once per distinct decoding setting (usually one), answers back in request order."""
    groups: Dict[tuple, List[int]] = {}
    for i, gen in enumerate(gens):
        groups.setdefault(dataclasses.astuple(gen), []).append(i)
    out: List[Optional[dict]] = [None] * len(prompts)
    for rows in groups.values():
        gen = gens[rows[0]]
        answers = model.generate(None, [prompts[i] for i in rows], gen, encoding=encoding.select(rows))
        for i, answer in zip(rows, answers):
            out[i] = answer
    return out  # type: ignore[return-value]
