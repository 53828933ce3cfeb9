"""Flow-matching sampling for SD3: the sigma schedule, the initial noise, and the denoise loop.

SD3 is a rectified flow: x_sigma = (1 - sigma) * x0 + sigma * eps, with sigma = 1 pure noise and sigma = 0 the image
latent. The MMDiT predicts the velocity v = eps - x0 (given t = 1000 * sigma), so x0_hat = x - sigma * v and one Euler
step from sigma to sigma_next is x + (sigma_next - sigma) * v, a straight line towards x0_hat.

Everything here reproduces diffusers' StableDiffusion3Pipeline + FlowMatchEulerDiscreteScheduler bit for bit
(same dtypes, same operation order), so a pipeline built on it can be compared with diffusers exactly:

- `sigmas(steps, shift)`: the scheduler's table, shift applied twice to the endpoint (see the function).
- `noise(shape, generator)`: diffusers' randn_tensor rules.
- `denoise(...)`: a generator that yields a `Step` after every step; classifier-free guidance, skip-layer guidance
  and the Euler (or DPM++ 2M) update are inline in its loop. Progress bars, previews, per-step audits and early
  stopping all live in the caller's `for step in denoise(...)` loop.
- `img2img_sigmas`, `scale_noise`: where image-to-image starts and how it noises the encoded image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError

NUM_TRAIN_TIMESTEPS = 1000


def _shift(s, shift: float):
    """SD3's time shift: spends more of the steps at high noise when shift > 1 (shift = 3 for every SD3/3.5 model)."""
    return shift * s / (1 + (shift - 1) * s)


def sigmas(steps: int, shift: float = 3.0) -> torch.Tensor:
    """The N+1 sigmas of an N-step run, float32, from 1.0 down to the last non-zero sigma, then 0.

    Exactly diffusers' FlowMatchEulerDiscreteScheduler (1000 train steps, no dynamic shifting): the training table
    is shift(k/1000) for k = 1000..1 in float32, whose ends are sigma_max = 1 and sigma_min = shift(0.001). The
    inference sigmas are numpy float64 linspace(1000*sigma_max, 1000*sigma_min, N) / 1000, shifted *again* (so the
    last non-zero sigma is shift(shift(0.001)) = 0.008929 for shift 3), cast to float32, with 0 appended. The
    Stability reference does the same with a float32 linspace (last-bit differences)."""
    if steps < 1:
        raise InputError(f"steps must be >= 1; got {steps}")
    ends = torch.tensor([NUM_TRAIN_TIMESTEPS, 1], dtype=torch.float32) / NUM_TRAIN_TIMESTEPS  # as the float32 table
    sigma_max, sigma_min = _shift(ends, shift).tolist()
    ts = np.linspace(sigma_max * NUM_TRAIN_TIMESTEPS, sigma_min * NUM_TRAIN_TIMESTEPS, steps)  # float64
    s = torch.from_numpy(_shift(ts / NUM_TRAIN_TIMESTEPS, shift)).to(torch.float32)
    return torch.cat([s, torch.zeros(1)])


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float,
               sigma_next: torch.Tensor | float) -> torch.Tensor:
    """x + (sigma_next - sigma) * v, with diffusers' dtypes: dt is a 0-dim float32 tensor, which does not promote, so
    dt * v is computed in v's dtype (bf16); adding it to x.float() happens in fp32; the result is cast back to v's
    dtype. Latents therefore travel between steps in the model dtype."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    sn = torch.as_tensor(sigma_next, dtype=torch.float32, device=x.device)
    return (x.float() + (sn - s) * v).to(v.dtype)


def dpmpp_2m_step(x: torch.Tensor, v: torch.Tensor, sigma_prev: float | None, sigma: float, sigma_next: float,
                  x0_prev: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DPM-Solver++(2M) step on x0_hat = x - sigma * v; returns (x_next, x0_hat) (keep x0_hat for the next step).

    This is the Stability reference's `sample_dpmpp_2m` (itself k-diffusion's), which treats sigma as a VE noise
    level: with h = log(sigma / sigma_next) and D the (extrapolated) denoised estimate,
        x_next = (sigma_next / sigma) * x + (1 - sigma_next / sigma) * D.
    With D = x0_hat this first-order update *is* the Euler step of the flow (same straight line), and also the exact
    first-order DPM-Solver++ step for the flow's alpha = 1 - sigma. The second-order part extrapolates
    D = (1 + 1/(2r)) x0_hat - 1/(2r) x0_prev with r = h_prev / h measured in log(sigma); a flow-exact DPM-Solver++
    (diffusers' DPMSolverMultistepScheduler with flow sigmas) would measure h in lambda = log((1 - sigma) / sigma)
    instead, which gives different r. We follow the reference. The first step (no history) and the last step
    (sigma_next = 0, where x_next = D = x0_hat) are first order, as in the reference.
    Accuracy, measured on an exactly solvable flow (Gaussian data, tests/test_sampling.py): second order, so with
    many steps it beats Euler (shift 3: 50 steps 1.8% vs 2.5% error, 200 steps 0.09% vs 0.6%), but with few steps
    it is worse (4 steps 150% vs 33%, 16 steps 18% vs 8%): SD3's shifted schedule takes tiny steps in log(sigma)
    first and a huge one near the end (0.11 -> 0.0089), and r = h_prev / h then extrapolates hard (D = 6.9 x0 -
    5.9 x0_prev at step 2 of 4). The reference uses it with 40-50 steps.
    Differences from the reference: it runs under fp16 autocast; here the update is computed in fp32 from the
    float32 sigmas (coefficients in float64) and the result is cast to v's dtype, like the Euler path."""
    work = torch.promote_types(v.dtype, torch.float32)  # at least fp32
    x0 = x.to(work) - sigma * v.to(work)
    if sigma_next == 0:
        return x0.to(v.dtype), x0
    d = x0
    h = math.log(sigma / sigma_next)
    if x0_prev is not None and sigma_prev is not None:
        r = math.log(sigma_prev / sigma) / h
        d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
    x_next = (sigma_next / sigma) * x.to(work) - math.expm1(-h) * d
    return x_next.to(v.dtype), x0


