"""Fit and evaluate linear heads on any latents table (from this project's DAE or brought from elsewhere).

    dae-cf heads --latents latents.parquet --config jobs/phantoms_demo.yaml --out runs/heads
    dae-cf heads --latents my_latents.safetensors --out runs/heads       # tasks inferred from labels
    dae-cf heads --latents my_latents.npz --heads.protocol=paper --out runs/heads-paper
    dae-cf heads --latents my_latents.npz --heads.tasks='[{name: edema, column: edema,
        positives: [1], negatives: [], grade_range: null}]' --out runs/heads-edema

Latents: .parquet, .npz, .safetensors, .pt/.pth (a dict of tensors) or a Hugging Face ``datasets`` folder
(``harness.method.latents.load_latents``); string labels are mapped to numbers and the mapping is printed. Uses the
``heads`` section of the config (tasks, kinds, protocol and every fitting choice, calibration) and
``counterfactual.direction``. Without tasks in the job file or the overrides, the tasks are inferred from the
labels and printed (``harness.method.head_tasks.infer_tasks``); a label outside a given task's ``grade_range`` stops
the job. Writes heads.json (hyperplanes, fitting choices, calibrations and CE directions in raw z_sem space),
the detection/grading tables and ROC/calibration/confusion figures, and a t-SNE latent map, as an HTML report.
Nothing is written when the input is refused: a missing split, a label outside a task's range, the quadratic SVM
solver (``heads.svm_solver: svc_linear``) on a CPU above ``heads.max_rows_quadratic`` training rows, or an ``--out``
folder that already holds heads.json or a report (``--overwrite`` replaces them) stop the job before any head is
fitted.

``python jobs/fit_heads.py`` and ``python -m harness.ops.fit_heads_job`` take the same arguments. Callers that
already hold a loaded config use :func:`fit_heads` (no command line).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.cli import run_main
from harness.config import RunConfig, Task, load_config, parse_overrides, read_yaml
from harness.evaluation.evaluate import evaluate_heads, save_head_figures, save_heads
from harness.evaluation.figures import save_latent_map
from harness.evaluation.report import Report
from harness.method.head_tasks import check_task_labels, describe_mappings, infer_tasks, numeric_labels
from harness.method.heads import check_quadratic_tasks, resolve_backend
from harness.method.latents import LatentsError, LatentsTable, load_latents

OUTPUTS = ("heads.json", "index.html", "results.json", "results.md")  # what a previous run leaves in --out


def tasks_given(config_path: str | None, overrides: list[str]) -> bool:
    """Whether the job file or an override names ``heads.tasks`` (the config's default task is a phantom's)."""
    if "tasks" in parse_overrides(overrides).get("heads", {}):
        return True
    if config_path is None:
        return False
    tree = read_yaml(config_path)  # load_config has already validated the file
    return isinstance(tree.get("heads"), dict) and "tasks" in tree["heads"]


def evaluation_split(table: LatentsTable, requested: str | None, source: str = "latents") -> str:
    """``--split`` when given (refused when the table has no such rows); else test, or val when the latents have
    no test split."""
    counts = table.split_counts()
    if requested:
        if not counts.get(requested):
            raise LatentsError(f"{source}: --split {requested}: the latents have no {requested!r} rows (splits: "
                               f"{counts}); pass one of {sorted(s for s, n in counts.items() if n)}")
        return requested
    for split in ("test", "val"):
        if counts.get(split):
            return split
    raise LatentsError(f"latents have no test or val rows to evaluate on (splits: {counts}); pass --split")


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` folder holding a previous run's heads.json or report unless ``overwrite``."""
    found = [name for name in OUTPUTS if (out / name).exists()]
    if found and not overwrite:
        raise FileExistsError(f"{out} already holds {', '.join(found)} from an earlier run: pass --overwrite to "
                              "replace them, or choose another --out")


