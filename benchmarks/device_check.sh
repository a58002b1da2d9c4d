#!/usr/bin/env bash
# One script for an accelerator session: the `gpu` preset's step time / tokens/s / MFU,
# the sampler's tokens/s, a short pretraining loss curve, and 1-vs-N-device loss equality.
#
#   bash benchmarks/device_check.sh           # full sizes (for a GPU/TPU machine)
#   bash benchmarks/device_check.sh --smoke   # shrunken shapes: end to end on a CPU in ~1-2 min
#
# Run from the repository root, in an environment with this repo's requirements. Every
# section prints its figures; the script stops at the first failing section (set -e) and
# ends with "device_check: all sections passed". --smoke is the rehearsal on CPU: same
# commands and code paths, tiny shapes, and 2 fake CPU devices for the equality check
# (on CPU there is only one real device).
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "device_check.sh: unknown argument $arg (want --smoke)" >&2; exit 2 ;;
  esac
done

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
section() { echo; echo "=== $* ($(date +%H:%M:%S))"; }

python -c 'import jax; print("jax", jax.__version__, "backend", jax.default_backend(), "devices", jax.device_count(), jax.devices()[0].device_kind)'

if [[ $SMOKE == 1 ]]; then
  SHRINK=model.num_layers=2,model.d_model=128,model.num_heads=4,data.seq_len=128,data.batch_size=4,tokenizer.vocab_size=1024
  STEP_ARGS=(--preset=gpu --override=$SHRINK --steps=2 --compile_layers=)
  SAMPLE_ARGS=(--preset=tiny --batch=2 --prompt_len=16 --new_tokens=16 --repeats=1 --nouncached)
  PRETRAIN_ARGS=(--config=configs/pretrain.py:gpu --config.train.steps=20 --config.train.log_every=5
                 --config.train.eval_every=20 --config.optimizer.warmup_steps=5)
  for kv in ${SHRINK//,/ }; do PRETRAIN_ARGS+=(--config.$kv); done
  EQUAL_ENV=(env JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2)
  N=2
else
  STEP_ARGS=(--preset=gpu --steps=10)
  SAMPLE_ARGS=(--preset=small --batch=8 --prompt_len=64 --new_tokens=256)
  PRETRAIN_ARGS=(--config=configs/pretrain.py:gpu --config.train.steps=200 --config.train.log_every=10
                 --config.train.eval_every=200)
  EQUAL_ENV=(env)
  N=$(python -c 'import jax; print(jax.device_count())')
fi

section "train step: gpu preset (step time, tokens/s, MFU)"
python -m benchmarks.train_step "${STEP_ARGS[@]}"

section "sampler tokens/s"
python -m benchmarks.sampling "${SAMPLE_ARGS[@]}"

section "pretraining loss curve"
python -m experiments.pretrain "${PRETRAIN_ARGS[@]}" --workdir="$WORK/pretrain" 2>&1 \
  | grep -iE "step|loss|error|Traceback" | tail -n 40

section "1 vs $N devices: the same losses"
if [[ $N -gt 1 ]]; then
  "${EQUAL_ENV[@]}" python - "$N" <<'PY'
import json, subprocess, sys
import numpy as np
n = int(sys.argv[1])
out = subprocess.run([sys.executable, '-m', 'tests.test_train_step', f'1,1,1;{n},1,1'],
                     capture_output=True, text=True, check=True)
losses = json.loads(out.stdout.strip().splitlines()[-1])
one, many = np.asarray(losses['1,1,1']), np.asarray(losses[f'{n},1,1'])
diff = float(np.max(np.abs(one - many)))
print(f'losses on 1 device {one.round(5).tolist()}\n'
      f'losses on {n} devices {many.round(5).tolist()}\nmax difference {diff:.2e}')
sys.exit(0 if diff < 1e-4 else 1)
PY
else
  echo "one device: skipped"
fi

echo
echo "device_check: all sections passed"
