"""Train the `shapes` model: SD3's architecture at toy size, trained on pictures minisd35 draws itself
(minisd35/shapes.py), written with minisd35's own writers so that it loads through exactly the loaders real SD3.5
files use. The only place in minisd35 that needs autograd.

    python weights/train_shapes.py --device cuda --minutes 7 --out /tmp/shapes --bundle $OUT     # one GPU, ~8 min
    python weights/train_shapes.py --device cpu --minutes 30 --out weights/shapes                # the CPU fallback

Stages, each time-boxed so that the whole run ends within --minutes and always saves and evaluates:

1. data      N pictures (64 x 64) of random training scenes with random captions, drawn with Pillow in worker
             processes; held-out combinations are never drawn (shapes.is_heldout).
2. text      CLIP-L, CLIP-G and T5 of the `shapes` preset with random weights, FROZEN: written once with
             text.write_random_text_encoders, loaded back with load_text_encoders, every caption encoded once. Why
             frozen: the caption language is ~40 words, each a single token; random embeddings already tell every
             word apart and the MMDiT's joint attention learns to read them. Training the encoders would cost
             time and buy nothing the judge can measure (and frozen random encoders keep their files trivially
             reproducible).
3. VAE       SD3's 16-channel AutoencoderKL at toy width and with 3 levels (4x down, SD3: 8x: a small shape spans
             4x4 latents, which makes both the autoencoder and the diffusion model learn much faster), trained as
             an autoencoder: L1 + L2 reconstruction plus a small KL term, posterior std initialised near 0. Then
             scaling_factor / shift_factor are set from the statistics of the trained latents (latents =
             (z - shift) * scale has mean 0, variance 1, as SD3's 1.5305 / 0.0609 do for its VAE), and the VAE is
             written (bf16) and read back to encode the whole dataset once.
4. MMDiT     rectified flow as SD3 trains it: x_t = (1 - t) x0 + t eps, target v = eps - x0, t ~ logit-normal(0, 1),
             plain MSE; 10% of captions dropped to "" (the empty prompt the pipeline encodes as the negative) so that
             classifier-free guidance works; AdamW, warm-up then cosine decay; an EMA of the weights is what ships.
5. save      transformer/ (diffusers layout) and sd3_shapes.safetensors (Stability single file, the same EMA
             weights), bf16, via weights.save_mmdit; scheduler/, model_index.json, tokenizers; a model card.
6. evaluate  load the written folder with minisd35.load_pipeline (the real loaders) and score prompt adherence with
             the judge on the held-out prompt sets; a picture grid. The sampler sweep that chose the preset's
             defaults is not part of the timed run: `--evaluate-only` runs it on a trained root (any device).

Time boxing: each training stage runs a few steps, measures the step time and fixes its number of steps from its
share of the remaining time; the LR schedule follows that step count, so the run is reproducible from the seed and
the printed step counts (--vae-steps / --mmdit-steps fix them). A stage that is still running at its deadline
stops and the run goes on; an exception in evaluation is logged and the files are still written.

Output: --out is the diffusers model root (weights/shapes when training locally). --bundle DIR additionally packs
it for transport as DIR/shapes.tar.gz (split into 15 MiB parts shapes.tar.gz.00, .01, ... if larger; join with
cat) plus DIR/train_log.json, DIR/train.log and DIR/samples.png.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import json
import math
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from minisd35 import shapes as S  # noqa: E402
from minisd35.checkpoint import save_safetensors  # noqa: E402
from minisd35.config import get_preset  # noqa: E402
from minisd35.mmdit import MMDiT  # noqa: E402
from minisd35.weights import save_mmdit, sincos_pos_table  # noqa: E402

PRESET = get_preset("shapes")
# Settings per device: (training pictures, VAE batch, MMDiT batch, MMDiT peak LR, share of the training time for the
# VAE). The CPU column is the fallback schedule: ~20-30 minutes on 2 cores.
SETTINGS = {"cuda": dict(images=100_000, vae_batch=128, batch=1024, lr=1e-3, vae_share=0.25, stats=4096,
                         probes=5, probe_prompts=32),
            "cpu": dict(images=8_000, vae_batch=8, batch=32, lr=4e-4, vae_share=0.3, stats=1024,
                        probes=2, probe_prompts=16)}
LOG: list[str] = []


def log(msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    LOG.append(line)


# ---------------------------------------------------------------------------------------------------------------------
# 1. Data

def _render_chunk(job: tuple[list[S.Scene], int]) -> np.ndarray:
    scenes, seed = job
    return S.render_batch(scenes, seed)


def make_data(n: int, seed: int, workers: int) -> tuple[torch.Tensor, list[str], list[S.Scene]]:
    """uint8 pictures [n, 3, 64, 64], their captions and scenes; deterministic in `seed` (not in `workers`)."""
    rng = random.Random(seed)
    scenes = [S.random_scene(rng) for _ in range(n)]
    captions = [S.random_caption(s, rng) for s in scenes]
    chunk = 500
    jobs = [(scenes[i : i + chunk], seed * 100_003 + i) for i in range(0, n, chunk)]
    if workers > 1:  # fork: started before anything touches CUDA
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_render_chunk, jobs)
    else:
        parts = [_render_chunk(j) for j in jobs]
    images = torch.from_numpy(np.concatenate(parts)).permute(0, 3, 1, 2).contiguous()
    return images, captions, scenes


def to_unit(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float() / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------------------------------
# Helpers: time-boxed training loops

class Schedule:
    """Linear warm-up, then cosine decay to `floor` x peak over `total` steps. `total` is set once known (after the
    calibration steps, which lie inside the warm-up, so a run with a fixed step count follows the same curve)."""

    def __init__(self, peak: float, warmup: int, floor: float = 0.1):
        self.peak, self.warmup, self.floor, self.total = peak, warmup, floor, None

    def __call__(self, step: int) -> float:
        if step < self.warmup or self.total is None:
            return self.peak * min(1.0, (step + 1) / self.warmup)
        p = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.peak * (self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * p)))


class Guard:
    """Every `every` steps: if the losses since the last check are finite, snapshot the modules and the optimizer
    state (on the device: a few MB); if not, roll back to the last snapshot. This replaces a per-step
    `float(loss)` check, whose host-device sync would stall the GPU every step."""

    def __init__(self, modules: list[torch.nn.Module], opt, every: int = 50):
        self.modules, self.opt, self.every, self.rollbacks = modules, opt, every, 0
        self.snap = None

    def save(self) -> None:
        self.snap = ([{k: v.detach().clone() for k, v in m.state_dict().items()} for m in self.modules],
                     copy.deepcopy(self.opt.state_dict()))

    def restore(self) -> None:
        if self.snap is not None:
            for m, sd in zip(self.modules, self.snap[0]):
                m.load_state_dict(sd)
            self.opt.load_state_dict(self.snap[1])
        self.rollbacks += 1


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run_loop(name: str, step_fn, budget_s: float, fixed_steps: int | None, sched: Schedule, guard: Guard,
             curve: list, dev: torch.device, calib: int = 30, log_every_s: float = 15.0) -> int:
    """Call step_fn(step) -> detached loss tensor until the step count (fixed, or measured from steps 5..5+calib and
    the budget) is reached or the budget runs out. Returns the number of steps done."""
    t0 = time.perf_counter()
    deadline = t0 + budget_s
    total = fixed_steps
    sched.total = total
    step, last_log, t_calib = 0, t0, None
    window = torch.zeros((), device=dev)  # loss sum since the last guard check
    logged, n_logged = 0.0, 0  # finite loss sums since the last log line
    guard.save()
    while total is None or step < total:
        if time.perf_counter() > deadline:
            log(f"{name}: time budget reached at step {step}" + (f" of {total}" if total else ""))
            break
        for g in guard.opt.param_groups:
            g["lr"] = sched(step)
        window += step_fn(step)
        step += 1
        if step % guard.every == 0 or step == total:
            w = float(window)  # the only host-device sync
            n = (step - 1) % guard.every + 1
            if math.isfinite(w):
                guard.save()
                logged, n_logged = logged + w, n_logged + n
            else:
                guard.restore()
                log(f"{name}: non-finite loss in steps {step - n + 1}..{step}; rolled back to step {step - n}")
            window.zero_()
        if step == 5:
            sync(dev)
            t_calib = time.perf_counter()
        if total is None and step == 5 + calib:
            sync(dev)
            per_step = (time.perf_counter() - t_calib) / calib
            total = max(step + 1, int((deadline - t0) / per_step * 0.97))
            sched.total = total
            log(f"{name}: {per_step * 1000:.1f} ms/step -> {total} steps in {budget_s:.0f} s")
        now = time.perf_counter()
        if n_logged and (now - last_log > log_every_s or step == total):
            mean = logged / n_logged
            curve.append({"step": step, "loss": round(mean, 6), "lr": sched(step - 1), "s": round(now - t0, 1)})
            eta = (total - step) * (now - t0) / step if total else float("nan")
            log(f"{name} step {step}/{total or '?'}  loss {mean:.5f}  lr {sched(step - 1):.2e}  {now - t0:.0f}s "
                f"elapsed, ETA {eta:.0f}s" + (f"  ({guard.rollbacks} roll-backs)" if guard.rollbacks else ""))
            logged, n_logged, last_log = 0.0, 0, now
    return step


# ---------------------------------------------------------------------------------------------------------------------
# 3. VAE

def train_vae(images: torch.Tensor, dev: torch.device, budget_s: float, steps: int | None, batch: int, seed: int,
              curve: list, kl_weight: float = 1e-4):
    from minisd35.vae import VAE

    torch.manual_seed(seed)
    vae = VAE(PRESET.vae)
    with torch.no_grad():
        # Start the posterior almost deterministic (std e^-4 = 0.02): with PyTorch's default init logvar ~ 0, i.e.
        # unit noise on latents that are still tiny, and the decoder would first spend thousands of steps learning
        # to see through it. The KL term then lets the std grow where the decoder does not care.
        half = PRESET.vae.latent_channels
        vae.encoder.conv_out.weight[half:].zero_()
        vae.encoder.conv_out.bias[half:].fill_(-8.0)
    vae.to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0)
    sched = Schedule(1e-3, warmup=50, floor=0.05)
    gen = torch.Generator().manual_seed(seed)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()

    def step_fn(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        x = to_unit(images[idx].to(dev, non_blocking=True))
        with amp:
            mean, logvar = vae.encoder(x).float().chunk(2, dim=1)
            logvar = logvar.clamp(-30.0, 20.0)
            z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
            rec = vae.decoder(z).float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        loss = (rec - x).abs().mean() + (rec - x).pow(2).mean() + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        return loss.detach()

    guard = Guard([vae], opt, every=50 if dev.type == "cuda" else 10)
    n = run_loop("vae", step_fn, budget_s, steps, sched, guard, curve, dev)
    return vae.eval().requires_grad_(False), n


@torch.no_grad()
def latent_stats(vae, images: torch.Tensor, dev: torch.device, n: int = 4096) -> tuple[float, float]:
    """(shift, scale) so that (z - shift) * scale has mean 0 and std 1 over sampled latents z of n pictures."""
    g = torch.Generator().manual_seed(0)
    zs = []
    for i in range(0, min(n, len(images)), 256):
        mean, logvar = vae.encoder(to_unit(images[i : i + 256].to(dev))).float().chunk(2, dim=1)
        zs.append(mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn(mean.shape, generator=g).to(dev))
    z = torch.cat(zs)
    return float(z.mean()), float(1.0 / z.std())


def write_vae(vae, folder: Path, shift: float, scale: float):
    from minisd35.vae import diffusers_config

    cfg = dataclasses.replace(PRESET.vae, scaling_factor=round(scale, 5), shift_factor=round(shift, 5))
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(torch.bfloat16) for k, v in vae.state_dict().items()}
    save_safetensors(state, folder / "diffusion_pytorch_model.safetensors", force=True)
    (folder / "config.json").write_text(json.dumps(diffusers_config(cfg), indent=2))
    return cfg


@torch.no_grad()
def encode_dataset(vae, images: torch.Tensor, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled latent means and stds [N, 16, 16, 16] (fp32, on dev) from the VAE as written (bf16 weights)."""
    c = vae.config
    means, stds = [], []
    for i in range(0, len(images), 512):
        mean, logvar = vae.encoder(to_unit(images[i : i + 512].to(dev)).to(vae.dtype)).float().chunk(2, dim=1)
        means.append((mean - c.shift_factor) * c.scaling_factor)
        stds.append(torch.exp(0.5 * logvar.clamp(-30, 20)) * c.scaling_factor)
    return torch.cat(means), torch.cat(stds)


