"""Serve benchmark: ``@serve.batch`` against batch size 1, and retrieval on against off, for the tiny and the smol
student side by side in one run.

For each student (``tiny``: the tests' random 2-layer LLaVA; ``smol``: the demo preset's SmolLM2-135M-Instruct
LLaVA, ``build: smol``) the benchmark

1. builds a run folder whose index that student embedded (``run_index`` over the tiny preset's BreastMNIST train +
   val, 624 cases; reused when ``--work-dir`` already has it),
2. deploys the application on a local Ray cluster with one fixed generator replica (no autoscaling: the figures
   are one replica's) and one ingress replica, Serve's proxy on 127.0.0.1,
3. measures over HTTP on loopback, each phase bounded in requests and seconds, after 16 warm-up requests:

   - **batching**: 16 concurrent clients send ``--requests`` ``POST /v1/diagnose`` (BreastMNIST test images,
     retrieval on) with ``@serve.batch`` at ``max_batch_size`` ``--batch``; then the same at batch size 1 (the
     Generator's ``user_config`` ``{"max_batch_size": 1}``, a redeploy); then batched and batch 1 once more (the
     machine's load drifts: each figure is the mean of its two runs). Throughput, p50, p99 of each, and CPU
     seconds per request (of the whole local cluster and the clients, and of the generator replica alone: on a
     shared machine they move far less than wall time); ratio = batched throughput / batch-1 throughput (goal:
     >= 3x), and the same in requests per CPU second.
   - **retrieval**: one client sends ``--latency-requests`` requests with ``"rag": true`` and as many with
     ``"rag": false``, alternating (so drift hits both alike), at the batched setting; p50 and mean latency of each;
     overhead = p50(on) / p50(off) - 1 (goal: <= 10 %). The same at 16 clients (p50 under load) is printed too,
     and the generator's own mean retriever-call time from the ``meddr_serve_retrieval_latency_s`` metric.

Prints a table per student and both ratios; writes every figure as JSON to ``--out``.

    .venv/bin/python benchmarks/serve_bench.py --out /tmp/serve_bench.json           # both students, ~15 min
    .venv/bin/python benchmarks/serve_bench.py --students tiny --out /tmp/tiny.json  # a quick look

The generator gets ``--gen-cpus`` CPUs (default 1: Ray runs its torch with one thread; the other core is left to
Serve's proxy, the ingress, the retriever and the clients on a 2-core machine).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import re
import secrets
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proc_stats import tree_cpu  # noqa: E402  (benchmarks/, the script's own folder)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray runs its workers at nice 15 by default; on a machine shared with other work that alone would starve the
# replicas. Measure Serve, not the scheduler's priorities.
os.environ.setdefault("RAY_worker_niceness", "0")

LABELS = ["malignant", "normal, benign"]
TOKEN = secrets.token_urlsafe(24)
STUDENTS = {
    "tiny": [],  # the tiny preset's own student
    "smol": [  # the demo preset's teacher, as the student
        "student.name=smollm2-135m-instruct-llava",
        "student.path=${cache:models/smol}",
        "student.build=smol",
        "student.build_options.image_size=64",
        "student.build_options.patch_size=16",
        "student.build_options.vision_hidden_size=128",
        "student.build_options.vision_layers=2",
    ],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_images(n: int) -> List[str]:
    import numpy as np
    from PIL import Image

    from meddr_ray.config import PACKAGE_DIR

    arrays = np.load(PACKAGE_DIR / "assets" / "breastmnist.npz")["test_images"]
    out = []
    for i in range(min(n, len(arrays))):
        buf = io.BytesIO()
        Image.fromarray(arrays[i]).save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


# ------------------------------------------------------------------------------------------------- clients


def run_clients(url: str, images: List[str], *, clients: int, requests: int, max_seconds: float,
                rag_modes=(True,)) -> Dict[str, dict]:  # fmt: skip
    """``clients`` threads send ``requests`` requests in all (request i: image i mod n, ``rag_modes[i mod m]``),
    stopping early after ``max_seconds``. Returns figures per rag mode."""
    import httpx

    lock = threading.Lock()
    state = {"next": 0}
    results: List[tuple] = []  # (rag, status, seconds)
    deadline = time.time() + max_seconds

    def client() -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=300) as c:
            while True:
                with lock:
                    i = state["next"]
                    if i >= requests or time.time() > deadline:
                        return
                    state["next"] += 1
                rag = rag_modes[i % len(rag_modes)]
                body = {"image": images[i % len(images)], "labels": LABELS, "rag": rag}
                started = time.perf_counter()
                try:
                    status = c.post("/v1/diagnose", json=body).status_code
                except httpx.HTTPError:
                    status = 0
                results.append((rag, status, time.perf_counter() - started))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max_seconds + 600)
    elapsed = time.perf_counter() - started
    figures = {}
    for rag in rag_modes:
        mine = [r for r in results if r[0] == rag]
        ok = sorted(s for _, status, s in mine if status == 200)
        figures["rag" if rag else "no_rag"] = {
            "clients": clients,
            "requests": len(mine),
            "ok": len(ok),
            "failed": len(mine) - len(ok),
            "seconds": round(elapsed, 2),
            "throughput_rps": round(len(ok) / elapsed, 3) if len(rag_modes) == 1 else None,
            "p50_ms": round(1000 * quantile(ok, 0.5), 1) if ok else None,
            "p99_ms": round(1000 * quantile(ok, 0.99), 1) if ok else None,
            "mean_ms": round(1000 * statistics.fmean(ok), 1) if ok else None,
            "time_bounded": state["next"] < requests,
        }
    return figures


def quantile(sorted_values: List[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


# --------------------------------------------------------------------------------------------- CPU time




def replica_pid(app: str, deployment: str) -> Optional[int]:
    """The process of ``deployment``'s replica in ``app`` (Ray titles it ``ray::ServeReplica:<app>:<deployment>``)."""
    for pid in tree_cpu(os.getpid()):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith(f"ray::ServeReplica:{app}:{deployment}"):
            return pid
    return None


