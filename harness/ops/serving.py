"""The served explainer: an MLflow pyfunc model answering "what grade, and how would this image look at grade k?".

    python -m harness.ops.serving build --model runs/dae-demo/final --heads runs/eval-demo/heads.json \\
        --task fracture --kind svm --out runs/explainer-fracture [--register dae-cf-explainer]
    mlflow models serve -m runs/explainer-fracture --env-manager local -h 127.0.0.1 -p 5001

The model folder bundles, as plain artifacts, the DAE (``ema.safetensors`` + ``config.yaml`` exported by
training), one task's head and calibration (``TaskResult.to_dict()`` JSON) and the serving settings. Nothing
of torch is pickled: ``load_context`` rebuilds the network from the artifacts with ``harness.method.autoencoder``.

Request (``/invocations``), one row per image::

    {"dataframe_records": [{"image": "<base64 PNG>", "target_grade": 2}, {"image": [[0.0, 0.1, ...], ...]}],
     "params": {"target_grade": 3, "binary": true}}

``image`` is a base64 PNG (gray for 1-channel models, RGB for 3-channel ones) or a nested array in [0, 1] of
shape (H, W) or (C, H, W) at the model's size. ``target_grade`` (per row, or in ``params`` for every row
without one) asks for a grade counterfactual. Answer per image: ``predicted_class`` (side of the hyperplane),
``predicted_grade`` (calibrated; the class for tasks without grades), ``distance`` (signed distance to the
hyperplane, paper Eq. 3), ``probability``, ``ce_binary_png`` (the reflection of Eq. 4) and ``ce_grade_png``
(the image moved to ``target_grade``). A malformed request is answered with HTTP 400 and a message naming
the row and the problem; the server keeps serving.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

SETTINGS_VERSION = 1
INPUT_COLUMNS = ("image", "target_grade")
_GRAY_MODES = {"L": 255.0, "I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0}
_MODE_CHANNELS = {"1": 1, "L": 1, "I;16": 1, "I;16B": 1, "I;16L": 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4}
_MODEL_SCRIPT = (
    '"""Entry script of a saved dae-cf explainer: builds the model from code (nothing pickled)."""\n'
    "import mlflow.models\n\nfrom harness.ops.serving import DAEExplainer\n\nmlflow.models.set_model(DAEExplainer())\n"
)
_REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "pillow", "safetensors", "pyyaml", "scikit-learn")


class InvalidRequest(ValueError):
    """A request the explainer cannot answer; the message names the row and the problem."""


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
    if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
        raise InvalidRequest(f"{where}: image array values must be finite and lie in [0, 1] (found "
                             f"{np.nanmin(array):g}..{np.nanmax(array):g}); send 8-bit images as PNG")
    return array


def decode_image(value: Any, where: str, image_size: int, channels: int) -> np.ndarray:
    """One request image -> (C, S, S) float32 in [0, 1]; raises InvalidRequest naming ``where``."""
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


def request_rows(model_input: Any) -> list[tuple[Any, Any]]:
    """(image, target_grade or None) per row, from a DataFrame, a column dict, a list of images or one image."""
    import pandas as pd

    if isinstance(model_input, dict):
        unknown = sorted(set(model_input) - set(INPUT_COLUMNS))
        if unknown or "image" not in model_input:
            raise InvalidRequest(f"input fields must be {list(INPUT_COLUMNS)} (image required), "
                                 f"got {sorted(model_input)}")
        images = model_input["image"]
        images = [images] if isinstance(images, str) else list(images)
        grades = model_input.get("target_grade")
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
    if isinstance(model_input, str):
        return [(model_input, None)]
    if isinstance(model_input, (list, np.ndarray)):
        return [(image, None) for image in model_input]
    raise InvalidRequest(f"unsupported input type {type(model_input).__name__}: send rows with an 'image' column")


def check_grade(value: Any, where: str, grade_range: tuple[int, int] | None) -> int:
    """A requested grade as int; InvalidRequest when not an integer in the calibration's range."""
    if grade_range is None:
        raise InvalidRequest(f"{where}: target_grade given, but this model's task has no grade calibration "
                             "(only binary counterfactuals)")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidRequest(f"{where}: target_grade must be a number, got {value!r}")
    low, high = grade_range
    number = float(value)
    if not math.isfinite(number) or number != round(number):
        raise InvalidRequest(f"{where}: target_grade {value!r} is not an integer grade; use one of {low}..{high}")
    if not low <= number <= high:
        raise InvalidRequest(f"{where}: target_grade {int(number)} is out of range: this model grades {low}..{high}")
    return int(number)


