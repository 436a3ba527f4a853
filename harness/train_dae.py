"""Train a Diffusion Autoencoder over WebDataset shards with Accelerate.

    accelerate launch harness/train_dae.py [--config jobs/phantoms_tiny.yaml] [--resume] [--train.lr=1e-4 ...]

With no arguments it trains ``tiny-32`` on the embedded phantom shards (generated on first use) on the CPU.
The budget is counted in samples, as the paper's 12M, not in epochs. Loss (paper Eq. 1):
L = E || eps_theta(x_t, t, z_sem) - eps ||^2 with z_sem = Enc(x_0), both networks trained jointly; optionally a
v target (diffusion.prediction=v), Min-SNR weights (diffusion.loss_weighting=min_snr) and an intensity-jittered
encoder input z_sem = Enc(jitter(x_0)) (train.encoder_jitter > 0) while the UNet still denoises x_0.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import load as accelerate_load
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from harness import checkpoint as ckpt
from harness.cli import run_main
from harness.config import RunConfig, dump_yaml, flatten, load_config
from harness.data import AugmentSpec, eval_loader, photometric_jitter, train_loader
from harness.data.sources import check_shards_match, ensure_shards
from harness.diffusion import alphas_cumprod, diffusion_loss, linear_betas
from harness.distributed import deepspeed_plugin
from harness.figures import save_image_grid
from harness.fileio import write_json_atomic
from harness.fingerprint import RUN_RECORD, check_run_folder, clear_run_folder, manifest_hash, run_fingerprint
from harness.method.autoencoder import DiffusionAutoencoder
from harness.model_spec import write_model_spec
from harness.models import DAE, build_dae
from harness.ops.tracking import Tracker
from harness.training_probe import probe_from_config


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML run file (default: built-in tiny-32 phantom run)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in out_dir (only with the settings it started with)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an out_dir that holds a run (deletes its checkpoints and final model)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite in out_dir)")
    return parser.parse_known_args(argv)


@torch.no_grad()
def update_ema(ema: DAE, model: DAE, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameters in fp32; buffers copied."""
    ema_params = list(ema.parameters())
    torch._foreach_lerp_(ema_params, [p.detach().float() for p in model.parameters()], 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers(), strict=True):
        b_ema.copy_(b)


