#!/bin/bash
# Preference tuning (DPO) of MiniCPM-V: beta 0.1, learning rate 1e-6; LoRA with DeepSpeed ZeRO-2 by default.
#
#   bash finetune_dpo.sh
#
# The data: preference records, {"id", "image", "conversations" (ending with the user's message),
# "chosen", "rejected"} (see the README). Edit DATA / EVAL_DATA below, or override any variable
# from the environment:
#   MODEL=openbmb/MiniCPM-V-2_6 LLM_TYPE=qwen DATA=pref.json EVAL_DATA=pref_eval.json bash finetune_dpo.sh
# A full fine-tune (finetune_ds.sh's settings, ZeRO-3; the reference is a frozen copy of the
# starting weights, sharded like the policy):
#   USE_LORA=false bash finetune_dpo.sh
# Arguments after the script name go to finetune.py and win over the defaults:
#   bash finetune_dpo.sh --dpo_beta 0.05 --dpo_loss_type ipo --dpo_ref_model path/to/sft_model
# Every other variable (GPUS_PER_NODE, NNODES, MODEL, LLM_TYPE, MODEL_MAX_Length, DS_CONFIG, ...)
# is the SFT launcher's: this script runs finetune_lora.sh (or finetune_ds.sh) with --stage dpo.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)

# The data: a .json list (or .jsonl) of preference records.
export DATA=${DATA:-"path/to/preference_data.json"}
export EVAL_DATA=${EVAL_DATA-"path/to/preference_eval_data.json"} # set EVAL_DATA= (empty) to train without evaluation
export OUTPUT_DIR=${OUTPUT_DIR:-"output/output_dpo"}
USE_LORA=${USE_LORA:-true} # false: full fine-tune of the LLM and the vision tower

if [ "$USE_LORA" = true ]; then
    LAUNCHER="$HERE/finetune_lora.sh"
else
    LAUNCHER="$HERE/finetune_ds.sh"
fi

# A pair longer than MODEL_MAX_Length is reported by preflight, never truncated.
exec bash "$LAUNCHER" --stage dpo --dpo_beta 0.1 --dpo_loss_type sigmoid "$@"
