"""Retrieval-augmented prompts, the voting baseline and the Retriever (no Ray)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from meddr_ray.retrieval import build
from meddr_ray.retrieval import format as fmt
from meddr_ray.retrieval import store
from meddr_ray import prompts
from meddr_ray.config import RagConfig
from meddr_ray.retrieval.format import IndexArtifactError
from meddr_ray.retrieval.rag import (
    Neighbor,
    Retriever,
    UnknownDatasetError,
    rag_context,
    rag_prompt,
    retrieve,
    scope_for,
    top_k_for,
    vote,
    vote_report,
)

_IDS = iter(range(10**9))


def nb(label, score, report=None, qa=(), i=None, dataset="toy"):
    """A retrieved image (a fresh id unless ``i`` names one)."""
    return Neighbor(f"id{next(_IDS) if i is None else i}", label, report, tuple(qa), score, dataset, "ultrasound")


# ------------------------------------------------------------------------------------------------- vote


def test_vote_takes_the_majority_label():
    assert vote([nb("a", 0.99), nb("b", 0.98), nb("b", 0.5), nb("b", 0.4), nb("a", 0.9)]) == "b"


def test_vote_tie_goes_to_the_larger_summed_similarity():
    # two each: a sums 0.9 + 0.5 = 1.4, b sums 0.8 + 0.7 = 1.5 although a holds rank 1
    assert vote([nb("a", 0.9), nb("b", 0.8), nb("b", 0.7), nb("a", 0.5)]) == "b"
    assert vote([nb("a", 0.9), nb("b", 0.8), nb("b", 0.5), nb("a", 0.6)]) == "a"


def test_vote_full_tie_goes_to_the_nearest_label_and_unlabelled_cases_do_not_vote():
    assert vote([nb("b", 0.7), nb("a", 0.7)]) == "b"
    assert vote([nb(None, 0.99, report="a report"), nb("a", 0.5), nb(None, 0.98, report="x")]) == "a"
    assert vote([nb(None, 0.9, report="a report")]) is None
    assert vote([]) is None


def test_vote_counts_each_image_once():
    """One image found twice (results merged from two searches) is one vote, not two."""
    twice = nb("b", 0.95, i=7)
    assert vote([twice, twice, nb("a", 0.9), nb("a", 0.8)]) == "a"


def test_report_voting_is_the_top1_retrieved_report():
    ns = [nb("a", 0.99), nb(None, 0.9, report="  Findings: clear.  "), nb(None, 0.8, report="Other.")]
    assert vote_report(ns) == "Findings: clear."
    assert vote_report([nb("a", 0.9)]) is None


# ---------------------------------------------------------------------------------------------- context

RAG = RagConfig(top_k_diagnosis=3, top_k_vqa=1, top_k_report=1)


def test_top_k_per_task_follows_the_config():
    assert [top_k_for(t, RagConfig()) for t in ("diagnosis", "vqa", "report")] == [5, 1, 1]
    with pytest.raises(ValueError, match="unknown task 'segment'"):
        top_k_for("segment", RAG)


def test_diagnosis_context_is_the_labels_of_the_top_k_images_in_order():
    ns = [nb("malignant", 0.9), nb(None, 0.89, report="r"), nb("benign", 0.8), nb("malignant", 0.7), nb("benign", 0.6)]
    assert rag_context("diagnosis", ns, RAG) == ["malignant", "benign", "malignant"]
    prompt = rag_prompt("diagnosis", ns, RAG, modality="breast ultrasound", options=["malignant", "benign"])
    assert prompt == prompts.diagnosis_prompt(
        "breast ultrasound", ["malignant", "benign"], retrieved_labels=["malignant", "benign", "malignant"]
    )
    assert prompt.endswith("The diagnoses of the most similar images are: malignant; benign; malignant.")
    same = nb("benign", 0.95, i=3)
    assert rag_context("diagnosis", [same, same, nb("a", 0.5)], RAG) == ["benign", "a"]  # distinct images


def test_vqa_context_is_the_nearest_images_qa_pairs_closest_question_first():
    qa = [("What organ is shown?", "lung"), ("Is the left lung abnormal?", "yes"), ("Which plane?", "axial"),
          ("What modality?", "CT")]  # fmt: skip
    ns = [nb(None, 0.95), nb(None, 0.9, qa=qa), nb(None, 0.8, qa=[("Q?", "no")])]
    text = rag_context("vqa", ns, RAG, question="Is the lung abnormal?")
    assert text == "Q: Is the left lung abnormal? A: yes Q: What organ is shown? A: lung Q: Which plane? A: axial"
    prompt = rag_prompt("vqa", ns, RAG, question="Is the lung abnormal?")
    assert prompt == prompts.vqa_prompt("Is the lung abnormal?", context=text)
    assert prompt.endswith(f"most similar image: {text}. The question is Is the lung abnormal?")


def test_report_context_is_the_nearest_report():
    rs = [nb("a", 0.99), nb(None, 0.9, report="Findings: clear lungs. Impression: normal.")]
    assert rag_prompt("report", rs, RAG, modality="chest X-ray").endswith(
        "The report of the most similar image is: Findings: clear lungs. Impression: normal."
    )


def test_scope_is_the_querys_own_dataset_or_the_configured_ones():
    assert scope_for(RagConfig(), "breastmnist") == ["breastmnist"]
    assert scope_for(RagConfig(), None) is None
    assert scope_for(RagConfig(same_dataset=False), "breastmnist") is None
    assert scope_for(RagConfig(same_dataset=False, datasets=["a", "b"]), "breastmnist") == ["a", "b"]
    assert scope_for(RagConfig(datasets=["a"]), None) == ["a"]


def test_without_neighbours_the_prompt_has_no_context():
    assert rag_prompt("report", None, RAG, modality="CT") == prompts.report_prompt("CT")
    plain = prompts.diagnosis_prompt("CT", ["a", "b"])
    assert rag_prompt("diagnosis", [], RAG, modality="CT", options=["a", "b"]) == plain
    assert rag_context("report", [nb(None, 0.9, report="  ")], RAG) is None
    assert rag_context("vqa", [nb("a", 0.9)], RAG) is None
    with pytest.raises(ValueError, match="needs the question"):
        rag_prompt("vqa", None, RAG)
    with pytest.raises(ValueError, match="label options"):
        rag_prompt("diagnosis", None, RAG, modality="CT")


# -------------------------------------------------------------------------------------------- Retriever


def unit(n, dim=8, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def toy_values(ids, dataset, label, report=None, qa=None):
    n = len(ids)
    return pa.table(
        {
            "id": ids,
            "dataset": dataset if isinstance(dataset, list) else [dataset] * n,
            "modality": ["CT"] * n,
            "label": label if isinstance(label, list) else [label] * n,
            "report": report or pa.nulls(n, pa.string()),
            "qa": pa.array(qa or [[]] * n, fmt.QA_TYPE),
        }
    )


def publish_toy(root, x, start=0, fp="f" * 16, datasets=None, kind="flat"):
    n = len(x)
    table = toy_values([f"c{i}" for i in range(start, start + n)], datasets or "toy",
                       ["a" if i % 3 else "b" for i in range(n)],
                       qa=[[{"question": "q?", "answer": f"a{i}"}] if i == 4 else [] for i in range(n)])  # fmt: skip
    if kind == "flat":
        index = build.build_shard(x, build.IndexParams("flat"))
    elif kind == "ivf":
        params = build.IndexParams("ivf", nlist=4, nprobe=4)
        index = build.build_shard(x, params, build.train_ivf(x, params, 4))
    else:
        index = build.build_hnsw(x, build.IndexParams("hnsw"))
    index = build.build_shard(x, build.IndexParams("flat"))
    return store.publish(str(root), index, table, {"encoder_fingerprint": fp, "model_name": "toy"})


def test_retriever_returns_neighbours_with_values_and_scores(tmp_path):
    x = unit(30)
    publish_toy(tmp_path, x)
    r = Retriever.open(str(tmp_path), expect_dim=8)
    res = r.search(x[[4, 9]], k=3)
    assert [row[0].id for row in res] == ["c4", "c9"]
    assert res[0][0].score == pytest.approx(1.0, abs=1e-5)
    assert res[0][0].label == "a" and res[1][0].label == "b" and res[0][0].dataset == "toy"
    assert res[0][0].score >= res[0][1].score >= res[0][2].score
    assert res[0][0].evidence() == {"id": "c4", "label": "a", "report": None, "qa": [{"question": "q?", "answer": "a4"}],
                                    "score": res[0][0].score, "dataset": "toy"}  # fmt: skip
    # fewer vectors than k: no padding ids leak out
    assert len(r.search(x[:1], k=50)[0]) == 30
    # retrieve() accepts a loaded index too
    assert retrieve(store.load_index(str(tmp_path)), x[4], 1)[0][0].id == "c4"
    with pytest.raises(ValueError, match="dimension 4, the index has 8"):
        Retriever.open(str(tmp_path)).search(unit(1, dim=4), 1)
    with pytest.raises(IndexArtifactError, match="dimension 8 but the encoder produces 4"):
        Retriever.open(str(tmp_path), expect_dim=4)


def test_retriever_follows_current_after_an_incremental_add(tmp_path):
    x = unit(20)
    publish_toy(tmp_path, x)
    r = Retriever.open(str(tmp_path), expect_fingerprint="f" * 16)
    assert r.reload_if_changed() is False
    y = unit(5, seed=7)
    publish_toy(tmp_path, np.concatenate([x, y]))
    assert r.reload_if_changed() is True and r.version == "v0002" and r.count == 25
    assert r.search(y[:1], 1)[0][0].id == "c20"
    publish_toy(tmp_path, x, fp="0" * 16)  # a rebuild with another encoder is not picked up silently
    with pytest.raises(IndexArtifactError, match="current encoder is ffffffffffffffff"):
        r.reload_if_changed()
    assert r.version == "v0002"


def publish_permuted(root, x, perm, version_tag):
    """A version holding the same vectors as every other in the order ``perm``: FAISS id r is case ``perm[r]``,
    and every value of the version carries its tag, so an answer mixing two versions cannot go unnoticed."""
    table = toy_values([f"c{i}" for i in perm], version_tag, version_tag)
    index = build.build_shard(x[perm], build.IndexParams("flat"))
    return store.publish(str(root), index, table, {"encoder_fingerprint": "f" * 16, "model_name": "toy"})


def test_searches_stay_consistent_while_versions_change(tmp_path):
    """Searches in threads while another thread publishes new versions and reloads: every answer's neighbours
    are the right cases (the query's own case first) and all come from the one version the answer names."""
    import threading

    n, versions = 400, 12
    x = unit(n, dim=16, seed=3)
    rng = np.random.default_rng(0)
    tags = [f"t{j}" for j in range(versions)]
    publish_permuted(tmp_path, x, np.arange(n), tags[0])
    r = Retriever.open(str(tmp_path))
    stop = threading.Event()
    failures, answers = [], [0]

    def search_loop(seed):
        local = np.random.default_rng(seed)
        while not stop.is_set():
            q = local.choice(n, size=32, replace=False)
            version, rows = r.search_versioned(x[q], k=3)
            for case, row in zip(q, rows):
                if row[0].id != f"c{case}" or len({nb.label for nb in row}) != 1:
                    failures.append((version, case, [(nb.id, nb.label) for nb in row]))
            answers[0] += 1

    threads = [threading.Thread(target=search_loop, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    try:
        seen = {r.version}
        for tag in tags[1:]:
            publish_permuted(tmp_path, x, rng.permutation(n), tag)
            assert r.reload_if_changed() is True
            seen.add(r.version)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert len(seen) == versions and answers[0] > versions
    assert not failures, f"{len(failures)} answers mixed versions, e.g. {failures[:3]}"
    # and an explicit switch back to an older version (a pinned version) answers from it
    assert r.switch_to("v0001") is True and r.search(x[:1], 1)[0][0].label == tags[0]
    assert r.switch_to("v0001") is False


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_search_scoped_to_datasets_returns_only_their_images_and_a_full_top_k(tmp_path, kind):
    """Section 4.5: each dataset's queries retrieve from that dataset's cases, even when it is a small part of the
    index (FAISS filters inside the search, so the top-k is full)."""
    x = unit(200, seed=5)
    names = ["big"] * 190 + ["small"] * 10
    publish_toy(tmp_path, x, datasets=names, kind=kind)
    r = Retriever.open(str(tmp_path))
    assert r.datasets == {"big": 190, "small": 10}
    small = r.search(x[:3], k=5, datasets=["small"])
    assert all(len(row) == 5 and {n.dataset for n in row} == {"small"} for row in small)
    big = r.search(x[190:192], k=5, datasets=["big"])
    assert all({n.dataset for n in row} == {"big"} for row in big)
    both = r.search(x[:1], k=3, datasets=["big", "small"])
    assert both[0][0].id == "c0"  # the whole index: the query's own image first
    with pytest.raises(UnknownDatasetError, match=r"no images of dataset\(s\) \['nope'\].*it holds \['big', 'small'\]"):
        r.search(x[:1], k=3, datasets=["nope"])


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_training_context_gives_picked_diagnosis_prompts_the_labels_of_other_images(tmp_path, kind):
    """train.rag_context_fraction: a training image's key is read back from the index; its own case is left out,
    so its label never gives itself away; rows not picked, other tasks and images not indexed keep their prompt."""
    from meddr_ray.retrieval.rag import TrainingContext

    images = [f"png-{i}".encode() for i in range(30)]
    ids = [fmt.case_key("toy", img, f"s{i}") for i, img in enumerate(images)]
    x = unit(30, seed=11)
    labels = ["a" if i % 3 else "b" for i in range(30)]
    if kind == "ivf":  # every list probed: the same neighbours as exact search
        params = build.IndexParams("ivf", nlist=2, nprobe=2)
        index = build.build_shard(x, params, build.train_ivf(x, params, 2))
    else:
        index = build.build_shard(x, build.IndexParams("flat")) if kind == "flat" else build.build_hnsw(x, build.IndexParams("hnsw"))
    store.publish(str(tmp_path), index, toy_values(ids, "toy", labels), {"encoder_fingerprint": "f" * 16})
    base = prompts.diagnosis_prompt("CT", ["a", "b"])
    n = 6
    batch = pa.table({
        "id": [f"row{i}" for i in range(n)],
        "task": ["diagnosis"] * 4 + ["vqa", "diagnosis"],
        "dataset": ["toy"] * n,
        "image": images[:5] + [b"not indexed"],
        "source_id": [f"s{i}" for i in range(n)],
        "prompt": [base] * 4 + ["a vqa prompt", base],
    })  # fmt: skip
    context = TrainingContext(str(tmp_path), "v0001", RagConfig(top_k_diagnosis=3), fraction=1.0)
    out = context(batch).column("prompt").to_pylist()
    sims = x @ x.T
    for i in range(4):
        order = [j for j in np.argsort(-sims[i]) if j != i][:3]
        assert out[i] == prompts.diagnosis_prompt("CT", ["a", "b"], [labels[j] for j in order])
    assert out[4] == "a vqa prompt" and out[5] == base
    none = TrainingContext(str(tmp_path), "v0001", RagConfig(top_k_diagnosis=3), fraction=0.0)
    assert none(batch).column("prompt").to_pylist() == batch.column("prompt").to_pylist()
    half = TrainingContext(str(tmp_path), "v0001", RagConfig(top_k_diagnosis=3), fraction=0.5)
    first = half(batch).column("prompt").to_pylist()
    assert first == half(batch).column("prompt").to_pylist()  # the same rows every time
