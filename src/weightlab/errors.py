"""User-facing errors.

Every error caused by bad input (a value, a file, a command-line option) is a :class:`WeightlabError`.
The CLI turns it into a one-line message and exit status 2; library users can catch it, and because it
subclasses :class:`ValueError` it also behaves like the error they would expect from a bad argument.
"""

from __future__ import annotations


class WeightlabError(ValueError):
    """Bad input: the message names the bad value and what was expected."""


class FormatError(WeightlabError):
    """A file exists but is not in the expected format (the message names the file and the format)."""


class WeightlabWarning(UserWarning):
    """Input that is valid but probably not what was meant (the CLI prints it as one ``warning: ...`` line)."""


def warn(message: str) -> None:
    """Warn about valid but suspicious input (:class:`WeightlabWarning`; the CLI shows it on one line)."""
    import warnings

    warnings.warn(message, WeightlabWarning, stacklevel=2)


def closest(name: str, choices: list[str] | tuple[str, ...], n: int = 3) -> list[str]:
    """The ``n`` names in ``choices`` closest to ``name`` (for "did you mean" messages)."""
    import difflib

    found = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.4)
    return found or list(choices)[:n]
