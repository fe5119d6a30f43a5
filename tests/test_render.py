"""The renderer: masks, end-of-turn training, truncation, and train/inference parity."""

import random

import pytest

from negagent import tagging
from negagent.training.data import render_samples
from negagent.errors import NegagentError
from negagent.importers import from_nat, read_question_file
from negagent.render import IGNORE, RenderedSample, Renderer, build_chat
from tests.chat_templates import llama2_chat_tokenizer, qwen25_instruct_tokenizer, trained_span_texts
from tests.helpers import make_traj

STRATEGY_CFG = {"positive": "Solve it correctly.", "negative": "Solve it incorrectly.", "seed": 0,
                "placement": "prefix", "grade_cuts": [0.4], "grade_tags": ["G0", "G1", "G2", "G3"]}


@pytest.fixture(scope="module")
def nat_strategyqa(data_dir):
    root = data_dir / "nat" / "strategyqa"
    questions = read_question_file(root / "train.jsonl")
    trajs = []
    for name in ("positive", "negative"):
        got, _ = from_nat(root / f"strategyqa_gpt-3.5_{name}.json", questions, "strategyqa")
        trajs += got
    return trajs


def trained_runs(sample):
    runs, current = [], []
    for tok, label in zip(sample.input_ids, sample.labels):
        if label != IGNORE:
            current.append(tok)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def check_masks(sample, chat, renderer):
    """Trained runs are exactly the trained assistant turns, each ending with end-of-turn."""
    assistant = [m for m in chat if m["role"] == "assistant" and m["train"]]
    runs = trained_runs(sample)
    assert len(runs) == len(assistant), sample.id
    for run, msg in zip(runs, assistant):
        assert run[-1] == renderer.end_of_turn_id, sample.id
        decoded = renderer.tokenizer.decode(run)
        assert decoded.endswith(renderer.end_of_turn), sample.id
        assert decoded[: -len(renderer.end_of_turn)].strip() == msg["content"].strip(), sample.id


# -- small known chats (SmolLM2's real tokenizer and template) and tokenizer stand-ins -------------

KNOWN_TEXT = (
    "<|im_start|>system\nI<|im_end|>\n<|im_start|>user\nTAG\nQuestion: What is 7?<|im_end|>\n"
    "<|im_start|>assistant\nThought: step 0.\nAction: calculate[0+1]<|im_end|>\n"
    "<|im_start|>user\nObservation: 1<|im_end|>\n"
    "<|im_start|>assistant\nThought: done.\nAction: finish[7]<|im_end|>\n"
)
# KNOWN_TEXT tokenized by SmolLM2 (1 = <|im_start|>, 2 = <|im_end|>, 198 = "\n").
KNOWN_IDS = [1, 9690, 198, 57, 2, 198, 1, 4093, 198, 34934, 198, 17872, 42, 1812, 314, 216, 39, 47, 2, 198,
             1, 520, 9531, 198,
             1082, 3779, 42, 1833, 216, 32, 30, 198, 16521, 42, 7529, 75, 32, 27, 33, 77, 2,  # turn 2 (trained)
             198, 1, 4093, 198, 23143, 2903, 42, 216, 33, 2, 198, 1, 520, 9531, 198,
             1082, 3779, 42, 2294, 30, 198, 16521, 42, 9199, 75, 39, 77, 2,  # turn 4 (trained)
             198]
TURN_2 = slice(24, 41)
TURN_4 = slice(56, 69)
KNOWN_VIEW = (
    "<|im_start|>system\nI<|im_end|>\n<|im_start|>user\nTAG\nQuestion: What is 7?<|im_end|>\n"
    "<|im_start|>assistant\n[[Thought: step 0.\nAction: calculate[0+1]<|im_end|>]]\n"
    "<|im_start|>user\nObservation: 1<|im_end|>\n"
    "<|im_start|>assistant\n[[Thought: done.\nAction: finish[7]<|im_end|>]]\n"
)


