#!/usr/bin/env bash
# CuMo stage 3, visual instruction tuning: CLIP-MoE + MLP-MoE co-upcycled from stage 2.
#
# Start it the same way on every node of the job, either
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node 0> MODEL=cumo-8x7b bash examples/stage3.sh [key=value ...]
#     -> the script runs `torchrun ... -m cumo_megatron.train --config <yaml> <overrides>` itself, or
#   torchrun --nnodes 4 --nproc-per-node 8 --node-rank <0..3> --master-addr <node 0> --master-port 29500 \
#       examples/stage3.sh [key=value ...]
#     -> torchrun runs this file with python once per GPU; each starts its rank's training.
# MODEL (cumo-7b-mistral | cumo-7b-vicuna | cumo-8x7b) picks examples/configs/stage3_<model>.yaml,
# CONFIG=<file> any other. The YAML holds the H100 settings (TP/SP/PP/EP, distributed optimizer,
# recompute, bf16/FP8); key=value arguments and EXTRA_ARGS override any of them. Paths come from
# DATA_JSON, IMAGE_FOLDER, TOKENIZER, CKPT_DIR, LOAD, SAVE; DRY_RUN=1 prints what would run.
# Everything is described in examples/README.md.
#
# How one file is both a bash script and a Python program:
#  - bash reads the line `""":"` as the empty string "" followed by ":", i.e. the word `:`, the
#    command that does nothing. It then runs the lines below it up to `exec`, which replaces bash
#    with Python running this same file (first argument --launch), so bash never reaches the
#    Python code. `bash -n` still parses the whole file: the line `: <<'#PYTHON'` turns everything
#    after it, up to the line `#PYTHON`, into a here-document that `:` ignores.
#  - Python reads `""":"` as the opening of a triple-quoted string, the module docstring, holding
#    the bash lines; it closes at the line `"""`, and the Python code follows. To Python, `#PYTHON`
#    is a comment.
#  Keep triple double quotes and backslashes out of the bash lines (they would end or escape
#  Python's string) and any line reading exactly `#PYTHON` out of the Python code.
""":"
set -eu
exec "${PYTHON:-python3}" "$0" --launch "$@"
: <<'#PYTHON'
"""
import os
import sys

STAGE = 3

if __name__ == "__main__":  # not when multiprocessing re-imports this file in a child process
    # Works from a checkout without installing: the repository root holds cumo_megatron/.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from cumo_megatron.launch import script_main

    sys.exit(script_main(STAGE, __file__, sys.argv[1:]))
#PYTHON