# ---------------------------------------------------------------------------------------------------------------------
# 4. MMDiT

def init_mmdit(model: MMDiT) -> None:
    """DiT/SD3 initialisation: Xavier-uniform linears with zero bias, N(0, 0.02) timestep MLP, zero adaLN
    modulations and zero final projection (every block starts as the identity, the output as zero), the fixed 2-D
    sincos positional table."""
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
    w = model.x_embedder.proj.weight
    torch.nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    torch.nn.init.zeros_(model.x_embedder.proj.bias)
    for lin in (model.t_embedder.mlp[0], model.t_embedder.mlp[2]):
        torch.nn.init.normal_(lin.weight, std=0.02)
    for name, m in model.named_modules():
        if name.endswith("adaLN_modulation") or name == "final_layer.linear":
            lin = m[1] if isinstance(m, torch.nn.Sequential) else m
            torch.nn.init.zeros_(lin.weight)
            torch.nn.init.zeros_(lin.bias)
    cfg = model.cfg
    model.pos_embed.copy_(sincos_pos_table(cfg.hidden, cfg.pos_embed_max_size)[None])


def train_mmdit(lat_mean, lat_std, cap_index, ctx_table, pooled_table, empty: int, dev: torch.device,
                budget_s: float, steps: int | None, batch: int, lr: float, seed: int, curve: list, amp: bool,
                probe=None, probes: int = 5, drop: float = 0.1):
    torch.manual_seed(seed)
    model = MMDiT(PRESET.mmdit)
    with torch.no_grad():
        init_mmdit(model)
    model.to(dev).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params = list(model.parameters())
    ema_params = list(ema.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    sched = Schedule(lr, warmup=200, floor=0.1)
    gen = torch.Generator().manual_seed(seed + 1)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    state = {"next_probe": 0}

    def step_fn(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(lat_mean), (batch,), generator=gen).to(dev)
        x0 = lat_mean[idx] + lat_std[idx] * torch.randn_like(lat_mean[idx])  # a fresh latent sample z ~ q(z|x)
        cap = cap_index[idx]
        cap = torch.where(torch.rand(batch, device=dev) < drop, torch.full_like(cap, empty), cap)  # CFG dropout
        t = torch.sigmoid(torch.randn(batch, device=dev))  # logit-normal(0, 1): most steps at mid noise
        eps = torch.randn_like(x0)
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
        with autocast:
            v = model(xt, t * 1000, ctx_table[cap].float(), pooled_table[cap].float())
        loss = F.mse_loss(v.float(), eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        if probe is not None and sched.total and step + 1 >= state["next_probe"]:
            state["next_probe"] = step + 1 + max(1, sched.total // probes)
            try:
                curve.append({"step": step + 1, "probe": probe(ema)})
                log(f"probe at step {step + 1}: adherence {curve[-1]['probe']:.3f} (first val prompts, 10 steps)")
            except Exception as e:  # a curve point is not worth stopping for
                log(f"probe failed: {type(e).__name__}: {e}")
        return loss.detach()

    try:
        guard = Guard([model, ema], opt, every=50 if dev.type == "cuda" else 10)
        n = run_loop("mmdit", step_fn, budget_s, steps, sched, guard, curve, dev)
    except Exception:  # keep what has been learnt: the EMA weights are saved whatever happens
        log("mmdit: training stopped by an exception:\n" + traceback.format_exc())
        n = -1
    if probe is not None:
        with contextlib.suppress(Exception):
            curve.append({"step": n, "probe": probe(ema)})
            log(f"probe at the end: adherence {curve[-1]['probe']:.3f}")
    return ema, n


@torch.no_grad()
def quick_probe(ema, vae, ctx, pooled, neg_ctx, neg_pooled, scenes, dev, steps: int = 10,
                guidance: float = 5.0) -> float:
    """Prompt adherence of the in-memory EMA model on a few validation prompts (a training-curve point)."""
    from minisd35 import sampling
    from minisd35.vae import to_pil

    g = [torch.Generator().manual_seed(1000 + k) for k in range(len(scenes))]
    side = S.SIDE // PRESET.vae.downscale
    x = sampling.noise((len(scenes), PRESET.mmdit.in_channels, side, side), g, dev, torch.float32)
    x = sampling.sample(ema, x, ctx, pooled, neg_ctx, neg_pooled, sigmas=sampling.sigmas(steps, PRESET.sampler.shift),
                        guidance=guidance, sampler=PRESET.sampler.sampler)
    images = to_pil(vae.decode(x))
    return round(S.accuracy(images, scenes)["match"], 4)


# ---------------------------------------------------------------------------------------------------------------------
# 5. Writing the model root

def write_root_files(out: Path, seed: int) -> None:
    """Tokenizers, random frozen text encoders (bf16), scheduler config, model_index.json."""
    from minisd35.text import write_random_text_encoders, write_tokenizer_folders
    from minisd35.tiny import MODEL_INDEX, tokenizer_dirs

    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer_folders(out, *tokenizer_dirs())
    write_random_text_encoders(out, PRESET, seed + 20, torch.bfloat16, force=True)
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
         "shift": PRESET.sampler.shift}, indent=2))
    (out / "model_index.json").write_text(json.dumps(MODEL_INDEX | {"_minisd35": "shapes"}, indent=2))


