"""The paper presets run the paper's protocol (NAT, arXiv 2402.11651), checked against the authors'
own prompt files; and a paper preset without trajectories, or with a broken prompt file, stops with
one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from negagent.config import CONF_DIR
from negagent.sweep import show_sweep_config
from tests.helpers import assert_one_line_error

REPO = CONF_DIR.parent
PROMPT_FILES = {"math": "gsm8k/gsm8k_conversation.json", "hotpotqa": "hotpotqa/hotpotqa_conversation.json",
                "strategyqa": "StrategyQA/StrategyQA_conversation.json"}
PRESETS = ["math_7b", "math_13b", "math_negatives", "tag_wording", "hotpotqa", "hotpotqa_graded", "strategyqa"]


def _members(capsys, preset: str, data_dir) -> list[dict]:
    """Each member's resolved job config, as `train.py -m experiment=<preset> --cfg job --resolve` shows it."""
    argv = ["-m", f"experiment={preset}", f"data_dir={data_dir}", "data.trajectories=t.jsonl", "--cfg", "job", "--resolve"]
    assert show_sweep_config(argv, CONF_DIR, "train", "train")
    text = capsys.readouterr().out
    parts = text.split("# member #")[1:]
    return [yaml.safe_load(part.split("\n", 1)[1]) for part in parts]


@pytest.mark.parametrize("preset", PRESETS)
def test_paper_presets_show_the_papers_settings(capsys, data_dir, preset):
    """Every member of every paper preset: Llama-2-chat, full fine-tuning for 2 epochs at lr 5e-5 with a
    global batch of 64, the paper's prompt file (instructions as a user turn the assistant acknowledges),
    its tag wording as whole question lines, evaluation at temperature 0.2 with 512 new tokens, turns
    without an action ending the episode, trajectories required."""
    members = _members(capsys, preset, data_dir)
    assert members, preset
    for cfg in members:
        task = cfg["task"]["name"]
        prompts = json.loads((data_dir / "nat" / "prompts" / PROMPT_FILES[task]).read_text())
        assert cfg["model"]["name"].startswith("llama2_")
        trainer = cfg["trainer"]
        assert (trainer["name"], trainer["epochs"], trainer["lr"], trainer["global_batch_size"]) == ("paper", 2, 5e-5, 64)
        assert cfg["render"]["max_length"] == 4096
        assert cfg["eval"]["evaluator"]["sampling"] == {"temperature": 0.2, "max_new_tokens": 512}
        assert cfg["task"]["on_parse_error"] == "end"
        assert cfg["data"]["collect_if_missing"] is False
        assert cfg["collect"]["protocol"]["temperatures"] == [0.2, 0.5, 0.7]
        if task == "math":
            assert cfg["task"]["scoring"] == "strict"
        else:  # Google through serper.dev, ranked to 3 (offline BM25 only when asked for)
            assert cfg["eval"]["evaluator"]["tools"]["search"]["backend"] == "serper"
        strategy = cfg["tagging"]["strategy"]
        entry = prompts[cfg["render"]["prompt_entry"]]
        # The chat opens with the file's instructions and acknowledgement, not negagent's own wording.
        assert cfg["render"]["opening"] == entry["conversations"]
        assert [m["role"] for m in cfg["render"]["opening"]] == ["user", "assistant"]
        if strategy in ("none", "positive_only"):
            assert cfg["render"]["prompt_entry"] == "zero-shot"
            assert cfg["render"]["question"] == prompts["zero-shot"]["question_prompt"]
        elif strategy == "graded":
            assert cfg["tagging"]["grade_cuts"] == [0.4]
            assert cfg["tagging"]["grade_tags"] == [entry[f"class_{k}_question_prompt"] for k in range(1, 5)]
        else:
            assert (cfg["tagging"]["positive"], cfg["tagging"]["negative"]) == (
                entry["correct_question_prompt"], entry["incorrect_question_prompt"])
    strategies = sorted(m["tagging"]["strategy"] for m in members)
    if preset in ("math_7b", "math_13b", "hotpotqa", "strategyqa"):
        assert set(strategies) == {"positive_only", "none", "prefix"}  # positive-only, NUT, NAT
    if preset == "tag_wording":
        tags = {m["tagging"]["positive"] for m in members}
        assert len(tags) == 4 and all("{question}" in t for t in tags)


