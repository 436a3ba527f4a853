"""How every entry point ends: a user's mistake is one line on stderr and exit status 2, never a traceback.

    if __name__ == "__main__":
        sys.exit(run_main(main))

Every error raised for what a user handed in (a config key, a file, a checkpoint, a shard, a heads file) derives
from :class:`harness.errors.UserError` and its message already names the key or file and what to do; anything
else is a bug and keeps its traceback. This module imports nothing but that base, so any layer's main can use it.
``--debug`` anywhere on the command line keeps the traceback for user errors too.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from harness.errors import UserError

USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, FileExistsError, IsADirectoryError)
EXIT_USER_ERROR = 2


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    while text.startswith("error: "):  # a message that already says so, even twice over, gets one prefix
        text = text[len("error: "):]
    return f"error: {text}"


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
