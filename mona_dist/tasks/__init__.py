"""Task registry: `TASKS.get(name)` -> a `Task` instance ("cls" | "seg" | "coco" | "voc").

Task modules are imported on first use, so a classification run never imports mmseg or pycocotools. A new task is
one module with a `@register_task("name")` class plus one line in `TASK_MODULES` (and in `TASK_EXTRAS` if it needs
an optional extra of pyproject.toml: asking for it without the extra installed is then one line naming the extra).
"""

from __future__ import annotations

import importlib

from mona_dist.extras import require
from mona_dist.registry import Registry
from mona_dist.tasks.base import NoHeadOptions, Task, register_task

TASK_MODULES = {
    "cls": "mona_dist.tasks.cls",
    "seg": "mona_dist.tasks.seg",
    "coco": "mona_dist.tasks.coco",
    "voc": "mona_dist.tasks.voc",
}
TASK_EXTRAS = {"seg": "seg", "coco": "det", "voc": "det"}  # task -> the extra its module needs (mona_dist/extras.py)


class TaskRegistry(Registry[Task]):
    """A Registry that imports a task's module the first time the task is asked for."""

    def get(self, name: str) -> Task:
        if name not in self._items and name in TASK_MODULES:
            if name in TASK_EXTRAS:
                require(f"task {name}", TASK_EXTRAS[name])  # before the module's own imports fail on it
            importlib.import_module(TASK_MODULES[name])
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted({*self._items, *TASK_MODULES})


TASKS: TaskRegistry = TaskRegistry("task")

__all__ = ["TASKS", "TASK_EXTRAS", "TASK_MODULES", "NoHeadOptions", "Task", "TaskRegistry", "register_task"]
