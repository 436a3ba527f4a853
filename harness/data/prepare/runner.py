"""The runner: a :class:`~harness.data.prepare.common.Plan` -> WebDataset shards + ``manifest.json``, in parallel
and resumable.

:func:`run_plan`

* cuts each split into chunks of ``items_per_shard`` work items; one chunk becomes one shard
  ``{split}-{chunk:06d}.tar``, written by :class:`harness.data.shards.ShardWriter` (temporary file, renamed when
  complete) inside a worker process, so decoding, resampling and PNG encoding all run in parallel;
* records every finished chunk in ``.prepare/`` (count, label counts, checksum, pixel sums, skipped inputs), so
  an interrupted run started again with the same plan and options skips the finished shards;
* writes ``manifest.json`` last and atomically: a folder with a manifest is complete, one without is not. The
  manifest has the layout of :mod:`harness.data.shards` plus a ``prepare`` section: settings, input checksums,
  per-split pixel statistics and patient counts, inputs filtered out by rule, and every skipped input.

A chunk that yields no samples (all its inputs bad) writes no shard, so shard numbers can have gaps; readers
take the shard list from the manifest.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from harness.data.prepare.common import (
    STATE_DIR,
    BadInput,
    LoadFn,
    Plan,
    PrepareError,
    PrepareResult,
    RunOptions,
    Sample,
    Skip,
    WorkItem,
    check_patients_disjoint,
    sha256_file,
    summarise_skips,
    write_json_atomic,
)
from harness.data.shards import FORMAT_VERSION, MANIFEST_NAME, ShardError, ShardWriter, read_manifest, shard_name

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _ChunkTask:
    """One shard's worth of work; plain data so it pickles into a worker process."""

    load: LoadFn
    items: tuple[WorkItem, ...]
    split: str
    index: int
    out_dir: Path
    image_format: str
    on_bad: str
    fingerprint: str
    label_columns: tuple[str, ...]


class _PixelSums:
    """Per-channel running sums of a uint8 image stream, for the manifest's mean/std/min/max."""

    def __init__(self) -> None:
        self.total: np.ndarray | None = None  # (C,) float64
        self.squares: np.ndarray | None = None
        self.pixels, self.low, self.high = 0, 255, 0

    def add(self, image: np.ndarray) -> None:
        flat = image.reshape(-1, image.shape[2] if image.ndim == 3 else 1).astype(np.float64)  # (H*W, C)
        total, squares = flat.sum(axis=0), np.square(flat).sum(axis=0)
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares
        self.pixels += flat.shape[0]
        self.low, self.high = min(self.low, int(image.min())), max(self.high, int(image.max()))

    def as_record(self) -> dict[str, Any]:
        if self.total is None:
            return {"pixels": 0}
        return {"pixels": self.pixels, "sum": self.total.tolist(), "sum_sq": self.squares.tolist(),
                "min": self.low, "max": self.high}


def _load_item(load: LoadFn, item: WorkItem) -> list[Sample | Skip]:
    """All results of one item; an item-level ``BadInput`` drops every sample of the item. Any other error
    stops the run, named after the item (a bad input must be reported as ``BadInput``, not guessed)."""
    try:
        return list(load(item))
    except BadInput as exc:
        return [Skip(item.name, exc.kind, str(exc))]
    except PrepareError:
        raise
    except Exception as exc:
        raise PrepareError(f"{item.name}: unexpected {type(exc).__name__} while preparing it: {exc}") from exc


