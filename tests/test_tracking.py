"""Training metrics and configs leave the process without secrets: redaction, metrics.jsonl, wandb,
and the frozen config a run directory keeps."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from negagent.errors import NegagentError
from negagent.training.launch import resolve_config
from negagent.training.tracking import REDACTED, RunTracker, redact_secrets, run_identity

SECRETS = ("sk-live0123456789", "hf_abcdefghijklmn", "ghp_0123456789abcdef", "xoxb-0123456789", "s3cret-value")

CONFIG = {
    "seed": 0,
    "teacher": {"name": "openai", "api_key": "s3cret-value", "api_key_env": "OPENAI_API_KEY", "model": "gpt-4o-mini"},
    "model": {"name": "tiny", "hf_token": "hf_abcdefghijklmn", "tokenizer_from": {"name": "smollm2_135m"},
              "arch": {"num_key_value_heads": 2}},
    "sampling": {"max_new_tokens": 8, "stop": ["Observation:"]},
    "tools": {"search": {"engine": "serper", "serper_key": "s3cret-value", "api_key": None, "token": ""}},
    "logger": {"name": "wandb", "WANDB_API_KEY": "s3cret-value", "password": 1234, "verbose": False},
    "hydra": {"override_dirname": {"exclude_keys": ["seed"]}},
    "headers": [{"name": "Authorization", "secret": "s3cret-value"}, "ghp_0123456789abcdef", "plain text"],
    "notes": "sk-live0123456789",
    "short": "sk-1",  # too short to be a key
    "mentions": "the key is sk-prose0123456789",  # inside prose: not a key-shaped value
}

REDACTED_CONFIG = {
    "seed": 0,
    "teacher": {"name": "openai", "api_key": REDACTED, "api_key_env": "OPENAI_API_KEY", "model": "gpt-4o-mini"},
    "model": {"name": "tiny", "hf_token": REDACTED, "tokenizer_from": {"name": "smollm2_135m"},
              "arch": {"num_key_value_heads": 2}},
    "sampling": {"max_new_tokens": 8, "stop": ["Observation:"]},
    "tools": {"search": {"engine": "serper", "serper_key": REDACTED, "api_key": None, "token": ""}},  # unset stays unset
    "logger": {"name": "wandb", "WANDB_API_KEY": REDACTED, "password": REDACTED, "verbose": False},
    "hydra": {"override_dirname": {"exclude_keys": ["seed"]}},
    "headers": [{"name": "Authorization", "secret": REDACTED}, REDACTED, "plain text"],
    "notes": REDACTED,
    "short": "sk-1",
    "mentions": "the key is sk-prose0123456789",
}


def test_redact_secrets_in_nested_keys_and_lists():
    """Secret-named keys at any depth and key-shaped values anywhere (lists too) are replaced;
    everything else, including keys that only mention a key or count tokens, is kept."""
    original = json.loads(json.dumps(CONFIG))
    assert redact_secrets(CONFIG) == REDACTED_CONFIG
    assert CONFIG == original  # a copy: the caller's config is not changed


@pytest.mark.parametrize("key", ["api_key", "apikey", "API_KEY", "openai_api_key", "token", "hf_token", "access_token",
                                 "secret", "client_secret", "password", "db_passwd", "credentials", "credential",
                                 "key", "wandb_key", "secret_key", "private_key"])
def test_secret_key_names(key):
    """A key that names a key, token, secret, password or credential has its value replaced."""
    assert redact_secrets({key: "x", "nested": {key: 42}}) == {key: REDACTED, "nested": {key: REDACTED}}


@pytest.mark.parametrize("key", ["api_key_env", "max_new_tokens", "tokenizer_from", "num_key_value_heads", "exclude_keys",
                                 "tokens", "monkey", "secretary", "keyword", "password_file_env"])
def test_keys_that_only_mention_a_secret_are_kept(key):
    """Names that contain a secret word without naming a secret keep their value."""
    assert redact_secrets({key: "x"}) == {key: "x"}


@pytest.mark.parametrize("unset", [None, "", False])
def test_unset_secrets_stay_unset(unset):
    """A secret-named key without a value keeps it: the record shows that no secret was given."""
    assert redact_secrets({"api_key": unset, "token": True}) == {"api_key": unset, "token": REDACTED}


def test_secret_named_containers_are_searched_not_dropped():
    """Under a secret-named key holding a mapping or list, the entries are redacted one by one."""
    value = {"credentials": {"user": "me", "password": "pw"}, "tokens": ["a", "hf_abcdefghijklmn"]}
    assert redact_secrets(value) == {"credentials": {"user": "me", "password": REDACTED}, "tokens": ["a", REDACTED]}


def test_frozen_run_config_is_redacted(tmp_path):
    """The config a run directory keeps (and its ranks read) carries no secret, plus the run's identity."""
    cfg = OmegaConf.create({**CONFIG, "greeting": "${teacher.model}"})
    resolved = resolve_config(cfg, ["seed=1", "tagging=prefix", "hydra.run.dir=x"], tmp_path)
    assert resolved == {**REDACTED_CONFIG, "greeting": "gpt-4o-mini", "run": {
        "dir": str(tmp_path), "overrides": ["seed=1", "tagging=prefix", "hydra.run.dir=x"],
        "name": "seed=1,tagging=prefix", "group": "tagging=prefix"}}
    assert not [s for s in SECRETS if s in json.dumps(resolved)]


