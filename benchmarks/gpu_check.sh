#!/usr/bin/env bash
# One command on one GPU, under 8 minutes: what the real-scale paths cost where they will run.
#   1. bf16 CCA step time and peak memory of a ~1B random-init Emu3 (16 layers, hidden 2048, 32,768-code
#      visual head, 32x32 = 1,024-token images), ZeRO-2, one rank: benchmarks/train_step.py (sft,
#      cca with precomputed reference, cca with an online reference, side by side)
#   2. guidance-free vs CFG images/s on the same model size at 1,024-token images, batch 16 and 64,
#      next to the in-process ceiling: benchmarks/sampling.py
# Usage: bash benchmarks/gpu_check.sh            (GPU_CHECK_TINY=1: CPU dry run at toy sizes)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" RAY_USAGE_STATS_ENABLED=0
if [[ "${GPU_CHECK_TINY:-0}" == 1 ]]; then  # the same commands at sizes a laptop CPU runs in a minute
  HIDDEN=64 LAYERS=2 HEADS=2 CODEBOOK=256 SIDE=4 TRAIN_BATCH=2 BATCHES="2 4" STEPS=2
else
  HIDDEN=2048 LAYERS=16 HEADS=16 CODEBOOK=32768 SIDE=32 TRAIN_BATCH=4 BATCHES="16 64" STEPS=5
fi
python -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU (no GPU)')"
echo "== 1. bf16 CCA train step, ~$((LAYERS * 12 * HIDDEN * HIDDEN / 1000000))M-parameter decoder, ${SIDE}x${SIDE} codes"
# demo's patch size 4: image_size = 4 * side gives a side x side code grid
timeout 300 python benchmarks/train_step.py --preset demo --hidden "$HIDDEN" --layers "$LAYERS" --batch "$TRAIN_BATCH" \
  --steps "$STEPS" --bf16 --set "model.num_heads=$HEADS" "tokenizer.codebook_size=$CODEBOOK" \
  "data.image_size=$((4 * SIDE))" "model.max_prompt_tokens=32"
echo "== 2. guidance-free vs CFG images/s, $((SIDE * (SIDE + 1))) tokens per image"
timeout 240 python benchmarks/sampling.py --hidden "$HIDDEN" --layers "$LAYERS" --heads "$HEADS" --codebook "$CODEBOOK" \
  --grids "$SIDE" --batches $BATCHES --repeats 1
