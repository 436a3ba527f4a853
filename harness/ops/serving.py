"""The served explainer: an MLflow pyfunc model answering "what grade, and how would this image look at grade k?".

    dae-cf serve --model runs/dae-demo/final --heads runs/eval-demo/heads.json \\
        --task fracture --kind svm --out runs/explainer-fracture [--register dae-cf-explainer]
        [--oracle runs/eval-demo/oracle | --no-oracle]
    mlflow models serve -m runs/explainer-fracture --env-manager local -h 127.0.0.1 -p 5001

The model folder bundles, as plain artifacts, the DAE (``ema.safetensors`` + ``config.yaml`` exported by
training), one task's head and calibration (``TaskResult.to_dict()`` JSON), the serving settings and, when the
pipeline saved one for the task, the CEs' oracle (``<eval.out_dir>/oracle/``: safetensors weights and their spec;
by default the ``oracle/`` folder beside ``--heads``), whose verdict on each counterfactual joins the answer.
Nothing of torch is pickled: the model (``harness.ops.explainer``) rebuilds the network from the artifacts and answers
each request with the counterfactual engine (``harness.method.counterfactual``), as evaluation does.

Every setting is checked here, when the explainer is built (task and kind present in the heads file, a heads
file of the right shape, positive step counts and sizes, a head that fits the DAE), so a built explainer does
not fail per request. Requests, answers and errors: see ``harness.ops.explainer``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

from harness.config import ConfigError

_MODEL_SCRIPT = (
    '"""Entry script of a saved dae-cf explainer: builds the model from code (nothing pickled)."""\n'
    "import mlflow.models\n\nfrom harness.ops.explainer import DAEExplainer\n\n"
    "mlflow.models.set_model(DAEExplainer())\n"
)
_REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "pillow", "safetensors", "pyyaml", "scikit-learn")


def __getattr__(name: str) -> Any:
    # Explainers saved before the model moved to harness.ops.explainer import it from here; loaded on demand so
    # that this module (and `dae-cf serve --help`) does not import MLflow.
    if name == "DAEExplainer":
        from harness.ops.explainer import DAEExplainer

        return DAEExplainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def signature() -> Any:
    """Params ``target_grade`` and ``binary``; no input schema, so that MLflow hands every documented request form
    (``dataframe_split`` / ``dataframe_records`` / ``inputs`` / ``instances``, a DataFrame) to the model as
    sent, and the model's own checks name what is wrong."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    params = ParamSchema([ParamSpec("target_grade", "double", None), ParamSpec("binary", "boolean", True)])
    return ModelSignature(inputs=None, params=params)


def _requirements() -> list[str]:
    """Pinned from this environment, so MLflow does not load the model to infer them."""
    return _pins(_REQUIREMENTS)


def _pins(names: tuple[str, ...]) -> list[str]:
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def check_build_options(invert_steps: int | None, decode_steps: int | None, batch_size: int,
                        max_images: int) -> None:
    """Step counts (None: the model's config), batch size and request size: positive integers, or ConfigError."""
    for flag, value, what in (("--invert-steps", invert_steps, "DDIM inversion steps"),
                              ("--decode-steps", decode_steps, "DDIM decoding steps")):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{flag} {value}: the number of {what} must be a positive integer; "
                              "leave the flag out to use the model's config value")
    for flag, value in (("--batch-size", batch_size), ("--max-images", max_images)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{flag} {value}: must be a positive integer")


def load_task_result(heads_path: str | Path, task: str, kind: str) -> Any:
    """The ``"task/kind"`` entry of a heads.json (as written by ``dae-cf pipeline`` / ``dae-cf heads``);
    ConfigError when the file is not JSON, not a heads file, or has no such head."""
    from harness.method.directions import DirectionError
    from harness.method.heads import TaskResult

    text = Path(heads_path).read_text()  # FileNotFoundError names the path
    try:
        heads = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"--heads {heads_path}: not a JSON file ({error.__class__.__name__} at line "
                          f"{getattr(error, 'lineno', '?')}); pass the heads.json written by dae-cf pipeline or "
                          "dae-cf heads") from None
    if not isinstance(heads, dict):
        raise ConfigError(f"--heads {heads_path}: expected an object of \"task/kind\" heads, got a JSON "
                          f"{type(heads).__name__}; pass the heads.json written by dae-cf pipeline or dae-cf heads")
    key = f"{task}/{kind}"
    if key not in heads:
        raise ConfigError(f"--task {task} --kind {kind}: {heads_path} has no head {key!r}; available: "
                          f"{sorted(heads)}")
    try:
        return TaskResult.from_dict(heads[key], where=f"{heads_path}: {key}")
    except DirectionError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
        raise ConfigError(f"--heads {heads_path}: entry {key!r} is not a fitted head ({error.__class__.__name__}: "
                          f"{error}); refit it with dae-cf heads") from None


