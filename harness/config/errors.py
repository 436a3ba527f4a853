"""The one error type of configuration mistakes (run files, job files, overrides, heads files' task records)."""

from __future__ import annotations

from harness.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration file or override is invalid; the message names every bad key as ``key: problem``."""


class Problems(ValueError):
    """Raised inside a section's cross-field check: ``(key, problem)`` pairs, keys relative to the section.

    The loader prefixes each key with the section's place in the file, so a check never needs to know where
    its section sits."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{key}: {text}" for key, text in problems))


def require(problems: list[tuple[str, str]]) -> None:
    """Raise :class:`Problems` when a check collected any."""
    if problems:
        raise Problems(problems)
