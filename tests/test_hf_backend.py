"""The hf backend: batched left-padded generation and the shared-prefix KV cache give, token for
token, what greedy decoding of each unpadded prompt alone gives; stop strings and the end-of-turn
token end a row; texts come back in the caller's order.

The tiny random model as loaded writes only "\\n" (its residual stream is the input token's
embedding, and with tied embeddings the best next token is the one just read), so every turn would
be empty and every comparison trivially equal. The `model` fixture scales its matrices up, so
attention and MLP outputs dominate and greedy text depends on the whole prompt: varied, non-empty,
and different when the cached prefix is wrong.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from negagent.agent import Sampling, run_episodes
from negagent.backends.hf import HFBackend, _StopStrings, build
from negagent.models import load_model
from negagent.render import Renderer, build_chat
from negagent.tasks import get_task
from tests.helpers import TINY_MODEL

N = 6  # new tokens per row: varied text, and little compute
GREEDY = Sampling(temperature=0.0, max_new_tokens=N)  # stops at "Observation:", which no greedy text here holds

TASK = get_task({"name": "arith", "data_dir": None, "n_train": 4, "n_test": 5})
QUESTIONS = TASK.test_sets()["arith"]
# Prompts of different lengths, not in length order (the backend sorts them into batches).
CHATS = [
    build_chat(TASK.instructions, QUESTIONS[0].question, []),
    build_chat(TASK.instructions, QUESTIONS[1].question,
               [{"role": "assistant", "content": "Thought: add.\nAction: calculate[2+3]"},
                {"role": "user", "content": "Observation: 5"}]),
    build_chat(TASK.instructions, QUESTIONS[2].question, []),
    build_chat(TASK.instructions, QUESTIONS[3].question, []),
    build_chat(TASK.instructions, QUESTIONS[4].question, []),
]


@pytest.fixture(scope="module")
def model():
    """The tiny random model with every matrix but the (tied) embeddings scaled x10 (see the module docstring)."""
    model = load_model(TINY_MODEL)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name:
                param.mul_(10)
    return model


@pytest.fixture(scope="module")
def renderer(tokenizer):
    return Renderer(tokenizer)


def greedy_ids(model, prompt: list[int], n: int = N) -> list[int]:
    """`n` greedy tokens after `prompt`, each from a full forward pass over the unpadded prompt
    alone (no batch, no padding, no cache): the reference every backend path must reproduce."""
    ids, device = list(prompt), next(model.parameters()).device
    with torch.no_grad():
        for _ in range(n):
            top = model(torch.tensor([ids], device=device), logits_to_keep=1).logits[0, -1].topk(2)
            # Paths differ by float rounding (~1e-6); a closer tie would make the comparison a coin toss.
            assert float(top.values[0] - top.values[1]) > 1e-4, "near-tie in the reference: pick other prompts"
            ids.append(int(top.indices[0]))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def prompts(renderer):
    return [renderer.prompt_ids(chat) for chat in CHATS]


@pytest.fixture(scope="module")
def refs(model, prompts):
    """Reference greedy token ids of each chat of CHATS."""
    return [greedy_ids(model, prompt) for prompt in prompts]


@pytest.fixture(scope="module")
def ref_texts(refs, tokenizer):
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in refs]
    assert all(text.strip() for text in texts) and len(set(texts)) == len(texts), texts  # varied, non-empty
    return texts


@pytest.mark.parametrize("batch_size, prefix_cache", [(5, False), (5, True), (2, True), (2, False)])
def test_batched_generation_equals_one_at_a_time(model, renderer, ref_texts, batch_size, prefix_cache):
    """Left-padded batches of prompts of different lengths, with and without the shared-prefix
    cache, give every row exactly the greedy text of its prompt alone, in the caller's order."""
    backend = HFBackend(model, renderer, batch_size=batch_size, prefix_cache=prefix_cache)
    assert backend.complete(CHATS, GREEDY) == ref_texts
    assert (backend._prefix is not None) == prefix_cache


