"""Train until ready: is the DAE good enough for counterfactuals yet, and should training go on?

The training probe (:mod:`harness.evaluation.training_probe`) runs at every preview; a job's ``train.readiness``
(:class:`harness.config.schema.ReadinessConfig`) sets what the probe must show. :func:`assess_readiness` is a pure
function of the probe history and those thresholds:

- **ready**: the latest probe (the weights that would be exported) meets every threshold set;
- **missing**: one readable line per threshold it misses, e.g. ``z-usage at t=250 0.080 < 0.15``;
- **score**: ``-sum`` of each criterion's shortfall below its threshold (capped at 1, a figure that could not be
  measured counts 1): 0 exactly when ready, and never higher for a stricter threshold;
- **should_stop** and why: ``ready`` (with ``stop_when_ready``), ``budget spent`` (``train.total_samples``), or
  ``not improving for N probes`` (the score has not risen by ``min_delta`` over the best probe for ``patience``
  probes); neither of the first and last before ``min_samples``.

The model folder's ``readiness.json`` (:data:`READINESS_FILE`) holds the verdict of the exported weights;
:func:`read_readiness` and :func:`not_ready_text` let the report, the figures and the served explainer mark what
comes from a model that is not ready. No ranks, no MLflow: the trainer shares the decision between processes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.config.schema import ReadinessConfig

READINESS_FILE = "readiness.json"
READY, BUDGET_SPENT = "ready", "budget spent"
_UNMEASURED_SHORTFALL = 1.0  # a figure the probe could not compute (e.g. no CE could be made) counts as fully missing


@dataclass(frozen=True)
class Criterion:
    """One threshold: the probe figure ``key`` must reach ``threshold``; ``label`` names it for people."""

    key: str
    label: str
    threshold: float

    def shortfall(self, probe: Mapping[str, Any]) -> float:
        """How far ``probe`` falls below the threshold, in the figure's own units, capped at 1 (0 when met)."""
        value = _number(probe.get(self.key))
        if value is None:
            return _UNMEASURED_SHORTFALL
        return min(max(self.threshold - value, 0.0), _UNMEASURED_SHORTFALL)

    def missing(self, probe: Mapping[str, Any]) -> str | None:
        """A readable line when ``probe`` misses the threshold, else None."""
        value = _number(probe.get(self.key))
        if value is None:
            return f"{self.label} not measured (needs >= {self.threshold:g})"
        return None if value >= self.threshold else f"{self.label} {value:.3f} < {self.threshold:g}"


def _number(value: Any) -> float | None:
    """A finite float, or None for a figure that is absent, NaN or not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def criteria(thresholds: ReadinessConfig) -> list[Criterion]:
    """The thresholds a job set (null ones are not required), in the order the verdict lists them."""
    wanted = [(thresholds.z_usage_min, f"z_usage_t{thresholds.z_usage_t}", f"z-usage at t={thresholds.z_usage_t}"),
              (thresholds.ce_validity_min, "ce_validity", "probe CE validity"),
              (thresholds.floor_margin_min, "floor_margin", "held-out AUC margin over the raw-pixel floor")]
    return [Criterion(key, label, float(minimum)) for minimum, key, label in wanted if minimum is not None]


def readiness_score(probe: Mapping[str, Any], thresholds: ReadinessConfig) -> float:
    """``-sum`` of the capped shortfalls: 0 when every threshold is met, lower the more is missing."""
    return -sum(c.shortfall(probe) for c in criteria(thresholds))


@dataclass(frozen=True)
class ReadinessVerdict:
    """What :func:`assess_readiness` decided after the latest probe."""

    ready: bool
    missing: list[str]
    score: float  # of the latest probe (nan without any)
    best_index: int | None  # the probe with the best score (the first to reach it by min_delta)
    probes_since_best: int
    should_stop: bool
    stopped_because: str | None  # READY | BUDGET_SPENT | "not improving for N probes" | None (go on)
    samples_seen: int
    thresholds: dict[str, Any] = field(default_factory=dict)

    def record(self, history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The JSON written as ``readiness.json`` and into ``model.json``: the verdict and every probe."""
        best = None if self.best_index is None else dict(history[self.best_index])
        return {"ready": self.ready, "missing": list(self.missing), "stopped_because": self.stopped_because,
                "samples_seen": self.samples_seen, "score": self.score, "best_probe": best,
                "thresholds": self.thresholds, "history": [dict(probe) for probe in history]}


