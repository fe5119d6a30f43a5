"""Tools for the agent: a bounded calculator, search backends, a record/replay cache, the toolbox."""

from negagent.tools.cache import ToolCache, build_tool_cache
from negagent.tools.calculator import calculate
from negagent.tools.search import BM25Search, SearchBackend, SerperSearch, build_corpus, build_search_backend
from negagent.tools.toolbox import Tool, Toolbox, ToolResult, build_toolbox, search_tool

__all__ = [
    "BM25Search",
    "SearchBackend",
    "SerperSearch",
    "Tool",
    "ToolCache",
    "ToolResult",
    "Toolbox",
    "build_corpus",
    "build_search_backend",
    "build_tool_cache",
    "build_toolbox",
    "calculate",
    "search_tool",
]
