#!/bin/bash
# Full-parameter fine-tuning of MiniCPM-V with DeepSpeed ZeRO-3.
#
#   bash finetune_ds.sh
#
# Edit DATA / EVAL_DATA below, or override any variable from the environment:
#   MODEL=openbmb/MiniCPM-V-2_6 DATA=train.json EVAL_DATA=eval.json bash finetune_ds.sh
# Arguments after the script name go to finetune.py and win over the defaults below:
#   bash finetune_ds.sh --max_steps 500 --learning_rate 1e-5
# Without a GPU the script still runs (CPU, gloo, fp32): that is how the demo and tests use it.
# SIGTERM to the script (or Ctrl-C): every worker finishes its step, saves checkpoint-N, and the script
# exits 143 (130). OUTPUT_DIR must be new or empty: a second run into it stops (see the README).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6001}

MODEL=${MODEL:-"openbmb/MiniCPM-V-2_6"} # or openbmb/MiniCPM-V-2, openbmb/MiniCPM-Llama3-V-2_5, ...
# The data: a .json list (or .jsonl) of {"id", "image", "conversations"} records.
DATA=${DATA:-"path/to/training_data.json"}
EVAL_DATA=${EVAL_DATA-"path/to/eval_data.json"} # set EVAL_DATA= (empty) to train without evaluation
# The chat layout follows from the checkpoint's config (minicpm for MiniCPM-V 2.0, llama3 for 2.5,
# qwen for 2.6, o-2.6 and 4.x up to 4.5, native for 4.6, 4.7 and MiniCPM-OCR); LLM_TYPE, if set, must agree.
LLM_TYPE=${LLM_TYPE:-}
MODEL_MAX_Length=${MODEL_MAX_Length:-2048} # 2048 fits 9 slices of an image with room for text
OUTPUT_DIR=${OUTPUT_DIR:-"output/output_full"}
DS_CONFIG=${DS_CONFIG:-"$HERE/ds_config_zero3.json"}
PYTHON=${PYTHON:-python3} # the Python that trains: it needs requirements.txt installed
# torchrun, through a wrapper that exits 143 (not 1 and a traceback) when stopped by SIGTERM.
TORCHRUN=${TORCHRUN:-"$PYTHON $HERE/torchrun_exit.py"}

# DEVICE_ARGS: bf16 or fp16 on a GPU, CPU processes over gloo without one (see device_args.sh).
source "$HERE/device_args.sh"

EVAL_ARGS=()
if [ -n "$EVAL_DATA" ]; then
    EVAL_ARGS=(--eval_data_path "$EVAL_DATA" --do_eval --eval_strategy steps --eval_steps 1000)
fi

# exec: torchrun takes this shell's place, so a SIGTERM sent to the script reaches it (and through
# it every worker) instead of leaving the run going without its parent.
exec $TORCHRUN --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    "$HERE/finetune.py" \
    --model_name_or_path "$MODEL" \
    ${LLM_TYPE:+--llm_type "$LLM_TYPE"} \
    --data_path "$DATA" \
    "${EVAL_ARGS[@]}" \
    --remove_unused_columns false \
    --label_names labels \
    --prediction_loss_only false \
    $DEVICE_ARGS \
    --do_train \
    --tune_vision true \
    --tune_llm true \
    --model_max_length "$MODEL_MAX_Length" \
    --max_slice_nums 9 \
    --max_steps 10000 \
    --output_dir "$OUTPUT_DIR" \
    --logging_strategy steps \
    --per_device_train_batch_size 1 \
    --per_device_eval_batch_size 1 \
    --gradient_accumulation_steps 1 \
    --save_strategy steps \
    --save_steps 1000 \
    --save_total_limit 10 \
    --learning_rate 1e-6 \
    --weight_decay 0.1 \
    --adam_beta2 0.95 \
    --warmup_steps 0.01 \
    --lr_scheduler_type cosine \
    --logging_steps 1 \
    --gradient_checkpointing true \
    --deepspeed "$DS_CONFIG" \
    --report_to tensorboard \
    "$@"
