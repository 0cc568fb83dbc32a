#!/usr/bin/env bash
# The one prepared GPU run: at most 8 minutes on ONE GPU (each stage under its own `timeout`; the stage
# limits sum to 470 s), run from the source tree (PYTHONPATH=., no pip install):
#
#   OUT=/some/dir bash scripts/gpu_bench.sh          # on the GPU host
#   SMOKE=1 OUT=/tmp/gb bash scripts/gpu_bench.sh    # plumbing check on a CPU host: tiny sizes, ~1 min
#                                                    # (53 s measured on the 2-core development host)
#
# Stages (results in $OUT as markdown and JSON; the *.log files hold each stage's stderr):
#   0. env.txt          nvidia-smi, python and package versions, which optional packages are importable
#   1. parity.*         the GPU parity stage, before any timing: every kernel of stage 2 (ours selected by
#                       name through lcjax.kernels.flash_attention.api: pallas_triton, pallas_mosaic, cudnn;
#                       a name this checkout does not register is skipped with that reason; peers cudnn_dense
#                       = jax.nn.dot_product_attention(implementation="cudnn") and jax_mgpu) against the
#                       dense float32 reference on the device: forward and dq, dk, dv, causal, T = 1024,
#                       32/8 heads x 128, bf16 (relative error <= 2e-2; gates stage 2), then float32
#                       (<= 1e-5; reported only, where a kernel takes float32)                     (60 s)
#   2. kernels.*        TFLOP/s forward and forward+backward of the kernels that passed parity (a row whose
#                       kernel failed or has no parity record says so and is not timed), one table:
#                       causal bf16, 32/8 heads x 128, T 16k/32k                                     (115 s)
#   3. emulated.*       the emulated-shard efficiency table per layout at N = 8, 32k tokens, Pallas (145 s;
#                       3 layouts x 8 shards x 2 passes = 48 compilations; rows are printed as they finish)
#   4. train.*          train-step tokens/s, step time, MFU and memory of the ~1.1B model at 32k on this one
#                       GPU (configs/experiments/llama_1b_32k.yaml, synthetic batches; 1 warm-up + 3
#                       timed steps, a JSON line per finished configuration in train.log)        (150 s)
# Every stage runs under `timeout -k`; a killed stage keeps the rows it already wrote (a killed parity stage
# leaves the kernels without a record: none of them is timed).
#
# What the GPU host has: jax 0.11.2 (CUDA), flax, optax, orbax-checkpoint, triton; PyYAML comes with flax.
# Not assumed: omegaconf, grain, tensorflow-datasets, tokenizers, tensorboardX. No stage imports them:
# stages 1-3 import only lcjax's kernels/ops/parallel code; stage 4 imports lcjax.config (dataclasses only,
# omegaconf is imported lazily by its YAML loader), lcjax.plan, lcjax.model, lcjax.train.{step,state,optim,
# metrics} and reads the YAML with PyYAML when omegaconf is missing (scripts/bench_train.py load_config).
# Copy the tables into docs/benchmarks.md with date, command, machine and JAX version.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=.
PY=${PYTHON:-python3}

if [ "${SMOKE:-0}" = 1 ]; then  # tiny sizes: checks the plumbing on a CPU host (Pallas in interpret mode)
  PARITY_T=128; KERNEL_T=256; KERNEL_H=4,2,64; EMU_T=512; EMU_BLOCK_ARG="--block 64"; EMU_LAYOUTS=zigzag
  EMU_SHARDS=4
  EMU_H=4,2,16; SCALE=3  # the Pallas interpreter on 2 loaded cores is slow: triple the limits
  TRAIN_SETS="--set model.n_layers=1 --set model.d_model=128 --set model.n_heads=4 --set model.n_kv_heads=2
    --set model.d_ff=256 --set model.vocab_size=512 --set data.seq_len=256 --set train.loss_tile=128
    --set attention.block_q=64 --set attention.block_k=64"; TRAIN_STEPS="--steps 2 --warmup 1"
else
  PARITY_T=1024; KERNEL_T=16384,32768; KERNEL_H=32,8,128; EMU_T=32768
  EMU_LAYOUTS=zigzag,striped,contiguous; EMU_H=32,8,128; EMU_BLOCK_ARG=""  # the kernels' tuned tiles
  EMU_SHARDS=8
  TRAIN_SETS=""; TRAIN_STEPS="--steps 3 --warmup 1"; SCALE=1
fi

stage() {  # stage NAME SECONDS COMMAND...: run under timeout, log its status
  local name=$1 limit=$(($2 * SCALE)); shift 2
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@"  # -k: a stage that ignores SIGTERM is killed 10 s later
  local rc=$?
  echo "stage $name: exit $rc after $((SECONDS - t0)) s (limit $limit s)" >> "$OUT/stages.txt"
}

{
  date -u; nvidia-smi 2>&1 | head -20; $PY --version
  $PY - <<'PY'
import importlib
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "triton", "yaml", "numpy",
             "omegaconf", "grain", "tensorflow_datasets", "tokenizers", "tensorboardX"):
    try:
        m = importlib.import_module(name)
        print(f"{name:22s} {getattr(m, '__version__', 'present')}")
    except Exception as e:
        print(f"{name:22s} MISSING ({type(e).__name__})")
import jax
print(jax.devices())
PY
} > "$OUT/env.txt" 2>&1
echo "stage env: done" > "$OUT/stages.txt"

IFS=, read -r KH KKV KD <<< "$KERNEL_H"
KERNELS=pallas_triton,pallas_mosaic,cudnn,cudnn_dense,jax_mgpu  # ours first, then the peers
stage parity 60 $PY scripts/bench_kernels.py --parity-only --parity-dtypes bfloat16,float32 --parity-len "$PARITY_T" --heads "$KH" \
  --kv-heads "$KKV" --head-dim "$KD" --kernels "$KERNELS" --json "$OUT/parity.json" > "$OUT/parity.md" \
  2> "$OUT/parity.log"

# each row written to kernels.json as it finishes; the budget stops new rows before the limit
stage kernels 115 $PY scripts/bench_kernels.py --parity-from "$OUT/parity.json" --seq-lens "$KERNEL_T" --masks causal \
  --heads "$KH" --kv-heads "$KKV" --head-dim "$KD" --kernels "$KERNELS" --budget-s $((100 * SCALE)) --iters 5 \
  --json "$OUT/kernels.json" > "$OUT/kernels.md" 2> "$OUT/kernels.log"

IFS=, read -r EH EKV ED <<< "$EMU_H"
stage emulated 145 $PY scripts/bench_attention.py --emulate-shard --shards "$EMU_SHARDS" --seq-len "$EMU_T" --heads "$EH" --kv-heads "$EKV" \
  --head-dim "$ED" --dtype bfloat16 --kernel pallas $EMU_BLOCK_ARG --layouts "$EMU_LAYOUTS" --iters 3 --json "$OUT/emulated.json" \
  > "$OUT/emulated.md" 2> "$OUT/emulated.log"

# shellcheck disable=SC2086  # TRAIN_SETS / TRAIN_STEPS are lists of words
stage train 150 $PY scripts/bench_train.py --config configs/experiments/llama_1b_32k.yaml $TRAIN_SETS $TRAIN_STEPS \
  --json "$OUT/train.json" --md "$OUT/train.md" > "$OUT/train.log" 2>&1

echo; cat "$OUT/stages.txt"
for f in parity kernels emulated train; do echo "== $f"; tail -n 25 "$OUT/$f.md" 2>/dev/null; done
