"""Ray job: LoRA instruction tuning on Ray Train with DeepSpeed ZeRO-3 (paper section 3.2).

    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/finetune.py --config tiny run_dir=/shared/runs/tiny

The same function as ``meddr-ray train``. Re-submitting with the same ``run_dir`` / ``train.name`` resumes from
the run's latest checkpoint (step, optimizer, schedule and data position); ``train.max_steps=N`` extends a run.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from meddr_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    # The same parser, error handling and library function as `meddr-ray train`.
    sys.exit(main(["train", *sys.argv[1:]]))
