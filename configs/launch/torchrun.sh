#!/usr/bin/env bash
# Multi-node launch with torchrun (no scheduler): run this same line on every node, NODE_RANK 0 .. NNODES-1,
# with MASTER_ADDR = node 0's address (reachable from all nodes). Lightning reads torchrun's environment
# (TorchElasticEnvironment): only global rank 0 creates lightning_logs/version_N and writes checkpoints.
#
#   NNODES=2 GPUS_PER_NODE=8 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash configs/launch/torchrun.sh   # on node 0
#   NNODES=2 GPUS_PER_NODE=8 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash configs/launch/torchrun.sh   # on node 1
#
# Settings (environment): CONFIG (a stage config), STRATEGY (an overlay in configs/strategy/: ddp,
# fsdp-qlora or fsdp2-lora), MASTER_PORT, PYTHON; extra arguments go to `qgen fit` (e.g. --ckpt_path last to resume).
# Every node must see the same repository, data and (for resuming) lightning_logs/ folder, e.g. on shared
# storage. tests/test_sharding.py runs this script as two one-process "nodes" on one machine.
set -euo pipefail
NNODES=${NNODES:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NODE_RANK=${NODE_RANK:?set NODE_RANK (0 on the first node)}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR (the first node address)}
MASTER_PORT=${MASTER_PORT:-29500}
CONFIG=${CONFIG:-configs/qwen3-14b-sft.yaml}
STRATEGY=${STRATEGY:-ddp}
PYTHON=${PYTHON:-python}

exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$GPUS_PER_NODE" \
    --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
    -m qgen fit --config "$CONFIG" --config "configs/strategy/$STRATEGY.yaml" \
    --trainer.num_nodes="$NNODES" --trainer.devices="$GPUS_PER_NODE" "$@"
