"""Ray job: embed the training images with the student's vision encoder into a versioned FAISS index.

    ray job submit --working-dir . -- python jobs/build_index.py --config tiny run_dir=/shared/runs/tiny
    ray job submit --working-dir . -- python jobs/build_index.py --config tiny --add new_cases.yaml

The same function as ``meddr-ray index``: a re-submitted build resumes from the embeddings already written;
``--add`` appends the cases of one source (a YAML mapping like an entry of ``index.sources``) as a new version.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from meddr_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    # The same parser, error handling and library function as `meddr-ray index`.
    sys.exit(main(["index", *sys.argv[1:]]))
