"""The ``transfer`` suite: the default recipe on data sets that did not choose it.

The recipe (model, diffusion, training and counterfactual settings) is the one of ``jobs/phantoms_demo.yaml``. It
was chosen on the grey vertebra phantoms (the ``quality`` suite measures it there) and checked on PneumoniaMNIST
(whose job keeps one choice of its own, ``counterfactual.render: residual``). The sets below only *measure* it: their
job files copy those sections unchanged (``tests/test_recipe_transfer.py`` keeps them equal), so a figure here says
how the recipe holds where nobody tuned it, met or not:

``colour_phantoms5``  the phantoms in colour with five grades, read from a MedMNIST-layout file as a user's own RGB
                      set would be (no true CE: judged by the oracle CNN)
``cxr_phantoms``      the chest X-ray phantoms of several graded findings (``jobs/cxr_phantoms.yaml``), when that job
                      is present

Each set is trained as the demo is (two DDP processes on a CPU), then the pipeline's stages run up to the CEs with
the detection floors (raw pixels and a random encoder, C chosen on val) beside the head; the metrics are those of
the ``quality`` suite under ``transfer/<set>/``. ``TRANSFER_SETS=colour_phantoms5`` runs a subset.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.quality_suite import measure_job
from benchmarks.records import REPO, SuiteResult
from benchmarks.suites import SuiteContext

RECIPE_JOB = REPO / "jobs" / "phantoms_demo.yaml"
# The sections that make the recipe; ``train.out_dir`` is where a run goes, not how it trains.
RECIPE_SECTIONS = ("model", "diffusion", "train", "counterfactual")
RECIPE_EXCEPT = {"train": ("out_dir",), "counterfactual": ("evaluate_directions",)}


@dataclass(frozen=True)
class TransferSet:
    """A data set that measures the recipe: its job file and how its input is made in a scratch folder."""

    name: str
    job: Path
    prepare: Callable[[Path], list[str]] | None = None  # work dir -> extra overrides (e.g. a generated input)


def _colour_phantoms5(work_dir: Path) -> list[str]:
    from harness.data.phantom_npz import write_phantom_npz

    path = work_dir / "colour_phantoms5.npz"
    if not path.is_file():
        write_phantom_npz(path, size=32, counts=(2048, 256, 256), seed=0, rgb=True, grades=5)
    return [f"--data.raw_path={path}"]


TRANSFER_SETS = (
    TransferSet("colour_phantoms5", REPO / "jobs" / "colour_phantoms5.yaml", _colour_phantoms5),
    TransferSet("cxr_phantoms", REPO / "jobs" / "cxr_phantoms.yaml"),
)


def recipe_of(config: object) -> dict[str, dict]:
    """The recipe sections of a loaded run config as plain dicts (the run's own paths left out)."""
    import dataclasses

    out = {}
    for section in RECIPE_SECTIONS:
        values = dataclasses.asdict(getattr(config, section))
        for key in RECIPE_EXCEPT.get(section, ()):
            values.pop(key, None)
        out[section] = values
    return out


def transfer_suite(ctx: SuiteContext) -> SuiteResult:
    """Every transfer set's detection (beside its floors), grading and CE figures under ``transfer/<set>/``."""
    wanted = {s for s in os.environ.get("TRANSFER_SETS", "").split(",") if s}
    result = SuiteResult(notes=[f"recipe: {RECIPE_JOB.relative_to(REPO)} ({', '.join(RECIPE_SECTIONS)}); chosen on "
                                "the grey vertebra phantoms, checked on PneumoniaMNIST; the sets here only measure "
                                "it"])
    for transfer in TRANSFER_SETS:
        if wanted and transfer.name not in wanted:
            continue
        if not transfer.job.is_file():
            result.notes.append(f"{transfer.name}: {transfer.job.relative_to(REPO)} not present, not measured")
            continue
        work = ctx.work_dir / transfer.name
        work.mkdir(parents=True, exist_ok=True)
        extra = transfer.prepare(work) if transfer.prepare else []
        overrides = [*extra, f"--data.shard_dir={work / 'shards'}", f"--train.out_dir={work / 'model'}",
                     f"--eval.out_dir={work / 'eval'}", "--track.enabled=false"]
        if os.environ.get("QUALITY_SAMPLES"):
            overrides.append(f"--train.total_samples={os.environ['QUALITY_SAMPLES']}")
        measured = measure_job(transfer.job, ctx, f"transfer/{transfer.name}", overrides, floors=True)
        result.metrics.update(measured.metrics)
        result.rows += [{"set": transfer.name, **row} for row in measured.rows]
        result.notes += [f"{transfer.name}: {note}" for note in measured.notes]
    return result