# ---------------------------------------------------------------------------------------------------------
# The pyfunc model.
# ---------------------------------------------------------------------------------------------------------


class DAEExplainer(mlflow.pyfunc.PythonModel):
    """Grades images with a linear head on z_sem and decodes their counterfactuals (Atad et al., Sec. 3.2-3.3)."""

    def load_context(self, context: Any) -> None:
        """Rebuild the DAE and the head from the artifacts (safetensors, JSON): no pickled model is read."""
        from harness.method.autoencoder import DiffusionAutoencoder
        from harness.method.heads import TaskResult

        self.settings = json.loads(Path(context.artifacts["settings"]).read_text())
        if self.settings.get("format_version") != SETTINGS_VERSION:
            raise ValueError(f"serving settings format {self.settings.get('format_version')!r}, "
                             f"this code reads {SETTINGS_VERSION}")
        self.result = TaskResult.from_dict(json.loads(Path(context.artifacts["head"]).read_text()))
        device = os.environ.get("DAE_CF_SERVING_DEVICE") or None  # default: CUDA when present
        self.ae = DiffusionAutoencoder.load(context.artifacts["dae"], device=device,
                                            batch_size=self.settings["batch_size"],
                                            invert_steps=self.settings["invert_steps"],
                                            decode_steps=self.settings["decode_steps"])
        self._lock = threading.Lock()  # one batch at a time on the network; requests queue here

    # ``model_input`` stays unannotated on purpose: MLflow reads a type hint there as the model's input schema.
    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Rows of images (and optional target grades) -> one answer dict per image (see module docstring)."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:
            return self.explain(model_input, params or {})
        except InvalidRequest as error:  # the scoring server answers these with HTTP 400
            raise MlflowException(str(error), error_code=INVALID_PARAMETER_VALUE) from None

    def _parse(self, model_input: Any, params: dict[str, Any]) -> tuple[np.ndarray, list[int | None]]:
        s, calibration = self.settings, self.result.calibration
        grade_range = None if calibration is None else (calibration.grade_min, calibration.grade_max)
        default_grade = params.get("target_grade")
        rows = request_rows(model_input)
        if not rows:
            raise InvalidRequest("the request holds no images")
        if len(rows) > s["max_images"]:
            raise InvalidRequest(f"{len(rows)} images in one request; this server takes at most {s['max_images']}")
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
        """Validate everything first, then encode + invert once and decode every counterfactual in one batch."""
        import torch

        from harness.method.counterfactual import (
            LOCAL_THRESHOLD,
            encode_for_counterfactuals,
            move_to_distance,
            reflect,
            render_counterfactuals,
        )

        images, targets = self._parse(model_input, params)
        binary = bool(params.get("binary", True))
        head, calibration, direction = self.result.head, self.result.calibration, self.result.direction
        x = torch.from_numpy(images) * 2.0 - 1.0  # (B, C, S, S) in [-1, 1], the training range
        graded = [i for i, grade in enumerate(targets) if grade is not None]
        with self._lock:
            if binary or graded:
                # The same path as the evaluation: encode and invert (the costly step) once per image; x_T holds
                # everything z_sem does not and is shared by all counterfactuals of the image.
                s = self.settings
                encoded = encode_for_counterfactuals(self.ae, x, s["invert_steps"], s["decode_steps"],
                                                     s.get("render", "decode"),
                                                     s.get("local_threshold", LOCAL_THRESHOLD))
                z = encoded.z  # (B, D)
            else:
                z = self.ae.encode(x)
            z_np = z.double().numpy()
            dist = head.decision(z_np)  # (B,) signed distance, Eq. 3
            latents, rows = [], []
            if binary:
                latents.append(reflect(z, head.hyperplane, direction))  # Eq. 4: dist -> -dist
                rows.append(torch.arange(len(x)))
            if graded:
                wanted = calibration.distance_for_grade(np.asarray([targets[i] for i in graded], dtype=np.float64))
                latents.append(move_to_distance(z[graded], head.hyperplane, torch.as_tensor(wanted, dtype=z.dtype),
                                                direction))
                rows.append(torch.as_tensor(graded, dtype=torch.long))
            decoded = None
            if latents:
                decoded = render_counterfactuals(self.ae, encoded, torch.cat(latents), torch.cat(rows)).numpy()
        predicted = head.predict(z_np)
        grades = calibration.grade(dist) if calibration is not None else predicted
        probability = head.probability(z_np)
        grade_images = dict(zip(graded, decoded[len(x) if binary else 0:], strict=True)) if graded else {}
        answers = []
        for i in range(len(x)):
            answers.append({
                "row": i, "task": self.result.task.name, "predicted_class": int(predicted[i]),
                "predicted_grade": int(grades[i]), "distance": float(dist[i]), "probability": float(probability[i]),
                "ce_binary_class": int(1 - predicted[i]) if binary else None,
                "ce_binary_png": encode_png(decoded[i]) if binary else None,
                "target_grade": targets[i],
                "ce_grade_png": encode_png(grade_images[i]) if i in grade_images else None,
            })
        return answers


