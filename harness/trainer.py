"""The DAE trainer in four stages you can read one at a time: ``setup`` / ``resume`` / ``step`` / ``export``.

    trainer = Trainer(config, resume=None, overwrite=False)
    trainer.setup()     # processes, model, run folder, optimizer, data, tracker; refuses bad input before any work
    trainer.resume()    # weights, optimizer, RNG, EMA and counters from a verified checkpoint (when asked)
    while not trainer.done:
        trainer.step()  # one optimizer step, the EMA, and the logs / previews / checkpoints it crosses
    result = trainer.export()  # the EMA model in <out_dir>/final, registered in MLflow when asked

With ``train.readiness`` on, the training probe's verdict (``harness.evaluation.readiness``) may end the loop before
the budget: the main process decides, every rank follows (:func:`share_from_main`), and the run checkpoints and
exports as at a normal end, with ``readiness.json`` in the model folder.

``harness/train_dae.py`` is the thin entry point (``accelerate launch harness/train_dae.py ...``) that parses the
command line and calls :meth:`Trainer.fit`. Loss (paper Eq. 1): L = E || eps_theta(x_t, t, z_sem) - eps ||^2 with
z_sem = Enc(x_0), both networks trained jointly; optionally a v target, Min-SNR weights and an intensity-jittered
encoder input z_sem = Enc(jitter(x_0)) while the UNet still denoises x_0. The budget counts samples, not epochs.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from accelerate.utils import load as accelerate_load
from tqdm.auto import tqdm

from harness import checkpoint as ckpt
from harness.config import ConfigError, RunConfig, dump_yaml, flatten
from harness.data import AugmentSpec, eval_loader, photometric_jitter, train_loader
from harness.data.sources import check_shards_match, ensure_shards
from harness.diffusion import alphas_cumprod, diffusion_loss, linear_betas
from harness.distributed import deepspeed_plugin
from harness.evaluation.figures import save_image_grid
from harness.evaluation.readiness import BUDGET_SPENT, READINESS_FILE, ReadinessVerdict, assess_readiness
from harness.evaluation.training_probe import probe_from_config
from harness.fileio import finite, write_json_atomic
from harness.fingerprint import RUN_RECORD, check_run_folder, clear_run_folder, manifest_hash, run_fingerprint
from harness.method.autoencoder import DiffusionAutoencoder
from harness.model_spec import write_model_spec
from harness.models import DAE, build_dae
from harness.ops.tracking import Tracker


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


def share_from_main(accelerator: Accelerator, value: Any) -> Any:
    """The main process's ``value`` on every rank (a collective: every rank must call it at the same point)."""
    if accelerator.num_processes == 1:
        return value
    return broadcast_object_list([value if accelerator.is_main_process else None], from_process=0)[0]


