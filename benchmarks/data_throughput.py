"""Shard reader throughput: training images/s for several DataLoader worker counts.

    python benchmarks/data_throughput.py                          # phantoms, 32 px, workers 0 1 2
    python benchmarks/data_throughput.py --size 96 --augment --batches 40
    python benchmarks/data_throughput.py --shard-dir runs/data/phantoms-32 --workers 0 4 8

Without ``--shard-dir`` a small phantom set is written to a temporary folder first (not timed). One timed
run = ``--batches`` batches from ``train_loader`` after ``--warmup`` untimed batches (worker start-up,
first shard open), so the number is the steady-state rate of decoding, resizing and augmenting.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from harness.data.loaders import train_loader
from harness.data.shards import write_phantom_shards
from harness.data.transforms import AugmentSpec


def images_per_second(shard_dir: Path, *, batch_size: int, num_workers: int, batches: int, warmup: int,
                      image_size: int | None, augment: AugmentSpec | None) -> float:
    """Steady-state training-stream rate of one loader configuration."""
    stream = iter(train_loader(shard_dir, batch_size, image_size=image_size, augment=augment,
                               num_workers=num_workers, shuffle_buffer=256))
    for _ in range(warmup):
        next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches * batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> list[dict]:
    """Print (and return) one row per worker count: ``{"num_workers", "images_per_s"}``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shard-dir", type=Path, help="existing shard folder (default: generate phantoms)")
    parser.add_argument("--size", type=int, default=32, help="phantom size when generating")
    parser.add_argument("--samples", type=int, default=512, help="phantoms to generate")
    parser.add_argument("--image-size", type=int, default=None, help="resize to this size while reading")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--augment", action="store_true", help="apply the paper's augmentations (p=0.5 each)")
    args = parser.parse_args(argv)
    rows = []

    with tempfile.TemporaryDirectory() as scratch:
        shard_dir = args.shard_dir
        if shard_dir is None:
            shard_dir = write_phantom_shards(Path(scratch) / "phantoms", size=args.size, n_train=args.samples,
                                             n_val=0, n_test=0, samples_per_shard=max(args.samples // 8, 1))
        augment = AugmentSpec() if args.augment else None
        print(f"shards: {shard_dir}  batch {args.batch_size}  augment {bool(augment)}")
        print(f"{'num_workers':>11}  {'images/s':>10}")
        for workers in args.workers:
            rate = images_per_second(shard_dir, batch_size=args.batch_size, num_workers=workers,
                                     batches=args.batches, warmup=args.warmup, image_size=args.image_size,
                                     augment=augment)
            print(f"{workers:>11}  {rate:>10.0f}")
            rows.append({"num_workers": workers, "images_per_s": rate})
    return rows


if __name__ == "__main__":
    main()