# ------------------------------------------------------------------------------------------------- metrics


def retrieval_metric(app: str) -> Optional[dict]:
    """Sum and count of ``meddr_serve_retrieval_latency_s`` of ``app``'s generator, from this node's metrics
    exporter (what Prometheus scrapes); None where it cannot be read."""
    import httpx
    import ray

    try:
        port = ray._private.worker.global_worker.node.metrics_export_port  # no public accessor
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    except Exception:  # noqa: BLE001 - a figure the benchmark can do without
        return None
    out = {"sum": 0.0, "count": 0.0}
    for kind in out:
        pattern = rf'^ray_meddr_serve_retrieval_latency_s_{kind}\{{([^}}]*)\}} ([0-9.eE+-]+)$'
        for labels, value in re.findall(pattern, text, flags=re.M):
            if f'application="{app}"' in labels:
                out[kind] += float(value)
    return out


# --------------------------------------------------------------------------------------------- one student


def bench_student(name: str, args, work: Path, images: List[str]) -> dict:
    from meddr_ray.config import load_config
    from meddr_ray.retrieval.store import current_version
    from meddr_ray.stages.index import run_index
    from serve_apps import launch

    run_dir = work / name
    app_name = f"serve-bench-{name}"
    overrides = [
        f"run_dir={run_dir}",
        *STUDENTS[name],
        f"serve.app_name={app_name}",
        f"serve.port={args.port}",
        f"serve.max_batch_size={args.batch}",
        f"serve.batch_wait_timeout_s={args.batch_wait_s}",
        f"serve.generator.num_cpus={args.gen_cpus}",
        "serve.generator.min_replicas=1",
        "serve.generator.max_replicas=1",
        f"serve.generator.max_ongoing_requests={max(16, 2 * args.batch)}",
        "serve.ingress.max_replicas=1",
    ]
    cfg = load_config("tiny", overrides)
    print(f"\n== {name}: student {cfg.student.name} ({cfg.student.path})", flush=True)
    index_dir = cfg.layout.index_dir
    if current_version(index_dir) is None:
        started = time.time()
        run_index(cfg)
        print(f"[{name}] index built in {time.time() - started:.0f} s", flush=True)
    requests = args.requests[name]
    figures: dict = {"student": cfg.student.name, "index_version": current_version(index_dir)}

    def phase(label: str, **kw) -> dict:
        run_clients(url, images, clients=16, requests=16, max_seconds=args.max_seconds)  # warm-up
        gen_pid = replica_pid(app_name, "Generator")
        cpu_before = tree_cpu(os.getpid())
        out = run_clients(url, images, max_seconds=args.max_seconds, **kw)
        cpu_after = tree_cpu(os.getpid())
        cpu = sum(now - cpu_before.get(pid, 0.0) for pid, now in cpu_after.items())
        gen_cpu = cpu_after.get(gen_pid, 0.0) - cpu_before.get(gen_pid, 0.0) if gen_pid else None
        ok = sum(f["ok"] for f in out.values())
        for mode, f in out.items():
            f["cpu_s_per_request"] = round(cpu / max(ok, 1), 4)  # all modes of the phase together
            f["generator_cpu_s_per_request"] = round(gen_cpu / max(ok, 1), 4) if gen_pid else None
            print(f"[{name}] {label:<32} {mode:<6} {f['ok']:>4}/{f['requests']:<4} ok  "
                  f"{f['throughput_rps'] or float('nan'):7.2f} req/s  p50 {f['p50_ms']:8.1f} ms  "
                  f"p99 {f['p99_ms']:8.1f} ms  CPU {1000 * f['cpu_s_per_request']:6.0f} ms/req "
                  f"(generator {1000 * (f['generator_cpu_s_per_request'] or float('nan')):5.0f})"
                  + ("  (time-bounded)" if f["time_bounded"] else ""), flush=True)  # fmt: skip
        return out

    started = time.time()
    url = launch.start(cfg, token=TOKEN).url
    print(f"[{name}] deployed in {time.time() - started:.0f} s at {url}", flush=True)
    try:
        before = retrieval_metric(app_name)
        figures["batched"] = phase(f"batch {args.batch}, 16 clients", clients=16, requests=requests)["rag"]
        latency = phase("1 client, rag on/off", clients=1, requests=2 * args.latency_requests,
                        rag_modes=(True, False))  # fmt: skip
        figures["latency_1_client"] = latency
        figures["latency_16_clients"] = phase("16 clients, rag on/off", clients=16, requests=requests,
                                              rag_modes=(True, False))  # fmt: skip
        # batch 1, batched, batch 1 again: with the first batched run, each setting twice, alternating (drift)
        for key, label, user_configs in (
            ("batch_1", "batch 1, 16 clients", {"Generator": {"max_batch_size": 1}}),
            ("batched_again", f"batch {args.batch}, 16 clients (again)", None),
            ("batch_1_again", "batch 1, 16 clients (again)", {"Generator": {"max_batch_size": 1}}),
        ):
            launch.start(cfg, token=TOKEN, user_configs=user_configs)  # a redeploy: new replicas
            figures[key] = phase(label, clients=16, requests=requests)["rag"]
        time.sleep(12)  # Ray's exporter publishes every few seconds
        after = retrieval_metric(app_name)
    finally:
        launch.stop(app_name)

    def mean(keys, field):
        return statistics.fmean(figures[k][field] for k in keys)

    batched, single = ("batched", "batched_again"), ("batch_1", "batch_1_again")
    figures["batching_speedup"] = round(mean(batched, "throughput_rps") / mean(single, "throughput_rps"), 2)
    figures["batching_cpu_ratio"] = round(mean(single, "cpu_s_per_request") / mean(batched, "cpu_s_per_request"), 2)
    if all(figures[k]["generator_cpu_s_per_request"] for k in batched + single):
        figures["batching_generator_cpu_ratio"] = round(
            mean(single, "generator_cpu_s_per_request") / mean(batched, "generator_cpu_s_per_request"), 2
        )
    on, off = latency["rag"], latency["no_rag"]
    figures["retrieval_overhead_p50"] = round(on["p50_ms"] / off["p50_ms"] - 1, 4)
    figures["retrieval_overhead_mean"] = round(on["mean_ms"] / off["mean_ms"] - 1, 4)
    load_on, load_off = figures["latency_16_clients"]["rag"], figures["latency_16_clients"]["no_rag"]
    figures["retrieval_overhead_p50_16_clients"] = round(load_on["p50_ms"] / load_off["p50_ms"] - 1, 4)
    if before and after and after["count"] > before["count"]:
        calls = after["count"] - before["count"]
        figures["retriever_call_mean_ms"] = round(1000 * (after["sum"] - before["sum"]) / calls, 2)
        figures["retriever_calls"] = int(calls)
    return figures