def arithmetic() -> dict[str, Any]:
    """What decides the last bits of a CPU run's floats: the same job on another machine (another instruction set,
    another thread count) trains a slightly different model. Recorded in ``model.json`` so results can be compared."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


class Trainer:
    """One training run of ``config``; see the module docstring for the order of the stages."""

    def __init__(self, config: RunConfig, resume: Literal["latest", "previous"] | None = None,
                 overwrite: bool = False) -> None:
        self.config, self.tc = config, config.train
        self.resume_mode, self.overwrite = resume, overwrite
        self.out_dir = Path(self.tc.out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.step_index, self.run_id = 0, None
        self.resume_from: Path | None = None
        self.loss_sum: torch.Tensor | None = None
        self.loss_count, self.window_samples = 0, 0
        self.window_start = time.perf_counter()
        self.images_per_s, self.last_loss, self.recon_mse = 0.0, float("nan"), float("nan")
        # Train until ready: the probes so far, the latest verdict, and why the run stops early (None: it does not).
        self.readiness = config.train.readiness
        self.readiness_history: list[dict[str, Any]] = []
        self.verdict: ReadinessVerdict | None = None
        self.stop_reason: str | None = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Processes, model, data and run folder (checked before anything is written), optimizer."""
        config, tc = self.config, self.tc
        self._check_readiness()
        # cpu=True without CUDA: processes started by a launcher then join over gloo instead of silently running
        # alone.
        accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=tc.mixed_precision,
                                  gradient_accumulation_steps=tc.grad_accum, deepspeed_plugin=deepspeed_plugin(tc))
        self.accelerator = accelerator
        self.device, self.rank, self.world = accelerator.device, accelerator.process_index, accelerator.num_processes
        self.per_process_batch = tc.per_process_batch(self.world)
        self.is_main = is_main = accelerator.is_main_process
        # Build the model first: an impossible architecture is refused before any data is written.
        # Same seed on every rank so the EMA copies agree with the broadcast weights.
        set_seed(tc.seed)
        dae = build_dae(config.model.size, in_channels=config.data.channels,
                        **config.model.overrides(config.data.image_size))

        # Data and run folder: made (or checked) by the main process; a folder made from other settings stops
        # here, and out_dir is created only once every check has passed.
        if is_main:
            ensure_shards(config.data)
        accelerator.wait_for_everyone()
        self.shard_dir = shard_dir = Path(config.data.shard_dir)
        check_shards_match(config.data, shard_dir)
        fingerprint = run_fingerprint(config, manifest_hash(shard_dir))
        action = check_run_folder(self.out_dir, fingerprint, resume=self.resume_mode is not None,
                                  overwrite=self.overwrite)
        # Every file of the checkpoint to resume from is verified before anything is loaded (harness.checkpoint).
        damaged: list[Path] = []
        if action == "resume":
            self.resume_from, damaged = ckpt.resume_checkpoint(self.ckpt_root, self.resume_mode or "latest")
        accelerator.wait_for_everyone()  # every rank has chosen before the damaged ones are moved
        if is_main:
            for folder in damaged:
                accelerator.print(f"note: {folder} is damaged; set aside as {ckpt.set_aside(folder)}")
            if action == "overwrite":
                clear_run_folder(self.out_dir)
            write_json_atomic(self.out_dir / RUN_RECORD, {"fingerprint": fingerprint})
        accelerator.wait_for_everyone()

        if tc.channels_last:
            dae = dae.to(memory_format=torch.channels_last)
        self.dae = dae
        self.ema = copy.deepcopy(dae).requires_grad_(False).eval()
        optimizer = torch.optim.AdamW(dae.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        if tc.compile:
            dae.compile()
        self.model, self.optimizer = accelerator.prepare(dae, optimizer)
        self.ema.to(self.device)
        d = config.diffusion
        self.alpha_bar = alphas_cumprod(linear_betas(d.num_timesteps, d.beta_start, d.beta_end)).to(self.device)
        set_seed(tc.seed + self.rank)  # different noise and timesteps per rank
        self.total_steps = math.ceil(tc.total_samples / tc.batch_size)
        self.loss_sum = torch.zeros((), device=self.device)

    def _check_readiness(self) -> None:
        """What ``train.readiness`` needs from the other sections, refused before any work."""
        r, config = self.readiness, self.config
        if not r.enabled:
            return
        if not config.heads.tasks:
            raise ConfigError("train.readiness.enabled: the training probe needs a task: set heads.tasks, or "
                              "turn readiness off")
        if r.z_usage_t >= config.diffusion.num_timesteps:
            raise ConfigError(f"train.readiness.z_usage_t={r.z_usage_t}: must be below diffusion.num_timesteps "
                              f"({config.diffusion.num_timesteps})")

    def _assess(self, samples_seen: int) -> ReadinessVerdict:
        return assess_readiness(self.readiness_history, self.readiness, samples_seen=samples_seen,
                                total_samples=self.tc.total_samples)

    # ------------------------------------------------------------------ resume
    def resume(self) -> None:
        """Weights, optimizer, RNG (Accelerate), EMA and counters (ours) from the verified checkpoint, then the
        tracker (continuing the MLflow run) and the data stream from the resumed batch. Also starts a fresh run's."""
        accelerator, tc, config = self.accelerator, self.tc, self.config
        if self.resume_from is not None:
            folder = self.resume_from
            state = ckpt.read_json(folder / "trainer_state.json")
            rng_file = ckpt.random_state_file(folder, self.rank, state.get("world_size"))
            if rng_file is not None:
                try:  # Accelerate only logs (at info level) when it cannot restore the random state, then goes on
                    accelerate_load(rng_file)
                except Exception as err:
                    raise ckpt.CheckpointError(f"cannot restore the random state from {rng_file}: {err}") from err
            accelerator.load_state(str(folder))
            if rng_file is None:  # more processes than wrote the checkpoint: Accelerate skipped the missing file
                set_seed(tc.seed + self.rank + state["step"])  # not the fresh run's seed: its noise would repeat
                print(f"rank {self.rank}: {folder} was written by fewer processes; this rank starts from a fresh "
                      "seed", flush=True)
            self.ema.load_state_dict(ckpt.load_state_dict(folder / "ema.safetensors"))
            self.step_index, self.run_id = state["step"], state.get("mlflow_run_id")
            accelerator.print(f"resumed from {folder} at {state['samples_seen']:,} samples")
            # Every rank re-judges the saved probes by the current thresholds: a run that stopped as ready (or not
            # improving) stays stopped, one resumed with other thresholds or a larger budget may go on.
            self.readiness_history = list(state.get("readiness_history", []))
            if self.readiness.enabled and self.readiness_history:
                self.verdict = self._assess(state["samples_seen"])
                if self.verdict.should_stop and self.verdict.stopped_because != BUDGET_SPENT:
                    self.stop_reason = self.verdict.stopped_because

        is_main = self.is_main
        self.tracker = Tracker(config.track if is_main else dataclasses.replace(config.track, enabled=False),
                               self.out_dir, run_name=self.out_dir.name, run_id=self.run_id)
        if is_main:
            n_params = self.dae.num_parameters()
            accelerator.print(f"model {config.model.size}: {n_params / 1e6:.2f}M parameters "
                              f"(encoder {sum(p.numel() for p in self.dae.encoder.parameters()) / 1e6:.2f}M); "
                              f"{self.world} process(es) x batch {self.per_process_batch} x accum {tc.grad_accum}; "
                              f"{self.total_steps:,} optimizer steps for {tc.total_samples:,} samples on "
                              f"{self.device}")
            (self.out_dir / "config.yaml").write_text(dump_yaml(config))
            self.tracker.log_params({**flatten(config), "model.parameters": n_params, "world_size": self.world})
            self.tracker.log_artifact(self.out_dir / "config.yaml")
        self._open_data()
        self.model.train()
        self.bar = tqdm(total=self.total_steps, initial=self.step_index, disable=not is_main, unit="step",
                        dynamic_ncols=True)
        self.window_start, self.window_samples = time.perf_counter(), 0

    def _open_data(self) -> None:
        config, tc, shard_dir = self.config, self.tc, self.shard_dir
        augment = AugmentSpec(**dataclasses.asdict(config.data.augment)) if config.data.augment.enabled else None
        loader = train_loader(shard_dir, self.per_process_batch, split="train", image_size=config.data.image_size,
                              channels=config.data.channels, augment=augment, num_workers=config.data.num_workers,
                              seed=config.data.seed, rank=self.rank, world_size=self.world,
                              start_batch=self.step_index * tc.grad_accum, on_error=config.data.on_error)
        self.data_iter = iter(loader)
        self.preview_images = None
        if self.is_main:
            first = next(iter(eval_loader(shard_dir, tc.preview_images, split="val",
                                          image_size=config.data.image_size, channels=config.data.channels)))
            self.preview_images = first["image"].to(self.device)
        self.probe_batch = None  # labelled validation images: is the method already working? (training_probe)
        if self.is_main and tc.probe_images > 0 and config.heads.tasks:
            self.probe_batch = next(iter(eval_loader(shard_dir, tc.probe_images, split="val",
                                                     image_size=config.data.image_size,
                                                     channels=config.data.channels)))

    # ------------------------------------------------------------------ step
    @property
    def done(self) -> bool:
        return self.step_index >= self.total_steps or self.stop_reason is not None

    def step(self) -> None:
        """One optimizer step over ``grad_accum`` micro-batches, the EMA update, and what the step crosses."""
        tc, d, accelerator, model = self.tc, self.config.diffusion, self.accelerator, self.model
        for _ in range(tc.grad_accum):
            batch = next(self.data_iter)
            x0 = batch["image"].to(self.device, non_blocking=True)  # (B, C, H, W) in [-1, 1]
            if tc.record_keys:
                with open(self.out_dir / f"keys_rank{self.rank}.txt", "a") as handle:
                    handle.write("\n".join(batch["key"]) + "\n")
            if tc.channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            # The encoder may see a photometrically jittered x_0; the UNet always denoises the original.
            x_cond = photometric_jitter(x0, tc.encoder_jitter)  # (B, C, H, W); x0 itself when off
            with accelerator.accumulate(model):
                loss = diffusion_loss(functools.partial(model, x_cond=x_cond), x0, self.alpha_bar,
                                      prediction=d.prediction, weighting=d.loss_weighting, snr_gamma=d.snr_gamma)
                accelerator.backward(loss)
                if accelerator.sync_gradients and tc.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            self.loss_sum += loss.detach()
            self.loss_count += 1
        self.step_index += 1
        samples_seen = self.step_index * tc.batch_size
        self.window_samples += tc.batch_size
        update_ema(self.ema, accelerator.unwrap_model(model), ema_decay_at(self.step_index, tc.ema_decay))
        self._after_step(samples_seen)
        self.bar.update(1)

    def _after_step(self, samples_seen: int) -> None:
        """Log, preview, checkpoint: on sample-count boundaries so they do not depend on the batch size."""
        tc, last = self.tc, self.done

        def crossed(every: int) -> bool:
            return samples_seen // every != (samples_seen - tc.batch_size) // every

        logged = crossed(tc.log_every) or last
        if logged:
            self._log(samples_seen)
        probed = crossed(tc.preview_every) or last
        if self.is_main and probed:
            grid = self.out_dir / "previews" / f"{ckpt.checkpoint_name(samples_seen)}.png"
            self.recon_mse = preview(self.ema, self.config, self.preview_images, grid)
            self.tracker.log_metrics({"val/recon_mse": self.recon_mse}, step=samples_seen)
            if self.probe_batch is not None:
                probe = probe_from_config(self.ema, self.config, self.probe_batch, self.device)
                self.tracker.log_metrics({f"probe/{k}": v for k, v in probe.items() if v == v}, step=samples_seen)
                self.bar.write(f"probe at {samples_seen:,} samples: "
                               + ", ".join(f"{k} {v:.3f}" for k, v in probe.items()))
                if self.readiness.enabled:
                    self._judge(probe, samples_seen)
            self.tracker.log_artifact(grid, "previews")
        if probed and self.readiness.enabled:
            # The probe ran on the main process only: its decision reaches every rank, so all stop at this step.
            reason = share_from_main(self.accelerator, self.verdict.stopped_because if self.verdict else None)
            if reason is not None and reason != BUDGET_SPENT:
                self.stop_reason = reason
            if self.done and not logged:  # stopped early between two logs: the last window still counts
                self._log(samples_seen)
        if crossed(tc.checkpoint_every) or self.done:
            self.save_checkpoint(samples_seen)

    def _log(self, samples_seen: int) -> None:
        """The mean loss since the last log over every rank (a collective), and the throughput."""
        self.last_loss = self.accelerator.reduce(self.loss_sum / self.loss_count, "mean").item()
        self.images_per_s = self.window_samples / (time.perf_counter() - self.window_start)
        self.loss_sum.zero_()
        self.loss_count, self.window_start, self.window_samples = 0, time.perf_counter(), 0
        self.tracker.log_metrics({"train/loss": self.last_loss, "train/images_per_s": self.images_per_s},
                                 step=samples_seen)
        self.bar.set_postfix(loss=f"{self.last_loss:.4f}", img_s=f"{self.images_per_s:.1f}")

    def _judge(self, probe: dict[str, float], samples_seen: int) -> None:
        """Main process: add the probe to the history and judge readiness (``harness.evaluation.readiness``)."""
        self.readiness_history.append(finite({"samples_seen": samples_seen, **probe}))
        self.verdict = verdict = self._assess(samples_seen)
        self.tracker.log_metrics({"readiness/score": verdict.score, "readiness/ready": float(verdict.ready)},
                                 step=samples_seen)
        self.bar.write(f"readiness at {samples_seen:,} samples: "
                       + ("ready" if verdict.ready else "not ready: " + "; ".join(verdict.missing))
                       + (f"; stopping: {verdict.stopped_because}" if verdict.should_stop else ""))

    def save_checkpoint(self, samples_seen: int) -> Path:
        """Write the whole training state under a temporary name, record its checksums, publish it, prune."""
        accelerator, config = self.accelerator, self.config
        final = self.ckpt_root / ckpt.checkpoint_name(samples_seen)
        tmp = ckpt.temporary_path(final)
        try:
            accelerator.save_state(str(tmp), safe_serialization=True)  # every rank writes its RNG state
            accelerator.wait_for_everyone()
            if self.is_main:
                ckpt.save_state_dict(self.ema.state_dict(), tmp / "ema.safetensors")
                (tmp / "config.yaml").write_text(dump_yaml(config))
                write_model_spec(tmp, config)  # the folder loads on its own (harness.model_spec)
                (tmp / "trainer_state.json").write_text(json.dumps(
                    {"step": self.step_index, "samples_seen": samples_seen, "mlflow_run_id": self.tracker.run_id,
                     "world_size": self.world, "readiness_history": self.readiness_history}))
                ckpt.write_checksums(tmp)  # last: what a resume verifies every file against
                ckpt.publish(tmp, final)
                ckpt.prune(self.ckpt_root, self.tc.keep_checkpoints)
        except Exception as err:  # a full disk or a lost permission: say where, and that nothing saved is lost
            shutil.rmtree(tmp, ignore_errors=True)  # give back the space the failed save took
            raise ckpt.CheckpointError(
                f"could not write checkpoint {final}: {err}; the previous checkpoint "
                f"({ckpt.latest_checkpoint(self.ckpt_root) or 'none'}) is intact: free space or fix permissions, "
                "then rerun with --resume") from err
        accelerator.wait_for_everyone()
        return final

    # ------------------------------------------------------------------ export
    def export(self) -> dict[str, Any]:
        """The EMA model in ``<out_dir>/final`` (written beside, then renamed), registered when asked."""
        self.bar.close()
        config, out_dir = self.config, self.out_dir
        samples_seen = self.step_index * self.tc.batch_size  # below the budget when readiness stopped the run
        result: dict[str, Any] = {"out_dir": str(out_dir), "samples_seen": samples_seen}
        if self.is_main:
            # A crash leaves the previous final model or the new one, never half of one.
            final_dir = out_dir / "final"
            staging = ckpt.temporary_path(final_dir)
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            ckpt.save_state_dict(self.ema.state_dict(), staging / "ema.safetensors")
            (staging / "config.yaml").write_text(dump_yaml(config))
            write_model_spec(staging, config)
            summary = {"size": config.model.size, "parameters": self.dae.num_parameters(),
                       "recon_mse": self.recon_mse, "final_loss": self.last_loss,
                       "images_per_s": self.images_per_s, "arithmetic": arithmetic(), **result}
            if self.readiness.enabled:  # the verdict of the exported weights (the last probe ran on them)
                verdict = self.verdict or self._assess(samples_seen)
                summary["readiness"] = finite(verdict.record(self.readiness_history))
                write_json_atomic(staging / READINESS_FILE, summary["readiness"])
            (staging / "model.json").write_text(json.dumps(summary, indent=2))
            ckpt.publish(staging, final_dir)
            tracker, version = self.tracker, None
            ready_tag = {"ready": str(summary["readiness"]["ready"]).lower()} if "readiness" in summary else {}
            if ready_tag:
                tracker.set_tags(ready_tag)
            if config.track.registered_model:
                version = tracker.register_model(final_dir, config.track.registered_model,
                                                 tags={"recon_mse": f"{self.recon_mse:.6f}",
                                                       "size": config.model.size, **ready_tag})
            tracker.end()
            result.update(summary, model_dir=str(final_dir), mlflow_uri=tracker.uri, mlflow_run_id=tracker.run_id,
                          registered_version=version, previews=str(out_dir / "previews"))
            print(f"checkpoint: {ckpt.latest_checkpoint(self.ckpt_root)}\nmodel:      {final_dir}\n"
                  f"previews:   {out_dir / 'previews'}\nmlflow:     {tracker.uri} (run {tracker.run_id}"
                  f"{f', model {config.track.registered_model} v{version}' if version else ''})")
        self.accelerator.end_training()
        return result

    def start(self) -> None:
        """:meth:`setup` then :meth:`resume`. A start that fails (bad data, a run folder of other settings, a
        damaged checkpoint, an empty validation split) leaves nothing behind: an ``out_dir`` it created is removed.
        """
        created_out_dir = not self.out_dir.exists()
        try:
            self.setup()
            self.resume()
        except BaseException:
            if created_out_dir and getattr(self, "is_main", True):
                shutil.rmtree(self.out_dir, ignore_errors=True)
            raise

    def fit(self) -> dict[str, Any]:
        """start (setup, resume) -> step until the budget is spent -> export; returns the run's summary."""
        self.start()
        while not self.done:
            self.step()
        return self.export()
