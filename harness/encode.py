"""Encode shards with a trained DAE into a latents table (id, split, labels, z_sem, optional x_T).

    accelerate launch -m harness.encode --model runs/dae-tiny/final --shards runs/data/phantoms-32 \\
        --splits train test --out runs/eval/latents.parquet [--x-T] [--invert-steps 250] [--overwrite]

Each process encodes its own share of every split (the evaluation loader gives every sample to exactly one
rank) and writes it in chunks under ``<out>.parts/``; a rerun skips the chunks already written, so a killed
job resumes. The chunks belong to one encoding: ``<out>.parts/fingerprint.json`` records the weights, the data
and the settings that made them, and a rerun with anything else discards them (with a note) instead of mixing
them in; a rerun to the same table under the other suffix (``z.npz`` -> ``z.parquet``) takes them over. The
main process then merges the chunks into one table, written atomically. Encoding uses no augmentation: latents
describe the images as they are. An existing ``--out`` is replaced only with ``--overwrite``; every argument is
checked before the model is loaded.
"""

from __future__ import annotations

import argparse
import glob
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from harness.cli import run_main
from harness.config import ConfigError
from harness.data import eval_loader
from harness.data.shards import ShardError, read_manifest
from harness.data.sources import check_shard_geometry
from harness.fileio import refuse_existing, write_json_atomic
from harness.fingerprint import differences, manifest_hash, weights_sha256
from harness.method.autoencoder import DiffusionAutoencoder
from harness.method.latents import LatentsTable, load_latents, save_latents
from harness.ops.tracking import local_model_dir

LATENTS_SUFFIXES = (".parquet", ".npz")  # what harness.method.latents.save_latents writes
PARTS_FINGERPRINT = "fingerprint.json"


def check_latents_path(path: str | Path) -> Path:
    """``path`` as a Path when its suffix names a latents format; a ConfigError (one line) otherwise."""
    path = Path(path)
    if path.suffix.lower() not in LATENTS_SUFFIXES:
        raise ConfigError(f"error: --out {path}: a latents table ends in {' or '.join(LATENTS_SUFFIXES)}, not "
                          f"{path.suffix or 'no suffix'!r}; choose e.g. {path.with_suffix('.parquet')}")
    return path


def parts_dir_for(out_path: str | Path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".parts")


def _stored_fingerprint(parts_dir: Path) -> dict | None:
    try:
        stored = json.loads((parts_dir / PARTS_FINGERPRINT).read_text())
    except (OSError, ValueError):
        return None
    return stored if isinstance(stored, dict) else None


def _discard(parts_dir: Path, fingerprint: dict) -> None:
    stored = _stored_fingerprint(parts_dir)
    why = "; ".join(differences(stored, fingerprint)[:4]) if stored is not None else "no fingerprint"
    print(f"note: discarding the chunks in {parts_dir}: they were made by another encoding ({why or 'same'})",
          file=sys.stderr)
    shutil.rmtree(parts_dir)


def claim_parts_dir(out_path: Path, fingerprint: dict) -> Path:
    """The chunk folder of ``out_path``, holding only chunks made by ``fingerprint``; returns its path.

    Main process only, before any rank writes. The chunk folders of the same table under another suffix (a run
    to ``z.npz`` interrupted, rerun to ``z.parquet``) are reused when they hold the same encoding and discarded
    otherwise; every discard is said on stderr. A folder without a fingerprint is of unknown origin (an older
    version's) and is discarded too.
    """
    parts_dir = parts_dir_for(out_path)
    if parts_dir.exists() and _stored_fingerprint(parts_dir) != fingerprint:
        _discard(parts_dir, fingerprint)
    siblings = sorted(p for p in out_path.parent.glob(f"{glob.escape(out_path.stem)}.*.parts")
                      if p != parts_dir and p.is_dir() and Path(p.name[:-len(".parts")]).stem == out_path.stem)
    for sibling in siblings:
        if not parts_dir.exists() and _stored_fingerprint(sibling) == fingerprint:
            print(f"note: resuming from the chunks in {sibling} (the same encoding, written for another suffix)",
                  file=sys.stderr)
            sibling.replace(parts_dir)
        else:
            _discard(sibling, fingerprint)
    return parts_dir


def _chunk_path(parts_dir: Path, split: str, rank: int, index: int) -> Path:
    return parts_dir / f"{split}-rank{rank:03d}-{index:06d}.npz"


