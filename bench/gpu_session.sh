#!/usr/bin/env bash
# The checks a session runs on a lent NVIDIA GPU (the device tool's H100 or H200), in one command from the
# repository root; each part has its own time limit and log under $OUT, so one that fails or runs long leaves the
# others, and a benchmark prints each side's result as soon as that side is done.
#   1. bench/attention_check.py: the cudnn kernel (what model.attention='auto' picks on a GPU in bfloat16) vs XLA
#   2. bench/sft_step.py and bench/grpo_step.py (or bench/grpo_rollout.py) on the GPU, bfloat16, Qwen2.5-VL-3B's
#      layer shapes (a third of its depth), fxjax vs transformers + peft / TRL / HF generate in one invocation
#   3. the HF-parity tests with JAX on the GPU (torch, the oracle, stays on the CPU), beside `fxjax demo --quick`
# PARTS picks them. A lease has 15 device minutes, the machine's start included, so the checks come in two calls
# of the device tool's `run` (the wheels travel only when carried: .whl/ is git-ignored):
#   run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=540)   # attention grpo_step, ~450 s
#   run(command="PARTS='tests demo' bash bench/gpu_session.sh", carry=[".whl"], timeout_s=260)   # if >= 260 s left
# (sft, measured on 2026-12-06's H100, sft_same_work (its step with transformers given logits_to_keep: not run on
# a GPU yet) and grpo_rollout are left to a lease with time to spare: PARTS='sft_same_work sft')
# The machine has JAX, flax, optax, orbax, torch, transformers, peft and accelerate but not grain, dashscope,
# trl or datasets: only their wheels travel, in .whl/ (git-ignored through .git/info/exclude), made here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl grain==0.2.18 array_record==0.8.6 portpicker dashscope==2.0.2 \
#     trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
# (8 wheels, ~8 MB). Only wheels of those names are installed: never carry flax, optax or orbax: the image's JAX
# (0.11.2 on 2026-12-04) is newer than the flax 0.12.8 of this venv supports (jax.experimental.hijax.HiPrimitive
# is gone), and an --upgrade replaces the image's own flax for the rest of the lease (session 25 lost its lease's
# runs to that). The image's own flax imports with its JAX (session 42's H100: jax 0.11.2 with flax 0.12.10;
# session 25's first command had replaced it before that could be seen). No flax on this machine's index can stand in: 0.12.1-0.12.8 use HiPrimitive, and 0.12.0 imports
# jax._src.core.mutable_array, which jax 0.10.2 already lacks (tried here); JAX 0.10.2's CUDA wheels are far over
# the 64 MiB that travels. The preflight below stops the command at once when fxjax does not import there, before
# any part spends device time.
# GPU_REHEARSAL=1 runs the same steps on this CPU with tiny shapes, to catch a broken step before a lease.
set -u
OUT=${OUT:-/tmp/fxjax_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ "${GPU_REHEARSAL:-0}" = 1 ]; then
  PY=${PY:-python}; PLATFORM=cpu
  SFT_ARGS=(--device cpu --small --batch 2 --iters 1); ROLLOUT_ARGS=(--device cpu --small --prompts 2 --num-generations 2 --new-tokens 8 --iters 1)
  GRPO_ARGS=(--device cpu --small --prompts 2 --num-generations 2 --new-tokens 8 --iters 1)
  ATTENTION_ARGS=(--interpret)
