"""Real servers on 127.0.0.1 for tests: `transformers serve` over a local model directory, and a
fault-injecting HTTP proxy to put in front of any server.

Both are context managers that start on a free port and stop what they started (by its own
process id or server handle) on exit. Nothing here sleeps to let something happen: in-process
servers listen on a socket bound before they start and report their start-up through an event;
`transformers serve` (another process) is probed until healthy, waiting on its exit in between.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
import threading
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    """Until `url` answers 200, for at most `timeout_s` (a generous bound, not a measurement).

    Another process gives no start-up event to wait on, so its health endpoint is probed; between
    probes this waits on the process itself, so a server that dies is reported at once."""
    for _ in range(max(1, int(timeout_s / 0.2))):
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        try:
            code = process.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            continue
        raise RuntimeError(f"server exited with code {code} before it was healthy")
    raise RuntimeError(f"{url} not healthy after {timeout_s}s")


def save_model_dir(model_cfg: dict, target: Path, *, do_sample: bool = True) -> Path:
    """A model directory `transformers serve` can load offline: weights, tokenizer, and a generation
    config that samples (the server ignores `temperature` when the model's default is greedy)."""
    from transformers import GenerationConfig

    from negagent.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_cfg)
    model = load_model(model_cfg)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    GenerationConfig(
        do_sample=do_sample, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(target)
    return target


@contextmanager
def transformers_serve(model_dir: Path, *, startup_s: float = 120.0) -> Iterator[str]:
    """`transformers serve` pinned to `model_dir` on a free loopback port; yields the /v1 base URL.

    The server names the model by the directory path given here (requests must use that name).
    """
    port = free_port()
    exe = shutil.which("transformers") or "transformers"
    # One torch thread: on a small shared CPU, more threads than free cores slow generation 10-30x.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": os.environ.get("NEGAGENT_SERVE_THREADS", "1")}
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(
        [exe, "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--log-level", "warning",
         str(model_dir)],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    try:
        try:
            wait_healthy(f"http://127.0.0.1:{port}/health", process, startup_s)
        except RuntimeError as exc:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"transformers serve did not start: {exc}\n{tail}") from None
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)
        log.close()


class _LoopbackServer:
    """An ASGI app (`self._app`) served on 127.0.0.1:`self.port` in a thread, as a context manager.
    The port is bound when the object is made, so `base_url` is known (and reserved) before entry."""

    def __init__(self) -> None:
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self._server = None
        self._thread: threading.Thread | None = None

    def __enter__(self):
        self._server, self._thread = _serve_in_thread(self._app, self._socket)
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()


