"""Model and tokenizer loading from the hub source: local cache first, the hub only when needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: huggingface_hub reads HF_HUB_OFFLINE and HF_HOME when imported.
PROBE = """
import json, sys, time
import yaml
from negagent.errors import NegagentError
from negagent.models import load_model, load_tokenizer

cfg = yaml.safe_load(open(sys.argv[1])) if sys.argv[1].endswith(".yaml") else json.loads(sys.argv[1])
loads = [load_tokenizer, load_model][: int(sys.argv[2])]
out = {}
for load in loads:
    start = time.monotonic()
    try:
        load(cfg)
        out[load.__name__] = {"error": None, "seconds": time.monotonic() - start}
    except NegagentError as exc:
        out[load.__name__] = {"error": str(exc), "seconds": time.monotonic() - start}
print(json.dumps(out))
"""


def test_uncached_hub_preset_fails_at_once_when_offline(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # an empty cache
    result = subprocess.run([sys.executable, "-c", PROBE, "conf/model/llama2_7b_chat.yaml", "2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for name in ("load_tokenizer", "load_model"):
        error = out[name]["error"]
        assert error and "llama2_7b_chat" in error and "meta-llama/Llama-2-7b-chat-hf" in error, out
        assert "\n" not in error
        assert out[name]["seconds"] < 5, out
    assert "Retrying" not in result.stderr and "trying the Hugging Face hub" not in result.stderr


def test_cached_hub_tokenizer_loads_from_the_cache_without_asking_the_hub(tmp_path, tokenizer):
    """Offline mode off and no network here: a cached hub id must load from the cache straight away
    (asking the hub first would retry for about a minute)."""
    repo_dir = tmp_path / "hf" / "hub" / "models--negagent-test--cached-tokenizer"
    commit = "0" * 40
    from transformers import LlamaConfig

    tokenizer.save_pretrained(repo_dir / "snapshots" / commit)
    LlamaConfig().save_pretrained(repo_dir / "snapshots" / commit)  # AutoTokenizer reads the model type from it
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "hf")
    cfg = {"name": "cached", "source": "hub", "path": "negagent-test/cached-tokenizer"}
    result = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cfg), "1"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["load_tokenizer"]["error"] is None and out["load_tokenizer"]["seconds"] < 10, out
    assert "Retrying" not in result.stderr and "trying the Hugging Face hub" not in result.stderr
