"""Every choice made when fitting a linear head, in one type, the two named protocols and the calibration names.

:class:`HeadChoices` (protocol, standardize, class_weight, svm_solver, max_iter) is what a job fixes;
:class:`HeadOptions` adds one C and one calibration: the options of one fitted head, recorded in ``heads.json``.
A run file's ``heads:`` section is :class:`HeadsConfig` (HeadOptions plus the kinds, backend and tasks); the head
sweep's ``search:`` section (``harness.ops.sweep.SearchSpace``) is HeadChoices plus grids of kinds, C and
calibrations.

Protocols:

``project`` (the default)
    z_sem standardised before fitting, ``class_weight="balanced"``, the SVM is scikit-learn's ``LinearSVC``
    (liblinear: fast on 512-d latents), ``max_iter`` 5000, least-squares calibration. The project's
    experiments were run this way; every choice can be changed one key at a time.
``paper``
    What the paper's code does: raw z_sem, no class weights, ``SVC(kernel="linear")`` (libsvm, no iteration
    cap), least-squares distance -> grade calibration over all grades of the range. Evaluation also reports
    the AUC computed from hard 0/1 predictions (``auc_from_predictions``), which is how the paper's tables
    can be compared. The preset's keys are FIXED: an explicit key that disagrees with it is refused (a run
    called "paper" that is not the paper's protocol would be mislabelled); ``C`` stays free, and so does the
    calibration a sweep searches.

Calibrations are named ``extremes``, ``lstsq`` or ``poly<N>`` (N = 1..9) everywhere: job files, sweep grids,
heads files (:func:`parse_calibration` reads a name once).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, model_validator
from pydantic.dataclasses import dataclass

from harness.config.errors import require
from harness.config.fields import SECTION, Flag, Int, PositiveFloat, PositiveInt
from harness.config.task import Task

HEAD_KINDS = ("svm", "logistic", "linear")
PROTOCOLS = ("project", "paper")
SVM_SOLVERS = ("linear_svc", "svc_linear")  # sklearn LinearSVC (fast), SVC(kernel="linear") (the paper's)
BACKENDS = ("auto", "sklearn", "cuml")
NO_ITERATION_CAP = -1  # libsvm's own convention; LinearSVC / LogisticRegression need a number: UNCAPPED_ITER
UNCAPPED_ITER = 1_000_000
UNSET = "protocol"  # class_weight left to the protocol (null means "no class weights")
# svm_solver svc_linear (libsvm, SVC(kernel="linear")) on a CPU is refused above this many training rows: its time
# grows with the square of the rows (2 cores, 512-d: 12 s at 5k rows, 50 s at 10k, hours at 166k). The heads section
# and the sweep's job file set their own (max_rows_quadratic); harness.method.heads.check_quadratic_solver applies it.
MAX_ROWS_QUADRATIC = 20_000

_CALIBRATION = re.compile(r"^(extremes|lstsq|poly([1-9]))$")


def parse_calibration(name: str) -> tuple[str, int]:
    """``"extremes"`` -> ("extremes", 1), ``"lstsq"`` -> ("lstsq", 1), ``"poly3"`` -> ("poly", 3)."""
    match = _CALIBRATION.match(name) if isinstance(name, str) else None
    if not match:
        raise ValueError(f"calibration {name!r}: expected extremes, lstsq or poly<degree> (poly1..poly9)")
    return ("poly", int(match.group(2))) if match.group(2) else (name, 1)


def _calibration_name(name: str) -> str:
    parse_calibration(name)
    return name


CalibrationName = Annotated[str, AfterValidator(_calibration_name)]

# The values each protocol gives to the keys the user leaves out, and the keys it fixes.
PROTOCOL_DEFAULTS: dict[str, dict[str, Any]] = {
    "project": {"standardize": True, "class_weight": "balanced", "svm_solver": "linear_svc", "max_iter": 5000},
    "paper": {"standardize": False, "class_weight": None, "svm_solver": "svc_linear", "max_iter": NO_ITERATION_CAP},
}
PROTOCOL_FIXED: dict[str, tuple[str, ...]] = {
    "project": (),
    "paper": ("standardize", "class_weight", "svm_solver", "max_iter"),
}
PAPER_CALIBRATION = "lstsq"  # the job's one calibration under the paper protocol (a sweep searches its own)


def normalize_class_weight(value: Any) -> str | dict[int, float] | None:
    """``"balanced"`` | None (also ``"none"``) | a mapping ``{0: w_negative, 1: w_positive}`` with weights > 0.

    Mapping keys are the head's 0/1 targets (JSON turns them into "0"/"1"; both are accepted)."""
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
        return None
    if value == "balanced":
        return "balanced"
    if isinstance(value, dict):
        weights: dict[int, float] = {}
        for key, weight in value.items():
            try:
                target = int(key)
            except (TypeError, ValueError):
                target = -1
            if target not in (0, 1) or isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                    or not 0 < weight < float("inf"):
                raise ValueError(f"a mapping needs keys 0 (negative) and/or 1 (positive) with finite "
                                 f"weights > 0, got {value!r}")
            weights[target] = float(weight)
        return {target: weights.get(target, 1.0) for target in (0, 1)}  # a missing class keeps weight 1
    raise ValueError(f"balanced, none or a mapping {{0: w, 1: w}}, got {value!r}")


