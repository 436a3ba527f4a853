"""SIGKILL the trainer at random moments while it writes checkpoints, several times; resume each time.

No patching: training runs in a subprocess that saves a checkpoint after every step, the test watches the
checkpoint folder for a save in progress (a new ``.tmp-`` folder) and kills the process a random few milliseconds
later. After every kill each visible checkpoint must load completely and the newest must be no older than the
newest seen before the kill (nothing published is lost); the last resume must end with the weights of an
uninterrupted run. (``tests/test_train.py`` kills at arbitrary moments; this test aims at the saves.)
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

from reliability_support import TOTAL, assert_checkpoint_loadable, assert_same_weights, run_args, run_training

from harness import checkpoint as ckpt

KILLS = 3


def _saves_in_progress(root: Path) -> dict[str, int]:
    """Temporary checkpoint folders and their modification times (a save touches its folder as it writes)."""
    if not root.is_dir():
        return {}
    found = {}
    for path in root.iterdir():
        if path.name.startswith(ckpt.TMP_PREFIX):
            try:
                found[path.name] = path.stat().st_mtime_ns
            except FileNotFoundError:  # renamed into place meanwhile
                pass
    return found


def test_sigkill_during_checkpoint_writes_never_leaves_a_bad_checkpoint(shards, reference_ema, tmp_path):
    out = tmp_path / "run"
    root = out / "checkpoints"
    args = run_args(shards, out) + ["--resume"]
    rng = random.Random(6)
    newest_published, kills_during_saves = 0, 0
    for _ in range(KILLS):
        stale = _saves_in_progress(root)  # left by the previous kill: not a new save
        proc = run_training(args)
        deadline = time.monotonic() + 180
        while proc.poll() is None and time.monotonic() < deadline:
            current = _saves_in_progress(root)
            if any(stale.get(name) != mtime for name, mtime in current.items()):
                break
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.08))  # somewhere inside the save (a save takes a few hundred ms)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills_during_saves += 1
        proc.wait(timeout=60)
        proc.stdout.close()
        for name in set(_saves_in_progress(root)) - set(stale):  # where the kill landed, for the log
            print(f"killed inside a save: {name} held {sorted(p.name for p in (root / name).iterdir())}")
        counts = [assert_checkpoint_loadable(folder) for folder in ckpt.list_checkpoints(root)]
        newest = counts[-1] if counts else 0  # a kill during the very first save leaves none, and loses none
        assert newest >= newest_published, f"published checkpoint lost: had {newest_published}, now {counts}"
        newest_published = newest
    assert kills_during_saves >= 2, "the trainer finished before it could be killed: make the run longer"

    final = run_training(args)
    output = final.stdout.read()
    assert final.wait(timeout=300) == 0, output
    assert ckpt.read_json(root / ckpt.checkpoint_name(TOTAL) / "trainer_state.json")["samples_seen"] == TOTAL
    assert_same_weights(ckpt.load_state_dict(out / "final" / "ema.safetensors"), reference_ema)
