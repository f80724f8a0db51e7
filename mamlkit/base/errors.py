"""Errors that are the user's to fix. The CLI prints them (no traceback) and exits with code 2."""


class UserError(Exception):
    """A mistake in the user's input: the message names the problem and the fix."""


class DiskFull(Exception):
    """A write failed for lack of space. The message says what was kept and how to resume; the CLI prints
    it and exits with code 1 (the input was fine: the machine ran out of room)."""


class Diverged(Exception):
    """Training produced a NaN or infinite loss or parameter and was stopped. The message names the step,
    the likely cause (step sizes, dtype) and the checkpoint kept (never one with non-finite values); the
    CLI prints it and exits with code 1 (the run started and could not finish, as with a full disk)."""
