"""Config helpers shared by the entry points: plain data, composing a primary config outside its
entry point, one-line errors for unknown group choices, and the `nat_prompt` resolver (the paper's
prompt files, read at run time: negagent.prompt_files)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from negagent.errors import NegagentError
from negagent.prompt_files import read_part



def _nat_prompt(file: str, entry: str, part: str):
    value = read_part(file, entry, part)
    # A plain list would break OmegaConf.resolve (Hydra's --cfg job --resolve); a ListConfig does not.
    return OmegaConf.create(value) if isinstance(value, list) else value


# ${nat_prompt:<file>,<entry>,<part>}: registered on import, before any entry point composes a config.
OmegaConf.register_new_resolver("nat_prompt", _nat_prompt, replace=True)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
_GROUP_OVERRIDE = re.compile(r"^[+~]?([\w/]+)(?:@[\w.]+)?=(.+)$")
# Keys that hold a config group chosen under another name (`backend@teacher=openai`).
_RELOCATED_GROUPS = {"teacher": "backend@teacher", "collect.teacher": "backend@collect.teacher"}


def plain(cfg: Any) -> dict:
    """A config as plain containers: a DictConfig resolved, a mapping copied through JSON (values
    JSON cannot hold become strings)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return json.loads(json.dumps(cfg, default=str))


def compose(config_name: str, overrides: Sequence[str] = ()) -> dict:
    """The primary config `config_name` (train, evaluate, generate) as its entry point would compose
    it with `overrides`, as plain resolved data, without the `hydra` section.

    For stages called from another stage (train.py collecting or evaluating): the YAML files stay
    the only place where defaults are written. Inside a running Hydra app its search path is used
    (the same conf/ directory); elsewhere conf/ is read directly.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    if GlobalHydra.instance().is_initialized():
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    else:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    with_hydra = OmegaConf.to_container(cfg, resolve=False)
    with_hydra.pop("hydra", None)
    return plain(OmegaConf.create(with_hydra))


def check_group_overrides(argv: Sequence[str], conf_dir: Path = CONF_DIR) -> None:
    """Reject `group=name` overrides naming a config that does not exist, in one line.

    Hydra's own message for this spans several lines; users mistype task and tagging names often
    enough to deserve a one-line answer that lists the choices.
    """
    for arg in argv:
        key, _, value = arg.lstrip("+~").partition("=")
        if key in _RELOCATED_GROUPS and value and not value.startswith(("{", "null")):
            raise NegagentError(f"{arg}: the teacher is a backend config; choose it with {_RELOCATED_GROUPS[key]}={value}")
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