# ---------------------------------------------------------------------------------------------------------
# Building, logging and registering.
# ---------------------------------------------------------------------------------------------------------


def signature() -> Any:
    """Columns ``image`` (any: string or array) and optional ``target_grade``; params ``target_grade``, ``binary``."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec(AnyType(), "image"), ColSpec(AnyType(), "target_grade", required=False)])
    params = ParamSchema([ParamSpec("target_grade", "double", None), ParamSpec("binary", "boolean", True)])
    return ModelSignature(inputs=inputs, params=params)


def _requirements() -> list[str]:
    """Pinned from this environment, so MLflow does not load the model to infer them."""
    pins = []
    for name in _REQUIREMENTS:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def load_task_result(heads_path: str | Path, task: str, kind: str) -> Any:
    """The ``"task/kind"`` entry of a heads.json (as written by ``harness.pipeline`` / ``jobs/fit_heads.py``)."""
    from harness.method.heads import TaskResult

    heads = json.loads(Path(heads_path).read_text())
    key = f"{task}/{kind}"
    if key not in heads:
        raise KeyError(f"{heads_path} has no head {key!r}; available: {sorted(heads)}")
    return TaskResult.from_dict(heads[key], where=f"{heads_path}: {key}")


def build_explainer(model_dir: str | Path, heads_path: str | Path, task: str, kind: str, out_dir: str | Path, *,
                    dataset: str | None = None, invert_steps: int | None = None, decode_steps: int | None = None,
                    batch_size: int = 16, max_images: int = 64, overwrite: bool = False) -> Path:
    """Save the pyfunc explainer for one task's head to ``out_dir`` (written beside it, then renamed)."""
    from harness.method.autoencoder import load_dae
    from harness.ops.registry import version_tags

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; choose another --out or pass --overwrite")
    result = load_task_result(heads_path, task, kind)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".tmp-{out_dir.name}-") as staging:
        staging = Path(staging)
        if str(model_dir).startswith(("models:/", "runs:/")):  # a registered DAE: fetch it once, bundle the files
            from mlflow.artifacts import download_artifacts

            model_dir = download_artifacts(artifact_uri=str(model_dir), dst_path=str(staging / "dae"))
        dae, spec = load_dae(model_dir)  # fails early, naming the folder, when weights or spec do not fit
        config = spec.run_config()
        z_dim = dae.spec.z_dim
        if len(result.head.hyperplane.normal) != z_dim:
            raise ValueError(f"head {task}/{kind} in {heads_path} has dimension {len(result.head.hyperplane.normal)},"
                             f" the DAE in {model_dir} has z_dim {z_dim}: they come from different models")
        settings = {
            "format_version": SETTINGS_VERSION, "dataset": dataset or Path(config.data.shard_dir).name,
            "task": task, "kind": kind, "image_size": config.data.image_size, "channels": config.data.channels,
            "invert_steps": invert_steps or config.diffusion.invert_steps,
            "decode_steps": decode_steps or config.diffusion.decode_steps,
            "batch_size": batch_size, "max_images": max_images, "dae": version_tags(model_dir),
            "render": config.counterfactual.render, "local_threshold": config.counterfactual.local_threshold,
            "direction": result.direction_name,
        }
        (staging / "head.json").write_text(json.dumps(result.to_dict(), indent=2, default=float))
        (staging / "serving.json").write_text(json.dumps(settings, indent=2))
        # Models from code: MLflow stores this script, not a pickled object, and runs it when loading.
        (staging / "explainer.py").write_text(_MODEL_SCRIPT)
        built = staging / "model"
        with warnings.catch_warnings():  # the signature is explicit; MLflow's hints about type hints do not apply
            warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\..*")
            mlflow.pyfunc.save_model(
                path=str(built), python_model=str(staging / "explainer.py"), signature=signature(),
                pip_requirements=_requirements(),
                artifacts={"dae": str(model_dir), "head": str(staging / "head.json"),
                           "settings": str(staging / "serving.json")},
                metadata={"task": task, "kind": kind, "dataset": settings["dataset"]})
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(built, out_dir)
    return out_dir


