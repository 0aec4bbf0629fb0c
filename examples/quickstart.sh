#!/usr/bin/env bash
# The whole CuMo recipe on tiny generated assets, on CPU, in a few minutes:
#   bash examples/quickstart.sh [OUT]        (default OUT=runs/quickstart)
# builds a shapes dataset, a tokenizer, a tiny CLIP and LLaMA; converts them; trains stage 1
# (connector), stage 2 (dense), co-upcycles to CLIP-MoE + MLP-MoE and trains stage 3; answers the
# held-out questions and writes OUT/eval.json (exact-match accuracy, chance level) and
# OUT/expert_load.png; then runs tools/evaluate.py suite on a POPE-style yes/no and a multiple-choice
# split of the held-out images and prints the results table (OUT/benchmarks/results.md, .json).
# Re-running continues where it stopped; add --fresh to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/quickstart}"
shift || true
exec "${PYTHON:-python3}" -m cumo_megatron.quickstart "$OUT" "$@"
