"""Text to image, the whole pipeline in a few lines.

    python examples/txt2img.py                                   # the built-in tiny model (random weights: noise)
    python examples/txt2img.py --weights weights/shapes "a large red star at the top left, blue background"
    python examples/txt2img.py --weights ~/models/stable-diffusion-3.5-large --fp8 default "a fox in the snow"
"""

import argparse

import minisd35
from minisd35.tiny import tiny_root

ap = argparse.ArgumentParser()
ap.add_argument("prompt", nargs="?", default="a small red circle on the left, blue background")
ap.add_argument("--weights", help="a model root or single file; default: the built-in tiny model")
ap.add_argument("--fp8", help="an FP8 policy for the MMDiT (default, row, tensor, weight-only)")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("-o", "--out", default="txt2img.png")
args = ap.parse_args()

pipe = minisd35.load_pipeline(args.weights or tiny_root(), fp8=args.fp8)
image = pipe(args.prompt, seed=args.seed)[0]  # steps, guidance and size default to the model's variant
image.save(args.out)
t = pipe.timings
print(f"{args.out}: {image.width}x{image.height}, text {t.encode_s:.2f} s, denoise {t.denoise_s:.2f} s "
      f"({t.steps} steps), decode {t.decode_s:.2f} s")
