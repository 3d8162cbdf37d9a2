"""Retrieval-augmented prompting (paper section 3.3) and the voting baseline.

The query image's embedding (the student's own vision encoder) finds its top-k most similar images in the
published index by cosine similarity; each indexed case is one image with all of its annotations. Their
annotations go into the instruction: for diagnosis the labels of the top-k images (the paper: the top five), for
VQA the most similar image's question-answer pairs, for report generation its report (the paper retrieves "the
most similar images along with their corresponding annotations" and gives no number: one, ``rag.top_k_vqa`` /
``rag.top_k_report``, is this project's reading). Voting -- the majority label of the top-k images, or for
reports the top-1 retrieved report (section 4.5) -- is the baseline the paper compares against. Retrieval can be
limited to some datasets: section 4.5 builds the database "based on the corresponding training set", read here
as each evaluated dataset's own (``rag.same_dataset``).

No Ray here: :class:`Retriever` (a loaded index + search) is what the evaluation actors and the Serve retriever
deployment each hold.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import defaultdict
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from meddr_ray import prompts
from meddr_ray.config import Config, RagConfig
from meddr_ray.retrieval.faiss_io import apply_search_params, check_vectors, scoped_search, to_gpu, use_gpu
from meddr_ray.retrieval.format import case_key
from meddr_ray.retrieval.store import LoadedIndex, current_version, load_index

log = logging.getLogger("meddr_ray.retrieval.rag")


class Neighbor(NamedTuple):
    """One retrieved case: an image and its annotations (a tuple: cheap to make thousands of per second on the
    serving path)."""

    id: str
    label: Optional[str]  # its diagnosis label(s), if any
    report: Optional[str]  # its report, if any
    qa: Tuple[Tuple[str, str], ...]  # its (question, answer) pairs
    score: float  # cosine similarity to the query, in [-1, 1]
    dataset: Optional[str]
    modality: Optional[str]

    def evidence(self) -> Dict[str, object]:
        """The HTTP API's ``evidence[]`` item."""
        return {
            "id": self.id, "score": self.score, "dataset": self.dataset, "label": self.label, "report": self.report,
            "qa": [{"question": q, "answer": a} for q, a in self.qa],
        }  # fmt: skip

    def as_dict(self) -> Dict[str, object]:
        return self._asdict()


class UnknownDatasetError(ValueError):
    """A retrieval scope names a dataset the index version holds no images of."""

    def __init__(self, unknown: Sequence[str], known: Sequence[str], version: str):
        super().__init__(f"no images of dataset(s) {list(unknown)} in index version {version}; it holds {list(known)}")
        self.unknown, self.known, self.version = list(unknown), list(known), version

    def __reduce__(self):  # travels between Ray processes with its fields
        return (UnknownDatasetError, (self.unknown, self.known, self.version))


class _Loaded(NamedTuple):
    """One index version as searches use it: the loaded artifact, the searchable index (a GPU copy or the
    loaded one), its value columns and the FAISS ids of each dataset. Never changed after it is made (apart from
    its cache of selectors); a reload makes a new one."""

    loaded: LoadedIndex
    index: object
    columns: Tuple[list, ...]  # id, label, report, qa, dataset, modality: row i = FAISS id i
    dataset_ids: Dict[str, np.ndarray]  # dataset -> its FAISS ids
    selectors: Dict[Tuple[str, ...], object]  # datasets -> faiss.IDSelector (made on first use)


