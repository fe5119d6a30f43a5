"""Export a training run directory as a standalone Hugging Face model directory.

    python -m negagent.export <run_dir> [--no-merge] [--out DIR] [--allow-unfinished]

Contract:
- The run's weights are found as the evaluator finds them (`model_source.from_run_dir`): a peft
  adapter on the base model named by the frozen `model` config, or a full model.
- Adapter runs are merged into the base weights (peft `merge_and_unload`, the evaluator's own
  in-memory merge) and saved with `save_pretrained` as safetensors; with `--no-merge` the adapter is
  copied as it is (a peft adapter directory, to load on the base model). Full-model runs are saved
  with `save_pretrained` too.
- The tokenizer the run was trained with is saved with its chat template (checked by reading the
  saved tokenizer back). A saved model's generation config ends generation at the renderer's
  end-of-turn token and samples by default, so a server (`transformers serve`, vLLM) stops where
  negagent's own backends stop and honours a request's temperature (0 still means greedy).
- `README.md` (a model card) and `negagent_export.json` (the same facts as data) state the task,
  the tagging strategy, the inference tag the trained model expects (and where: before or after
  the question line; none for untagged strategies), the instructions and their role, the data
  manifest (positives and negatives trained on, the trajectory file's hash), the evaluation found
  in `<run_dir>/eval/metrics.json` (reward mean with its 95% interval per test set, or "not
  evaluated"), the base model and the negagent version.
- Refused with a one-line error: a missing run directory, a run without a `done` marker (unless
  `--allow-unfinished`), a run without weights, and an `--out` that exists and is not an empty
  directory. The export is written to a hidden sibling of `--out` and renamed into place at the
  end, so it never writes into a directory it did not create and never leaves a half-written one.
  The default `--out` is `<run_dir>/export`. Its files get the user's default permissions.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from negagent import rundir
from negagent.errors import NegagentError, exit_on_user_error

CARD = "README.md"
FACTS = "negagent_export.json"


# --- facts --------------------------------------------------------------------------------------


def inference_facts(tagging_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The strategy, the tag to put in prompts at inference (None: untagged) and where it goes."""
    from negagent import tagging

    tag = tagging.inference_tag(tagging_cfg)
    return {
        "strategy": tagging_cfg["strategy"],
        "inference_tag": tag,
        "placement": tagging.placement(tagging_cfg) if tag is not None else None,
    }


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NegagentError(f"{path}: not valid JSON ({exc})") from None


def data_facts(run_dir: Path) -> dict[str, Any] | None:
    """What the run trained on, from its manifest.json (in the run or, for a checkpoint, its parent)."""
    for folder in (run_dir, run_dir.parent):
        path = folder / "manifest.json"
        if path.is_file():
            manifest = _read_json(path)
            samples = manifest.get("samples") or {}
            return {
                "trajectories": manifest.get("trajectories"),
                "trajectories_sha256": manifest.get("trajectories_sha256"),
                "positives_used": (samples.get("positive") or {}).get("samples", 0),
                "negatives_used": (samples.get("negative") or {}).get("samples", 0),
                "available": manifest.get("available"),
                "tags": manifest.get("tags"),
            }
    return None


def eval_facts(run_dir: Path) -> dict[str, Any] | None:
    """Reward per tag mode and test set from `<run_dir>/eval/metrics.json`; None when not evaluated."""
    from negagent.rundir import EVAL, METRICS

    path = run_dir / EVAL / METRICS
    if not path.is_file():
        return None
    metrics = _read_json(path)
    results = {}
    for mode, result in (metrics.get("results") or {}).items():
        results[mode] = {
            "tag": result.get("tag"),
            "reward": {
                name: {key: (summary.get("reward") or {}).get(key) for key in ("mean", "lo", "hi", "n_questions")}
                for name, summary in (result.get("test_sets") or {}).items()
            },
        }
    return {"source": f"{EVAL}/{METRICS}", "primary": metrics.get("primary"), "results": results,
            "sampling": metrics.get("sampling"), "max_turns": metrics.get("max_turns")}


def _example_chat(render_cfg: Mapping[str, Any], instructions: str, facts: Mapping[str, Any]) -> list[dict]:
    from negagent.render import build_chat, chat_opening

    chat = build_chat(chat_opening(render_cfg, instructions), "<question>", [], tag=facts["inference_tag"],
                      placement=facts["placement"] or "prefix")
    return [{"role": m["role"], "content": m["content"]} for m in chat]


# --- the card -----------------------------------------------------------------------------------


def _interval(reward: Mapping[str, Any]) -> str:
    def number(value: Any) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    return f"{number(reward.get('mean'))} [{number(reward.get('lo'))}, {number(reward.get('hi'))}]"


