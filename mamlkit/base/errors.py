"""Errors that are the user's to fix. The CLI prints them (no traceback) and exits with code 2."""


class UserError(Exception):
    """A mistake in the user's input: the message names the problem and the fix."""
