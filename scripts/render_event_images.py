"""Write the images of a run's TensorBoard event file as PNG files, read back from the file (how docs/images/ is made).

.venv/bin/python scripts/render_event_images.py lightning_logs/<run>/version_0 docs/images --tag rr/layers=rr_layers.png
(the venv's Python, or any Python after `source .venv/bin/activate`)
"""

import argparse
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("run", help="a run folder holding events.out.tfevents.*")
parser.add_argument("output", help="folder for the PNG files")
parser.add_argument("--tag", action="append", default=[], metavar="TAG=FILE",
                    help="an image tag and its file name (default: every image tag, named after the tag)")
args = parser.parse_args()
events = EventAccumulator(args.run, size_guidance={"images": 0})
events.Reload()
tags = dict(t.split("=", 1) for t in args.tag) or {t: t.replace("/", "_") + ".png" for t in events.Tags()["images"]}
Path(args.output).mkdir(parents=True, exist_ok=True)
for tag, name in tags.items():
    image = events.Images(tag)[-1]  # the run's last image of the tag: a PNG as TensorBoard stores it
    (Path(args.output) / name).write_bytes(image.encoded_image_string)
    print(f"{tag}: {image.width}x{image.height} -> {Path(args.output) / name}")
