"""Extract the network weights of a checkpoint as a checkpoint that describes itself (how the shipped ones are made).

.venv/bin/python scripts/extract_weights.py lightning_logs/<run>/checkpoints/<best>.ckpt checkpoints/<name>.pt
.venv/bin/python scripts/extract_weights.py checkpoints/<name>.pt checkpoints/<name>.pt --config configs/train/<x>.yaml
(the venv's Python, or any Python after `source .venv/bin/activate`: the script imports lightning_repair)

The output is ``{"state_dict": ..., "lightning_repair": {"format", "network", "input"}}`` (plain data, read with
``torch.load(weights_only=True)``). The network and input are the ones the checkpoint records (a DenseClassifier
checkpoint does) or, with ``--config``, those of the training config (``model.init_args.network``, ``data``); the
weights are checked to load strictly into that network first.
"""

import argparse

import yaml

from lightning_repair.data import dataset_info
from lightning_repair.export import atomic_torch_save
from lightning_repair.models import (
    METADATA_KEY,
    build_network,
    check_recorded_network,
    checkpoint_metadata,
    load_weights,
    read_checkpoint,
)

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("checkpoint", help="a Lightning checkpoint of DenseClassifier (or any state_dict file)")
parser.add_argument("output", help="where to write the checkpoint (may be the input)")
parser.add_argument("--config", help="the training config whose network and data the checkpoint comes from")
args = parser.parse_args()
state, metadata = read_checkpoint(args.checkpoint)
if args.config:
    with open(args.config) as f:
        config = yaml.safe_load(f)
    network, data = config["model"]["init_args"]["network"], config.get("data") or {}
    dataset = data.get("dataset", "fashion_mnist")
    if metadata is not None:
        check_recorded_network(network, metadata.get("network"), args.checkpoint)
    metadata = checkpoint_metadata(network, dataset_info(dataset, rgb=data.get("rgb", False)), dataset)
if metadata is None:
    parser.error(f"{args.checkpoint} records no network: give --config, the training config")
load_weights(build_network(metadata["network"]), state)  # strictly: the spec really is this checkpoint's
atomic_torch_save(args.output, {"state_dict": state, METADATA_KEY: metadata})
print(f"wrote {args.output}: {metadata}")
