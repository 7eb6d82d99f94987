#!/usr/bin/env bash
# One accelerator check, run from the repository root on a GPU machine:
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# 0. a preflight: every distribution lvrpo_jax needs is installed (else it
#    lists the missing ones and exits 100);
# 1. the single-device tests (tests/models, tests/rl: the model, caching,
#    parity and RL-math tests) on the GPU backend; the tests that need an
#    8-device mesh (marked `mesh`) skip themselves, and CI runs them;
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
#
# The default limits add up to about 16 minutes, and a fresh H100 needs
# most of them (jax 0.11.2, 2026-11-27): the tests, 172 of 173 in 200 s on
# 4 workers (pyproject's cap, which this script now lifts); the smoke
# pipeline, 160 s up to `lvrpo` (world 8 s, vae 12 s, reward_model 30 s,
# pretrain 56 s, sft_continue 53 s, mostly compiling: pretrain's first step
# took 39 s), whose first step then compiled for over 95 s. XLA:GPU
# compiled these programs 2-2.5x slower than XLA:CPU on 2 cores (first
# steps: pretrain 16.5 s, reward_model 6.4 s, lvrpo 43 s there; the whole
# smoke pipeline 4 min there without a compile cache), so smoke's limit
# allows about 9 minutes. With less device time, run the parts in separate
# calls (NAME_LIMIT=0 skips a part).
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

# Preflight: every distribution lvrpo_jax needs, requirements.txt's and
# theirs, must be installed before any part starts: one list of the missing
# ones costs seconds, parts failing on each in turn cost minutes. (An H100
# image lacked grain, tensorflow-datasets, ml-collections, tensorboardX,
# array-record, importlib_resources, portpicker, and tensorflow-datasets'
# dm-tree, immutabledict, promise, simple-parsing, tensorflow-metadata,
# googleapis-common-protos, docstring-parser, termcolor and toml.)
python3 - <<'EOF' || exit 100
import importlib.metadata as md
import sys

from packaging.requirements import Requirement

import jax, flax, optax, chex
print('jax', jax.__version__, 'flax', flax.__version__, 'optax',
      optax.__version__, 'chex', chex.__version__, jax.devices())
todo = [Requirement(line) for line in open('requirements.txt')
        if line.strip() and not line.startswith('#')]
seen, missing = set(), []
while todo:
  req = todo.pop()
  name = req.name.lower().replace('_', '-')
  if name in seen or (req.marker and not req.marker.evaluate({'extra': ''})):
    continue
  seen.add(name)
  try:
    todo += [Requirement(r) for r in md.requires(req.name) or ()]
  except md.PackageNotFoundError:
    missing.append(req.name)
if missing:
  sys.exit('gpu_check: not installed: ' + ' '.join(sorted(missing)))
print(f'gpu_check: all {len(seen)} distributions lvrpo_jax needs are installed')
EOF

# pyproject's addopts cap pytest-xdist at 4 workers (for 2-core CI); a GPU
# host's 16 cores compile more programs at once. -v names each test as it
# ends, so a part stopped at its limit still names its failures. The tests
# marked `mesh` need 8 devices and skip themselves here.
workers=$(python3 -c 'import xdist' 2>/dev/null \
  && echo '-n 14 --maxprocesses=14' || true)
# shellcheck disable=SC2086
part tests "${TESTS_LIMIT:-240}" python3 -m pytest -v --tb=short \
  -p no:cacheprovider $workers tests/models tests/rl
part model "${MODEL_LIMIT:-70}" python3 benchmarks/model.py --quick \
  --out="$out/model_gpu.json"
rm -rf /tmp/gpu_check_smoke
part smoke "${SMOKE_LIMIT:-560}" python3 -m lvrpo_jax.main \
  --config=configs/base.py:smoke --workdir=/tmp/gpu_check_smoke
cp /tmp/gpu_check_smoke/eval/results.json "$out/smoke_results.json" \
  2>/dev/null || true
part lvrpo "${LVRPO_LIMIT:-70}" python3 benchmarks/lvrpo.py --steps=3 \
  --repeats=3 --out="$out/lvrpo_gpu.json"
part train "${TRAIN_LIMIT:-40}" python3 benchmarks/train.py --steps=10 \
  --out="$out/train_gpu.json"
echo "gpu_check: $failed part(s) failed"
exit "$failed"
