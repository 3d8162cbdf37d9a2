"""Ray job: LoRA instruction tuning on Ray Train with DeepSpeed ZeRO-3 (paper section 3.2).

    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/finetune.py --config tiny run_dir=/shared/runs/tiny

The same function as ``meddr-ray train``. Re-submitting with the same ``run_dir`` / ``train.name`` resumes from
the run's latest checkpoint (step, optimizer, schedule and data position); ``train.max_steps=N`` extends a run.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from meddr_ray.config import load_config  # noqa: E402
from meddr_ray.runtime import init_ray  # noqa: E402
from meddr_ray.train import run_train  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="preset name or YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = load_config(args.config, args.overrides)
    init_ray(cfg)
    print(f"finetune: wrote {run_train(cfg)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
