"""The one task type: a label column and the rule for which of its values are positive.

Used everywhere a task appears: a run file's ``heads.tasks``, the head sweep's and the baseline's job files
(which add their own keys on top of it), the fitted heads (recorded in ``heads.json``) and inferred tasks.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import numpy as np
from pydantic import BeforeValidator, Field, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from harness.config.errors import ConfigError, require
from harness.config.fields import SECTION, Int, Name
from harness.config.messages import problems_of


def _none_is_empty(value: Any) -> Any:
    return () if value is None else value  # heads.json files written before read "all others" as null


LabelValues = Annotated[tuple[Int, ...], Field(min_length=1)]


def rule_problems(positives: tuple[int, ...], negatives: tuple[int, ...]) -> list[tuple[str, str]]:
    """The checks of a positives / negatives rule (a task's own, or a sweep's fitting rule)."""
    if overlap := sorted(set(positives) & set(negatives)):
        return [("negatives", f"values {overlap} are both positive and negative")]
    return []


def rule_name(positives: tuple[int, ...], negatives: tuple[int, ...]) -> str:
    """e.g. ``"2,3 vs 0"`` or ``"1,2,3 vs rest"``."""
    return f"{','.join(map(str, positives))} vs {','.join(map(str, negatives)) if negatives else 'rest'}"


@dataclass(frozen=True, config=SECTION)
class Task:
    """A detection task: a label column plus the values counted as positive (and, optionally, negative).

    ``negatives`` empty means every other labelled value. The paper's noisy-label rule is ``positives=(2, 3),
    negatives=(0,)``: grade 1 rows are left out of fitting. ``grade_range`` (e.g. (0, 3)) enables the
    distance -> grade calibration on the same column. ``class_names`` (negative, positive) name the classes in
    figures and CE rows (None: the run's ``eval.class_names``).
    """

    name: Name
    column: Name
    positives: LabelValues
    negatives: Annotated[tuple[Int, ...], BeforeValidator(_none_is_empty)] = ()
    grade_range: tuple[Int, Int] | None = None
    class_names: tuple[str, str] | None = None

    @model_validator(mode="after")
    def _check(self) -> Task:
        problems = rule_problems(self.positives, self.negatives)
        if self.grade_range is not None and self.grade_range[0] >= self.grade_range[1]:
            problems.append(("grade_range", f"must be [low, high] with low < high, got {list(self.grade_range)}"))
        require(problems)
        return self

    @property
    def rule(self) -> str:
        """The label rule in words, e.g. ``"2,3 vs 0"``."""
        return rule_name(self.positives, self.negatives)

    def binary_targets(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mask of rows used, 0/1 targets of those rows); missing (NaN) labels are never used."""
        labels = np.asarray(labels).reshape(-1)  # (N,)
        present = ~np.isnan(labels) if np.issubdtype(labels.dtype, np.floating) else np.ones(len(labels), bool)
        positive = np.isin(labels, self.positives) & present
        negative = (np.isin(labels, self.negatives) if self.negatives else ~positive) & present
        mask = positive | negative
        return mask, positive[mask].astype(np.int64)

    def definition(self) -> Task:
        """This task as a plain :class:`Task` (a job's task type adds its own keys on top of it)."""
        if type(self) is Task:
            return self
        return Task(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Task)})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (lists), as recorded in ``heads.json``."""
        return {f.name: (list(value) if isinstance(value := getattr(self, f.name), tuple) else value)
                for f in dataclasses.fields(Task)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "task") -> Task:
        """A task record (``heads.json``; older files wrote ``negatives: null`` and no ``class_names``)."""
        try:
            return _TASK.validate_python(data)
        except ValidationError as error:
            raise ConfigError(f"{where}: " + "; ".join(problems_of(error, Task))) from None


_TASK = TypeAdapter(Task)
