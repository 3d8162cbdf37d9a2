"""Retrieval-augmented prompting (paper section 3.3) and the voting baseline.

The query image's embedding (the student's own vision encoder) finds its top-k neighbours in the published index
by cosine similarity. Their text goes into the instruction: for diagnosis the labels of the top-k cases, for VQA
and report generation the text of the top-1 case. Voting -- the majority label of the top-k cases -- is the
baseline the paper compares against.

No Ray here: :class:`Retriever` (a loaded index + search) is what the evaluation actors and the Serve retriever
deployment each hold.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from meddr_ray import prompts
from meddr_ray.config import Config, RagConfig
from meddr_ray.faiss_index import (
    IndexArtifactError,
    LoadedIndex,
    apply_search_params,
    check_vectors,
    current_version,
    load_index,
    to_gpu,
    use_gpu,
)

log = logging.getLogger("meddr_ray.rag")


class Neighbor(NamedTuple):
    """One retrieved case (a tuple: cheap to make thousands of per second on the serving path)."""

    id: str
    label: Optional[str]
    text: Optional[str]
    score: float  # cosine similarity to the query, in [-1, 1]
    dataset: Optional[str]
    modality: Optional[str]
    task: Optional[str]

    def evidence(self) -> Dict[str, object]:
        """The HTTP API's ``evidence[]`` item."""
        return {"id": self.id, "label": self.label, "text": self.text, "score": self.score, "dataset": self.dataset}

    def as_dict(self) -> Dict[str, object]:
        return self._asdict()


class _Loaded(NamedTuple):
    """One index version as searches use it: the loaded artifact, the searchable index (a GPU copy or the
    loaded one) and its value columns. Never changed after it is made; a reload makes a new one."""

    loaded: LoadedIndex
    index: object
    columns: Tuple[list, ...]  # id, label, text, dataset, modality, task: row i = FAISS id i