@pytest.mark.gpu  # deselected by default; python -m pytest -m gpu on a GPU machine
@pytest.mark.parametrize("prefix_cache", [False, True])
def test_batched_generation_on_cuda_equals_one_at_a_time(model, renderer, tokenizer, prompts, prefix_cache):
    """On a GPU (inputs, cache and stop checks on the model's device) batches give the greedy text
    of each prompt alone, and a stop string still ends its row."""
    cuda = copy.deepcopy(model).to("cuda")
    refs = [greedy_ids(cuda, prompt) for prompt in prompts]
    expected = [tokenizer.decode(ids, skip_special_tokens=True) for ids in refs]
    assert all(text.strip() for text in expected)
    backend = HFBackend(cuda, renderer, batch_size=5, prefix_cache=prefix_cache)
    assert backend.complete(CHATS, GREEDY) == expected
    stop = tokenizer.decode(refs[0][2:4])
    assert stop not in tokenizer.decode(refs[0][:3]) and not any(stop in t for t in expected[1:])
    texts = backend.complete(CHATS, Sampling(temperature=0.0, max_new_tokens=N, stop=(stop,)))
    assert texts == [tokenizer.decode(refs[0][:4])] + expected[1:]


def test_batches_are_sorted_by_length(model, renderer, prompts, ref_texts, monkeypatch):
    """Prompts of similar length share a batch (`batch_size` rows each); texts still come back in
    the caller's order."""
    lengths = [len(p) for p in prompts]
    assert len(set(lengths)) == len(lengths) and lengths != sorted(lengths)  # the test needs both
    backend = HFBackend(model, renderer, batch_size=2)
    batches = []
    generate = backend._generate

    def spy(batch, sampling):
        batches.append([len(p) for p in batch])
        return generate(batch, sampling)

    monkeypatch.setattr(backend, "_generate", spy)
    assert backend.complete(CHATS, GREEDY) == ref_texts
    ordered = sorted(lengths)
    assert batches == [ordered[0:2], ordered[2:4], ordered[4:]]


def test_prefix_cache_holds_the_common_prefix_of_the_batch(model, renderer, prompts, ref_texts):
    """The cache covers exactly the ids every prompt of the batch starts with (the instructions)."""
    backend = HFBackend(model, renderer, batch_size=5)
    assert backend.complete(CHATS, GREEDY) == ref_texts
    shared = os.path.commonprefix(prompts)
    assert len(shared) > 100  # the instructions: worth caching
    assert backend._prefix[0] == shared
    assert backend._prefix[1].get_seq_length() == len(shared)


def test_prefix_cache_is_rebuilt_for_a_batch_that_does_not_share_it(model, renderer, tokenizer, ref_texts):
    """A batch whose prompts do not all start with the cached prefix (instructions in the user turn)
    gets a new cache of its own common prefix, and still the reference text."""
    backend = HFBackend(model, renderer, batch_size=5)
    assert backend.complete(CHATS, GREEDY) == ref_texts
    user_chats = [build_chat(TASK.instructions, q.question, [], instructions_role="user") for q in QUESTIONS[1:3]]
    user_prompts = [renderer.prompt_ids(chat) for chat in user_chats]
    expected = [tokenizer.decode(greedy_ids(model, p), skip_special_tokens=True) for p in user_prompts]
    assert all(text.strip() for text in expected)
    assert backend.complete(user_chats, GREEDY) == expected
    assert backend._prefix[0] == os.path.commonprefix(user_prompts)


def test_prefix_cache_gives_the_same_episodes(model, renderer):
    """Two-turn episodes through the agent loop: with the shared-prefix cache (built on the first
    turn, reused on the second) the turns are those of the uncached backend, and none is empty."""
    jobs = [(q, 0) for q in QUESTIONS]
    runs, prefixes = {}, {}
    for cached in (False, True):
        backend = HFBackend(model, renderer, batch_size=5, prefix_cache=cached)
        seen = []
        trajs = run_episodes(backend, TASK, jobs, lambda name, arg: ("1", True),
                             sampling=Sampling(temperature=0.0, max_new_tokens=N), max_turns=2,
                             on_step=lambda *_: seen.append(backend._prefix))
        runs[cached] = sorted((t.id, [m["content"] for m in t.messages]) for t in trajs)
        prefixes[cached] = seen
    assert runs[True] == runs[False]
    turns = [content for _, messages in runs[True] for content in messages[::2]]
    assert len(turns) == 10 and all(turns), turns  # five episodes, two non-empty turns each
    assert prefixes[False] == [None, None, None]
    first = prefixes[True][0]
    assert first is not None and all(p is first for p in prefixes[True])  # computed once, then reused