def test_paper_preset_without_trajectories_stops_with_one_line(tmp_path):
    """A paper sweep with no data.trajectories stops before Hydra launches or writes anything."""
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "-m", "experiment=strategyqa", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert_one_line_error(result, "data.trajectories is required", "collect_if_missing=false")
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("override, fragments", [
    ("render.prompt_file={missing}", ("prompt file not found", "render.prompt_file")),
    ("tagging.entry=no-such-entry", ("no entry 'no-such-entry'", "it has: zero-shot, zero-shot-target-aware")),
])
def test_a_broken_prompt_file_setting_is_one_line(tmp_path, override, fragments):
    """prompt=nat with a prompt file that is missing, or an entry it lacks, stops with one line naming it."""
    prompt_file = tmp_path / "prompts.json"
    opening = [{"role": "user", "content": "Rules."}, {"role": "assistant", "content": "Understood."}]
    prompt_file.write_text(json.dumps({
        "zero-shot": {"conversations": opening, "question_prompt": "Q: {question}"},
        "zero-shot-target-aware": {"conversations": opening, "correct_question_prompt": "Q: {question} (right)",
                                   "incorrect_question_prompt": "Q: {question} (wrong)"},
    }))
    override = override.format(missing=tmp_path / "missing.json")
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "debug=smoke", "prompt=nat", "tagging=nat",
         f"render.prompt_file={prompt_file}", override, "data.trajectories=unused.jsonl",
         f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert_one_line_error(result, *fragments)


# --- conformance with the authors' own StrategyQA trajectories --------------------------------------

NAT_STRATEGYQA = ("strategyqa_gpt-3.5_positive.json", "strategyqa_gpt-3.5_negative.json")


def _authors_layout(opening: list[dict], question_turn: str, conversations: list[dict]) -> tuple[str, list[str]]:
    """The text the paper's training code builds for one record with the Llama-2 chat layout, and the
    text of each turn it trains (`loss: true`).

    The layout, as the paper's code writes it: `<s>[INST] {user} [/INST] {assistant} </s><s>[INST] ...`,
    opening turns and the question untrained, each trained assistant turn followed by `</s>`; a
    record that ends on a user turn gets `</s>` appended after it. Contents are compared stripped, as
    Llama-2's chat template strips them.
    """
    turns = [*({**m, "loss": False} for m in opening), {"role": "user", "content": question_turn, "loss": False},
             *conversations]
    text, trained = "<s>", []
    for turn in turns:
        content = turn["content"].strip()
        if turn["role"] == "user":
            text += f"[INST] {content}"
        else:
            text += f" [/INST] {content} </s><s>"
            if turn["loss"]:
                trained.append(f"{content} </s>")
    if turns[-1]["role"] == "user":
        text += "</s>"
    return text, trained


def test_authors_strategyqa_trajectories_import_score_and_render_as_the_authors_trained(data_dir):
    """The paper's own GPT-3.5 StrategyQA trajectories, imported: negagent's scoring agrees with the
    recorded rewards (every disagreement named); the per-question protocol is the paper's (one
    positive, spread over the three temperatures, and every negative); rendered with a Llama-2-chat
    tokenizer under the paper's prompt file and tags, each sample's text is the authors' layout and its
    trained spans are exactly the turns the authors trained."""
    from collections import Counter

    from negagent import tagging
    from negagent.importers import Agreement, from_nat, read_question_file
    from negagent.prompt_files import read_part
    from negagent.render import ChatOpening, Renderer, build_chat
    from tests.chat_templates import llama2_chat_tokenizer, trained_span_texts

    nat = data_dir / "nat"
    questions = read_question_file(nat / "strategyqa" / "train.jsonl")
    agreement, trajectories, records = Agreement(), [], []
    for name in NAT_STRATEGYQA:
        got, empty = from_nat(nat / "strategyqa" / name, questions, "strategyqa", agreement)
        trajectories += got
        records += [r for r in json.loads((nat / "strategyqa" / name).read_text()) if r["conversations"]]
        assert empty == (7 if "negative" in name else 0)  # episodes whose first turn had no action
    assert len(trajectories) == len(records) == 1070 + 1256

    # Labels: negagent's StrategyQA scoring against the rewards the authors recorded.
    assert agreement.checked == 2326 and agreement.agree >= 2324, agreement.summary()
    assert len(agreement.disagreements) == agreement.checked - agreement.agree

    # The protocol: per question one positive (a random one of three temperatures) and every negative.
    per_question = Counter((t.question_id, t.reward) for t in trajectories)
    assert {n for (_, reward), n in per_question.items() if reward} == {1}
    assert all(per_question[(q, True)] + per_question[(q, False)] <= 3 for q, _ in per_question)
    temperatures = Counter(t.provenance["temperature"] for t in trajectories if t.reward)
    assert set(temperatures) == {0.2, 0.5, 0.7} and min(temperatures.values()) > 0.3 * 1070
    kept = tagging.select(trajectories, {"strategy": "prefix", "keep": "one_positive", "seed": 0})
    assert len(kept) == len(trajectories)

    # Rendering: the paper's prompt file, its tags, a Llama-2-chat tokenizer.
    prompt_file = str(nat / "prompts" / "StrategyQA" / "StrategyQA_conversation.json")
    entry = "zero-shot-target-aware"
    opening = ChatOpening(tuple(read_part(prompt_file, entry, "conversations")))
    tags = {"strategy": "prefix", "positive": read_part(prompt_file, entry, "correct_question_prompt"),
            "negative": read_part(prompt_file, entry, "incorrect_question_prompt")}
    tokenizer = llama2_chat_tokenizer()
    renderer = Renderer(tokenizer, max_length=1_000_000)
    for traj, record in zip(trajectories, records):
        assert traj.provenance["question_id"] == record["id"]
        tag = tagging.tag_for(traj, tags)
        chat = build_chat(opening, traj.question, traj.messages, tag=tag)
        sample = renderer.training(chat, traj.id)
        ours = tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in chat], tokenize=False)
        question_turn = tag.replace("{question}", questions[record["id"]]["question"])
        authors, authors_trained = _authors_layout(list(opening.messages), question_turn, record["conversations"])
        assert trained_span_texts(sample, renderer) == authors_trained, traj.id
        # The same text up to the last trained turn. The authors' records then hold a closing observation
        # ("Episode finished", or the last search result of an unfinished episode) and a trained </s>;
        # negagent ends an episode on the model's turn (see the README).
        assert authors.startswith(ours), traj.id
        tail = authors[len(ours):]
        if traj.pred is not None:
            assert tail in ("", "<s>[INST] Observation: Episode finished</s>"), traj.id
        else:
            assert tail == "" or (tail.startswith("<s>[INST] Observation: ") and tail.endswith("</s>")), traj.id


