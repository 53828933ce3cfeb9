"""Image to image: start from a picture instead of pure noise. `strength` says how much of the schedule to run
(1.0 = all of it, i.e. ignore the picture; 0.6 = the last 60% of the steps, from a picture noised to that level).

    python examples/img2img.py                      # tiny model: draws a gradient, then transforms it
    python examples/img2img.py --weights weights/shapes --image in.png "a large blue square, yellow background"
"""

import argparse

import numpy as np
from PIL import Image

import minisd35
from minisd35.tiny import tiny_root

ap = argparse.ArgumentParser()
ap.add_argument("prompt", nargs="?", default="a large blue square in the center, yellow background")
ap.add_argument("--weights")
ap.add_argument("--image", help="the starting picture (default: a generated gradient)")
ap.add_argument("--strength", type=float, default=0.6)
ap.add_argument("-o", "--out", default="img2img.png")
args = ap.parse_args()

pipe = minisd35.load_pipeline(args.weights or tiny_root())
if args.image:
    start = Image.open(args.image).convert("RGB")
else:
    side = pipe.defaults.height
    ramp = np.linspace(0, 255, side, dtype=np.uint8)
    start = Image.fromarray(np.stack([np.tile(ramp, (side, 1)), np.tile(ramp[:, None], (1, side)),
                                      np.full((side, side), 128, np.uint8)], axis=-1))
out = pipe(args.prompt, image=start, strength=args.strength, seed=0)[0]  # size: the picture's own
Image.fromarray(np.concatenate([np.asarray(start.resize(out.size)), np.asarray(out)], axis=1)).save(args.out)
print(f"{args.out}: start | result, strength {args.strength}")