def resolve_tasks(table: LatentsTable, config_tasks: list[Task], given: bool, source: str) -> list[Task]:
    """The job's tasks (checked against the labels) or, when none were given, tasks inferred and printed."""
    if given:
        check_task_labels(table, config_tasks, source)
        return config_tasks
    tasks, notes = infer_tasks(table)
    print(f"no heads.tasks in the job file: inferred from the labels of {source}:")
    for note in notes:
        print(f"  {note}")
    if not tasks:
        raise LatentsError(f"{source}: no label column gives a task (label columns: {table.label_columns}); "
                           "name one under heads.tasks")
    return tasks


def fit_heads(latents: str | Path, config: RunConfig, out: str | Path, *, tasks_given: bool,
              split: str | None = None, overwrite: bool = False) -> Path:
    """Fit the config's heads on ``latents``, write heads.json and the report into ``out``; returns index.html.

    ``tasks_given``: whether ``config.heads.tasks`` came from the user (job file or override); when False the
    tasks are inferred from the labels instead of using the config's default phantom task. ``split``: the
    evaluation split (default: test, else val). ``overwrite``: replace an earlier run's outputs in ``out``.
    Nothing is written when the input is refused.
    """
    out = Path(out)
    check_out(out, overwrite)
    table, mappings = numeric_labels(load_latents(latents))
    for line in describe_mappings(mappings):
        print(f"string labels mapped: {line}")
    split = evaluation_split(table, split, str(latents))
    if not table.split_counts().get("train"):
        raise LatentsError(f"{latents}: heads are fitted on the train split, and the latents have no train rows "
                           f"(splits: {table.split_counts()})")
    tasks = resolve_tasks(table, list(config.heads.tasks), tasks_given, str(latents))
    options = config.heads.options()
    # the quadratic SVM solver on a CPU above the section's row limit: refused before the first head is fitted
    check_quadratic_tasks(table, tasks, config.heads.kinds, options.svm_solver, resolve_backend(config.heads.backend),
                          config.heads.max_rows_quadratic)
    print(f"heads: {', '.join(config.heads.kinds)}; protocol {options.protocol}: " + ", ".join(
        f"{k}={v}" for k, v in options.to_dict().items() if k != "protocol") + f"; evaluated on {split}")
    heads = evaluate_heads(table, tasks, config.heads.kinds, options=options, backend=config.heads.backend,
                           split=split, max_rows_quadratic=config.heads.max_rows_quadratic)
    report = Report(out, f"Linear heads on {Path(latents).name}")
    report.add_table("detection", heads.detection_rows, f"Detection on {split} ({options.protocol} protocol)",
                     section="Heads")
    if heads.grading_rows:
        report.add_table("grading", heads.grading_rows, f"Grading on {split}", section="Heads")
    for path in save_head_figures(heads, table, out / "figures", split=split):
        report.add_figure(path, path.stem.replace("_", " "), section="Heads")
    rows = table.select(split)
    n = min(1000, len(rows))
    columns = dict.fromkeys(t.column for t in tasks)
    report.add_figure(save_latent_map(rows.z_sem[:n], {c: rows.labels[c][:n] for c in columns},
                                      out / "figures" / "latent_map.png"), "t-SNE of z_sem", section="Latent space")
    save_heads(out / "heads.json", heads, table, config.counterfactual)  # with each head's CE direction
    index = report.write()
    print(f"report: {index}")
    return index


def build_parser() -> argparse.ArgumentParser:
    """The command line; any other ``--section.key=value`` argument overrides the config."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latents", required=True, help="latents: .parquet, .npz, .safetensors, .pt or a "
                        "Hugging Face datasets folder")
    parser.add_argument("--config", default=None, help="YAML run file (its heads section is used)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--split", default=None, help="split to evaluate on (default: test, else val; heads are "
                        "fitted on train)")
    parser.add_argument("--overwrite", action="store_true", help="replace heads.json and the report of an earlier "
                        "run in --out")
    return parser


def main(argv: list[str] | None = None) -> Path:
    """Command line: parse, load the config (with overrides), then :func:`fit_heads`."""
    args, overrides = build_parser().parse_known_args(argv)
    config = load_config(args.config, overrides)
    return fit_heads(args.latents, config, args.out, tasks_given=tasks_given(args.config, overrides),
                     split=args.split, overwrite=args.overwrite)


if __name__ == "__main__":
    sys.exit(run_main(main))
