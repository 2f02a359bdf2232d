#!/bin/bash
# GRPO of MiniCPM-V: answers sampled per prompt, scored against the reference answer, learned from
# their group-normalised rewards (docs/GRPO.md); LoRA with DeepSpeed ZeRO-2 by default.
#
#   bash finetune_grpo.sh
#
# The data: SFT records, {"id", "image", "conversations"}, whose last assistant message is the
# reference answer the rewards score (see the README). Edit DATA / EVAL_DATA below, or override any
# variable from the environment:
#   MODEL=openbmb/MiniCPM-V-2_6 DATA=train.json EVAL_DATA= bash finetune_grpo.sh
# A full fine-tune (finetune_ds.sh's settings, ZeRO-3; with --grpo_beta > 0 the reference is a frozen
# copy of the starting weights):
#   USE_LORA=false bash finetune_grpo.sh
# Arguments after the script name go to finetune.py and win over the defaults:
#   bash finetune_grpo.sh --grpo_rewards em:1,f1:0.5 --grpo_num_generations 8 --grpo_beta 0.04
# Every other variable (GPUS_PER_NODE, NNODES, MODEL, LLM_TYPE, MODEL_MAX_Length, DS_CONFIG, ...)
# is the SFT launcher's: this script runs finetune_lora.sh (or finetune_ds.sh) with --stage grpo.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)

# The data: a .json list (or .jsonl) of SFT records, the last answer of each the reference.
export DATA=${DATA:-"path/to/training_data.json"}
export EVAL_DATA=${EVAL_DATA-""} # evaluation samples answers too: set EVAL_DATA to a file to evaluate
export OUTPUT_DIR=${OUTPUT_DIR:-"output/output_grpo"}
USE_LORA=${USE_LORA:-true} # false: full fine-tune of the LLM and the vision tower

if [ "$USE_LORA" = true ]; then
    LAUNCHER="$HERE/finetune_lora.sh"
else
    LAUNCHER="$HERE/finetune_ds.sh"
fi

# G = 4 answers per prompt of at most 256 tokens at temperature 1, rewarded by exact match; no KL term.
exec bash "$LAUNCHER" --stage grpo --grpo_num_generations 4 --grpo_temperature 1.0 --grpo_max_new_tokens 256 \
    --grpo_rewards em --grpo_beta 0.0 --learning_rate 1e-6 "$@"