def _tag_section(facts: Mapping[str, Any]) -> list[str]:
    tag, placement = facts["inference_tag"], facts["placement"]
    if tag is None:
        return [f"Inference tag: none. Strategy `{facts['strategy']}` trains without tags: prompts carry no tag."]
    if "{question}" in tag:  # a whole question line, as in the paper's prompt files
        return [
            f"Inference question line: `{tag}`",
            "",
            "The trained model expects the question asked with exactly this line ({question} replaced by the "
            "question) as the last user message before its turn; the example chat below shows it in place.",
        ]
    where = "before" if placement == "prefix" else "after"
    return [
        f"Inference tag ({placement}): `{tag}`",
        "",
        f"The trained model expects this tag on its own line {where} the `Question: ...` line of the first "
        f"user message; without it the model is not asked for a successful trajectory.",
    ]


def model_card(facts: Mapping[str, Any]) -> str:
    """README.md of an export: what the model was trained on and how to prompt it."""
    weights = facts["weights"]
    lines = [
        f"# {facts['run_name']} (negagent export)",
        "",
        f"A ReAct agent for task `{facts['task']}`, fine-tuned from base model `{facts['base_model']}` with "
        f"negagent {facts['negagent_version']} (Negative-Aware Training, arXiv 2402.11651) under tagging "
        f"strategy `{facts['strategy']}`.",
        "",
        "## Weights",
        "",
    ]
    if weights == "merged":
        lines.append("The LoRA adapter is merged into the base weights: load this directory with "
                     "`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`.")
    elif weights == "adapter":
        lines.append(f"A peft LoRA adapter, not merged: load base model `{facts['base_model']}` "
                     f"(negagent model config: `{json.dumps(facts['base_model_config'], sort_keys=True)}`) and "
                     f"apply this directory with `peft.PeftModel.from_pretrained`; the tokenizer is here.")
    else:
        lines.append("All weights were fine-tuned: load this directory with `AutoModelForCausalLM.from_pretrained` "
                     "and `AutoTokenizer.from_pretrained`.")
    lines += ["", "## Prompting", "", *_tag_section(facts), "",
              f"Instructions role: `{facts['instructions_role']}`. The chat the model was trained on starts:", "",
              "```json", json.dumps(facts["example_chat"], indent=2, ensure_ascii=False), "```", "",
              "Each reply is `Thought: ...` then `Action: tool[argument]`; the tool's result comes back as a user "
              "message `Observation: ...`; `Action: finish[answer]` ends the episode.", "", "## Training data", ""]
    data = facts["data"]
    if data is None:
        lines.append("No manifest.json in the run: the training data is not recorded.")
    else:
        lines += [
            f"- positives used: {data['positives_used']}",
            f"- negatives used: {data['negatives_used']}",
            f"- trajectory file: `{data['trajectories']}`",
            f"- trajectory file sha256: `{data['trajectories_sha256']}`",
        ]
    lines += ["", "## Evaluation", ""]
    evaluation = facts["evaluation"]
    if evaluation is None:
        lines.append("not evaluated (the run has no eval/metrics.json)")
    else:
        lines.append(f"From the run's `{evaluation['source']}`: reward mean with its 95% bootstrap interval.")
        sampling = evaluation.get("sampling") or {}
        lines += ["", f"Sampling: temperature {sampling.get('temperature')}, max_turns {evaluation.get('max_turns')}."]
        for mode, result in evaluation["results"].items():
            lines += ["", f"Tag mode `{mode}` (tag: {json.dumps(result['tag'])}):", "",
                      "| test set | reward [95% interval] | questions |", "|---|---|---|"]
            lines += [f"| {name} | {_interval(reward)} | {reward.get('n_questions')} |"
                      for name, reward in result["reward"].items()]
    lines += ["", f"Exported from run `{facts['run_name']}`; these facts as data: `{FACTS}`.", ""]
    return "\n".join(lines)


# --- the export ---------------------------------------------------------------------------------


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise NegagentError(f"--out {out}: already exists and is not an empty directory; "
                            f"choose a new one (an export never writes into an existing directory)")


