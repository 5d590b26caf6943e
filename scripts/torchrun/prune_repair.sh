#!/usr/bin/env bash
# Prune + label-free repair on several machines with torchrun, without a scheduler.
# Run this script once on every node, with the same MASTER_ADDR and a different NODE_RANK on each:
#
#   node 0:  NODE_RANK=0 MASTER_ADDR=10.0.0.1 scripts/torchrun/prune_repair.sh
#   node 1:  NODE_RANK=1 MASTER_ADDR=10.0.0.1 scripts/torchrun/prune_repair.sh
#
# Extra arguments are passed on to lightning-repair, e.g. `--data.data_dir /shared/data`.
# Lightning detects torchrun (TorchElasticEnvironment) and takes the ranks from torchrun's variables.
# torchrun starts the processes, and Lightning does not start more. --nnodes must equal
# --trainer.num_nodes and --nproc-per-node must equal --trainer.devices; this script passes the same
# variables to both.
#
# Settings, all from the environment:
#   NODE_RANK        required: 0 on the main node, then 1, 2, ...
#   MASTER_ADDR      required: address of the NODE_RANK=0 node, reachable from every node
#   MASTER_PORT      29500: a free TCP port on the main node, open between the nodes
#   NNODES           2
#   NPROC_PER_NODE   4: one process per GPU
#   CONFIG           configs/quickstart.yaml
#   ACCELERATOR      gpu (NCCL); `cpu` uses gloo, e.g. for a local smoke test with NNODES=1
#
# Run it from the repository root; it resolves relative config, checkpoint and log paths from there.
# Only global rank 0 writes lightning_logs/, on node 0.
set -euo pipefail

NODE_RANK=${NODE_RANK:?set NODE_RANK (0 on the main node, 1, 2, ... on the others)}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to the address of the NODE_RANK=0 node}
MASTER_PORT=${MASTER_PORT:-29500}
NNODES=${NNODES:-2}
NPROC_PER_NODE=${NPROC_PER_NODE:-4}
CONFIG=${CONFIG:-configs/quickstart.yaml}
ACCELERATOR=${ACCELERATOR:-gpu}

export PYTHONFAULTHANDLER=1   # Python tracebacks if a process crashes hard
# export NCCL_DEBUG=INFO      # uncomment to debug NCCL start-up

# `-m lightning_repair.cli` runs the same LightningCLI as the `lightning-repair` console script.
# torchrun needs a module or a .py file, not a console-script name.
exec torchrun \
    --nnodes "${NNODES}" \
    --nproc-per-node "${NPROC_PER_NODE}" \
    --node-rank "${NODE_RANK}" \
    --master-addr "${MASTER_ADDR}" \
    --master-port "${MASTER_PORT}" \
    -m lightning_repair.cli fit --config "${CONFIG}" \
    --trainer.accelerator "${ACCELERATOR}" \
    --trainer.devices "${NPROC_PER_NODE}" \
    --trainer.num_nodes "${NNODES}" \
    --trainer.strategy ddp \
    "$@"