def known_chat(**kwargs):
    traj = make_traj(7, True, turns=2)
    return build_chat("I", traj.question, traj.messages, tag="TAG", **kwargs)


def labels_for(ids, *trained):
    """`ids` labelled only inside the `trained` slices."""
    labels = [IGNORE] * len(ids)
    for span in trained:
        labels[span] = ids[span]
    return labels


class Templated:
    """`tokenizer` with another chat template (and optionally no eos token), for template edge cases."""

    def __init__(self, tokenizer, template=None, eos_token="<|im_end|>"):
        self._tokenizer, self._template, self.eos_token = tokenizer, template, eos_token

    def apply_chat_template(self, chat, **kwargs):
        return self._tokenizer.apply_chat_template(chat, chat_template=self._template, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


class AddsBos(Templated):
    """`tokenizer` that prepends <|im_start|> as a BOS unless told not to, as Llama's tokenizers do."""

    def encode(self, text, add_special_tokens=True):
        ids = self._tokenizer.encode(text, add_special_tokens=False)
        return [1, *ids] if add_special_tokens else ids


# Llama-2-like: a space before each assistant message, whose surrounding whitespace is stripped.
SPACED_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %} {{ m['content'] | trim }}{% else %}{{ m['content'] }}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Messages indented by six spaces after a colon, so a message starts well after the generation prompt.
INDENTED_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}:"
    "{% if m['role'] == 'assistant' %}      {{ m['content'] | trim }}{% else %}{{ m['content'] }}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant:{% endif %}"
)
# The generation prompt opens a think block that the rendered conversation lacks (as Qwen3's does).
THINKING_TEMPLATE = SPACED_TEMPLATE.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\n<think>{% endif %}")
# Assistant messages are rewritten (upper-cased), so the message text is not in the rendering.
REWRITING_TEMPLATE = SPACED_TEMPLATE.replace("m['content'] | trim", "m['content'] | upper")

# The trained runs of make_traj(7, ...)'s assistant turns, decoded.
STEP_0 = "Thought: step 0.\nAction: calculate[0+1]<|im_end|>"
STEP_1 = "Thought: step 1.\nAction: calculate[1+1]<|im_end|>"
DONE = "Thought: done.\nAction: finish[7]<|im_end|>"


def error_of(call, *args, **kwargs) -> str:
    """The message of the NegagentError that `call` raises."""
    with pytest.raises(NegagentError) as err:
        call(*args, **kwargs)
    return str(err.value)


# -- the real NAT StrategyQA corpus (skipped without NEGAGENT_TEST_DATA) ---------------------------

@pytest.mark.parametrize("strategy", ["prefix", "suffix", "none", "positive_only", "graded"])
def test_nat_strategyqa_masks_under_every_strategy(nat_strategyqa, tokenizer, strategy):
    """Under every tagging strategy only assistant turns are trained, never the instructions, the
    question or the tag. A seeded subset is rendered: strategies change only the user turn, and
    the next test renders every sample."""
    assert len(nat_strategyqa) == 1070 + 1256  # 7 empty negatives skipped
    renderer = Renderer(tokenizer, max_length=4096)
    cfg = {**STRATEGY_CFG, "strategy": strategy}
    tagged = tagging.tag_samples(nat_strategyqa, cfg)
    assert len(tagged) == (1070 if strategy == "positive_only" else 2326)
    subset = random.Random(0).sample(tagged, 200)
    samples = render_samples(subset, renderer, "Answer with tools.")
    assert len(samples) == 200
    for tagged_sample, sample in zip(subset, samples):
        traj = tagged_sample.trajectory
        chat = build_chat("Answer with tools.", traj.question, traj.messages, tag=tagged_sample.tag,
                          placement=tagged_sample.placement)
        check_masks(sample, chat, renderer)
        # Instructions, question and tag are never trained.
        first_trained = next(i for i, label in enumerate(sample.labels) if label != IGNORE)
        prompt = renderer.prompt_ids(chat[:2])
        assert first_trained == len(prompt)
        if tagged_sample.tag:
            assert tagged_sample.tag in tokenizer.decode(sample.input_ids[:first_trained])
    if strategy not in ("none", "positive_only"):
        assert any(t.tag for t in subset)  # the tag check above ran