def test_a_teacher_gets_the_papers_one_shot_demonstration(tmp_path, data_dir):
    """generate.py with prompt=nat render.prompt_entry=one-shot: every teacher prompt opens with the paper's
    solved example (never stored), then asks the question; the collected trajectories hold only the
    episodes' own turns, and the collection records which prompt it used."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from negagent.backends.scripted import ScriptedTeacher
    from negagent.collection.collect import collect
    from negagent.tasks import get_task
    from negagent.trajectory import load_trajectories

    prompt_file = data_dir / "nat" / "prompts" / "gsm8k" / "gsm8k_conversation.json"
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose("generate", overrides=[
            "task=math", f"data_dir={data_dir}", "task.limit_train=4", "prompt=nat", f"render.prompt_file={prompt_file}",
            "render.prompt_entry=one-shot", "generation.progress=false"])
    cfg = OmegaConf.to_container(cfg, resolve=True)
    demonstration = json.loads(prompt_file.read_text())["one-shot"]
    assert cfg["render"]["opening"] == demonstration and len(demonstration) > 4  # instructions, ack, a solved example

    class Recording(ScriptedTeacher):
        chats: list = []

        def complete(self, chats, sampling):
            Recording.chats.extend(chats)
            return super().complete(chats, sampling)

    task = get_task(cfg["task"])
    collect(cfg, tmp_path, backend=Recording(task, cfg["teacher"]["failure_rates"], name="scripted"))
    first_turns = [chat for chat in Recording.chats if chat[-1]["content"].startswith("Question: ")]
    assert len(first_turns) == 4 * 3  # every question at each of the paper's three temperatures
    for chat in first_turns:
        assert [{"role": m["role"], "content": m["content"]} for m in chat[:-1]] == demonstration
        assert all(not m.get("train", True) for m in chat[:-1] if m["role"] == "assistant")
    episodes, _ = load_trajectories(tmp_path / "episodes.jsonl", task="math")
    assert episodes and all(t.messages[0]["role"] == "assistant" for t in episodes)
    assert not any(m["content"] == demonstration[3]["content"] for t in episodes for m in t.messages)
    prompt = json.loads((tmp_path / "collection.json").read_text())["prompt"]
    assert prompt and {t.provenance["prompt"] for t in episodes} == {prompt}


def test_a_qa_preset_without_search_access_stops_before_training(tmp_path, data_dir):
    """A QA paper preset evaluates with the paper's search (serper): without SERPER_API_KEY and without a
    recorded cache to replay, train.py stops with one line before reading data or training."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "SERPER_API_KEY"}
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "experiment=strategyqa", f"data_dir={data_dir}",
         "data.trajectories=not-read.jsonl", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120, env=env,
    )
    assert_one_line_error(result, "SERPER_API_KEY", "bm25")
    assert not (tmp_path / "run" / "config.json").exists() and not (tmp_path / "run" / "manifest.json").exists()


def test_an_exported_model_card_shows_a_question_line_tag_whole():
    """A tag worded as the paper's (a whole question line) is shown as the line to ask with, not as a
    line to put before the question."""
    from negagent.export import _tag_section

    lines = _tag_section({"strategy": "prefix", "inference_tag": "Question: {question}. Solve it correctly.",
                          "placement": "prefix"})
    assert lines[0] == "Inference question line: `Question: {question}. Solve it correctly.`"
    assert "on its own line" not in " ".join(lines)
