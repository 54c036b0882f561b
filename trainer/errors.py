"""The trainer's one user-facing exception.

A :class:`TrainerError` is raised for anything the *user* can fix (a misspelled column, an
unreadable file, a bad config value). The CLI prints it as one line, ``error: <what is
wrong>; <how to fix>``, and exits with status 2; no traceback, and nothing is written to the
registry. Programming errors are deliberately *not* TrainerErrors, so they keep their
traceback.
"""

from __future__ import annotations


class TrainerError(Exception):
    """A problem with the user's input, config or data.

    Args:
        what: what is wrong, naming the key, column, file or row involved.
        fix: how to fix it, as an instruction.
    """

    def __init__(self, what: str, fix: str) -> None:
        # One line on purpose: the CLI's error output is exactly one line.
        self.what = " ".join(what.split())
        self.fix = " ".join(fix.split())
        super().__init__(f"{self.what}; {self.fix}")


class ConfigError(TrainerError):
    """The trainer configuration (YAML file or ``--set`` override) is invalid."""


class DataError(TrainerError):
    """The training or evaluation data cannot be used as configured."""
