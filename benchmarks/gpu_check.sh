#!/usr/bin/env bash
# One accelerator check, run from the repository root on a GPU machine:
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# 1. the single-device tests (tests/models, tests/rl: the model, caching,
#    parity and RL-math tests) on the GPU backend; the mesh tests need 8
#    devices and stay on CPU, where CI runs them;
# 2. benchmarks/model.py (its torch reference runs on the same GPU);
# 3. the whole `smoke` pipeline, `python -m lvrpo_jax.main`, on the GPU
#    (its results table goes to OUT_DIR/smoke_results.json);
# 4. benchmarks/lvrpo.py and benchmarks/train.py, shortened.
# The benchmarks write OUT_DIR/{model,lvrpo,train}_gpu.json.
#
# float32 matmuls run in true float32 (JAX_DEFAULT_MATMUL_PRECISION=highest):
# on Ampere and later JAX's default is TF32, whose 10-bit mantissa is far
# outside the tests' 1e-5 tolerances, and torch's default (no TF32 for
# matmuls) is float32 too, so the side-by-side timing compares like with like.
#
# Every part has its own time limit (NAME_LIMIT=seconds overrides it; 0 skips
# the part), so a slow part cannot starve the rest; the parts' whole logs go
# to OUT_DIR/gpu_check.log. Exit status: the number of failed parts.
set -u
out=${1:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
export JAX_DEFAULT_MATMUL_PRECISION=highest
# A fresh machine has no compile cache and compiling dominates this check:
# XLA's GEMM autotuning made the pretrain stage's first step take 62 s on an
# H100, and with it on every part overran its limit. Level 0 takes the
# default kernels (slower GEMMs at large shapes; tiny shapes hardly care).
export XLA_FLAGS="--xla_gpu_autotune_level=0${XLA_FLAGS:+ $XLA_FLAGS}"
# Several pytest workers share the one GPU: allocate as needed.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}

failed=0
rm -f "$out/gpu_check.log"
part() {  # part NAME SECONDS COMMAND...: run one part under its time limit.
  local name=$1 limit=$2
  shift 2
  if [ "$limit" -le 0 ]; then echo "== $name: skipped"; return; fi
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"/tmp/gpu_check_$name.log" 2>&1
  local rc=$?
  tail -n 25 "/tmp/gpu_check_$name.log"
  echo "== $name: exit $rc after $((SECONDS - start))s"
  { echo "== $name: $* (exit $rc)"; cat "/tmp/gpu_check_$name.log"; } \
    >>"$out/gpu_check.log"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

python3 - <<'EOF'
import jax, flax, optax, orbax.checkpoint, chex
print('jax', jax.__version__, 'flax', flax.__version__, 'optax',
      optax.__version__, 'chex', chex.__version__, jax.devices())
EOF

workers=$(python3 -c 'import xdist' 2>/dev/null && echo '-n 8' || true)
# shellcheck disable=SC2086
part tests "${TESTS_LIMIT:-100}" python3 -m pytest -q -p no:cacheprovider \
  $workers tests/models tests/rl
part model "${MODEL_LIMIT:-70}" python3 benchmarks/model.py --quick \
  --out="$out/model_gpu.json"
rm -rf /tmp/gpu_check_smoke
part smoke "${SMOKE_LIMIT:-130}" python3 -m lvrpo_jax.main \
  --config=configs/base.py:smoke --workdir=/tmp/gpu_check_smoke
cp /tmp/gpu_check_smoke/eval/results.json "$out/smoke_results.json" \
  2>/dev/null || true
part lvrpo "${LVRPO_LIMIT:-70}" python3 benchmarks/lvrpo.py --steps=3 \
  --repeats=3 --out="$out/lvrpo_gpu.json"
part train "${TRAIN_LIMIT:-40}" python3 benchmarks/train.py --steps=10 \
  --out="$out/train_gpu.json"
echo "gpu_check: $failed part(s) failed"
exit "$failed"
