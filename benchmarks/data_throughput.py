"""Shard reader throughput against the rate the training step consumes: is the reader the bottleneck?

    python benchmarks/data_throughput.py --small                   # < ~60 s on 2 cores: 32 and 96 px
    python benchmarks/data_throughput.py --workers 0 1 2 4 8 --batches 40 --json runs/bench/data.json
    python benchmarks/data_throughput.py --shard-dir runs/data/phantoms-96 --sizes 96 --workers 0 4 8
    python benchmarks/data_throughput.py --size 96 --augment        # old single-configuration form

For each image size (``--sizes``, default 32 and 96 px) a small phantom set is written to a temporary folder
(not timed), then ``train_loader`` is timed for every DataLoader worker count (``--workers``), with and without
the paper's augmentations. The main process reads with ``--reader-threads`` torch threads (default 1, like a
DataLoader worker: per-sample augmentation ops are tiny, and with 2 threads on a busy 2-core CPU the main process
was seen ~10x slower). One timed run = ``--batches`` batches after ``max(--warmup, num_workers)`` untimed
batches (the loader takes batches from workers in turn, so each worker's start-up, first shard open and shuffle
buffer fill fall in the warm-up), so the number is the steady-state rate of reading, decoding, resizing and
augmenting.

Beside each reader rate stands the rate the training step consumes at that size, and the verdict
``reader / consumer`` (> 1: the reader is not the bottleneck):

* 32 px, ``tiny-32``: *measured* here, one fp32 training step on CPU (``train_throughput.bench_one``).
* 96 px, ``paper-96`` (64 px, ``paper-64``): a *computed target*, not a measurement: the images/s an H100 would
  consume at 40 % MFU in bf16, i.e. 0.40 x 989 TFLOP/s / (training FLOPs per image, counted by
  ``harness.models.flops`` on the meta device).

``--size N`` (one size; augmentation only with ``--augment``) keeps the older single-configuration form that
``benchmarks/suites.py`` calls: it returns one row per worker count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable for ``benchmarks.*``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.train_throughput import GPU_PEAK_TFLOPS, bench_one  # noqa: E402
from harness.data.loaders import train_loader  # noqa: E402
from harness.data.shards import write_phantom_shards  # noqa: E402
from harness.data.transforms import AugmentSpec  # noqa: E402
from harness.models import build_dae  # noqa: E402
from harness.models.flops import training_flops_per_image  # noqa: E402

TARGET_MFU = 0.40  # a good, not heroic, utilisation for a conv UNet in bf16 on an H100
# Image size -> (model that trains at it, how its consumption rate is obtained).
CONSUMERS: dict[int, tuple[str, str]] = {32: ("tiny-32", "measured"), 64: ("paper-64", "h100"),
                                         96: ("paper-96", "h100")}


def images_per_second(shard_dir: Path, *, batch_size: int, num_workers: int, batches: int, warmup: int,
                      image_size: int | None, augment: AugmentSpec | None) -> float:
    """Steady-state training-stream rate (images/s) of one loader configuration."""
    stream = iter(train_loader(shard_dir, batch_size, image_size=image_size, augment=augment,
                               num_workers=num_workers, shuffle_buffer=256))
    for _ in range(warmup):
        next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    rate = batches * batch_size / (time.perf_counter() - start)
    del stream  # stop the workers before the next configuration starts its own
    return rate


def consumer_rate(image_size: int, *, batch: int, steps: int, warmup: int) -> dict | None:
    """Images/s the training step consumes at ``image_size``: measured on CPU or an H100 target (see module doc)."""
    if image_size not in CONSUMERS:
        return None
    size, how = CONSUMERS[image_size]
    if how == "measured":
        # The faster of 1 and all intra-op threads: on a shared CPU, OpenMP barriers among competing jobs can
        # make 2 threads several times slower than 1; the higher consumer rate is the harder test for the reader.
        default_threads, best = torch.get_num_threads(), None
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            row = bench_one(size, "fp32", batch, steps, warmup, torch.device("cpu"), False, False, None)
            if best is None or row["images_per_s"] > best[1]["images_per_s"]:
                best = (threads, row)
        torch.set_num_threads(default_threads)
        threads, row = best
        return {"model": size, "how": f"measured, CPU fp32, best of 1/{default_threads} threads ({threads}), "
                f"batch {batch}", "images_per_s": row["images_per_s"], "gflop_per_image": row["gflop_per_image"]}
    with torch.device("meta"):  # FLOPs only: no memory, no arithmetic
        model = build_dae(size, in_channels=1)
    flops = training_flops_per_image(model)
    peak = GPU_PEAK_TFLOPS["H100"]["bf16"] * 1e12
    return {"model": size, "how": f"computed target: H100 bf16 at {TARGET_MFU:.0%} MFU of {peak / 1e12:.0f} TFLOP/s",
            "images_per_s": TARGET_MFU * peak / flops, "gflop_per_image": flops / 1e9}


def format_table(rows: list[dict]) -> str:
    """The rows as a Markdown table (one line per size, augmentation and worker count)."""
    lines = ["| px | augment | workers | reader img/s | img/s per worker | consumer | consumer img/s | "
             "reader / consumer |", "|---:|:---|---:|---:|---:|:---|---:|---:|"]
    for r in rows:
        per_worker = r["images_per_s"] / max(1, r["num_workers"])
        consumer = f"{r['consumer_model']} ({r['consumer_kind']})" if r["consumer_model"] else "-"
        rate = f"{r['consumer_images_per_s']:.0f}" if r["consumer_images_per_s"] else "-"
        ratio = f"{r['reader_over_consumer']:.2f}" if r["reader_over_consumer"] is not None else "-"
        lines.append(f"| {r['image_size']} | {'yes' if r['augment'] else 'no'} | {r['num_workers']} | "
                     f"{r['images_per_s']:.0f} | {per_worker:.0f} | {consumer} | {rate} | {ratio} |")
    return "\n".join(lines)


def workers_needed(rows: list[dict]) -> list[str]:
    """Per size and augmentation: how many workers (cores) the consumer needs, from the 1-worker rate here."""
    notes = []
    for r in rows:
        if r["num_workers"] == 1 and r["consumer_images_per_s"]:
            need = math.ceil(r["consumer_images_per_s"] / r["images_per_s"])
            notes.append(f"{r['image_size']} px, augment {'yes' if r['augment'] else 'no'}: {r['consumer_model']} "
                         f"needs {r['consumer_images_per_s']:.0f} img/s; one worker gives {r['images_per_s']:.0f} "
                         f"img/s here -> >= {need} worker(s) at this per-core speed")
    return notes


def main(argv: list[str] | None = None) -> list[dict]:
    """Print (and return) one row per (image size, augmentation, worker count) with the consumer's rate."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shard-dir", type=Path, help="existing shard folder (one size only; default: phantoms)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 96], help="phantom sizes to generate")
    parser.add_argument("--size", type=int, default=None, help="one size; augmentation only with --augment")
    parser.add_argument("--augment", action="store_true", help="with --size: apply the paper's augmentations")
    parser.add_argument("--samples", type=int, default=512, help="phantoms to generate per size")
    parser.add_argument("--image-size", type=int, default=None, help="resize to this size while reading")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches (at least num_workers)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--consumer-steps", type=int, default=5, help="timed CPU training steps for tiny-32")
    parser.add_argument("--reader-threads", type=int, default=1,
                        help="torch intra-op threads of the main process while reading (workers always use 1)")
    parser.add_argument("--no-consumer", action="store_true", help="reader only")
    parser.add_argument("--small", action="store_true", help="quick form: 128 phantoms, 20 batches, 2 train steps")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="write machine and rows here")
    args = parser.parse_args(argv)
    if args.small:
        args.samples, args.batches, args.warmup, args.consumer_steps = 128, 20, 2, 2
    sizes = [args.size] if args.size is not None else args.sizes
    augments = [args.augment] if args.size is not None else [False, True]
    if args.shard_dir is not None and len(sizes) > 1:
        parser.error("--shard-dir holds one size: give it with --size or a single --sizes value")

    consumers: dict[int, dict | None] = {}
    for size in sizes:
        key = args.image_size or size
        if key not in consumers:
            consumers[key] = None if args.no_consumer else consumer_rate(
                key, batch=16, steps=args.consumer_steps, warmup=1)
    for key, c in consumers.items():
        if c:
            print(f"consumer at {key} px: {c['model']}  {c['gflop_per_image']:.1f} GFLOP/image  "
                  f"{c['images_per_s']:.0f} img/s  ({c['how']})", flush=True)

    warnings.filterwarnings("ignore", message="This DataLoader will create")  # more workers than cores: on purpose
    rows = []
    default_threads = torch.get_num_threads()
    torch.set_num_threads(args.reader_threads)  # workers=0 decodes here; DataLoader workers set 1 themselves
    with tempfile.TemporaryDirectory() as scratch:
        for size in sizes:
            shard_dir = args.shard_dir or write_phantom_shards(
                Path(scratch) / f"phantoms-{size}", size=size, n_train=args.samples, n_val=0, n_test=0,
                samples_per_shard=max(args.samples // 8, 1))
            consumer = consumers.get(args.image_size or size)
            for augment in augments:
                for workers in args.workers:
                    rate = images_per_second(shard_dir, batch_size=args.batch_size, num_workers=workers,
                                             batches=args.batches, warmup=max(args.warmup, workers),
                                             image_size=args.image_size, augment=AugmentSpec() if augment else None)
                    c_rate = consumer["images_per_s"] if consumer else None
                    row = {"image_size": args.image_size or size, "augment": augment, "num_workers": workers,
                           "batch_size": args.batch_size, "images_per_s": rate,
                           "consumer_model": consumer["model"] if consumer else None,
                           "consumer_kind": ("measured CPU" if consumer["how"].startswith("measured")
                                             else "H100 target") if consumer else None,
                           "consumer_images_per_s": c_rate,
                           "reader_over_consumer": rate / c_rate if c_rate else None}
                    rows.append(row)
                    ratio = f"{row['reader_over_consumer']:6.2f}" if c_rate else "     -"
                    print(f"{row['image_size']:>4} px  augment {'yes' if augment else 'no ':3}  workers {workers:>2}  "
                          f"reader {rate:8.0f} img/s  reader/consumer {ratio}", flush=True)

    torch.set_num_threads(default_threads)
    print()
    print(format_table(rows))
    for note in workers_needed(rows):
        print(note)
    if args.json:
        machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                   "torch_threads": torch.get_num_threads(), "reader_threads": args.reader_threads,
                   "torch": torch.__version__, "load_average": os.getloadavg()}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "argv": argv if argv is not None else sys.argv[1:],
                                         "consumers": {str(k): v for k, v in consumers.items()}, "rows": rows},
                                        indent=2))
    return rows


if __name__ == "__main__":
    from harness.cli import run_main

    sys.exit(run_main(main))
