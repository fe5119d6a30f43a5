"""Mutation testing of negagent's core modules with mutmut: how many small deliberate bugs the fast tests catch.

    python scripts/mutation.py                      every core module (about 20 minutes on 2 cores)
    python scripts/mutation.py scoring metrics      some of them
    python scripts/mutation.py --survivors scoring  also print the diff of every surviving mutant

The tracked tree is copied into a scratch directory (`--workdir`, default a new temporary directory),
so mutmut never writes into the checkout and two runs never share state. mutmut mutates the bodies
of functions (operators, constants, arguments, returned values), runs the tests that cover each
mutant, and counts a mutant as killed when a test fails. The score of a module is killed mutants over
all mutants; `timeout` counts as killed, `no tests` and `survived` do not. Needs `pip install mutmut`
(not part of the default set-up: it is a development tool). Not run by CI: it takes far longer than
the test suite.

Surviving mutants that no test can kill (equivalent mutants: the program behaves the same) are
listed with their reason in EQUIVALENT below, so the score stays honest and anyone can re-check them.

Deliberate bugs that each make at least one test fail (re-check by hand: apply one, run the tests):
- the shared-prefix cache of the hf backend built from all-zero token ids;
- batched generation that pads on the right instead of the left;
- control strength computed as failure-tag minus success-tag accuracy;
- bootstrap intervals that resample single episodes instead of whole questions;
- "one positive per question" that keeps the first N positives instead;
- `redact_secrets` that returns the config unchanged;
- strategy plots drawn without their bars.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# module (short name) -> (source file, the fast tests that cover it)
MODULES = {
    "scoring": ("negagent/scoring.py", ["tests/test_scoring.py"]),
    "metrics": ("negagent/metrics.py", ["tests/test_metrics.py"]),
    "tagging": ("negagent/tagging.py", ["tests/test_tagging.py"]),
    "render": ("negagent/render.py", ["tests/test_render.py"]),
    "agent": ("negagent/agent.py", ["tests/test_agent.py"]),
    "hf_backend": ("negagent/backends/hf.py", ["tests/test_hf_backend.py"]),
    "batching": ("negagent/training/batching.py", ["tests/test_training_batching.py"]),
}

# Surviving mutants that behave exactly like the original, by mutant name: why no test can tell them apart.
EQUIVALENT: dict[str, str] = {
    "negagent.metrics.x__quantile__mutmut_4": 'float("NAN") is the same NaN as float("nan")',
    "negagent.metrics.x_mean_ci__mutmut_15": 'float("NAN") is the same NaN as float("nan") (mean)',
    "negagent.metrics.x_mean_ci__mutmut_20": 'float("NAN") is the same NaN as float("nan") (lo)',
    "negagent.metrics.x_mean_ci__mutmut_25": 'float("NAN") is the same NaN as float("nan") (hi)',
    "negagent.metrics.x_mean_ci__mutmut_45": "rng.integers(n, size=...) draws the same array as integers(0, n, size=...)",
    "negagent.metrics.x_paired_comparison__mutmut_18": "rng.integers(n, size=...) is integers(0, n, size=...)",
    "negagent.metrics.x_pass_at_k__mutmut_3": "the early return is a shortcut: comb(n - c, k) is 0 when n - c < k, "
                                              "so the general formula gives 1.0 too (checked for every n < 30)",
    "negagent.metrics.x_sign_test__mutmut_13": "scipy's binomtest defaults to p=0.5",
    "negagent.metrics.x_sign_test__mutmut_14": "scipy's binomtest defaults to alternative='two-sided'",
    "negagent.agent.x_run_episodes__mutmut_74": "ep.ended = None in the final loop: nothing reads `ended` after it",
    "negagent.agent.x_run_episodes__mutmut_75": "ep.ended = False in the final loop: nothing reads `ended` after it",
    "negagent.backends.hf.xǁHFBackendǁ_shared_prefix__mutmut_22": "prompts[1][n] instead of prompts[0][n]: the same "
                                                                 "'all rows equal at n' test (there are always two rows)",
    "negagent.backends.hf.xǁHFBackendǁ_shared_prefix__mutmut_32": "prompts[1][:n] equals prompts[0][:n] (n: common prefix)",
    "negagent.backends.hf.xǁHFBackendǁ_shared_prefix__mutmut_35": "prompts[1][:n] equals prompts[0][:n] (n: common prefix)",
    "negagent.backends.hf.xǁHFBackendǁcomplete__mutmut_12": "the placeholder text is overwritten for every index",
    # device=None or dropped: equivalent on CPU only; each fails the CUDA test (pytest -m gpu) on a GPU.
    "negagent.backends.hf.xǁ_StopStringsǁ__call____mutmut_10": "device dropped: equivalent on CPU (killed on CUDA)",
    "negagent.backends.hf.xǁ_StopStringsǁ__call____mutmut_12": "device=None: equivalent on CPU (killed on CUDA)",
    "negagent.backends.hf.xǁHFBackendǁ_shared_prefix__mutmut_29": "device=None: equivalent on CPU (killed on CUDA)",
    "negagent.backends.hf.xǁHFBackendǁ_shared_prefix__mutmut_31": "device dropped: equivalent on CPU (killed on CUDA)",
}

KILLED = {"killed", "timeout", "caught by type check"}


def _copy_tree(workdir: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split("\n")
    for name in filter(None, files):
        source = REPO / name
        if source.is_file():
            (workdir / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, workdir / name)


def _write_config(workdir: Path, names: list[str]) -> None:
    sources = [MODULES[n][0] for n in names]
    tests = sorted({t for n in names for t in MODULES[n][1]})
    lines = ["[mutmut]", "source_paths=negagent", "only_mutate=", *[f"    {s}" for s in sources],
             "also_copy=", "    conf/", "    hydra_plugins/", "    train.py", "    evaluate.py", "    generate.py",
             "pytest_add_cli_args_test_selection=", *[f"    {t}" for t in tests],
             "pytest_add_cli_args=", "    -p", "    no:cacheprovider", "    -q", ""]
    (workdir / "setup.cfg").write_text("\n".join(lines))


def _results(workdir: Path) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=workdir,
                         capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r"^\s+(\S+): (.+)$", out, re.M))


def _module_of(mutant: str) -> str | None:
    for name, (source, _) in MODULES.items():
        dotted = source[:-3].replace("/", ".")
        if mutant.startswith(dotted + ".x"):
            return name
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("modules", nargs="*", help=f"short names, of: {', '.join(MODULES)} (default: all)")
    parser.add_argument("--workdir", type=Path, help="scratch directory (must not exist yet)")
    parser.add_argument("--survivors", action="store_true", help="print the diff of every surviving mutant")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    names = args.modules or list(MODULES)
    unknown = [n for n in names if n not in MODULES]
    if unknown:
        sys.exit(f"mutation: unknown module(s) {', '.join(unknown)}; choose from {', '.join(MODULES)}")
    if shutil.which("mutmut") is None and subprocess.run([sys.executable, "-c", "import mutmut"]).returncode:
        sys.exit("mutation: mutmut is not installed; run: pip install mutmut==3.8.1")
    if args.workdir and args.workdir.exists():
        sys.exit(f"mutation: --workdir {args.workdir} exists; give a new directory")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="negagent-mutation-"))
    workdir.mkdir(parents=True, exist_ok=True)
    _copy_tree(workdir)
    _write_config(workdir, names)
    print(f"mutation: mutating {', '.join(names)} in {workdir}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children)],
                   cwd=workdir, env=env, check=False)
    statuses = _results(workdir)
    table: dict[str, Counter] = {n: Counter() for n in names}
    survivors: list[str] = []
    for mutant, status in statuses.items():
        module = _module_of(mutant)
        if module not in table:
            continue
        if status not in KILLED and mutant in EQUIVALENT:
            status = "equivalent"
        table[module][status] += 1
        if status not in KILLED and status != "equivalent":
            survivors.append(mutant)
    print(f"\n{'module':<12} {'mutants':>8} {'killed':>7} {'equivalent':>11} {'survived':>9} {'score':>7}")
    summary = {}
    for name, counts in table.items():
        total = sum(counts.values())
        killed = sum(counts[s] for s in KILLED)
        equivalent = counts["equivalent"]
        scored = total - equivalent
        score = killed / scored if scored else float("nan")
        summary[name] = {"mutants": total, "killed": killed, "equivalent": equivalent, "score": score,
                         "statuses": dict(counts)}
        print(f"{name:<12} {total:>8} {killed:>7} {equivalent:>11} {total - killed - equivalent:>9} {score:>7.1%}")
    (workdir / "mutation_scores.json").write_text(json.dumps(summary, indent=2))
    for mutant in survivors:
        print(f"survived: {mutant}")
        if args.survivors:
            diff = subprocess.run([sys.executable, "-m", "mutmut", "show", mutant], cwd=workdir,
                                  capture_output=True, text=True).stdout
            print(diff)
    print(f"mutation: scores in {workdir / 'mutation_scores.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
