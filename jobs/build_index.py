"""Ray job: embed the training images with the student's vision encoder into a versioned FAISS index.

    ray job submit --working-dir . -- python jobs/build_index.py --config tiny run_dir=/shared/runs/tiny
    ray job submit --working-dir . -- python jobs/build_index.py --config tiny --add new_cases.yaml

The same function as ``meddr-ray index``: a re-submitted build resumes from the embeddings already written;
``--add`` appends the cases of one source (a YAML mapping like an entry of ``index.sources``) as a new version.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from meddr_ray.config import load_config  # noqa: E402
from meddr_ray.index import run_index  # noqa: E402
from meddr_ray.runtime import init_ray  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="preset name or YAML file")
    parser.add_argument("--add", metavar="SOURCE_YAML", help="append the cases of this source as a new version")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = load_config(args.config, args.overrides)
    init_ray(cfg)
    print(f"index: wrote {run_index(cfg, add_source=args.add)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
