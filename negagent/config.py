"""Config helpers shared by the entry points."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

from negagent.errors import NegagentError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
_GROUP_OVERRIDE = re.compile(r"^[+~]?([\w/]+)=(.+)$")


def plain(cfg: Any) -> dict:
    """A config as plain containers: a DictConfig resolved, a mapping copied through JSON (values
    JSON cannot hold become strings)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return json.loads(json.dumps(cfg, default=str))


def check_group_overrides(argv: Sequence[str], conf_dir: Path = CONF_DIR) -> None:
    """Reject `group=name` overrides naming a config that does not exist, in one line.

    Hydra's own message for this spans several lines; users mistype task and tagging names often
    enough to deserve a one-line answer that lists the choices.
    """
    for arg in argv:
        match = _GROUP_OVERRIDE.match(arg)
        if not match:
            continue
        group, value = match.groups()
        folder = conf_dir / group
        if group.startswith("hydra") or not folder.is_dir() or value == "null":
            continue
        for name in value.split(","):  # multirun sweeps list several
            if not (folder / f"{name}.yaml").is_file():
                choices = sorted(p.stem for p in folder.glob("*.yaml"))
                raise NegagentError(f"unknown {group} '{name}' (in {conf_dir / group}); choose one of: {', '.join(choices)}")
