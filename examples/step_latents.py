"""The denoising loop is a generator: watch every step. Each step yields the latents after the update, the sigma
it came from and the velocity the model predicted; x0_hat = latents - sigma_next * velocity is the model's
current guess of the clean picture, which we decode to show how the image forms (and where an early stop would be).

    python examples/step_latents.py                 # tiny model
    python examples/step_latents.py --weights weights/shapes "a large green triangle, purple background"
"""

import argparse

import numpy as np
from PIL import Image

import minisd35
from minisd35.tiny import tiny_root

ap = argparse.ArgumentParser()
ap.add_argument("prompt", nargs="?", default="a large green triangle in the center, purple background")
ap.add_argument("--weights")
ap.add_argument("--steps", type=int, default=8)
ap.add_argument("-o", "--out", default="steps.png")
args = ap.parse_args()

pipe = minisd35.load_pipeline(args.weights or tiny_root())
frames = []
for step in pipe.steps(args.prompt, steps=args.steps, seed=0):
    # rectified flow: x_sigma = (1 - sigma) x0 + sigma * noise, v = noise - x0  =>  x0 = x_sigma - sigma * v
    x0_hat = step.latents - step.sigma_next * step.velocity
    print(f"step {step.i + 1}/{args.steps}: sigma {step.sigma:.3f} -> {step.sigma_next:.3f}, "
          f"latent std {step.latents.float().std():.3f}")
    frames.append(np.asarray(pipe.decode(x0_hat.to(step.latents.dtype))[0]))
Image.fromarray(np.concatenate(frames, axis=1)).save(args.out)
print(f"{args.out}: the clean-image estimate after each step, left to right")
