#!/bin/bash
# LoRA fine-tuning of MiniCPM-V with DeepSpeed ZeRO-2.
#
#   bash finetune_lora.sh
#
# Edit DATA / EVAL_DATA below, or override any variable from the environment:
#   MODEL=openbmb/MiniCPM-V-2_6 DATA=train.json EVAL_DATA=eval.json bash finetune_lora.sh
# Arguments after the script name go to finetune.py and win over the defaults below:
#   bash finetune_lora.sh --max_steps 500 --learning_rate 1e-5
# Without a GPU the script still runs (CPU, gloo, fp32): that is how the demo and tests use it.
# SIGTERM to the script (or Ctrl-C): every worker finishes its step, saves checkpoint-N, and the script
# exits 143 (130). OUTPUT_DIR must be new or empty: a second run into it stops (see the README).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)

# The data: a .json list (or .jsonl) of {"id", "image", "conversations"} records.
DATA=${DATA:-"path/to/training_data.json"}
EVAL_DATA=${EVAL_DATA-"path/to/eval_data.json"} # set EVAL_DATA= (empty) to train without evaluation
OUTPUT_DIR=${OUTPUT_DIR:-"output/output_lora"}

# What this script trains: the vision tower in full and LoRA adapters on the LLM (its weights frozen),
# with DeepSpeed ZeRO-2.
TUNE_ARGS=(--tune_vision true --tune_llm false --use_lora true)
DS_CONFIG=${DS_CONFIG:-"$HERE/ds_config_zero2.json"}

# The rest is launch.sh, shared with the other launchers: the cluster (GPUS_PER_NODE, NNODES, NODE_RANK,
# MASTER_ADDR, MASTER_PORT), MODEL, LLM_TYPE, MODEL_MAX_Length, PYTHON, TORCHRUN, PRECISION, and the
# finetune.py flags every launcher passes (learning rate 1e-6, 10000 steps, a checkpoint every 1000, ...).
source "$HERE/launch.sh"
