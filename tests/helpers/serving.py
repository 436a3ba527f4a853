"""Helpers of the serving and registry tests: an exported tiny DAE, a heads file, PNG coding and server processes."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import requests
import torch
from PIL import Image

from harness.checkpoint import save_state_dict
from harness.config import Task, dump_yaml, load_config
from harness.data.phantoms import generate_phantoms
from harness.method.autoencoder import DiffusionAutoencoder
from harness.method.directions import Direction
from harness.method.heads import Calibration, FittedHead, Hyperplane, TaskResult
from harness.models import build_dae

STEPS = 2  # DDIM steps for inversion and decoding: enough to exercise the path, cheap on a CPU
TASK = Task("fracture", "grade", (1, 2, 3), (), (0, 3))


def export_tiny_dae(folder: Path, shard_dir: Path | None = None, recon_mse: float = 0.05, seed: int = 0) -> Path:
    """An untrained tiny-32 DAE exported like training's ``<out_dir>/final`` (safetensors + config + summary)."""
    overrides = [f"--diffusion.invert_steps={STEPS}", f"--diffusion.decode_steps={STEPS}"]
    if shard_dir is not None:
        overrides.append(f"--data.shard_dir={shard_dir}")
    config = load_config(None, overrides)
    torch.manual_seed(seed)
    dae = build_dae(config.model.size, in_channels=config.data.channels, **config.model.overrides(32))
    with torch.no_grad():  # zero-initialised output layers would make the untrained decoder ignore z_sem
        for parameter in dae.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    folder.mkdir(parents=True, exist_ok=True)
    save_state_dict(dae.state_dict(), folder / "ema.safetensors")
    (folder / "config.yaml").write_text(dump_yaml(config))
    (folder / "model.json").write_text(json.dumps({"size": "tiny-32", "recon_mse": recon_mse, "final_loss": 0.5}))
    return folder


def phantom_images(n: int, seed: int = 3) -> np.ndarray:
    """(N, 32, 32) uint8 vertebra phantoms."""
    return np.stack([sample.image for sample in generate_phantoms(n, 32, seed)])


def to_model_input(images: np.ndarray) -> torch.Tensor:
    """(N, H, W) uint8 -> (N, 1, H, W) in [-1, 1], as the server maps a PNG."""
    return torch.from_numpy(images.astype(np.float32) / 255.0)[:, None] * 2.0 - 1.0


def write_heads(path: Path, model_dir: Path, images: np.ndarray, dim: int = 512) -> TaskResult:
    """A head whose calibration spreads ``images``' distances over grades 0..3 (so grades differ per image)."""
    rng = np.random.default_rng(1)
    normal = rng.normal(size=dim)
    if dim == 512:
        ae = DiffusionAutoencoder.load(model_dir, device="cpu")
        raw = ae.encode(to_model_input(images)).double().numpy() @ normal / np.linalg.norm(normal)  # (N,)
        bias = -float(np.median(raw)) * np.linalg.norm(normal)  # half the images on each side
    else:
        raw, bias = np.array([0.0, 1.0]), 0.0
    hyperplane = Hyperplane(normal, bias)
    dist = raw + bias / np.linalg.norm(normal)
    slope = 3.0 / (dist.max() - dist.min())
    calibration = Calibration("lstsq", (slope, -slope * dist.min()), 0, 3, (float(dist.min()), float(dist.max())))
    head = FittedHead("svm", hyperplane, 1.0, "sklearn", TASK, True, (2.0, 0.1), 10, 10)
    # A stored CE direction other than the normal: the server must move latents along it, not along n.
    oblique = hyperplane.unit_normal + rng.normal(size=dim) / np.sqrt(dim)
    result = TaskResult(TASK, head, calibration, direction=Direction("pattern", oblique / np.linalg.norm(oblique)))
    path.write_text(json.dumps({"fracture/svm": result.to_dict()}))
    return result


def png_b64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def png_pixels(text: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(text))) as image:
        return np.asarray(image).astype(np.int16)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(command: list[str], log_path: Path) -> subprocess.Popen:
    """Start ``command`` in a process group of its own (so that stopping it reaches the workers it forks)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1"}
    with open(log_path, "w") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_until_ready(process: subprocess.Popen, url: str, log_path: Path, timeout: float = 120.0) -> None:
    """Poll ``url`` until it answers 200; fail with the server's log when it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not ready after {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (the server and its workers, nothing else), then SIGKILL."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)
