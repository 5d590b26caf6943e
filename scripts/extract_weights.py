"""Extract the network weights of a Lightning checkpoint as a plain state_dict (how the shipped checkpoint is made).

.venv/bin/python scripts/extract_weights.py lightning_logs/<run>/checkpoints/<best>.ckpt checkpoints/<name>.pt
(the venv's Python, or any Python after `source .venv/bin/activate`: the script imports lightning_repair)
"""

import argparse

from lightning_repair.export import atomic_torch_save
from lightning_repair.models import read_state_dict

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("checkpoint", help="a Lightning checkpoint of DenseClassifier (or any state_dict file)")
parser.add_argument("output", help="where to write the plain state_dict")
args = parser.parse_args()
atomic_torch_save(args.output, read_state_dict(args.checkpoint))
print(f"wrote {args.output}")
