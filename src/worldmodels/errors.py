"""Errors a user can act on.

Anything raised as a `UserError` is printed by the CLI as one line (no traceback) and the process
exits non-zero; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input or a missing prerequisite: the message says what to do."""


class MissingStageError(UserError):
    """A stage's inputs do not exist yet."""

    def __init__(self, what: str, command: str):
        super().__init__(f"{what} not found: run `worldmodels {command}` first")
