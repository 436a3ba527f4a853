"""Two Accelerate machines on one host (launch/two_machines_local.sh): the rehearsal of a two-node run.

Each machine is one process; they meet over 127.0.0.1 exactly as two nodes meet over the rank-0 node's address.
Checked: each rank reads only its own shards across an epoch boundary; SIGKILL of one machine stops the other and
the run resumes from its last complete checkpoint on another world size (one process).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from helpers.serving import free_port
from helpers.training import run_training, tiny_args

from harness import checkpoint as ckpt
from harness.data import write_phantom_shards

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "two_machines_local.sh"
TRAIN_IMAGES = 128
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    write_phantom_shards(out, size=32, n_train=TRAIN_IMAGES, n_val=16, n_test=16, seed=0, samples_per_shard=16)
    return out


def _shard_of_key(shards: Path) -> dict[str, str]:
    """Sample key -> the train shard that holds it."""
    owner = {}
    for tar in sorted(shards.glob("train-*.tar")):
        with tarfile.open(tar) as archive:
            for member in archive.getmembers():
                owner[member.name.split(".")[0]] = tar.name
    return owner


def _start(shards: Path, run_dir: Path, logs: Path, total: int, **extra: str) -> subprocess.Popen:
    args = tiny_args(shards, run_dir, total=total, **{"train.record_keys": "true", **extra})
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.Popen(["bash", str(SCRIPT), "--port", str(free_port()), "--logs", str(logs), "--", *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _logs(logs: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(logs.glob("machine*.log")))


def test_two_machines_read_disjoint_shards_across_an_epoch_boundary(shards, tmp_path):
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    total = TRAIN_IMAGES + 32  # more samples than the train split holds: the stream passes an epoch boundary
    proc = _start(shards, run_dir, logs, total)
    output = proc.communicate(timeout=500)[0]
    assert proc.returncode == 0, output + _logs(logs)
    assert "2 process(es) x batch 8" in (logs / "machine0.log").read_text()
    owner = _shard_of_key(shards)
    keys = [(run_dir / f"keys_rank{rank}.txt").read_text().split() for rank in (0, 1)]
    assert sum(map(len, keys)) == total
    shards_read = [{owner[key] for key in rank_keys} for rank_keys in keys]
    assert shards_read[0] and shards_read[1]
    assert not shards_read[0] & shards_read[1], f"both ranks read {shards_read[0] & shards_read[1]}"
    state = json.loads((ckpt.latest_checkpoint(run_dir / "checkpoints") / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["samples_seen"] == total
    assert (run_dir / "final" / "ema.safetensors").is_file()


def test_a_killed_machine_stops_the_other_and_the_run_resumes_on_one_process(shards, tmp_path):
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    total = 512
    proc = _start(shards, run_dir, logs, total, **{"train.checkpoint_every": "32"})
    deadline = time.monotonic() + 300
    while ckpt.latest_checkpoint(run_dir / "checkpoints") is None:  # wait for a complete checkpoint
        assert proc.poll() is None, proc.stdout.read() + _logs(logs)
        assert time.monotonic() < deadline, "no checkpoint within 300 s" + _logs(logs)
        time.sleep(0.5)
    machine1 = int((logs / "machine1.pid").read_text())
    os.killpg(machine1, signal.SIGKILL)  # the node dies: its launcher and its worker at once
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and "machine 1 failed" in output, output
    machine0 = int((logs / "machine0.pid").read_text())
    time.sleep(1)
    with pytest.raises(ProcessLookupError):
        os.killpg(machine0, 0)  # the surviving machine was stopped, not left waiting in a collective

    saved = json.loads((ckpt.latest_checkpoint(run_dir / "checkpoints") / "trainer_state.json").read_text())
    assert saved["world_size"] == 2 and 0 < saved["samples_seen"] < total
    resumed = run_training(tiny_args(shards, run_dir, total=total, **{"train.checkpoint_every": "32"}) + ["--resume"])
    output = resumed.communicate(timeout=500)[0]
    assert resumed.returncode == 0, output
    assert "resumed from" in output and "1 process(es) x batch 16" in output
    final = json.loads((ckpt.latest_checkpoint(run_dir / "checkpoints") / "trainer_state.json").read_text())
    assert final["world_size"] == 1 and final["samples_seen"] == total
