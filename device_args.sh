# Sourced by the launchers with PYTHON set: sets DEVICE_ARGS, the finetune.py flags for the
# device and precision.
# Precision: bf16 where the GPU supports it, else fp16 (fp16 overflows more easily: a loss that
# turns NaN stops the run); fp32 on CPU processes over gloo. Set PRECISION=bf16, fp16 or fp32 to
# choose, or DEVICE_ARGS to pass your own flags. A failure of this probe stops the script.
DETECTED=$("$PYTHON" -c 'import torch; print("cpu" if not torch.cuda.is_available() else "bf16" if torch.cuda.is_bf16_supported() else "fp16")')
PRECISION=${PRECISION:-$DETECTED}
if [ "$DETECTED" = cpu ]; then
    DEVICE_ARGS=${DEVICE_ARGS:-"--use_cpu true --ddp_backend gloo"}
elif [ "$PRECISION" = bf16 ] || [ "$PRECISION" = fp16 ]; then
    DEVICE_ARGS=${DEVICE_ARGS:-"--$PRECISION true --${PRECISION}_full_eval true"}
elif [ "$PRECISION" = fp32 ]; then
    DEVICE_ARGS=${DEVICE_ARGS:-""}
else
    echo "PRECISION must be bf16, fp16 or fp32, not '$PRECISION'" >&2
    exit 2
fi
