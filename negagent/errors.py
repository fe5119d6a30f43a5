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


def config_error_line(exc: BaseException) -> str | None:
    """One line for an OmegaConf error met while resolving a config (a `???` left unset, an
    interpolation naming a missing key, a resolver that failed), naming the key; None for others."""
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

    key = getattr(exc, "full_key", None)
    if isinstance(exc, MissingMandatoryValue):
        return f"{key} is required and not set: pass {key}=<value> on the command line"
    if isinstance(exc, InterpolationResolutionError):
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        # A NegagentError raised by a resolver arrives wrapped; its own message is the line to show.
        first = first.removeprefix(f"{NegagentError.__name__} raised while resolving interpolation: ")
        return f"{first} (config key {key})" if key else first
    return None


def exit_on_user_error(fn: F) -> F:
    """Wrap an entry point: a `NegagentError`, or a config value that cannot be resolved, becomes
    `error: <message>` on stderr and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NegagentError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            sys.exit(2)
        except Exception as exc:
            line = config_error_line(exc)
            if line is None:
                raise
            print(f"error: {line}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
