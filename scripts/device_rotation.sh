#!/usr/bin/env bash
# Issue 20 on one GPU, in one call: can a larger embedded editor, or a finer token grid,
# learn to turn shapes, where two CPU cores could not train one long enough to tell?
#
#   bash scripts/device_rotation.sh [MINUTES]          (default 5: fits a 10-minute call)
#
# Trains three SFT editors side by side on the one GPU, each for MINUTES of wall clock
# (configs/sft_builtin.yaml from random weights, rotate edits drawn half the time, the
# edited object's loss weighed 4x; batch 128, bf16 mixed precision, EMA of the weights):
#   base    the built-in's shape: 4-px tokens, width 128, depth 4 (the control)
#   wide    4-px tokens, width 192, depth 6
#   fine    2-px tokens (4x the tokens), width 160, depth 6
# then evaluates each on 512 held-out edits of every task (benchmarks/eval_edits.py, on the
# GPU) and writes, under $OUT (default out/device_rotation):
#   eval.txt (the table, one row per editor and task), fit-NAME.log (each run's log, the
#   last lines of its training), NAME.safetensors (the EMA weights, float16).
# On the device machine (docs/benchmarks.md, "An SFT editor that turns shapes"): collect the
# missing wheels here with `bash ../shared/tools/device-wheels.sh`, carry `.whl`, and run
#   bash scripts/device_rotation.sh 5
# Environment: PYTHON (default python3), ACCELERATOR (default gpu), SMOKE=1 (a few steps
# each on the CPU, to check this script, not to measure), WORKERS (data workers a run, 4),
# NAMES (the editors to train, default "base wide fine"), STEPS (the cosine schedule's
# length, default 20000: the time limit ends each run first, near the schedule's top).
set -euo pipefail
cd "$(dirname "$0")/.."

minutes=${1:-5}
out=${OUT:-out/device_rotation}
python=${PYTHON:-python3}
accelerator=${ACCELERATOR:-gpu}
workers=${WORKERS:-4}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then  # the device machine: wheels beside its packages
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi

if [[ "$accelerator" == gpu ]] &&
  ! "$python" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "device_rotation.sh: no GPU that torch can use here;" \
    "SMOKE=1 ACCELERATOR=cpu runs a few steps on the CPU to check this script" >&2
  exit 2
fi

limits=(--trainer.max_time="00:00:$(printf %02d "$minutes"):00" "--trainer.max_steps=${STEPS:-20000}")
n=512 device=cuda precision=bf16-mixed
if [[ "${SMOKE:-0}" == 1 ]]; then
  limits=(--trainer.max_steps=3 --trainer.max_time=null)
  n=8 device=cpu precision=32-true
fi
[[ "$accelerator" == cpu ]] && device=cpu precision=32-true

declare -A arch=(
  [base]="4 128 4 4"
  [wide]="4 192 6 6"
  [fine]="2 160 6 5"
)
pids=()
for name in ${NAMES:-base wide fine}; do
  read -r patch width depth heads <<< "${arch[$name]}"
  "$python" -m lit_grpo fit --config configs/sft_builtin.yaml \
    "--model.init_args.policy.init_args.patch_size=$patch" \
    "--model.init_args.policy.init_args.width=$width" \
    "--model.init_args.policy.init_args.depth=$depth" \
    "--model.init_args.policy.init_args.heads=$heads" \
    --model.init_args.edit_region_weight=4 \
    "--data.init_args.tasks=[translate, rotate, rotate, scale]" \
    --data.init_args.batch_size=128 "--data.init_args.num_workers=$workers" \
    "--trainer.accelerator=$accelerator" --trainer.devices=1 "--trainer.precision=$precision" \
    --trainer.val_check_interval=500 --trainer.log_every_n_steps=50 \
    --trainer.logger=lightning.pytorch.loggers.CSVLogger \
    "--trainer.logger.init_args.save_dir=$out/$name" \
    "--trainer.default_root_dir=$out/$name" --trainer.enable_progress_bar=false \
    "${limits[@]}" > "$out/fit-$name.log" 2>&1 &
  pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done

weights=()
for name in ${NAMES:-base wide fine}; do
  ckpt=$(find "$out/$name" -name last.ckpt 2> /dev/null | head -1 || true)
  if [[ -z "$ckpt" ]]; then
    echo "$name: its run wrote no last.ckpt; the end of $out/fit-$name.log:" >&2
    tail -5 "$out/fit-$name.log" >&2
    failed=1
    continue
  fi
  "$python" -m lit_grpo export "$ckpt" "$out/$name.safetensors" --half --force
  weights+=(--weights "$out/$name.safetensors")
done
if ((${#weights[@]})); then
  "$python" benchmarks/eval_edits.py "${weights[@]}" --n "$n" --device "$device" \
    --batch-size 256 | tee "$out/eval.txt"
fi
exit "$failed"
