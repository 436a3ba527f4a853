"""Model registry: what every registered DAE version carries, and promotion from candidate to champion.

    python -m harness.ops.registry promote --name dae-cf-phantoms --version 3 [--tracking-uri URI]
    python -m harness.ops.registry tag --name dae-cf-phantoms --version 3 fracture/svm/auc=0.93
    python -m harness.ops.registry show --name dae-cf-phantoms

Every version registered through ``harness.ops.tracking.Tracker.register_model`` is tagged with the hash of its
configuration, the hash of the data manifest it was trained on and its reconstruction metrics, and receives
the alias ``candidate`` (which therefore always names the newest version). ``promote`` moves the alias
``champion`` to a version only when none of its benchmark metrics is worse than the current champion's:
reconstruction MSE may not rise, and no AUC tag (added by ``tag`` after an evaluation) may fall.

The hashing and comparison helpers are plain Python; MLflow is imported only by the functions that talk to
a registry, so ``harness.ops.tracking`` can use them without a cycle.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.config import read_yaml
from harness.fileio import canonical_sha256, sha256_file
from harness.fingerprint import manifest_hash  # noqa: F401  (re-exported: registry.manifest_hash)
from harness.ops.tracking_server import check_tracking_server, tracking_errors

CANDIDATE = "candidate"
CHAMPION = "champion"
# Fields that say where a run writes or logs, not what it trains: two runs differing only here share a hash.
_LOCATION_KEYS = (("train", "out_dir"), ("eval", "out_dir"), ("track",))


# ---------------------------------------------------------------------------------------------------------
# Version tags.
# ---------------------------------------------------------------------------------------------------------


_canonical_sha256 = canonical_sha256


def config_hash(config_path: str | Path) -> str:
    """Hash of a resolved ``config.yaml``, ignoring output folders and tracking settings."""
    tree = read_yaml(config_path)
    for keys in _LOCATION_KEYS:
        node = tree
        for key in keys[:-1]:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(keys[-1], None)
    return _canonical_sha256(tree)


def version_tags(model_dir: str | Path) -> dict[str, str]:
    """Registry tags of an exported model folder (``config.yaml`` + ``model.json``): whatever of them exists.

    ``config_hash``, ``data_manifest_hash`` (``"missing"`` when the shard folder named by the config has no
    manifest here), ``model_size`` and the reconstruction metrics ``recon_mse`` / ``final_loss``.
    """
    model_dir = Path(model_dir)
    tags: dict[str, str] = {}
    weights = model_dir / "ema.safetensors"
    if weights.is_file():  # identical weights registered twice reuse one version (Tracker.register_model)
        tags["weights_sha256"] = sha256_file(weights)
    config_path = model_dir / "config.yaml"
    if config_path.is_file():
        tags["config_hash"] = config_hash(config_path)
        config = read_yaml(config_path)
        shard_dir = (config.get("data") or {}).get("shard_dir")
        digest = manifest_hash(shard_dir) if shard_dir else None
        tags["data_manifest_hash"] = digest or "missing"
        if shard_dir:
            tags["data_shard_dir"] = str(shard_dir)
    summary_path = model_dir / "model.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        for key in ("recon_mse", "final_loss"):
            if isinstance(summary.get(key), (int, float)):
                tags[key] = f"{float(summary[key]):.6g}"
        if summary.get("size"):
            tags["model_size"] = str(summary["size"])
    return tags


# ---------------------------------------------------------------------------------------------------------
# Benchmark comparison (pure).
# ---------------------------------------------------------------------------------------------------------


def metric_direction(tag: str) -> str | None:
    """``"lower"`` for reconstruction MSE tags, ``"higher"`` for AUC tags, None for tags that are no metric.

    Recognised names: ``recon_mse`` (also as the last part of ``a/b/recon_mse``), and any name whose last
    ``/``- or ``.``-separated part is ``auc``, starts with ``auc_`` or ends with ``_auc``.
    """
    last = re.split(r"[/.]", tag.lower())[-1]
    if last == "recon_mse" or tag.lower() in ("recon/mse", "recon.mse"):
        return "lower"
    if last == "auc" or last.startswith("auc_") or last.endswith("_auc"):
        return "higher"
    return None


def benchmark_metrics(tags: dict[str, str]) -> dict[str, float]:
    """The tags that are benchmark metrics, as floats (unparsable values become NaN, which never wins)."""
    out: dict[str, float] = {}
    for name, value in tags.items():
        if metric_direction(name) is None:
            continue
        try:
            out[name] = float(value)
        except (TypeError, ValueError):
            out[name] = math.nan
    return out


@dataclass
class PromotionDecision:
    """Whether a version may become champion, and every reason that decided it."""

    promote: bool
    reasons: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        verdict = "promote" if self.promote else "refuse"
        return f"{verdict}: " + "; ".join(self.reasons)


def compare_to_champion(candidate: dict[str, str], champion: dict[str, str] | None,
                        candidate_label: str = "candidate", champion_label: str = "champion") -> PromotionDecision:
    """Decide from two versions' tags.

    Refused when a metric the champion has is missing on the candidate, not finite, or worse; metrics only the
    candidate has are listed but not compared. Equal values pass: "not worse" is the rule.
    """
    mine = benchmark_metrics(candidate)
    theirs = benchmark_metrics(champion or {})
    if not theirs:  # nothing to be worse than: the candidate only has to bring valid metrics of its own
        why = "no current champion" if champion is None else f"the {champion_label} has no benchmark metric tags"
        if not mine:
            return PromotionDecision(False, [why, f"{candidate_label} has no benchmark metric tags (recon_mse, *auc)"])
        bad = sorted(name for name, value in mine.items() if not math.isfinite(value))
        if bad:
            return PromotionDecision(False, [why, f"{candidate_label} has non-finite metrics {bad}"])
        return PromotionDecision(True, [why, f"{candidate_label} has "
                                        + ", ".join(f"{k}={v:.6g}" for k, v in sorted(mine.items()))])
    reasons, worse = [], False
    for name in sorted(set(theirs) | set(mine)):
        direction = metric_direction(name)
        ours, reference = mine.get(name), theirs.get(name)
        if reference is None:
            reasons.append(f"{name}: {ours:.6g} (the {champion_label} has none; not compared)")
        elif ours is None or not math.isfinite(ours):
            worse = True
            state = "missing" if ours is None else "not a finite number"
            reasons.append(f"{name}: {state} on {candidate_label}, the {champion_label} has {reference:.6g}")
        else:
            # A non-finite champion value cannot block a valid one.
            ok = not math.isfinite(reference) or (ours <= reference if direction == "lower" else ours >= reference)
            symbol = {("lower", True): "<=", ("lower", False): ">", ("higher", True): ">=",
                      ("higher", False): "<"}[(direction, ok)]
            reasons.append(f"{name}: {ours:.6g} {symbol} {reference:.6g} ({direction} is better)"
                           + ("" if ok else ", worse"))
            worse |= not ok
    return PromotionDecision(not worse, reasons)


# ---------------------------------------------------------------------------------------------------------
# Registry operations (MLflow).
# ---------------------------------------------------------------------------------------------------------


def registry_client(tracking_uri: str | None = None) -> Any:
    """An ``MlflowClient`` for ``tracking_uri`` (default $MLFLOW_TRACKING_URI); the registry uses the same store.

    A server is asked once first: one that does not answer or refuses the credentials raises
    ``TrackingAccessError`` (one line) before any work."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ValueError("no tracking URI: pass --tracking-uri (e.g. sqlite:///runs/dae-demo/mlruns.db or "
                         "http://127.0.0.1:5000) or set MLFLOW_TRACKING_URI")
    check_tracking_server(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _alias_version(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def promote(client: Any, name: str, version: str | int) -> PromotionDecision:
    """Move alias ``champion`` of model ``name`` to ``version`` if its benchmark tags are not worse."""
    version = str(version)
    candidate = client.get_model_version(name, version)  # raises with MLflow's message when absent
    current = _alias_version(client, name, CHAMPION)
    if current is not None and str(current.version) == version:
        return PromotionDecision(True, [f"version {version} already is the {CHAMPION}"])
    decision = compare_to_champion(candidate.tags, None if current is None else current.tags,
                                   f"version {version}", f"{CHAMPION} version {getattr(current, 'version', '-')}")
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, version)
        client.set_model_version_tag(name, version, "promoted_at", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        if current is not None:
            client.set_model_version_tag(name, version, "previous_champion", str(current.version))
    return decision


def add_benchmark_tags(client: Any, name: str, version: str | int, metrics: dict[str, float]) -> None:
    """Record evaluation results on a version (e.g. ``{"fracture/svm/auc": 0.93}``) for later promotion."""
    for key, value in metrics.items():
        if metric_direction(key) is None:
            raise ValueError(f"{key!r} is not a benchmark metric name (recon_mse, or a name ending in auc)")
        client.set_model_version_tag(name, str(version), key, f"{float(value):.6g}")


def describe(client: Any, name: str) -> list[dict[str, Any]]:
    """One row per version: version, aliases, run, benchmark metrics; newest first."""
    versions = client.search_model_versions(f"name='{name}'")
    aliases: dict[str, list[str]] = {}
    for alias, version in (client.get_registered_model(name).aliases or {}).items():  # search omits aliases
        aliases.setdefault(str(version), []).append(alias)
    rows = [{"version": v.version, "aliases": sorted(aliases.get(str(v.version), [])), "run_id": v.run_id,
             **benchmark_metrics(v.tags)} for v in versions]
    return sorted(rows, key=lambda row: int(row["version"]), reverse=True)


def _parse_metric(text: str) -> tuple[str, float]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: value is not a number") from None


def main(argv: list[str] | None = None) -> int:
    """Command line; returns 0 on success, 1 when a promotion is refused, 2 on errors (printed to stderr)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI)")
    commands = parser.add_subparsers(dest="command", required=True)
    for command, text in (("promote", "make a version champion if it is not worse"),
                          ("tag", "add benchmark metric tags to a version"), ("show", "list versions")):
        sub = commands.add_parser(command, help=text)
        sub.add_argument("--name", required=True, help="registered model name")
        sub.add_argument("--tracking-uri", default=argparse.SUPPRESS, help="as above, after the subcommand")
        if command != "show":
            sub.add_argument("--version", required=True, help="model version number")
        if command == "tag":
            sub.add_argument("metrics", nargs="+", type=_parse_metric, help="NAME=VALUE, e.g. fracture/svm/auc=0.9")
    args = parser.parse_args(argv)
    from mlflow.exceptions import MlflowException

    try:
        return _run_command(args)
    except (MlflowException, ValueError) as error:  # unknown model/version, unreachable store, refused, bad tag
        print("error: " + " ".join(str(getattr(error, "message", error)).split()), file=sys.stderr)
        return 2


def _run_command(args: argparse.Namespace) -> int:
    client = registry_client(args.tracking_uri)
    action = {"promote": f"promote version {getattr(args, 'version', '')} of model '{args.name}'",
              "tag": f"tag version {getattr(args, 'version', '')} of model '{args.name}'",
              "show": f"list the versions of model '{args.name}'"}[args.command]
    with tracking_errors(client.tracking_uri, action):
        return _registry_command(client, args)


def _registry_command(client: Any, args: argparse.Namespace) -> int:
    if args.command == "promote":
        decision = promote(client, args.name, args.version)
        print(f"{args.name} v{args.version}: {decision}")
        return 0 if decision.promote else 1
    if args.command == "tag":
        add_benchmark_tags(client, args.name, args.version, dict(args.metrics))
        print(f"{args.name} v{args.version}: tagged " + ", ".join(f"{k}={v:g}" for k, v in args.metrics))
        return 0
    for row in describe(client, args.name):
        print(json.dumps(row, default=str))
    return 0


if __name__ == "__main__":
    from harness.cli import run_main  # late: the registry helpers stay importable without torch

    sys.exit(run_main(main))