def _run_chunk(task: _ChunkTask) -> dict[str, Any]:
    """Write one chunk as one shard (or none if it yields no samples) and its finished-chunk record."""
    state = task.out_dir / STATE_DIR
    staging = state / f"work-{task.split}-{task.index:06d}"
    shutil.rmtree(staging, ignore_errors=True)  # leftovers of an interrupted attempt
    writer = ShardWriter(staging, task.split, samples_per_shard=2**62, image_format=task.image_format)
    keys, skips, pixels = [], [], _PixelSums()
    try:
        for item in task.items:
            for result in _load_item(task.load, item):
                if isinstance(result, Skip):
                    if task.on_bad == "stop":
                        raise PrepareError(f"{result.input}: {result.reason} [{result.kind}] (on_bad='stop'; "
                                           "use on_bad='skip' to report and leave out such inputs)")
                    skips.append(result)
                    continue
                key, image, labels = result
                try:
                    writer.write(key, image, labels)
                except ValueError as exc:
                    raise PrepareError(f"{item.name}: {exc}") from exc
                pixels.add(image)
                keys.append(key)
        record: dict[str, Any] = {"shard": None, "count": 0, "checksum": None, "label_counts": {}}
        if keys:
            mini = writer.close()  # the chunk's own manifest in the staging folder: counts and checksum
            name = shard_name(task.split, task.index)
            os.replace(staging / shard_name(task.split, 0), task.out_dir / name)
            entry = mini["splits"][task.split]
            record = {"shard": name, "count": entry["count"], "checksum": mini["checksums"][shard_name(task.split, 0)],
                      "label_counts": {c: n for c, n in entry["label_counts"].items() if c in task.label_columns},
                      "image_size": mini["image_size"], "channels": mini["channels"]}
    finally:
        writer.abort()  # no-op after close; drops a half-written shard on error
        shutil.rmtree(staging, ignore_errors=True)
    record.update(fingerprint=task.fingerprint, split=task.split, index=task.index, keys=keys,
                  pixels=pixels.as_record(), skipped=[asdict(s) for s in skips], inputs=len(task.items))
    write_json_atomic(state / f"{task.split}-{task.index:06d}.json", record)
    return record


def _fingerprint(plan: Plan, options: RunOptions) -> str:
    """Hash of everything that determines the shards' bytes: source, settings, inputs and the work items."""
    digest = hashlib.sha256(json.dumps({
        "source": plan.source, "config": plan.config, "label_columns": list(plan.label_columns),
        "inputs": plan.inputs, "items_per_shard": options.items_per_shard, "image_format": options.image_format,
        "format_version": FORMAT_VERSION}, sort_keys=True, default=str).encode())
    # The loader's bound settings too, so a setting missing from ``config`` still cannot reuse stale shards.
    load, bound = plan.load, ()
    if isinstance(load, functools.partial):
        load, bound = load.func, (load.args, sorted(load.keywords.items()))
    digest.update(repr((getattr(load, "__module__", ""), getattr(load, "__qualname__", ""), bound)).encode())
    for split, items in plan.splits.items():
        digest.update(f"\n{split}:".encode())
        for item in items:
            digest.update(f"{item.name}\x00{item.patient}\n".encode())
    return digest.hexdigest()


def _claim_folder(out: Path, fingerprint: str, plan: Plan, overwrite: bool) -> dict[str, Any] | None:
    """Return the finished manifest if ``out`` already holds exactly this preparation; otherwise make ``out``
    ready (refusing, unless ``overwrite``, to replace other shards) and return ``None``."""
    state = out / STATE_DIR
    if (out / MANIFEST_NAME).is_file():
        try:
            manifest = read_manifest(out)
        except ShardError as exc:
            raise PrepareError(f"{out}: has an unreadable {MANIFEST_NAME} ({exc}); choose another folder") from exc
        if manifest.get("prepare", {}).get("fingerprint") == fingerprint and not overwrite:
            return manifest
        if not overwrite:
            from harness.fingerprint import differences  # late: fingerprint imports the config module

            made = manifest.get("prepare", {})
            diffs = differences(
                {"source": manifest.get("source"), "config": made.get("config"), "inputs": made.get("inputs")},
                {"source": plan.source, "config": plan.config, "inputs": plan.inputs})
            raise PrepareError(f"error: {out} holds shards of {manifest.get('source')!r} made with other settings or "
                               f"inputs ({'; '.join(diffs) or 'the work items or shard size differ'}): pass "
                               "overwrite=True (--overwrite) to replace them, or choose another folder")
        for name in [*manifest.get("checksums", {}), MANIFEST_NAME]:  # only files the manifest names
            (out / name).unlink(missing_ok=True)
    plan_file = state / "plan.json"
    if plan_file.is_file():
        previous = json.loads(plan_file.read_text())
        if previous.get("fingerprint") != fingerprint and not overwrite:
            raise PrepareError(f"{out}: holds an unfinished preparation of {previous.get('source')!r} with other "
                               "settings or inputs; pass overwrite=True (--overwrite) to discard it")
        if previous.get("fingerprint") != fingerprint or overwrite:
            for record_file in state.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].json"):
                shard = json.loads(record_file.read_text()).get("shard")
                if shard:
                    (out / shard).unlink(missing_ok=True)
            shutil.rmtree(state)
    state.mkdir(parents=True, exist_ok=True)
    write_json_atomic(plan_file, {"fingerprint": fingerprint, "source": plan.source})
    return None


