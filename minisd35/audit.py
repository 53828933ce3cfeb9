"""The per-layer FP8 audit: what FP8 does to every linear layer, at every denoising step, and to the image.

    python -m minisd35 audit "a red cube on a table" --model tiny --out audit-tiny --compare row,tensor,weight-only
    summary = run_audit("stable-diffusion-3.5-large", "default", "a photo of a fox", seed=0, steps=28,
                        height=1024, width=1024, out_dir="audit-large", device="cuda")

E4M3 in one paragraph. An E4M3 number is +-2^e * 1.mmm (binary) with e in -6..8 and three mantissa bits: 8 values
per power of two, so neighbours differ by 1/8 to 1/16 of their size and rounding costs at most 2^-4 = 6.25% (a
relative RMS of about 2.6% on Gaussian data). The grid tops out at 1.75 * 2^8 = 448; there is no Inf, so anything
larger must be clamped ("saturated"). Below 2^-6 the spacing stops shrinking: subnormals 0.001 * 2^-6 .. 0.111 *
2^-6 are multiples of 2^-9, so a value there keeps fewer than 3 significant bits, and anything below 2^-10 rounds to
zero ("flushed"). A tensor is therefore scaled into the grid first, scale = amax / 448 (fp8.py), and the audit asks,
per layer: where did the values land on that grid?

Scaling granularity, and the surprise. One scale per tensor ("tensor") or one per output channel / token ("row").
Int8 has a uniform grid, so one row 100x larger than the rest leaves the rest about one level. E4M3 is a float:
dividing by a larger scale only lowers every exponent, and the others keep their 3 mantissa bits as long as they
stay above 2^-6, i.e. until the outlier is about 448 / 2^-6 = 28672x their size. Measured on a 64x96 Gaussian weight
with row 3 multiplied by s = 1, 1e2, 1e3, 1e4, 1e5 (examples/fp8_audit.py, part 2): the worst other row's relative
RMS error is 0.036, 0.035, 0.032, 0.061, 0.61 with one scale per tensor and 0.032 throughout with one per row, while
the whole-tensor error is 0.024 in every case (the big row dominates the norm and hides the damage; hence the
w_chan_rel_rms_max column). So per-tensor E4M3 is fine until an outlier reaches ~1e4x, and then it is a cliff.

Why a layer can be sensitive even when its own error is small. The network does not care where a scale lives:
multiplying row j of an MLP's fc2 by s and the gate that multiplies that channel (a row of the adaLN modulation) by
1/s computes the same function. FP8 with one scale per tensor does care: the big row sets the scale and the other
rows fall into the subnormals. The layer's own relative error then looks ordinary (its output is dominated by the
big channel), and the damage only shows once the gate has scaled that channel back down. Measured on the tiny model
(joint_blocks.1.x_block.mlp.fc2, s = 1e5, 4 steps, 128 px): per tensor, the layer's isolated error is 0.038, inside
the range of the other 22 W8A8 layers (0.035-0.043), but with only it in FP8 the final latents move by 0.069,
against at most 0.018 for any other layer; row-wise, 0.014 (rank 10 of 29). This is why the audit measures three
things per layer: the error of the layer on the same input ("isolated"), the error against the same layer in the
bf16 run ("propagated", which includes everything upstream), and with --sensitivity the error of the final latents
when only that layer (or group) runs in FP8. tests/test_audit.py builds this model and checks the ranking under both
scalings.

How it runs. The reference (the model dtype, bf16 by default; "bf16" below) and the FP8 model are the SAME model
object, quantised with keep_original=True (from the checkpoint's own tensors where their precision differs, as the
loader does), and run as ONE batch: the latents are [run 0 = reference, run 1 = FP8] (same noise, same prompt), each
on its own trajectory, and every FP8Linear computes its bf16 output for all rows (fp8.original_weights) while a
forward hook replaces the rows of the runs that use FP8 for that layer by the FP8 result, computed by the layer's
own forward (the same ref/torch/triton code the plain forward uses). The hook sees, for the same layer and the same
call, the FP8 output, the bf16 output on the same input (isolated error) and the reference run's output (propagated
error), and reduces them to a few scalars at once: nothing per-layer is stored, so full-size SD3.5 Large (384
linears) audits in the memory of a two-image batch plus one layer's temporaries. Everything in the MMDiT is per
sample, so batching the runs changes at most the rounding (on the CPU in bf16 the audit's runs are bit-identical to
separate runs of `generate` and `generate --fp8`). Sensitivity runs use the same mechanism with one run per layer
group ([reference, only group 1 in FP8, only group 2 in FP8, ...]) in chunks of --runs-per-batch. The audit runs the
plain forward (mmdit.py with FP8Linear modules), never fast.py's fused one (which `generate` uses on CUDA and which
has no per-layer modules to hook); the plain forward is the fused one's numerical reference.

Outputs (out_dir; existing files are not overwritten without force): layers.csv (one row per FP8 layer: weight
stats, activation stats and errors aggregated over steps), layer_steps.csv (per layer and step), steps.csv (per
step: latent drift, velocity error), summary.json, heatmap.png (error by block x layer type), error_vs_step.png,
images.png (bf16 | FP8 | amplified difference), bf16.png and fp8.png; with --compare also compare.csv and
compare.png; with --sensitivity also sensitivity.csv and suggested_policy.json (an fp8.Policy file that
`generate --fp8` accepts).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from . import __version__, sampling
from .checkpoint import write_atomic
from .errors import InputError, list_keys
from .fp8 import (
    E4M3_MAX,
    FP8Linear,
    Policy,
    dequantize,
    fp8_layers,
    get_policy,
    original_weights,
    quantize,
    quantize_act,
    quantize_weight,
    resolve_impl,
)

SUBNORMAL_MAX = 2.0**-6  # smallest normal E4M3 magnitude: below it fewer than 3 mantissa bits survive
# "saturated" = clamped: beyond 448 by more than the fp32 rounding of x / (amax / 448), which lands a hair above 448
SAT_LIMIT = E4M3_MAX * (1 + 2**-10)
DEFAULT_PROMPT = "a red cube on a blue table, studio light"
MMDIT_POLICIES = ("bf16", "default", "row", "tensor", "weight-only")


# --- naming: block, stream and layer type from the full name ---------------------------------------------------------

_BLOCK_RE = re.compile(r"joint_blocks\.(\d+)\.(x_block|context_block)\.(.+)")


def describe_layer(name: str) -> tuple[int | None, str, str]:
    """'joint_blocks.3.x_block.mlp.fc2' -> (3, 'x', 'mlp.fc2'); 'context_embedder' -> (None, '', 'context_embedder')."""
    m = _BLOCK_RE.fullmatch(name)
    if m is None:
        return None, "", name
    return int(m.group(1)), "x" if m.group(2) == "x_block" else "context", m.group(3)


def group_of(name: str, by: str) -> tuple[str, str]:
    """(unit name, policy glob) of a layer for sensitivity analysis by 'layer', 'type' (stream + type, all blocks)
    or 'block' (both streams of one joint block). Layers outside the joint blocks are always their own unit."""
    block, stream, kind = describe_layer(name)
    if by == "layer" or block is None:
        return name, name
    if by == "type":
        return f"{stream}.{kind}", f"joint_blocks.*.{stream}_block.{kind}"
    if by == "block":
        return f"block {block}", f"joint_blocks.{block}.*"
    raise InputError(f"unknown sensitivity grouping {by!r}; choose layer, type or block")


# --- numbers ----------------------------------------------------------------------------------------------------------

def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64: the error measure used everywhere here."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


def weight_stats(w: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> dict:
    """What quantising the weight w [N, K] to (w8, scale) did. rel_rms is over the whole tensor; chan_rel_rms_max is
    the worst output channel's own relative error, which is what reveals a per-tensor scale set by one big row (the
    whole-tensor number is then dominated by that row and looks fine). saturated: share of values beyond +-448 after
    scaling (0 whenever the scale came from these values' amax); flushed: non-zero weights that became 0; subnormal:
    share that landed below 2^-6, where fewer than 3 mantissa bits are left."""
    wf = w.float()
    deq = dequantize(w8, scale)
    err = deq - wf
    chan = err.norm(dim=1) / wf.norm(dim=1).clamp(min=1e-30)
    q = w8.float().abs()
    scaled = wf.abs() / scale.float().reshape(-1, 1)
    n = wf.numel()
    return {
        "w_amax": float(wf.abs().max()), "w_scale_min": float(scale.min()), "w_scale_max": float(scale.max()),
        "w_rel_rms": float(err.double().norm() / wf.double().norm().clamp(min=1e-300)),
        "w_chan_rel_rms_max": float(chan.max()),
        "w_saturated": float((scaled > SAT_LIMIT).sum()) / n,
        "w_flushed": float(((wf != 0) & (q == 0)).sum()) / n,
        "w_subnormal": float(((q > 0) & (q < SUBNORMAL_MAX)).sum()) / n,
    }


def layer_bytes(n: int, k: int, bias: bool, recipe: str, bf16_bytes: int = 2) -> int:
    """Bytes of one linear's weights under a recipe: E4M3 weight + fp32 scales (+ the bias, kept in bf16)."""
    b = n * bf16_bytes if bias else 0
    if recipe == "bf16":
        return n * k * bf16_bytes + b
    return n * k + 4 * (1 if recipe == "w8a8-tensor" else n) + b


def model_bytes(model: nn.Module, policy: Policy) -> int:
    """Weight bytes of the MMDiT under a policy, counted from the shapes (bf16 for everything not quantised)."""
    total = 0
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, FP8Linear)):
            total += layer_bytes(mod.out_features, mod.in_features, mod.bias is not None, policy.recipe_for(name)[0])
        else:
            total += sum(2 * p.numel() for p in mod.parameters(recurse=False))
    return total + sum(2 * b.numel() for n, b in model.named_buffers() if n == "pos_embed")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images in dB (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity (Wang et al. 2004) of two uint8 RGB images: 11x11 Gaussian window (sigma 1.5, applied
    as two 1-D passes), K1 = 0.01, K2 = 0.03, per channel on the valid region, averaged."""
    x = torch.tensor(a, dtype=torch.float64).permute(2, 0, 1)[:, None]
    y = torch.tensor(b, dtype=torch.float64).permute(2, 0, 1)[:, None]
    size = min(11, x.shape[-1], x.shape[-2])
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * 1.5**2))
    g = g / g.sum()
    moments = torch.cat([x, y, x * x, y * y, x * y])  # [5 * 3, 1, H, W], blurred in one go
    mu_x, mu_y, xx, yy, xy = F.conv2d(F.conv2d(moments, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1)).chunk(5)
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(s.mean())


# --- running several trajectories as one batch -----------------------------------------------------------------------

# What the hook accumulates per layer and step, on the device (one sync per step): sums, and maxima.
SUMS = ("act_sumsq", "act_n", "act_sat", "act_flush", "act_subn", "act_q_n", "iso_d2", "iso_r2", "prop_d2",
        "prop_r2", "calls")
MAXES = ("act_amax", "act_scale_max", "neg_act_scale_min", "iso_max", "prop_max")


class Lockstep:
    """Inside `with Lockstep(model, runs, batch):` a forward of the model on a batch laid out as R runs of `batch`
    images each (row b belongs to run (b // batch) % R, which holds for the CFG-doubled batch [x, x] and for the
    cond-only skip-layer pass alike) computes, for each FP8 layer, FP8 for the runs whose set contains the layer and
    bf16 for the others. runs[0] should be the empty set (the reference). With collect=True the hook also measures
    run 1 against run 0 (activation statistics, isolated and propagated errors) into self.acc."""

    def __init__(self, model: nn.Module, runs: list[frozenset[str]], batch: int, collect: bool = False):
        self.layers = fp8_layers(model)
        self.runs, self.batch, self.R, self.collect = runs, batch, len(runs), collect
        self.use = {n: [r for r, s in enumerate(runs) if n in s] for n in self.layers}
        self.acc: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._rows: dict = {}
        self._handles: list = []
        self._ctx = original_weights(model)

    def __enter__(self):
        self._ctx.__enter__()
        for name, m in self.layers.items():
            if self.use[name]:
                hook = lambda mod, inp, out, n=name: self._hook(n, mod, inp, out)
                self._handles.append(m.register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return self._ctx.__exit__(*exc)

    def rows(self, n: int, device) -> list[torch.Tensor]:
        key = (n, str(device))
        if key not in self._rows:
            if n % (self.batch * self.R):
                raise InputError(f"audit: a layer saw a batch of {n}, not a multiple of {self.R} runs x {self.batch}")
            run = (torch.arange(n, device=device) // self.batch) % self.R
            self._rows[key] = [torch.nonzero(run == r).flatten() for r in range(self.R)]
        return self._rows[key]

    def _hook(self, name: str, m: FP8Linear, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        rows = self.rows(x.shape[0], x.device)
        for r in self.use[name]:
            xr = x.index_select(0, rows[r])
            m.use_original = False  # the layer's own FP8 forward, on this run's rows only (per-tensor amax per run)
            try:
                y = m.forward(xr)
            finally:
                m.use_original = True
            if self.collect and r == 1:
                self._measure(name, m, xr, y, out.index_select(0, rows[1]), out.index_select(0, rows[0]))
            out.index_copy_(0, rows[r], y)
        return out

    @torch.no_grad()
    def _measure(self, name: str, m: FP8Linear, x: torch.Tensor, y: torch.Tensor, y_same_input: torch.Tensor,
                 y_ref_run: torch.Tensor) -> None:
        """Reduce one call to scalars: the activation as quantize_act sees it, and the two output errors."""
        x2 = x.reshape(-1, x.shape[-1]).float()
        zero = x2.new_zeros(())
        amax = x2.abs().amax()
        if m.recipe == "w8-only":  # activations stay in bf16: nothing is scaled, clamped or flushed
            sat = flush = subn = zero
            q_n, s_min, s_max = 0, zero, zero
        else:
            xq, xs = quantize_act(x2, per_token=m.recipe == "w8a8-row", scale=m.input_scale)
            q = xq.float().abs()
            sat = ((x2.abs() / xs.reshape(-1, 1)) > SAT_LIMIT).sum()
            flush = ((x2 != 0) & (q == 0)).sum()
            subn = ((q > 0) & (q < SUBNORMAL_MAX)).sum()
            q_n, s_min, s_max = x2.numel(), xs.min(), xs.max()
        yf, yi, yr = y.float(), y_same_input.float(), y_ref_run.float()
        di, dp = yf - yi, yf - yr
        sq = lambda t: torch.linalg.vector_norm(t).double() ** 2  # fp32 pass, reduced pairwise: accurate enough
        count = lambda v: torch.tensor(float(v), device=x.device, dtype=torch.double)
        sums = torch.stack([sq(x2), count(x2.numel()), sat.double(), flush.double(), subn.double(), count(q_n),
                            sq(di), sq(yi), sq(dp), sq(yr), count(1)])
        maxes = torch.stack([amax, s_max, -s_min, di.abs().max(), dp.abs().max()]).double()
        if name in self.acc:
            s0, m0 = self.acc[name]
            self.acc[name] = (s0 + sums, torch.maximum(m0, maxes))
        else:
            self.acc[name] = (sums, maxes)

    def take(self) -> dict[str, dict[str, float]]:
        """The statistics accumulated since the last take(), as floats (one device sync), and reset."""
        names = list(self.acc)
        if not names:
            return {}
        sums = torch.stack([self.acc[n][0] for n in names]).cpu().tolist()
        maxes = torch.stack([self.acc[n][1] for n in names]).cpu().tolist()
        self.acc = {}
        return {n: dict(zip(SUMS, s)) | dict(zip(MAXES, mx)) for n, s, mx in zip(names, sums, maxes)}


def finish(a: dict) -> dict:
    """Accumulated sums and maxima -> the reported statistics of one layer (for one step or the whole run)."""
    n, qn = max(a["act_n"], 1.0), a["act_q_n"]
    rms = math.sqrt(a["act_sumsq"] / n)
    quantised = qn > 0
    return {
        "act_amax": a["act_amax"], "act_rms": rms, "act_outlier": a["act_amax"] / rms if rms > 0 else math.nan,
        "act_scale_min": -a["neg_act_scale_min"] if quantised else math.nan,
        "act_scale_max": a["act_scale_max"] if quantised else math.nan,
        "act_saturated": a["act_sat"] / qn if quantised else math.nan,
        "act_flushed": a["act_flush"] / qn if quantised else math.nan,
        "act_subnormal": a["act_subn"] / qn if quantised else math.nan,
        "iso_rel_rms": math.sqrt(a["iso_d2"] / a["iso_r2"]) if a["iso_r2"] > 0 else math.nan,
        "iso_max_abs": a["iso_max"],
        "prop_rel_rms": math.sqrt(a["prop_d2"] / a["prop_r2"]) if a["prop_r2"] > 0 else math.nan,
        "prop_max_abs": a["prop_max"],
    }


def merge(a: dict | None, b: dict) -> dict:
    if a is None:
        return dict(b)
    return {k: (max(a[k], b[k]) if k in MAXES else a[k] + b[k]) for k in a}


# --- the inputs of one audit -----------------------------------------------------------------------------------------

@dataclass
class Inputs:
    """Prompt embeddings, initial noise and sampler settings shared by every run of an audit (batch of 1 image)."""

    context: torch.Tensor
    pooled: torch.Tensor
    neg_context: torch.Tensor | None
    neg_pooled: torch.Tensor | None
    noise: torch.Tensor
    sigmas: torch.Tensor
    guidance: float
    slg: sampling.SkipLayerGuidance | None
    sampler: str
    settings: dict = field(default_factory=dict)

    def with_steps(self, steps: int, shift: float) -> Inputs:
        return Inputs(**{**self.__dict__, "sigmas": sampling.sigmas(steps, shift)})


def prepare_inputs(pipe, prompt: str, negative: str, seed: int, steps: int, height: int, width: int,
                   guidance: float, sampler: str | None = None) -> Inputs:
    """Encode the prompts and draw the noise exactly as Pipeline.steps does for one image."""
    d = pipe.defaults
    pipe.check_args(height, width, steps, guidance, 1, None)
    cfg_on = guidance > 1
    ctx, pooled = pipe.encode_prompts([negative, prompt] if cfg_on else [prompt])
    neg_ctx, neg_pooled = (ctx[:1], pooled[:1]) if cfg_on else (None, None)
    ctx, pooled = (ctx[1:], pooled[1:]) if cfg_on else (ctx, pooled)
    f = pipe.preset.vae.downscale
    shape = (1, pipe.mmdit.cfg.in_channels, height // f, width // f)
    x = sampling.noise(shape, [torch.Generator("cpu").manual_seed(seed)], pipe.device, pipe.dtype)
    slg = (sampling.SkipLayerGuidance(d.slg_layers, d.slg_scale, d.slg_start, d.slg_stop)
           if cfg_on and d.slg_layers and d.slg_scale else None)
    settings = {"prompt": prompt, "negative_prompt": negative, "seed": seed, "steps": steps, "height": height,
                "width": width, "guidance": guidance, "sampler": sampler or d.sampler, "shift": d.shift}
    return Inputs(ctx, pooled, neg_ctx, neg_pooled, x, sampling.sigmas(steps, d.shift), guidance, slg,
                  sampler or d.sampler, settings)


def trajectories(model: nn.Module, inp: Inputs, R: int):
    """sampling.denoise on R copies of the same start (latents [R, C, h, w]); yields each Step."""
    rep = lambda t: None if t is None else t.repeat(R, *[1] * (t.dim() - 1))
    return sampling.denoise(model, rep(inp.noise), rep(inp.context), rep(inp.pooled), rep(inp.neg_context),
                            rep(inp.neg_pooled), sigmas=inp.sigmas, guidance=inp.guidance, slg=inp.slg,
                            sampler=inp.sampler)


def final_latents(model: nn.Module, inp: Inputs, runs: list[frozenset[str]]) -> torch.Tensor:
    """Final latents [R, C, h, w] of R runs, run r with the layers in runs[r] in FP8 and the rest in bf16."""
    with Lockstep(model, runs, batch=1):
        *_, last = trajectories(model, inp, len(runs))
    return last.latents


def quiet(msg: str) -> None:
    pass


def run_errors(model: nn.Module, inp: Inputs, sets: list[frozenset[str]], per_batch: int,
               log: Callable[[str], None] = quiet) -> list[float]:
    """Relative RMS error of the final latents of each FP8 layer set vs the bf16 reference, `per_batch` - 1 sets
    per batched run (each batch carries its own reference)."""
    errs = []
    chunk = max(per_batch - 1, 1)
    for i in range(0, len(sets), chunk):
        t0 = time.perf_counter()
        lat = final_latents(model, inp, [frozenset()] + sets[i:i + chunk])
        errs += [rel_rms(lat[k], lat[0]) for k in range(1, lat.shape[0])]
        log(f"audit:   runs {i + 1}-{i + lat.shape[0] - 1} of {len(sets)} ({len(inp.sigmas) - 1} steps, "
            f"{lat.shape[0]} trajectories in one batch): {time.perf_counter() - t0:.1f} s")
    return errs


# --- one policy: quantise, run both trajectories in lockstep, measure ------------------------------------------------

def restore_bf16(model: nn.Module) -> None:
    """Undo quantize(..., keep_original=True): every FP8Linear becomes the nn.Linear it came from."""
    layers = fp8_layers(model)
    lost = [n for n, m in layers.items() if m.original is None]
    if lost:
        raise InputError(f"the audit needs the bf16 weights, but {len(lost)} layers are FP8 without them "
                         f"({list_keys(lost, 3)}): an FP8 checkpoint, or a pipeline loaded with fp8=...; audit the "
                         f"bf16/fp16 checkpoint, loaded without fp8")
    for name, m in layers.items():
        w, b = m.original
        lin = nn.Linear(m.in_features, m.out_features, bias=b is not None, device="meta")
        lin.weight = nn.Parameter(w, requires_grad=False)
        if b is not None:
            lin.bias = nn.Parameter(b, requires_grad=False)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, lin)


@dataclass
class PolicyResult:
    policy: Policy
    layers: list[dict]  # one row per FP8 layer (layers.csv)
    layer_steps: list[dict]  # one row per layer and step (layer_steps.csv)
    steps: list[dict]  # one row per step (steps.csv)
    latents_ref: torch.Tensor
    latents_fp8: torch.Tensor
    report: str
    weight_bytes: int
    kept: dict[str, str]


def file_weights(pipe) -> dict:
    """The MMDiT checkpoint's own tensors, lazily ({Stability key: weights.Planned}), or {} when the pipeline's
    source is not a path. See quantize_like_loader."""
    from .pipeline import _resolve
    from .weights import open_mmdit, plan_mmdit

    path = Path(pipe.source) if pipe.source else None
    if path is None or not path.exists():
        return {}
    ck, layout, _ = open_mmdit(_resolve(path)["mmdit"])
    return plan_mmdit(ck, layout)[0]


def quantize_like_loader(model: nn.Module, policy: Policy, plan: dict, stats: bool = False):
    """quantize(model, policy, keep_original=True), then re-quantise every layer whose checkpoint tensor has another
    precision than the model (an fp32 or fp16 file run in bf16, and not changed since) from the file's own tensor, as
    load_pipeline(fp8=policy) does: FP8 from fp32 is not always FP8 from bf16 (double rounding), and the audit must
    measure the model `generate --fp8` runs. Returns (report, {layer: weight_stats against the weight the FP8 one
    approximates} if stats else {}); one layer's source tensor at a time is in memory."""
    report = quantize(model, policy, keep_original=True)
    wstats = {}
    for name, m in fp8_layers(model).items():
        w = m.original[0]
        p = plan.get(f"{name}.weight")
        if p is not None and p.dtype != w.dtype and tuple(p.shape) == tuple(w.shape):
            src = p.make().to(w.device)
            if torch.equal(src.to(w.dtype), w):  # still the file's weight (not changed in memory since loading)
                w = src
                m.weight, m.weight_scale = quantize_weight(w, per_channel=m.recipe != "w8a8-tensor")
        if stats:
            wstats[name] = weight_stats(w, m.weight, m.weight_scale)
    return report, wstats


def audit_policy(pipe, policy: Policy, inp: Inputs, plan: dict | None = None,
                 log: Callable[[str], None] = quiet) -> PolicyResult:
    """Quantise the pipeline's MMDiT with `policy` (keeping the bf16 weights), run the reference and the FP8 model
    in lockstep and return every per-layer and per-step number. The model is left quantised (restore_bf16 undoes).
    plan: the checkpoint's tensors (file_weights) to quantise from, as the loader does."""
    model = pipe.mmdit
    restore_bf16(model)
    report, wstats = quantize_like_loader(model, policy, plan or {}, stats=True)
    layers = fp8_layers(model)
    info = {}
    for name, m in layers.items():
        block, stream, kind = describe_layer(name)
        info[name] = {"layer": name, "block": "" if block is None else block, "stream": stream, "type": kind,
                      "recipe": m.recipe, "shape": f"{m.out_features}x{m.in_features}",
                      **wstats[name],
                      "bytes_bf16": layer_bytes(m.out_features, m.in_features, m.bias is not None, "bf16"),
                      "bytes_fp8": layer_bytes(m.out_features, m.in_features, m.bias is not None, m.recipe)}
    totals: dict[str, dict | None] = {n: None for n in layers}
    layer_steps, steps = [], []
    with Lockstep(model, [frozenset(), frozenset(layers)], batch=1, collect=True) as ls:
        t0 = time.perf_counter()
        for step in trajectories(model, inp, 2):
            per = ls.take()
            log(f"audit:   {policy.name}: step {step.i + 1}/{len(inp.sigmas) - 1} ({time.perf_counter() - t0:.1f} s)")
            for name, acc in per.items():
                totals[name] = merge(totals[name], acc)
                layer_steps.append({"layer": name, "step": step.i, "sigma": step.sigma, **finish(acc)})
            lat, vel = step.latents, step.velocity
            steps.append({"step": step.i, "sigma": step.sigma, "latent_rel_rms": rel_rms(lat[1], lat[0]),
                          "latent_max_abs": float((lat[1].float() - lat[0].float()).abs().max()),
                          "velocity_rel_rms": rel_rms(vel[1], vel[0]),
                          "finite": bool(torch.isfinite(lat[1]).all())})
    rows = [{**info[n], **(finish(totals[n]) if totals[n] else {})} for n in layers]
    return PolicyResult(policy, rows, layer_steps, steps, lat[0:1].clone(), lat[1:2].clone(), str(report),
                        model_bytes(model, policy), dict(report.kept))


# --- sensitivity and the suggested policy ----------------------------------------------------------------------------

def sensitivity(pipe, inp: Inputs, by: str, per_batch: int, log: Callable[[str], None] = quiet) -> list[dict]:
    """Final-latent error with only one unit (layer or group) in FP8, for every unit; sorted, most sensitive first."""
    layers = fp8_layers(pipe.mmdit)
    units: dict[str, dict] = {}
    for name in layers:
        unit, glob = group_of(name, by)
        units.setdefault(unit, {"unit": unit, "glob": glob, "layers": []})["layers"].append(name)
    names = list(units)
    errs = run_errors(pipe.mmdit, inp, [frozenset(units[u]["layers"]) for u in names], per_batch, log)
    rows = [{"unit": u, "glob": units[u]["glob"], "n_layers": len(units[u]["layers"]), "final_rel_rms": e,
             "layers": units[u]["layers"]} for u, e in zip(names, errs)]
    rows.sort(key=lambda r: -r["final_rel_rms"] if math.isfinite(r["final_rel_rms"]) else -math.inf)
    for k, r in enumerate(rows):
        r["rank"] = k + 1
    return rows


def suggest(pipe, inp: Inputs, ranked: list[dict], target: float, per_batch: int, full_error: float,
            log: Callable[[str], None] = quiet) -> dict:
    """Smallest k such that keeping the k most sensitive units in bf16 (the rest as the policy says) brings the final
    latent error to <= target. Each candidate k is measured (not predicted from the single-unit numbers, which do
    not add up exactly); k is searched with batched rounds of evenly spaced candidates, which finds the smallest k
    if the error falls with k (it does, up to noise) and in any case returns a k whose error was measured <= target."""
    all_layers = frozenset(fp8_layers(pipe.mmdit))
    kept_after = lambda k: all_layers - frozenset(n for r in ranked[:k] for n in r["layers"])
    measured = {0: full_error, len(ranked): 0.0}
    lo, hi = 0, len(ranked)  # error(lo) > target (or lo = 0 untested), error(hi) <= target
    if full_error <= target:
        hi = 0
    while hi - lo > 1:
        n_cand = min(max(per_batch - 1, 1), hi - lo - 1)
        cands = sorted({lo + max(1, round((hi - lo) * (j + 1) / (n_cand + 1))) for j in range(n_cand)} - {hi})
        for k, e in zip(cands, run_errors(pipe.mmdit, inp, [kept_after(k) for k in cands], per_batch, log)):
            measured[k] = e
        ok = [k for k in cands if measured[k] <= target]
        hi = min(ok) if ok else hi
        lo = max([k for k in cands if k < hi and measured[k] > target], default=lo)
    return {"k": hi, "units": [r["unit"] for r in ranked[:hi]], "globs": [r["glob"] for r in ranked[:hi]],
            "layers_kept": sorted(all_layers - kept_after(hi)), "error": measured[hi], "target": target,
            "measured": dict(sorted(measured.items()))}


# --- pictures (Pillow only) ------------------------------------------------------------------------------------------

VIRIDIS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
GREY, WHITE, BLACK = (200, 200, 200), (255, 255, 255), (0, 0, 0)
SERIES_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
PAD, CAPTION_H = 8, 36  # side-by-side: margin between panels and the caption strip below them


def font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def colour(t: float) -> tuple[int, int, int]:
    """t in [0, 1] -> a viridis colour (linear between five anchors)."""
    t = min(max(t, 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(t), len(VIRIDIS) - 2)
    f = t - i
    return tuple(round(a + (b - a) * f) for a, b in zip(VIRIDIS[i], VIRIDIS[i + 1]))


HEATMAP_TYPES = ["adaLN_modulation.1", "attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj", "mlp.fc1", "mlp.fc2"]
SHORT = {"adaLN_modulation.1": "adaLN", "attn.qkv": "qkv", "attn.proj": "proj", "attn2.qkv": "qkv2",
         "attn2.proj": "proj2", "mlp.fc1": "fc1", "mlp.fc2": "fc2"}
CELL_W, CELL_H, LABEL_W, HEAD_H, LEGEND_H = 46, 18, 64, 64, 44


def heatmap_columns(model: nn.Module) -> list[tuple[str, str]]:
    """(stream, type) columns present in the model, image stream first."""
    have = {(s, t) for n, mod in model.named_modules() if isinstance(mod, (nn.Linear, FP8Linear))
            for b, s, t in [describe_layer(n)] if b is not None}
    return [(s, t) for s in ("x", "context") for t in HEATMAP_TYPES if (s, t) in have]


def heatmap_size(depth: int, n_cols: int) -> tuple[int, int]:
    panel = LABEL_W + n_cols * CELL_W
    return 2 * panel + 3 * PAD, HEAD_H + depth * CELL_H + LEGEND_H + 2 * PAD


def draw_heatmap(rows: list[dict], depth: int, columns: list[tuple[str, str]], title: str) -> Image.Image:
    """Two panels (isolated, propagated error, each aggregated over steps), blocks down, stream x type across, log
    colour scale shared by both; grey = not in FP8 (bf16 under this policy)."""
    vals = {(r["block"], r["stream"], r["type"]): (r.get("iso_rel_rms", math.nan), r.get("prop_rel_rms", math.nan))
            for r in rows if r["block"] != ""}
    finite = [v for pair in vals.values() for v in pair if math.isfinite(v) and v > 0]
    lo, hi = (math.log10(min(finite)), math.log10(max(finite))) if finite else (-3.0, 0.0)
    hi = hi if hi > lo else lo + 1
    W, H = heatmap_size(depth, len(columns))
    img = Image.new("RGB", (W, H), WHITE)
    d = ImageDraw.Draw(img)
    f = font(11)
    d.text((PAD, 4), title, fill=BLACK, font=font(12))
    panel_w = LABEL_W + len(columns) * CELL_W
    for p, label in enumerate(("isolated error (same input)", "propagated error (vs bf16 run)")):
        x0 = PAD + p * (panel_w + PAD)
        d.text((x0 + LABEL_W, 20), label, fill=BLACK, font=f)
        for c, (stream, kind) in enumerate(columns):
            cx = x0 + LABEL_W + c * CELL_W
            d.text((cx + 2, 36), "image" if stream == "x" else "text", fill=BLACK, font=f)
            d.text((cx + 2, 49), SHORT[kind], fill=BLACK, font=f)
        for b in range(depth):
            y = HEAD_H + b * CELL_H
            d.text((x0, y + 3), f"block {b}", fill=BLACK, font=f)
            for c, (stream, kind) in enumerate(columns):
                v = vals.get((b, stream, kind), (math.nan, math.nan))[p]
                fill = colour((math.log10(v) - lo) / (hi - lo)) if math.isfinite(v) and v > 0 else GREY
                cx = x0 + LABEL_W + c * CELL_W
                d.rectangle([cx, y, cx + CELL_W - 2, y + CELL_H - 2], fill=fill)
    ly = HEAD_H + depth * CELL_H + PAD
    bar_w = W - 2 * PAD - 120
    for i in range(bar_w):
        d.line([(PAD + i, ly), (PAD + i, ly + 12)], fill=colour(i / max(bar_w - 1, 1)))
    d.text((PAD, ly + 16), f"{10 ** lo:.2g}", fill=BLACK, font=f)
    d.text((PAD + bar_w - 40, ly + 16), f"{10 ** hi:.2g}", fill=BLACK, font=f)
    d.text((PAD + bar_w + 8, ly), "relative RMS", fill=BLACK, font=f)
    d.text((PAD + bar_w + 8, ly + 14), "(log scale)", fill=BLACK, font=f)
    d.rectangle([PAD + bar_w // 2 - 60, ly + 17, PAD + bar_w // 2 - 50, ly + 27], fill=GREY)
    d.text((PAD + bar_w // 2 - 46, ly + 16), "not in FP8 under this policy", fill=BLACK, font=f)
    return img


PLOT_SIZE = (720, 400)


def draw_step_plot(series: dict[str, list[float]], sigmas: list[float], title: str,
                   xlabel: str | None = None) -> Image.Image:
    """Lines of relative error vs denoising step (or, with xlabel, vs whatever the index is) on a log axis
    (non-positive or NaN points are left out)."""
    W, H = PLOT_SIZE
    L, R, T, B = 64, 250, 30, 44
    img = Image.new("RGB", (W, H), WHITE)
    d = ImageDraw.Draw(img)
    f = font(11)
    n = max(len(v) for v in series.values())
    pts = [v for vals in series.values() for v in vals if math.isfinite(v) and v > 0]
    lo = math.floor(math.log10(min(pts))) if pts else -3
    hi = math.ceil(math.log10(max(pts))) if pts else 0
    hi = hi if hi > lo else lo + 1
    X = lambda i: L + (W - L - R) * (i / max(n - 1, 1))
    Y = lambda v: T + (H - T - B) * (1 - (math.log10(v) - lo) / (hi - lo))
    d.text((L, 8), title, fill=BLACK, font=font(12))
    for e in range(lo, hi + 1):
        for m in (1, 2, 5) if hi - lo <= 2 else (1,):
            v = m * 10.0**e
            if 10.0**lo <= v <= 10.0**hi:
                d.line([(L, Y(v)), (W - R, Y(v))], fill=(225, 225, 225))
                d.text((8, Y(v) - 6), f"{m}e{e}", fill=BLACK, font=f)
    d.rectangle([L, T, W - R, H - B], outline=BLACK)
    for i in range(n):
        if n <= 15 or i % math.ceil(n / 15) == 0 or i == n - 1:
            d.text((X(i) - 4, H - B + 4), str(i + 1), fill=BLACK, font=f)
    d.text((L, H - 18), xlabel or (f"denoising step (sigma {sigmas[0]:.2f} -> {sigmas[-1]:.3f})" if sigmas
                                   else "step"), fill=BLACK, font=f)
    for k, (label, vals) in enumerate(series.items()):
        c = SERIES_COLOURS[k % len(SERIES_COLOURS)]
        xy = [(X(i), Y(v)) for i, v in enumerate(vals) if math.isfinite(v) and v > 0]
        if len(xy) > 1:
            d.line(xy, fill=c, width=2)
        for x, y in xy:
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=c)
        d.line([(W - R + 10, T + 8 + 16 * k), (W - R + 30, T + 8 + 16 * k)], fill=c, width=3)
        d.text((W - R + 34, T + 2 + 16 * k), label, fill=BLACK, font=f)
    return img


def panel_scale(w: int, h: int) -> int:
    """Integer upscaling (nearest) so that small images are at least 256 px on their short side."""
    return max(1, math.ceil(256 / min(w, h)))


def side_by_side_size(w: int, h: int, n: int = 3) -> tuple[int, int]:
    k = panel_scale(w, h)
    return n * w * k + (n + 1) * PAD, h * k + 2 * PAD + CAPTION_H


def draw_side_by_side(images: list[Image.Image], labels: list[str], caption: str) -> Image.Image:
    w, h = images[0].size
    k = panel_scale(w, h)
    W, H = side_by_side_size(w, h, len(images))
    out = Image.new("RGB", (W, H), WHITE)
    d = ImageDraw.Draw(out)
    f = font(12)
    for i, (im, label) in enumerate(zip(images, labels)):
        x = PAD + i * (w * k + PAD)
        out.paste(im.convert("RGB").resize((w * k, h * k), Image.NEAREST), (x, PAD))
        d.text((x, h * k + PAD + 2), label, fill=BLACK, font=f)
    d.text((PAD, h * k + PAD + 18), caption, fill=BLACK, font=f)
    return out


def amplified_difference(a: np.ndarray, b: np.ndarray) -> tuple[Image.Image, int]:
    """|a - b| per channel, multiplied so that its 99.9th percentile reaches ~255 (factor 1..64, reported)."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    p = float(np.percentile(diff, 99.9))
    amp = int(min(max(255 // max(p, 1.0), 1), 64))
    return Image.fromarray(np.clip(diff * amp, 0, 255).astype(np.uint8)), amp


# --- writing the files -----------------------------------------------------------------------------------------------

def _clean(v):
    """JSON has no NaN/Inf: None instead; floats rounded to 6 significant digits for readable files."""
    if isinstance(v, float):
        return float(f"{v:.6g}") if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def csv_text(rows: list[dict], columns: list[str] | None = None) -> str:
    """CSV with 6 significant digits; an empty cell means 'does not apply' (NaN: e.g. activation scales of a
    weight-only layer, whose activations are never quantised)."""
    cols = columns or list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6g}"
                        if isinstance(v, float) else v) for k, v in r.items() if k in cols})
    return buf.getvalue()


class Writer:
    """Writes the audit's files atomically into out_dir; refuses (before any work) to overwrite without force."""

    def __init__(self, out_dir: str | Path, names: list[str], force: bool):
        self.dir, self.force = Path(out_dir), force
        existing = [n for n in names if (self.dir / n).exists()]
        if existing and not force:
            raise InputError(f"{self.dir} already holds {list_keys(existing, 4)} from an earlier audit; pass --force "
                             f"(force=True) to overwrite, or choose another output folder")
        self.written: list[str] = []

    def text(self, name: str, text: str) -> None:
        write_atomic(self.dir / name, lambda tmp: Path(tmp).write_text(text), force=self.force)
        self.written.append(name)

    def png(self, name: str, img: Image.Image) -> None:
        write_atomic(self.dir / name, lambda tmp: img.save(tmp, format="PNG"), force=self.force, suffix=".png")
        self.written.append(name)


def output_names(compare: bool, sens: bool) -> list[str]:
    names = ["layers.csv", "layer_steps.csv", "steps.csv", "summary.json", "report.txt", "heatmap.png",
             "error_vs_step.png", "images.png", "bf16.png", "fp8.png"]
    return names + (["compare.csv", "compare.png"] if compare else []) + (
        ["sensitivity.csv", "suggested_policy.json"] if sens else [])


LAYER_COLUMNS = ["layer", "block", "stream", "type", "recipe", "shape", "w_amax", "w_scale_min", "w_scale_max",
                 "w_rel_rms", "w_chan_rel_rms_max", "w_saturated", "w_flushed", "w_subnormal", "bytes_bf16",
                 "bytes_fp8", "act_amax", "act_rms", "act_outlier", "act_scale_min", "act_scale_max", "act_saturated",
                 "act_flushed", "act_subnormal", "iso_rel_rms", "iso_max_abs", "prop_rel_rms", "prop_max_abs",
                 "sensitivity", "sensitivity_rank"]


def table(rows: list[dict], top: int, res: PolicyResult) -> str:
    """The terminal table: the `top` layers by propagated error, then totals."""
    def fmt(v, spec):
        return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)

    head = (f"{'layer':<40} {'recipe':<11} {'w err':>7} {'act amax':>9} {'amax/rms':>8} {'flush%':>7} "
            f"{'iso err':>8} {'prop err':>8}")
    lines = [head, "-" * len(head)]
    order = sorted(rows, key=lambda r: -r.get("prop_rel_rms", 0) if math.isfinite(r.get("prop_rel_rms", 0)) else 0)
    for r in order[:top]:
        fl = r.get("act_flushed", math.nan)
        lines.append(f"{r['layer'][:40]:<40} {r['recipe']:<11} {fmt(r['w_rel_rms'], '7.4f')} "
                     f"{fmt(r.get('act_amax'), '9.3g')} {fmt(r.get('act_outlier'), '8.1f')} "
                     f"{fmt(100 * fl if math.isfinite(fl) else None, '7.3f')} {fmt(r.get('iso_rel_rms'), '8.4f')} "
                     f"{fmt(r.get('prop_rel_rms'), '8.4f')}")
    if len(order) > top:
        lines.append(f"... {len(order) - top} more layers in layers.csv")
    b16, b8 = sum(r["bytes_bf16"] for r in rows), sum(r["bytes_fp8"] for r in rows)
    lines.append(f"{len(rows)} FP8 layers ({res.report}); their weights {b16 / 2**20:.2f} MiB -> {b8 / 2**20:.2f} MiB")
    return "\n".join(lines)


# --- the audit -------------------------------------------------------------------------------------------------------

# --- FP8 attention -----------------------------------------------------------------------------------------------


def attention_audit(model: nn.Module, inputs: tuple, out_dir: str | Path | None = None) -> dict:
    """What FP8 attention (fast.py, attention="fp8": E4M3 Q, K, P, V) does to one denoising step of `model` (an
    MMDiT, bf16 or FP8-quantised) on inputs (x, t, context, pooled).

    Per attention layer ("isolated"): the layer's bf16 q, k, v from the reference run are quantised as the FP8 path
    quantises them (q, k with the static RMSNorm-bound scales of fast.qk_fp8_scale, v per tensor) and the FP8
    attention output is compared with the bf16 one, by relative RMS error. Next to it, what explains it: the
    spread of the logits (a logit error is proportional to the logit, and softmax turns logit errors into output
    errors in proportion to how peaked it is), how much of the static range q and k use (amax / (448 * scale);
    the bound is reached only by a one-hot row) and the share of q and k codes that fall below E4M3's normal range.
    For the whole step ("propagated"): the step output with attention="fp8" against the same model with SDPA.
    Writes attention.json and attention.png (errors per layer) into out_dir when given."""
    from .fast import FastMMDiT, fp8_attention

    rows = []
    fast8 = FastMMDiT(model, attention="fp8", fuse_adaln=False)  # its static q / k scales, and the propagated run

    def probe(name, modules, q, k, v, out):
        row = {"layer": name, "L": q.shape[2]}
        scales = fast8.fp8_scales(*modules)
        if scales is None:
            rows.append({**row, "fp8": False})  # no QK norm: fast.py keeps this layer's Q K^T in bf16
            return
        sq_t, sk_t = scales[2:]
        q8, _ = quantize_act(q, per_token=False, scale=sq_t)
        k8, _ = quantize_act(k, per_token=False, scale=sk_t)
        o8 = fp8_attention(q8, k8, v, sq_t, sk_t)
        n = min(q.shape[2], 512)  # logit statistics on the first 512 queries of the first sample against all keys
        logits = (q[:1, :, :n].float() @ k[:1].float().transpose(2, 3)) / math.sqrt(q.shape[-1])
        rows.append({**row, "fp8": True, "rel_rms": rel_rms(o8, out), "logit_std": float(logits.std()),
                     "logit_max": float(logits.abs().max()),
                     "q_range_used": float(q.abs().amax() / (E4M3_MAX * sq_t)),
                     "k_range_used": float(k.abs().amax() / (E4M3_MAX * sk_t)),
                     "q_subnormal": float((q8.float().abs() < SUBNORMAL_MAX).float().mean()),
                     "k_subnormal": float((k8.float().abs() < SUBNORMAL_MAX).float().mean())})

    with torch.inference_mode():
        ref = FastMMDiT(model, fuse_adaln=False)
        ref.probe = probe
        want = ref(*inputs)
        got = fast8(*inputs)
    res = {"layers": rows, "step_rel_rms": rel_rms(got, want),
           "max_layer_rel_rms": max((r["rel_rms"] for r in rows if r["fp8"]), default=None)}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "attention.json").write_text(json.dumps(res, indent=1))
        fp8_rows = [r for r in rows if r["fp8"]]
        series = {"FP8 attention rel RMS": [r["rel_rms"] for r in fp8_rows],
                  "logit std / 10": [r["logit_std"] / 10 for r in fp8_rows],
                  "q range used": [r["q_range_used"] for r in fp8_rows]}
        title = f"FP8 attention per layer; whole step rel RMS {res['step_rel_rms']:.3g}"
        draw_step_plot(series, [], title, xlabel="attention layer (block order)").save(out / "attention.png")
    return res


def run_audit(pipe_or_path, policy: str | Policy | list = "default", prompt: str = DEFAULT_PROMPT, seed: int = 0,
              steps: int | None = None, height: int | None = None, width: int | None = None,
              out_dir: str | Path = "fp8-audit", device: str | torch.device | None = None,
              dtype: torch.dtype = torch.bfloat16, *, negative: str = "", guidance: float | None = None,
              compare: list[str] | tuple[str, ...] = (), sensitivity_by: str | None = None,
              sensitivity_steps: int | None = None, target: float | None = None, runs_per_batch: int | None = None,
              top: int = 20, force: bool = False, t5: bool = True, sampler: str | None = None,
              verbose: bool = True) -> dict:
    """Audit `policy` on a pipeline (or a model path, loaded here in `dtype` on `device`) and write the files of the
    module docstring into out_dir. compare: more policies audited on the same prompt and noise (compare.csv/png).
    sensitivity_by ('layer', 'type' or 'block'): final-latent error with only that unit in FP8, ranked, and a
    suggested policy (bf16 for the fewest most-sensitive units) reaching `target` (relative RMS of the final latents
    vs bf16; default half the error of `policy`), measured with `sensitivity_steps` steps (default `steps`) and
    verified at `steps`. Returns the summary (also written as summary.json)."""
    from .pipeline import Pipeline, load_pipeline

    t_start = time.perf_counter()
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if verbose else quiet
    pol = get_policy(policy)
    compare_pols = [get_policy(p) for p in compare if get_policy(p).name != pol.name]
    writer = Writer(out_dir, output_names(bool(compare_pols), sensitivity_by is not None), force)
    if sensitivity_by is not None:
        group_of("joint_blocks.0.x_block.mlp.fc1", sensitivity_by)  # fail early on a bad grouping
    if isinstance(pipe_or_path, Pipeline):
        pipe, source = pipe_or_path, pipe_or_path.source
    else:
        pipe = load_pipeline(pipe_or_path, dtype=dtype, device=device, t5=t5, fast=False)  # the plain forward
        source = str(pipe_or_path)
    d = pipe.defaults
    steps = d.steps if steps is None else steps
    height, width = height or d.height, width or d.width
    guidance = d.guidance if guidance is None else guidance
    per_batch = runs_per_batch or (8 if pipe.device.type == "cuda" else 32)
    if per_batch < 2:
        raise InputError(f"runs_per_batch must be >= 2 (the reference and one FP8 run), got {per_batch}")
    linears = [n for n, m in pipe.mmdit.named_modules() if isinstance(m, (nn.Linear, FP8Linear))]
    if all(pol.recipe_for(n)[0] == "bf16" for n in linears):
        raise InputError(f"policy {pol.name!r} puts none of this MMDiT's {len(linears)} linear layers in FP8: nothing "
                         f"to audit; choose default, row, tensor, weight-only or a policy file with FP8 rules")
    inp = prepare_inputs(pipe, prompt, negative, seed, steps, height, width, guidance, sampler)
    plan = file_weights(pipe)

    results = []
    for p in [pol] + compare_pols:
        t0 = time.perf_counter()
        results.append(audit_policy(pipe, p, inp, plan, say))
        say(f"audit: policy {p.name!r}: {results[-1].report}; {time.perf_counter() - t0:.1f} s")
    main = results[0]
    bf16_img = pipe.decode(main.latents_ref)[0]
    a_ref = np.asarray(bf16_img.convert("RGB"))
    per_policy = []
    for res in results:
        img = pipe.decode(res.latents_fp8)[0]
        arr = np.asarray(img.convert("RGB"))
        per_policy.append({"policy": res.policy.name, "image": img, "latent_rel_rms": rel_rms(res.latents_fp8,
                                                                                               res.latents_ref),
                           "psnr_db": psnr(arr, a_ref), "ssim": ssim(arr, a_ref), "weight_bytes": res.weight_bytes,
                           "finite": all(s["finite"] for s in res.steps),
                           "fp8_layers": len(res.layers), "report": res.report})
    model_level = per_policy[0]

    # sensitivity runs on the main policy's quantisation
    sens_rows, suggestion = None, None
    if sensitivity_by is not None:
        restore_bf16(pipe.mmdit)
        quantize_like_loader(pipe.mmdit, pol, plan)
        s_steps = sensitivity_steps or steps
        s_inp = inp if s_steps == steps else inp.with_steps(s_steps, d.shift)
        t0 = time.perf_counter()
        full = model_level["latent_rel_rms"] if s_steps == steps else run_errors(
            pipe.mmdit, s_inp, [frozenset(fp8_layers(pipe.mmdit))], per_batch)[0]
        sens_rows = sensitivity(pipe, s_inp, sensitivity_by, per_batch, say)
        say(f"audit: sensitivity by {sensitivity_by} ({len(sens_rows)} units, {s_steps} steps): "
            f"{time.perf_counter() - t0:.1f} s")
        tgt = target if target is not None else full / 2
        say(f"audit: searching the fewest most-sensitive units to keep in bf16 for error <= {tgt:.4g}")
        suggestion = suggest(pipe, s_inp, sens_rows, tgt, per_batch, full, say)
        keep_rules = [(g, "bf16") for g in suggestion["globs"]]
        suggested = Policy(f"{pol.name}-audited", keep_rules + list(pol.rules))
        kept = frozenset(suggestion["layers_kept"])
        verified = run_errors(pipe.mmdit, inp, [frozenset(fp8_layers(pipe.mmdit)) - kept], per_batch)[0]
        suggestion.update(policy=json.loads(suggested.to_json()), verified_error=verified, verified_steps=steps,
                          search_steps=s_steps, weight_bytes=model_bytes(pipe.mmdit, suggested), by=sensitivity_by)
        sens_of = {n: (r["final_rel_rms"], r["rank"]) for r in sens_rows for n in r["layers"]}
        if sensitivity_by == "layer":
            for r in main.layers:
                r["sensitivity"], r["sensitivity_rank"] = sens_of.get(r["layer"], (math.nan, ""))
        say(f"audit: suggested policy: {len(suggestion['units'])} unit(s) kept in bf16, final latents error "
            f"{verified:.4g} at {steps} steps")

    # --- files
    sens_cols = ("sensitivity", "sensitivity_rank")
    writer.text("layers.csv", csv_text(main.layers, [c for c in LAYER_COLUMNS if c not in sens_cols
                                                     or any(c in r for r in main.layers)]))
    writer.text("layer_steps.csv", csv_text(main.layer_steps))
    writer.text("steps.csv", csv_text(main.steps))
    depth = pipe.mmdit.cfg.depth
    cols = heatmap_columns(pipe.mmdit)
    writer.png("heatmap.png", draw_heatmap(main.layers, depth, cols, f"FP8 policy {pol.name!r}: relative RMS error "
                                                                     f"of each linear's output, all steps"))
    med = lambda vals: float(np.median(vals)) if vals else math.nan
    by_step = lambda key: [med([r[key] for r in main.layer_steps if r["step"] == s["step"]
                                and math.isfinite(r[key])]) for s in main.steps]
    series = {"latents after the step": [s["latent_rel_rms"] for s in main.steps],
              "velocity (guided)": [s["velocity_rel_rms"] for s in main.steps],
              "layer outputs, propagated (median)": by_step("prop_rel_rms"),
              "layer outputs, isolated (median)": by_step("iso_rel_rms")}
    writer.png("error_vs_step.png", draw_step_plot(series, [s["sigma"] for s in main.steps],
                                                   f"FP8 policy {pol.name!r} vs bf16: relative RMS error per step"))
    diff, amp = amplified_difference(np.asarray(model_level["image"].convert("RGB")), a_ref)
    cap = (f"PSNR {model_level['psnr_db']:.2f} dB, SSIM {model_level['ssim']:.4f}, final latents rel. RMS "
           f"{model_level['latent_rel_rms']:.4f}")
    writer.png("images.png", draw_side_by_side([bf16_img, model_level["image"], diff],
                                               ["bf16", f"FP8 {pol.name}", f"|difference| x{amp}"], cap))
    writer.png("bf16.png", bf16_img)
    writer.png("fp8.png", model_level["image"])
    if compare_pols:
        rows = []
        by_name = [{r["layer"]: r for r in res.layers} for res in results]
        for name in dict.fromkeys(n for res in results for n in (r["layer"] for r in res.layers)):
            b, s, t = describe_layer(name)
            row = {"layer": name, "block": "" if b is None else b, "stream": s, "type": t}
            for res, lay in zip(results, by_name):
                r = lay.get(name, {})
                p = res.policy.name
                row |= {f"{p}:recipe": r.get("recipe", "bf16"), f"{p}:w_rel_rms": r.get("w_rel_rms"),
                        f"{p}:iso_rel_rms": r.get("iso_rel_rms"), f"{p}:prop_rel_rms": r.get("prop_rel_rms")}
            rows.append(row)
        writer.text("compare.csv", csv_text(rows))
        imgs = [bf16_img] + [p["image"] for p in per_policy]
        labels = ["bf16"] + [f"{p['policy']}: {p['psnr_db']:.1f} dB" for p in per_policy]
        writer.png("compare.png", draw_side_by_side(imgs, labels, "same prompt, seed and noise; PSNR vs bf16"))
    if sens_rows is not None:
        writer.text("sensitivity.csv", csv_text([{k: v for k, v in r.items() if k != "layers"} for r in sens_rows]))
        writer.text("suggested_policy.json", json.dumps(suggestion["policy"], indent=1) + "\n")

    # --- summary and report
    mem = {name: model_bytes(pipe.mmdit, get_policy(name)) for name in MMDIT_POLICIES}
    mem |= {p.name: model_bytes(pipe.mmdit, p) for p in [pol] + compare_pols}
    if suggestion:
        mem[suggestion["policy"]["name"]] = suggestion["weight_bytes"]
    ranked = sorted(main.layers, key=lambda r: -r["prop_rel_rms"] if math.isfinite(r.get("prop_rel_rms", math.nan))
                    else 0)
    summary = {
        "model": source, "device": str(pipe.device), "dtype": str(pipe.dtype).removeprefix("torch."),
        "policy": json.loads(pol.to_json()), **inp.settings, "fp8_layers": len(main.layers),
        "quantized": main.report, "latent_rel_rms": model_level["latent_rel_rms"],
        "psnr_db": model_level["psnr_db"], "ssim": model_level["ssim"], "finite": model_level["finite"],
        "weight_bytes": mem,
        "latent_drift_per_step": [s["latent_rel_rms"] for s in main.steps],
        "velocity_rel_rms_per_step": [s["velocity_rel_rms"] for s in main.steps],
        "top_layers": [{"layer": r["layer"], "recipe": r["recipe"], "prop_rel_rms": r.get("prop_rel_rms"),
                        "iso_rel_rms": r.get("iso_rel_rms"), "w_rel_rms": r["w_rel_rms"]} for r in ranked[:top]],
        "compare": [{k: v for k, v in p.items() if k != "image"} for p in per_policy] if compare_pols else None,
        "sensitivity": None if sens_rows is None else {
            "by": sensitivity_by, "steps": suggestion["search_steps"],
            "ranked": [{k: r[k] for k in ("unit", "final_rel_rms", "n_layers")} for r in sens_rows[:top]]},
        "suggested_policy": None if suggestion is None else {
            k: suggestion[k] for k in ("policy", "units", "target", "error", "verified_error", "verified_steps",
                                       "weight_bytes")} | {"file": str(writer.dir / "suggested_policy.json")},
        "seconds": time.perf_counter() - t_start, "out_dir": str(writer.dir),
        "versions": {"minisd35": __version__, "torch": torch.__version__}, "fp8_impl": resolve_impl(pipe.device),
        "gpu": torch.cuda.get_device_name(pipe.device) if pipe.device.type == "cuda" else None,
    }
    report = [table(main.layers, top, main), ""]
    report.append(f"final latents: relative RMS {model_level['latent_rel_rms']:.5f} vs bf16; image PSNR "
                  f"{model_level['psnr_db']:.2f} dB, SSIM {model_level['ssim']:.4f}")
    report.append("latent drift per step: " + " ".join(f"{v:.3g}" for v in summary["latent_drift_per_step"]))
    report.append("MMDiT weights: " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in mem.items()))
    if compare_pols:
        report += ["", f"{'policy':<14} {'FP8 layers':>10} {'latents err':>11} {'PSNR dB':>8} {'SSIM':>7} "
                       f"{'weights MiB':>11}"]
        for p in per_policy:
            report.append(f"{p['policy']:<14} {p['fp8_layers']:>10} {p['latent_rel_rms']:>11.5f} "
                          f"{p['psnr_db']:>8.2f} {p['ssim']:>7.4f} {p['weight_bytes'] / 2**20:>11.2f}")
    if suggestion:
        report += ["", f"most sensitive ({sensitivity_by}, only it in FP8 -> final latents error): " + ", ".join(
            f"{r['unit']} {r['final_rel_rms']:.4g}" for r in sens_rows[:5])]
        report.append(f"suggested: keep {suggestion['k']} unit(s) in bf16 ({', '.join(suggestion['units']) or 'none'}"
                      f") -> error {suggestion['verified_error']:.5f} (target {suggestion['target']:.5f}); "
                      f"{writer.dir / 'suggested_policy.json'}")
    text = "\n".join(report)
    writer.text("report.txt", text + "\n")
    summary["files"] = writer.written + ["summary.json"]
    summary = _clean(summary)
    writer.text("summary.json", json.dumps(summary, indent=1) + "\n")
    if verbose:
        print(text)
    restore_bf16(pipe.mmdit)
    return summary


# --- command line ----------------------------------------------------------------------------------------------------

def cmd_audit(args) -> int:
    from .cli import DTYPES, model_path

    compare = [p.strip() for p in args.compare.split(",") if p.strip()] if args.compare else []
    summary = run_audit(model_path(args), args.policy, args.prompt if args.prompt is not None else DEFAULT_PROMPT,
                        args.seed, args.steps, args.height, args.width, args.out, args.device, DTYPES[args.dtype],
                        negative=args.negative, guidance=args.guidance, compare=compare,
                        sensitivity_by=args.sensitivity, sensitivity_steps=args.sensitivity_steps, target=args.target,
                        runs_per_batch=args.runs_per_batch, top=args.top, force=args.force, t5=not args.no_t5,
                        sampler=args.sampler)
    print(json.dumps(summary))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("audit", help="per-layer FP8 audit: bf16 vs an FP8 policy, every layer and step")
    a.add_argument("prompt", nargs="?", help=f"default: {DEFAULT_PROMPT!r}")
    a.add_argument("-n", "--negative", default="")
    src = a.add_mutually_exclusive_group()
    src.add_argument("--weights", help="a diffusers model root, or a Stability .safetensors file (bf16/fp16)")
    src.add_argument("--model", choices=["tiny", "shapes"], help="a built-in model")
    a.add_argument("--policy", default="default", help="FP8 policy: default, row, tensor, weight-only or a .json file")
    a.add_argument("--compare", help="more policies on the same prompt and noise, comma-separated "
                                     "(e.g. row,tensor,weight-only): compare.csv and compare.png")
    a.add_argument("--sensitivity", nargs="?", const="layer", choices=["layer", "type", "block"],
                   help="final-latent error with only one layer (or group: type, block) in FP8, ranked, and a "
                        "suggested policy file (default grouping: layer)")
    a.add_argument("--sensitivity-steps", type=int, help="steps for the sensitivity runs (default: --steps)")
    a.add_argument("--target", type=float, help="final latents relative RMS error the suggested policy must reach "
                                                "(default: half of the policy's)")
    a.add_argument("--runs-per-batch", type=int, help="trajectories per batched run (default 8 on CUDA, 32 on CPU)")
    a.add_argument("-H", "--height", type=int)
    a.add_argument("-W", "--width", type=int)
    a.add_argument("--steps", type=int)
    a.add_argument("--guidance", "--cfg", type=float)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--sampler", choices=["euler", "dpmpp_2m"])
    a.add_argument("-o", "--out", default="fp8-audit", help="output folder (default fp8-audit)")
    a.add_argument("--top", type=int, default=20, help="layers shown in the table")
    a.add_argument("--force", action="store_true", help="overwrite the files of an earlier audit in --out")
    a.add_argument("--no-t5", action="store_true")
    a.add_argument("--device")
    a.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    a.set_defaults(func=cmd_audit)
