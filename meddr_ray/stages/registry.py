"""The one table of stages: what the CLI offers, what the pipeline runs, and how each is found.

Every stage is a function ``run_<stage>(cfg) -> StageResult``. Modules are imported when a stage is used, so
``meddr-ray config show`` or ``--help`` never load Ray, torch or FAISS.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Tuple


@dataclass(frozen=True)
class StageResult:
    """What a stage returns to whoever ran it (the CLI, the pipeline, a job script, a test)."""

    path: str
    """Where it wrote: its output folder (or, for the index, the published version)."""
    summary: Dict[str, Any] = field(default_factory=dict)
    """Counts and timings, JSON-serialisable (also written next to the output where the stage keeps one)."""
    headline: str = ""
    """For a person: what was done, in the stage's words, starting with its name (``index: 624 vectors, ...``);
    a line, or a few. The CLI prints it; the pipeline reports it after each step."""


class StageNotBuilt(RuntimeError):
    """A registered stage whose module or function is missing from this install."""


@dataclass(frozen=True)
class Stage:
    name: str
    target: str
    """``module:function`` of the stage function."""
    help: str
    """One line for ``meddr-ray --help``."""
    depends_on: Tuple[str, ...] = ()
    """The config sections the stage's output depends on besides the step before it (the pipeline's
    fingerprint); empty for a stage that is not a pipeline step."""

    def load(self) -> Callable[..., StageResult]:
        module_name, func_name = self.target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                raise StageNotBuilt(f"stage {self.name!r} is not built yet (no module {module_name})") from exc
            raise
        func = getattr(module, func_name, None)
        if func is None:
            raise StageNotBuilt(f"stage {self.name!r} is not built yet ({module_name}.{func_name} is missing)")
        return func


STAGES: Dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("bootstrap", "meddr_ray.stages.bootstrap:run_bootstrap",
              "teacher writes reports for labelled images (Ray Data)", ("seed", "data", "teacher", "bootstrap")),
        Stage("instruct", "meddr_ray.stages.instruct:run_instruct",
              "build the instruction-tuning mix (Appendix A templates)", ("instruct",)),
        Stage("train", "meddr_ray.stages.train:run_train",
              "LoRA instruction tuning on Ray Train + DeepSpeed ZeRO-3", ("student", "train")),
        Stage("index", "meddr_ray.stages.index:run_index",
              "embed training images into a versioned FAISS index", ("index",)),
        Stage("evaluate", "meddr_ray.stages.evaluate:run_evaluate",
              "no-RAG / RAG / voting metrics on held-out data", ("evaluate", "rag")),
        Stage("pipeline", "meddr_ray.stages.pipeline:run_pipeline",
              "bootstrap -> instruct -> train -> index -> evaluate"),
    )
}  # fmt: skip
PIPELINE_STEPS = [name for name, stage in STAGES.items() if stage.depends_on]
"""The pipeline's steps in their default order."""