def _class_weight(value: Any) -> Any:
    return value if value == UNSET else normalize_class_weight(value)


def _max_iter(value: int) -> int:
    if value < 1 and value != NO_ITERATION_CAP:
        raise ValueError(f"an integer >= 1, or -1 for no cap, got {value}")
    return value


ClassWeight = Annotated[Any, BeforeValidator(_class_weight)]
MaxIter = Annotated[Int, AfterValidator(_max_iter)]
HeadKind = Literal[HEAD_KINDS]


@dataclass(frozen=True, config=SECTION)
class HeadChoices:
    """The fitting choices a job fixes for all its heads; None / ``"protocol"``: the protocol's value.

    After validation every choice holds its resolved value; under ``paper`` a given value that contradicts the
    protocol is refused."""

    protocol: Literal[PROTOCOLS] = "project"
    standardize: Flag | None = None  # project true, paper false
    class_weight: ClassWeight = UNSET  # balanced | none (null) | {0: w, 1: w}; project balanced, paper none
    svm_solver: Literal[SVM_SOLVERS] | None = None  # linear_svc (LinearSVC, fast) | svc_linear (the paper's)
    max_iter: MaxIter | None = None  # project 5000; paper -1 (no cap)

    @model_validator(mode="after")
    def _resolve(self) -> HeadChoices:
        defaults, problems = PROTOCOL_DEFAULTS[self.protocol], []
        for key, default in defaults.items():
            value = getattr(self, key)
            if value is None if key != "class_weight" else value == UNSET:
                object.__setattr__(self, key, default)
            elif key in PROTOCOL_FIXED[self.protocol] and value != default:
                problems.append((key, f"{value!r} contradicts protocol {self.protocol!r}, which fixes {key}="
                                      f"{default!r}; drop the key or use protocol: project"))
        require(problems)
        return self

    def choices(self) -> dict[str, Any]:
        """The resolved choices as keyword arguments (for a :class:`HeadOptions`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(HeadChoices)}


@dataclass(frozen=True, config=SECTION)
class HeadOptions(HeadChoices):
    """The options of one head: the job's choices, its regularisation C and its calibration."""

    C: PositiveFloat = 1.0
    calibration: CalibrationName = "lstsq"

    def estimator_max_iter(self, kind: str) -> int:
        """The ``max_iter`` handed to the estimator of ``kind``; the SVC solver understands -1 itself."""
        if self.max_iter != NO_ITERATION_CAP or (kind == "svm" and self.svm_solver == "svc_linear"):
            return self.max_iter
        return UNCAPPED_ITER

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(HeadOptions)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeadOptions:
        """Missing keys take the protocol's values; older records' ``calibration: poly`` + ``degree`` are read
        as ``poly<degree>``."""
        known = {f.name for f in dataclasses.fields(HeadOptions)}
        values = {k: v for k, v in _legacy_degree(dict(data)).items() if k in known}
        return cls(**values)


def _legacy_degree(values: dict[str, Any]) -> dict[str, Any]:
    """Config files written before the one calibration vocabulary carry ``degree`` (always 1 unless ``poly``)."""
    if "degree" in values:
        degree = values.pop("degree")
        if values.get("calibration") == "poly":
            values["calibration"] = f"poly{degree}"
        elif degree != 1:
            values["calibration"] = f"{values.get('calibration', 'lstsq')} with degree {degree}"  # refused below
    return values


DEFAULT_TASK = Task("fracture", "grade", (1, 2, 3), (), (0, 3))


@dataclass(frozen=True, config=SECTION)
class HeadsConfig(HeadOptions):
    """A run file's ``heads:`` section: linear heads fitted on z_sem and the distance-to-grade calibration.

    ``protocol`` gives the fitting choices left out (see this module's docstring); ``jobs/fit_heads.py`` infers
    the tasks from the labels when the job file names none. ``max_rows_quadratic``: the quadratic-time SVM solver
    (``svm_solver: svc_linear``, the paper protocol's) is refused on a CPU above this many training rows of a task,
    before any head is fitted (:data:`MAX_ROWS_QUADRATIC`, the head sweep's default too)."""

    kinds: Annotated[tuple[HeadKind, ...], Field(min_length=1)] = HEAD_KINDS
    backend: Literal[BACKENDS] = "auto"
    tasks: Annotated[tuple[Task, ...], Field(min_length=1)] = (DEFAULT_TASK,)
    max_rows_quadratic: PositiveInt = MAX_ROWS_QUADRATIC  # svm_solver svc_linear on a CPU: refused above this

    @model_validator(mode="before")
    @classmethod
    def _read_degree(cls, data: Any) -> Any:
        return _legacy_degree(dict(data)) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _check_heads(self) -> HeadsConfig:
        problems = []
        if self.protocol == "paper" and self.calibration != PAPER_CALIBRATION:
            problems.append(("calibration", f"{self.calibration!r} contradicts protocol 'paper', which fixes "
                                            f"calibration={PAPER_CALIBRATION!r}; drop the key or use protocol: "
                                            "project"))
        names = [task.name for task in self.tasks]
        if len(set(names)) != len(names):
            problems.append(("tasks", f"task names must be unique, got {names}"))
        require(problems)
        return self

    def options(self) -> HeadOptions:
        """The fitting options of this section's heads (without kinds, backend and tasks)."""
        return HeadOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(HeadOptions)})
