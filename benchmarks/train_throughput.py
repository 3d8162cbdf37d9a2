"""Instruction-tuning throughput and memory, measured side by side in one run (the tiny student, BreastMNIST).

(a) Training samples/s and peak memory per worker for: ZeRO-3 with 2 Ray Train workers, ZeRO-3 with 1 worker,
    and a plain single-process torch loop (same model, LoRA, collate, micro batch, global batch and optimizer;
    no Ray Train, no DeepSpeed), each on 1 CPU per process.
(b) Per-worker parameter + optimizer-state memory under ZeRO-3 (every parameter partitioned:
    ``param_persistence_threshold=0``) against ZeRO-0 (replicated), 2 workers: ZeRO-3 should approach one half.

    python benchmarks/train_throughput.py                   # about 6 min on 2 cores
    python benchmarks/train_throughput.py --steps 60 --text-hidden-size 256 --text-layers 4   # a wider student

Throughput skips the first reporting window of each run (worker start, dataset start, first all-gathers).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from meddr_ray.config import cache_dir, load_config  # noqa: E402
from meddr_ray.stages.instruct import run_instruct  # noqa: E402
from meddr_ray.stages.runtime import init_ray  # noqa: E402
from meddr_ray.stages.train.stage import run_train  # noqa: E402

LOG_EVERY = 5


def _throughput(history, global_batch: int) -> float:
    """Samples/s over every reporting window but the first."""
    windows = [h for h in history if "loss" in h][1:]
    seconds = sum(h["step_time_s"] * h["steps_in_window"] for h in windows)
    steps = sum(h["steps_in_window"] for h in windows)
    return global_batch * steps / seconds if seconds else float("nan")


def train_run(base_overrides, root: Path, label: str, overrides) -> dict:
    cfg = load_config(
        "tiny",
        [
            *base_overrides,
            f"run_dir={root / label}",
            f"train.name={label}",
            "train.eval_at_start=false",
            f"train.log_every={LOG_EVERY}",
            "train.max_failures=0",
            *overrides,
        ],
    )
    cfg.train.checkpoint_every = cfg.train.max_steps  # only the final checkpoint: measure training, not saving
    started = time.perf_counter()
    adapter = run_train(cfg).path
    meta = json.loads((Path(adapter) / "meddr.json").read_text())
    return {
        "label": label,
        "samples_per_s": _throughput(meta["history"], cfg.train.global_batch_size),
        "workers": meta["workers"],
        "wall_s": time.perf_counter() - started,
        "final_loss": meta["final_metrics"]["loss"],
    }


def plain_loop(cfg_overrides, instruct_dir: str, steps: int) -> dict:
    """The same training in one process with plain torch (a Ray task on 1 CPU, like one Ray Train worker)."""
    import ray

    @ray.remote(num_cpus=1)
    def run() -> dict:
        import resource

        import pyarrow.parquet as pq
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from meddr_ray.model import apply_lora, ensure_model
        from meddr_ray.model.collate import InstructionCollator
        from meddr_ray.stages.train.schedule import lr_multiplier

        cfg = load_config("tiny", cfg_overrides)
        t = cfg.train
        path = ensure_model(cfg.student)
        torch.manual_seed(t.seed)
        model = apply_lora(AutoModelForImageTextToText.from_pretrained(path), t.lora)
        model.train()
        collate = InstructionCollator(AutoProcessor.from_pretrained(path), t.max_length)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=t.learning_rate, weight_decay=t.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(t, steps))
        files = sorted(Path(instruct_dir).glob("*.parquet"))
        table = pq.read_table(files, columns=["id", "image", "prompt", "answer", "split"]).to_pydict()
        rows = [i for i, s in enumerate(table["split"]) if s == "train"]
        accumulation = t.global_batch_size // t.micro_batch_size
        micro, step, timed_steps, timed_s = 0, 0, 0, 0.0
        start = time.perf_counter()
        while step < steps:
            for first in range(0, len(rows) - t.micro_batch_size + 1, t.micro_batch_size):
                chunk = rows[first : first + t.micro_batch_size]
                batch = collate({k: [table[k][i] for i in chunk] for k in ("id", "image", "prompt", "answer")})
                loss = model(**batch).loss / accumulation
                loss.backward()
                micro += 1
                if micro % accumulation:
                    continue
                torch.nn.utils.clip_grad_norm_(trainable, t.gradient_clipping)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                now = time.perf_counter()
                if step > LOG_EVERY:  # same warm-up exclusion as the Ray runs
                    timed_steps += 1
                    timed_s += now - start
                start = now
                if step >= steps:
                    break
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        optim = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
        return {
            "label": "plain torch loop (1 process)",
            "samples_per_s": t.global_batch_size * timed_steps / timed_s,
            "workers": [
                {
                    "rank": 0,
                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                    "param_mb": params / 2**20,
                    "optimizer_mb": optim / 2**20,
                }
            ],
            "final_loss": float(loss) * accumulation,
        }

    return ray.get(run.remote())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per configuration")
    parser.add_argument("--text-hidden-size", type=int, default=None, help="build a wider student (default: tiny's)")
    parser.add_argument("--text-layers", type=int, default=None, help="build a deeper student (default: tiny's)")
    parser.add_argument("--work-dir", default=None, help="where runs go (default: a temporary folder)")
    args = parser.parse_args(argv)

    root = Path(args.work_dir or tempfile.mkdtemp(prefix="meddr-train-bench-"))
    base = ["instruct.use_bootstrap=false", "instruct.sources.0.limit=null"]
    if args.text_hidden_size or args.text_layers:
        h = args.text_hidden_size or 64
        n = args.text_layers or 2
        base += [
            f"student.path={cache_dir() / 'models' / f'bench-h{h}-l{n}'}",
            f"student.build_options.text_hidden_size={h}",
            f"student.build_options.text_layers={n}",
        ]
    cfg = load_config("tiny", [*base, f"run_dir={root / 'data'}"])
    init_ray(cfg)
    instruct_dir = run_instruct(cfg).path
    base += [f"instruct.output_dir={instruct_dir}", f"train.max_steps={args.steps}"]

    runs = {
        "z3w2": train_run(base, root, "zero3-2workers", ["train.num_workers=2", "train.zero_stage=3"]),
        "z3w1": train_run(base, root, "zero3-1worker", ["train.num_workers=1", "train.zero_stage=3"]),
        "plain": plain_loop([*base, f"run_dir={root / 'plain'}"], instruct_dir, args.steps),
        "z3w2p0": train_run(
            base,
            root,
            "zero3-2workers-partition-all",
            ["train.num_workers=2", "train.zero_stage=3", "train.param_persistence_threshold=0"],
        ),
        "z0w2": train_run(base, root, "zero0-2workers", ["train.num_workers=2", "train.zero_stage=0"]),
    }

    model_cfg = load_config("tiny", base)
    print()
    print(
        f"student: {model_cfg.student.name} at {model_cfg.student.path}; {args.steps} steps of "
        f"{model_cfg.train.global_batch_size} samples (micro {model_cfg.train.micro_batch_size}); 1 CPU per process"
    )
    print(f"{'configuration':34s} {'samples/s':>10s} {'peak RSS/worker MB':>19s} {'params MB':>10s} {'optim MB':>9s}")
    for key in ("z3w2", "z3w1", "plain", "z3w2p0", "z0w2"):
        r = runs[key]
        w = r["workers"]
        rss = max(x["peak_rss_mb"] for x in w)
        par = max(x["param_mb"] for x in w)
        opt = max(x["optimizer_mb"] for x in w)
        print(f"{r['label']:34s} {r['samples_per_s']:10.1f} {rss:19.0f} {par:10.3f} {opt:9.3f}")

    def state_mb(key):
        return max(x["param_mb"] + x["optimizer_mb"] for x in runs[key]["workers"])

    print()
    print(f"ZeRO-3 2 workers / 1 worker, samples/s:           {runs['z3w2']['samples_per_s'] / runs['z3w1']['samples_per_s']:.2f}x")
    print(f"ZeRO-3 2 workers / plain loop, samples/s:         {runs['z3w2']['samples_per_s'] / runs['plain']['samples_per_s']:.2f}x")
    print(f"ZeRO-3 1 worker / plain loop, samples/s:          {runs['z3w1']['samples_per_s'] / runs['plain']['samples_per_s']:.2f}x")
    print(
        "ZeRO-3 / ZeRO-0 per-worker params + optimizer state (2 workers, all partitioned): "
        f"{state_mb('z3w2p0'):.3f} / {state_mb('z0w2'):.3f} MB = {state_mb('z3w2p0') / state_mb('z0w2'):.2f}"
    )
    print(
        "ZeRO-3 (default persistence threshold) / ZeRO-0, same measure: "
        f"{state_mb('z3w2'):.3f} / {state_mb('z0w2'):.3f} MB = {state_mb('z3w2') / state_mb('z0w2'):.2f}"
    )
    print(f"runs in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
