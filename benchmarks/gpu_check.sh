#!/usr/bin/env bash
# The checks a short GPU lease runs, each under its own time limit, results in OUT_DIR (a .tgz refreshed after each).
#
#   benchmarks/gpu_check.sh OUT_DIR CONFIG_DIR [STAGE ...]
#
# CONFIG_DIR holds SmolLM2-135M-Instruct's config.json and tokenizer (leapserve's converted copy, e.g.
# ~/.cache/leapserve/smollm2-135m-instruct, without model.safetensors): the engine runs a random-weight model of
# that shape. STAGES (default: all, in this order) and what each took on a fresh H200 machine (2026-12-04):
#   kernel-tests  tests/test_kernels.py with Triton compiled for the GPU (about 300 s: ~0.4 s of compiling a test)
#   kernel-bench  python -m leapserve.benchmarks.kernel_bench, bf16 (50 s)
#   forward       forward_cost, eager and compiled (25 s and 55 s)
#   offline       bench offline, plain / n-gram / FSPAD adaptive / FSPAD fixed trees, eager and compiled (the four
#                 compiled engines took 70-120 s to build on a cold cache; passes 5-25 s each)
# The checkout runs as the package without being installed (the folders linked as pyproject.toml maps them).
set -u
OUT=$(realpath "$1"); CONFIG=$(realpath "$2"); shift 2
STAGES=${*:-kernel-tests kernel-bench forward offline}
REPO=$(cd "$(dirname "$0")/.." && pwd)
LIMIT=${GPU_CHECK_LIMIT:-300}  # seconds per stage step
DEVICE=${GPU_CHECK_DEVICE:-cuda}  # cpu: a dry run of the forward and offline stages here
mkdir -p "$OUT" /tmp/leapserve-pkg/leapserve
for d in cli server decoding kernels drafters benchmarks prompts training vllm_plugin checkpoints; do
  ln -sfn "$REPO/$d" "/tmp/leapserve-pkg/leapserve/$d"
done
export PYTHONPATH=/tmp/leapserve-pkg PYTHONUNBUFFERED=1
T0=$(date +%s)
done_() { echo "== $1: rc $2 at $(( $(date +%s) - T0 )) s"; tar czf "$OUT.tgz" -C "$(dirname "$OUT")" "$(basename "$OUT")"; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import sys, torch, triton, transformers; print(sys.version.split()[0], torch.__version__, triton.__version__, transformers.__version__)"
  git -C "$REPO" log -1 --format=%h 2>/dev/null; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
for stage in $STAGES; do
  case $stage in
  kernel-tests)
    (cd "$REPO" && timeout "$LIMIT" python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py) > "$OUT/test_kernels.log" 2>&1
    rc=$?; tail -n 2 "$OUT/test_kernels.log"; done_ "$stage" $rc ;;
  kernel-bench)
    timeout "$LIMIT" python3 -m leapserve.benchmarks.kernel_bench --json "$OUT/kernel_bench.json" > "$OUT/kernel_bench.md" 2>&1
    done_ "$stage" $? ;;
  forward|offline)
    [ -d /tmp/smollm2-random ] || python3 -m leapserve.benchmarks.random_checkpoint "$CONFIG" /tmp/smollm2-random
    if [ "$stage" = forward ]; then
      for path in eager compiled; do
        flag=$([ $path = eager ] && echo --enforce-eager)
        timeout "$LIMIT" python3 -m leapserve.benchmarks.forward_cost --model /tmp/smollm2-random --device "$DEVICE" $flag \
          --json "$OUT/forward-$path.json" 2>&1 | tail -n 1
        done_ "forward $path" "${PIPESTATUS[0]}"
      done
    else
      tree='"model": "smollm2-135m-instruct-fspad", "tree": {"depth": 5, "top_k": 8, "total_tokens": 24}'
      decoders="autoregressive,speculative:ngram,fspad=speculative:{\"method\": \"fspad\", $tree}"
      decoders+=",fspad-fixed=speculative:{\"method\": \"fspad\", \"adaptive\": false, $tree}"
      for path in eager compiled; do
        flag=$([ $path = eager ] && echo --enforce-eager)
        timeout "$LIMIT" python3 -m leapserve.cli bench offline --model /tmp/smollm2-random --device "$DEVICE" $flag \
          --decoders "$decoders" --batch-sizes 1,16 --num-prompts 16 --max-tokens 32 --ignore-eos --repeats 1 \
          --output-json "$OUT/offline-$path.json" --output-md "$OUT/offline-$path.md" > "$OUT/offline-$path.log" 2>&1
        rc=$?; cat "$OUT/offline-$path.md" 2>/dev/null; done_ "offline $path" $rc
      done
    fi ;;
  *) echo "unknown stage $stage (kernel-tests kernel-bench forward offline)"; exit 2 ;;
  esac
done
