"""Record/replay cache of tool observations, so results with web search can be reproduced.

One JSONL file, append-only, one line per observation: {key, tool, backend, argument,
observation}, where key = sha256 of (tool, backend identity, argument). It can be shipped next to
results. Each line is flushed as it is written; a last line torn by a killed process is dropped
on the next open. Modes:

- off: every call is live, nothing is read or written;
- record: every call is live and its observation is written (a later line for a key wins);
- replay: only recorded observations; a miss is an "Error: ..." observation, never a live call;
- auto: recorded observations where present, live calls recorded otherwise.

Failed calls ("Error: ..." observations or exceptions) are not recorded: a transient network
failure must not be frozen into every later run.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from negagent.errors import NegagentError

MODES = ("off", "record", "replay", "auto")


def cache_key(tool: str, backend: str, argument: str) -> str:
    """sha256 over the JSON of (tool, backend identity, argument): unambiguous, stable."""
    return hashlib.sha256(json.dumps([tool, backend, argument]).encode()).hexdigest()


class ToolCache:
    """Observations keyed by `cache_key`, loaded from and appended to `path`."""

    def __init__(self, path: str | Path | None, mode: str = "auto") -> None:
        if mode not in MODES:
            raise NegagentError(f"unknown tool cache mode {mode!r}: use one of {', '.join(MODES)}")
        if mode != "off" and path is None:
            raise NegagentError(f"tool cache mode {mode} needs a file: set the tool cache path")
        self.path = Path(path).expanduser() if path is not None else None
        self.mode = mode
        self._entries: dict[str, str] = {}
        self._lock = threading.Lock()  # the agent loop may call tools from several threads
        if mode == "replay" and not self.path.is_file():
            raise NegagentError(f"tool cache {self.path} does not exist: replay mode needs a recorded file")
        if mode != "off" and self.path.is_file():
            self._load()

    def __len__(self) -> int:
        return len(self._entries)

    def _load(self) -> None:
        *lines, tail = self.path.read_bytes().split(b"\n")  # tail: text after the last newline
        for number, line in enumerate(lines, start=1):
            if line.strip():
                entry = _parse(line)
                if entry is None:
                    raise NegagentError(
                        f"tool cache {self.path} line {number} is not a cache entry: fix or delete that line"
                    )
                self._entries[entry["key"]] = entry["observation"]
        if not tail:
            return
        entry = _parse(tail)
        if entry is not None:  # a finished line that only lacks its newline
            self._entries[entry["key"]] = entry["observation"]
        if self.mode == "replay":
            return
        # End the last line, or cut it if a killed writer left it unfinished, so the next append
        # starts on a line of its own.
        with self.path.open("r+b") as file:
            if entry is not None:
                file.seek(0, 2)
                file.write(b"\n")
            else:
                file.truncate(file.seek(0, 2) - len(tail))

    def fetch(self, tool: str, backend: str, argument: str, call: Callable[[], str]) -> str:
        """The observation for (tool, backend, argument): replayed or from `call()`, per the mode."""
        if self.mode == "off":
            return call()
        key = cache_key(tool, backend, argument)
        if self.mode in ("replay", "auto"):
            with self._lock:
                recorded = self._entries.get(key)
            if recorded is not None:
                return recorded
            if self.mode == "replay":
                return f"Error: no recorded observation for {tool}[{argument}] (replay mode)"
        observation = call()
        if not observation.startswith("Error:"):
            self._append(key, tool, backend, argument, observation)
        return observation

    def _append(self, key: str, tool: str, backend: str, argument: str, observation: str) -> None:
        entry = {"key": key, "tool": tool, "backend": backend, "argument": argument, "observation": observation}
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # One unbuffered write per line in append mode: the line reaches the file at once, and
            # concurrent writers interleave whole lines.
            with self.path.open("ab", buffering=0) as file:
                file.write(line.encode())
            self._entries[key] = observation


def _parse(line: bytes) -> dict | None:
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if isinstance(entry, dict) and isinstance(entry.get("key"), str) and isinstance(entry.get("observation"), str):
        return entry
    return None


def build_tool_cache(cfg: Mapping[str, Any]) -> ToolCache | None:
    """The cache described by the `cache` part of the tools config; None when its mode is off."""
    mode = str(cfg.get("mode") or "off")  # YAML reads a bare off as false
    return None if mode == "off" else ToolCache(cfg.get("path"), mode)
