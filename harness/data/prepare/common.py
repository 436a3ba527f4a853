"""Shared machinery of the preparers: work plans, patient-level splits and the parallel, resumable shard runner.

A preparer reads a source's tables and file lists (cheap) and returns a :class:`Plan`: ordered
:class:`WorkItem` lists per split and a picklable ``load`` function that turns one item (an image file, a
volume, a row of an npz) into zero or more samples ``(key, image, labels)``, or into :class:`Skip` records
for inputs that are bad. :func:`run_plan` then

* cuts each split into chunks of ``items_per_shard`` items; one chunk becomes one shard
  ``{split}-{chunk:06d}.tar``, written by :class:`harness.data.shards.ShardWriter` (temporary file, renamed
  when complete) in a worker process, so decoding, resampling and PNG encoding run in parallel;
* records every finished chunk in ``.prepare/`` (count, labels, checksum, pixel sums, skipped inputs), so an
  interrupted run started again with the same settings skips the finished shards;
* writes ``manifest.json`` last, atomically: a folder with a manifest is complete, one without is not.

Bad inputs never become samples: with ``on_bad="skip"`` they are listed (file, kind, reason) in the manifest
and in the returned result; with ``on_bad="stop"`` the first one ends the run with a :class:`PrepareError`
that names it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from harness.data.shards import FORMAT_VERSION, MANIFEST_NAME, ShardError, ShardWriter, read_manifest, shard_name
from harness.data.shards import verify_shards as _verify_shards

logger = logging.getLogger(__name__)

STATE_DIR = ".prepare"  # finished-chunk records of an unfinished run; removed once the manifest is written
DEFAULT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
# Kinds of bad input, so reports can be grouped; the free-text reason says the rest.
SKIP_KINDS = ("unreadable", "dimensionality", "shape_mismatch", "empty_mask", "label_out_of_range", "non_finite",
              "missing_label", "outside_volume")


class PrepareError(RuntimeError):
    """The preparation cannot go on: a bad source file or table, or a bad input under ``on_bad="stop"``."""


class BadInput(ValueError):
    """Raised by a ``load`` function: this input (named in the message) is bad and yields no samples."""

    def __init__(self, kind: str, message: str) -> None:
        if kind not in SKIP_KINDS:
            raise ValueError(f"unknown bad-input kind {kind!r}; expected one of {SKIP_KINDS}")
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Skip:
    """One input (or one part of an input, such as a vertebra) left out, and why."""

    input: str
    kind: str
    reason: str


@dataclass(frozen=True)
class WorkItem:
    """One unit of work: ``name`` is how reports refer to it (a path, ``file.npz:train[12]``), ``patient`` the
    patient it belongs to ("" when the source has none), ``payload`` whatever the plan's ``load`` needs."""

    name: str
    patient: str
    payload: Any = None


Sample = tuple[str, np.ndarray, dict[str, Any]]  # key, image (H, W) or (H, W, 3) uint8, labels + metadata
LoadFn = Callable[[WorkItem], Iterable[Sample | Skip]]


@dataclass
class Plan:
    """Everything :func:`run_plan` needs; ``config`` (JSON values) and the item names define the output."""

    source: str  # e.g. "medmnist:pneumoniamnist"
    splits: dict[str, list[WorkItem]]
    load: LoadFn  # must pickle (a module-level function or a functools.partial of one)
    label_columns: tuple[str, ...]
    config: dict[str, Any]
    inputs: dict[str, str] = field(default_factory=dict)  # label tables and other small inputs: path -> sha256
    skipped: list[Skip] = field(default_factory=list)  # bad inputs already found while planning
    filtered: dict[str, int] = field(default_factory=dict)  # inputs left out by a rule (not errors): reason -> n


@dataclass(frozen=True)
class RunOptions:
    """How to run a plan (none of these change the samples, except ``items_per_shard`` the shard cut)."""

    workers: int = 0  # 0: in this process; n >= 1: a pool of n processes
    items_per_shard: int = 1000  # work items per shard (a volume yields several samples)
    image_format: str = "png"  # "png" | "npy"; images are uint8 in both
    on_bad: str = "skip"  # "skip": report and leave out bad inputs | "stop": the first one ends the run
    overwrite: bool = False  # replace a folder holding other shards (or restart instead of resuming)
    progress: bool = True  # tqdm bar on stderr

    def __post_init__(self) -> None:
        if self.workers < 0 or self.items_per_shard < 1:
            raise ValueError(f"workers={self.workers} must be >= 0, items_per_shard={self.items_per_shard} >= 1")
        if self.on_bad not in ("skip", "stop") or self.image_format not in ("png", "npy"):
            raise ValueError(f"on_bad={self.on_bad!r} must be 'skip' or 'stop', image_format="
                             f"{self.image_format!r} 'png' or 'npy'")