@pytest.mark.parametrize("prompts, shared", [
    ([list(range(100, 140)) + [1], list(range(100, 140)) + [2, 3]], 40),
    ([list(range(100, 132)) + [1], list(range(100, 132)) + [2]], 32),  # the shortest prefix worth a cache
    ([list(range(100, 131)) + [1], list(range(100, 131)) + [2]], None),  # one token short of it
    ([list(range(100, 140)), list(range(100, 140)) + [5]], 39),  # every row keeps a token to process
    ([list(range(100, 150)), list(range(100, 150)), list(range(100, 135)) + [7]], 35),
    ([list(range(100, 200))], None),  # a single row has nothing to share
    ([[7] + list(range(100, 200)), list(range(100, 200))], None),
    ([[7] + list(range(100, 200)), [8] + list(range(100, 200))], None),  # all alike but the first id
])
def test_shared_prefix(model, renderer, prompts, shared):
    """The cached prefix is the longest common prefix that leaves every row a token, when a
    batch of two or more rows shares at least 32 ids; its cache holds exactly those ids."""
    backend = HFBackend(model, renderer)
    got = backend._shared_prefix(prompts)
    if shared is None:
        assert got is None and backend._prefix is None
    else:
        assert got is backend._prefix and got[0] == prompts[0][:shared] and got[1].get_seq_length() == shared


@pytest.mark.parametrize("second, reused", [
    ([list(range(100, 140)) + [9], list(range(100, 140)) + [8, 7]], True),
    ([list(range(100, 140)) + [9], list(range(100, 138)) + [8, 7, 6]], False),  # one row leaves the prefix
    ([list(range(100, 140)), list(range(100, 140)) + [8]], False),  # one row is only the prefix
])
def test_shared_prefix_is_reused_only_when_every_row_extends_it(model, renderer, second, reused):
    """A cached prefix is kept for a batch whose every prompt starts with it and goes on;
    otherwise the batch gets its own."""
    backend = HFBackend(model, renderer)
    first = backend._shared_prefix([list(range(100, 140)) + [1], list(range(100, 140)) + [2]])
    got = backend._shared_prefix(second)
    assert (got is first) == reused
    assert got[0] == os.path.commonprefix([*second, second[0][:-1]])


def test_no_prefix_cache_when_turned_off(model, renderer):
    backend = HFBackend(model, renderer, prefix_cache=False)
    assert backend._shared_prefix([list(range(100, 140)) + [1], list(range(100, 140)) + [2]]) is None


@pytest.mark.parametrize("generated, stops, stopped", [
    ("Thought: add.\nAction: calculate[2+3]\nObservation: 5", ("Observation:",), True),
    ("Thought: add.\nAction: calculate[2+3]\nObservation:", ("\nObservation:", "Observation:"), True),
    ("Thought: add.\nAction: calculate[2+3]", ("Observation:",), False),
    ("Thought: add.\nAction: calculate[2+3]\nObservation", ("Observation:",), False),
    ("Thought: add.\nAction: calculate[2+3]\nObservation: 5", (), False),
    ("Thought: done.\nAction: finish[5]", ("Observation:", "finish["), True),
    # Special tokens are skipped, as in the text the caller gets (which clean_turn then cuts).
    ("Action: calculate[2+3]\nObservation<|im_start|>: 5", ("Observation:",), True),
])
def test_stop_strings_look_only_at_the_generated_text(tokenizer, generated, stops, stopped):
    """A row stops when its generated text contains a stop string; the prompt (which holds earlier
    observations) does not count."""
    prompt = tokenizer.encode("Question: 2+3?\nObservation: 5\n", add_special_tokens=False)
    ids = torch.tensor([prompt + tokenizer.encode(generated, add_special_tokens=False)])
    criterion = _StopStrings(tokenizer, stops, len(prompt))
    assert criterion(ids, None).tolist() == [stopped]


def test_stop_strings_are_per_row(tokenizer):
    """Rows of one batch stop independently; padding after a finished row is not text."""
    prompt = tokenizer.encode("Question: 2+3?\n", add_special_tokens=False)
    done = tokenizer.encode("Action: calculate[2+3]\nObservation:", add_special_tokens=False)
    going = tokenizer.encode("Thought: I add 2 and 3 to get the total", add_special_tokens=False)
    width = max(len(done), len(going))
    pad = [tokenizer.pad_token_id]
    rows = [prompt + going + pad * (width - len(going)), prompt + done + pad * (width - len(done))]
    criterion = _StopStrings(tokenizer, ["Observation:"], len(prompt))
    assert criterion(torch.tensor(rows), None).tolist() == [False, True]


