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


def time_ces(ae: DiffusionAutoencoder, x: torch.Tensor) -> float:
    """Seconds for one batch of CEs (B, C, H, W): encode, invert, decode a moved latent."""
    start = time.perf_counter()
    with torch.inference_mode():
        encoded = encode_for_counterfactuals(ae, x, ae.invert_steps, ae.decode_steps, render="decode")
        render_counterfactuals(ae, encoded, encoded.z + 0.01)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an exported DAE folder")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=list(SOLVERS))
    parser.add_argument("--results", type=Path, default=None, help="append one JSON line per row here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    size = DiffusionAutoencoder.load(args.model, device="cpu").dae.spec.image_size
    images = torch.stack([to_model_range(s.image[None]) for s in generate_phantoms(max(args.batches), size, 5)])
    rows = []
    for name in args.solvers:
        inversion, inv, dec = SOLVERS[name]
        for batch in args.batches:
            ae = DiffusionAutoencoder.load(args.model, batch_size=batch, invert_to=None, invert_steps=inv,
                                           decode_steps=dec, inversion=inversion)
            seconds = time_ces(ae, images[:batch].to(ae.device))
            rows.append({"solver": name, "batch": batch, "seconds": round(seconds, 3),
                         "ce_per_s": round(batch / seconds, 3), "device": str(ae.device),
                         "threads": torch.get_num_threads()})
            print(json.dumps(rows[-1]), flush=True)
            if args.results:
                with open(args.results, "a") as handle:
                    handle.write(json.dumps(rows[-1]) + "\n")
    return rows


if __name__ == "__main__":
    from harness.cli import run_main

    sys.exit(run_main(main))