@dataclass
class PrepareResult:
    """What a run produced: the manifest, the skipped inputs, and how much was reused."""

    out_dir: Path
    manifest: dict[str, Any]
    skipped: list[Skip]
    shards_written: int = 0
    shards_resumed: int = 0  # finished shards of an interrupted run, kept
    already_done: bool = False  # the folder already held these shards; nothing was written

    def summary(self) -> str:
        """A few human-readable lines: counts per split and skipped inputs grouped by kind."""
        splits = self.manifest["splits"]
        lines = [f"{self.out_dir}: " + ", ".join(f"{s} {e['count']}" for s, e in splits.items())
                 + f" samples ({self.shards_written} shards written, {self.shards_resumed} resumed"
                 + (", already complete" if self.already_done else "") + ")"]
        lines += summarise_skips(self.skipped)
        filtered = self.manifest.get("prepare", {}).get("filtered", {})
        lines += [f"  filtered out: {n} ({reason})" for reason, n in filtered.items()]
        return "\n".join(lines)


def summarise_skips(skips: Sequence[Skip], examples: int = 3) -> list[str]:
    """Lines counting skipped inputs by kind, with the first few of each as examples."""
    if not skips:
        return ["  skipped inputs: none"]
    by_kind: dict[str, list[Skip]] = {}
    for skip in skips:
        by_kind.setdefault(skip.kind, []).append(skip)
    lines = [f"  skipped inputs: {len(skips)}"]
    for kind, group in sorted(by_kind.items()):
        lines.append(f"    {kind}: {len(group)}")
        lines += [f"      {s.input}: {s.reason}" for s in group[:examples]]
    return lines


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file, streamed."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to a temporary file in the same folder, then rename: readers never see half a file."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(temp, path)


# --- Splits ---------------------------------------------------------------------------------------------------


def assign_patient_splits(patients: Iterable[str], fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
                          seed: int = 0) -> dict[str, str]:
    """Patient id -> split, deterministic and independent of input order.

    Patients are ordered by a seeded SHA-256 of their id (a stable pseudo-random order that does not depend on
    how files were listed), then cut into consecutive groups whose sizes follow ``fractions`` by the
    largest-remainder rule; every split with a positive fraction gets at least one patient when there are
    enough patients. All images of a patient therefore land in one split.
    """
    unique = sorted(set(patients))
    names = [name for name, fraction in fractions.items() if fraction > 0]
    total = sum(fractions[name] for name in names)
    if not names or any(f < 0 for f in fractions.values()):
        raise ValueError(f"split fractions {dict(fractions)}: need at least one positive and none negative")
    exact = [len(unique) * fractions[name] / total for name in names]
    sizes = [int(x) for x in exact]
    for index in sorted(range(len(names)), key=lambda i: exact[i] - sizes[i], reverse=True)[:len(unique) - sum(sizes)]:
        sizes[index] += 1
    for index in range(len(names)):  # give empty splits one patient, taken from the largest
        if sizes[index] == 0 and len(unique) >= len(names):
            sizes[sizes.index(max(sizes))] -= 1
            sizes[index] = 1
    order = sorted(unique, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    assignment, start = {}, 0
    for name, size in zip(names, sizes):
        assignment.update({patient: name for patient in order[start:start + size]})
        start += size
    return assignment


def split_items_by_patient(items: Sequence[WorkItem], fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
                           seed: int = 0) -> dict[str, list[WorkItem]]:
    """Group items into splits by :func:`assign_patient_splits` (item order kept within a split)."""
    assignment = assign_patient_splits((item.patient for item in items), fractions, seed)
    splits: dict[str, list[WorkItem]] = {name: [] for name, fraction in fractions.items() if fraction > 0}
    for item in items:
        splits[assignment[item.patient]].append(item)
    return {name: chosen for name, chosen in splits.items() if chosen}


def check_patients_disjoint(splits: Mapping[str, Sequence[WorkItem]]) -> None:
    """``PrepareError`` naming a patient found in two splits (items without a patient id are not checked)."""
    seen: dict[str, str] = {}
    for split, items in splits.items():
        for item in items:
            if item.patient and seen.setdefault(item.patient, split) != split:
                raise PrepareError(f"patient {item.patient!r} is in splits {seen[item.patient]!r} and {split!r} "
                                   f"(e.g. {item.name}); a patient's images must share one split")


# --- Running a plan -------------------------------------------------------------------------------------------


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
    """All results of one item; an item-level ``BadInput`` drops every sample of the item."""
    try:
        return list(load(item))
    except BadInput as exc:
        return [Skip(item.name, exc.kind, str(exc))]


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
            raise PrepareError(f"{out}: holds shards of {manifest.get('source')!r} made with other settings or "
                               "inputs; pass overwrite=True (--overwrite) to replace them, or choose another folder")
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
    by_kind = Counter(skip.kind for skip in skips)
    return {
        "format_version": FORMAT_VERSION, "image_size": [height, width], "channels": channels,
        "image_format": options.image_format, "splits": splits, "checksums": checksums, "source": plan.source,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
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
    write_json_atomic(out / MANIFEST_NAME, manifest)  # the folder is complete from here on
    _verify_shards(out)
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    written = sum(1 for task in tasks if records[(task.split, task.index)]["shard"])
    return PrepareResult(out, read_manifest(out), skips, shards_written=written,
                         shards_resumed=len(manifest["checksums"]) - written)
