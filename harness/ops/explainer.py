"""The served explainer's model: parse a request -> the counterfactual engine -> PNG answers (MLflow pyfunc).

Built and saved by :mod:`harness.ops.serving` (``dae-cf serve``); this module is what ``mlflow models serve``
runs. Request (``/invocations``), in any of MLflow's documented JSON forms, one image per row::

    {"dataframe_records": [{"image": "<base64 PNG>", "target_grade": 2}, {"image": [[0.0, 0.1, ...], ...]}],
     "params": {"target_grade": 3, "binary": true}}
    {"dataframe_split": {"columns": ["image", "target_grade"], "data": [["<base64 PNG>", 2]]}}
    {"inputs": {"image": ["<base64 PNG>", ...], "target_grade": [2, ...]}}      {"inputs": ["<base64 PNG>", ...]}

or, from Python, a pandas DataFrame with those columns. ``image`` is a base64 PNG (gray for 1-channel models, RGB
for 3-channel ones) or a nested array in [0, 1] of shape (H, W) or (C, H, W) at the model's size.
``target_grade`` (per row, or in ``params`` for every row without one) asks for a grade counterfactual. Answer
per image: ``predicted_class`` (side of the hyperplane), ``predicted_grade`` (calibrated; the class for tasks
without grades), ``distance`` (signed distance to the hyperplane, paper Eq. 3), ``probability``,
``ce_binary_png`` (the reflection of Eq. 4) and ``ce_grade_png`` (the image moved to ``target_grade``); with an
oracle packaged (a classifier that never saw a CE: the pipeline's DenseNet121 baseline or small CNN), ``oracle``
names it and ``oracle_target_probability`` / ``oracle_flipped`` give its probability of the binary CE's target
class and whether it puts the binary CE there (``oracle`` says "no oracle packaged" otherwise); a DAE whose
training judged it not ready (``readiness.json``) adds ``model_ready: false`` and ``model_missing``. A
malformed request is answered with HTTP 400 and a message naming the row and the problem, never the request's
own data; the server keeps serving. (A body that is not JSON at all never reaches the model: MLflow's scoring
server answers it and quotes it.)
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import threading
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

SETTINGS_VERSION = 1
INPUT_COLUMNS = ("image", "target_grade")
_GRAY_MODES = {"L": 255.0, "I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0}
_MODE_CHANNELS = {"1": 1, "L": 1, "I;16": 1, "I;16B": 1, "I;16L": 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4}


class InvalidRequest(ValueError):
    """A request the explainer cannot answer; the message names the row and the problem."""


class RefusedRequest(MlflowException):
    """An :class:`InvalidRequest` as MLflow's scoring server answers it (HTTP 400), with its message only.

    The server rewrites the message of every exception a prediction raises to ``Failed to predict data '<the
    request>'...``, which would send the request's images back to the client (and into every log on the way).
    The message is fixed when raised: later assignments are ignored.
    """

    @property
    def message(self) -> str:
        return self._refusal

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_refusal"):
            self._refusal = value


# ---------------------------------------------------------------------------------------------------------
# Request decoding and answer encoding (numpy / PIL only).
# ---------------------------------------------------------------------------------------------------------


def _png_to_array(text: str, where: str, image_size: int, channels: int) -> np.ndarray:
    """base64 PNG (optionally a ``data:`` URL) -> (C, S, S) float32 in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    payload = text.split(",", 1)[1] if text.startswith("data:") else text
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{where}: image string is not valid base64 (send a base64-encoded PNG)") from None
    try:
        image = Image.open(io.BytesIO(raw))  # lazy: only the header is read before the checks below
    except (UnidentifiedImageError, OSError):
        raise InvalidRequest(f"{where}: the decoded bytes are not an image (send a base64-encoded PNG)") from None
    except Image.DecompressionBombError:
        raise InvalidRequest(f"{where}: the image is far too large to decode") from None
    if image.size != (image_size, image_size):
        raise InvalidRequest(f"{where}: image is {image.size[0]}x{image.size[1]} pixels, the model takes "
                             f"{image_size}x{image_size}")
    kind, accepted = ("gray", (*_GRAY_MODES, "1")) if channels == 1 else ("RGB", ("RGB",))
    if image.mode not in accepted:
        found = _MODE_CHANNELS.get(image.mode)
        if found is not None and found != channels:
            raise InvalidRequest(f"{where}: image mode {image.mode!r} has {found} channel(s), the model takes "
                                 f"{channels} ({kind}); convert the image to {kind}")
        raise InvalidRequest(f"{where}: image mode {image.mode!r} is not supported; send an 8-bit "
                             f"{'or 16-bit ' if channels == 1 else ''}{kind} PNG")
    try:
        if image.mode == "1":
            image = image.convert("L")
        scale = _GRAY_MODES.get(image.mode, 255.0)
        array = np.asarray(image, dtype=np.float32) / scale  # (S, S) or (S, S, 3)
    except (OSError, ValueError) as error:  # truncated or corrupt pixel data behind a valid header
        raise InvalidRequest(f"{where}: image data cannot be decoded ({error})") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _check_values(array: np.ndarray, where: str) -> None:
    """Finite values in [0, 1]; the first non-finite value is named with its place."""
    finite = np.isfinite(array)
    if not finite.all():
        channel, row, column = (int(i) for i in np.argwhere(~finite)[0])
        value = float(array[channel, row, column])
        name = "NaN" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        raise InvalidRequest(f"{where}: image array values must be finite: found {name} at channel {channel}, "
                             f"pixel row {row}, column {column} ({int((~finite).sum())} non-finite value(s))")
    if array.min() < 0.0 or array.max() > 1.0:
        raise InvalidRequest(f"{where}: image array values must lie in [0, 1] (found {array.min():g}.."
                             f"{array.max():g}); send 8-bit images as PNG")