def _finished_record(out: Path, split: str, index: int, fingerprint: str) -> dict[str, Any] | None:
    """The record of a chunk finished by an earlier run with the same fingerprint, if its shard is intact."""
    path = out / STATE_DIR / f"{split}-{index:06d}.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if record.get("fingerprint") != fingerprint:
        return None
    if record["shard"] and not ((out / record["shard"]).is_file()
                                and sha256_file(out / record["shard"]) == record["checksum"]):
        return None
    return record


def _execute(tasks: list[_ChunkTask], workers: int, bar: tqdm) -> Iterator[dict[str, Any]]:
    """Run chunk tasks here (``workers`` 0) or in a process pool; yields records as chunks finish."""
    if workers == 0 or len(tasks) <= 1:
        for task in tasks:
            yield _run_chunk(task)
            bar.update(len(task.items))
        return
    pool = ProcessPoolExecutor(max_workers=min(workers, len(tasks)))
    try:
        pending = {pool.submit(_run_chunk, task): task for task in tasks}
        while pending:
            done, _ = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                task = pending.pop(future)
                yield future.result()  # re-raises a worker's PrepareError here
                bar.update(len(task.items))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on error: queued chunks are dropped, running ones end


def _merge_pixels(records: list[dict[str, Any]]) -> dict[str, Any]:
    parts = [r["pixels"] for r in records if r["pixels"]["pixels"]]
    pixels = sum(p["pixels"] for p in parts)
    total = np.sum([p["sum"] for p in parts], axis=0)
    squares = np.sum([p["sum_sq"] for p in parts], axis=0)
    mean = total / pixels
    std = np.sqrt(np.maximum(squares / pixels - mean**2, 0.0))
    return {"mean": np.round(mean, 4).tolist(), "std": np.round(std, 4).tolist(), "min": min(p["min"] for p in parts),
            "max": max(p["max"] for p in parts), "pixels": pixels, "scale": "uint8 0-255, per channel"}


def _assemble(out: Path, plan: Plan, options: RunOptions, fingerprint: str,
              records: dict[tuple[str, int], dict[str, Any]], skips: list[Skip]) -> dict[str, Any]:
    """Merge finished-chunk records into ``manifest.json`` (the layout of :mod:`harness.data.shards`)."""
    splits, checksums, pixel_stats, shapes = {}, {}, {}, set()
    for split, items in plan.splits.items():
        chosen = [records[key] for key in sorted(k for k in records if k[0] == split)]
        count = sum(r["count"] for r in chosen)
        if count == 0:
            split_skips = [Skip(**s) for r in chosen for s in r["skipped"]]
            raise PrepareError(f"split {split!r}: all {len(items)} inputs were skipped or yielded no samples:\n"
                               + "\n".join(summarise_skips(split_skips)))
        keys = Counter(key for r in chosen for key in r["keys"])
        duplicates = [key for key, n in keys.items() if n > 1]
        if duplicates:
            raise PrepareError(f"split {split!r}: sample keys {duplicates[:5]} occur more than once; "
                               "each input must give distinct keys")
        label_counts: dict[str, Counter] = {}
        for record in chosen:
            for column, counts in record["label_counts"].items():
                label_counts.setdefault(column, Counter()).update(counts)
        splits[split] = {"shards": [r["shard"] for r in chosen if r["shard"]], "count": count,
                         "label_counts": {c: dict(sorted(n.items())) for c, n in sorted(label_counts.items())}}
        checksums.update({r["shard"]: r["checksum"] for r in chosen if r["shard"]})
        shapes.update((tuple(r["image_size"]), r["channels"]) for r in chosen if r["shard"])
        pixel_stats[split] = _merge_pixels(chosen)
    if len(shapes) != 1:
        raise PrepareError(f"{out}: shards have different image sizes/channels {sorted(shapes)}; "
                           "the preparer must give every sample one shape")
    (height, width), channels = next(iter(shapes))
    patients = {split: len({i.patient for i in items if i.patient}) for split, items in plan.splits.items()}
    patients = patients if any(patients.values()) else None  # the source names no patients (e.g. MedMNIST)
    by_kind = Counter(skip.kind for skip in skips)
    return {
        "format_version": FORMAT_VERSION, "image_size": [height, width], "channels": channels,
        "image_format": options.image_format, "splits": splits, "checksums": checksums, "source": plan.source,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "prepare": {"fingerprint": fingerprint, "config": plan.config, "label_columns": list(plan.label_columns),
                    "inputs": plan.inputs, "pixel_stats": pixel_stats, "patients": patients,
                    "work_items": {split: len(items) for split, items in plan.splits.items()},
                    "filtered": plan.filtered,
                    "skipped": {"count": len(skips), "by_kind": dict(sorted(by_kind.items())),
                                "inputs": [asdict(skip) for skip in skips]}}}