# ---------------------------------------------------------------------------------------------------------------------
# Initial noise.

def generators(seed: int, n: int, device: str | torch.device = "cpu") -> list[torch.Generator]:
    """[Generator(seed), Generator(seed + 1), ...]: one per image. Passed to `noise` (or to diffusers as
    `generator=`), image k of a batch gets exactly the noise of a single-image run with seed + k, so a batch of n
    reproduces n separate runs."""
    return [torch.Generator(device).manual_seed(seed + k) for k in range(n)]


def noise(shape: Sequence[int], generator: int | torch.Generator | Sequence[torch.Generator] | None = None,
          device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Standard normal noise of `shape`, drawn exactly as diffusers' randn_tensor draws it.

    The bits depend on the generator's device (CPU and CUDA generators produce different streams) and may depend
    on dtype, so to reproduce diffusers pass the same kind of generator and the model dtype (on the CPU, randn in
    bf16 happens to equal randn in fp32 rounded to bf16). Rules: a CPU generator draws on the
    CPU and the result is moved to `device`; a CUDA generator must match a CUDA `device`; a list of generators
    (one per batch item) draws each item separately with shape (1, ...); a list of one is used like a single
    generator. An int seed means `generators(seed, batch)`: per-image seeds seed, seed+1, ... on the CPU, so
    batch n equals n single runs and the same seed gives the same noise on any machine. None uses torch's global
    generator on `device`."""
    shape, device = tuple(shape), torch.device(device)
    if isinstance(generator, int):
        generator = generators(generator, shape[0])
    if isinstance(generator, (list, tuple)):
        if len(generator) == 1:
            generator = generator[0]
        elif len(generator) != shape[0]:
            raise InputError(f"noise: {len(generator)} generators for a batch of {shape[0]}; pass one per image")
    first = generator[0] if isinstance(generator, (list, tuple)) else generator
    rand_device = device
    if first is not None and first.device.type != device.type:
        if first.device.type != "cpu":
            raise InputError(f"noise: cannot draw a {device} tensor from a {first.device} generator; use a CPU "
                             f"generator or one on {device}")
        rand_device = torch.device("cpu")
    if isinstance(generator, (list, tuple)):
        parts = [torch.randn((1,) + shape[1:], generator=g, device=rand_device, dtype=dtype) for g in generator]
        return torch.cat(parts).to(device)
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


# ---------------------------------------------------------------------------------------------------------------------
# Image-to-image.

def img2img_start(steps: int, strength: float) -> int:
    """Index of the first step an img2img run takes: diffusers' get_timesteps, t_start = int(N - min(N*strength, N)).
    strength 1 starts from pure noise (t_start 0); strength 0.6 of 28 steps skips the first 11."""
    if not 0.0 < strength <= 1.0:
        raise InputError(f"strength must be in (0, 1]; got {strength}")
    t_start = int(max(steps - min(steps * strength, steps), 0))
    if t_start >= steps:
        raise InputError(f"strength {strength} with {steps} steps leaves no step to run; raise strength or steps")
    return t_start


def img2img_sigmas(sigmas_: torch.Tensor, strength: float) -> torch.Tensor:
    """The tail of an N-step schedule that img2img runs: sigmas_[t_start:] (still ending with 0)."""
    return sigmas_[img2img_start(len(sigmas_) - 1, strength):]


def scale_noise(latents: torch.Tensor, noise_: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Noise clean latents to level sigma: sigma * noise + (1 - sigma) * latents, all in the latents' dtype (diffusers
    casts its float32 sigma to the sample dtype first; bf16 sigma is part of the result)."""
    s = torch.as_tensor(sigma, dtype=torch.float32).to(device=latents.device, dtype=latents.dtype).reshape(1, 1, 1, 1)
    return s * noise_ + (1.0 - s) * latents


# ---------------------------------------------------------------------------------------------------------------------
# The loop.

@dataclass(frozen=True)
class SkipLayerGuidance:
    """Skip-layer guidance (SD3.5 Medium): on steps i with N*start < i < N*stop (strict, N = steps of this run), one
    more cond-only forward with `layers` skipped, and v = v_cfg + (v_cond - v_skip) * scale. Only with CFG.
    diffusers' defaults; the Stability reference uses scale 2.5 for Medium."""

    layers: tuple[int, ...] = (7, 8, 9)
    scale: float = 2.8
    start: float = 0.01
    stop: float = 0.2


@dataclass
class Step:
    """What `denoise` yields after step i: the latents after the update (model dtype), the sigmas of the step, and
    the guided velocity the update used."""

    i: int
    sigma: float
    sigma_next: float
    latents: torch.Tensor
    velocity: torch.Tensor


# model(x [B, 16, h, w], t [B] float32 = 1000 * sigma, context, pooled, skip_layers=()) -> velocity like x
Model = Callable[..., torch.Tensor]


@torch.no_grad()
def denoise(model: Model, latents: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
            neg_context: torch.Tensor | None = None, neg_pooled: torch.Tensor | None = None, *,
            sigmas: torch.Tensor, guidance: float = 7.0, slg: SkipLayerGuidance | None = None,
            sampler: str = "euler") -> Iterator[Step]:
    """Run the sampler from `latents` (noise at sigmas[0], or scale_noise'd latents for img2img) down sigmas[-1] = 0,
    yielding a Step after every step; the last Step's latents are the result.

    guidance > 1 turns on classifier-free guidance: one model call on the batch [uncond, cond] (negative first, as
    diffusers), v = v_u + guidance * (v_c - v_u) in the model dtype. guidance <= 1 runs the cond batch only.
    sampler: "euler" (diffusers' FlowMatchEulerDiscreteScheduler) or "dpmpp_2m" (the Stability reference's default
    for Large/Medium; see dpmpp_2m_step)."""
    if sampler not in ("euler", "dpmpp_2m"):
        raise InputError(f"unknown sampler {sampler!r}; choose 'euler' or 'dpmpp_2m'")
    cfg = guidance > 1
    if cfg and (neg_context is None or neg_pooled is None):
        raise InputError(f"guidance {guidance} > 1 needs neg_context and neg_pooled (encode the negative prompt, '' "
                         f"by default), or set guidance <= 1")
    if context.shape[0] != latents.shape[0] or pooled.shape[0] != latents.shape[0]:
        raise InputError(f"batch mismatch: latents {tuple(latents.shape)}, context {tuple(context.shape)}, "
                         f"pooled {tuple(pooled.shape)}")
    ctx = torch.cat([neg_context, context]) if cfg else context
    pool = torch.cat([neg_pooled, pooled]) if cfg else pooled
    sig = sigmas.to(device=latents.device, dtype=torch.float32)
    ts = sig * NUM_TRAIN_TIMESTEPS  # the model's timestep input, float32, as diffusers' scheduler.timesteps
    n = len(sig) - 1
    x, x0_prev = latents, None
    for i in range(n):
        x_in = torch.cat([x, x]) if cfg else x
        v = model(x_in, ts[i].expand(x_in.shape[0]), ctx, pool)
        if cfg:
            v_u, v_c = v.chunk(2)
            v = v_u + guidance * (v_c - v_u)
            if slg is not None and slg.layers and slg.scale and n * slg.start < i < n * slg.stop:
                v_skip = model(x, ts[i].expand(x.shape[0]), context, pooled, skip_layers=tuple(slg.layers))
                v = v + (v_c - v_skip) * slg.scale
        if sampler == "euler":
            x = euler_step(x, v, sig[i], sig[i + 1])
        else:
            s_prev = float(sig[i - 1]) if i > 0 else None
            x, x0_prev = dpmpp_2m_step(x, v, s_prev, float(sig[i]), float(sig[i + 1]), x0_prev)
        yield Step(i, float(sig[i]), float(sig[i + 1]), x, v)


def sample(model: Model, latents: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
           neg_context: torch.Tensor | None = None, neg_pooled: torch.Tensor | None = None, **kw) -> torch.Tensor:
    """Run `denoise` to the end and return the final latents."""
    x = latents
    for step in denoise(model, latents, context, pooled, neg_context, neg_pooled, **kw):
        x = step.latents
    return x
