"""Is the direction or the decoder what keeps phantom counterfactuals from the truth? An oracle experiment.

    python -m experiments.ce_oracle --model runs/recipes/eps/final [--n-train 256] [--n-test 32]

On phantoms the true counterfactual of every image is known (the same phantom re-rendered at another grade), so
the latent move that *should* be made is known too: ``delta_i = E(truth_i) - E(x_i)``. Decoding (residual
rendering, the image's own x_T) is compared for four latents, each scored against the truth beside the
unchanged input (``harness.method.probes.truth_errors``) and by the fracture head on the re-encoded image:

- ``pattern 1x``: the project's default CE (the head's pattern Cov(z) n, reflected across the boundary);
- ``mean oracle``: z + the mean of ``delta`` over training phantoms of the same class (the best single
  direction and step, learned from the truth);
- ``own oracle``: E(truth_i) itself, each image's exact target latent (an upper bound for any direction);
- ``truth through the DAE``: the truth inverted and decoded with its own code (the decoder's own floor).

Each row also says how the CE's image change compares with the true change
(``harness.method.probes.change_alignment``): its cosine, its size relative to the truth's, and the share of it
inside the pixels the truth changes. If even ``own oracle`` is not closer to the truth than the input, no choice
of direction can make CEs faithful with this model: the decoder is the bottleneck. Healthy phantoms (grade 0)
target grade 2; fractured ones grade 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

from harness.data.phantoms import PhantomParams, generate_phantoms, render, to_uint8  # noqa: E402
from harness.data.transforms import to_model_range  # noqa: E402
from harness.method.autoencoder import DiffusionAutoencoder  # noqa: E402
from harness.method.counterfactual import (  # noqa: E402
    LOCAL_THRESHOLD,
    RENDERS,
    CounterfactualEngine,
    render_counterfactuals,
)
from harness.method.directions import fit_direction  # noqa: E402
from harness.method.heads import fit_head  # noqa: E402
from harness.method.probes import change_alignment, truth_errors  # noqa: E402

UP_GRADE, DOWN_GRADE = 2, 0  # targets of healthy and fractured phantoms


def phantom_pairs(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """n phantoms, their true counterfactuals and 0/1 fracture labels: (n, 1, S, S) x 2 in [-1, 1], (n,)."""
    images, truths, labels = [], [], []
    for sample in generate_phantoms(n, size, seed, key_prefix="oracle"):
        fractured = int(sample.labels["grade"] >= 1)
        params = PhantomParams.from_dict(sample.labels["phantom"])
        truth = to_uint8(render(params, DOWN_GRADE if fractured else UP_GRADE, size))
        images.append(to_model_range(sample.image[None]))
        truths.append(to_model_range(truth[None]))
        labels.append(fractured)
    return torch.stack(images), torch.stack(truths), np.array(labels)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an exported phantom DAE (e.g. runs/recipes/eps/final)")
    parser.add_argument("--n-train", type=int, default=256)
    parser.add_argument("--n-test", type=int, default=32)
    parser.add_argument("--invert-steps", type=int, default=None, help="default: the model's")
    parser.add_argument("--decode-steps", type=int, default=None, help="default: the model's")
    parser.add_argument("--invert-to", type=int, default=None, help="inversion depth (timestep); default: the model's")
    parser.add_argument("--render", choices=RENDERS, default="residual")
    parser.add_argument("--local-threshold", type=float, default=LOCAL_THRESHOLD, help="the 'local' rendering's mask")
    parser.add_argument("--inversion", choices=("ddim", "fixed_point"), default=None, help="default: the model's")
    parser.add_argument("--results", type=Path, default=None, help="append the JSON line here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    extra = {} if args.invert_to is None else {"invert_to": args.invert_to}
    extra.update({} if args.inversion is None else {"inversion": args.inversion})
    ae = DiffusionAutoencoder.load(args.model, device="cpu", batch_size=64, **extra)
    inv = args.invert_steps or ae.invert_steps
    dec = args.decode_steps or ae.decode_steps
    size = ae.dae.spec.image_size

    # Training phantoms: the head, its pattern direction and the mean true latent move per class.
    x_tr, t_tr, y_tr = phantom_pairs(args.n_train, size, seed=101)
    z_tr, zt_tr = ae.encode(x_tr).double().numpy(), ae.encode(t_tr).double().numpy()  # (N, D) each
    head = fit_head(z_tr, y_tr, kind="svm")
    pattern = fit_direction("pattern", z_tr, y_tr, head.hyperplane)
    delta = zt_tr - z_tr  # (N, D): the true latent moves
    mean_move = {c: delta[y_tr == c].mean(axis=0) for c in (0, 1)}

    # Test phantoms: one inversion each, shared by the project's CE (the engine's) and the oracle latents below.
    x, truth, y = phantom_pairs(args.n_test, size, seed=202)
    engine = CounterfactualEngine(ae, head, None, pattern, inv, dec, args.render, args.local_threshold)
    encoded = engine.encode(x)
    z = encoded.z.double().numpy()  # (B, D)
    oracles = {
        "mean oracle": z + np.stack([mean_move[int(c)] for c in y]),
        "own oracle": ae.encode(truth).double().numpy(),
    }
    rows = {"input (unchanged)": {**_score(x, x, truth), "validity": 0.0}}
    images = {"pattern 1x": engine.binary(encoded).x_ce}
    images.update({name: render_counterfactuals(ae, encoded, torch.as_tensor(z_ce, dtype=torch.float32))
                   for name, z_ce in oracles.items()})  # latents from the truth, rendered as the engine renders
    for name, x_ce in images.items():
        rows[name] = {**_score(x, x_ce, truth), **_validity(ae, head, x_ce, y)}
    rebuilt = ae.reconstruct(truth, invert_steps=inv, decode_steps=dec)  # the truth through the DAE
    rows["truth through the DAE"] = {**_score(x, rebuilt, truth), **_validity(ae, head, rebuilt, y)}
    cos = float(pattern.vector @ (mean_move[0] - mean_move[1]) / np.linalg.norm(mean_move[0] - mean_move[1]))
    result = {"model": str(args.model), "invert_steps": inv, "decode_steps": dec, "invert_to": ae.invert_to,
              "render": args.render, "local_threshold": args.local_threshold, "inversion": ae.inversion,
              "n_train": args.n_train,
              "n_test": args.n_test, "cos_pattern_vs_mean_oracle": cos, "rows": rows}
    print(f"depth {ae.invert_to}, render {args.render}, {inv}/{dec} steps")
    print(f"{'latent':<24} {'CE-truth med':>12} {'input-truth med':>15} {'closer':>7} {'validity':>8} "
          f"{'cos(change)':>11} {'|change|':>8} {'inside':>6}")
    for name, row in rows.items():
        print(f"{name:<24} {row['ce_error_median']:>12.4f} {row['input_error_median']:>15.4f} "
              f"{row['closer_than_input']:>7.2f} {row['validity']:>8.2f} {row['change_cosine']:>11.2f} "
              f"{row['change_magnitude']:>8.2f} {row['change_inside']:>6.2f}")
    print(f"cosine(pattern, mean healthy->fractured oracle move) = {cos:.3f}")
    if args.results:
        with open(args.results, "a") as handle:
            handle.write(json.dumps(result) + "\n")
    return result


def _score(x: torch.Tensor, x_ce: torch.Tensor, truth: torch.Tensor) -> dict:
    errors = truth_errors(x, x_ce, truth)
    alignment = change_alignment(x, x_ce, truth)
    return {**{k: v for k, v in errors.items() if not isinstance(v, np.ndarray)},
            **{f"change_{k}": v for k, v in alignment.items() if k != "n"}}


def _validity(ae: DiffusionAutoencoder, head, x_ce: torch.Tensor, y: np.ndarray) -> dict:
    """Fraction of CEs the head puts on the other side once re-encoded."""
    predicted = head.predict(ae.encode(x_ce).double().numpy())
    return {"validity": float(np.mean(predicted != y))}


if __name__ == "__main__":
    from harness.cli import run_main

    sys.exit(run_main(main))