@pytest.mark.parametrize("overrides, name, group", [
    ([], "defaults", "defaults"),
    (["tagging=prefix", "seed=2"], "tagging=prefix,seed=2", "tagging=prefix"),
    (["+seed=2", "trainer.seed=3", "hydra.run.dir=/x", "hydra/launcher=slurm_local"], "+seed=2,trainer.seed=3", "defaults"),
    (["~seed", "data.seed_file=a"], "~seed,data.seed_file=a", "~seed,data.seed_file=a"),
    ([f"tagging.positive={'p' * 200}"], f"tagging.positive={'p' * 200}"[:128], f"tagging.positive={'p' * 200}"[:128]),
])
def test_run_identity(overrides, name, group):
    """A run is named by its overrides (without hydra's); the seeds of one setting share a group."""
    assert run_identity(overrides) == {"name": name, "group": group}


def test_metrics_jsonl_without_wandb(tmp_path, monkeypatch):
    """Without a logger, metrics go to metrics.jsonl only: step, time and the scalar or text values."""
    monkeypatch.setattr("negagent.training.tracking.time.time", lambda: 1700000000.12345)
    tracker = RunTracker(tmp_path, {"logger": {"name": "none"}})
    tracker.log({"loss": 0.5, "epoch": 1, "note": "warmup", "grads": [1, 2], "extra": None}, step=3)
    tracker.log({"loss": 0.25}, step=4)
    tracker.summary({"final": 1.0})
    tracker.finish()
    assert tracker.wandb_run is None
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        {"step": 3, "time": 1700000000.123, "loss": 0.5, "epoch": 1, "note": "warmup"},
        {"step": 4, "time": 1700000000.123, "loss": 0.25}]


class FakeRun:
    def __init__(self, **kwargs):
        self.init, self.logged, self.summary, self.finished = kwargs, [], {}, []

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self, exit_code):
        self.finished.append(exit_code)


@pytest.fixture
def fake_wandb(monkeypatch):
    """A wandb module whose runs record what they were given."""
    runs = []

    def init(**kwargs):
        runs.append(FakeRun(**kwargs))
        return runs[-1]

    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(init=init, Settings=lambda **kw: kw))
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    return runs