def test_masks_and_parity_every_sample_every_turn(nat_strategyqa, tokenizer):
    """Every real sample: trained runs are exactly its assistant turns, and the inference prompt at
    turn k is the training sample's prefix and the template's own tokenization. (The one
    whole-corpus render pass, about 40 s of one core: it is what render.py's docstring promises.)"""
    renderer = Renderer(tokenizer, max_length=4096)
    cfg = {**STRATEGY_CFG, "strategy": "prefix"}
    for tagged_sample in tagging.tag_samples(nat_strategyqa, cfg):
        traj = tagged_sample.trajectory
        chat = build_chat("Answer with tools.", traj.question, traj.messages, tag=tagged_sample.tag)
        sample = renderer.training(chat, traj.id)
        check_masks(sample, chat, renderer)
        for k, msg in enumerate(chat):
            if msg["role"] != "assistant":
                continue
            prompt = renderer.prompt_ids(chat[:k])
            assert sample.input_ids[: len(prompt)] == prompt, (traj.id, k)
            plain = [{"role": m["role"], "content": m["content"]} for m in chat[:k]]
            reference = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=True, return_dict=False)
            assert prompt == reference, (traj.id, k)


# -- exact renderings, fast ---------------------------------------------------------------------------

@pytest.mark.parametrize(("tag", "placement", "role", "head"), [
    ("TAG", "prefix", "system", [{"role": "system", "content": "Do it."}, {"role": "user", "content": "TAG\nQuestion: q?"}]),
    ("TAG", "suffix", "system", [{"role": "system", "content": "Do it."}, {"role": "user", "content": "Question: q?\nTAG"}]),
    ("TAG", "prefix", "user", [{"role": "user", "content": "Do it.\n\nTAG\nQuestion: q?"}]),
    ("TAG", "suffix", "user", [{"role": "user", "content": "Do it.\n\nQuestion: q?\nTAG"}]),
    (None, "prefix", "system", [{"role": "system", "content": "Do it."}, {"role": "user", "content": "Question: q?"}]),
    ("", "suffix", "user", [{"role": "user", "content": "Do it.\n\nQuestion: q?"}]),
    (None, "bogus", "system", [{"role": "system", "content": "Do it."}, {"role": "user", "content": "Question: q?"}]),
])
def test_build_chat_places_instructions_and_tag_exactly(tag, placement, role, head):
    """Tag before/after the question, instructions as a system turn or above the question; no tag,
    no tag line (and then the placement is never read)."""
    messages = [
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "o1", "extra": "dropped"},
        {"role": "assistant", "content": "a2", "train": False},
        {"role": "user", "content": "o2", "train": True},
    ]
    chat = build_chat("Do it.", "q?", messages, tag=tag, placement=placement, instructions_role=role)
    assert chat == head + [
        {"role": "assistant", "content": "a1", "train": True},  # assistant turns train by default
        {"role": "user", "content": "o1", "train": False},  # other turns do not
        {"role": "assistant", "content": "a2", "train": False},
        {"role": "user", "content": "o2", "train": True},  # an explicit flag wins
    ]
    assert [type(m["train"]) for m in chat[len(head):]] == [bool] * 4


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tag": "T", "placement": "middle"}, "tag placement 'middle' is not 'prefix' or 'suffix'"),
    ({"instructions_role": "assistant"}, "instructions_role 'assistant' is not 'system' or 'user'"),
])
def test_build_chat_rejects_bad_settings(kwargs, message):
    with pytest.raises(NegagentError) as err:
        build_chat("I", "q", [], **kwargs)
    assert str(err.value) == message


