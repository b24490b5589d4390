"""User-facing errors: the CLI prints their one-line message and exits with code 2."""


class LinbenchError(Exception):
    """Bad input or a missing prerequisite the user can fix. Message is one line."""

    exit_code = 2


class MissingDataError(LinbenchError):
    """Embedded data or weights are not installed; the message names the fixing command."""


def one_of(kind: str, value: str, choices) -> LinbenchError:
    """`unknown method 'x' (choose from: a, b, c)` — the standard bad-choice error."""
    return LinbenchError(f"unknown {kind} {value!r} (choose from: {', '.join(sorted(choices))})")
