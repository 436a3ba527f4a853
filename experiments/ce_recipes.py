"""Which training recipe makes the demo's counterfactuals valid and faithful? One recipe x budget per call.

    python -m experiments.ce_recipes --recipe v_jitter --samples 30000 [60000 ...] [--ce pattern:decode,...]

Each recipe is a set of run-config overrides on ``jobs/phantoms_demo.yaml``. The DAE is trained (resumed) to each
budget in ``--out/<recipe>``, then measured on the phantoms, where the true counterfactual is known:

- z-usage: the denoising error with the true vs a shuffled z_sem at t = 250 .. 950 (``harness.method.probes.z_usage``);
  random-x_T decodes: how often a decode is nearest its own source (chance = 1/B);
- detection AUC of the ``fracture`` SVM head on z_sem beside the raw-pixel and random-encoder floors;
- for each ``direction:render[:depth]`` of ``--ce`` (depth: the timestep the inversion stops at; T = full) and
  each of ``--moves``: binary CE validity both ways, the realised fraction of the move, and the median per-CE
  error against the true counterfactual beside the unchanged input's; grade-targeted CEs to the extremes.
  A direction written ``name+gain`` (e.g. ``pattern+gain:local:500``) moves with its realisation gain, measured on
  balanced training images with the same rendering and depth (``harness.method.gain.calibrate_gain``).

One JSON line per (recipe, budget) is appended to ``--results``; ``--table`` prints the markdown table of a
results file (the one in ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

from harness.checkpoint import checkpoint_name  # noqa: E402
from harness.cli import run_main  # noqa: E402
from harness.config import load_config  # noqa: E402
from harness.encode import encode_to_table  # noqa: E402
from harness.evaluation.evaluate import (  # noqa: E402
    detection_floors,
    evaluate_counterfactual_set,
    evaluate_heads,
    fit_directions,
)
from harness.method.autoencoder import DiffusionAutoencoder  # noqa: E402
from harness.method.counterfactual import encode_for_counterfactuals  # noqa: E402
from harness.method.gain import calibrate_gain  # noqa: E402
from harness.method.latents import load_latents  # noqa: E402
from harness.method.probes import random_xT_identity, z_usage  # noqa: E402
from harness.pipeline import take_balanced  # noqa: E402
from harness.train_dae import main as train_main  # noqa: E402

JOB = REPO / "jobs" / "phantoms_demo.yaml"
GAIN = "+gain"  # a CE spec's direction with this suffix is measured with its calibrated realisation gain
RECIPES: dict[str, list[str]] = {
    "eps": [],  # the paper's objective: eps-prediction, plain MSE
    "eps_minsnr": ["--diffusion.loss_weighting=min_snr"],
    "eps_batch16": ["--train.batch_size=16"],  # twice the optimizer steps for the same samples
    "eps_lr5e-4": ["--train.lr=5e-4"],
    "eps_lr1e-3": ["--train.lr=1e-3"],
    "v": ["--diffusion.prediction=v"],
    "v_minsnr": ["--diffusion.prediction=v", "--diffusion.loss_weighting=min_snr"],
    "eps_jitter": ["--train.encoder_jitter=0.3"],
    "v_jitter": ["--diffusion.prediction=v", "--train.encoder_jitter=0.3"],
    "v_minsnr_jitter": ["--diffusion.prediction=v", "--diffusion.loss_weighting=min_snr",
                        "--train.encoder_jitter=0.3"],
}


def _floors(config, cache: Path) -> dict:
    """Raw-pixel logistic and random-encoder SVM AUC for the fracture task (cached per shard folder)."""
    if cache.is_file():
        return json.loads(cache.read_text())
    rows = detection_floors(config, [config.heads.tasks[0]])
    floors = {f"{r['floor']}/{r['kind']}": r["auc"] for r in rows}
    cache.write_text(json.dumps(floors))
    return floors


def measure(config, model_dir: Path, out: Path, ce_specs: list[tuple[str, str, str]], n_images: int,
            move_sizes: tuple[float, ...] = (1.0,)) -> dict:
    d = config.diffusion
    ae = DiffusionAutoencoder.load(model_dir, batch_size=64, inversion=d.inversion)  # the job's solver, not the model's
    row: dict = {}
    # z-usage on validation images, and what z_sem alone carries (random x_T).
    val = take_balanced(config.data.shard_dir, "val", 64, config, "grade")["image"]
    z_val = ae.encode(val)
    generator = torch.Generator().manual_seed(0)
    for r in z_usage(ae.eps_fn, val, z_val, ae.alpha_bar.float(), generator=generator):
        row[f"z_usage_t{r['t']}"] = r["usage"]
    test = take_balanced(config.data.shard_dir, "test", n_images, config, "grade")
    z_test = ae.encode(test["image"])
    identity = random_xT_identity(lambda z, x_T: ae.decode(z, x_T, d.decode_steps, from_noise=True), test["image"],
                                  z_test,
                                  generator=torch.Generator().manual_seed(1))
    row["random_xT_own_source"] = identity["nearest_own_source"]
    # Detection on z_sem.
    latents = out / "latents.parquet"
    encode_to_table(ae, config.data.shard_dir, ["train", "test"], latents, batch_size=64,
                    image_size=config.data.image_size, channels=config.data.channels,
                    meta={"model_dir": str(model_dir)})
    table = load_latents(latents)
    task = config.heads.tasks[0]
    heads = evaluate_heads(table, [task], ("svm",), split="test")
    result = heads.results[(task.name, "svm")]
    row["auc_svm"] = heads.detection_rows[0]["auc"]
    # Counterfactuals, per direction and rendering, from one inversion per rendering.
    cf = config.counterfactual
    names = tuple(dict.fromkeys(name.removesuffix(GAIN) for name, *_ in ce_specs))
    directions = fit_directions(result, table, names, variance=cf.subspace_variance, k=cf.subspace_k)
    train = take_balanced(config.data.shard_dir, "train", cf.gain_images, config, "grade")["image"]
    for render, depth in dict.fromkeys((r, t) for _, r, t in ce_specs):
        ae.invert_to = None if depth == "T" else int(depth)  # inversion depth of this group
        chosen = {}
        for name in (n for n, r, t in ce_specs if (r, t) == (render, depth)):
            chosen[name] = directions[name.removesuffix(GAIN)]
            if name.endswith(GAIN):  # the realisation gain, measured on training images with this group's settings
                encoded = encode_for_counterfactuals(ae, train, d.invert_steps, d.decode_steps, render,
                                                     cf.local_threshold)
                chosen[name], info = calibrate_gain(ae, encoded, result.head, chosen[name],
                                                      validity=cf.gain_validity)
                row[f"{name}:{render}" + ("" if depth == "T" else f":{depth}") + ":gain"] = info["gain"]
        ce_rows, _ = evaluate_counterfactual_set(ae, test, result, invert_steps=d.invert_steps,
                                                 decode_steps=d.decode_steps, directions=chosen, render=render,
                                                 local_threshold=cf.local_threshold, move_sizes=move_sizes,
                                                 class_names=("healthy", "fractured"))
        for name in chosen:
            key = f"{name}:{render}" + ("" if depth == "T" else f":{depth}")
            for move in move_sizes:
                binary = [r for r in ce_rows if r["direction"] == name and r["move"] == f"{move:g}x"]
                tag = key if move == 1.0 else f"{key}:{move:g}x"
                row[f"{tag}:validity_min"] = min(r["validity"] for r in binary)
                row[f"{tag}:validity"] = {r["kind"]: r["validity"] for r in binary}
                row[f"{tag}:realised"] = float(np.median([r["realised_fraction"] for r in binary]))
                row[f"{tag}:truth"] = {r["kind"]: [r.get("median_error_true"), r.get("median_input_error_true"),
                                                   r.get("closer_than_input")] for r in binary}
            grades = [r for r in ce_rows if r["direction"] == name and r["move"] == "-"]
            row[f"{key}:grade_truth"] = {r["kind"]: [r.get("median_error_true"), r.get("median_input_error_true"),
                                                     r.get("closer_than_input"), r["validity"]] for r in grades}
    ae.invert_to = config.diffusion.invert_to
    return row


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _recipe_name(row: dict) -> str:
    """The recipe, plus any ``--extra`` overrides of that run (e.g. another seed) and the model size when it is not
    tiny-32 (rows written before the size was recorded were all tiny-32, the demo job's size then)."""
    extra = [o.lstrip("-") for o in row.get("overrides", []) if o not in RECIPES.get(row["recipe"], [])]
    if not any(e.startswith("model.size=") for e in extra) and row.get("model", "tiny-32") != "tiny-32":
        extra.append(f"model.size={row['model']}")
    return " ".join([row["recipe"], *extra])


def markdown_tables(results: Path) -> str:
    """The recipe table (one row per recipe x budget) and the CE table (one row per CE setting and move)."""
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    out = ["| recipe | samples | AUC svm (pixels / random enc.) | z-usage t=250 / 500 / 750 / 950 | random-x_T own |",
           "|---|---|---|---|---|"]
    for r in rows:
        usage = " / ".join(f"{r[f'z_usage_t{t}']:.2f}" for t in (250, 500, 750, 950))
        floors = f"{r['raw pixels/logistic']:.3f} / {r['random encoder/svm']:.3f}"
        out.append(f"| {_recipe_name(r)} | {r['samples']:,} | {r['auc_svm']:.3f} ({floors}) | {usage} | "
                   f"{r['random_xT_own_source']:.2f} |")
    out += ["", "| recipe | samples | direction:render[:depth] | move | validity healthy->fractured / "
            "fractured->healthy | realised | median error vs truth: CE / input (h->f) "
            "| closer than input (h->f / f->h) |",
            "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for key in [k[: -len(":validity")] for k in r if k.endswith(":validity")]:
            parts = key.split(":")
            move = parts[-1] if parts[-1].endswith("x") else "1x"
            setting = ":".join(p for p in parts if not p.endswith("x"))
            validity = list(r[f"{key}:validity"].values())
            truth = list(r[f"{key}:truth"].values())
            errors = f"{_fmt(truth[0][0])} / {_fmt(truth[0][1])}" if truth and truth[0][0] is not None else "-"
            closer = " / ".join(_fmt(t[2]) for t in truth[:2]) if truth and truth[0][2] is not None else "-"
            if f"{setting}:gain" in r:
                aim = f" aimed at {r['gain_validity']:.0%} valid" if r.get("gain_validity") else ""
                setting += " (gain {:.1f} / {:.1f}{})".format(*r[f"{setting}:gain"], aim)
            if r.get("inversion", "ddim") != "ddim":
                setting += f", {r['inversion']} {r['invert_steps']}/{r['decode_steps']}"
            out.append(f"| {_recipe_name(r)} | {r['samples']:,} | {setting} | {move} | "
                       f"{' / '.join(_fmt(v) for v in validity)} | {r[f'{key}:realised']:.2f} | {errors} | {closer} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="eps")
    parser.add_argument("--samples", type=int, nargs="+", default=[30000])
    parser.add_argument("--out", default="runs/recipes")
    parser.add_argument("--ce", default="normal:decode,pattern:decode,pattern:residual")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--moves", default="1", help="move sizes, multiples of the reflection's move (e.g. 1,2,4)")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "ce_recipes.jsonl"))
    parser.add_argument("--extra", nargs="*", default=[], help="more run-config overrides (--section.key=value)")
    parser.add_argument("--checkpoint", action="store_true",
                        help="measure the run's saved checkpoint at each budget instead of training to it")
    parser.add_argument("--steps", type=int, nargs=2, default=[100, 50], metavar=("INVERT", "DECODE"),
                        help="DDIM steps of inversion and decoding for the measurements")
    parser.add_argument("--inversion", choices=("ddim", "fixed_point"), default="ddim",
                        help="inversion solver of the measurements (fixed_point needs equal --steps)")
    parser.add_argument("--table", action="store_true", help="print the markdown tables of --results and stop")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown_tables(Path(args.results)))
        return
    ce_specs = [tuple((spec + ":T").split(":")[:3]) for spec in args.ce.split(",")]  # direction:render[:depth]
    move_sizes = tuple(float(m) for m in args.moves.split(","))
    overrides = RECIPES[args.recipe] + [f"--{e.lstrip('-')}" for e in args.extra]
    run_dir = Path(args.out) / (args.recipe + "".join(f"_{e.lstrip('-').replace('=', '')}" for e in args.extra))
    for budget in args.samples:
        run_overrides = overrides + [f"--train.out_dir={run_dir}", f"--train.total_samples={budget}",
                                     "--track.enabled=false", f"--train.preview_every={budget}",
                                     f"--diffusion.invert_steps={args.steps[0]}",
                                     f"--diffusion.decode_steps={args.steps[1]}",
                                     f"--diffusion.inversion={args.inversion}"]
        started = time.perf_counter()
        if args.checkpoint:  # the first checkpoint at or past the budget (batches do not divide it evenly)
            saved = sorted(run_dir.glob("checkpoints/" + checkpoint_name(0).rstrip("0") + "*"))
            at_or_past = [c for c in saved if int(c.name.rsplit("_", 1)[-1]) >= budget]
            if not at_or_past:
                raise FileNotFoundError(f"--checkpoint: no checkpoint of {budget:,} samples or more in "
                                        f"{run_dir / 'checkpoints'}; train it first (the same call without "
                                        "--checkpoint)")
            trained = {"model_dir": str(at_or_past[0])}
        else:
            trained = train_main(["--config", str(JOB), *run_overrides, "--resume"])
        train_wall = time.perf_counter() - started
        config = load_config(JOB, run_overrides)
        torch.manual_seed(0)
        eval_dir = run_dir / f"eval-{budget}"
        eval_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        row = {"recipe": args.recipe, "overrides": overrides, "samples": budget, "train_wall_s": round(train_wall, 1),
               "invert_steps": config.diffusion.invert_steps, "decode_steps": config.diffusion.decode_steps,
               "inversion": config.diffusion.inversion, "model": config.model.size,
               "local_threshold": config.counterfactual.local_threshold,
               "gain_validity": config.counterfactual.gain_validity,
               **_floors(config, Path(args.out) / "floors.json"),
               **measure(config, Path(trained["model_dir"]), eval_dir, ce_specs, args.images, move_sizes)}
        row["eval_wall_s"] = round(time.perf_counter() - started, 1)
        print(json.dumps(row, default=float), flush=True)
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        with open(args.results, "a") as handle:
            handle.write(json.dumps(row, default=float) + "\n")


if __name__ == "__main__":
    sys.exit(run_main(main))