def test_renderer_end_of_turn_defaults_to_eos_and_needs_one(tokenizer):
    """The end-of-turn token is the eos token unless set; a tokenizer without eos needs it set."""
    assert (Renderer(tokenizer).end_of_turn, Renderer(tokenizer).end_of_turn_id) == ("<|im_end|>", 2)
    custom = Renderer(tokenizer, end_of_turn="<|endoftext|>")
    assert (custom.end_of_turn, custom.end_of_turn_id) == ("<|endoftext|>", 0)
    no_eos = Templated(tokenizer, eos_token=None)
    with pytest.raises(NegagentError) as err:
        Renderer(no_eos)
    assert str(err.value) == "the tokenizer has no eos token; set render.end_of_turn"
    assert Renderer(no_eos, end_of_turn="<|im_end|>").end_of_turn_id == 2


def test_default_max_length_is_the_configured_one(tokenizer):
    """Callers that build a Renderer without max_length keep samples as long as conf/train.yaml does."""
    import yaml

    from tests.conftest import REPO

    configured = yaml.safe_load((REPO / "conf" / "train.yaml").read_text())["render"]["max_length"]
    assert Renderer(tokenizer).max_length == configured == 4096


def test_training_labels_exactly_the_assistant_turns_with_their_end_of_turn(tokenizer):
    """System, user, tag and observations are never trained; each assistant turn is, through its
    <|im_end|> (the model must learn to stop) but not the newline after it."""
    assert tokenizer.decode(KNOWN_IDS) == KNOWN_TEXT
    sample = Renderer(tokenizer).training(known_chat(), "t7", positive=False)
    assert sample == RenderedSample("t7", KNOWN_IDS, labels_for(KNOWN_IDS, TURN_2, TURN_4), positive=False, truncated=False)
    assert sample.n_trained == 17 + 13
    assert [tokenizer.decode(run) for run in trained_runs(sample)] == [STEP_0, DONE]
    assert Renderer(tokenizer).training(known_chat(), "t7").positive is None


@pytest.mark.parametrize(("untrained", "trained"), [(0, [TURN_4]), (2, [TURN_2])])
def test_turns_marked_not_to_train_are_masked(tokenizer, untrained, trained):
    traj = make_traj(7, True, turns=2)
    traj.messages[untrained]["train"] = False
    sample = Renderer(tokenizer).training(build_chat("I", traj.question, traj.messages, tag="TAG"), "t7")
    assert sample.input_ids == KNOWN_IDS  # masking changes labels only
    assert sample.labels == labels_for(KNOWN_IDS, *trained)


@pytest.mark.parametrize(("untrained", "runs"), [
    (0, [STEP_1, DONE]), (2, [STEP_0, DONE]), (4, [STEP_0, STEP_1]), (None, [STEP_0, STEP_1, DONE]),
])
def test_each_of_three_turns_keeps_its_own_train_flag(tokenizer, untrained, runs):
    traj = make_traj(7, True, turns=3)
    if untrained is not None:
        traj.messages[untrained]["train"] = False
    sample = Renderer(tokenizer).training(build_chat("I", traj.question, traj.messages), "t7")
    assert [tokenizer.decode(run) for run in trained_runs(sample)] == runs


def test_instructions_in_the_user_turn_render_under_the_default_system_prompt(tokenizer):
    """instructions_role=user: SmolLM2's template adds its own system prompt; the first assistant
    turn is then message 1 and still trained exactly."""
    traj = make_traj(3, True, turns=1)
    chat = build_chat("I", traj.question, traj.messages, instructions_role="user")
    renderer = Renderer(tokenizer)
    text = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            "<|im_start|>user\nI\n\nQuestion: What is 3?<|im_end|>\n<|im_start|>assistant\n")
    assert renderer.prompt_text(chat[:1]) == text
    sample = renderer.training(chat, "t3")
    prompt = renderer.prompt_ids(chat[:1])
    assert sample.input_ids == tokenizer.encode(text + "Thought: done.\nAction: finish[3]<|im_end|>\n")
    assert sample.labels == [IGNORE] * len(prompt) + sample.input_ids[len(prompt):-1] + [IGNORE]
    assert tokenizer.decode(sample.input_ids[len(prompt):-1]) == "Thought: done.\nAction: finish[3]<|im_end|>"