def find_oracle(heads_path: str | Path, task: str, oracle_dir: str | Path | None, channels: int) -> Path | None:
    """The oracle folder to package: ``oracle_dir`` when given (it must hold an oracle of ``task`` taking
    ``channels`` channels, else ConfigError), else the pipeline's ``oracle/`` beside ``heads_path`` when it holds
    one of ``task`` (None otherwise: the answer then says no oracle was packaged)."""
    from harness.evaluation.oracle import load_oracle
    from harness.ops.baseline import ORACLE_BUILDERS

    explicit = oracle_dir is not None
    folder = Path(oracle_dir) if explicit else Path(heads_path).parent / "oracle"
    if not explicit and not folder.is_dir():
        return None
    if explicit and not folder.is_dir():
        raise ConfigError(f"--oracle {folder}: no such folder; pass the oracle/ folder of the pipeline's "
                          "eval.out_dir, or leave --oracle out")
    oracle = load_oracle(folder, ORACLE_BUILDERS)  # ConfigError naming the folder when it is not an oracle
    if oracle.task.name != task:
        if not explicit:
            return None  # the pipeline's oracle judges another task's CEs
        raise ConfigError(f"--oracle {folder}: judges task {oracle.task.name!r}, the explainer is for {task!r}; "
                          "pass that task's oracle or --no-oracle")
    if int(oracle.spec.get("in_channels", channels)) != channels:
        raise ConfigError(f"--oracle {folder}: takes {oracle.spec['in_channels']} channel(s), the DAE "
                          f"{channels}; they come from different data sets")
    return folder


def build_explainer(model_dir: str | Path, heads_path: str | Path, task: str, kind: str, out_dir: str | Path, *,
                    dataset: str | None = None, invert_steps: int | None = None, decode_steps: int | None = None,
                    batch_size: int = 16, max_images: int = 64, overwrite: bool = False,
                    oracle_dir: str | Path | None = None, package_oracle: bool = True) -> Path:
    """Save the pyfunc explainer for one task's head to ``out_dir`` (written beside it, then renamed), with the
    CEs' oracle packaged when :func:`find_oracle` finds one (``package_oracle=False``: never).

    Everything a request would otherwise trip over is checked first, before the DAE is loaded."""
    from harness.method.autoencoder import load_dae
    from harness.ops.explainer import SETTINGS_VERSION
    from harness.ops.registry import version_tags

    check_build_options(invert_steps, decode_steps, batch_size, max_images)
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
            raise ConfigError(f"--heads {heads_path}: head {task}/{kind} has dimension "
                              f"{len(result.head.hyperplane.normal)}, the DAE in {model_dir} has z_dim {z_dim}: "
                              "they come from different models")
        cf = config.counterfactual  # render and threshold were checked when the DAE's config loaded
        oracle = find_oracle(heads_path, task, oracle_dir, config.data.channels) if package_oracle else None
        oracle_record = None if oracle is None else json.loads((oracle / "oracle.json").read_text())
        settings = {
            "format_version": SETTINGS_VERSION, "dataset": dataset or Path(config.data.shard_dir).name,
            "task": task, "kind": kind, "image_size": config.data.image_size, "channels": config.data.channels,
            "invert_steps": config.diffusion.invert_steps if invert_steps is None else invert_steps,
            "decode_steps": config.diffusion.decode_steps if decode_steps is None else decode_steps,
            "batch_size": batch_size, "max_images": max_images, "dae": version_tags(model_dir),
            "render": cf.render, "local_threshold": cf.local_threshold, "direction": result.direction_name,
            "oracle": None if oracle_record is None else {k: oracle_record[k] for k in ("name", "test_auc")},
        }
        artifacts = {"dae": str(model_dir), "head": str(staging / "head.json"),
                     "settings": str(staging / "serving.json")}
        requirements = _requirements()
        if oracle is not None:
            artifacts["oracle"] = str(oracle)
            if oracle_record["spec"]["architecture"] == "densenet":
                requirements += _pins(("monai",))
        (staging / "head.json").write_text(json.dumps(result.to_dict(), indent=2, default=float))
        (staging / "serving.json").write_text(json.dumps(settings, indent=2))
        # Models from code: MLflow stores this script, not a pickled object, and runs it when loading.
        (staging / "explainer.py").write_text(_MODEL_SCRIPT)
        built = staging / "model"
        import mlflow.pyfunc

        with warnings.catch_warnings():  # the signature is explicit; MLflow's hints about type hints do not apply
            warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\..*")
            mlflow.pyfunc.save_model(
                path=str(built), python_model=str(staging / "explainer.py"), signature=signature(),
                pip_requirements=requirements, artifacts=artifacts,
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
    build.add_argument("--invert-steps", type=int, default=None,
                       help="DDIM inversion steps, >= 1 (default: the model's config)")
    build.add_argument("--decode-steps", type=int, default=None,
                       help="DDIM decoding steps, >= 1 (default: the model's config)")
    build.add_argument("--batch-size", type=int, default=16)
    build.add_argument("--max-images", type=int, default=64, help="largest request accepted")
    build.add_argument("--overwrite", action="store_true")
    judge = build.add_mutually_exclusive_group()
    judge.add_argument("--oracle", default=None, metavar="DIR",
                       help="the CEs' oracle to package (default: the oracle/ folder beside --heads, when it holds "
                            "one of --task)")
    judge.add_argument("--no-oracle", action="store_true", help="package no oracle")
    build.add_argument("--register", default=None, metavar="NAME", help="also log and register it as NAME")
    build.add_argument("--tracking-uri", default=None,
                       help="MLflow store for --register (default: $MLFLOW_TRACKING_URI, else the DAE run's sqlite)")
    args = parser.parse_args(argv)
    if args.register and args.tracking_uri:  # a wrong address or password fails before the explainer is built
        from harness.ops.tracking_server import check_tracking_server

        check_tracking_server(args.tracking_uri)
    out = build_explainer(args.model, args.heads, args.task, args.kind, args.out, dataset=args.dataset,
                          invert_steps=args.invert_steps, decode_steps=args.decode_steps, batch_size=args.batch_size,
                          max_images=args.max_images, overwrite=args.overwrite, oracle_dir=args.oracle,
                          package_oracle=not args.no_oracle)
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
