"""Multi-task labels (``task: multitask``): each task's classes <-> one combined class index.

The data layer stores one *combined* label per image, the row-major index into the product of
the tasks' classes (``combined_index``). Splits stratify on it, caches and loaders batch it,
``classes.json`` names it (``mask=wear|gender=female|age=<30``); ``TaskLayout.split`` takes it
apart again for the task heads (``models.multitask``) and their losses (``engine.task``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from classlab.errors import ClassLabError
from classlab.run import TASKS, RunFolder

if TYPE_CHECKING:
    from classlab.config import Config

JOIN, ASSIGN = "|", "="


# ---------------------------------------------------------------------------------------------


def task_columns(cfg: Config) -> dict[str, str] | None:
    """task name -> manifest column for a multitask config (the column defaults to the task's name)."""
    if cfg.task != "multitask" or not cfg.model.tasks:
        return None
    return {name: head.column or name for name, head in cfg.model.tasks.items()}


def task_orders(cfg: Config) -> dict[str, list[str]] | None:
    """task name -> the class order its ``model.tasks.<task>.classes`` lists (tasks that give a count or nothing
    take their classes in natural order and are not named here)."""
    if cfg.task != "multitask" or not cfg.model.tasks:
        return None
    return {name: list(head.classes) for name, head in cfg.model.tasks.items() if isinstance(head.classes, list)}


def combined_names(task_classes: dict[str, list[str]]) -> list[str]:
    """Names of every combination, row-major (the last task varies fastest): ``mask=wear|gender=male``."""
    names = list(task_classes)
    return [
        JOIN.join(f"{n}{ASSIGN}{c}" for n, c in zip(names, combo))
        for combo in itertools.product(*task_classes.values())
    ]


def combined_index(task_classes: dict[str, list[str]], values: Iterable[Sequence[str]]) -> list[int]:
    """Each row's task values -> its combined label (mixed-radix number, first task most significant)."""
    lookups = [{c: i for i, c in enumerate(classes)} for classes in task_classes.values()]
    sizes = [len(c) for c in task_classes.values()]
    out = []
    for row in values:
        index = 0
        for lookup, size, value in zip(lookups, sizes, row):
            index = index * size + lookup[value]
        out.append(index)
    return out


@dataclass(frozen=True)
class TaskLayout:
    """The tasks of a run in config order: names, manifest columns, classes and loss weights."""

    names: tuple[str, ...]
    columns: tuple[str, ...]
    classes: tuple[tuple[str, ...], ...]
    weights: tuple[float, ...]

    @classmethod
    def from_config(cls, cfg: Config, task_classes: dict[str, list[str]]) -> TaskLayout:
        heads = cfg.model.tasks or {}
        for name, head in heads.items():
            found = len(task_classes[name])
            if isinstance(head.classes, int) and head.classes != found:  # a list was checked name by name
                raise ClassLabError(
                    f"model.tasks.{name}.classes={head.classes} but column '{head.column or name}' has {found} "
                    f"classes ({', '.join(task_classes[name])}); fix the number or the data"
                )
        return cls(
            names=tuple(heads),
            columns=tuple(h.column or n for n, h in heads.items()),
            classes=tuple(tuple(task_classes[n]) for n in heads),
            weights=tuple(float(h.weight) for h in heads.values()),
        )

    @classmethod
    def from_json(cls, obj: Any) -> TaskLayout:
        try:
            tasks = obj["tasks"]
            return cls(
                names=tuple(str(t["name"]) for t in tasks),
                columns=tuple(str(t["column"]) for t in tasks),
                classes=tuple(tuple(str(c) for c in t["classes"]) for t in tasks),
                weights=tuple(float(t["weight"]) for t in tasks),
            )
        except (KeyError, TypeError, ValueError):
            raise ClassLabError(
                f"{TASKS} is damaged: expected {{'tasks': [{{name, column, classes, weight}}]}}"
            ) from None

    def to_json(self) -> dict[str, Any]:
        return {
            "tasks": [
                {"name": n, "column": col, "classes": list(c), "weight": w}
                for n, col, c, w in zip(self.names, self.columns, self.classes, self.weights)
            ]
        }

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(c) for c in self.classes)

    @property
    def num_combined(self) -> int:
        n = 1
        for size in self.sizes:
            n *= size
        return n

    def combined_names(self) -> list[str]:
        return combined_names({n: list(c) for n, c in zip(self.names, self.classes)})

    def split(self, combined: torch.Tensor) -> list[torch.Tensor]:
        """Combined labels -> one label tensor per task (inverse of ``combined_index``)."""
        out = []
        rest = combined
        for size in reversed(self.sizes):
            out.append(rest % size)
            rest = torch.div(rest, size, rounding_mode="floor")
        return out[::-1]


def read_layout(run: RunFolder) -> TaskLayout:
    if not (run.path / TASKS).is_file():
        raise ClassLabError(f"multitask run '{run.path}' has no {TASKS}; it was not written by this version")
    return TaskLayout.from_json(run.read_json(TASKS))