def _nested_to_array(value: Any, where: str, image_size: int, channels: int) -> np.ndarray:
    """Nested list / array in [0, 1], (H, W) or (C, H, W) -> (C, S, S) float32."""
    try:
        array = np.asarray(value.tolist() if isinstance(value, np.ndarray) else value, dtype=np.float32)
    except (TypeError, ValueError):
        raise InvalidRequest(f"{where}: image array is not a rectangular array of numbers") from None
    if array.ndim == 2:
        array = array[None]
    expected = f"({channels}, {image_size}, {image_size})" + (f" or ({image_size}, {image_size})" if channels == 1
                                                              else "")
    if array.ndim != 3:
        raise InvalidRequest(f"{where}: image array has shape {array.shape}, the model takes {expected}")
    if array.shape[1:] != (image_size, image_size):
        raise InvalidRequest(f"{where}: image array is {array.shape[-2]}x{array.shape[-1]} pixels, the model "
                             f"takes {image_size}x{image_size} (shape {expected})")
    if array.shape[0] != channels:
        raise InvalidRequest(f"{where}: image array has {array.shape[0]} channel(s), the model takes {channels} "
                             f"(shape {expected}, channels first)")
    _check_values(array, where)
    return array


def decode_image(value: Any, where: str, image_size: int, channels: int) -> np.ndarray:
    """One request image -> (C, S, S) float32 in [0, 1]; raises InvalidRequest naming ``where``."""
    if isinstance(value, np.ndarray) and value.ndim == 0:  # a numpy scalar, e.g. one string of an `inputs` array
        value = value.item()
    if isinstance(value, str):
        return _png_to_array(value.strip(), where, image_size, channels)
    if isinstance(value, (bytes, bytearray)):
        return _png_to_array(value.decode("ascii", "replace").strip(), where, image_size, channels)
    if isinstance(value, (list, tuple, np.ndarray)):
        return _nested_to_array(value, where, image_size, channels)
    raise InvalidRequest(f"{where}: image must be a base64-encoded PNG string or a nested array, "
                         f"got {type(value).__name__}")


