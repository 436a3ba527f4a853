"""Counterfactual latency and throughput: one CE at batch 1, CEs/s at larger batches, per inversion solver.

    python benchmarks/ce_speed.py --model runs/recipes/eps/final [--batches 1 16 64]

A CE here is what the pipeline does per image: encode, invert to full depth, decode a moved latent
(``harness.method.counterfactual``), under ``torch.inference_mode``, on fresh phantoms. DDIM 250 / 100 (the paper's, 351
UNet evaluations) is timed beside fixed-point 10 / 10 (61 evaluations, ``benchmarks/RESULTS.md``, "Encoding").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.data.phantoms import generate_phantoms  # noqa: E402
from harness.data.transforms import to_model_range  # noqa: E402
from harness.method.autoencoder import DiffusionAutoencoder  # noqa: E402
from harness.method.counterfactual import encode_for_counterfactuals, render_counterfactuals  # noqa: E402

SOLVERS = {"ddim 250/100": ("ddim", 250, 100), "fixed_point 10/10": ("fixed_point", 10, 10)}
# How the network runs: precision, memory layout, torch.compile. "fp32" is the default everywhere else.
VARIANTS = {
    "fp32": {},
    "fp32+channels_last": {"channels_last": True},
    "bf16": {"precision": "bf16"},
    "bf16+channels_last": {"precision": "bf16", "channels_last": True},
    "fp32+compile": {"compile": True},
    "bf16+compile": {"precision": "bf16", "compile": True},
}


def time_ces(ae: DiffusionAutoencoder, x: torch.Tensor) -> tuple[float, float]:
    """Seconds for one batch of CEs (B, C, H, W) and the reconstruction MSE.

    A CE costs one encode, one inversion and one decode; the decode here is of the unchanged latent (same cost as a
    moved one), so the same call also gives the reconstruction error the variant costs.
    """
    start = time.perf_counter()
    with torch.inference_mode():
        encoded = encode_for_counterfactuals(ae, x, ae.invert_steps, ae.decode_steps, render="decode")
        decoded = render_counterfactuals(ae, encoded, encoded.z)
    seconds = time.perf_counter() - start
    return seconds, float(((decoded - x) ** 2).mean())


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an exported DAE folder")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=list(SOLVERS))
    parser.add_argument("--variants", nargs="+", default=["fp32"], choices=list(VARIANTS),
                        help="network precision / layout / compilation (default: fp32)")
    parser.add_argument("--results", type=Path, default=None, help="append one JSON line per row here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    size = DiffusionAutoencoder.load(args.model, device="cpu").dae.spec.image_size
    images = torch.stack([to_model_range(s.image[None]) for s in generate_phantoms(max(args.batches), size, 5)])
    rows = []
    for name in args.solvers:
        inversion, inv, dec = SOLVERS[name]
        for variant in args.variants:
            for batch in args.batches:
                ae = DiffusionAutoencoder.load(args.model, batch_size=batch, invert_to=None, invert_steps=inv,
                                               decode_steps=dec, inversion=inversion, **VARIANTS[variant])
                x = images[:batch].to(ae.device)
                row = {"solver": name, "variant": variant, "batch": batch}
                if VARIANTS[variant].get("compile"):  # the first call compiles for this shape: timed apart
                    row["first_call_seconds"] = round(time_ces(ae, x)[0], 3)
                seconds, mse = time_ces(ae, x)
                row.update({"seconds": round(seconds, 3), "ce_per_s": round(batch / seconds, 3),
                            "recon_mse": round(mse, 6), "device": str(ae.device),
                            "threads": torch.get_num_threads()})
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.results:
                    with open(args.results, "a") as handle:
                        handle.write(json.dumps(row) + "\n")
    return rows


if __name__ == "__main__":
    from harness.cli import run_main

    sys.exit(run_main(main))