else
  PY=python3; PLATFORM=cuda
  SIZE=(--dtype bfloat16 --config 3b --text-layers 12 --vision-depth 8)
  SFT_ARGS=(--device cuda "${SIZE[@]}" --batch 8 --image-side 448 --loss-chunk 1024 --iters 5)
  ROLLOUT_ARGS=(--device cuda "${SIZE[@]}" --prompts 8 --num-generations 8 --new-tokens 128 --iters 2)
  GRPO_ARGS=(--device cuda "${SIZE[@]}" --prompts 8 --num-generations 8 --new-tokens 128 --iters 1 --loss-chunk 1024)
  ATTENTION_ARGS=()
  # The wheels it installs, by name (a leftover jax, torch or flax wheel in .whl/ would replace the image's own)
  WHEELS=(grain array_record portpicker dashscope trl datasets dill multiprocess)
  FOUND=() MISSING=()
  for w in "${WHEELS[@]}"; do
    f=$(compgen -G ".whl/${w}-*.whl" | head -n 1)
    if [ -n "$f" ]; then FOUND+=("$f"); else MISSING+=("$w"); fi
  done
  if [ ${#MISSING[@]} -gt 0 ]; then
    echo "gpu_session.sh: no wheel in .whl/ for: ${MISSING[*]} (make them with the header's pip download, and pass" \
         "carry=[\".whl\"] to the device tool's run: .whl/ is git-ignored and travels only when carried)" >&2
  fi
  if [ ${#FOUND[@]} -gt 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "${FOUND[@]}" || exit 1
  fi
  # fxjax.model/.train/.rewards/.configs live at the repository's top (pyproject's package-dir): link them
  # into fxjax/ so that the tree imports as it is, without an install.
  for d in model train rewards configs; do [ -e "fxjax/$d" ] || ln -s "../$d" "fxjax/$d"; done
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

{ nvidia-smi 2>&1 | head -15
  "$PY" -c "import importlib.metadata as m
for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'torch', 'transformers', 'peft', 'grain', 'trl'):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, 'not installed')
import jax
print('jax devices', jax.devices())"
} > "$OUT/env.log" 2>&1
cat "$OUT/env.log"

PARTS=" ${PARTS:-attention grpo_step} "
wants() { [[ $PARTS == *" $1 "* ]]; }
NEEDS="import fxjax, fxjax.model.generate, fxjax.train.step"
if wants grpo_step || wants tests || wants demo; then NEEDS="$NEEDS, grain, trl"; fi  # (the data pipeline; TRL's oracle)
"$PY" -c "$NEEDS" || { echo "preflight: '$NEEDS' fails here (see above)"; exit 3; }

part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, say how it ended
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  # timeout signals the part's whole process group (its benchmark children too); -k: SIGKILL 10 s later if
  # SIGTERM is not enough (a machine-wide pkill here also killed other sessions' benchmarks)
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: exit $? after $((SECONDS - start)) s (limit $limit s)"
  tail -n 14 "$OUT/$name.log"
}

# (attention: JAX may take 95% of the GPU's memory, not 75%: the float32 references of the large cases need it)
# (70 s was not enough on the H100 for the four bfloat16 cases: the float16 ones then ran out of time)
wants attention && (cd bench && XLA_PYTHON_CLIENT_MEM_FRACTION=.95 part attention_check 130 "$PY" attention_check.py "${ATTENTION_ARGS[@]}")
wants sft && (cd bench && part sft_step 180 "$PY" sft_step.py "${SFT_ARGS[@]}")
# (the same step with transformers' lm_head on the labelled span only, logits_to_keep: the same work as fxjax's)
wants sft_same_work && (cd bench && part sft_step_same_work 180 "$PY" sft_step.py "${SFT_ARGS[@]}" --hf-logits-to-keep)
wants grpo_step && (cd bench && part grpo_step 270 "$PY" grpo_step.py "${GRPO_ARGS[@]}")
wants grpo_rollout && (cd bench && part grpo_rollout 150 "$PY" grpo_rollout.py "${ROLLOUT_ARGS[@]}")

# Tests and the demo side by side: neither is timed; JAX takes GPU memory as it needs it in both. The tests run
# in one process: four xdist workers on the H100 died at once ("node down: Not properly terminated").
export XLA_PYTHON_CLIENT_PREALLOCATE=false
TESTS=(tests/test_parity.py tests/test_bf16_parity.py tests/test_generate.py tests/test_sampling.py tests/test_lora.py
       tests/test_peft.py tests/test_grpo_batch.py tests/test_scan_layers.py)
wants tests && JAX_PLATFORMS=$PLATFORM part tests 180 "$PY" -m pytest -q -o addopts="" -n "${TEST_WORKERS:-0}" \
  -m "not slow" -p no:cacheprovider -rf "${TESTS[@]}" &
rm -rf /tmp/fxjax_gpu_demo  # (a rerun on a warm machine: a fresh demo, not the last one's PNG)
wants demo && JAX_PLATFORMS=$PLATFORM part demo_quick 150 "$PY" -m fxjax.cli demo --quick --out /tmp/fxjax_gpu_demo &
wait
cp /tmp/fxjax_gpu_demo/report/grpo_report.png "$OUT/" 2>/dev/null
exit 0
