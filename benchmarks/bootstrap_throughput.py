"""Bootstrap throughput: the Ray Data job (1 teacher actor, then 2) against a plain single-process loop.

Same teacher (the demo preset's SmolLM2 LLaVA), same images (BreastMNIST train, the first ``--n``), same batch
size, same decoding (the demo preset's, sampling seeded per batch), and the same function,
``meddr_ray.stages.bootstrap.teacher_generate``. Printed: generated tokens per second of each, end to end (the Ray
job's whole ``run_bootstrap`` call, including starting its actors and loading the model in them; the plain
loop's model load plus its loop), inside the generate calls alone, and per CPU second of all the run's
processes; and the ratios to the plain loop. The plain loop runs first and again last (the machine's load
drifts); the faster of the two is the baseline. Each Ray configuration runs in its own process on a fresh
local cluster (not timed: on a cluster it is already up), so no Ray process runs next to the plain loop; one
of them without the Ray dashboard, whose processes cost a 2-core machine a measurable share.

    .venv/bin/python benchmarks/bootstrap_throughput.py            # 256 images (several minutes on 2 cores)
    .venv/bin/python benchmarks/bootstrap_throughput.py --n 32     # a quick look

On a CPU machine each actor's torch uses as many threads as the actor has CPUs (Ray sets OMP_NUM_THREADS from
``num_cpus``): 1 actor gets all the cores (``--cores``), 2 actors half each, and the plain loop uses torch's
default (all cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proc_stats import tree_cpu  # noqa: E402  (benchmarks/, the script's own folder)
os.environ.setdefault("MEDDR_RAY_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "test"))
# Ray runs its workers at nice 15 by default; on a machine shared with other work that alone would slow the
# actors against the plain loop (which runs at the caller's priority). Measure the Ray overhead, not that.
os.environ.setdefault("RAY_worker_niceness", "0")




def cpu_since(before: dict, root: int) -> float:
    """CPU seconds used since ``before`` by the processes alive now (a process that ended in between is
    not counted: a slight underestimate of Ray's overhead, never a negative one)."""
    return sum(now - before.get(pid, 0.0) for pid, now in tree_cpu(root).items())


def plain_loop(cfg, n: int, batch_size: int) -> dict:
    """The same work without Ray: load the teacher, then generate batch after batch in this process."""
    import numpy as np
    from PIL import Image

    from meddr_ray.stages.bootstrap import teacher_generate
    from meddr_ray.stages.bootstrap_rows import teacher_prompt
    from meddr_ray.stages.parts import batch_seed
    from meddr_ray.data import medmnist_info, sample_id
    from meddr_ray.model import load_model

    src = cfg.bootstrap.sources[0]
    info = medmnist_info(src.name)
    started, cpu = time.perf_counter(), time.process_time()
    model = load_model(cfg.teacher)
    with np.load(src.path) as npz:
        images, labels = npz["train_images"][:n], npz["train_labels"][:n].reshape(-1)
    tokens, gen_seconds = 0, 0.0
    for start in range(0, n, batch_size):
        idx = range(start, min(start + batch_size, n))
        ids = [sample_id(src.name, "train", i) for i in idx]
        rows = [{"modality": info["modality"], "labels": [info["labels"][int(labels[i])]]} for i in idx]
        batch = [Image.fromarray(images[i]).convert("RGB") for i in idx]
        t = time.perf_counter()
        outs = teacher_generate(
            model, batch, [teacher_prompt(r) for r in rows], cfg.bootstrap.generation,
            cfg.bootstrap.impression_prefix, cfg.bootstrap.impression_max_new_tokens, seed=batch_seed(cfg.seed, ids),
        )  # fmt: skip
        gen_seconds += time.perf_counter() - t
        tokens += sum(o["tokens"] for o in outs)
    return {"tokens": tokens, "seconds": time.perf_counter() - started, "generate_seconds": gen_seconds,
            "cpu_seconds": time.process_time() - cpu, "load_avg_1m_after": os.getloadavg()[0]}  # fmt: skip


def ray_job(cfg_args, run_dir: str, actors: int, cpus_per_actor: int, dashboard: bool) -> dict:
    """One Ray configuration, run in this (child) process on a fresh local cluster."""
    import ray

    from meddr_ray.stages.bootstrap import load_summary, run_bootstrap
    from meddr_ray.config import load_config
    from meddr_ray.stages.runtime import worker_env

    cfg = load_config("demo", cfg_args + [
        f"run_dir={run_dir}", f"bootstrap.pool.min_actors={actors}", f"bootstrap.pool.max_actors={actors}",
        f"bootstrap.pool.num_cpus={cpus_per_actor}",
    ])  # fmt: skip
    # as meddr_ray.stages.runtime.init_ray, plus the dashboard switch; starting the cluster is not timed
    ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=dashboard, runtime_env={"env_vars": worker_env()})
    time.sleep(5)  # let the cluster's own start-up work settle
    started, cpu = time.perf_counter(), tree_cpu(os.getpid())
    run_bootstrap(cfg)
    seconds = time.perf_counter() - started
    cpu_seconds = cpu_since(cpu, os.getpid())
    s = load_summary(cfg.layout.bootstrap_dir)
    assert s["written"] == s["rows_in"], s  # a benchmark of a job that dropped rows would mean nothing
    # generate_seconds is summed over the actors: tokens / it is the rate of one actor while it generates
    return {"tokens": s["tokens"], "seconds": seconds, "generate_seconds": s["generate_seconds"],
            "cpu_seconds": cpu_seconds, "load_avg_1m_after": os.getloadavg()[0]}  # fmt: skip


