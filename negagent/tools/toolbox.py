"""The tools one task's agent may call, behind one `call(name, argument)`; a failure is an observation.

Tool names are those the ReAct actions use: `calculate[...]` and `search[...]`. A failed call is
an observation starting with "Error: " and `ok=False`, so the agent loop can label the episode
and the model can read what went wrong. The one exception is a `NegagentError` (a search model
that cannot be loaded on first use): a setup problem the user must fix, so it stops the run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from negagent.errors import NegagentError
from negagent.tools.cache import ToolCache
from negagent.tools.calculator import calculate
from negagent.tools.search import SearchBackend, build_search_backend, missing_key_message

ERROR_PREFIX = "Error: "
TOOL_NAMES = ("calculate", "search")
_MAX_ERROR_CHARS = 300


@dataclass(frozen=True)
class ToolResult:
    """An observation for the agent, and whether the call succeeded (False: it starts "Error: ")."""

    observation: str
    ok: bool


@dataclass(frozen=True)
class Tool:
    """A function from the action's argument to an observation."""

    run: Callable[[str], str]
    # What, besides the argument, decides the observation; None for a pure function of the
    # argument (the calculator), which is never cached: replaying it would only hide code changes.
    identity: str | None


def search_tool(backend: SearchBackend) -> Tool:
    """`search[query]` over `backend`, cached under the backend's identity."""

    def run(query: str) -> str:
        return backend.search(query) if query else "Error: empty search query"

    return Tool(run, backend.identity)


class Toolbox:
    """Named tools, called through the record/replay cache when one is given."""

    def __init__(self, tools: Mapping[str, Tool], cache: ToolCache | None = None) -> None:
        self._tools = dict(tools)
        self._cache = cache

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._tools)

    def call(self, name: str, argument: str) -> ToolResult:
        """Run tool `name` on `argument` (stripped); unknown tools and failures give ok=False."""
        tool = self._tools.get(name)
        if tool is None:
            available = ", ".join(self.names) or "none"
            return ToolResult(f"{ERROR_PREFIX}unknown tool {name!r}; available: {available}", False)
        argument = argument.strip()
        try:
            if self._cache is not None and tool.identity is not None:
                observation = self._cache.fetch(name, tool.identity, argument, lambda: tool.run(argument))
            else:
                observation = tool.run(argument)
        except NegagentError:  # every later call would fail the same way: an error line, not observations
            raise
        except Exception as exc:  # a tool bug must end as an observation, not kill a batch of episodes
            message = " ".join(f"{type(exc).__name__}: {exc}".split())[:_MAX_ERROR_CHARS]
            return ToolResult(f"{ERROR_PREFIX}{name} failed ({message})", False)
        return ToolResult(observation, not observation.startswith(ERROR_PREFIX))


def build_toolbox(tool_names: Sequence[str], cfg: Mapping[str, Any], cache: ToolCache | None = None) -> Toolbox:
    """The tools named by the task, configured by `cfg` (the tools config; `cfg["search"]` for search).

    Search is built only when asked for, so a math task needs no search data or key; with a replay
    cache, web search needs no key either (every observation comes from the recording).
    """
    tools: dict[str, Tool] = {}
    for name in tool_names:
        if name == "calculate":
            tools[name] = Tool(calculate, None)
        elif name == "search":
            replay_only = cache is not None and cache.mode == "replay"
            tools[name] = search_tool(build_search_backend(cfg.get("search") or {}, replay_only=replay_only))
        else:
            raise NegagentError(f"unknown tool {name!r}: known tools are {', '.join(TOOL_NAMES)}")
    return Toolbox(tools, cache)


def check_search_access(tool_names: Sequence[str], cfg: Mapping[str, Any]) -> None:
    """Refuse, before any work, a web search that could not run: `cfg` (the tools config) asks for
    serper, and there is neither an API key in the environment nor a replay cache (`cache.mode`).

    Cheap (no index, no model, no request), so an entry point can call it before hours of work.
    """
    search = cfg.get("search") or {}
    if "search" not in tool_names or search.get("backend", "bm25") != "serper":
        return
    api_key_env = (search.get("serper") or {}).get("api_key_env", "SERPER_API_KEY")
    if not os.environ.get(api_key_env) and str((cfg.get("cache") or {}).get("mode") or "off") != "replay":
        raise NegagentError(missing_key_message(api_key_env))
