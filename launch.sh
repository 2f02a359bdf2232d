# The launcher body that finetune_lora.sh and finetune_ds.sh source (finetune_dpo.sh runs one of
# them). The sourcing script sets HERE (its folder), DATA, EVAL_DATA, OUTPUT_DIR, DS_CONFIG and
# TUNE_ARGS (what it trains); everything else is here, each variable overridable from the environment.
# Not meant to be run on its own:
: "${HERE:?launch.sh is sourced by finetune_lora.sh and finetune_ds.sh; run one of those}"

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6001}

MODEL=${MODEL:-"openbmb/MiniCPM-V-2_6"} # or openbmb/MiniCPM-V-2, openbmb/MiniCPM-Llama3-V-2_5, ...
# The chat layout follows from the checkpoint's config (minicpm for MiniCPM-V 2.0, llama3 for 2.5,
# qwen for 2.6, o-2.6 and 4.x up to 4.5, native for 4.6, 4.7 and MiniCPM-OCR); LLM_TYPE, if set, must agree.
LLM_TYPE=${LLM_TYPE:-}
MODEL_MAX_Length=${MODEL_MAX_Length:-2048} # 2048 fits 9 slices of an image with room for text
# DataLoader worker processes per rank: they build the next samples (images decoded and sliced) while
# the GPU trains on this one, and ship each batch as one block (data/shipping.py); 0 builds them in
# the training process, between steps. Chosen from benchmarks/pipeline.py (README, Benchmarks).
DATALOADER_WORKERS=${DATALOADER_WORKERS:-2}
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
    "${TUNE_ARGS[@]}" \
    --model_max_length "$MODEL_MAX_Length" \
    --max_slice_nums 9 \
    --max_steps 10000 \
    --output_dir "$OUTPUT_DIR" \
    --logging_strategy steps \
    --per_device_train_batch_size 1 \
    --per_device_eval_batch_size 1 \
    --dataloader_num_workers "$DATALOADER_WORKERS" \
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