def register_explainer(built_dir: str | Path, name: str, tracking_uri: str | None = None,
                       experiment: str = "dae-cf-serving", store_dir: str | Path | None = None) -> str | None:
    """Log a built explainer folder to an MLflow run and register it as a version of ``name`` (alias candidate)."""
    from harness.config import TrackConfig
    from harness.ops.tracking import Tracker

    built_dir = Path(built_dir)
    settings = json.loads((built_dir / "artifacts" / "serving.json").read_text())
    tags = {"task": settings["task"], "kind": settings["kind"], "dataset": settings["dataset"],
            **{f"dae_{key}": str(value) for key, value in settings.get("dae", {}).items()
               if key in ("config_hash", "data_manifest_hash", "recon_mse")}}
    track = TrackConfig(tracking_uri=tracking_uri, experiment=experiment, registered_model=None)
    tracker = Tracker(track, store_dir or built_dir.parent, run_name=f"explainer-{settings['task']}-{settings['kind']}",
                      tags={"kind": "explainer"})
    try:
        version = tracker.register_model(built_dir, name, tags=tags, artifact_path="explainer",
                                         description="DAE counterfactual explainer (MLflow pyfunc)")
    finally:
        tracker.end()
    return version


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="save (and optionally register) an explainer for one task")
    build.add_argument("--model", required=True, help="exported DAE folder (<out_dir>/final) or MLflow model URI")
    build.add_argument("--heads", required=True, help="heads.json written by the pipeline or jobs/fit_heads.py")
    build.add_argument("--task", required=True, help="task name, e.g. fracture")
    build.add_argument("--kind", default="svm", help="head kind: svm, logistic or linear")
    build.add_argument("--out", required=True, help="output model folder (must not exist unless --overwrite)")
    build.add_argument("--dataset", default=None, help="dataset name recorded in the model (default: shard folder)")
    build.add_argument("--invert-steps", type=int, default=None, help="DDIM inversion steps (default: config)")
    build.add_argument("--decode-steps", type=int, default=None, help="DDIM decoding steps (default: config)")
    build.add_argument("--batch-size", type=int, default=16)
    build.add_argument("--max-images", type=int, default=64, help="largest request accepted")
    build.add_argument("--overwrite", action="store_true")
    build.add_argument("--register", default=None, metavar="NAME", help="also log and register it as NAME")
    build.add_argument("--tracking-uri", default=None,
                       help="MLflow store for --register (default: $MLFLOW_TRACKING_URI, else the DAE run's sqlite)")
    args = parser.parse_args(argv)
    out = build_explainer(args.model, args.heads, args.task, args.kind, args.out, dataset=args.dataset,
                          invert_steps=args.invert_steps, decode_steps=args.decode_steps, batch_size=args.batch_size,
                          max_images=args.max_images, overwrite=args.overwrite)
    print(f"explainer: {out}\nserve:     mlflow models serve -m {out} --env-manager local -h 127.0.0.1 -p 5001")
    if args.register:
        model_dir = Path(args.model)
        store = model_dir.parent if model_dir.is_dir() else out.parent  # default: beside the DAE run's own store
        version = register_explainer(out, args.register, args.tracking_uri, store_dir=store)
        print(f"registered: {args.register} v{version} (alias candidate)")
    return out


if __name__ == "__main__":
    from harness.cli import run_main

    sys.exit(run_main(main))
