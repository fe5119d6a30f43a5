"""Where training metrics go: always `metrics.jsonl` in the run directory, and optionally wandb.

`logger=wandb` (`mode: offline` needs no network; `wandb sync` uploads later). The run name and
group come from the run's overrides (`run.name`, `run.group` in the frozen config), so the members
of a sweep never merge into one wandb run; `finish()` is always called, also on error. Nothing
secret is recorded: `redact_secrets` replaces the value of any key that names a key, token,
secret or password, and any value shaped like an API key.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping

from negagent import rundir
from negagent.errors import NegagentError

# Keys that hold a secret themselves ("api_key", "hf_token", "wandb_key"), not ones that merely
# mention one ("api_key_env" names a variable; "max_new_tokens" counts tokens).
_SECRET_KEY = re.compile(r"(^|_)(api_?key|key|token|secret|passw(or)?d|credentials?)$", re.I)
_SECRET_VALUE = re.compile(r"^(sk-|hf_|ghp_|xox[bp]-)[A-Za-z0-9_\-]{8,}")
REDACTED = "<redacted>"
LOGGERS = ("none", "wandb")


def redact_secrets(value: Any) -> Any:
    """A copy of a config container with secret-looking entries replaced by `<redacted>`."""
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            secret_key = isinstance(key, str) and _SECRET_KEY.search(key) and not isinstance(item, (Mapping, list))
            out[key] = REDACTED if secret_key and item not in (None, "", False) else redact_secrets(item)
        return out
    if isinstance(value, list):
        return [redact_secrets(v) for v in value]
    if isinstance(value, str) and _SECRET_VALUE.match(value):
        return REDACTED
    return value


class RunTracker:
    """Appends metrics to `run_dir/metrics.jsonl` and mirrors them to wandb when configured."""

    def __init__(self, run_dir: Path, cfg: Mapping[str, Any]):
        self.path = Path(run_dir) / rundir.TRAINING_LOG
        self.wandb_run = None
        logger = cfg.get("logger") or {"name": "none"}
        if logger.get("name") not in LOGGERS:
            raise NegagentError(f"logger={logger.get('name')!r} is not one of {', '.join(LOGGERS)}")
        if logger["name"] == "wandb" and logger.get("mode", "offline") != "disabled":
            self.wandb_run = self._start_wandb(Path(run_dir), cfg, logger)

    @staticmethod
    def _start_wandb(run_dir: Path, cfg: Mapping[str, Any], logger: Mapping[str, Any]):
        import wandb

        run = cfg.get("run", {})
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            return wandb.init(
                project=logger.get("project") or "negagent",
                entity=logger.get("entity"),
                mode=logger.get("mode", "offline"),
                name=run.get("name"),
                group=logger.get("group") or run.get("group"),
                tags=list(logger.get("tags") or []),
                config=redact_secrets(dict(cfg)),
                dir=str(run_dir),
                reinit="finish_previous",
                settings=wandb.Settings(init_timeout=120, console="off", save_code=False, x_disable_stats=True),
            )
        except Exception as exc:  # wandb raises its own types for network and auth problems
            raise NegagentError(f"logger=wandb could not start ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                                "use logger.mode=offline or logger=none") from None

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        record = {"step": step, "time": round(time.time(), 3), **{k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}}
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def summary(self, values: Mapping[str, Any]) -> None:
        if self.wandb_run is not None:
            for key, value in values.items():
                if isinstance(value, (int, float, str)):
                    self.wandb_run.summary[key] = value

    def finish(self, exit_code: int = 0) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None


def run_identity(overrides: list[str]) -> dict[str, str]:
    """Run name and group from the command-line overrides; seeds of one setting share a group."""
    kept = [o for o in overrides if not o.startswith(("hydra.", "hydra/"))]
    name = ",".join(kept) or "defaults"
    group = ",".join(o for o in kept if not re.match(r"^[+~]?(seed|\w+\.seed)=", o)) or "defaults"
    return {"name": name[:128], "group": group[:128]}