def test_prompts_are_the_training_prefixes_token_for_token(tokenizer):
    """The inference prompt before each assistant turn is the training sample's prefix and the
    template's own tokenization, ending with the generation prompt."""
    renderer, chat = Renderer(tokenizer), known_chat()
    assert renderer.prompt_ids(chat[:2]) == KNOWN_IDS[: TURN_2.start]
    assert renderer.prompt_ids(chat[:4]) == KNOWN_IDS[: TURN_4.start]
    assert renderer.prompt_text(chat[:4]) == tokenizer.decode(KNOWN_IDS[: TURN_4.start])
    assert renderer.prompt_text(chat[:4]).endswith("Observation: 1<|im_end|>\n<|im_start|>assistant\n")
    plain = [{"role": m["role"], "content": m["content"]} for m in chat[:4]]
    assert renderer.prompt_ids(chat[:4]) == tokenizer.apply_chat_template(
        plain, add_generation_prompt=True, tokenize=True, return_dict=False)


def test_prompt_ids_are_the_prompt_texts_own_tokenization(tokenizer):
    """A prompt is its text's tokenization (what a text backend sends), even where an earlier
    assistant turn opening with newlines merges with the template's newline; such a chat cannot be
    trained: its turn boundary does not survive tokenization."""
    chat = build_chat("I", "q", [{"role": "assistant", "content": "\n\n\nThought: x"}, {"role": "user", "content": "o"}])
    renderer = Renderer(tokenizer)
    text = renderer.prompt_text(chat)
    assert renderer.prompt_ids(chat) == tokenizer.encode(text, add_special_tokens=False)
    assert error_of(renderer.training, chat, "nl").startswith("sample nl: tokenization mismatch at token 17")


def test_a_space_before_the_message_is_trained_with_it(tokenizer):
    """Templates that put a space before the message and strip it (Llama 2) still train exactly the
    message and its end-of-turn."""
    renderer = Renderer(Templated(tokenizer, SPACED_TEMPLATE))
    chat = build_chat("I", "q", [{"role": "assistant", "content": "  Thought: x\nAction: finish[1] \n"}])
    sample = renderer.training(chat, "s")
    text = ("<|im_start|>system\nI<|im_end|>\n<|im_start|>user\nQuestion: q<|im_end|>\n<|im_start|>assistant\n"
            " Thought: x\nAction: finish[1]<|im_end|>\n")
    assert sample.input_ids == tokenizer.encode(text)
    assert [tokenizer.decode(run) for run in trained_runs(sample)] == [" Thought: x\nAction: finish[1]<|im_end|>"]
    assert sample.labels[-1] == IGNORE


def test_end_of_turn_is_searched_after_the_message(tokenizer):
    """A message that itself contains the end-of-turn text (here near its end, after an indent) is
    trained up to the template's own end-of-turn, not cut at the quoted one."""
    renderer = Renderer(Templated(tokenizer, INDENTED_TEMPLATE))
    content = "Thought: <|im_end|>\nAction: finish[<|im_end|>]"
    sample = renderer.training(build_chat("I", "q", [{"role": "assistant", "content": content}]), "s")
    assert renderer.debug_view(sample) == (
        "<|im_start|>system:I<|im_end|>\n<|im_start|>user:Question: q<|im_end|>\n"
        f"<|im_start|>assistant:[[      {content}<|im_end|>]]\n")


