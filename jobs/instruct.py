"""Ray job: the instruction-tuning mix of Appendix A.

    ray job submit --working-dir . -- python jobs/instruct.py --config tiny run_dir=/shared/runs/tiny

The same function as ``meddr-ray instruct``: re-submitting rebuilds the mix and swaps it in atomically.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from meddr_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    # The same parser, error handling and library function as `meddr-ray instruct`.
    sys.exit(main(["instruct", *sys.argv[1:]]))
