"""Where every artifact of a run lives: the one place that names them.

Every stage, the CLI, Serve and the tests ask :class:`RunLayout` for a path instead of joining folder names
themselves, so moving an artifact is a change here and nowhere else::

    <run_dir>/
      bootstrap/            part-*.parquet (reports), failed/ (rows the teacher could not read)
      instruct/             CURRENT (names the published mix), mix-<time>-<id>/ (part-*.parquet, failed/, manifest)
      train/<name>/         Ray Train's checkpoints (``train.storage_path``)
      adapter/              the trained LoRA adapter + meddr.json (``train.adapter_dir``)
      merged/               the adapter merged into the student (``train.merge``)
      index/                CURRENT, v0001/ ... (FAISS + values), failed/<version>.parquet
      eval/                 predictions/, failed/, metrics.json, report.md, plots
      pipeline.json         what the pipeline ran and reused

A stage's folder is ``<run_dir>/<stage>`` (``eval`` for evaluate) unless its section sets ``output_dir``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

from meddr_ray.storage import join_path

FAILED_DIR = "failed"
"""Inside a stage (or mix version) folder: the rows set aside as bad, with their errors."""
CURRENT_FILE = "CURRENT"
"""Inside a versioned folder (instruct, index): the name of the published version."""
ADAPTER_META_FILE = "meddr.json"
"""Inside an adapter folder: what it was trained from (base model, data, config, plan, history)."""
PREDICTIONS_DIR = "predictions"
"""Inside the evaluation folder: the answers, one Parquet file per batch."""
_FOLDER = {"evaluate": "eval"}
"""A stage whose folder is not named after it."""


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run. Build it with :meth:`of` from a resolved :class:`~meddr_ray.config.Config`."""

    run_dir: str
    output_dirs: Mapping[str, str]
    """Stage name -> its section's ``output_dir``, for the stages that set one."""
    adapter_override: Optional[str] = None
    """``train.adapter_dir`` when set."""
    checkpoints_override: Optional[str] = None
    """``train.storage_path`` when set."""

    @classmethod
    def of(cls, cfg) -> "RunLayout":
        output_dirs = {}
        for stage in ("bootstrap", "instruct", "train", "index", "evaluate"):
            explicit = getattr(getattr(cfg, stage, None), "output_dir", None)
            if explicit:
                output_dirs[stage] = explicit
        return cls(cfg.run_dir, output_dirs, cfg.train.adapter_dir, cfg.train.storage_path)

    def stage_dir(self, stage: str) -> str:
        """``<run_dir>/<stage>`` (``<run_dir>/eval`` for evaluate) unless the stage's ``output_dir`` is set."""
        return self.output_dirs.get(stage) or join_path(self.run_dir, _FOLDER.get(stage, stage))

    def failed_dir(self, stage: str) -> str:
        """The rows ``stage`` set aside (bootstrap, evaluate; the index keeps one file per version there)."""
        return join_path(self.stage_dir(stage), FAILED_DIR)

    @property
    def bootstrap_dir(self) -> str:
        return self.stage_dir("bootstrap")

    @property
    def instruct_dir(self) -> str:
        return self.stage_dir("instruct")

    @property
    def index_dir(self) -> str:
        return self.stage_dir("index")

    @property
    def evaluate_dir(self) -> str:
        return self.stage_dir("evaluate")

    @property
    def predictions_dir(self) -> str:
        return join_path(self.evaluate_dir, PREDICTIONS_DIR)

    @property
    def checkpoints_root(self) -> str:
        """Where Ray Train keeps this run's checkpoints: ``train.storage_path`` or ``<run_dir>/train``."""
        return self.checkpoints_override or join_path(self.run_dir, "train")

    @property
    def adapter_dir(self) -> str:
        """The trained adapter: ``train.adapter_dir`` or ``<run_dir>/adapter``."""
        return self.adapter_override or join_path(self.run_dir, "adapter")

    @property
    def merged_dir(self) -> str:
        return join_path(self.run_dir, "merged")

    @property
    def pipeline_summary(self) -> str:
        return join_path(self.run_dir, "pipeline.json")

    def index_failed_file(self, version: str) -> str:
        """The rows the index build ``version`` could not embed."""
        return join_path(self.index_dir, FAILED_DIR, f"{version}.parquet")