def test_tokenizers_that_add_a_bos_get_none_inside_the_text(tokenizer):
    """Pieces and the whole text are tokenized without special tokens: a tokenizer that adds a BOS
    by default (Llama's) still renders exactly the template's text."""
    renderer = Renderer(AddsBos(tokenizer))
    assert renderer.training(known_chat(), "t7").input_ids == KNOWN_IDS
    assert renderer.prompt_ids(known_chat()[:4]) == KNOWN_IDS[: TURN_4.start]


def test_chats_without_train_flags_train_every_assistant_turn(tokenizer):
    """A chat not built by build_chat (no `train` keys) trains its assistant turns."""
    plain = [{"role": m["role"], "content": m["content"]} for m in known_chat()]
    assert Renderer(tokenizer).training(plain, "t7").labels == labels_for(KNOWN_IDS, TURN_2, TURN_4)


@pytest.mark.parametrize("template", [THINKING_TEMPLATE, REWRITING_TEMPLATE])
def test_templates_that_do_not_render_the_prompt_then_the_message_are_refused(tokenizer, template):
    renderer = Renderer(Templated(tokenizer, template))
    traj = make_traj(1, True, turns=2)
    chat = build_chat("I", traj.question, traj.messages)
    expected = ("sample t1: the chat template does not render turn 2 as the generation prompt followed by the "
                "message; this template cannot be trained safely")
    assert error_of(renderer.training, chat, "t1") == expected
    # Inference prompts of later turns check the earlier turns the same way.
    assert error_of(renderer.prompt_ids, chat[:4], "t1") == expected
    assert error_of(renderer.prompt_ids, chat[:4]) == expected.replace("sample t1", "sample ?")


def test_missing_end_of_turn_is_an_error_naming_the_sample(tokenizer):
    traj = make_traj(1, True, turns=2)
    chat = build_chat("I", traj.question, traj.messages)
    message = error_of(Renderer(tokenizer, end_of_turn="<|endoftext|>").training, chat, "t1")
    assert message == "sample t1: end-of-turn token '<|endoftext|>' not found after turn 2"


def test_no_trained_turn_is_an_error_naming_the_sample(tokenizer):
    traj = make_traj(0, True, turns=3)
    for msg in traj.messages:
        msg["train"] = False
    message = error_of(Renderer(tokenizer).training, build_chat("I", traj.question, traj.messages), traj.id)
    assert message == ("sample t0: no trained tokens; check the trajectory's assistant turns and render.max_length")


def test_truncation_keeps_the_first_max_length_tokens_and_counts_it(tokenizer):
    chat = known_chat()
    assert Renderer(tokenizer, max_length=len(KNOWN_IDS)).training(chat, "a").truncated is False  # fits exactly
    cut = Renderer(tokenizer, max_length=len(KNOWN_IDS) - 5).training(chat, "a", positive=True)
    assert cut == RenderedSample("a", KNOWN_IDS[:-5], labels_for(KNOWN_IDS, TURN_2, TURN_4)[:-5], positive=True,
                                 truncated=True)
    # A cut inside the last turn leaves it partly trained, without its end-of-turn.
    assert Renderer(tokenizer).debug_view(cut) == KNOWN_VIEW.replace(" finish[7]<|im_end|>]]\n", " finish]]")
    message = error_of(Renderer(tokenizer, max_length=TURN_2.start).training, chat, "a")
    assert message == ("sample a: no trained tokens after truncation to max_length; check the trajectory's "
                       "assistant turns and render.max_length")
    assert Renderer(tokenizer, max_length=TURN_2.start + 1).training(chat, "a").n_trained == 1


def test_tokenization_mismatch_is_a_hard_error(tokenizer):
    # Newlines at the start of a turn merge with the template's newline when tokenized whole.
    chat = build_chat("I", "q", [{"role": "assistant", "content": "\n\n\nThought: x\nAction: finish[1]"}])
    assert error_of(Renderer(tokenizer).training, chat, "odd-sample") == (
        "sample odd-sample: tokenization mismatch at token 17: the text tokenizes differently across a turn "
        "boundary, so its loss mask would be wrong")


