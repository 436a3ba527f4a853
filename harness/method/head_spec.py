"""Every choice made when fitting a linear head, in one place, and the two named protocols.

The same :class:`HeadOptions` drives ``jobs/fit_heads.py``, the pipeline (through ``harness.evaluate``), the
sweep and the stored heads (``heads.json`` records each choice beside the hyperplane).

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
    called "paper" that is not the paper's protocol would be mislabelled); ``C`` stays free.

Only the standard library is imported here, so that loading a config pulls in nothing of the method.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

HEAD_KINDS = ("svm", "logistic", "linear")
PROTOCOLS = ("project", "paper")
SVM_SOLVERS = ("linear_svc", "svc_linear")  # sklearn LinearSVC (fast), SVC(kernel="linear") (the paper's)
CALIBRATION_KINDS = ("extremes", "lstsq", "poly")
NO_ITERATION_CAP = -1  # libsvm's own convention; LinearSVC / LogisticRegression need a number: UNCAPPED_ITER
UNCAPPED_ITER = 1_000_000

# The values each protocol gives to the keys the user leaves out.
PROTOCOL_DEFAULTS: dict[str, dict[str, Any]] = {
    "project": {"standardize": True, "class_weight": "balanced", "svm_solver": "linear_svc", "max_iter": 5000,
                "calibration": "lstsq", "degree": 1},
    "paper": {"standardize": False, "class_weight": None, "svm_solver": "svc_linear", "max_iter": NO_ITERATION_CAP,
              "calibration": "lstsq", "degree": 1},
}
# The keys a protocol fixes: explicit values that differ are refused. ``project`` fixes nothing.
PROTOCOL_FIXED: dict[str, tuple[str, ...]] = {
    "project": (),
    "paper": ("standardize", "class_weight", "svm_solver", "max_iter", "calibration", "degree"),
}


def normalize_class_weight(value: Any, where: str = "class_weight") -> str | dict[int, float] | None:
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
                    or weight <= 0:
                raise ValueError(f"{where}: a mapping needs keys 0 (negative) and/or 1 (positive) with weights > 0, "
                                 f"got {value!r}")
            weights[target] = float(weight)
        return {target: weights.get(target, 1.0) for target in (0, 1)}  # a missing class keeps weight 1
    raise ValueError(f"{where}: balanced, none or a mapping {{0: w, 1: w}}, got {value!r}")


@dataclass(frozen=True)
class HeadOptions:
    """The fitting choices of a head (see the module docstring for the protocols)."""

    protocol: str = "project"
    C: float = 1.0
    standardize: bool = True
    class_weight: Any = "balanced"  # "balanced" | None | {0: w, 1: w}
    svm_solver: str = "linear_svc"
    max_iter: int = 5000  # -1: no cap (SVC as is; UNCAPPED_ITER for the other solvers)
    calibration: str = "lstsq"
    degree: int = 1

    def __post_init__(self) -> None:
        problems = validate(self.__dict__)
        if problems:
            raise ValueError("; ".join(problems))
        object.__setattr__(self, "class_weight", normalize_class_weight(self.class_weight))

    @classmethod
    def resolve(cls, protocol: str = "project", given: dict[str, Any] | None = None,
                where: str = "heads") -> HeadOptions:
        """The protocol's values for every key not in ``given``; refuses given keys the protocol fixes otherwise."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"{where}.protocol: one of {list(PROTOCOLS)}, got {protocol!r}")
        given = dict(given or {})
        for key in PROTOCOL_FIXED[protocol]:
            if key in given and _canonical(key, given[key]) != _canonical(key, PROTOCOL_DEFAULTS[protocol][key]):
                raise ValueError(f"{where}.{key}: {given[key]!r} contradicts protocol {protocol!r}, which fixes "
                                 f"{key}={PROTOCOL_DEFAULTS[protocol][key]!r}; drop the key or use protocol: project")
        return cls(protocol=protocol, **{**PROTOCOL_DEFAULTS[protocol], **given})

    @classmethod
    def from_config(cls, heads: Any) -> HeadOptions:
        """From an object with these fields (``harness.config.HeadsConfig``, already resolved)."""
        return cls(**{name: getattr(heads, name) for name in cls.__dataclass_fields__ if hasattr(heads, name)})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeadOptions:
        """Missing keys take the project's defaults: heads files written before these options existed."""
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def estimator_max_iter(self, kind: str) -> int:
        """The ``max_iter`` handed to the estimator of ``kind``; the SVC solver understands -1 itself."""
        if self.max_iter != NO_ITERATION_CAP or (kind == "svm" and self.svm_solver == "svc_linear"):
            return self.max_iter
        return UNCAPPED_ITER


def _canonical(key: str, value: Any) -> Any:
    return normalize_class_weight(value) if key == "class_weight" else value


def validate(values: dict[str, Any], where: str = "heads") -> list[str]:
    """Problems with a set of option values, each naming its key (empty = fine)."""
    problems = []
    if values.get("protocol", "project") not in PROTOCOLS:
        problems.append(f"{where}.protocol: one of {list(PROTOCOLS)}, got {values['protocol']!r}")
    if "svm_solver" in values and values["svm_solver"] not in SVM_SOLVERS:
        problems.append(f"{where}.svm_solver: one of {list(SVM_SOLVERS)}, got {values['svm_solver']!r}")
    if "C" in values and not (isinstance(values["C"], (int, float)) and values["C"] > 0):
        problems.append(f"{where}.C: must be > 0, got {values['C']!r}")
    if "max_iter" in values and not (isinstance(values["max_iter"], int)
                                     and (values["max_iter"] >= 1 or values["max_iter"] == NO_ITERATION_CAP)):
        problems.append(f"{where}.max_iter: an integer >= 1, or -1 for no cap, got {values['max_iter']!r}")
    if "standardize" in values and not isinstance(values["standardize"], bool):
        problems.append(f"{where}.standardize: true or false, got {values['standardize']!r}")
    if "calibration" in values and values["calibration"] not in CALIBRATION_KINDS:
        problems.append(f"{where}.calibration: one of {list(CALIBRATION_KINDS)}, got {values['calibration']!r}")
    if "degree" in values and (not isinstance(values["degree"], int) or values["degree"] < 1
                               or (values.get("calibration", "poly") != "poly" and values["degree"] != 1)):
        problems.append(f"{where}.degree: 1 for extremes/lstsq, >= 1 for poly, got {values['degree']!r}")
    if "class_weight" in values:
        try:
            normalize_class_weight(values["class_weight"], f"{where}.class_weight")
        except ValueError as error:
            problems.append(str(error))
    return problems
