"""How every entry point ends: a user's mistake is one line on stderr and exit status 2, never a traceback.

    if __name__ == "__main__":
        sys.exit(run_main(main))

The errors below are raised for what a user handed in (a config key, a file, a checkpoint, a shard, a heads file)
and their messages already name the key or file and what to do; anything else is a bug and keeps its traceback.
``--debug`` anywhere on the command line keeps the traceback for user errors too.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from harness.checkpoint import CheckpointError
from harness.config import ConfigError
from harness.data.prepare.common import PrepareError
from harness.data.shards import ShardError
from harness.fingerprint import StaleArtifactError
from harness.method.directions import DirectionError
from harness.method.heads import HeadFitError

USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, CheckpointError, DirectionError, ShardError,
                                                PrepareError, StaleArtifactError, HeadFitError, FileNotFoundError,
                                                FileExistsError, IsADirectoryError)
EXIT_USER_ERROR = 2


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if text.startswith("error: ") else f"error: {text}"


def run_main(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> int:
    """Call ``main(argv)`` (default: ``sys.argv[1:]``); 0 on success, 2 with one line for a user error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        result = main(argv)
    except USER_ERRORS as error:
        if debug:
            raise
        print(_one_line(error), file=sys.stderr)
        return EXIT_USER_ERROR
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
