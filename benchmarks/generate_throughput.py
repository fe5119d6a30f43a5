"""Trajectories per second of collection through the `openai` teacher: concurrent requests
(`--concurrency`, default 16) against sequential calls (concurrency 1), in one run.

The endpoint is a local OpenAI-compatible server on 127.0.0.1 that waits `--latency` seconds
(default 0.2) per call, like a remote model, then answers with the scripted teacher's next ReAct
turn for the conversation it was sent, so episodes are real multi-turn calculator episodes. Both
modes run the whole collection path (agent loop, real calculator, JSONL writes with fsync) on the
same `--questions` arith questions, each into a fresh directory. Prints each mode's figures, then
`ratio X` (concurrent over sequential trajectories/s) as the last line.

    python benchmarks/generate_throughput.py [--questions 48] [--latency 0.2] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from negagent.backends.scripted import ScriptedTeacher  # noqa: E402
from negagent.collection.collect import collect  # noqa: E402
from negagent.tasks import get_task  # noqa: E402
from tests.servers import ChatEndpoint  # noqa: E402


def run(endpoint: ChatEndpoint, task_cfg: dict, concurrency: int, out_dir: Path) -> tuple[float, dict]:
    cfg = {
        "task": task_cfg,
        "teacher": {"name": "openai", "base_url": endpoint.base_url, "model": endpoint.model, "api_key_env": None,
                    "concurrency": concurrency, "timeout_s": 30, "preflight": False},
        "protocol": {"name": "bench", "temperatures": [0.7], "keep": "all"},
        "generation": {"progress": False},
    }
    start = time.perf_counter()
    stats = collect(cfg, out_dir)
    return time.perf_counter() - start, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=48)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds the endpoint waits per call")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()

    task_cfg = {"name": "arith", "data_dir": None, "n_train": args.questions, "max_turns": 7}
    teacher = ScriptedTeacher(get_task(task_cfg), {"wrong_operand": 0.1, "malformed_action": 0.05})
    rates = {}
    with ChatEndpoint(teacher, latency_s=args.latency) as endpoint, tempfile.TemporaryDirectory() as tmp:
        for mode, concurrency in (("sequential", 1), (f"concurrency {args.concurrency}", args.concurrency)):
            calls_before = endpoint.calls
            seconds, stats = run(endpoint, task_cfg, concurrency, Path(tmp) / mode.replace(" ", "_"))
            episodes = stats["this_run"]["collected"]
            rates[mode] = episodes / seconds
            print(f"{mode}: {episodes} trajectories, {endpoint.calls - calls_before} calls, {seconds:.2f}s, "
                  f"{rates[mode]:.2f} trajectories/s", flush=True)
    sequential, concurrent = rates["sequential"], rates[f"concurrency {args.concurrency}"]
    print(f"ratio {concurrent / sequential:.2f}")


if __name__ == "__main__":
    main()