def run_plan(plan: Plan, out_dir: str | Path, options: RunOptions = RunOptions()) -> PrepareResult:
    """Write ``plan`` as WebDataset shards and ``manifest.json`` into ``out_dir``; see the module docstring.

    Running again with the same plan and options returns at once (``already_done``) when the folder is
    complete, and otherwise reuses every finished shard of the interrupted run.
    """
    out = Path(out_dir)
    if not plan.splits or not any(plan.splits.values()):
        raise PrepareError(f"{plan.source}: no inputs to prepare"
                           + ("" if not plan.skipped else "\n" + "\n".join(summarise_skips(plan.skipped))))
    check_patients_disjoint(plan.splits)
    if plan.skipped and options.on_bad == "stop":
        first = plan.skipped[0]
        raise PrepareError(f"{first.input}: {first.reason} [{first.kind}] (on_bad='stop'; "
                           f"{len(plan.skipped)} bad input(s) found while reading the source's tables)")
    fingerprint = _fingerprint(plan, options)
    existing = _claim_folder(out, fingerprint, plan, options.overwrite)
    if existing is not None:
        skipped = [Skip(**s) for s in existing["prepare"]["skipped"]["inputs"]]
        return PrepareResult(out, existing, skipped, already_done=True)

    records: dict[tuple[str, int], dict[str, Any]] = {}
    tasks = []
    for split, items in plan.splits.items():
        for index, start in enumerate(range(0, len(items), options.items_per_shard)):
            record = None if options.overwrite else _finished_record(out, split, index, fingerprint)
            if record is not None:
                records[(split, index)] = record
            else:
                tasks.append(_ChunkTask(plan.load, tuple(items[start:start + options.items_per_shard]), split, index,
                                        out, options.image_format, options.on_bad, fingerprint, plan.label_columns))
    resumed = len(records)
    if resumed:
        logger.info("%s: resuming; %d finished chunk(s) kept, %d to do", out, resumed, len(tasks))
    total = sum(len(task.items) for task in tasks)
    with tqdm(total=total, unit="input", desc=plan.source, disable=not options.progress) as bar:
        for record in _execute(tasks, options.workers, bar):
            records[(record["split"], record["index"])] = record
    skips = list(plan.skipped) + [Skip(**s) for key in sorted(records) for s in records[key]["skipped"]]
    manifest = _assemble(out, plan, options, fingerprint, records, skips)
    # Every checksum was taken from the finished shard file (new) or re-checked (resumed) before this point.
    write_json_atomic(out / MANIFEST_NAME, manifest)  # the folder is complete from here on
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    written = sum(1 for task in tasks if records[(task.split, task.index)]["shard"])
    return PrepareResult(out, read_manifest(out), skips, shards_written=written,
                         shards_resumed=len(manifest["checksums"]) - written)