def test_debug_view_brackets_exactly_the_trained_spans(tokenizer):
    renderer = Renderer(tokenizer)
    assert renderer.debug_view(renderer.training(known_chat(), "x")) == KNOWN_VIEW
    # Runs at the very start and end of a sample are closed too.
    ids = tokenizer.encode("Hello world", add_special_tokens=False) + [2]
    assert len(ids) == 3
    assert renderer.debug_view(RenderedSample("y", ids, [ids[0], IGNORE, 2])) == "[[Hello]] world[[<|im_end|>]]"
    assert renderer.debug_view(RenderedSample("y", ids, [IGNORE] * 3)) == "Hello world<|im_end|>"


# -- other chat-model families: Llama-2-chat and Qwen2.5-instruct (tests/chat_templates.py) ---------

FAMILIES = ("smollm2", "llama2", "llama2_legacy", "qwen25")
# How each family's tokenizer decodes a trained turn: the content, then its end of turn (Llama's
# template puts a space before `</s>`; its decoder drops the space before the content).
TURN_TEXT = {"smollm2": "{}<|im_end|>", "llama2": "{} </s>", "llama2_legacy": "{} </s>", "qwen25": "{}<|im_end|>"}


def family_tokenizer(request, family):
    if family == "smollm2":
        return request.getfixturevalue("tokenizer")
    return llama2_chat_tokenizer(legacy=family == "llama2_legacy") if family.startswith("llama2") \
        else qwen25_instruct_tokenizer()


