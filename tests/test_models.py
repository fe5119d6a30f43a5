"""Model and tokenizer loading from the hub source: local cache first, the hub only when needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: huggingface_hub reads HF_HUB_OFFLINE and HF_HOME when imported.
# Every attempt to reach the network (a name lookup or a connection to anything but a local socket)
# is recorded and refused at once, so "the hub was not asked" is a count, not a duration.
PROBE = """
import json, socket, sys

attempts = []
_connect = socket.socket.connect

def refuse_lookup(host, *args, **kwargs):
    attempts.append(f"resolve {host}")
    raise socket.gaierror(socket.EAI_NONAME, "network disabled by the test")

def refuse_connect(self, address):
    if self.family == socket.AF_UNIX:
        return _connect(self, address)
    attempts.append(f"connect {address}")
    raise OSError("network disabled by the test")

socket.getaddrinfo = refuse_lookup
socket.socket.connect = refuse_connect

import yaml
from negagent.errors import NegagentError
from negagent.models import load_model, load_tokenizer

cfg = yaml.safe_load(open(sys.argv[1])) if sys.argv[1].endswith(".yaml") else json.loads(sys.argv[1])
loads = [load_tokenizer, load_model][: int(sys.argv[2])]
out = {}
for load in loads:
    try:
        loaded = load(cfg)
        out[load.__name__] = {"error": None, "size": len(loaded) if load is load_tokenizer else None}
    except NegagentError as exc:
        out[load.__name__] = {"error": str(exc)}
out["network"] = attempts
print(json.dumps(out))
"""


def _probe(args: list[str], env: dict) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Retrying" not in result.stderr and "trying the Hugging Face hub" not in result.stderr, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_uncached_hub_preset_fails_at_once_when_offline(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # an empty cache
    out = _probe(["conf/model/llama2_7b_chat.yaml", "2"], env)
    assert out["network"] == []  # offline: the hub is never asked, so there is nothing to wait for
    assert out["load_tokenizer"]["error"].startswith(
        "model 'llama2_7b_chat': tokenizer 'meta-llama/Llama-2-7b-chat-hf' cannot be found offline "
        "(download it first, or use model=smollm2_135m): ")
    assert out["load_model"]["error"].startswith(
        "model 'llama2_7b_chat': 'meta-llama/Llama-2-7b-chat-hf' is not a preset and cannot be found offline "
        "(download it first, or use model=smollm2_135m): ")
    for name in ("load_tokenizer", "load_model"):
        assert "\n" not in out[name]["error"]  # one line, the first of the hub's reason


def test_cached_hub_tokenizer_loads_from_the_cache_without_asking_the_hub(tmp_path, tokenizer):
    """Offline mode off: a cached hub id loads from the cache without a single network attempt
    (asking the hub first would, with no network, retry for about a minute)."""
    repo_dir = tmp_path / "hf" / "hub" / "models--negagent-test--cached-tokenizer"
    commit = "0" * 40
    from transformers import LlamaConfig

    tokenizer.save_pretrained(repo_dir / "snapshots" / commit)
    LlamaConfig().save_pretrained(repo_dir / "snapshots" / commit)  # AutoTokenizer reads the model type from it
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "hf")
    # huggingface_hub's telemetry fetches an agent registry from the hub when it first builds a
    # user agent, even for cached files; that request is not about the model, so it is turned off.
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    cfg = {"name": "cached", "source": "hub", "path": "negagent-test/cached-tokenizer"}
    out = _probe([json.dumps(cfg), "1"], env)
    assert out == {"load_tokenizer": {"error": None, "size": len(tokenizer)}, "network": []}