# ------------------------------------------------------------------------------------------------- report


def machine() -> dict:
    import ray
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())  # fmt: skip
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpu": torch.cuda.is_available(),
        "ray": ray.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def print_summary(results: Dict[str, dict], batch: int) -> None:
    names = list(results)
    def two(key1, key2, field, fmt):
        return lambda f: f"{format(f[key1][field], fmt)} / {format(f[key2][field], fmt)}"

    rows = [
        (f"batch {batch}: req/s (run 1 / 2)", two("batched", "batched_again", "throughput_rps", ".2f")),
        (f"batch {batch}: p50 ms (run 1 / 2)", two("batched", "batched_again", "p50_ms", ".0f")),
        (f"batch {batch}: p99 ms (run 1 / 2)", two("batched", "batched_again", "p99_ms", ".0f")),
        ("batch 1: req/s (run 1 / 2)", two("batch_1", "batch_1_again", "throughput_rps", ".2f")),
        ("batch 1: p50 ms (run 1 / 2)", two("batch_1", "batch_1_again", "p50_ms", ".0f")),
        ("batch 1: p99 ms (run 1 / 2)", two("batch_1", "batch_1_again", "p99_ms", ".0f")),
        ("BATCHING SPEED-UP (goal >= 3x)", lambda f: f"{f['batching_speedup']:.2f}x"),
        ("  in requests per CPU-s (all)", lambda f: f"{f['batching_cpu_ratio']:.2f}x"),
        ("  same, generator replica", lambda f: f"{f['batching_generator_cpu_ratio']:.2f}x"
         if "batching_generator_cpu_ratio" in f else "n/a"),
        ("1 client p50 ms, rag on / off",
         lambda f: f"{f['latency_1_client']['rag']['p50_ms']:.1f} / {f['latency_1_client']['no_rag']['p50_ms']:.1f}"),
        ("RETRIEVAL OVERHEAD p50 (goal <= 10 %)", lambda f: f"{100 * f['retrieval_overhead_p50']:+.1f} %"),
        ("  same, mean latency", lambda f: f"{100 * f['retrieval_overhead_mean']:+.1f} %"),
        ("  same, p50 at 16 clients", lambda f: f"{100 * f['retrieval_overhead_p50_16_clients']:+.1f} %"),
        ("retriever call, mean ms", lambda f: f"{f['retriever_call_mean_ms']:.2f}" if "retriever_call_mean_ms" in f
         else "n/a"),
    ]  # fmt: skip
    width = max(len(r[0]) for r in rows) + 2
    print("\n" + "".ljust(width) + "".join(n.rjust(18) for n in names))
    for label, cell in rows:
        print(label.ljust(width) + "".join(cell(results[n]).rjust(18) for n in names))
    phases = ("batched", "batch_1", "batched_again", "batch_1_again")
    failed = {n: sum(f[k]["failed"] for k in phases) for n, f in results.items()}
    print(f"failed requests: {failed}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "serve_bench.json"),
                        help="JSON file for the figures (default: serve_bench.json in the temporary folder)")  # fmt: skip
    parser.add_argument("--students", default="tiny,smol", help="comma-separated: tiny, smol")
    parser.add_argument("--requests", default="tiny=320,smol=64",
                        help="requests per 16-client phase, per student (name=count,...)")  # fmt: skip
    parser.add_argument("--latency-requests", type=int, default=30, help="1-client requests per rag mode")
    parser.add_argument("--batch", type=int, default=8, help="@serve.batch max_batch_size of the batched runs")
    parser.add_argument("--batch-wait-s", type=float, default=0.05, help="@serve.batch batch_wait_timeout_s")
    parser.add_argument("--gen-cpus", type=float, default=1.0, help="CPUs of the generator replica")
    parser.add_argument("--max-seconds", type=float, default=300, help="time bound of each phase")
    parser.add_argument("--work-dir", help="run folders (indexes) to build or reuse; default a temporary folder")
    parser.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.students.split(",") if n.strip()]
    unknown = set(names) - set(STUDENTS)
    if unknown:
        parser.error(f"unknown students {sorted(unknown)}; choose from {sorted(STUDENTS)}")
    counts = dict(item.split("=", 1) for item in args.requests.split(","))
    args.requests = {n: int(counts.get(n, 96)) for n in names}
    args.port = free_port()

    import ray

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="serve-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: os.environ[k] for k in ("MEDDR_RAY_CACHE",) if k in os.environ}})  # fmt: skip
    ray.data.DataContext.get_current().enable_progress_bars = False
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "load_average_start": os.getloadavg(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "students": {},
    }
    images = test_images(64)
    try:
        for name in names:
            report["students"][name] = bench_student(name, args, work, images)
            Path(args.out).write_text(json.dumps(report, indent=2))  # what is done so far survives a later failure
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    report["load_average_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(report, indent=2))
    print_summary(report["students"], args.batch)
    for name, f in report["students"].items():
        print(f"{name}: batching speed-up {f['batching_speedup']:.2f}x (goal >= 3x); retrieval adds "
              f"{100 * f['retrieval_overhead_p50']:+.1f} % to the 1-client p50 latency (goal <= 10 %)")  # fmt: skip
    print(f"figures: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
