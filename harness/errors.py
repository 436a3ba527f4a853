"""The one base of every error a user's input can cause.

Each layer raises its own kind (a config key, a checkpoint, a shard, a head that cannot be fitted, ...), and every
kind derives from :class:`UserError`, so the entry points (``harness.cli.run_main``) end any of them the same way,
with one ``error: what, where, what to do`` line and exit status 2, without importing the layers that raise them.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Something a user handed in cannot be used; the message names what, where and what to do."""