def write_mmdit(ema: MMDiT, out: Path, meta: dict) -> None:
    state = {k: v.detach().to("cpu", torch.bfloat16) for k, v in ema.state_dict().items()}
    save_mmdit(state, PRESET.mmdit, out / "transformer", layout="diffusers", force=True)
    save_mmdit(state, PRESET.mmdit, out / "sd3_shapes.safetensors", layout="stability",
               metadata={"minisd35_model": "shapes", "minisd35_training": json.dumps(meta)}, force=True)


# ---------------------------------------------------------------------------------------------------------------------
# 6. Evaluation through the real loaders

SWEEP = [(sampler, guidance, steps) for sampler in ("euler", "dpmpp_2m") for guidance in (3.0, 4.0, 5.0, 6.0)
         for steps in (20,)] + [("euler", 5.0, 28), ("dpmpp_2m", 5.0, 28)]


def evaluate(out: Path, dev: torch.device, dtype: torch.dtype, sweep: bool) -> dict:
    """Adherence on the test, val and novel prompts at the preset's sampler settings; with `sweep`, also each
    (sampler, guidance, steps) of SWEEP on the val and tuning prompts, which is how the defaults were chosen (the
    test prompts never choose anything)."""
    from minisd35.pipeline import load_pipeline

    pipe = load_pipeline(out, dtype=dtype, device=dev)
    d = pipe.defaults
    res: dict = {"steps": d.steps, "guidance": d.guidance, "shift": d.shift, "sampler": d.sampler,
                 "dtype": str(dtype).removeprefix("torch."), "device": str(dev), "variant": pipe.preset.name,
                 "torch": torch.__version__}
    for split in ("test", "val", "novel"):
        prompts = S.heldout_prompts(split)
        t0 = time.perf_counter()
        images = S.generate(pipe, [p for p, _ in prompts], list(range(len(prompts))))
        acc = S.accuracy(images, [s for _, s in prompts])
        res[split] = {"prompts": len(prompts), **{k: round(v, 4) for k, v in acc.items()},
                      "seconds": round(time.perf_counter() - t0, 1)}
        log(f"eval {split}: {len(prompts)} prompts, adherence {acc['match']:.3f} "
            f"({', '.join(f'{k} {v:.3f}' for k, v in acc.items() if k != 'match')})")
        if split == "test":
            res["_images"] = images[:40]
    truth = S.accuracy([S.render(s, k) for k, (_, s) in enumerate(S.heldout_prompts("test"))],
                       [s for _, s in S.heldout_prompts("test")])
    res["judge_on_ground_truth"] = round(truth["match"], 4)
    if sweep:
        sets = {"val": (S.heldout_prompts("val"), 0), "tune": (S.tuning_prompts(), 10_000)}
        res["sweep"] = []
        for sampler, guidance, steps in SWEEP:
            row = {"sampler": sampler, "guidance": guidance, "steps": steps}
            for name, (prompts, seed0) in sets.items():
                images = S.generate(pipe, [p for p, _ in prompts], [seed0 + k for k in range(len(prompts))],
                                    steps=steps, guidance=guidance, sampler=sampler)
                row[name] = round(S.accuracy(images, [s for _, s in prompts])["match"], 4)
            res["sweep"].append(row)
            log(f"sweep: {sampler}, guidance {guidance}, {steps} steps -> val {row['val']:.3f}, tune {row['tune']:.3f}")
    return res