def test_wandb_gets_the_redacted_config_and_numbers(tmp_path, fake_wandb):
    """wandb starts with the run's name and group and a redacted config, mirrors numeric metrics and
    the summary, and is finished with the exit code."""
    cfg = {**CONFIG, "logger": {"name": "wandb", "mode": "offline", "tags": ["cpu"], "api_key": "s3cret-value"},
           "run": {"name": "tagging=prefix,seed=1", "group": "tagging=prefix"}}
    tracker = RunTracker(tmp_path, cfg)
    (run,) = fake_wandb
    assert run.init["config"] == {**REDACTED_CONFIG, "logger": {**cfg["logger"], "api_key": REDACTED}, "run": cfg["run"]}
    assert not [s for s in SECRETS if s in json.dumps(run.init["config"])]
    assert {k: v for k, v in run.init.items() if k != "config"} == {
        "project": "negagent", "entity": None, "mode": "offline", "name": "tagging=prefix,seed=1",
        "group": "tagging=prefix", "tags": ["cpu"], "dir": str(tmp_path), "reinit": "finish_previous",
        # no code upload, no console capture, no system stats: only what the tracker logs leaves the run
        "settings": {"init_timeout": 120, "console": "off", "save_code": False, "x_disable_stats": True}}
    assert os.environ["WANDB_SILENT"] == "true"
    tracker.log({"loss": 0.5, "note": "warmup"}, step=2)
    tracker.summary({"eval_reward": 0.75, "path": "x", "skipped": [1]})
    tracker.finish(exit_code=1)
    tracker.finish()  # finishing twice is harmless
    assert (run.logged, run.summary, run.finished) == ([(2, {"loss": 0.5})], {"eval_reward": 0.75, "path": "x"}, [1])
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["note"] == "warmup"


def test_wandb_settings_from_the_logger_and_disabled_mode(tmp_path, fake_wandb):
    """logger.project, entity, mode and group are wandb's (the group overrides the derived one);
    mode=disabled starts no wandb run at all; a run finished without a code finishes with 0."""
    tracker = RunTracker(tmp_path, {"logger": {"name": "wandb", "project": "p", "entity": "team", "mode": "online",
                                               "group": "mine"}, "run": {"group": "derived"}})
    assert {k: fake_wandb[0].init[k] for k in ("project", "entity", "mode", "group", "name", "tags")} == {
        "project": "p", "entity": "team", "mode": "online", "group": "mine", "name": None, "tags": []}
    tracker.finish()
    assert fake_wandb[0].finished == [0]
    assert RunTracker(tmp_path, {"logger": {"name": "wandb", "mode": "disabled"}}).wandb_run is None
    assert len(fake_wandb) == 1


def test_no_logger_configured_means_metrics_jsonl_only(tmp_path, fake_wandb):
    assert RunTracker(tmp_path, {}).wandb_run is None and fake_wandb == []


@pytest.mark.parametrize("logger, message", [
    ({"name": "tensorboard"}, "logger='tensorboard' is not one of none, wandb"),
    ({"name": "wandb", "mode": "online"}, "logger=wandb could not start (ConnectionError: no network; retrying); "
                                          "use logger.mode=offline or logger=none"),
])
def test_bad_logger_is_one_clear_error(tmp_path, monkeypatch, logger, message):
    """An unknown logger, or wandb failing to start, is a user error that says what to do."""
    def init(**kwargs):
        raise ConnectionError("no network; retrying\nsecond line")

    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(init=init, Settings=lambda **kw: kw))
    with pytest.raises(NegagentError) as info:
        RunTracker(tmp_path, {"logger": logger})
    assert str(info.value) == message


def test_wandb_offline_files_hold_no_secret(tmp_path):
    """What a real offline wandb run writes to disk has the redacted config and none of the secrets."""
    pytest.importorskip("wandb")
    cfg = {**CONFIG, "logger": {"name": "wandb", "mode": "offline", "project": "negagent-test"}, "run": {"name": "n"}}
    tracker = RunTracker(tmp_path, cfg)
    try:
        tracker.log({"loss": 0.5}, step=1)
    finally:
        tracker.finish()
    # wandb's own log records the config it was given (the run file is written by a separate
    # process, so it is only searched for secrets, not for the config).
    logged = (tmp_path / "wandb" / "debug.log").read_text()
    assert "'api_key': '<redacted>', 'api_key_env': 'OPENAI_API_KEY'" in logged and "'hf_token': '<redacted>'" in logged
    written = b"".join(p.read_bytes() for p in Path(tmp_path / "wandb").rglob("*") if p.is_file())
    assert [s for s in SECRETS if s.encode() in written] == []
