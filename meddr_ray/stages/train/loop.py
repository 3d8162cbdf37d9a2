"""The function each Ray Train worker runs: :class:`~meddr_ray.stages.train.recipe.InstructionTuningRecipe`,
set up, restored and trained."""

from __future__ import annotations

from typing import Any, Dict

from meddr_ray.stages.train.recipe import InstructionTuningRecipe


def train_loop_per_worker(loop_config: Dict[str, Any]) -> None:
    """Ray Train entry point; ``loop_config`` as :class:`InstructionTuningRecipe` describes it."""
    recipe = InstructionTuningRecipe(loop_config)
    recipe.setup()
    recipe.restore()
    recipe.train()
