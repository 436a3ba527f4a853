"""Train a Diffusion Autoencoder over WebDataset shards with Accelerate.

    accelerate launch harness/train_dae.py [--config jobs/phantoms_tiny.yaml] [--resume[=previous]] \\
        [--overwrite] [--train.lr=1e-4 ...]

With no arguments it trains ``tiny-32`` on the embedded phantom shards (generated on first use) on the CPU.
The budget is counted in samples, as the paper's 12M, not in epochs. The stages (setup, resume, step, export)
are :class:`harness.trainer.Trainer`'s; this file is the entry point a launcher starts once per process.
``--resume`` verifies every file of the latest checkpoint first; when one is damaged it names the file and the
previous complete checkpoint, and ``--resume=previous`` continues from the newest checkpoint that verifies.
"""

from __future__ import annotations

import argparse
import sys

from harness.cli import run_main
from harness.config import load_config
from harness.trainer import Trainer, ema_decay_at, preview, update_ema  # noqa: F401  (kept importable from here)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML run file (default: built-in tiny-32 phantom run)")
    parser.add_argument("--resume", nargs="?", const="latest", choices=("latest", "previous"), default=None,
                        help="continue from the latest checkpoint in out_dir (only with the settings it started "
                             "with); --resume=previous: from the newest checkpoint whose files all verify, when the "
                             "latest is damaged")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an out_dir that holds a run (deletes its checkpoints and final model)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite in out_dir)")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args, overrides = parse_args(argv)
    if args.tracking_uri:
        overrides.append(f"--track.tracking_uri={args.tracking_uri}")
    config = load_config(args.config, overrides)
    return Trainer(config, resume=args.resume, overwrite=args.overwrite).fit()


if __name__ == "__main__":
    sys.exit(run_main(main))
