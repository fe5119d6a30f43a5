"""Real (non-pad) tokens per second: this project's training step against the naive one.

Data: the NAT StrategyQA GPT-3.5 trajectories (positives and negatives) imported from the data
directory (`--data-dir`, or env NEGAGENT_TEST_DATA), tagged with the prefix strategy and rendered
with SmolLM2's tokenizer by the project's renderer. Model: a small randomly initialised Llama
(`--hidden`, `--layers`) with SmolLM2's 49,152-token vocabulary. Each mode trains the same samples,
`--batch-size` per micro-batch, with the same loss and optimizer. This project's step: length-grouped
(or packed) micro-batches and logits only at trained positions (`--logits full` to measure the
batching alone). The naive step, as the paper's code does: random batches padded to their longest
sample, logits at every position. Prints each mode's pad fraction, trained-position fraction and
tokens/s, then `ratio X` (this project's over the naive) as the last line.

    python benchmarks/train_throughput.py --data-dir DIR [--samples 128] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from negagent.training.batching import MicroBatches, plan_micro_batches, processed_tokens, real_tokens, trained_tokens  # noqa: E402
from negagent.errors import NegagentError, exit_on_user_error  # noqa: E402
from negagent.training.loss import normalised_loss, trained_logits  # noqa: E402

NAT_FILES = ("strategyqa_gpt-3.5_positive.json", "strategyqa_gpt-3.5_negative.json")


def load_samples(data_dir: Path, max_length: int):
    """Rendered NAT StrategyQA samples (prefix tagging) and the tokenizer."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from negagent.config import CONF_DIR
    from negagent.training.data import prepare
    from negagent.importers import from_nat, read_question_file
    from negagent.models import load_tokenizer
    from negagent.render import Renderer
    from negagent.tasks import get_task
    from negagent.trajectory import write_trajectories

    folder = data_dir / "nat" / "strategyqa"
    missing = [name for name in (*NAT_FILES, "train.jsonl") if not (folder / name).is_file()]
    if missing:
        raise NegagentError(f"{folder}: missing {', '.join(missing)}; pass --data-dir with the project's data layout")
    questions = read_question_file(folder / "train.jsonl")
    trajectories = [t for name in NAT_FILES for t in from_nat(folder / name, questions, "strategyqa")[0]]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trajectories.jsonl"
        write_trajectories(path, trajectories)
        with initialize_config_dir(str(CONF_DIR), version_base=None):
            cfg = compose("train", overrides=["task=strategyqa", f"data_dir={data_dir}", f"data.trajectories={path}",
                                              f"render.max_length={max_length}"])
        tokenizer = load_tokenizer(cfg.model)
        renderer = Renderer(tokenizer, max_length=max_length)
        samples, _ = prepare(OmegaConf.to_container(cfg, resolve=True), get_task(cfg.task), renderer)
    return samples, tokenizer


def build_model(tokenizer, hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                         max_position_embeddings=4096, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


class ModeRun:
    """One batching mode: its own model (same seed) and optimizer, timed per micro-batch."""

    def __init__(self, mode: str, samples, tokenizer, args):
        self.mode = mode
        # This project computes logits only at trained positions; the naive recipe at every position.
        self.trained_logits_only = mode != "padded" and args.logits == "trained"
        self.model = build_model(tokenizer, args.hidden, args.layers)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        plan = plan_micro_batches([len(s.input_ids) for s in samples], args.batch_size, mode, seed=0)
        self.batches = MicroBatches(samples, plan, mode=mode, pad_id=tokenizer.pad_token_id, loss_norm="token_mean")
        self.real = self.processed = self.trained = 0
        self.elapsed = 0.0

    def step(self, k: int, timed: bool) -> None:
        batch = self.batches[k]
        start = time.perf_counter()
        extra = {"attention_mask": batch["attention_mask"]} if "attention_mask" in batch else {"position_ids": batch["position_ids"]}
        if self.trained_logits_only:
            logits, _ = trained_logits(self.model, {"input_ids": batch["input_ids"], **extra}, batch["targets"])
        else:
            logits = self.model(input_ids=batch["input_ids"], use_cache=False, **extra).logits
        loss = normalised_loss(logits, batch["targets"], batch["weights"], batch["weights"].sum())
        del logits
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if timed:  # the first steps pay for allocation and kernel selection
            self.elapsed += time.perf_counter() - start
            self.real += real_tokens(batch)
            self.processed += processed_tokens(batch)
            self.trained += trained_tokens(batch)

    def result(self) -> dict:
        return {"tokens_per_s": self.real / self.elapsed, "pad_fraction": 1 - self.real / self.processed, "seconds": self.elapsed,
                "trained_fraction": self.trained / self.real}


def run_interleaved(modes: list[str], samples, tokenizer, args) -> dict[str, dict]:
    """Alternate the modes micro-batch by micro-batch, so load from other processes on a shared
    machine slows them alike; every micro-batch of every mode is trained (and timed after warm-up)."""
    runs = [ModeRun(mode, samples, tokenizer, args) for mode in modes]
    longest = max(len(r.batches) for r in runs)
    for k in tqdm(range(longest), desc="micro-batches"):
        for r in runs:
            if k < len(r.batches):
                r.step(k, timed=k >= args.warmup)
    return {r.mode: r.result() for r in runs}


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("NEGAGENT_TEST_DATA"), help="the project's data directory")
    parser.add_argument("--samples", type=int, default=128, help="samples trained per mode (a seeded draw)")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per micro-batch")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=1, help="micro-batches not timed")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--mode", default="grouped", choices=["grouped", "packed"], help="this project's batching to compare")
    parser.add_argument("--logits", default="trained", choices=["trained", "full"],
                        help="this project's step: logits at trained positions only (the training default) or everywhere")
    args = parser.parse_args(argv)
    if not args.data_dir or not Path(args.data_dir).is_dir():
        raise NegagentError("no data directory: pass --data-dir DIR or set NEGAGENT_TEST_DATA (the layout of the project's data README)")
    if args.threads:
        torch.set_num_threads(args.threads)
    samples, tokenizer = load_samples(Path(args.data_dir), args.max_length)
    import random

    samples = random.Random(0).sample(samples, min(args.samples, len(samples)))
    lengths = sorted(len(s.input_ids) for s in samples)
    print(f"{len(samples)} samples, tokens per sample: median {lengths[len(lengths) // 2]}, max {lengths[-1]}; "
          f"batch {args.batch_size}; model hidden {args.hidden} x {args.layers} layers; torch threads {torch.get_num_threads()}")
    results = run_interleaved(["padded", args.mode], samples, tokenizer, args)
    for mode, r in results.items():
        name = "pad-to-longest, full logits" if mode == "padded" else f"{mode}, {args.logits} logits (this project)"
        print(f"{name:>40}: pad fraction {r['pad_fraction']:.3f}, trained positions {r['trained_fraction']:.3f} of real tokens, "
              f"{r['tokens_per_s']:,.0f} real tokens/s ({r['seconds']:.1f} s)")
    print(f"ratio {results[args.mode]['tokens_per_s'] / results['padded']['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