def encode_split(ae: DiffusionAutoencoder, shard_dir: str | Path, split: str, parts_dir: str | Path, *,
                 batch_size: int = 64, with_x_T: bool = False, invert_steps: int | None = None,
                 image_size: int | None = None, channels: int = 1, rank: int = 0, world_size: int = 1,
                 batches_per_chunk: int = 8, progress: bool = True) -> list[Path]:
    """Encode this rank's share of ``split`` into chunk files; existing chunks are kept (resume)."""
    parts_dir = Path(parts_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    loader = eval_loader(shard_dir, batch_size, split=split, image_size=image_size, channels=channels,
                         rank=rank, world_size=world_size)
    written: list[Path] = []
    pending: list[dict] = []
    chunk_index = 0

    def flush() -> None:
        nonlocal chunk_index, pending
        path = _chunk_path(parts_dir, split, rank, chunk_index)
        if pending and not path.exists():
            arrays = {
                "id": np.concatenate([b["id"] for b in pending]),
                "z_sem": np.concatenate([b["z_sem"] for b in pending]),
            }
            for column in pending[0]["labels"]:
                arrays[f"label_{column}"] = np.concatenate([b["labels"][column] for b in pending])
            if with_x_T:
                arrays["x_T"] = np.concatenate([b["x_T"] for b in pending])
            tmp = path.with_name(f".tmp-{path.name}")
            with open(tmp, "wb") as handle:
                np.savez(handle, **arrays)
            tmp.replace(path)
        if pending or path.exists():
            written.append(path)
        pending, chunk_index = [], chunk_index + 1

    bar = tqdm(desc=f"encode {split} (rank {rank})", unit="img", disable=not progress)
    for batch_number, batch in enumerate(loader):
        done = _chunk_path(parts_dir, split, rank, chunk_index).exists()
        if not done:  # resume: batches of finished chunks are read but not encoded again
            x = batch["image"]  # (B, C, H, W) in [-1, 1]
            z = ae.encode(x)
            item = {"id": np.asarray(batch["key"]), "z_sem": z.numpy().astype(np.float32),
                    "labels": {k: v.numpy() for k, v in batch["labels"].items()}}
            if with_x_T:
                item["x_T"] = ae.invert(x, z, invert_steps).numpy().astype(np.float32)
            pending.append(item)
        bar.update(len(batch["key"]))
        if (batch_number + 1) % batches_per_chunk == 0:
            flush()
    if pending:
        flush()
    bar.close()
    return written


def merge_chunks(parts_dir: str | Path, splits: list[str], meta: dict | None = None) -> LatentsTable:
    """Read every chunk of ``splits`` (all ranks) into one table sorted by split then id (rank-independent)."""
    tables = []
    for split in splits:
        for path in sorted(Path(parts_dir).glob(f"{split}-rank*.npz")):
            with np.load(path, allow_pickle=False) as data:
                labels = {k[len("label_"):]: data[k] for k in data.files if k.startswith("label_")}
                tables.append(LatentsTable(ids=data["id"].astype(str), splits=np.full(len(data["id"]), split),
                                           z_sem=data["z_sem"], labels=labels,
                                           x_T=data["x_T"] if "x_T" in data.files else None, meta={}))
    if not tables:
        raise FileNotFoundError(f"no encoded chunks for splits {splits} in {parts_dir}")
    table = LatentsTable.concat(tables)
    order = np.lexsort((table.ids, table.splits))
    x_T = table.x_T[order] if table.x_T is not None else None
    return LatentsTable(ids=table.ids[order], splits=table.splits[order], z_sem=table.z_sem[order],
                        labels={k: v[order] for k, v in table.labels.items()}, x_T=x_T, meta=meta or {})


def _rows_in(chunks: list[Path]) -> int:
    """Rows of this rank's chunk files, resumed ones included."""
    total = 0
    for path in chunks:
        with np.load(path, allow_pickle=False) as data:
            total += len(data["id"])
    return total


def check_every_image_encoded(shard_dir: str | Path, local_rows: dict[str, int],
                              world_size: int = 1) -> dict[str, int] | None:
    """Each split's rows summed over the processes, checked against the shard manifest's count.

    The sum is torchmetrics' ``SumMetric``: an all-reduce across the ranks when ``torch.distributed`` runs (the
    launcher's processes). Every rank gets the totals, so every rank stops alike when an image was encoded twice or
    not at all (a rank split that lost or doubled samples). Ranks called one after another in one process (no
    process group) cannot be summed: None, unchecked."""
    from torchmetrics.aggregation import SumMetric

    if world_size > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    manifest = read_manifest(shard_dir)
    totals = {}
    for split, rows in local_rows.items():
        metric = SumMetric()
        metric.update(torch.tensor(float(rows), dtype=torch.float64))
        totals[split] = int(metric.compute().item())
        expected = int(manifest["splits"][split]["count"])
        if totals[split] != expected:
            raise ShardError(f"error: {shard_dir}: encoded {totals[split]} images of split {split!r} over "
                             f"{world_size} process(es), the manifest holds {expected}: every image must be encoded "
                             "exactly once; rerun without a changed --batch-size or process count, or with --overwrite")
    return totals


def encode_to_table(ae: DiffusionAutoencoder, shard_dir: str | Path, splits: list[str], out_path: str | Path, *,
                    rank: int = 0, world_size: int = 1, barrier=lambda: None, meta: dict | None = None,
                    **kwargs) -> Path | None:
    """Encode ``splits`` over all ranks and write ``out_path`` (main rank). Returns the path on rank 0.

    Resumes from the chunks of an interrupted run of the same encoding (same weights, data, settings and number
    of processes); chunks of any other encoding are discarded first.
    """
    out_path = check_latents_path(out_path)
    parts_dir = parts_dir_for(out_path)
    # What made the table: the weights, the data and the encoding settings (harness.fingerprint).
    made_by = {"weights_sha256": weights_sha256(ae.dae), "data_manifest_sha256": manifest_hash(shard_dir),
               "shard_dir": str(shard_dir), "splits": list(splits), "precision": ae.precision,
               **{k: v for k, v in kwargs.items() if k in ("with_x_T", "invert_steps", "image_size", "channels")}}
    # The chunks also depend on how the samples were cut into them: batch size, chunk length, process count.
    chunk_fingerprint = {**made_by, "batch_size": kwargs.get("batch_size", 64),
                         "batches_per_chunk": kwargs.get("batches_per_chunk", 8), "world_size": world_size}
    if rank == 0:
        claim_parts_dir(out_path, chunk_fingerprint)
    barrier()
    if not (parts_dir / PARTS_FINGERPRINT).is_file():  # every rank writes the same bytes; the rename is atomic
        write_json_atomic(parts_dir / PARTS_FINGERPRINT, chunk_fingerprint)
    local_rows = {}
    for split in splits:
        written = encode_split(ae, shard_dir, split, parts_dir, rank=rank, world_size=world_size, **kwargs)
        local_rows[split] = _rows_in(written)
    check_every_image_encoded(shard_dir, local_rows, world_size)
    barrier()
    if rank != 0:
        return None
    table = merge_chunks(parts_dir, splits, {**(meta or {}), "fingerprint": made_by})
    save_latents(table, out_path)
    shutil.rmtree(parts_dir, ignore_errors=True)
    return out_path


def check_arguments(args: argparse.Namespace) -> None:
    """Every argument a user can get wrong, checked before the model is loaded (one ``error:`` line each)."""
    if args.batch_size < 1:
        raise ConfigError(f"error: --batch-size {args.batch_size}: must be a whole number of at least 1")
    if args.invert_steps is not None and args.invert_steps < 1:
        raise ConfigError(f"error: --invert-steps {args.invert_steps}: must be at least 1 (or left out for the "
                          "model's own)")
    out = check_latents_path(args.out)
    refuse_existing(out, args.overwrite, what="the latents table")
    if not (Path(args.shards) / "manifest.json").is_file():
        raise FileNotFoundError(f"error: --shards {args.shards}: no manifest.json there; pass a folder written "
                                "by `dae-cf prepare`")


def main(argv: list[str] | None = None) -> Path | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="exported model folder, checkpoint folder or MLflow URI")
    parser.add_argument("--shards", required=True, help="shard folder with manifest.json")
    parser.add_argument("--splits", nargs="+", default=["train", "val", "test"])
    parser.add_argument("--out", required=True, help="latents table (.parquet or .npz)")
    parser.add_argument("--x-T", dest="with_x_T", action="store_true", help="also store x_T by DDIM inversion")
    parser.add_argument("--invert-steps", type=int, default=None,
                        help="DDIM steps of the inversion to x_T (default: the model's config)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    check_arguments(args)

    import torch
    from accelerate import PartialState  # entry point only: ranks come from the launcher

    state = PartialState(cpu=not torch.cuda.is_available())
    ae = DiffusionAutoencoder.load(local_model_dir(args.model), device=state.device, batch_size=args.batch_size)
    # Images the model was not trained on (another size, grey for colour) are refused, not converted silently.
    check_shard_geometry(args.shards, ae.dae.spec.image_size, ae.dae.in_channels,
                         subject=f"the model {args.model} takes {{key}} {{value}}",
                         remedy="encode shards prepared for this model, or use a model trained on these")
    out = encode_to_table(ae, args.shards, args.splits, args.out, rank=state.process_index,
                          world_size=state.num_processes, barrier=state.wait_for_everyone,
                          batch_size=args.batch_size, with_x_T=args.with_x_T, invert_steps=args.invert_steps,
                          image_size=ae.dae.spec.image_size, channels=ae.dae.in_channels,
                          progress=state.is_main_process, meta={"model": str(args.model)})
    if out is not None:
        table = load_latents(out)
        print(f"latents: {out} ({len(table)} rows, z_dim {table.z_sem.shape[1]})")
    return out


if __name__ == "__main__":
    sys.exit(run_main(main))
