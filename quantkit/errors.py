"""Errors that quantkit raises for bad input. Each message says what went wrong and what to do."""


class QuantkitError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with status 2."""
