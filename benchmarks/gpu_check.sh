#!/usr/bin/env bash
# The GPU check (see benchmarks/gpu_check.py): bf16 LoRA and full fine-tuning, ZeRO-3 with a verified
# save, packed batches with sdpa and flash-attention, batched evaluation with hf and vLLM; writes a JSON.
#   bash benchmarks/gpu_check.sh [--out DIR] [--work DIR] [--model NAME] [--budget-s S] [--allow-cpu]
# Exit status 1 when no GPU is visible (without --allow-cpu) or any check failed.
set -euo pipefail
# The same interpreter runs every entry point (sys.executable): $PYTHON, else python3, else python.
exec "${PYTHON:-$(command -v python3 || command -v python)}" "$(dirname "$0")/gpu_check.py" "$@"
