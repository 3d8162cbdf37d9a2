"""Ray job: the whole pipeline. ``ray job submit --working-dir . -- python jobs/pipeline.py --config tiny``."""

import sys

from meddr_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
