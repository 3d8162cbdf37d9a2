"""Ray job: evaluate the student on held-out data without retrieval, with retrieval and by voting (paper Table 4).

    ray job submit --working-dir . -- python jobs/evaluate.py --config tiny run_dir=/shared/runs/tiny

The same function as ``meddr-ray evaluate``: a re-submitted job skips the rows already answered; the results are
``<run_dir>/eval/`` (predictions, metrics.json, report.md, plots).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from meddr_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    # The same parser, error handling and library function as `meddr-ray evaluate`.
    sys.exit(main(["evaluate", *sys.argv[1:]]))