def evaluate_into(info: dict, out: Path, dev: torch.device, sweep: bool) -> bytes:
    """evaluate() in bf16 into info['eval']; writes out/samples.png (the first test pictures) and returns its bytes."""
    res = evaluate(out, dev, torch.bfloat16, sweep)
    images = res.pop("_images")
    info["eval"] = res
    buf = io.BytesIO()
    sample_grid(images, [q for q, _ in S.heldout_prompts("test", len(images))]).save(buf, format="PNG")
    (out / "samples.png").write_bytes(buf.getvalue())
    return buf.getvalue()


def sample_grid(images: list[Image.Image], prompts: list[str], cols: int = 8, scale: int = 2) -> Image.Image:
    """Pictures with their prompts underneath, `cols` per row, each shown at `scale` x."""
    cell, text_h = S.SIDE * scale, 34
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * (cell + 4), rows * (cell + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for k, (im, p) in enumerate(zip(images, prompts)):
        x, y = (k % cols) * (cell + 4), (k // cols) * (cell + text_h)
        grid.paste(im.resize((cell, cell), Image.NEAREST), (x, y))
        lines = [""]
        for w in p.split():  # wrap at ~22 characters (the default bitmap font is 6 px wide)
            if lines[-1] and len(lines[-1]) + len(w) >= 22:
                lines.append("")
            lines[-1] = f"{lines[-1]} {w}".strip()
        for j, line in enumerate(lines[:3]):
            draw.text((x + 1, y + cell + 1 + 10 * j), line, fill=(0, 0, 0))
    return grid


SAMPLER_NAMES = {"euler": "Euler", "dpmpp_2m": "DPM++ 2M"}


def model_card(info: dict) -> str:
    ev, tr = info.get("eval", {}), info["training"]
    p = PRESET

    def row(split: str) -> str:
        e = ev.get(split)
        if not e:
            return f"| {split} | not evaluated | | | | | |"
        return (f"| {split} ({e['prompts']} prompts) | **{e['match']:.1%}** | {e['shape']:.1%} | {e['colour']:.1%} | "
                f"{e['position']:.1%} | {e['size']:.1%} | {e['background']:.1%} |")

    mm = [c for c in info["curves"]["mmdit"] if "loss" in c]
    probes = [c for c in info["curves"]["mmdit"] if "probe" in c]
    vae = info["curves"]["vae"]
    m, pr, vinfo, nan = p.mmdit, info["params"], info["vae"], float("nan")
    vae_loss = vae[-1]["loss"] if vae else nan
    arch = "\n".join([
        f"| MMDiT | depth {m.depth}, width {m.hidden} ({m.heads} heads x {m.head_dim}), MLP x4, QK RMSNorm, dual "
        f"attention in blocks {list(m.dual_attention_layers)}, patch 2, 16 latent channels | {pr['mmdit']:,} |",
        f"| VAE | block_out_channels {list(p.vae.block_out_channels)}, {p.vae.layers_per_block} resnet per level, "
        f"{p.vae.downscale}x down (SD3: 8x), 16 latent channels | {pr['vae']:,} |",
        f"| CLIP-L / CLIP-G | width {p.clip_l.width}, {p.clip_l.layers} layers, 77 tokens; frozen at random "
        f"initialisation | {pr['clip_l']:,} / {pr['clip_g']:,} |",
        f"| T5 | d_model {p.t5.d_model}, {p.t5.layers} layers, {p.sampler.t5_tokens} tokens; frozen at random "
        f"initialisation | {pr['t5']:,} |"])
    sweep = "\n".join(f"| {r['sampler']} | {r['guidance']} | {r['steps']} | {r['val']:.1%} | {r['tune']:.1%} |"
                      for r in ev.get("sweep", []))
    if sweep:
        sweep = (f"Sampler settings on the {len(S.heldout_prompts('val'))} validation prompts and "
                 f"{len(S.tuning_prompts())} tuning prompts (`shapes.tuning_prompts`: combinations training draws, "
                 "other seeds); the defaults fixed in the `shapes` preset are the best of these, and the test prompts "
                 "chose nothing:\n\n| sampler | guidance | steps | val | tune |\n|---|---|---|---|---|\n" + sweep
                 + "\n\n" + info.get("sampler_note", ""))
    old = info.get("eval_at_training")
    history = "" if not old else (
        f"At the end of training ({old.get('device', tr['device'])}, {SAMPLER_NAMES[old.get('sampler', 'euler')]}, "
        f"{old['steps']} steps, guidance {old['guidance']}) the same model scored test {old['test']['match']:.1%}, "
        f"val {old['val']['match']:.1%}, novel {old['novel']['match']:.1%}.")
    runs = info.get("selection_runs", [])
    runs_md = "" if not runs else (
        "## How this run was chosen (the same seed and data)\n\n| run | device | minutes | MMDiT batch, LR | MMDiT "
        "steps | test adherence (Euler, at training) |\n|---|---|---|---|---|---|\n"
        + "\n".join(f"| {r['run']} | {r['device']} | {r['minutes']} | {r['batch']}, {r['lr']} | {r['steps']} | "
                    f"{r['test']} |" for r in runs) + "\n\n" + info.get("selection_note", ""))
    return f"""# shapes: a tiny SD3 trained by minisd35 on pictures it draws itself

A text-to-image model with Stable Diffusion 3's architecture at toy size (MMDiT with QK RMSNorm, MMDiT-X
dual-attention blocks and the context_pre_only last block; 16-channel VAE (4x down); CLIP-L, CLIP-G and T5 text
encoders) that draws 64 x 64 pictures of one coloured shape on a coloured background. Trained by
`weights/train_shapes.py` (seed {tr['seed']}, {tr['device']}, {tr['minutes']} min budget) on {tr['images']:,}
pictures drawn by `minisd35/shapes.py`. It exists so that minisd35 has real weights: to see the pipeline make a
picture, and to measure what FP8 does to a trained model's images (`examples/shapes_fp8_eval.py`).

    python -m minisd35 generate "a small red circle on the left, blue background" --model shapes

## Files (the layouts of the real SD3/SD3.5 releases, read by the same loaders)

- `model_index.json`, `scheduler/` (flow-matching Euler, shift {p.sampler.shift}), `transformer/` (diffusers
  SD3Transformer2DModel), `vae/` (AutoencoderKL, scaling_factor {info['vae']['scaling_factor']}, shift_factor
  {info['vae']['shift_factor']}), `text_encoder/`, `text_encoder_2/` (CLIPTextModelWithProjection),
  `text_encoder_3/` (T5EncoderModel), `tokenizer*/` (the project's own 1000-token vocabularies);
- `sd3_shapes.safetensors`: the same MMDiT as a Stability single file (`model.diffusion_model.*` keys);
- `training.json`: settings, loss curves, evaluation. All weights bf16.

## Data

One shape per picture: {', '.join(S.SHAPES)}; colours {', '.join(S.COLOURS)} (shape and background differ);
small or large; one of 9 grid positions. Captions such as "a small red circle on the left, blue background"
in three word orders, with size, position or background sometimes left out. {len(S.HELDOUT)} of the 6048 full
combinations (5%) and the (shape, colour) pairs {', '.join(f'{c} {s}' for s, c in S.NOVEL_PAIRS)} are never drawn
for training.

## Architecture

| part | configuration | parameters |
|---|---|---|
{arch}

The text encoders are frozen random networks: each caption word is one token, and random embeddings already tell
the ~40 words apart; the MMDiT learns to read them.

## Training

- VAE: {info['vae']['steps']} steps, batch {tr['vae_batch']}, AdamW 1e-3 (50 warm-up steps, cosine), loss L1 + L2
  + 1e-4 KL; final loss {vae_loss:.4f}; reconstruction PSNR {vinfo.get('psnr', nan):.1f} dB, judge on
  reconstructions {vinfo.get('judge_recon', nan):.1%}.
- MMDiT: rectified flow (v = eps - x0), logit-normal(0, 1) timesteps, 10% caption dropout, {info['mmdit_steps']}
  steps, batch {tr['batch']}, AdamW {tr['lr']} with 200 warm-up steps and cosine decay, EMA 0.999 (shipped).
- Loss curve (step: loss): {', '.join(f"{c['step']}: {c['loss']:.4f}" for c in mm[:: max(1, len(mm) // 10)])}
- Adherence on the first {tr['probe_prompts']} validation prompts during training (step: accuracy, 10
  {SAMPLER_NAMES[tr.get('probe_sampler', 'euler')]} steps):
  {', '.join(f"{c['step']}: {c['probe']:.0%}" for c in probes) or 'none'}
- Wall time: {info['seconds']:.0f} s in all.

## Evaluation

Prompt adherence by the judge in `minisd35/shapes.py` (shape, colour and position all as asked), {ev.get('steps')}
{SAMPLER_NAMES.get(ev.get('sampler', 'euler'))} steps, guidance {ev.get('guidance')}, shift {ev.get('shift')},
{ev.get('dtype')} on {ev.get('device', tr['device'])} (torch {ev.get('torch', tr['torch'])}), seed k for prompt k,
loaded with `minisd35.load_pipeline`. The judge scores {ev.get('judge_on_ground_truth', float('nan')):.1%} on the exact
pictures of the test prompts. With 200 prompts one picture is 0.5%; a GPU sums in another order than a CPU, and
borderline pictures flip (about 1% either way).

| prompts | adherence | shape | colour | position | size | background |
|---|---|---|---|---|---|---|
{row('test')}
{row('val')}
{row('novel')}

`test` and `val`: held-out combinations; `novel`: the held-out (shape, colour) pairs. {history}

{sweep}

{runs_md}
"""


# ---------------------------------------------------------------------------------------------------------------------

def bundle(out: Path, dest: Path, extras: dict[str, bytes], part_mib: int = 15) -> list[str]:
    """Pack `out` as dest/shapes.tar.gz (split into parts when bigger than part_mib) and write the extras."""
    dest.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(out, arcname="shapes")
    data = buf.getvalue()
    part = part_mib * 2**20
    written = []
    if len(data) <= part:
        (dest / "shapes.tar.gz").write_bytes(data)
        written.append("shapes.tar.gz")
    else:
        for k in range(0, len(data), part):
            name = f"shapes.tar.gz.{k // part:02d}"
            (dest / name).write_bytes(data[k : k + part])
            written.append(name)
    for name, blob in extras.items():
        (dest / name).write_bytes(blob)
        written.append(name)
    return written


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train the shapes model (see the module docstring).")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--minutes", type=float, default=7.0, help="wall-time budget for the whole run")
    ap.add_argument("--out", type=Path, default=ROOT / "weights" / "shapes", help="the model root to write")
    ap.add_argument("--bundle", type=Path, help="also pack the result into this folder (for transport)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, help="training pictures (default: by device)")
    ap.add_argument("--batch", type=int, help="MMDiT batch (default: by device)")
    ap.add_argument("--vae-batch", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--vae-steps", type=int, help="fix the VAE step count (default: from the time budget)")
    ap.add_argument("--mmdit-steps", type=int, help="fix the MMDiT step count (default: from the time budget)")
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--eval-reserve", type=float, help="seconds kept for saving and evaluation (default: by device)")
    ap.add_argument("--no-sweep", action="store_true", help="with --evaluate-only: skip the sampler sweep on the "
                                                             "val and tuning prompts")
    ap.add_argument("--amp", choices=["auto", "on", "off"], default="auto",
                    help="bf16 autocast for the MMDiT (auto: on CUDA, and on CPUs with native bf16 (avx512_bf16/amx))")
    ap.add_argument("--threads", type=int, help="torch CPU threads (on a shared machine 1 avoids thread thrashing)")
    ap.add_argument("--force", action="store_true", help="write into a non-empty --out")
    ap.add_argument("--evaluate-only", action="store_true",
                    help="train nothing: evaluate the model in --out on --device (with the sampler sweep unless "
                         "--no-sweep) and rewrite its training.json, samples.png and README.md")
    args = ap.parse_args(argv)
    try:
        return reevaluate(args) if args.evaluate_only else train(args)
    except Exception:
        log("train_shapes failed:\n" + traceback.format_exc())
        return 1
    finally:
        if args.bundle:  # whatever happened, bring the log back
            args.bundle.mkdir(parents=True, exist_ok=True)
            (args.bundle / "train.log").write_text("\n".join(LOG) + "\n")


def reevaluate(args: argparse.Namespace) -> int:
    """Evaluate a trained root again (another device, new sampler defaults). The evaluation made at the end of
    training is kept as eval_at_training."""
    if args.threads:
        torch.set_num_threads(args.threads)
    out: Path = args.out
    info = json.loads((out / "training.json").read_text())
    info.setdefault("eval_at_training", info.get("eval"))
    evaluate_into(info, out, torch.device(args.device), sweep=not args.no_sweep)
    (out / "README.md").write_text(model_card(info))
    (out / "training.json").write_text(json.dumps(info, indent=1))
    log(f"re-evaluated {out} on {args.device}: test adherence {info['eval']['test']['match']}")
    return 0


def train(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    deadline = t_start + args.minutes * 60
    dev = torch.device(args.device)
    kind = "cuda" if dev.type == "cuda" else "cpu"
    st = dict(SETTINGS[kind])
    for k in ("images", "batch", "vae_batch", "lr"):
        if getattr(args, k) is not None:
            st[k] = getattr(args, k)
    amp = args.amp == "on" or (args.amp == "auto" and (kind == "cuda" or cpu_has_bf16()))
    st["amp"] = amp
    st["probe_sampler"] = PRESET.sampler.sampler
    reserve = args.eval_reserve if args.eval_reserve is not None else (75.0 if kind == "cuda" else 240.0)
    out: Path = args.out
    if out.exists() and any(out.iterdir()) and not args.force:
        print(f"error: {out} is not empty; pass --force to overwrite it", file=sys.stderr)
        return 1
    if kind == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    info: dict = {"training": {"seed": args.seed, "device": str(dev), "minutes": args.minutes, **st,
                               "commit": git_commit(), "torch": torch.__version__},
                  "curves": {"vae": [], "mmdit": []}}
    log(f"train_shapes: device {dev}, budget {args.minutes} min, settings {st}, torch {torch.__version__}")

    # 1. data (before CUDA is touched: the workers fork)
    t0 = time.perf_counter()
    images, captions, scenes = make_data(st["images"], args.seed, args.workers)
    log(f"data: {len(images)} pictures, {len(set(captions))} distinct captions in {time.perf_counter() - t0:.1f} s")
    if dev.type == "cuda":
        images = images.to(dev)

    # 2. text encoders: write, load back with the real loader, encode every distinct caption once
    if out.exists():
        shutil.rmtree(out)
    write_root_files(out, args.seed)
    from minisd35.text import load_text_encoders

    te = load_text_encoders(out, dtype=torch.float32, device=dev, t5_tokens=PRESET.sampler.t5_tokens)
    uniq = sorted(set(captions)) + [""]
    where = {c: i for i, c in enumerate(uniq)}
    ctxs, pools = [], []
    t0 = time.perf_counter()
    for i in range(0, len(uniq), 1024):
        c, p = te.encode(uniq[i : i + 1024])
        ctxs.append(c.to(torch.bfloat16))
        pools.append(p.to(torch.bfloat16))
    ctx_table, pooled_table = torch.cat(ctxs).to(dev), torch.cat(pools).to(dev)
    cap_index = torch.tensor([where[c] for c in captions], device=dev)
    info["params"] = {r: sum(p.numel() for p in te.model(r).parameters()) for r in ("clip_l", "clip_g", "t5")}
    log(f"text: {len(uniq)} captions encoded in {time.perf_counter() - t0:.1f} s -> context {tuple(ctx_table.shape)}")

    # 3. VAE
    train_s = max(30.0, deadline - time.perf_counter() - reserve)
    vae, n = train_vae(images, dev, train_s * st["vae_share"], args.vae_steps, st["vae_batch"], args.seed,
                       info["curves"]["vae"])
    info["params"]["vae"] = sum(p.numel() for p in vae.parameters())
    shift, scale = latent_stats(vae, images, dev, st["stats"])
    vcfg = write_vae(vae, out / "vae", shift, scale)
    from minisd35.vae import load_vae

    vae = load_vae(out, dtype=torch.float32, device=dev)  # the written (bf16) weights, as the pipeline reads them
    info["vae"] = {"steps": n, "shift_factor": vcfg.shift_factor, "scaling_factor": vcfg.scaling_factor}
    with torch.no_grad():
        test = [s for _, s in S.heldout_prompts("test")]
        truth = torch.from_numpy(S.render_batch(test, 7)).permute(0, 3, 1, 2)
        rec = vae.decode(vae.encode(to_unit(truth).to(dev), sample=False))
        rec_u8 = ((rec.clamp(-1, 1) + 1) * 127.5).round().cpu()
        mse = float((rec_u8 - truth.float()).pow(2).mean())
        info["vae"]["psnr"] = round(10 * math.log10(255**2 / max(mse, 1e-9)), 2)
        from minisd35.vae import to_pil

        info["vae"]["judge_recon"] = round(S.accuracy(to_pil(rec), test)["match"], 4)
    log(f"vae: {n} steps, shift {vcfg.shift_factor}, scale {vcfg.scaling_factor}, reconstruction PSNR "
        f"{info['vae']['psnr']} dB, judge on reconstructions {info['vae']['judge_recon']:.3f}")
    lat_mean, lat_std = encode_dataset(vae, images, dev)
    log(f"latents: {tuple(lat_mean.shape)}, mean {float(lat_mean.mean()):.3f}, std {float(lat_mean.std()):.3f}, "
        f"sampling std {float(lat_std.mean()):.4f}")
    del images

    # 4. MMDiT, with a few adherence probes on the first validation prompts along the way
    val = S.heldout_prompts("val", st["probe_prompts"])
    vc, vp = te.encode([q for q, _ in val] + [""] * len(val))  # [cond; uncond] context and pooled
    k = len(val)
    probe = lambda ema: quick_probe(ema, vae, vc[:k], vp[:k], vc[k:], vp[k:], [s for _, s in val], dev)  # noqa: E731
    budget = max(20.0, deadline - time.perf_counter() - reserve)
    ema, n = train_mmdit(lat_mean, lat_std, cap_index, ctx_table, pooled_table, len(uniq) - 1, dev, budget,
                         args.mmdit_steps, st["batch"], st["lr"], args.seed, info["curves"]["mmdit"], amp, probe=probe,
                         probes=st["probes"])
    info["mmdit_steps"] = n
    info["params"]["mmdit"] = sum(p.numel() for p in ema.parameters())
    te.release()

    # 5. save
    write_mmdit(ema, out, {"seed": args.seed, "steps": n, "commit": info["training"]["commit"]})
    log(f"wrote {out}")

    # 6. evaluate through the real loaders (a failure here is logged; the files are already written)
    extras: dict[str, bytes] = {}
    try:
        extras["samples.png"] = evaluate_into(info, out, dev, sweep=False)
    except Exception:
        log("evaluation failed:\n" + traceback.format_exc())
    info["seconds"] = round(time.perf_counter() - t_start, 1)
    try:
        (out / "README.md").write_text(model_card(info))
    except Exception:
        log("model card failed:\n" + traceback.format_exc())
    (out / "training.json").write_text(json.dumps(info, indent=1))
    log(f"done in {info['seconds']:.0f} s: test adherence {info.get('eval', {}).get('test', {}).get('match')}")
    if args.bundle:
        extras["train_log.json"] = json.dumps(info, indent=1).encode()
        written = bundle(out, args.bundle, extras)
        log(f"bundle: {', '.join(written)} and train.log in {args.bundle}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