def ray_job_in_child(args, cfg_args, run_dir: str, actors: int, cpus_per_actor: int, dashboard: bool) -> dict:
    """``ray_job`` in a fresh Python process, so that no Ray cluster runs next to the other measurements."""
    out = f"{run_dir}.json"
    spec = json.dumps({"cfg_args": cfg_args, "run_dir": run_dir, "actors": actors, "cpus": cpus_per_actor,
                       "dashboard": dashboard, "out": out})  # fmt: skip
    subprocess.run([sys.executable, __file__, "--child", spec], check=True)
    return json.loads(Path(out).read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256, help="images (BreastMNIST train has 546)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the demo preset's pool batch size")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="CPUs given to the single actor")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one Ray configuration (JSON spec)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        result = ray_job(spec["cfg_args"], spec["run_dir"], spec["actors"], spec["cpus"], spec["dashboard"])
        Path(spec["out"]).write_text(json.dumps(result))
        return 0

    from meddr_ray.config import load_config
    from meddr_ray.model import ensure_model

    base = load_config("demo")
    batch_size = args.batch_size or base.bootstrap.pool.batch_size
    cfg_args = [f"bootstrap.sources.0.limit={args.n}", f"bootstrap.pool.batch_size={batch_size}",
                f"ray.num_cpus={args.cores + 2}"]  # fmt: skip  # room for the read tasks next to the actors
    cfg = load_config("demo", cfg_args)
    ensure_model(cfg.teacher)  # built once, outside every timing

    results = {}
    print(f"load average (1 min) before: {os.getloadavg()[0]:.2f}; other work on the machine skews every figure")
    print(f"bootstrap throughput: {args.n} BreastMNIST images, batch {batch_size}, teacher {cfg.teacher.name}, "
          f"{args.cores} cores, max_new_tokens {cfg.bootstrap.generation.max_new_tokens} + impression "
          f"{cfg.bootstrap.impression_max_new_tokens}", flush=True)  # fmt: skip
    first = plain_loop(cfg, args.n, batch_size)
    print(f"  plain loop done: {first}", flush=True)

    per_actor = max(1, args.cores // 2)
    runs = [  # name, actors, CPUs (= torch threads) per actor, Ray dashboard
        ("ray 1 actor", 1, args.cores, True),
        ("ray 1 actor, no dashboard", 1, args.cores, False),
        ("ray 2 actors", 2, per_actor, True),
    ]
    tmp = tempfile.mkdtemp(prefix="bench-bootstrap-")
    try:
        for i, (name, actors, cpus, dashboard) in enumerate(runs):
            results[name] = ray_job_in_child(args, cfg_args, f"{tmp}/run{i}", actors, cpus, dashboard)
            print(f"  {name} done: {results[name]}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # The plain loop again after the Ray runs: the load of the machine drifts; the faster of the two plain runs
    # is the baseline (the conservative choice for the Ray ratios).
    again = plain_loop(cfg, args.n, batch_size)
    print(f"  plain loop (again) done: {again}", flush=True)
    results = {"plain loop": max(first, again, key=lambda r: r["tokens"] / r["seconds"]), **results}
    results["plain loop"]["runs_seconds"] = [first["seconds"], again["seconds"]]

    plain = results["plain loop"]
    same = len({r["tokens"] for r in results.values()}) == 1
    print(f"\nthe same tokens generated by every run (same batches, same seeds): {'yes' if same else 'NO'}")
    print("tok/s: end to end (wall); gen tok/s: inside the generate calls, per actor; tok/cpu-s: per CPU")
    print("second of every process of the run (with other work on the machine, the fairest of the three)")
    print(f"{'run':<27}{'tokens':>7}{'wall s':>8}{'tok/s':>7}{'ratio':>6}{'gen tok/s':>10}{'ratio':>6}"
          f"{'cpu s':>8}{'tok/cpu-s':>10}{'ratio':>6}{'load':>6}")  # fmt: skip
    for name, r in results.items():
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["generate_tokens_per_s"] = r["tokens"] / r["generate_seconds"]
        r["tokens_per_cpu_s"] = r["tokens"] / r["cpu_seconds"]
        r["ratio"] = r["tokens_per_s"] / (plain["tokens"] / plain["seconds"])
        r["generate_ratio"] = r["generate_tokens_per_s"] / (plain["tokens"] / plain["generate_seconds"])
        r["cpu_ratio"] = r["tokens_per_cpu_s"] / (plain["tokens"] / plain["cpu_seconds"])
        print(f"{name:<27}{r['tokens']:>7}{r['seconds']:>8.1f}{r['tokens_per_s']:>7.1f}{r['ratio']:>6.2f}"
              f"{r['generate_tokens_per_s']:>10.1f}{r['generate_ratio']:>6.2f}{r['cpu_seconds']:>8.1f}"
              f"{r['tokens_per_cpu_s']:>10.2f}{r['cpu_ratio']:>6.2f}{r['load_avg_1m_after']:>6.1f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