class Retriever:
    """A published index version in memory, searched by embeddings. Thread-safe for concurrent searches, also
    while another thread switches versions: a version's index and values live in one immutable object that a
    switch replaces in a single assignment, and a search reads that reference once, so its FAISS ids are always
    looked up in the values of the same version."""

    def __init__(
        self,
        loaded: LoadedIndex,
        nprobe: Optional[int] = None,
        ef_search: Optional[int] = None,
        device: str = "cpu",
    ):
        self._expect = {"dim": loaded.dim, "fingerprint": loaded.manifest["encoder_fingerprint"]}
        self._knobs = {"nprobe": nprobe, "ef_search": ef_search, "device": device}
        self._switching = threading.Lock()  # one version load at a time; searches never take it
        self._state = self._prepare(loaded, nprobe, ef_search, device)

    @staticmethod
    def _prepare(loaded: LoadedIndex, nprobe: Optional[int], ef_search: Optional[int], device: str) -> _Loaded:
        index = loaded.index
        apply_search_params(index, nprobe, ef_search)
        # Value columns as Python lists, in Neighbor's field order: a list lookup per field per hit is the
        # cheapest way from FAISS ids to Python objects.
        columns = tuple(
            loaded.values.column(name).to_pylist() for name in ("id", "label", "text", "dataset", "modality", "task")
        )
        log.info(
            "retriever: index %s version %s, %d vectors of dimension %d (%s)",
            loaded.path, loaded.version, loaded.count, loaded.dim, loaded.manifest.get("faiss_type"),
        )  # fmt: skip
        return _Loaded(loaded, to_gpu(index) if use_gpu(device) else index, columns)

    # ------------------------------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        index_dir: str,
        *,
        expect_dim: Optional[int] = None,
        expect_fingerprint: Optional[str] = None,
        version: Optional[str] = None,
        nprobe: Optional[int] = None,
        ef_search: Optional[int] = None,
        device: str = "cpu",
        verify: bool = True,
    ) -> "Retriever":
        """Load ``version`` (default: ``CURRENT``) of ``index_dir``; refuses an index of another encoder."""
        loaded = load_index(index_dir, expect_dim, expect_fingerprint, version, verify=verify)
        return cls(loaded, nprobe=nprobe, ef_search=ef_search, device=device)

    @classmethod
    def from_config(cls, cfg: Config, model=None, version: Optional[str] = None) -> "Retriever":
        """The run's index (``cfg.stage_dir("index")``) with the configured search knobs; with ``model`` (a
        :class:`~meddr_ray.model.VisionLanguageModel`) its dimension and encoder fingerprint are enforced."""
        return cls.open(
            cfg.stage_dir("index"),
            expect_dim=model.embed_dim if model is not None else None,
            expect_fingerprint=model.encoder_fingerprint() if model is not None else None,
            version=version,
            nprobe=cfg.index.nprobe,
            ef_search=cfg.index.ef_search,
            device=cfg.index.device,
        )

    def reload_if_changed(self) -> bool:
        """Switch to the version ``CURRENT`` names if it moved (after a rebuild or an incremental add), with the
        same encoder checks. Returns whether it switched. Searches keep using the old one until the swap."""
        latest = current_version(self.index_dir)
        return latest is not None and self.switch_to(latest)

    def switch_to(self, version: str) -> bool:
        """Load ``version`` of the same index folder (refused, with :class:`IndexArtifactError`, when it was built
        with another encoder) and make it the one searches use; False when it is already loaded."""
        with self._switching:
            if version == self.version:
                return False
            loaded = load_index(
                self.index_dir, self._expect["dim"], self._expect["fingerprint"], version=version, verify=True
            )
            self._state = self._prepare(loaded, **self._knobs)  # the one assignment a search can observe
            return True

    # ---------------------------------------------------------------------------------------- properties

    @property
    def loaded(self) -> LoadedIndex:
        return self._state.loaded

    @property
    def index(self):
        """The FAISS index searches run on (of the version loaded now)."""
        return self._state.index

    @index.setter
    def index(self, index) -> None:
        """Search another FAISS index object over the same values (a wrapper that times it, say)."""
        self._state = self._state._replace(index=index)

    @property
    def version(self) -> str:
        return self.loaded.version

    @property
    def index_dir(self) -> str:
        return self.loaded.index_dir

    @property
    def manifest(self) -> dict:
        return self.loaded.manifest

    @property
    def dim(self) -> int:
        return self.loaded.dim

    @property
    def count(self) -> int:
        return self.loaded.count

    # -------------------------------------------------------------------------------------------- search

    def search_raw(self, embeddings: np.ndarray, k: int):
        """``(scores, ids)``, each ``(n, k)``; id -1 where the index has fewer than k vectors."""
        return self._search_raw(self._state, embeddings, k)

    @staticmethod
    def _search_raw(state: _Loaded, embeddings: np.ndarray, k: int):
        x = check_vectors(np.atleast_2d(embeddings), state.loaded.dim, where="query embeddings")
        return state.index.search(x, int(k))

    def search(self, embeddings: np.ndarray, k: int) -> List[List[Neighbor]]:
        """The top-k neighbours of each query embedding, best first."""
        return self.search_versioned(embeddings, k)[1]

    def search_versioned(self, embeddings: np.ndarray, k: int) -> Tuple[str, List[List[Neighbor]]]:
        """The version searched and the top-k neighbours of each query embedding, best first."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        state = self._state  # read once: the ids below are looked up in the values of this same version
        scores, ids = self._search_raw(state, embeddings, k)
        cid, label, text, dataset, modality, task = state.columns
        return state.loaded.version, [
            [
                Neighbor(cid[i], label[i], text[i], s, dataset[i], modality[i], task[i])
                for s, i in zip(srow, irow)
                if i >= 0  # faiss pads with -1 when the index has fewer than k vectors
            ]
            for srow, irow in zip(scores.tolist(), ids.tolist())
        ]


def retrieve(index: Union[Retriever, LoadedIndex], embeddings: np.ndarray, k: int) -> List[List[Neighbor]]:
    """Top-k neighbours (with cosine scores) of each query embedding in a retriever or a loaded index."""
    if isinstance(index, LoadedIndex):
        index = Retriever(index)
    if not isinstance(index, Retriever):
        raise TypeError(f"expected a Retriever or LoadedIndex, got {type(index).__name__}")
    return index.search(embeddings, k)


# ------------------------------------------------------------------------------------------------ context


def top_k_for(task: str, rag: RagConfig) -> int:
    """How many neighbours a prompt of this task quotes (paper: 5 labels for diagnosis, 1 text otherwise)."""
    table = {"diagnosis": rag.top_k_diagnosis, "vqa": rag.top_k_vqa, "report": rag.top_k_report}
    if task not in table:
        raise ValueError(f"unknown task {task!r}: one of {list(table)}")
    return table[task]


def rag_context(task: str, neighbours: Sequence[Neighbor], rag: RagConfig) -> Union[List[str], str, None]:
    """The retrieved context for one query.

    - diagnosis: the labels of the top ``rag.top_k_diagnosis`` neighbours that have a label, nearest first
      (repeats kept: how often a label occurs is the evidence);
    - vqa / report: the text of the nearest neighbour(s) that have text (top-1 in the paper; several are joined).
    None (or []) when no neighbour has what the task needs.
    """
    k = top_k_for(task, rag)
    if task == "diagnosis":
        return [n.label for n in neighbours if n.label][:k]
    texts = [n.text.strip() for n in neighbours if n.text and n.text.strip()][:k]
    return " ".join(texts) if texts else None


def rag_prompt(
    task: str,
    neighbours: Optional[Sequence[Neighbor]],
    rag: RagConfig,
    *,
    modality: Optional[str] = None,
    options: Sequence[str] = (),
    question: Optional[str] = None,
) -> str:
    """The instruction for one query with its retrieved context (no context when ``neighbours`` is None):
    diagnosis -> :func:`prompts.diagnosis_prompt` with the retrieved labels, VQA -> :func:`prompts.vqa_prompt`
    and report -> :func:`prompts.report_prompt` with the top-1 text."""
    context = rag_context(task, neighbours, rag) if neighbours else None
    if task == "diagnosis":
        if not options:
            raise ValueError("a diagnosis prompt needs the dataset's label options")
        return prompts.diagnosis_prompt(modality or "medical", options, retrieved_labels=context or None)
    if task == "vqa":
        if not question:
            raise ValueError("a VQA prompt needs the question")
        return prompts.vqa_prompt(question, modality, context=context)
    if task == "report":
        return prompts.report_prompt(modality, context=context)
    raise ValueError(f"unknown task {task!r}: one of ['diagnosis', 'vqa', 'report']")


# ------------------------------------------------------------------------------------------------- voting


def vote(neighbours: Sequence[Neighbor]) -> Optional[str]:
    """The voting baseline: the most frequent label among ``neighbours`` (pass the top-k); a tie goes to the label
    with the larger summed similarity, then to the one whose best neighbour ranks first. None without labels."""
    counts: Dict[str, int] = defaultdict(int)
    sums: Dict[str, float] = defaultdict(float)
    first: Dict[str, int] = {}
    for rank, n in enumerate(neighbours):
        if not n.label:
            continue
        counts[n.label] += 1
        sums[n.label] += n.score
        first.setdefault(n.label, rank)
    if not counts:
        return None
    return max(counts, key=lambda label: (counts[label], sums[label], -first[label]))


__all__ = [
    "IndexArtifactError",
    "Neighbor",
    "Retriever",
    "rag_context",
    "rag_prompt",
    "retrieve",
    "top_k_for",
    "vote",
]
