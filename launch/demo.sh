#!/usr/bin/env bash
# `make demo`: Mona on a small Swin, DeepSpeed ZeRO-2 on 2 CPU ranks (gloo), activation checkpointing,
# periodic checkpoints and a final evaluation; then the methods' memory and time side by side.
# A few minutes on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
BIN=$(dirname "$PY")
CONFIG=${CONFIG:-configs/demo.yaml}
# The CPU demo: DeepSpeed on its CPU accelerator (gloo), CUDA hidden even on a GPU host.
export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
export PATH="$BIN:$PATH"   # the deepspeed launcher starts ranks with the venv's python

if [ ! -f data/synthetic/cls/shards/train.index.json ]; then
  echo "== building the synthetic classification shards (data/synthetic/cls)"
  "$PY" -m mona_dist.cli shards synthetic --task cls --out data/synthetic/cls
fi

OUT=$("$PY" - "$CONFIG" "$@" <<'PYEOF'
import sys
from mona_dist.config import load_config
args = sys.argv[2:]
sets = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--set"]
print(load_config(sys.argv[1], sets).output_dir)
PYEOF
)

echo "== training: deepspeed --num_gpus 2 launch/train.py --config $CONFIG $*"
"$BIN/deepspeed" --num_gpus 2 launch/train.py --config "$CONFIG" "$@"

echo
echo "== the run's backbone as one file (mona-dist export; Mona adds modules, so no --merge)"
SETS=()  # the run's --set overrides (not --resume and the like): the same config the run trained
ARGS=("$@")
for ((i = 0; i + 1 < ${#ARGS[@]}; i++)); do [ "${ARGS[i]}" = --set ] && SETS+=(--set "${ARGS[i+1]}"); done
"$PY" -m mona_dist.cli export --config "$CONFIG" ${SETS[@]+"${SETS[@]}"} --checkpoint latest --out "$OUT/export/backbone.safetensors"

echo
echo "== training memory/time and inference latency of the methods side by side on the demo backbone (mona-dist bench)"
echo "   (swin_nano at 128 px: the goals set for Swin-B/L at paper sizes print as not comparable)"
"$PY" -m mona_dist.cli bench --backbone swin_nano_patch4_window7 --methods full,fixed,mona,e3va,mona_hw,lora \
  --task seg --batch-size 4 --img-size 128 --steps 5 --warmup 1 --device cpu --out "$OUT/bench"

cat <<MSG

== demo finished
   TensorBoard logs : $OUT/tb        (tensorboard --logdir $OUT/tb)
   metrics          : $OUT/metrics.jsonl
   checkpoints      : $OUT/checkpoints (newest: $OUT/checkpoints/latest -> $(readlink "$OUT/checkpoints/latest" 2>/dev/null || echo none))
   adapter only     : $OUT/checkpoints/latest/adapter.safetensors
   whole backbone   : $OUT/export/backbone.safetensors (build_backbone(..., pretrained=FILE))
   resolved config  : $OUT/config.yaml
   method comparison: $OUT/bench/bench.md, bench.png, bench.json
MSG
