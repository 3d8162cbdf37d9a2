"""The evaluate stage (paper Table 4): ``run_evaluate(cfg)`` answers the test splits without retrieval, with
retrieval and by voting, and writes its folder (``cfg.layout.evaluate_dir``, default ``<run_dir>/eval/``:
predictions, metrics.json, report.md, plots).

- :mod:`.stage`: the Ray Data job (student + index in an actor pool), resume, failed rows;
- :mod:`.scoring`: one answer -> one prediction row; prediction rows -> a dataset's figures (``meddr_ray.metrics``);
- :mod:`.report`: metrics.json and report.md; :mod:`.figures`: the PNG plots, drawn in a Ray task;
- :mod:`.schema`: what they share: the prediction rows' schema, the rows of Table 4, the modes' titles.
"""

from meddr_ray.stages.evaluate.stage import run_evaluate

__all__ = ["run_evaluate"]
