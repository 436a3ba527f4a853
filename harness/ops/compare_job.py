"""Per task, DAE + linear head vs DenseNet121: test metrics, labels used, wall and CPU/GPU time.

    dae-cf compare --heads runs/sweep-phantoms --baseline runs/baseline-phantoms --out runs/compare

``--heads`` and ``--baseline`` take the output folders (or their ``summary.json``) of ``dae-cf sweep`` and
``dae-cf baseline``; several baseline folders may be given (e.g. one per task). ``--floors`` adds each task's best
floor AUC and a ``beats_floor`` column (``<out>/floors`` of ``dae-cf findings``, which runs all of this from one job
file). Writes ``index.html``,
``results.md``, ``results.json`` and ``tables/*.csv|.md|.json`` into ``--out``.

``python jobs/compare.py`` and ``python -m harness.ops.compare_job`` take the same arguments; :func:`compare` does the
work without a command line (the tables themselves are built by ``harness.ops.compare``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

from harness.ops.compare import load_floors, load_summary, write_comparison


def compare(heads: Sequence[str | PathLike], baselines: Sequence[str | PathLike], out: str | PathLike,
            floors: str | PathLike | None = None) -> Path:
    """Compare the rows of sweep outputs ``heads`` with those of baseline outputs ``baselines`` (folders or their
    summary.json) in a report at ``out``, with the floors of ``floors`` (a folder or its floors.json) when given;
    returns its index.html."""
    head_rows = [row for path in heads for row in load_summary(path)]
    baseline_rows = [row for path in baselines for row in load_summary(path)]
    floor_rows, caption = load_floors(floors) if floors is not None else (None, "")
    index = write_comparison(head_rows, baseline_rows, out, floor_rows=floor_rows, floors_caption=caption)
    print(f"comparison: {index}")
    return index


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", nargs="+", required=True, help="sweep output folder(s) or summary.json")
    parser.add_argument("--baseline", nargs="+", required=True, help="baseline output folder(s) or summary.json")
    parser.add_argument("--out", required=True, help="report folder")
    parser.add_argument("--floors", default=None, help="floors folder or floors.json (dae-cf findings' <out>/floors): "
                        "adds floor_auc and beats_floor per task")
    return parser


def main(argv: list[str] | None = None) -> Path:
    """Command line: parse, then :func:`compare`."""
    args = build_parser().parse_args(argv)
    return compare(args.heads, args.baseline, args.out, args.floors)


if __name__ == "__main__":
    from harness.cli import run_main

    sys.exit(run_main(main))
