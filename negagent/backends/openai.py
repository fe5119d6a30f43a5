"""Any OpenAI-compatible chat server as an agent backend (OpenAI, vLLM, `transformers serve`, ...).

`complete(chats, sampling)` sends every chat of a step at once, at most `concurrency` requests in
flight, from a synchronous call (the agent loop is synchronous). Transient failures (429, 5xx, 408,
409, timeouts, dropped connections) are retried with exponential backoff and full jitter, honouring
a server's Retry-After; each retry and all token usage (and cost, when prices are configured) is
counted in `stats`. Failures that mean the run cannot go on become a one-line `NegagentError`: no
key in the environment, a server that cannot be reached, a rejected key, a model the server does
not know, a response that is not the JSON a chat completion is.

The API key is read from the environment variable named by `api_key_env` and never stored in the
config, the stats, or any message (a server echoing it back is redacted).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from typing import Any, Mapping, Sequence

from negagent.agent import Sampling
from negagent.errors import NegagentError

RETRY_STATUS = {408: "408", 409: "409", 429: "429"}  # and every 5xx
NO_KEY = "no-key"  # what the client sends to servers that need none (the client insists on a value)


class OpenAIBackend:
    """An OpenAI-compatible server; see the module docstring for retries, usage and errors."""

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str | None,
        api_key_env: str | None,
        concurrency: int = 16,
        timeout_s: float = 60.0,
        max_retries: int = 6,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        price_per_1m_input: float | None = None,
        price_per_1m_output: float | None = None,
        send_seed: bool = True,
        name: str | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = name or f"openai:{model}"
        self._api_key = api_key
        self._api_key_env = api_key_env
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.prices = (price_per_1m_input, price_per_1m_output)
        self.send_seed = send_seed
        self.stats: dict[str, Any] = {
            "requests": 0, "retries": 0, "retry_reasons": {}, "prompt_tokens": 0, "completion_tokens": 0,
        }
        if price_per_1m_input is not None or price_per_1m_output is not None:
            self.stats["cost_usd"] = 0.0
        self._loop = asyncio.new_event_loop()
        self._client = None
        # The HTTP client logs every request at INFO: thousands of lines that bury the progress bar
        # and the run log. Retries and usage are counted in `stats` instead.
        for noisy in ("httpx", "httpx2", "openai"):
            logging.getLogger(noisy).setLevel(logging.WARNING)

    # --- plumbing -----------------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        # Short "keys" (placeholders for servers that ignore them) would mangle ordinary words.
        return text.replace(self._api_key, "***") if self._api_key and len(self._api_key) >= 8 else text

    def _client_instance(self):
        if self._client is None:
            from openai import AsyncOpenAI

            # Retries are ours (counted, jittered); the client makes exactly one attempt per call.
            self._client = AsyncOpenAI(
                base_url=self.base_url, api_key=self._api_key or NO_KEY, timeout=self.timeout_s, max_retries=0,
            )
        return self._client

    def close(self) -> None:
        if self._loop.is_closed():
            return
        if self._client is not None:
            self._loop.run_until_complete(self._client.close())
        self._loop.close()

    def _fail(self, problem: str) -> NegagentError:
        return NegagentError(self._redact(f"teacher at {self.base_url} (model {self.model!r}): {problem}"))

    # --- one request --------------------------------------------------------------------------

    def _request(self, chat: Sequence[dict], sampling: Sampling) -> dict:
        body: dict[str, Any] = {
            "model": self.model,
            # The `train` flag is ours; servers may reject unknown message fields.
            "messages": [{"role": m["role"], "content": m["content"]} for m in chat],
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_new_tokens,
        }
        stops = [s for s in sampling.stop if not any(o != s and o in s for o in sampling.stop)]
        if stops:
            # A stop that contains another never fires first; dropping it spares servers that
            # precompute per stop string (transformers serve) a second pass. The API takes four.
            body["stop"] = stops[:4]
        if self.send_seed:
            body["seed"] = sampling.seed
        return body

    def _retry_reason(self, exc: Exception) -> str | None:
        """Why `exc` is worth another try ("429", "5xx", "timeout", ...), or None if it is not."""
        import openai

        if isinstance(exc, openai.APITimeoutError):
            return "timeout"
        if isinstance(exc, openai.APIConnectionError):
            return "connection"
        if isinstance(exc, openai.APIStatusError):
            if exc.status_code >= 500:
                return "5xx"
            return RETRY_STATUS.get(exc.status_code)
        return None

    def _fatal(self, exc: Exception) -> NegagentError:
        """A one-line error for a failure that retrying will not fix."""
        import openai

        if isinstance(exc, openai.APIStatusError):
            detail = " ".join(_detail(exc).split())[:200]
            if exc.status_code in (401, 403):
                source = f"${self._api_key_env}" if self._api_key_env else "teacher.api_key_env=null (no key)"
                return self._fail(f"the server rejected the API key from {source} (HTTP {exc.status_code})")
            if exc.status_code == 404 or "model" in detail.lower():
                return self._fail(
                    f"the server does not serve this model (HTTP {exc.status_code}: {detail}); set teacher.model"
                )
            return self._fail(f"request rejected (HTTP {exc.status_code}: {detail})")
        if isinstance(exc, openai.APIConnectionError):
            return self._fail(f"cannot reach the server ({type(exc).__name__}); check teacher.base_url")
        why = "invalid JSON" if isinstance(exc, ValueError) else type(exc).__name__
        return self._fail(f"the server's answer is not a chat completion in JSON ({why})")

    def _delay(self, attempt: int, exc: Exception) -> float:
        retry_after = None
        response = getattr(exc, "response", None)
        if response is not None:
            try:
                retry_after = float(response.headers.get("retry-after", ""))
            except ValueError:
                retry_after = None
        ceiling = min(self.max_backoff_s, self.backoff_s * 2 ** attempt)
        delay = random.uniform(0, ceiling)  # full jitter: retries of a burst spread out
        return min(self.max_backoff_s, max(delay, retry_after or 0.0))

    async def _one(self, chat: Sequence[dict], sampling: Sampling, gate: asyncio.Semaphore,
                   connection_retries: int | None = None) -> str:
        import openai
        from openai.types.chat import ChatCompletion

        client = self._client_instance()
        body = self._request(chat, sampling)
        attempt = 0
        while True:
            async with gate:
                self.stats["requests"] += 1
                try:
                    response = await client.chat.completions.create(**body)
                    failure = None
                except (openai.APIError, ValueError) as exc:  # ValueError: a body that is not JSON
                    failure = exc
            if failure is None:
                if not isinstance(response, ChatCompletion) or not response.choices:
                    kind = "no 'choices'" if isinstance(response, ChatCompletion) else "not JSON"
                    raise self._fail(f"the server's answer is not a chat completion in JSON ({kind})")
                self._count_usage(response)
                return response.choices[0].message.content or ""
            reason = self._retry_reason(failure)
            if reason is None:
                raise self._fatal(failure)
            limit = self.max_retries
            if reason == "connection" and connection_retries is not None:
                limit = min(limit, connection_retries)
            if attempt >= limit:
                if reason == "connection":
                    raise self._fatal(failure)
                raise self._fail(
                    f"gave up after {attempt} retries (last: {reason}); re-run the same command to resume"
                )
            attempt += 1
            self.stats["retries"] += 1
            reasons = self.stats["retry_reasons"]
            reasons[reason] = reasons.get(reason, 0) + 1
            await asyncio.sleep(self._delay(attempt - 1, failure))

    def _count_usage(self, response) -> None:
        usage = getattr(response, "usage", None)
        if usage is None:
            return
        prompt, completion = int(usage.prompt_tokens or 0), int(usage.completion_tokens or 0)
        self.stats["prompt_tokens"] += prompt
        self.stats["completion_tokens"] += completion
        price_in, price_out = self.prices
        if "cost_usd" in self.stats:
            self.stats["cost_usd"] += (prompt * (price_in or 0.0) + completion * (price_out or 0.0)) / 1e6

    async def _all(self, chats: Sequence[list[dict]], sampling: Sampling,
                   connection_retries: int | None = None) -> list[str]:
        gate = asyncio.Semaphore(self.concurrency)
        try:
            async with asyncio.TaskGroup() as group:  # one fatal error cancels the rest of the step
                tasks = [group.create_task(self._one(chat, sampling, gate, connection_retries)) for chat in chats]
        except BaseExceptionGroup as group_error:
            fatal = next((e for e in group_error.exceptions if isinstance(e, NegagentError)), None)
            raise (fatal or group_error.exceptions[0]) from None
        return [task.result() for task in tasks]

    # --- the backend protocol -----------------------------------------------------------------

    def complete(self, chats: Sequence[list[dict]], sampling: Sampling) -> list[str]:
        if not chats:
            return []
        return self._loop.run_until_complete(self._all(chats, sampling))

    def check(self) -> None:
        """One tiny request, so a wrong URL, model or key fails in seconds, before any episode runs.

        A server that cannot be reached at all is given up on after two quick retries.
        """
        probe = [{"role": "user", "content": "Reply with OK."}]
        sampling = Sampling(temperature=0.0, max_new_tokens=1, stop=())
        self._loop.run_until_complete(self._all([probe], sampling, connection_retries=2))


def _detail(exc) -> str:
    """The server's own words from an error response (OpenAI's error.message, FastAPI's detail)."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        for key in ("message", "detail", "error"):
            value = body.get(key)
            if isinstance(value, dict):
                value = value.get("message")
            if value:
                return str(value)
    return str(getattr(exc, "message", exc))


