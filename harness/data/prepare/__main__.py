"""``python -m harness.data.prepare SOURCE ROOT --out DIR [options]``: one command per source.

Examples::

    python -m harness.data.prepare medmnist ../shared/data/pneumoniamnist.npz --out runs/data/pneumonia-32 --size 32
    python -m harness.data.prepare verse /data/verse20 --grades genant.xlsx --out runs/data/verse
    python -m harness.data.prepare mimic-cxr /data/mimic-cxr-jpg --metadata mimic-cxr-2.0.0-metadata.csv.gz \\
        --labels mimic-cxr-2.0.0-chexpert.csv.gz --split mimic-cxr-2.0.0-split.csv.gz --out runs/data/mimic

Exit status: 0 done (skipped inputs are listed), 2 the run stopped (the message names the file and the problem).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Callable, Sequence

from harness.data.prepare import brats, generic, medmnist, mimic_cxr, spider, verse
from harness.data.prepare.common import PrepareError, PrepareResult, RunOptions

# subcommand -> (help, add its arguments, run it)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace, RunOptions], PrepareResult]]] = {
    "medmnist": ("a MedMNIST .npz (official splits)", medmnist.add_arguments, medmnist.run_from_args),
    "verse": ("VerSe CT + centroids + Genant grades", verse.add_arguments, verse.run_from_args),
    "spider": ("SPIDER lumbar MRI + masks + Pfirrmann grades", spider.add_arguments, spider.run_from_args),
    "brats": ("BraTS FLAIR + segmentation: edema per slice", brats.add_arguments, brats.run_from_args),
    "mimic-cxr": ("MIMIC-CXR-JPG images + CSVs", mimic_cxr.add_arguments, mimic_cxr.run_from_args),
    **{kind: (f"generic: {kind} with a label table", functools.partial(generic.add_arguments, kind=kind),
              functools.partial(generic.run_from_args, kind=kind)) for kind in generic.KINDS},
}


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="shard folder to write")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="worker processes (0: in this process; default: the usable CPU cores)")
    parser.add_argument("--items-per-shard", type=int, default=1000, help="inputs per shard (a volume is one input)")
    parser.add_argument("--image-format", choices=("png", "npy"), default="png")
    parser.add_argument("--on-bad", choices=("skip", "stop"), default="skip",
                        help="bad inputs: report and leave out, or stop at the first")
    parser.add_argument("--overwrite", action="store_true", help="replace other shards in --out / restart")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def program_name() -> str:
    """The command as the user typed it: ``dae-cf prepare`` (the dispatcher sets ``sys.argv[0]``) or
    ``python -m harness.data.prepare`` (``sys.argv[0]`` is then this file)."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "python -m harness.data.prepare" if name in ("", "__main__.py", "-c", "-m") else name


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command-line parser: one subcommand per source; ``prog`` defaults to :func:`program_name`."""
    parser = argparse.ArgumentParser(prog=prog or program_name(), description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sources = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        sub = sources.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        _add_run_arguments(sub)
        sub.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, prepare the source, print a summary; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        options = RunOptions(workers=args.workers, items_per_shard=args.items_per_shard,
                             image_format=args.image_format, on_bad=args.on_bad, overwrite=args.overwrite,
                             progress=not args.no_progress)
        result = args.run(args, options)
    except (PrepareError, ValueError) as exc:
        text = " ".join(str(exc).split())  # one line, even for a message listing several skipped inputs
        print(text if text.startswith("error: ") else f"error: {text}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


if __name__ == "__main__":
    from harness.cli import run_main

    sys.exit(run_main(main))
