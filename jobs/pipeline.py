"""Ray job: the whole pipeline (bootstrap -> instruct -> train -> index -> evaluate).

    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/pipeline.py --config tiny run_dir=/shared/runs/tiny

Re-submitting the same command resumes: every stage skips or resumes what is already done.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from meddr_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    # The same parser, error handling and library function as `meddr-ray pipeline`.
    sys.exit(main(["pipeline", *sys.argv[1:]]))
