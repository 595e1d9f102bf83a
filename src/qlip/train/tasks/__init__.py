"""The model families the one training loop trains, by the name the config's ``task:`` key gives.

A new family subclasses :class:`qlip.train.tasks.base.Task` and adds itself here (docs/training.md, "Adding a model
family").
"""

from __future__ import annotations

from .base import BatchSource, StepLosses, Task
from .generator import GeneratorTask
from .qlip import QLIPTask
from .unified import LMTask, UnifiedTask
from .vlm import VLMTask

TASKS: dict[str, type[Task]] = {"qlip": QLIPTask, "generator": GeneratorTask, "vlm": VLMTask, "lm": LMTask,
                                "unified": UnifiedTask}

__all__ = ["TASKS", "BatchSource", "GeneratorTask", "LMTask", "QLIPTask", "StepLosses", "Task", "UnifiedTask",
           "VLMTask"]
