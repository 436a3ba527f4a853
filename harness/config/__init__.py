"""Typed, frozen, validated configuration: the lowest layer, importing nothing else of the harness.

One YAML file describes one complete run (no template chains); dotted command-line overrides such as
``--train.lr=1e-4`` adjust it. Loading (pydantic v2, :mod:`harness.config.loader`) refuses unknown keys,
ill-typed, non-finite and out-of-range values and impossible settings with one message naming every bad key.
The resolved config is written next to every checkpoint (``config.yaml``) and logged to MLflow.

Modules: ``schema`` (the run file's sections), ``task`` (the one task type), ``heads`` (the one head-options
type, protocols and calibration names), ``sizes`` (the named DAE architectures), ``loader`` (the one YAML
loader), ``messages`` (validation errors as ``key: problem``), ``fields`` (the shared value types).
"""

from harness.config.errors import ConfigError
from harness.config.heads import (
    HEAD_KINDS,
    NO_ITERATION_CAP,
    PROTOCOLS,
    UNCAPPED_ITER,
    CalibrationName,
    HeadChoices,
    HeadOptions,
    HeadsConfig,
    normalize_class_weight,
    parse_calibration,
)
from harness.config.loader import (
    dump_yaml,
    flatten,
    load_config,
    load_yaml,
    merge,
    parse_overrides,
    read_yaml,
    to_dict,
    validate,
)
from harness.config.schema import (
    CE_DIRECTIONS,
    CE_RENDERS,
    AugmentConfig,
    CounterfactualConfig,
    DataConfig,
    DiffusionConfig,
    EvalConfig,
    ModelConfig,
    RunConfig,
    TrackConfig,
    TrainConfig,
)
from harness.config.sizes import DAE_SIZES, DAESpec
from harness.config.task import Task

__all__ = [
    "CE_DIRECTIONS", "CE_RENDERS", "DAE_SIZES", "HEAD_KINDS", "NO_ITERATION_CAP", "PROTOCOLS", "UNCAPPED_ITER",
    "AugmentConfig", "CalibrationName", "ConfigError", "CounterfactualConfig", "DAESpec", "DataConfig",
    "DiffusionConfig", "EvalConfig", "HeadChoices", "HeadOptions", "HeadsConfig", "ModelConfig", "RunConfig", "Task",
    "TrackConfig", "TrainConfig", "dump_yaml", "flatten", "load_config", "load_yaml", "merge",
    "normalize_class_weight", "parse_calibration", "parse_overrides", "read_yaml", "to_dict", "validate",
]
