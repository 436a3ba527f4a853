"""Do fast inversion settings keep the counterfactuals? CE validity and CE-vs-truth error per solver x steps.

    python -m experiments.ce_solvers --model runs/recipes/eps/final \
        --latents runs/recipes/eps/eval-60000/latents.parquet \
        --settings ddim:250:100 ddim:100:50 fixed_point:10:10:4a fixed_point:30:30:2 --depth 500 T

On phantoms, where the true counterfactual is known (the demo's recipe: the ``fracture`` SVM head fitted on the
given latents table, the ``pattern`` direction, residual rendering), every setting ``inversion:invert:decode[:iters
[a]]`` (``a`` = Anderson) is run at each inversion ``--depth`` (a timestep, or T for full depth) on the same balanced
test images: UNet evaluations per CE, reconstruction MSE, validity both ways and the realised fraction of the move
at each ``--moves``, and the median per-CE error against the true counterfactual beside the unchanged input's.
One JSON line per setting goes to ``--results``; the markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

from harness.config import load_config  # noqa: E402
from harness.diffusion import counterfactual_nfe  # noqa: E402
from harness.evaluation.evaluate import evaluate_counterfactual_set, evaluate_heads, fit_directions  # noqa: E402
from harness.method.autoencoder import DiffusionAutoencoder  # noqa: E402
from harness.method.latents import load_latents  # noqa: E402
from harness.pipeline import take_balanced  # noqa: E402

JOB = REPO / "jobs" / "phantoms_demo.yaml"


def parse_setting(text: str) -> tuple[str, int, int, int, bool]:
    """``fixed_point:15:15:2`` -> ("fixed_point", 15, 15, 2, False); a trailing ``a`` on iters asks for Anderson."""
    parts = text.split(":")
    iters = parts[3] if len(parts) > 3 else "0"
    return parts[0], int(parts[1]), int(parts[2]), int(iters.rstrip("a")), iters.endswith("a")


def measure(ae: DiffusionAutoencoder, test: dict, result, directions: dict, setting: tuple, depth: int | None,
            moves: tuple[float, ...]) -> dict:
    """One setting at one depth: the row of the table (means over both CE directions where it says so)."""
    inversion, invert_steps, decode_steps, iters, anderson = setting
    ae.invert_to = depth
    ae.inversion, ae.fixed_point_iters, ae.fixed_point_anderson = inversion, iters, anderson
    started = time.perf_counter()
    torch.manual_seed(0)
    ce_rows, outputs = evaluate_counterfactual_set(ae, test, result, invert_steps=invert_steps,
                                                   decode_steps=decode_steps, directions=directions,
                                                   render="residual", move_sizes=moves,
                                                   class_names=("healthy", "fractured"))
    encoded = outputs["encoded"]
    row = {"inversion": inversion, "invert_steps": invert_steps, "decode_steps": decode_steps, "iters": iters,
           "anderson": anderson, "depth": "T" if depth is None else depth,
           "nfe_per_ce": counterfactual_nfe(ae.alpha_bar.shape[0], invert_steps, decode_steps, inversion, iters,
                                            depth),
           "recon_mse": torch.mean((encoded.recon - encoded.x) ** 2).item(), "n": int(encoded.x.shape[0]),
           "wall_s": round(time.perf_counter() - started, 1)}
    for r in ce_rows:
        if r["move"] == "-":  # grade-targeted rows: not part of this table
            continue
        key = f"{r['move']}:{'h->f' if r['kind'].startswith('healthy') else 'f->h'}"
        row[key] = {"validity": r["validity"], "realised": r.get("realised_fraction"),
                    "error_true": r.get("median_error_true"), "input_error_true": r.get("median_input_error_true")}
    return row


def markdown(rows: list[dict], moves: tuple[float, ...]) -> str:
    head = ["depth", "solver", "steps inv / dec", "UNet evals per CE", "recon MSE"]
    for move in moves:
        head += [f"{move:g}x validity h->f / f->h", f"{move:g}x realised h->f", f"{move:g}x error vs truth h->f / "
                 "f->h (input's h->f)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        solver = "DDIM" if r["inversion"] == "ddim" else f"fixed-point x{r['iters']}"
        solver += " Anderson" if r["anderson"] else ""
        cells = [str(r["depth"]), solver, f"{r['invert_steps']} / {r['decode_steps']}", str(r["nfe_per_ce"]),
                 f"{r['recon_mse']:.1e}"]
        for move in moves:
            hf, fh = r[f"{move:g}x:h->f"], r[f"{move:g}x:f->h"]
            cells += [f"{hf['validity']:.2f} / {fh['validity']:.2f}", f"{hf['realised']:.2f}",
                      f"{hf['error_true']:.4f} / {fh['error_true']:.4f} ({hf['input_error_true']:.4f})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="trained model folder (final/ or a checkpoint)")
    parser.add_argument("--latents", type=Path, required=True, help="latents table of that model (train + test)")
    parser.add_argument("--config", type=Path, default=JOB, help="run config whose shards and head task to use")
    parser.add_argument("--settings", nargs="+", default=["ddim:250:100", "fixed_point:15:15:2"])
    parser.add_argument("--depth", nargs="+", default=["500"], help="inversion depths: timesteps or T (full)")
    parser.add_argument("--moves", default="1,2", help="move sizes, multiples of the reflection's move")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "ce_solvers.jsonl")
    args = parser.parse_args(argv)
    config = load_config(args.config, ["--track.enabled=false"])
    moves = tuple(float(m) for m in args.moves.split(","))
    ae = DiffusionAutoencoder.load(args.model, batch_size=64)
    table = load_latents(args.latents)
    task = config.heads.tasks[0]
    result = evaluate_heads(table, [task], ("svm",), split="test").results[(task.name, "svm")]
    cf = config.counterfactual
    directions = fit_directions(result, table, ("pattern",), variance=cf.subspace_variance, k=cf.subspace_k)
    test = take_balanced(config.data.shard_dir, "test", args.images, config, "grade")
    rows = []
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for depth in args.depth:
        for text in args.settings:
            row = measure(ae, test, result, directions, parse_setting(text), None if depth == "T" else int(depth),
                          moves)
            rows.append(row)
            print(json.dumps(row, default=float), flush=True)
            with open(args.results, "a") as handle:
                handle.write(json.dumps({"model": str(args.model), **row}, default=float) + "\n")
    print(markdown(rows, moves))


if __name__ == "__main__":
    main()
