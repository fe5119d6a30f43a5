"""User-facing errors.

A `NegagentError` is a problem with the user's input or environment (a missing file, a bad
config value, an unreachable server). Entry points print its message as one line and exit
non-zero without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class NegagentError(Exception):
    """An error whose message alone tells the user what is wrong and what to do."""


def exit_on_user_error(fn: F) -> F:
    """Wrap an entry point: a `NegagentError` becomes `error: <message>` on stderr and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NegagentError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