def assess_readiness(history: Sequence[Mapping[str, Any]], thresholds: ReadinessConfig, *, samples_seen: int,
                     total_samples: int) -> ReadinessVerdict:
    """The verdict after the probes in ``history`` (oldest first; dicts of probe figures) at ``samples_seen``.

    ``ready`` and ``missing`` judge the latest probe. Stopping: READY when ready, ``stop_when_ready`` and at least
    ``min_samples`` were seen; else BUDGET_SPENT once ``total_samples`` are seen; else "not improving for N probes"
    when the best score (improvements smaller than ``min_delta`` do not count) is ``patience`` or more probes old
    and at least ``min_samples`` were seen.
    """
    if samples_seen < 0 or total_samples <= 0:
        raise ValueError(f"assess_readiness: needs samples_seen >= 0 and total_samples > 0, got {samples_seen} / "
                         f"{total_samples}")
    scores = [readiness_score(probe, thresholds) for probe in history]
    best_index: int | None = None
    for index, score in enumerate(scores):
        if best_index is None or score > scores[best_index] + thresholds.min_delta:
            best_index = index
    latest = history[-1] if history else None
    missing = [line for c in criteria(thresholds) if (line := c.missing(latest)) is not None] if latest else \
        ["no probe has run yet"]
    ready = latest is not None and not missing
    since_best = 0 if best_index is None else len(history) - 1 - best_index
    old_enough = samples_seen >= thresholds.min_samples
    because: str | None = None
    if ready and thresholds.stop_when_ready and old_enough:
        because = READY
    elif samples_seen >= total_samples:
        because = BUDGET_SPENT
    elif (not ready and thresholds.patience is not None and since_best >= thresholds.patience and old_enough):
        because = f"not improving for {since_best} probe{'s' if since_best != 1 else ''}"
    thresholds_set = {c.key: c.threshold for c in criteria(thresholds)}
    return ReadinessVerdict(ready=ready, missing=missing, score=scores[-1] if scores else float("nan"),
                            best_index=best_index, probes_since_best=since_best, should_stop=because is not None,
                            stopped_because=because, samples_seen=samples_seen, thresholds=thresholds_set)


# ---------------------------------------------------------------------------------------------------------
# The model folder's verdict, for whatever shows a model's counterfactuals.
# ---------------------------------------------------------------------------------------------------------


def read_readiness(model_dir: str | Path) -> dict[str, Any] | None:
    """The verdict in ``<model_dir>/readiness.json``, or None when the model was not assessed (no file)."""
    path = Path(model_dir) / READINESS_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable readiness verdict ({err}); re-export the model") from err
    if not isinstance(record, dict) or not isinstance(record.get("ready"), bool | None) \
            or not isinstance(record.get("missing", []), list):
        raise ValueError(f"{path}: expected {{'ready': true|false, 'missing': [...]}}; re-export the model")
    return record


def not_ready_text(record: Mapping[str, Any] | None, prefix: str = "Model not ready") -> str | None:
    """``<prefix>: <missing>`` for a verdict that says not ready; None when ready or not assessed."""
    if record is None or record.get("ready") is not False:
        return None
    missing = "; ".join(str(line) for line in record.get("missing", [])) or "see readiness.json"
    return f"{prefix}: {missing}"


def readiness_tag(record: Mapping[str, Any] | None) -> str:
    """The MLflow tag ``readiness``: ``ready``, ``not ready`` or ``not assessed`` (readiness off)."""
    if record is None or record.get("ready") is None:
        return "not assessed"
    return "ready" if record["ready"] else "not ready"