def encode_png(image: np.ndarray) -> str:
    """(C, H, W) float in [-1, 1] -> base64 PNG (gray for C = 1, RGB for C = 3)."""
    from PIL import Image

    pixels = np.rint((np.clip(image, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)  # (C, H, W)
    pixels = pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _images_of(value: Any) -> list[Any]:
    """The images of an ``image`` column: one string (or numpy string), or a sequence / array of images."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (str, bytes)):
        return [value]
    if isinstance(value, (list, tuple, np.ndarray)):
        return list(value)
    raise InvalidRequest(f"'image' must be a base64-encoded PNG string or a list of images, "
                         f"got {type(value).__name__}")


def request_rows(model_input: Any) -> list[tuple[Any, Any]]:
    """(image, target_grade or None) per row, from a DataFrame, a column dict (MLflow's ``inputs`` /
    ``instances`` forms), a list / array of images or one image."""
    import pandas as pd

    if isinstance(model_input, dict):
        unknown = sorted(map(str, set(model_input) - set(INPUT_COLUMNS)))
        if unknown or "image" not in model_input:
            raise InvalidRequest(f"input fields must be {list(INPUT_COLUMNS)} (image required), "
                                 f"got {sorted(map(str, model_input))}")
        images = _images_of(model_input["image"])
        grades = model_input.get("target_grade")
        if isinstance(grades, np.ndarray) and grades.ndim == 0:
            grades = grades.item()
        grades = [grades] * len(images) if grades is None or np.isscalar(grades) else list(grades)
        if len(grades) != len(images):
            raise InvalidRequest(f"{len(images)} images but {len(grades)} target grades")
        return list(zip(images, grades, strict=True))
    if isinstance(model_input, pd.DataFrame):
        unknown = sorted(set(map(str, model_input.columns)) - set(INPUT_COLUMNS))
        if unknown or "image" not in model_input.columns:
            raise InvalidRequest(f"input columns must be {list(INPUT_COLUMNS)} (image required), got "
                                 f"{list(map(str, model_input.columns))}")
        grades = model_input["target_grade"] if "target_grade" in model_input else [None] * len(model_input)
        return list(zip(model_input["image"].tolist(), list(grades), strict=True))
    if isinstance(model_input, (str, bytes, list, np.ndarray)):
        return [(image, None) for image in _images_of(model_input)]
    raise InvalidRequest(f"unsupported input type {type(model_input).__name__}: send rows with an 'image' column")


def check_grade(value: Any, where: str, grade_range: tuple[int, int] | None) -> int:
    """A requested grade as int; InvalidRequest when not an integer in the calibration's range."""
    if grade_range is None:
        raise InvalidRequest(f"{where}: target_grade given, but this model's task has no grade calibration "
                             "(only binary counterfactuals)")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidRequest(f"{where}: target_grade must be a number, got {type(value).__name__}")
    low, high = grade_range
    number = float(value)
    if not math.isfinite(number) or number != round(number):
        raise InvalidRequest(f"{where}: target_grade {number:g} is not an integer grade; use one of {low}..{high}")
    if not low <= number <= high:
        raise InvalidRequest(f"{where}: target_grade {int(number)} is out of range: this model grades {low}..{high}")
    return int(number)


def read_settings(path: str | Path) -> dict[str, Any]:
    """The saved serving settings (``serving.json``), refused when written by another format version."""
    settings = json.loads(Path(path).read_text())
    if settings.get("format_version") != SETTINGS_VERSION:
        raise ValueError(f"serving settings format {settings.get('format_version')!r}, this code reads "
                         f"{SETTINGS_VERSION}; rebuild the explainer with `dae-cf serve`")
    return settings


# ---------------------------------------------------------------------------------------------------------
# The pyfunc model.
# ---------------------------------------------------------------------------------------------------------


class DAEExplainer(mlflow.pyfunc.PythonModel):
    """Grades images with a linear head on z_sem and renders their counterfactuals (Atad et al., Sec. 3.2-3.3)
    with the counterfactual engine (:class:`harness.method.counterfactual.CounterfactualEngine`)."""

    # MLflow would wrap ``predict`` to validate inputs against its type hints and, finding none, print a coloured
    # warning on every import (whatever the warning filters say); the model validates its inputs itself.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        """Rebuild the DAE and the head from the artifacts (safetensors, JSON): no pickled model is read."""
        from harness.method.autoencoder import DiffusionAutoencoder
        from harness.method.counterfactual import LOCAL_THRESHOLD, CounterfactualEngine
        from harness.method.heads import TaskResult

        self.settings = s = read_settings(context.artifacts["settings"])
        self.result = TaskResult.from_dict(json.loads(Path(context.artifacts["head"]).read_text()))
        device = os.environ.get("DAE_CF_SERVING_DEVICE") or None  # default: CUDA when present
        ae = DiffusionAutoencoder.load(context.artifacts["dae"], device=device, batch_size=s["batch_size"],
                                       invert_steps=s["invert_steps"], decode_steps=s["decode_steps"])
        self.engine = CounterfactualEngine(ae, self.result.head, self.result.calibration, self.result.direction,
                                           s["invert_steps"], s["decode_steps"], s.get("render", "decode"),
                                           s.get("local_threshold", LOCAL_THRESHOLD))
        self.oracle = None
        if "oracle" in context.artifacts:  # safetensors + spec, rebuilt here like the DAE
            from harness.evaluation.oracle import load_oracle
            from harness.ops.baseline import ORACLE_BUILDERS

            self.oracle = load_oracle(context.artifacts["oracle"], ORACLE_BUILDERS)
        from harness.evaluation.readiness import read_readiness  # the training's verdict, when it assessed one

        verdict = read_readiness(context.artifacts["dae"])
        self.not_ready = ({"model_ready": False, "model_missing": list(verdict["missing"])}
                          if verdict is not None and verdict["ready"] is False else {})
        self._lock = threading.Lock()  # one batch at a time on the network; requests queue here

    # ``model_input`` stays unannotated on purpose: MLflow reads a type hint there as the model's input schema.
    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Rows of images (and optional target grades) -> one answer dict per image (module docstring)."""
        try:
            return self.explain(model_input, params or {})
        except InvalidRequest as error:  # the scoring server answers these with HTTP 400
            raise RefusedRequest(str(error), error_code=INVALID_PARAMETER_VALUE) from None

    def _parse(self, model_input: Any, params: dict[str, Any]) -> tuple[np.ndarray, list[int | None]]:
        s, calibration = self.settings, self.result.calibration
        grade_range = None if calibration is None else (calibration.grade_min, calibration.grade_max)
        default_grade = params.get("target_grade")
        rows = request_rows(model_input)
        if not rows:
            raise InvalidRequest("the request holds no images")
        if len(rows) > s["max_images"]:
            raise InvalidRequest(f"{len(rows)} images in one request; this server takes at most "
                                 f"{s['max_images']}")
        images, targets, errors = [], [], []
        for index, (value, grade) in enumerate(rows):
            where = f"row {index}"
            try:
                images.append(decode_image(value, where, s["image_size"], s["channels"]))
                grade = default_grade if _is_missing(grade) else grade
                targets.append(None if _is_missing(grade) else check_grade(grade, where, grade_range))
            except InvalidRequest as error:
                errors.append(str(error))
        if errors:
            more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
            raise InvalidRequest("; ".join(errors[:5]) + more)
        return np.stack(images), targets  # (B, C, S, S) in [0, 1]

    def explain(self, model_input: Any, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Validate everything first, then encode + invert once and render every counterfactual in one batch."""
        import torch

        images, targets = self._parse(model_input, params)
        binary = bool(params.get("binary", True))
        engine, calibration = self.engine, self.result.calibration
        x = torch.from_numpy(images) * 2.0 - 1.0  # (B, C, S, S) in [-1, 1], the training range
        graded = [i for i, grade in enumerate(targets) if grade is not None]
        binary_ce, grade_ce = None, None
        with self._lock:
            if binary or graded:  # x_T (the costly inversion) is shared by every counterfactual of an image
                encoded = engine.encode(x)
                moves = [engine.binary_move(encoded)] if binary else []
                if graded:
                    moves.append(engine.grade_move(encoded, [targets[i] for i in graded], rows=graded))
                rendered = engine.render_moves(encoded, *moves)
                binary_ce = rendered[0].x_ce.numpy() if binary else None
                grade_ce = dict(zip(graded, rendered[-1].x_ce.numpy(), strict=True)) if graded else {}
                z = encoded.z  # (B, D)
            else:
                z = engine.ae.encode(x)
        z_np = z.double().numpy()
        head = self.result.head
        dist = head.decision(z_np)  # (B,) signed distance, Eq. 3
        predicted = head.predict(z_np)
        grades = calibration.grade(dist) if calibration is not None else predicted
        probability = head.probability(z_np)
        grade_ce = grade_ce or {}
        verdicts = self._oracle_verdicts(binary_ce, 1 - predicted, len(x))
        return [{
            "row": i, "task": self.result.task.name, "predicted_class": int(predicted[i]),
            "predicted_grade": int(grades[i]), "distance": float(dist[i]), "probability": float(probability[i]),
            "ce_binary_class": int(1 - predicted[i]) if binary else None,
            "ce_binary_png": encode_png(binary_ce[i]) if binary else None,
            "target_grade": targets[i],
            "ce_grade_png": encode_png(grade_ce[i]) if i in grade_ce else None, **verdicts[i],
            **getattr(self, "not_ready", {}),  # a model trained short of its readiness thresholds says so
        } for i in range(len(x))]

    def _oracle_verdicts(self, binary_ce: np.ndarray | None, target_class: np.ndarray, n: int) -> list[dict]:
        """Per image, the packaged oracle's verdict on its binary CE (B, C, S, S) aimed at ``target_class`` (B,):
        the oracle's name, its probability of the target class and whether it assigns the CE to it."""
        if self.oracle is None:
            return [{"oracle": "no oracle packaged", "oracle_target_probability": None, "oracle_flipped": None}] * n
        if binary_ce is None:
            return [{"oracle": self.oracle.name, "oracle_target_probability": None, "oracle_flipped": None}] * n
        import torch

        positive = self.oracle.probabilities(torch.from_numpy(binary_ce))  # (B,) P(positive class)
        target = np.where(target_class == 1, positive, 1.0 - positive)
        return [{"oracle": self.oracle.name, "oracle_target_probability": float(target[i]),
                 "oracle_flipped": bool(target[i] > 0.5)} for i in range(n)]