def _number(cfg: Mapping[str, Any], key: str, default: float | None, minimum: float = 0) -> float | None:
    value = cfg.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise NegagentError(f"teacher.{key}={value!r}: expected a number >= {minimum}")
    return value


def build(cfg: Mapping[str, Any], **_: Any) -> OpenAIBackend:
    """An OpenAIBackend from the `teacher` (or `backend`) config; see conf/backend/openai.yaml."""
    base_url, model = cfg.get("base_url"), cfg.get("model")
    if not base_url or not str(base_url).startswith(("http://", "https://")):
        raise NegagentError(f"teacher.base_url={base_url!r}: expected an http(s) URL such as http://127.0.0.1:8000/v1")
    if not model:
        raise NegagentError(
            "teacher.model is not set: name the model the server serves, e.g. teacher.model=gpt-4o-mini"
        )
    key_env = cfg.get("api_key_env", "OPENAI_API_KEY")
    api_key = None
    if key_env:
        api_key = os.environ.get(str(key_env))
        if not api_key:
            raise NegagentError(
                f"environment variable {key_env} is not set: export the API key there "
                f"(or teacher.api_key_env=null for a server that needs no key)"
            )
    backend = OpenAIBackend(
        base_url=str(base_url),
        model=str(model),
        api_key=api_key,
        api_key_env=str(key_env) if key_env else None,
        concurrency=int(_number(cfg, "concurrency", 16, minimum=1)),
        timeout_s=float(_number(cfg, "timeout_s", 60.0, minimum=0.1)),
        max_retries=int(_number(cfg, "max_retries", 6)),
        backoff_s=float(_number(cfg, "backoff_s", 1.0)),
        max_backoff_s=float(_number(cfg, "max_backoff_s", 30.0)),
        price_per_1m_input=_number(cfg, "price_per_1m_input", None),
        price_per_1m_output=_number(cfg, "price_per_1m_output", None),
        send_seed=bool(cfg.get("send_seed", True)),
        name=cfg.get("label"),
    )
    if cfg.get("preflight", True):
        try:
            backend.check()
        except BaseException:
            backend.close()
            raise
    return backend
