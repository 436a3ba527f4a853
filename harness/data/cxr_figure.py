"""``python -m harness.data.cxr_figure docs/cxr_phantoms.png``: a contact sheet of the chest X-ray phantoms.

Row 1: seven frontal phantoms of different patients and exposures, captioned with their non-zero grades.
Row 2: one patient without findings, then its true counterfactual with each finding at grade 3.
Row 3: where each counterfactual differs from the original (absolute difference, amplified).
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from harness import fileio
from harness.data.cxr_cohort import draw_patient
from harness.data.cxr_render import FINDINGS, render, render_counterfactual

SHORT = {"cardiomegaly": "cardio", "effusion": "effus", "consolidation": "consol", "pneumothorax": "ptx",
         "edema": "edema", "support_devices": "devices"}


def contact_sheet(seed: int = 0, size: int = 192) -> Image.Image:
    """The three rows described in the module docstring, as one greyscale image with captions."""
    frontal = [r for i in range(40) for r in draw_patient(seed, i, size) if r["view"] != "LATERAL"]
    shown = [r for r in frontal if any(r[f"{f}_grade"] for f in FINDINGS)][:7]
    base = {**next(r for r in frontal if r["view"] == "PA"), **{f"{f}_grade": 0 for f in FINDINGS},
            "effusion_side": 0}
    original = render(base)
    changed = [render_counterfactual(base, finding, 3) for finding in FINDINGS]
    differences = [np.clip(np.abs(c.astype(np.int16) - original) * 3, 0, 255).astype(np.uint8) for c in changed]
    rows = [
        [(render(r), ", ".join(f"{SHORT[f]} {r[f + '_grade']}" for f in FINDINGS if r[f"{f}_grade"]) or r["view"])
         for r in shown],
        [(original, "original (all 0)"), *((c, f"true CE: {SHORT[f]} 3") for c, f in zip(changed, FINDINGS,
                                                                                         strict=True))],
        [(np.zeros_like(original), ""), *((d, f"|CE - original| {SHORT[f]}") for d, f in zip(differences, FINDINGS,
                                                                                            strict=True))],
    ]
    caption = 14
    sheet = Image.new("L", (7 * size, 3 * (size + caption)), 0)
    draw = ImageDraw.Draw(sheet)
    for row, cells in enumerate(rows):
        for column, (image, text) in enumerate(cells):
            top = row * (size + caption)
            sheet.paste(Image.fromarray(image), (column * size, top + caption))
            draw.text((column * size + 3, top + 1), text, fill=255)
    return sheet


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.data.cxr_figure", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="PNG to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sheet = contact_sheet(args.seed)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG", optimize=True)
    fileio.atomic_write_bytes(args.out, buffer.getvalue())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