def _save_tokenizer(tokenizer, target: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(target)
    saved = AutoTokenizer.from_pretrained(target)
    if saved.chat_template != tokenizer.chat_template:
        raise NegagentError(f"{target}: the saved tokenizer does not carry the run's chat template")


def _save_model(subject, tokenizer, end_of_turn_id: int, target: Path) -> None:
    from negagent.model_source import load_causal_lm

    model = load_causal_lm(subject, tokenizer, device="cpu")  # merges an adapter in memory
    model.config.use_cache = True  # training turns the cache off, and a full run saves that
    config = model.generation_config
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    # The end-of-turn token first: generation must stop where negagent's backends stop.
    config.eos_token_id = list(dict.fromkeys([end_of_turn_id, *(e for e in eos if e is not None)]))
    config.pad_token_id = tokenizer.pad_token_id
    config.do_sample = True  # servers ignore a request's temperature when the default is greedy
    config._from_model_config = False  # this file, not the model config, is the generation default
    model.save_pretrained(target, safe_serialization=True)


def _copy_adapter(adapter_dir: Path, target: Path) -> None:
    for path in sorted(adapter_dir.iterdir()):
        if path.is_file() and (path.name == "adapter_config.json" or path.name.startswith("adapter_model")):
            shutil.copy2(path, target / path.name)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _shareable(folder: Path) -> None:
    """Give every file the user's default mode: safetensors files are written owner-only (0600),
    which makes an export meant to be handed on unreadable to everyone else."""
    mode = 0o666 & ~_umask()
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(mode)


def export(run_dir: str | Path, out: str | Path | None = None, *, merge: bool = True,
           allow_unfinished: bool = False) -> Path:
    """Write the model trained in `run_dir` to `out` (default `<run_dir>/export`); see the module docstring."""
    from negagent import __version__
    from negagent.model_source import from_run_dir, load_tokenizer_for
    from negagent.rundir import TRAINED as DONE
    from negagent.render import Renderer
    from negagent.tasks import get_task

    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise NegagentError(f"{run_dir}: no such run directory")
    if not allow_unfinished and not any((folder / DONE).exists() for folder in (run_dir, run_dir.parent)):
        raise NegagentError(f"{run_dir}: the run has not finished (no '{DONE}' marker); "
                            f"pass --allow-unfinished to export its weights anyway")
    out = Path(out).expanduser() if out is not None else run_dir / rundir.EXPORT
    _check_out(out)
    subject = from_run_dir(run_dir)

    tagging_cfg = subject.tagging_cfg
    render_cfg = subject.render_cfg
    if not subject.task_cfg:
        raise NegagentError(f"{run_dir}: the run's config has no `task` section; this is not a training run")
    task = get_task(subject.task_cfg)
    weights = "full" if subject.weights_dir is not None else ("merged" if merge else "adapter")
    facts: dict[str, Any] = {
        "run_name": run_dir.resolve().name,
        "task": task.name,
        **inference_facts(tagging_cfg),
        "instructions_role": str(render_cfg.get("instructions_role") or "system"),
        "weights": weights,
        "base_model": subject.model_cfg.get("name"),
        "base_model_config": subject.model_cfg,
        "negagent_version": __version__,
        "data": data_facts(run_dir),
        "evaluation": eval_facts(run_dir),
        "instructions": task.instructions,
    }
    facts["example_chat"] = _example_chat(render_cfg, task.instructions, facts)

    tokenizer = load_tokenizer_for(subject)
    end_of_turn_id = Renderer(tokenizer, end_of_turn=render_cfg.get("end_of_turn")).end_of_turn_id
    out.parent.mkdir(parents=True, exist_ok=True)
    # Hidden (run-directory scans skip it) and made here, with the user's umask (mkdtemp's is 0700).
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        if weights == "adapter":
            _copy_adapter(subject.adapter_dir, tmp)
        else:
            _save_model(subject, tokenizer, end_of_turn_id, tmp)
        _save_tokenizer(tokenizer, tmp)
        (tmp / CARD).write_text(model_card(facts), encoding="utf-8")
        (tmp / FACTS).write_text(json.dumps(facts, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _shareable(tmp)
        _check_out(out)  # again: something may have appeared there while the model was saved
        os.replace(tmp, out)  # onto nothing, or onto an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m negagent.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a training run directory (or one of its checkpoint-* folders)")
    parser.add_argument("--out", help=f"the directory to create (default: <run_dir>/{rundir.EXPORT})")
    parser.add_argument("--merge", action=argparse.BooleanOptionalAction, default=True,
                        help="merge a LoRA adapter into the base weights (default); --no-merge copies the adapter")
    parser.add_argument("--allow-unfinished", action="store_true", help="export a run without a 'done' marker")
    args = parser.parse_args(argv)
    out = export(args.run_dir, args.out, merge=args.merge, allow_unfinished=args.allow_unfinished)
    facts = json.loads((out / FACTS).read_text(encoding="utf-8"))
    print(f"exported ({facts['weights']}): {out}")
    if facts["inference_tag"] is None:
        print(f"inference tag: none (strategy {facts['strategy']} trains without tags)")
    else:
        print(f"inference tag ({facts['placement']}): {facts['inference_tag']}")


if __name__ == "__main__":
    main(sys.argv[1:])
