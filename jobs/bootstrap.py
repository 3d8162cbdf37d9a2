"""Ray job: diagnosis-guided bootstrapping (the teacher writes a report for every labelled image).

    ray job submit --working-dir . -- python jobs/bootstrap.py --config tiny run_dir=/shared/runs/tiny

The same function as ``meddr-ray bootstrap``: re-submitting the same command resumes where it stopped.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from meddr_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    # The same parser, error handling and library function as `meddr-ray bootstrap`.
    sys.exit(main(["bootstrap", *sys.argv[1:]]))
