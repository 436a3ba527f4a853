"""Shards of chest X-ray phantoms for a job (``data.source: cxr_phantoms``), with every image's render record.

The corpus generator (:mod:`harness.data.cxr_phantoms`) writes a MIMIC-CXR-JPG tree for the real preparer; a job
that only needs small frontal images with their ground truth gets them here directly, without JPEG coding: the
same cohort (:func:`harness.data.cxr_cohort.draw_patient`), each frontal image rendered at ``render_size`` (twice
the image size, so that fine findings are averaged rather than aliased) and resized to ``image_size`` the way the
MIMIC-CXR preparer resizes (bicubic). Labels: the true grade 0-3 of every rendered finding (column = the finding's
name, e.g. ``edema``); meta: the render record under :data:`META_KEY`, so an evaluation can render any image's
true counterfactual at the shard's size (:func:`shard_image`).

Splits are patient-disjoint and hold exactly the requested numbers of images: patients are drawn in order and
each goes, whole, to the split furthest below its count (the last one cut to fit).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from harness.data.cxr_cohort import draw_patient
from harness.data.cxr_render import FINDINGS, render, render_counterfactual
from harness.data.prepare.imaging import fit_square
from harness.data.shards import MANIFEST_NAME, ShardError, read_manifest, write_shards

META_KEY = "cxr_phantom"  # the meta entry holding an image's render record (its presence marks these shards)
SHARD_VERSION = 1
_NOT_RECORDED = ("labels", "StudyDate", "StudyTime")  # report text and dates: not render parameters


def render_size_for(image_size: int) -> int:
    """The size images are rendered at before resizing: twice the image size (the renderer needs >= 32)."""
    return max(32, 2 * int(image_size))


def shard_image(params: Mapping[str, Any], image_size: int, finding: str | None = None,
                grade: int | None = None) -> np.ndarray:
    """The phantom of ``params`` as stored in the shards, uint8 (S, S); with ``finding`` and ``grade`` its true
    counterfactual (same patient, exposure and noise, that finding at that grade) rendered the same way."""
    size = render_size_for(image_size)
    image = render(params, size) if finding is None else render_counterfactual(params, finding, int(grade), size)
    return fit_square(image, int(image_size), "resize")


def split_records(counts: Mapping[str, int], seed: int, image_size: int) -> dict[str, list[dict[str, Any]]]:
    """Frontal image records per split, exactly ``counts[split]`` each, patient-disjoint and deterministic."""
    wanted = {split: int(n) for split, n in counts.items() if n > 0}
    chosen: dict[str, list[dict[str, Any]]] = {split: [] for split in wanted}
    patient = 0
    while any(len(chosen[s]) < n for s, n in wanted.items()):
        records = [r for r in draw_patient(seed, patient, render_size_for(image_size)) if r["view"] != "LATERAL"]
        patient += 1
        if not records:
            continue
        split = max(wanted, key=lambda s: (wanted[s] - len(chosen[s])) / wanted[s])  # the furthest behind
        chosen[split].extend(records[:wanted[split] - len(chosen[split])])
    return chosen


def _samples(records: Sequence[dict[str, Any]], image_size: int) -> Iterator[tuple[str, np.ndarray, dict]]:
    for record in records:
        params = {k: v for k, v in record.items() if k not in _NOT_RECORDED}
        labels = {finding: int(record[f"{finding}_grade"]) for finding in FINDINGS}
        labels.update(view=record["view"], patient_id=str(record["subject_id"]), **{META_KEY: params})
        yield f"cxr-{record['dicom_id']}", shard_image(params, image_size), labels


def write_cxr_phantom_shards(out_dir: str | Path, image_size: int = 32, counts: Sequence[int] = (2560, 256, 512),
                             seed: int = 0, samples_per_shard: int = 256) -> Path:
    """Write train / val / test shards of ``counts`` frontal chest X-ray phantoms into ``out_dir``.

    A folder written with the same settings is kept as it is; one holding other shards is refused
    (``ShardError`` naming the differences), never replaced."""
    out = Path(out_dir)
    n_train, n_val, n_test = (int(n) for n in counts)
    recipe = {"generator": "cxr_phantoms", "version": SHARD_VERSION, "image_size": int(image_size),
              "render_size": render_size_for(image_size), "counts": [n_train, n_val, n_test], "seed": int(seed)}
    if (out / MANIFEST_NAME).is_file():
        manifest = read_manifest(out)
        written = {split: entry["count"] for split, entry in manifest["splits"].items()}
        if manifest.get("recipe") == recipe and written == {"train": n_train, "val": n_val, "test": n_test}:
            return out
        if manifest.get("recipe") != recipe:  # the same recipe with a split missing: a write cut short, redone
            from harness.fingerprint import differences  # late, as in write_phantom_shards

            diffs = differences(manifest.get("recipe") or {"source": manifest.get("source")}, recipe)
            raise ShardError(f"error: {out} holds other shards ({'; '.join(diffs) or manifest.get('source')}): "
                             "choose another data.shard_dir for these settings, or delete the folder to regenerate")
    source = f"cxr_phantoms(size={image_size}, n=({n_train}, {n_val}, {n_test}), seed={seed})"
    by_split = split_records({"train": n_train, "val": n_val, "test": n_test}, seed, image_size)
    for split, records in by_split.items():
        write_shards(_samples(records, image_size), out, split, samples_per_shard, source=source, recipe=recipe)
    return out
