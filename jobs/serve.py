"""Ray job: deploy the MedDr Serve application on the cluster and return; the application keeps running.

    ray job submit --working-dir . -- python jobs/serve.py --config demo run_dir=/shared/runs/demo

The same function as ``meddr-ray serve --detach``. The API token: the variable ``serve.auth_token_env`` names
(``MEDDR_SERVE_TOKEN``) must be set on the cluster's nodes or in the job's environment
(``--runtime-env-json '{"env_vars": {"MEDDR_SERVE_TOKEN": "..."}}'``); the application refuses to start without it.
Remove the application with ``serve shutdown`` or ``serve.delete("meddr")``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from meddr_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    # The same parser, error handling and library function as `meddr-ray serve`; a job deploys and returns.
    sys.exit(main(["serve", "--detach", *sys.argv[1:]]))
