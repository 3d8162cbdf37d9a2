"""The paper's retrieval database on one machine: 2M keys of dimension 3200 (InternViT-6B's width) as float32 are
25.6 GB, more than this machine's memory. The index job must build them into a compressed index (IVF-PQ) with
every process bounded by a shard.

Phases (``all`` runs each in its own process, so each peak RSS is that phase's own):

1. ``generate``: a stream of clustered vectors with low intrinsic dimension, written as embedding shards in the
   exact format the index job's encoder pool writes (values + fingerprint + embedding Parquet, as in
   ``<index_dir>/_work/<key>/embeddings/``). Real image embeddings have a low intrinsic dimension (estimates for
   natural-image datasets are in the tens, e.g. Pope et al. 2021, "The Intrinsic Dimension of Images and Its
   Impact on Learning"); uniform random vectors in 3200 dimensions would have no meaningful nearest neighbours.
   Each key: a mixture of ``--clusters`` Gaussian clusters in a ``--latent``-dimensional space, projected to
   ``--dim`` by one fixed random orthonormal matrix, plus isotropic noise, L2-normalised. The ``--queries``
   held-out queries come from the same distribution and are not in the index.
2. ``exact`` (beside ``build``): exact top-5 of every query, streamed over the embedding files row group by row group (a running
   top-5; never more than one row group of vectors in memory).
3. ``build`` (beside ``exact``): ``meddr_ray.stages.index.build_tasks.build_from_embeddings`` -- the same function ``meddr-ray index`` runs after
   embedding -- with ``index.type=ivfpq`` on a local Ray cluster: sample + train task, one task per shard, the
   on-disk merge + publish task. Peak RSS of each task comes from the published manifest
   (``summary.task_peak_rss_mb``), the driver's from this phase's process.
4. ``evaluate``: ``load_index`` (checksums verified, inverted lists memory-mapped), recall@5 of the 1,000
   queries against the exact top-5 at several nprobe, and search time.

    python benchmarks/index_scale.py --keys 50000 --dim 256 --nlist 256 --pq-m 32     # development, ~1 min
    nice -n 5 python benchmarks/index_scale.py                                          # 2M x 3200 (hours)

Writes ``<work>/results.json``; the generated shards are deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

K = 5
FINGERPRINT = "synthetic-index-scale"


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# ------------------------------------------------------------------------------------------- generate


class Generator:
    """Clustered keys of low intrinsic dimension: ``normalise(W @ (c_k + s * z) + noise)``."""

    def __init__(self, a: argparse.Namespace):
        rng = np.random.default_rng(a.seed)
        self.dim, self.latent = a.dim, a.latent
        self.centers = rng.normal(size=(a.clusters, a.latent)).astype(np.float32)
        q, _ = np.linalg.qr(rng.normal(size=(a.dim, a.latent)))  # fixed random orthonormal projection
        self.proj = np.ascontiguousarray(q.T.astype(np.float32))  # (latent, dim)
        self.spread, self.noise = a.spread, a.noise

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        k = rng.integers(0, len(self.centers), size=n)
        z = self.centers[k] + self.spread * rng.standard_normal((n, self.latent), dtype=np.float32)
        x = z @ self.proj
        x += self.noise * rng.standard_normal((n, self.dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x


def key_id(i: int) -> str:
    return f"k{i:09d}"


def _values(start: int, n: int) -> dict:
    from meddr_ray.retrieval.format import QA_TYPE

    return {
        "id": pa.array([key_id(i) for i in range(start, start + n)], pa.string()),
        "dataset": pa.array(["synthetic"] * n, pa.string()),
        "split": pa.array(["train"] * n, pa.string()),
        "source_file": pa.array(["synthetic.parquet"] * n, pa.string()),
        "source_index": pa.array(np.arange(start, start + n, dtype=np.int64)),
        "modality": pa.array(["synthetic"] * n, pa.string()),
        "label": pa.array([f"cluster-{i % 97}" for i in range(start, start + n)], pa.string()),
        "report": pa.nulls(n, pa.string()),
        "qa": pa.array([[]] * n, QA_TYPE),
        "error": pa.nulls(n, pa.string()),
        "fingerprint": pa.array([FINGERPRINT] * n, pa.string()),
    }


def generate(a: argparse.Namespace) -> dict:
    gen = Generator(a)
    emb_dir = Path(a.work) / "embeddings"
    if emb_dir.exists():
        shutil.rmtree(emb_dir)
    emb_dir.mkdir(parents=True)
    t0 = time.time()
    np.save(Path(a.work) / "queries.npy", gen.draw(a.queries, np.random.default_rng(a.seed + 1)))
    rng = np.random.default_rng(a.seed + 2)
    written, files = 0, 0
    while written < a.keys:
        n_file = min(a.rows_per_file, a.keys - written)
        path = emb_dir / f"part-{files:05d}.parquet"  # the encoder pool's file names are Ray Data's; any name does
        writer = None
        done = 0
        while done < n_file:
            n = min(a.row_group, n_file - done)
            x = gen.draw(n, rng)
            cols = _values(written + done, n)
            cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), a.dim)
            table = pa.table(cols)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema, compression="none")  # float noise does not compress
            writer.write_table(table, row_group_size=a.row_group)
            done += n
        writer.close()
        written += n_file
        files += 1
        if files % 5 == 0:
            print(f"generate: {written}/{a.keys} keys, {files} files, {time.time() - t0:.0f} s", flush=True)
    size = sum(p.stat().st_size for p in emb_dir.iterdir())
    return {"generate_seconds": round(time.time() - t0, 1), "embedding_files": files,
            "embedding_bytes": size, "generate_peak_rss_mb": peak_rss_mb()}  # fmt: skip


# ------------------------------------------------------------------------------------------- exact


def exact(a: argparse.Namespace) -> dict:
    """Exact top-5 by inner product, streamed over the embedding files one row group at a time."""
    q = np.load(Path(a.work) / "queries.npy")
    best_s = np.full((len(q), K), -np.inf, dtype=np.float32)
    best_i = np.full((len(q), K), -1, dtype=np.int64)
    t0 = time.time()
    for path in sorted((Path(a.work) / "embeddings").glob("*.parquet")):
        pf = pq.ParquetFile(path)
        for g in range(pf.metadata.num_row_groups):
            t = pf.read_row_group(g, columns=["source_index", "embedding"])
            x = t.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, a.dim)
            ids = t.column("source_index").to_numpy()
            s = q @ x.T
            top = np.argpartition(-s, min(K, s.shape[1] - 1), axis=1)[:, :K]
            cand_s = np.concatenate([best_s, np.take_along_axis(s, top, axis=1)], axis=1)
            cand_i = np.concatenate([best_i, ids[top]], axis=1)
            order = np.argsort(-cand_s, axis=1)[:, :K]
            best_s, best_i = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)
    np.save(Path(a.work) / "truth.npy", best_i)
    return {"exact_seconds": round(time.time() - t0, 1), "exact_peak_rss_mb": peak_rss_mb()}


# ------------------------------------------------------------------------------------------- build


def build(a: argparse.Namespace) -> dict:
    import ray

    from meddr_ray.config import load_config
    from meddr_ray.retrieval import store
    from meddr_ray.stages.index.build_tasks import IndexRun, build_from_embeddings
    from meddr_ray.stages.runtime import init_ray

    index_dir = str(Path(a.work) / "index")
    shutil.rmtree(index_dir, ignore_errors=True)
    cfg = load_config("tiny", [
        f"run_dir={a.work}/run", f"index.output_dir={index_dir}", "index.type=ivfpq", f"index.nlist={a.nlist}",
        f"index.pq_m={a.pq_m}", f"index.nprobe={a.nprobes[0]}", f"index.num_shards={a.shards}",
        f"index.train_size={a.train_size}", f"ray.num_cpus={a.cpus}", "index.build_cpus=1",
    ])  # fmt: skip
    init_ray(cfg)
    files = sorted(str(p) for p in (Path(a.work) / "embeddings").glob("*.parquet"))
    run = IndexRun(index_dir, "build", [{"name": "synthetic", "format": "parquet", "path": str(Path(a.work) / "embeddings")}])
    t0 = time.time()
    published, plan = build_from_embeddings(
        cfg, files, run, str(Path(a.work) / "scratch"), build_id="index-scale", expected_parent=None
    )
    seconds = time.time() - t0
    ray.shutdown()
    manifest = store.load_manifest(index_dir)
    return {
        "build_seconds": round(seconds, 1),
        "driver_peak_rss_mb": peak_rss_mb(),
        "task_peak_rss_mb": manifest["summary"]["task_peak_rss_mb"],
        "index_files_bytes": {n: f["bytes"] for n, f in manifest["files"].items()},
        "faiss_type": manifest["faiss_type"],
        "count": manifest["count"],
        "params": manifest["params"],
    }


# ------------------------------------------------------------------------------------------- evaluate


def evaluate(a: argparse.Namespace) -> dict:
    from meddr_ray.retrieval import faiss_io
    from meddr_ray.retrieval import store

    q = np.load(Path(a.work) / "queries.npy")
    truth = np.load(Path(a.work) / "truth.npy")
    t0 = time.time()
    loaded = store.load_index(str(Path(a.work) / "index"), expect_dim=a.dim, expect_fingerprint=FINGERPRINT)
    load_s = time.time() - t0
    source_index = loaded.values.column("source_index").to_numpy()
    out = {"load_seconds": round(load_s, 1), "recall_at_5": {}, "exact_top5_in_top50": {}, "search_ms_per_query": {}}

    def recall(ids: np.ndarray) -> float:
        found = np.where(ids >= 0, source_index[np.maximum(ids, 0)], -1)
        hits = [len(set(f) & set(t)) for f, t in zip(found.tolist(), truth.tolist())]
        return round(float(np.mean(hits)) / K, 4)

    for nprobe in a.nprobes:
        faiss_io.apply_search_params(loaded.index, nprobe=nprobe)
        t = time.time()
        _, ids = loaded.index.search(q, K)
        out["search_ms_per_query"][nprobe] = round((time.time() - t) * 1000 / len(q), 3)
        out["recall_at_5"][nprobe] = recall(ids)
        # what re-ranking 50 PQ candidates with the exact vectors would reach (the vectors are not in the index)
        out["exact_top5_in_top50"][nprobe] = recall(loaded.index.search(q, 50)[1])
        print(f"evaluate: nprobe={nprobe} recall@5={out['recall_at_5'][nprobe]} "
              f"top5-in-top50={out['exact_top5_in_top50'][nprobe]}", flush=True)  # fmt: skip
    out["evaluate_peak_rss_mb"] = peak_rss_mb()
    return out


PHASES = {"generate": generate, "exact": exact, "build": build, "evaluate": evaluate}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", nargs="?", default="all", choices=["all", *PHASES])
    p.add_argument("--keys", type=int, default=2_000_000)
    p.add_argument("--dim", type=int, default=3200)
    p.add_argument("--latent", type=int, default=32, help="intrinsic dimension of the keys")
    p.add_argument("--clusters", type=int, default=2000)
    p.add_argument("--spread", type=float, default=0.5, help="cluster radius in the latent space (centres ~ N(0, 1))")
    p.add_argument("--noise", type=float, default=0.01, help="per-dimension noise added after the projection")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--rows-per-file", type=int, default=50_000)
    p.add_argument("--row-group", type=int, default=2048)
    p.add_argument("--nlist", type=int, default=4096)
    p.add_argument("--pq-m", type=int, default=200)
    p.add_argument("--nprobes", type=lambda s: [int(x) for x in s.split(",")], default=[16, 32, 64, 128])
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--train-size", type=int, default=100_000)
    p.add_argument("--cpus", type=int, default=2, help="logical CPUs of the local Ray cluster")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="/tmp/index_scale")
    p.add_argument("--keep", action="store_true", help="keep the generated embedding files")
    a = p.parse_args()
    os.makedirs(a.work, exist_ok=True)
    if a.phase != "all":
        result = PHASES[a.phase](a)
        Path(a.work, f"{a.phase}.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result), flush=True)
        return
    results = {
        "machine": f"{platform.node()} {os.cpu_count()} CPUs, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB RAM",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "args": {k: v for k, v in vars(a).items() if k != "phase"},
    }
    t0 = time.time()
    argv = [x for x in sys.argv[1:] if x != "all"]

    def start(phase: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, __file__, phase, *argv])

    try:
        # the exact search and the index build read the same files and are independent: run them side by side
        for group in (["generate"], ["exact", "build"], ["evaluate"]):
            procs = [(phase, start(phase)) for phase in group]
            for phase, proc in procs:
                if proc.wait() != 0:
                    raise SystemExit(f"index_scale: phase {phase} failed (exit {proc.returncode})")
                results[phase] = json.loads(Path(a.work, f"{phase}.json").read_text())
    finally:
        if not a.keep:
            shutil.rmtree(Path(a.work) / "embeddings", ignore_errors=True)
    results["total_seconds"] = round(time.time() - t0, 1)
    Path(a.work, "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
