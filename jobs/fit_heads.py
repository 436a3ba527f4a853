"""Fit and evaluate linear heads on any latents table (from this project's DAE or brought from elsewhere).

    python jobs/fit_heads.py --latents latents.parquet --config jobs/phantoms_demo.yaml --out runs/heads
    python jobs/fit_heads.py --latents my_latents.npz --heads.tasks='[{name: edema, column: edema,
        positives: [1], negatives: [], grade_range: null}]' --out runs/heads-edema

Uses the ``heads`` section of the config (tasks, kinds, C, calibration) and ``counterfactual.direction``. Writes
heads.json (hyperplanes, calibrations and CE directions in raw z_sem space), the detection/grading tables and
ROC/calibration/confusion figures, and a t-SNE latent map, as an HTML report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.cli import run_main
from harness.config import load_config
from harness.evaluate import evaluate_heads, save_head_figures, save_heads
from harness.figures import save_latent_map
from harness.heads import TaskSpec
from harness.latents import load_latents
from harness.report import Report


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latents", required=True, help="latents table (.parquet or .npz)")
    parser.add_argument("--config", default=None, help="YAML run file (its heads section is used)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--split", default="test", help="split to evaluate on (heads are fitted on train)")
    args, overrides = parser.parse_known_args(argv)
    config = load_config(args.config, overrides)
    table = load_latents(args.latents)
    tasks = [TaskSpec.from_config(t) for t in config.heads.tasks]
    heads = evaluate_heads(table, tasks, config.heads.kinds, C=config.heads.C, calibration=config.heads.calibration,
                           degree=config.heads.degree, backend=config.heads.backend, split=args.split)
    out = Path(args.out)
    report = Report(out, f"Linear heads on {Path(args.latents).name}")
    report.add_table("detection", heads.detection_rows, f"Detection on {args.split}", section="Heads")
    if heads.grading_rows:
        report.add_table("grading", heads.grading_rows, f"Grading on {args.split}", section="Heads")
    for path in save_head_figures(heads, table, out / "figures", split=args.split):
        report.add_figure(path, path.stem.replace("_", " "), section="Heads")
    rows = table.select(args.split)
    n = min(1000, len(rows))
    columns = dict.fromkeys(t.column for t in tasks)
    report.add_figure(save_latent_map(rows.z_sem[:n], {c: rows.labels[c][:n] for c in columns},
                                      out / "figures" / "latent_map.png"), "t-SNE of z_sem", section="Latent space")
    save_heads(out / "heads.json", heads, table, config.counterfactual)  # with each head's CE direction
    index = report.write()
    print(f"report: {index}")
    return index


if __name__ == "__main__":
    sys.exit(run_main(main))
