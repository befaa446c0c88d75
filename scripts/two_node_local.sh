#!/usr/bin/env bash
# Two "nodes" on this machine: a multi-node FSDP2 launch rehearsed on localhost.
#
#   scripts/two_node_local.sh OUT [extra CLI arguments ...]
#
# Starts two torchrun agents (--nnodes=2, one process each, node ranks 1 and 0) that meet at
# 127.0.0.1, each running `python -m lit_grpo fit` with configs/talk2move.yaml and the FSDP2
# overlay (configs/strategy/fsdp.yaml) on num_nodes=2 x devices=1 ranks, sized to finish in
# a minute or two on a CPU (gloo). On a real cluster each node runs the same command with
# its own --node_rank and the first node's address (docs/scaling.md).
# Environment: PYTHON (default python), PORT (default 29531), ACCELERATOR (default cpu).
set -euo pipefail

out=${1:?usage: scripts/two_node_local.sh OUT [extra CLI arguments ...]}
shift
python=${PYTHON:-python}
port=${PORT:-29531}
accelerator=${ACCELERATOR:-cpu}
cd "$(dirname "$0")/.."

launch=(-m torch.distributed.run --nnodes=2 --nproc_per_node=1
        --master_addr=127.0.0.1 "--master_port=$port")
fit=(-m lit_grpo fit
     --config configs/talk2move.yaml --config configs/strategy/fsdp.yaml
     "--trainer.accelerator=$accelerator" --trainer.devices=1 --trainer.num_nodes=2
     --trainer.strategy.init_args.data_parallel_size=2
     "--trainer.default_root_dir=$out/runs" "--trainer.logger.init_args.root=$out/mlruns"
     --trainer.max_steps=2 --trainer.val_check_interval=2 --trainer.limit_val_batches=1
     --trainer.enable_progress_bar=false
     --model.init_args.group_size=3 --model.init_args.sample_steps=5
     --model.init_args.eval_steps=2
     --data.init_args.resolution=16 --data.init_args.batch_size=2 --data.init_args.val_size=2
     "$@")

"$python" "${launch[@]}" --node_rank=1 "${fit[@]}" &
second=$!
status=0
"$python" "${launch[@]}" --node_rank=0 "${fit[@]}" || status=$?
wait "$second" || status=$?
exit "$status"