class FaultProxy(_LoopbackServer):
    """An HTTP proxy on 127.0.0.1 that fails about `rate` of the chat calls, with one of `kinds`:
    429, 500, or a stalled response (no answer for `stall_s` seconds, so the client's timeout
    fires). Other calls go to `upstream` (a server root or its /v1 URL) unchanged. `faults`
    counts what was injected, `forwarded` the calls passed on. The faults are drawn from `seed`
    in the order calls arrive."""

    KINDS = ("429", "500", "stall")

    def __init__(self, upstream: str, *, rate: float = 0.3, stall_s: float = 30.0, seed: int = 0,
                 kinds: tuple[str, ...] = KINDS):
        assert kinds and set(kinds) <= set(self.KINDS), kinds
        self.upstream = upstream.rstrip("/").removesuffix("/v1")  # paths are forwarded as they come
        self.kinds = kinds
        self.rate = rate
        self.stall_s = stall_s
        self.rng = random.Random(seed)
        self.faults: Counter = Counter()
        self.forwarded = 0
        self._client: httpx.AsyncClient | None = None
        super().__init__()

    async def _app(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        body = await _read_body(receive)
        draw = self.rng.random()
        if scope["path"].endswith("/chat/completions") and draw < self.rate:
            kind = self.kinds[int(draw / self.rate * len(self.kinds)) % len(self.kinds)]
            self.faults[kind] += 1
            if kind == "stall":  # say nothing until the client gives up (or stall_s passes)
                try:
                    await asyncio.wait_for(_disconnected(receive), self.stall_s)
                except (asyncio.TimeoutError, asyncio.CancelledError):
                    pass
                return
            status = int(kind)
            payload = json.dumps({"error": {"message": f"injected {kind}", "type": "injected"}}).encode()
            headers = [(b"content-type", b"application/json")]
            if status == 429:
                headers.append((b"retry-after", b"0"))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": payload})
            return
        self.forwarded += 1
        forward = {k.decode(): v.decode() for k, v in scope["headers"] if k.lower() not in (b"host", b"content-length")}
        if self._client is None:  # one pooled client, made inside the server's event loop
            self._client = httpx.AsyncClient(timeout=300)
        response = await self._client.request(scope["method"], self.upstream + scope["path"], content=body,
                                              headers=forward)
        headers = [(b"content-type", response.headers.get("content-type", "application/json").encode())]
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": response.content})


class ChatEndpoint(_LoopbackServer):
    """An OpenAI-compatible `/v1/chat/completions` on 127.0.0.1 answering from an agent `backend`
    (e.g. the scripted teacher) after `latency_s`, like a remote model server (benchmarks set a
    latency; no test relies on one). `raw=(status, content_type, body)` makes every answer that
    raw response instead (for bad-server tests). Requests for another model than `model` get a
    404 like OpenAI's; chats the backend cannot answer (a client's preflight probe) get "OK".
    `calls` counts chat requests, `usage` the tokens reported in answers; `hold(n)` leaves the
    n-th next chat request unanswered (a deterministic point at which to kill a client)."""

    def __init__(self, backend, *, model: str = "scripted", latency_s: float = 0.0,
                 raw: tuple[int, str, bytes] | None = None):
        self.backend = backend
        self.model = model
        self.latency_s = latency_s
        self.raw = raw
        self.calls = 0
        self.usage: Counter = Counter()
        self._hold: tuple[int, threading.Event] | None = None
        super().__init__()

    def hold(self, n: int) -> threading.Event:
        """Leave the `n`-th chat request from now (n >= 1) unanswered until its client goes away;
        the returned event is set when that request arrives. A client that steps a batch of
        episodes and writes each finished one before its next call has then written exactly the
        episodes finished before that request's step, and writes nothing more."""
        assert n >= 1
        self._hold = (self.calls + n, threading.Event())
        return self._hold[1]

    async def _send_json(self, send, status: int, payload: dict) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(payload).encode()})

    async def _app(self, scope, receive, send) -> None:
        from negagent.agent import Sampling
        from negagent.errors import NegagentError

        if scope["type"] != "http":
            return
        raw = await _read_body(receive)
        if scope["path"] == "/health":
            return await self._send_json(send, 200, {"status": "ok"})
        if not scope["path"].endswith("/chat/completions"):
            return await self._send_json(send, 404, {"error": {"message": "not found"}})
        self.calls += 1
        if self._hold is not None and self.calls == self._hold[0]:
            self._hold[1].set()
            await _disconnected(receive)  # no answer, ever: the client is killed while waiting
            return
        if self.raw is not None:
            status, content_type, body = self.raw
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", content_type.encode())]})
            return await send({"type": "http.response.body", "body": body})
        request = json.loads(raw)
        if request.get("model") != self.model:
            return await self._send_json(send, 404, {"error": {
                "message": f"The model `{request.get('model')}` does not exist", "code": "model_not_found"}})
        if self.latency_s:
            await asyncio.sleep(self.latency_s)  # a simulated network round trip, not a synchronisation
        sampling = Sampling(temperature=float(request.get("temperature", 1.0)), seed=int(request.get("seed", 0)),
                            max_new_tokens=int(request.get("max_tokens", 256)))
        try:
            content = self.backend.complete([request["messages"]], sampling)[0]
        except NegagentError:  # a chat the backend has no answer for (a client's preflight probe)
            content = "OK"
        prompt_tokens = sum(len(m["content"]) for m in request["messages"]) // 4
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(content) // 4,
                 "total_tokens": prompt_tokens + len(content) // 4}
        self.usage.update(usage)
        await self._send_json(send, 200, {
            "id": f"chatcmpl-{self.calls}", "object": "chat.completion", "created": 1_700_000_000 + self.calls,
            "model": self.model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
            "usage": usage,
        })



async def _read_body(receive) -> bytes:
    """The whole request body of an ASGI http request."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _serve_in_thread(app, sock: socket.socket):
    """uvicorn serving the ASGI `app` on the bound socket `sock` in a daemon thread, once it is up."""
    import uvicorn

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            try:
                await super().startup(sockets)
            finally:  # started, or failed to: either way stop waiting
                ready.set()

    ready = threading.Event()
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1, lifespan="off", interface="asgi3")
    server = _Server(config)

    def run() -> None:
        try:
            server.run(sockets=[sock])
        finally:
            ready.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    if not ready.wait(timeout=60) or not server.started:
        raise RuntimeError(f"server on port {sock.getsockname()[1]} did not start")
    return server, thread
