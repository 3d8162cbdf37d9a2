"""Ray job: diagnosis-guided bootstrapping (the teacher writes a report for every labelled image).

    ray job submit --working-dir . -- python jobs/bootstrap.py --config tiny run_dir=/shared/runs/tiny

The same function as ``meddr-ray bootstrap``: re-submitting the same command resumes where it stopped.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from meddr_ray.bootstrap import run_bootstrap  # noqa: E402
from meddr_ray.config import load_config  # noqa: E402
from meddr_ray.model import ensure_model  # noqa: E402
from meddr_ray.runtime import init_ray  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="preset name or YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = load_config(args.config, args.overrides)
    # A missing teacher checkpoint fails here, before any Ray work (tiny/smol are built once, here).
    ensure_model(cfg.teacher)
    init_ray(cfg)
    print(f"bootstrap: wrote {run_bootstrap(cfg)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