def ema_decay_at(step: int, target: float) -> float:
    # Warm-up (1 + s) / (10 + s): a short run's EMA is not stuck at the random initialisation.
    return min(target, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def preview(ema: DAE, config: RunConfig, images: torch.Tensor, path: Path) -> float:
    """Save inputs / reconstructions / decodes with a random x_T; return the reconstruction MSE."""
    ae = DiffusionAutoencoder.from_config(ema, config, device=images.device, batch_size=config.eval.batch_size,
                                          precision=config.eval.precision)
    z = ae.encode(images)
    recon = ae.decode(z, ae.invert(images, z))
    # What z_sem alone carries. A generator of its own: drawing from the global one would shift the training
    # noise after every preview, so a run extended with --resume would differ from one trained straight through.
    generator = torch.Generator(images.device).manual_seed(config.train.seed)
    random_xT = ae.decode(z, torch.randn(images.shape, generator=generator, device=images.device), from_noise=True)
    n = images.shape[0]
    save_image_grid(torch.cat([images, recon, random_xT]).cpu(), path, nrow=n,
                    suptitle=f"rows: input / reconstruction (MSE {torch.mean((recon - images) ** 2).item():.4f}) / "
                             "z_sem decoded from a random x_T")
    return torch.mean((recon - images) ** 2).item()


def main(argv: list[str] | None = None) -> dict:
    args, overrides = parse_args(argv)
    if args.tracking_uri:
        overrides.append(f"--track.tracking_uri={args.tracking_uri}")
    config = load_config(args.config, overrides)
    tc = config.train
    out_dir = Path(tc.out_dir)
    ckpt_root = out_dir / "checkpoints"

    # Set up processes and precision.
    # cpu=True without CUDA: processes started by a launcher then join over gloo instead of silently running alone.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=tc.mixed_precision,
                              gradient_accumulation_steps=tc.grad_accum, deepspeed_plugin=deepspeed_plugin(tc))
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    per_process_batch = tc.per_process_batch(world)
    is_main = accelerator.is_main_process
    # Build the model first: an impossible architecture is refused before any data is written.
    # Same seed on every rank so the EMA copies agree with the broadcast weights.
    set_seed(tc.seed)
    dae = build_dae(config.model.size, in_channels=config.data.channels,
                    **config.model.overrides(config.data.image_size))

    # Data and run folder: made (or checked) by the main process; a folder made from other settings stops here.
    out_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        ensure_shards(config.data)
    accelerator.wait_for_everyone()
    shard_dir = Path(config.data.shard_dir)
    check_shards_match(config.data, shard_dir)
    fingerprint = run_fingerprint(config, manifest_hash(shard_dir))
    action = check_run_folder(out_dir, fingerprint, resume=args.resume, overwrite=args.overwrite)
    if is_main:
        if action == "overwrite":
            clear_run_folder(out_dir)
        write_json_atomic(out_dir / RUN_RECORD, {"fingerprint": fingerprint})
    accelerator.wait_for_everyone()
    if tc.channels_last:
        dae = dae.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(dae).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(dae.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    if tc.compile:
        dae.compile()
    model, optimizer = accelerator.prepare(dae, optimizer)
    ema.to(device)
    d = config.diffusion
    alpha_bar = alphas_cumprod(linear_betas(d.num_timesteps, d.beta_start, d.beta_end)).to(device)
    set_seed(tc.seed + rank)  # different noise and timesteps per rank

    # Resume: weights, optimizer, RNG (Accelerate), EMA and counters (ours), MLflow run.
    step, run_id = 0, None
    resume_from = ckpt.latest_checkpoint(ckpt_root) if action == "resume" else None
    if resume_from is not None:
        state = ckpt.read_json(resume_from / "trainer_state.json")
        rng_file = ckpt.random_state_file(resume_from, rank, state.get("world_size"))
        if rng_file is not None:
            try:  # Accelerate only logs (at info level) when it cannot restore the random state, then carries on
                accelerate_load(rng_file)
            except Exception as err:
                raise ckpt.CheckpointError(f"cannot restore the random state from {rng_file}: {err}") from err
        accelerator.load_state(str(resume_from))
        if rng_file is None:  # more processes than wrote the checkpoint: Accelerate skipped the missing file
            set_seed(tc.seed + rank + state["step"])  # not the fresh run's seed: its noise would repeat
            print(f"rank {rank}: {resume_from} was written by fewer processes; this rank starts from a fresh seed",
                  flush=True)
        ema.load_state_dict(ckpt.load_state_dict(resume_from / "ema.safetensors"))
        step, run_id = state["step"], state.get("mlflow_run_id")
        accelerator.print(f"resumed from {resume_from} at {state['samples_seen']:,} samples")
    total_steps = math.ceil(tc.total_samples / tc.batch_size)

    tracker = Tracker(config.track if is_main else dataclasses.replace(config.track, enabled=False), out_dir,
                      run_name=out_dir.name, run_id=run_id)
    if is_main:
        n_params = dae.num_parameters()
        accelerator.print(f"model {config.model.size}: {n_params / 1e6:.2f}M parameters "
                          f"(encoder {sum(p.numel() for p in dae.encoder.parameters()) / 1e6:.2f}M); "
                          f"{world} process(es) x batch {per_process_batch} x accum {tc.grad_accum}; "
                          f"{total_steps:,} optimizer steps for {tc.total_samples:,} samples on {device}")
        (out_dir / "config.yaml").write_text(dump_yaml(config))
        tracker.log_params({**flatten(config), "model.parameters": n_params, "world_size": world})
        tracker.log_artifact(out_dir / "config.yaml")

    augment = AugmentSpec(**dataclasses.asdict(config.data.augment)) if config.data.augment.enabled else None
    loader = train_loader(shard_dir, per_process_batch, split="train", image_size=config.data.image_size,
                          channels=config.data.channels, augment=augment, num_workers=config.data.num_workers,
                          seed=config.data.seed, rank=rank, world_size=world, start_batch=step * tc.grad_accum,
                          on_error=config.data.on_error)
    preview_images = None
    if is_main:
        first = next(iter(eval_loader(shard_dir, tc.preview_images, split="val", image_size=config.data.image_size,
                                      channels=config.data.channels)))
        preview_images = first["image"].to(device)
    probe_batch = None  # labelled validation images: is the method already working? (harness.training_probe)
    if is_main and tc.probe_images > 0 and config.heads.tasks:
        probe_batch = next(iter(eval_loader(shard_dir, tc.probe_images, split="val",
                                            image_size=config.data.image_size, channels=config.data.channels)))

    def save_checkpoint(samples_seen: int) -> Path:
        final = ckpt_root / ckpt.checkpoint_name(samples_seen)
        tmp = ckpt.temporary_path(final)
        try:
            accelerator.save_state(str(tmp), safe_serialization=True)  # every rank writes its RNG state
            accelerator.wait_for_everyone()
            if is_main:
                ckpt.save_state_dict(ema.state_dict(), tmp / "ema.safetensors")
                (tmp / "config.yaml").write_text(dump_yaml(config))
                write_model_spec(tmp, config)  # the folder loads on its own (harness.model_spec)
                (tmp / "trainer_state.json").write_text(json.dumps(
                    {"step": step, "samples_seen": samples_seen, "mlflow_run_id": tracker.run_id,
                     "world_size": world}))
                ckpt.publish(tmp, final)
                ckpt.prune(ckpt_root, tc.keep_checkpoints)
        except Exception as err:  # a full disk or a lost permission: say where, and that nothing saved is lost
            shutil.rmtree(tmp, ignore_errors=True)  # give back the space the failed save took
            raise ckpt.CheckpointError(
                f"could not write checkpoint {final}: {err}; the previous checkpoint "
                f"({ckpt.latest_checkpoint(ckpt_root) or 'none'}) is intact: free space or fix permissions, "
                "then rerun with --resume") from err
        accelerator.wait_for_everyone()
        return final

    # Train.
    model.train()
    data_iter = iter(loader)
    bar = tqdm(total=total_steps, initial=step, disable=not is_main, unit="step", dynamic_ncols=True)
    loss_sum, loss_count, window_start, window_samples = torch.zeros((), device=device), 0, time.perf_counter(), 0
    images_per_s, last_loss, recon_mse = 0.0, float("nan"), float("nan")
    while step < total_steps:
        # Accumulate gradients.
        for _ in range(tc.grad_accum):
            batch = next(data_iter)
            x0 = batch["image"].to(device, non_blocking=True)  # (B, C, H, W) in [-1, 1]
            if tc.record_keys:
                with open(out_dir / f"keys_rank{rank}.txt", "a") as handle:
                    handle.write("\n".join(batch["key"]) + "\n")
            if tc.channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            # The encoder may see a photometrically jittered x_0; the UNet always denoises the original.
            x_cond = photometric_jitter(x0, tc.encoder_jitter)  # (B, C, H, W); x0 itself when off
            with accelerator.accumulate(model):
                loss = diffusion_loss(functools.partial(model, x_cond=x_cond), x0, alpha_bar, prediction=d.prediction,
                                      weighting=d.loss_weighting, snr_gamma=d.snr_gamma)
                accelerator.backward(loss)
                if accelerator.sync_gradients and tc.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            loss_count += 1
        step += 1
        samples_seen = step * tc.batch_size
        window_samples += tc.batch_size

        # Update EMA.
        update_ema(ema, accelerator.unwrap_model(model), ema_decay_at(step, tc.ema_decay))

        # Log, checkpoint, preview: on sample-count boundaries so they do not depend on the batch size.
        def crossed(every: int, seen: int = samples_seen) -> bool:
            return seen // every != (seen - tc.batch_size) // every

        if crossed(tc.log_every) or step == total_steps:
            last_loss = accelerator.reduce(loss_sum / loss_count, "mean").item()
            images_per_s = window_samples / (time.perf_counter() - window_start)
            loss_sum.zero_()
            loss_count, window_start, window_samples = 0, time.perf_counter(), 0
            tracker.log_metrics({"train/loss": last_loss, "train/images_per_s": images_per_s}, step=samples_seen)
            bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{images_per_s:.1f}")
        if is_main and (crossed(tc.preview_every) or step == total_steps):
            grid = out_dir / "previews" / f"{ckpt.checkpoint_name(samples_seen)}.png"
            recon_mse = preview(ema, config, preview_images, grid)
            tracker.log_metrics({"val/recon_mse": recon_mse}, step=samples_seen)
            if probe_batch is not None:
                probe = probe_from_config(ema, config, probe_batch, device)
                tracker.log_metrics({f"probe/{k}": v for k, v in probe.items() if v == v}, step=samples_seen)
                bar.write(f"probe at {samples_seen:,} samples: " + ", ".join(f"{k} {v:.3f}" for k, v in probe.items()))
            tracker.log_artifact(grid, "previews")
        if crossed(tc.checkpoint_every) or step == total_steps:
            save_checkpoint(samples_seen)
        bar.update(1)
    bar.close()

    # Export the EMA model and register it.
    result = {"out_dir": str(out_dir), "samples_seen": total_steps * tc.batch_size}
    if is_main:
        # Written beside, then renamed: a crash leaves the previous final model or the new one, never half of one.
        final_dir = out_dir / "final"
        staging = ckpt.temporary_path(final_dir)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        ckpt.save_state_dict(ema.state_dict(), staging / "ema.safetensors")
        (staging / "config.yaml").write_text(dump_yaml(config))
        write_model_spec(staging, config)
        summary = {"size": config.model.size, "parameters": dae.num_parameters(), "recon_mse": recon_mse,
                   "final_loss": last_loss, "images_per_s": images_per_s, **result}
        (staging / "model.json").write_text(json.dumps(summary, indent=2))
        ckpt.publish(staging, final_dir)
        version = None
        if config.track.registered_model:
            version = tracker.register_model(final_dir, config.track.registered_model,
                                             tags={"recon_mse": f"{recon_mse:.6f}", "size": config.model.size})
        tracker.end()
        result.update(summary, model_dir=str(final_dir), mlflow_uri=tracker.uri, mlflow_run_id=tracker.run_id,
                      registered_version=version, previews=str(out_dir / "previews"))
        print(f"checkpoint: {ckpt.latest_checkpoint(ckpt_root)}\nmodel:      {final_dir}\n"
              f"previews:   {out_dir / 'previews'}\nmlflow:     {tracker.uri} (run {tracker.run_id}"
              f"{f', model {config.track.registered_model} v{version}' if version else ''})")
    accelerator.end_training()
    return result


if __name__ == "__main__":
    sys.exit(run_main(main))