def _qa_pairs(items) -> Tuple[Tuple[str, str], ...]:
    return tuple((x["question"], x["answer"]) for x in items or ())


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
        values = loaded.values
        columns = tuple(values.column(name).to_pylist() for name in ("id", "label", "report", "dataset", "modality"))
        qa = [_qa_pairs(x) for x in values.column("qa").to_pylist()]
        columns = columns[:3] + (qa,) + columns[3:]
        codes = values.column("dataset").combine_chunks().dictionary_encode()
        positions = codes.indices.to_numpy(zero_copy_only=False)
        dataset_ids = {
            name: np.flatnonzero(positions == c).astype(np.int64)
            for c, name in enumerate(codes.dictionary.to_pylist())
            if name is not None
        }
        log.info(
            "retriever: index %s version %s, %d vectors of dimension %d (%s)",
            loaded.path, loaded.version, loaded.count, loaded.dim, loaded.manifest.get("faiss_type"),
        )  # fmt: skip
        return _Loaded(loaded, to_gpu(index) if use_gpu(device) else index, columns, dataset_ids, {})

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
        """The run's index (``cfg.layout.index_dir``) with the configured search knobs; with ``model`` (a
        :class:`~meddr_ray.model.VisionLanguageModel`) its dimension and encoder fingerprint are enforced."""
        return cls.open(
            cfg.layout.index_dir,
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

    @property
    def datasets(self) -> Dict[str, int]:
        """The datasets of the loaded version and how many cases (images) each has."""
        return {name: len(ids) for name, ids in self._state.dataset_ids.items()}

    def search_raw(self, embeddings: np.ndarray, k: int, datasets: Optional[Sequence[str]] = None):
        """``(scores, ids)``, each ``(n, k)``; id -1 where fewer than k vectors qualify."""
        return self._search_raw(self._state, embeddings, k, datasets)

    @staticmethod
    def _selector(state: _Loaded, datasets: Sequence[str]):
        import faiss

        scope = tuple(sorted(set(datasets)))
        sel = state.selectors.get(scope)
        if sel is None:
            unknown = [d for d in scope if d not in state.dataset_ids]
            if unknown:
                raise UnknownDatasetError(unknown, sorted(state.dataset_ids), state.loaded.version)
            ids = np.concatenate([state.dataset_ids[d] for d in scope])
            sel = state.selectors[scope] = faiss.IDSelectorBatch(ids)  # kept alive with the version
        return sel

    @classmethod
    def _search_raw(cls, state: _Loaded, embeddings: np.ndarray, k: int, datasets: Optional[Sequence[str]] = None):
        x = check_vectors(np.atleast_2d(embeddings), state.loaded.dim, where="query embeddings")
        if not datasets or set(datasets) >= set(state.dataset_ids):
            return state.index.search(x, int(k))
        # scoped: filtered inside FAISS on the CPU index (a GPU copy takes no selector)
        return scoped_search(state.loaded.index, x, k, cls._selector(state, datasets))

    def search(self, embeddings: np.ndarray, k: int, datasets: Optional[Sequence[str]] = None) -> List[List[Neighbor]]:
        """The top-k most similar images of each query embedding, best first; ``datasets`` limits the search to
        the cases of those datasets (ValueError naming the index's datasets when one is not there)."""
        return self.search_versioned(embeddings, k, datasets)[1]

    def search_versioned(
        self, embeddings: np.ndarray, k: int, datasets: Optional[Sequence[str]] = None
    ) -> Tuple[str, List[List[Neighbor]]]:
        """The version searched and the top-k neighbours of each query embedding, best first."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        state = self._state  # read once: the ids below are looked up in the values of this same version
        scores, ids = self._search_raw(state, embeddings, k, datasets)
        cid, label, report, qa, dataset, modality = state.columns
        return state.loaded.version, [
            [
                Neighbor(cid[i], label[i], report[i], qa[i], s, dataset[i], modality[i])
                for s, i in zip(srow, irow)
                if i >= 0  # faiss pads with -1 when fewer than k vectors qualify
            ]
            for srow, irow in zip(scores.tolist(), ids.tolist())
        ]


def retrieve(
    index: Union[Retriever, LoadedIndex], embeddings: np.ndarray, k: int, datasets: Optional[Sequence[str]] = None
) -> List[List[Neighbor]]:
    """Top-k neighbours (with cosine scores) of each query embedding in a retriever or a loaded index."""
    if isinstance(index, LoadedIndex):
        index = Retriever(index)
    if not isinstance(index, Retriever):
        raise TypeError(f"expected a Retriever or LoadedIndex, got {type(index).__name__}")
    return index.search(embeddings, k, datasets)


# ------------------------------------------------------------------------------------------------ context


def top_k_for(task: str, rag: RagConfig) -> int:
    """How many retrieved images a prompt of this task quotes (``rag.top_k_*``; the paper: five for diagnosis)."""
    table = {"diagnosis": rag.top_k_diagnosis, "vqa": rag.top_k_vqa, "report": rag.top_k_report}
    if task not in table:
        raise ValueError(f"unknown task {task!r}: one of {list(table)}")
    return table[task]


def scope_for(rag: RagConfig, dataset: Optional[str] = None) -> Optional[List[str]]:
    """The datasets a query searches: its own (``rag.same_dataset`` and the query's dataset known), else
    ``rag.datasets``, else None (the whole index)."""
    if rag.same_dataset and dataset:
        return [dataset]
    return list(rag.datasets) or None


def distinct_images(neighbours: Sequence[Neighbor]) -> List[Neighbor]:
    """Each image once, at its best rank: the index holds one vector per image, but results merged from several
    searches (or an index extended with a copy of an image) must not count an image twice."""
    seen = set()
    out = []
    for n in neighbours:
        if n.id not in seen:
            seen.add(n.id)
            out.append(n)
    return out


# QA pairs quoted per retrieved image (this project's cap: a PathVQA image has dozens), those whose question
# shares the most words with the asked one first.
MAX_QA_PAIRS = 3


def _words(text: str) -> set:
    return {w for w in "".join(c.lower() if c.isalnum() else " " for c in text).split() if w}


def _qa_text(pairs: Sequence[Tuple[str, str]], question: Optional[str]) -> str:
    asked = _words(question or "")
    ranked = sorted(enumerate(pairs), key=lambda ip: (-len(asked & _words(ip[1][0])), ip[0]))
    return " ".join(f"Q: {q.strip()} A: {a.strip()}" for _, (q, a) in ranked[:MAX_QA_PAIRS])


def rag_context(
    task: str, neighbours: Sequence[Neighbor], rag: RagConfig, question: Optional[str] = None
) -> Union[List[str], str, None]:
    """The retrieved context for one query, from distinct images, nearest first:

    - diagnosis: the labels of the top ``rag.top_k_diagnosis`` images that have one (repeats kept: how often a
      label occurs is the evidence);
    - vqa: the question-answer pairs of the top ``rag.top_k_vqa`` images that have any (at most
      :data:`MAX_QA_PAIRS` each, those closest to ``question`` first);
    - report: the reports of the top ``rag.top_k_report`` images that have one.
    None (or []) when no retrieved image has what the task needs.
    """
    k = top_k_for(task, rag)
    images = distinct_images(neighbours)
    if task == "diagnosis":
        return [n.label for n in images if n.label][:k]
    if task == "vqa":
        texts = [_qa_text(n.qa, question) for n in images if n.qa][:k]
    else:
        texts = [n.report.strip() for n in images if n.report and n.report.strip()][:k]
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
    with the nearest image's QA pairs, report -> :func:`prompts.report_prompt` with its report."""
    context = rag_context(task, neighbours, rag, question=question) if neighbours else None
    if task == "diagnosis":
        if not options:
            raise ValueError("a diagnosis prompt needs the dataset's label options")
        return prompts.diagnosis_prompt(modality or "medical", options, retrieved_labels=context or None)
    if task == "vqa":
        if not question:
            raise ValueError("a VQA prompt needs the question")
        return prompts.vqa_prompt(question, context=context)
    if task == "report":
        return prompts.report_prompt(modality, context=context)
    raise ValueError(f"unknown task {task!r}: one of ['diagnosis', 'vqa', 'report']")


# ------------------------------------------------------------------------------------------------- voting


def vote(neighbours: Sequence[Neighbor]) -> Optional[str]:
    """The voting baseline for diagnosis: the most frequent label among the distinct images of ``neighbours``
    (pass the top-k); a tie goes to the label with the larger summed similarity, then to the one whose best image
    ranks first. None without labels."""
    counts: Dict[str, int] = defaultdict(int)
    sums: Dict[str, float] = defaultdict(float)
    first: Dict[str, int] = {}
    for rank, n in enumerate(distinct_images(neighbours)):
        if not n.label:
            continue
        counts[n.label] += 1
        sums[n.label] += n.score
        first.setdefault(n.label, rank)
    if not counts:
        return None
    return max(counts, key=lambda label: (counts[label], sums[label], -first[label]))


def vote_report(neighbours: Sequence[Neighbor]) -> Optional[str]:
    """The voting baseline for report generation (section 4.5): the top-1 retrieved report is the prediction."""
    return next((n.report.strip() for n in neighbours if n.report and n.report.strip()), None)


# ------------------------------------------------------------------------------------ training prompts


def _picked(row_id: str, fraction: float) -> bool:
    """Whether a training row gets retrieved labels: a hash of its id against ``fraction`` (the same rows on every
    machine and run, so a resumed training sees the prompts it saw before)."""
    digest = hashlib.sha1(f"rag-context\x1f{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


class TrainingContext:
    """Ray Data callable (one per actor: the index loaded once): gives a share of the diagnosis training prompts
    the labels of the top-k most similar OTHER images of the same dataset in the index (the row's own image is
    left out, so a label never gives itself away), as :func:`rag_prompt` words them at inference.

    A training image is in the index (built from the same training rows), so its key is read back from the index
    (``reconstruct``): no model is needed. Rows whose image the index does not hold keep their prompt."""

    def __init__(self, index_dir: str, version: str, rag: RagConfig, fraction: float):
        import faiss

        self.retriever = Retriever.open(index_dir, version=version)
        self.k = rag.top_k_diagnosis
        self.fraction = fraction
        index = self.retriever.loaded.index
        if isinstance(index, faiss.IndexIVF):
            index.make_direct_map()  # IVF keeps no id -> vector map unless asked
        self.index = index
        self.row_of = {cid: i for i, cid in enumerate(self.retriever.loaded.values.column("id").to_pylist())}

    def labels_for(self, keys: Sequence[str], dataset: str) -> List[Optional[List[str]]]:
        """The retrieved labels of each case key (None for a key the index does not hold)."""
        rows = [self.row_of.get(k) for k in keys]
        held = [i for i, r in enumerate(rows) if r is not None]
        out: List[Optional[List[str]]] = [None] * len(keys)
        if not held:
            return out
        vectors = np.stack([self.index.reconstruct(int(rows[i])) for i in held])
        scope = [dataset] if dataset in self.retriever.datasets else None
        found = self.retriever.search(vectors, self.k + 1, scope)
        for i, hits in zip(held, found):
            others = [n for n in hits if n.id != keys[i]]
            out[i] = [n.label for n in distinct_images(others) if n.label][: self.k]
        return out

    def __call__(self, batch):
        import pyarrow as pa

        d = batch.select(["id", "task", "dataset", "image", "source_id", "prompt"]).to_pydict()
        prompts_out = list(d["prompt"])
        by_dataset: Dict[str, List[int]] = defaultdict(list)
        for i, (rid, task) in enumerate(zip(d["id"], d["task"])):
            if task == "diagnosis" and _picked(rid, self.fraction):
                by_dataset[d["dataset"][i]].append(i)
        for dataset, rows in by_dataset.items():
            keys = [case_key(dataset, d["image"][i], d["source_id"][i] or d["id"][i]) for i in rows]
            for i, labels in zip(rows, self.labels_for(keys, dataset)):
                prompts_out[i] = prompts.with_retrieved_labels(prompts_out[i], labels)
        return batch.set_column(batch.schema.get_field_index("prompt"), "prompt", pa.array(prompts_out, pa.string()))


__all__ = [
    "Neighbor",
    "Retriever",
    "TrainingContext",
    "UnknownDatasetError",
    "rag_context",
    "rag_prompt",
    "retrieve",
    "top_k_for",
    "distinct_images",
    "scope_for",
    "vote",
    "vote_report",
]