def test_chat_templates_render_like_their_families():
    """The stand-ins render and tokenize as the real families do, so the tests below mean something."""
    traj = make_traj(7, True, turns=2)
    chat = [{"role": m["role"], "content": m["content"]} for m in build_chat("I", traj.question, traj.messages, tag="TAG")]
    llama, legacy, qwen = llama2_chat_tokenizer(), llama2_chat_tokenizer(legacy=True), qwen25_instruct_tokenizer()
    llama_text = ("<s>[INST] <<SYS>>\nI\n<</SYS>>\n\nTAG\nQuestion: What is 7? [/INST] Thought: step 0.\n"
                  "Action: calculate[0+1] </s><s>[INST] Observation: 1 [/INST] Thought: done.\nAction: finish[7] </s>")
    for tok in (llama, legacy):
        assert tok.apply_chat_template(chat, tokenize=False) == llama_text
        assert tok.apply_chat_template(chat[:4], tokenize=False, add_generation_prompt=True) == llama_text[:llama_text.index(" Thought: done")]
        assert (tok.bos_token, tok.eos_token, tok.encode("a")[0]) == ("<s>", "</s>", tok.convert_tokens_to_ids("<s>"))
        assert tok.convert_ids_to_tokens(tok.encode("\n", add_special_tokens=False))[-1] == "<0x0A>"  # byte fallback
    # transformers 5's Llama prepends `▁` at the text's start only; Llama-2's tokenizer.json after every
    # special token too (which its decoder then shows as a space).
    assert llama.tokenize("<s>[INST]")[1] == "["
    assert legacy.tokenize("<s>[INST]")[1].startswith("▁")
    assert llama.decode(llama.encode(llama_text, add_special_tokens=False)) == llama_text
    assert legacy.decode(legacy.encode(llama_text, add_special_tokens=False)).startswith("<s> [INST] <<SYS>>")
    with pytest.raises(Exception, match="Conversation roles must alternate"):
        llama.apply_chat_template(chat[2:], tokenize=False)
    qwen_text = qwen.apply_chat_template(chat[1:2], tokenize=False, add_generation_prompt=True)
    assert qwen_text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                         "<|im_start|>user\nTAG\nQuestion: What is 7?<|im_end|>\n<|im_start|>assistant\n")
    assert (qwen.bos_token, qwen.eos_token, qwen.pad_token) == (None, "<|im_end|>", "<|endoftext|>")
    assert qwen.decode(qwen.encode(qwen_text)) == qwen_text


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("role", ["system", "user"])
@pytest.mark.parametrize("untrained", [None, 0, 2, 4])
def test_families_train_exactly_the_flagged_assistant_turns(request, family, role, untrained):
    """On every family: the sample is the template's own tokenization; each trained run is one
    assistant turn with `train` set, through its end-of-turn token (and nothing after it); the
    inference prompt before every assistant turn is the sample's prefix and the template's own
    tokenization. (Llama-2's tokenizer.json prepends `▁` to text it is given, so the turns cannot
    be tokenized one by one.)"""
    tok = family_tokenizer(request, family)
    renderer = Renderer(tok)
    traj = make_traj(7, True, turns=3)
    if untrained is not None:
        traj.messages[untrained]["train"] = False
    chat = build_chat("I", traj.question, traj.messages, tag="TAG", instructions_role=role)
    sample = renderer.training(chat, "t7")
    text = renderer._template(chat, generation_prompt=False)
    assert sample.input_ids == tok.encode(text, add_special_tokens=False)
    trained = [m["content"] for m in chat if m["role"] == "assistant" and m["train"]]
    assert trained_span_texts(sample, renderer) == [TURN_TEXT[family].format(content) for content in trained]
    check_masks(sample, chat, renderer)
    for k, msg in enumerate(chat):
        if msg["role"] != "assistant":
            continue
        prompt = renderer.prompt_ids(chat[:k])
        plain = [{"role": m["role"], "content": m["content"]} for m in chat[:k]]
        assert prompt == sample.input_ids[: len(prompt)] == tok.apply_chat_template(
            plain, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert sample.labels[len(prompt) - 1] == IGNORE
        assert (sample.labels[len(prompt)] != IGNORE) == msg["train"]


@pytest.mark.parametrize("family", ["smollm2", "qwen25"])
def test_families_refuse_a_turn_boundary_lost_in_tokenization(request, family):
    """Byte-level families merge newlines opening a message with the template's: a hard error."""
    chat = build_chat("I", "q", [{"role": "assistant", "content": "\n\n\nThought: x\nAction: finish[1]"}])
    message = error_of(Renderer(family_tokenizer(request, family)).training, chat, "odd-sample")
    assert message.startswith("sample odd-sample: tokenization mismatch at token ")


@pytest.mark.parametrize("family", ["llama2", "llama2_legacy"])
def test_llama_templates_strip_what_would_merge(request, family):
    """Llama-2's template strips the message and puts a space before it, so the same turn trains
    (the stripped message and its end-of-turn)."""
    renderer = Renderer(family_tokenizer(request, family))
    chat = build_chat("I", "q", [{"role": "assistant", "content": "\n\n\nThought: x\nAction: finish[1]  "}])
    assert trained_span_texts(renderer.training(chat, "s"), renderer) == ["Thought: x\nAction: finish[1] </s>"]


@pytest.mark.parametrize("family", ["llama2", "llama2_legacy", "qwen25"])
def test_nat_strategyqa_masks_and_parity_on_other_families(nat_strategyqa, request, family):
    """A seeded subset of the real corpus on each other family: masks, end-of-turn, and the prompt
    before every turn as the sample's prefix and the template's own tokenization."""
    tok = family_tokenizer(request, family)
    renderer = Renderer(tok)
    for traj in random.Random(1).sample(nat_strategyqa, 100):
        chat = build_chat("Answer with tools.", traj.question, traj.messages, tag="Solve it correctly.")
        sample = renderer.training(chat, traj.id)
        check_masks(sample, chat, renderer)
        for k, msg in enumerate(chat):
            if msg["role"] == "assistant":
                prompt = renderer.prompt_ids(chat[:k])
                assert prompt == sample.input_ids[: len(prompt)], (traj.id, k)
                assert prompt == tok.encode(renderer.prompt_text(chat[:k]), add_special_tokens=False), (traj.id, k)