def test_a_stop_string_ends_its_row_in_generation(model, renderer, tokenizer, refs, ref_texts):
    """A stop string (here two tokens of the first row's greedy text) ends that row right after
    the token that completes it; the other rows go on to max_new_tokens."""
    stop = tokenizer.decode(refs[0][2:4])
    assert stop.strip() and stop not in tokenizer.decode(refs[0][:3]) and not any(stop in t for t in ref_texts[1:])
    backend = HFBackend(model, renderer, batch_size=5)
    texts = backend.complete(CHATS, Sampling(temperature=0.0, max_new_tokens=N, stop=(stop,)))
    assert texts == [tokenizer.decode(refs[0][:4])] + ref_texts[1:]


def test_end_of_turn_token_ends_its_row(model, tokenizer, refs, ref_texts):
    """Generation of a row stops at the renderer's end-of-turn token (here made the fourth greedy
    token of the first row), which no other row writes; rows padded after it decode to their text."""
    eot = refs[0][3]
    first_turns = [0, 2, 3, 4]  # a renderer with this end of turn cannot render earlier turns
    assert eot not in refs[0][:3] and not any(eot in refs[i] for i in first_turns[1:])
    renderer = Renderer(tokenizer, end_of_turn=tokenizer.convert_ids_to_tokens(eot))
    assert renderer.end_of_turn_id == eot
    backend = HFBackend(model, renderer, batch_size=5)
    texts = backend.complete([CHATS[i] for i in first_turns], GREEDY)
    assert texts == [tokenizer.decode(refs[0][:4])] + [ref_texts[i] for i in first_turns[1:]]


def test_sampling_uses_temperature_and_top_p(model, renderer, tokenizer, prompts):
    """With temperature > 0 the backend samples (seeded by the caller through torch) with the run's
    temperature and top_p: exactly what transformers' sampler draws from the unpadded prompt."""
    sampling = Sampling(temperature=0.7, top_p=0.5, max_new_tokens=N, stop=())
    backend = HFBackend(model, renderer)
    torch.manual_seed(3)
    [text] = backend.complete([CHATS[0]], sampling)
    torch.manual_seed(3)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompts[0]]), attention_mask=torch.ones(1, len(prompts[0]), dtype=torch.long),
                             max_new_tokens=N, do_sample=True, temperature=0.7, top_p=0.5, top_k=None,
                             eos_token_id=renderer.end_of_turn_id, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(out[0, len(prompts[0]):], skip_special_tokens=True)
    assert text.strip() and text == expected
    assert text != tokenizer.decode(greedy_ids(model, prompts[0]))  # it did sample


def test_defaults_and_eval_mode(model, renderer):
    """Generation runs without dropout; 16 rows a batch, named "hf", prefix cache on by default."""
    model.train()
    backend = HFBackend(model, renderer)
    assert backend.model.training is False
    assert (backend.batch_size, backend.name, backend.prefix_cache) == (16, "hf", True)


def test_prefix_cache_with_a_model_saved_with_the_cache_off(model, renderer, ref_texts, monkeypatch):
    """Training turns `config.use_cache` off and a checkpoint keeps that; the prefix cache is still
    built, and rows still get their reference text."""
    monkeypatch.setattr(model.config, "use_cache", False)
    backend = HFBackend(model, renderer, batch_size=5)
    assert backend.complete(CHATS, GREEDY) == ref_texts
    assert backend._prefix[1] is not None


@pytest.mark.parametrize("cfg, expected", [
    ({}, (16, "hf", True, [])),
    ({"batch_size": 3, "label": "hf:tiny", "prefix_cache": False, "threads": 2}, (3, "hf:tiny", False, [2])),
    ({"label": None, "threads": None, "prefix_cache": True}, (16, "hf", True, [])),
    ({"threads": "1"}, (16, "hf", True, [1])),
])
def test_build_reads_the_backend_config(model, renderer, monkeypatch, cfg, expected):
    """`build` takes batch size, label, prefix cache and CPU threads from the backend config."""
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)  # never change this process's threads
    backend = build(cfg, model=model, renderer=renderer)
    assert (backend.batch_size, backend.name, backend.prefix_cache, threads) == expected
    assert (backend.model, backend.renderer, backend.tokenizer) == (model, renderer, renderer.tokenizer)
