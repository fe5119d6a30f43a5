"""The tools one task's agent may call, behind one `call(name, argument)` that never raises.

Tool names are those the ReAct actions use: `calculate[...]` and `search[...]`. A failed call is
an observation starting with "Error: " and `ok=False`, so the agent loop can label the episode
and the model can read what went wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from negagent.errors import NegagentError
from negagent.tools.cache import ToolCache
from negagent.tools.calculator import calculate
from negagent.tools.search import SearchBackend, build_search_backend

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
        except Exception as exc:  # a tool bug must end as an observation, not kill a batch of episodes
            message = " ".join(f"{type(exc).__name__}: {exc}".split())[:_MAX_ERROR_CHARS]
            return ToolResult(f"{ERROR_PREFIX}{name} failed ({message})", False)
        return ToolResult(observation, not observation.startswith(ERROR_PREFIX))


def build_toolbox(tool_names: Sequence[str], cfg: Mapping[str, Any], cache: ToolCache | None = None) -> Toolbox:
    """The tools named by the task, configured by `cfg` (the tools config; `cfg["search"]` for search).

    Search is built only when asked for, so a math task needs no search data or key.
    """
    tools: dict[str, Tool] = {}
    for name in tool_names:
        if name == "calculate":
            tools[name] = Tool(calculate, None)
        elif name == "search":
            tools[name] = search_tool(build_search_backend(cfg.get("search") or {}))
        else:
            raise NegagentError(f"unknown tool {name!r}: known tools are {', '.join(TOOL_NAMES)}")
    return Toolbox(tools, cache)
