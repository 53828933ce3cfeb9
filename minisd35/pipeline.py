"""Text to image (and image to image): text encoders -> MMDiT + flow-matching sampler -> VAE -> PIL.

    pipe = minisd35.load_pipeline("path/to/stable-diffusion-3.5-large", fp8="default")
    images = pipe("a red cube on a table", seed=0)

Where the files can be: a diffusers model root (transformer/, vae/, text_encoder*/, tokenizer*/), a Stability
single file (sd3.5_large.safetensors) with the text-encoder files (clip_l, clip_g, t5xxl_*.safetensors and the
tokenizer folders) beside it or given as `text_encoders=`, or an all-in-one file that carries everything.

Memory discipline for consumer GPUs. The three encoders run once per call, first; then they go back to the CPU
(or are dropped with text_encoders="release"), so T5-XXL's 9.5 GB (4.8 GB with the "t5-w8" policy) is never on the
GPU while the MMDiT denoises. The MMDiT itself stays on the GPU between calls, so during encoding both are there
(SD3.5 Large, FP8 + t5-w8: 14.2 GiB peak, measured). low_vram=True keeps every component on the CPU and moves each
to the GPU only for its own stage: one component on the GPU at a time (8.4 GiB). streamed=True goes further for GPUs
smaller than the MMDiT: its joint blocks visit the GPU one at a time during each step (streaming.py). The VAE
decode tiles itself when the full decode would not fit in the free memory.

Reproducibility. Noise is drawn on the CPU, one generator per image with seeds seed, seed+1, ..., in the model
dtype, exactly as diffusers draws it with generator=[torch.Generator("cpu").manual_seed(s) for s in seeds]; so
the same seed gives the same image as diffusers, on any device, and image k of a batch starts from the noise of a
single run with seed+k. Bit for bit (tests/test_reliability.py, tests/test_gpu.py): the same seed, size, policy,
device and versions give byte-identical PNGs; on the CPU in bf16 a batch of n equals n single runs. Where that
cannot hold: (1) GEMMs pick their kernel by the number of rows M (oneDNN on the CPU in fp32, cuBLAS/cuBLASLt and
torch._scaled_mm on CUDA, split-K for small M), and a batch, or CFG's doubled batch, changes M, hence the summation
order: batch and single runs can differ in the last bits (on this CPU in fp32, ~4e-6). (2) The Triton kernels
autotune (kernels/fp8_gemm.py, fp8_dequant_gemm.py) on their first call in
a process; configs with another BLOCK_K / promotion interval round differently, so two processes
on the same GPU can differ in the last bits. Within one process the choice is cached and runs repeat exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from . import sampling
from .checkpoint import detect_components, open_file
from .config import Preset, SamplerDefaults, detect_variant, get_preset
from .errors import ConfigError, HardwareError, InputError, NumericsError
from .mmdit import MMDiT
from .streaming import Parked


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(device: str | torch.device) -> torch.device:
    """'cpu', 'cuda', 'cuda:1' -> torch.device, or one clear error (unknown name, no CUDA, no such GPU)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise HardwareError(f"device {device!r} asked, but this torch sees no CUDA GPU (torch "
                                f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use --device cpu or "
                                f"install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise HardwareError(f"device {device!r} asked, but there are {torch.cuda.device_count()} CUDA GPUs")
    return dev


@dataclass
class Timings:
    encode_s: float = 0.0
    denoise_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0
    peak_gib: float = 0.0  # peak GPU memory allocated during the call (0 on CPU)
    denoise_peak_gib: float = 0.0  # the same, during the denoising loop only
    stages: dict = field(default_factory=dict)

    @property
    def total_s(self) -> float:
        return self.encode_s + self.denoise_s + self.decode_s


@contextlib.contextmanager
def _stage(name: str, device: torch.device, hint: str):
    """Turn a CUDA out-of-memory in one stage into one clear HardwareError naming the component."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        free = ""
        if device.type == "cuda":
            with contextlib.suppress(RuntimeError):
                free = f" ({torch.cuda.mem_get_info(device)[0] / 2**30:.1f} GiB free now)"
        raise HardwareError(f"out of GPU memory while running the {name}{free}: {hint}") from None


def check_args(height: int | None, width: int | None, steps: int | None, guidance: float | None, batch_size: int,
               strength: float | None, seed: int = 0, mult: int = 16, side: int | None = None) -> None:
    """One InputError for the first bad generation argument; None means "the model's default" and is not checked.
    mult is the size step (VAE factor 8 x patch 2 = 16 px for every SD3 model); side the largest size the model's
    positional table covers (None: not known yet, e.g. before the model is loaded)."""
    for name, v in (("height", height), ("width", width)):
        if v is None:
            continue
        if not isinstance(v, int) or v < mult or v % mult:
            near = ""
            if isinstance(v, int) and v > mult:
                lo = int(v // mult * mult)
                near = f" (nearest: {lo} or {lo + mult})"
            raise InputError(f"{name} {v!r} must be a positive integer multiple of {mult} px{near}")
        if side is not None and v > side:
            raise InputError(f"{name} {v} px is beyond what this model's positional table covers; the largest "
                             f"allowed is {side} px")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise InputError(f"steps must be an integer >= 1, got {steps!r}")
    if guidance is not None and (not isinstance(guidance, (int, float)) or not math.isfinite(guidance)
                                 or guidance < 0):
        raise InputError(f"guidance must be a finite number >= 0, got {guidance!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if strength is not None and (not isinstance(strength, (int, float)) or not 0 <= strength <= 1):
        raise InputError(f"strength must be in [0, 1], got {strength!r}")
    # torch generators take seeds in [-2**63, 2**64 - 1]; image k of a batch uses seed + k
    if not isinstance(seed, int) or not -2**63 <= seed <= 2**64 - 1 - (batch_size - 1):
        raise InputError(f"seed must be an integer in [-2**63, 2**64 - {batch_size}] (image k of a batch uses "
                         f"seed + k), got {seed!r}")


class Pipeline:
    def __init__(self, mmdit: MMDiT, text_loader, vae_loader, *, preset: Preset, device: torch.device,
                 dtype: torch.dtype, low_vram: bool = False, text_encoders: str = "offload", policy: str = "bf16",
                 source: str = "", fast: bool | None = None, streamed: bool = False, attention: str = "auto",
                 fast_accum: bool = False):
        if text_encoders not in ("offload", "release", "keep"):
            raise InputError(f"text_encoders must be 'offload', 'release' or 'keep', not {text_encoders!r}")
        self.mmdit, self.preset, self.device, self.dtype = mmdit, preset, device, dtype
        self.defaults: SamplerDefaults = preset.sampler
        self.low_vram, self.text_mode, self.policy, self.source = low_vram, text_encoders, policy, source
        self._text_loader, self._vae_loader = text_loader, vae_loader
        self._text, self._vae = None, None
        self.timings = Timings()
        # The fused forward (fast.py) on CUDA unless asked otherwise; the plain model is its reference. CUDA graphs
        # need the model to stay put, so low_vram (which moves it) runs the fused forward without graphs.
        # attention / fast_accum are options of the fused forward: asking for one asks for it.
        tuned = attention != "auto" or fast_accum
        if fast is None:
            fast = device.type == "cuda" or tuned
        if tuned and not (fast or streamed):
            raise InputError(f"attention={attention!r} / fast_accum={fast_accum} are options of the fused forward; "
                             f"they need fast=True (or streamed=True)")
        if device.type == "cuda":  # W8A8 layers on a GPU without FP8 tensor cores become weight-only, with one message
            from .fp8 import weight_only_fallback

            weight_only_fallback(mmdit, device)
        self.denoiser = mmdit
        self.streamed = streamed
        self._mmdit_parked = None
        if streamed:  # the joint blocks visit the GPU one at a time during each step (streaming.BlockStreamer)
            from .fast import stream

            self.denoiser = stream(mmdit, device, attention=attention, fast_accum=fast_accum)
        elif fast:
            from .fast import accelerate

            self.denoiser = accelerate(mmdit, graphs=device.type == "cuda" and not low_vram, fuse_adaln=not low_vram,
                                       attention=attention, fast_accum=fast_accum)
        self.attention, self.fast_accum = attention, fast_accum
        if low_vram and not streamed and device.type == "cuda":
            # the MMDiT waits pinned on the CPU and visits the GPU for the denoising loop only
            self._mmdit_parked = Parked(mmdit, device)

    # -- components --------------------------------------------------------------------------------------------------
    @property
    def home(self) -> torch.device:
        """Where idle components live: the CPU in low-VRAM mode, else the compute device."""
        return torch.device("cpu") if self.low_vram else self.device

    def text_encoders(self):
        if self._text is None:
            self._text = self._text_loader()
        return self._text

    def vae(self):
        if self._vae is None:
            self._vae = self._vae_loader()
        return self._vae

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        te = self.text_encoders()
        offload = self.text_mode == "offload" and self.device.type == "cuda"
        if offload and not te.parked:  # they wait in pinned CPU memory and visit the GPU for each call
            te.park(self.device)
        te.to(self.device)
        try:
            ctx, pooled = te.encode(prompts)
        finally:
            if self.text_mode == "release":
                te.release()
                self._text = None
            elif offload:
                te.to("cpu")
        return ctx.to(self.device, self.dtype), pooled.to(self.device, self.dtype)

    # -- argument checks ---------------------------------------------------------------------------------------------
    def check_args(self, height: int, width: int, steps: int, guidance: float, batch_size: int,
                   strength: float | None, seed: int = 0) -> None:
        check_args(height, width, steps, guidance, batch_size, strength, seed, mult=8 * self.mmdit.cfg.patch_size,
                   side=self.mmdit.cfg.max_image_side)

    # -- the run -----------------------------------------------------------------------------------------------------
    def steps(self, prompt: str | list[str], negative_prompt: str | list[str] = "", *, height: int | None = None,
              width: int | None = None, steps: int | None = None, guidance: float | None = None, seed: int = 0,
              batch_size: int = 1, image: Image.Image | torch.Tensor | None = None, strength: float = 0.6,
              sampler: str | None = None, slg: sampling.SkipLayerGuidance | bool | None = None,
              check_numerics: bool = True) -> Iterator[sampling.Step]:
        """The denoising loop as a generator: yields a sampling.Step (i, sigma, latents, velocity) after every step;
        the hook for progress bars, previews, per-step audits and early stop. The last Step holds the result."""
        d = self.defaults
        steps = d.steps if steps is None else steps
        guidance = d.guidance if guidance is None else guidance
        if image is not None and not isinstance(image, (Image.Image, torch.Tensor)):
            raise InputError(f"image must be a PIL image or a [B, 3, H, W] tensor in [-1, 1], got "
                             f"{type(image).__name__} (open files with PIL.Image.open)")
        if image is not None and height is None and width is None:
            size = image.size if isinstance(image, Image.Image) else (image.shape[-1], image.shape[-2])
            width, height = size
            m = 8 * self.mmdit.cfg.patch_size
            if width % m or height % m:
                raise InputError(f"the image is {width}x{height} px, not multiples of {m}: pass width={width // m * m}"
                                 f" and height={height // m * m} (-W/-H) to resize it, or crop it")
        height = d.height if height is None else height
        width = d.width if width is None else width
        self.check_args(height, width, steps, guidance, batch_size, strength if image is not None else None, seed)
        for name, p in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if not isinstance(p, str) and not (isinstance(p, (list, tuple)) and all(isinstance(x, str) for x in p)):
                raise InputError(f"{name} must be a string or a list of strings ('' is the unconditional prompt), "
                                 f"got {type(p).__name__}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise InputError("prompt is an empty list; give at least one prompt ('' is the unconditional prompt)")
        negs = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negs) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(negs)} negative prompts")
        prompts = [p for p in prompts for _ in range(batch_size)]
        negs = [n for n in negs for _ in range(batch_size)]
        B = len(prompts)
        cfg_on = guidance > 1
        if slg is None or slg is True:
            slg = (sampling.SkipLayerGuidance(d.slg_layers, d.slg_scale, d.slg_start, d.slg_stop)
                   if d.slg_layers and d.slg_scale else None)
        elif slg is False:
            slg = None
        t = self.timings = Timings(steps=steps)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

        t0 = time.perf_counter()
        with _stage("text encoders", self.device, "try --low-vram, --no-t5, or the t5-w8 policy for T5 (--fp8-text)"):
            ctx, pooled = self.encode_prompts(negs + prompts if cfg_on else prompts)
        if check_numerics and not (bool(torch.isfinite(ctx).all()) and bool(torch.isfinite(pooled).all())):
            raise NumericsError(f"the text encoders produced NaN/Inf embeddings ({self.dtype}): stopped before "
                                f"denoising. T5 and CLIP overflow in float16; load with dtype bfloat16 or float32")
        neg_ctx, neg_pooled = (ctx[:B], pooled[:B]) if cfg_on else (None, None)
        ctx, pooled = (ctx[B:], pooled[B:]) if cfg_on else (ctx, pooled)
        t.encode_s = time.perf_counter() - t0

        sig = sampling.sigmas(steps, d.shift)
        vae_f = self.preset.vae.downscale
        shape = (B, self.mmdit.cfg.in_channels, height // vae_f, width // vae_f)
        seeds = [seed + k for _ in range(B // batch_size) for k in range(batch_size)]
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        hint = "try --low-vram, an FP8 policy (--fp8 default), a smaller size or a smaller batch"
        if image is not None:
            with _stage("VAE encoder", self.device, hint):
                vae = self.vae().to(self.device)
                pixels = image if isinstance(image, torch.Tensor) else _from_pil(image, height, width)
                latents0 = vae.encode(pixels.to(self.device, vae.dtype).expand(B, -1, -1, -1), generator=gens)
                if self.low_vram:
                    vae.to("cpu")
            if strength == 0:
                yield sampling.Step(0, 0.0, 0.0, latents0.to(self.dtype), torch.zeros_like(latents0))
                return
            sig = sampling.img2img_sigmas(sig, strength)
            x = sampling.scale_noise(latents0.to(self.dtype),
                                     sampling.noise(shape, gens, self.device, self.dtype), sig[0])
        else:
            x = sampling.noise(shape, gens, self.device, self.dtype)

        t0 = time.perf_counter()
        cuda = self.device.type == "cuda"
        if cuda:  # the denoising loop's own peak; the call's peak is the max of the stages'
            t.peak_gib = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        n = len(sig) - 1
        try:
            with self.denoising() as model, _stage("MMDiT", self.device, hint):
                for step in sampling.denoise(model, x, ctx, pooled, neg_ctx, neg_pooled, sigmas=sig, guidance=guidance,
                                             slg=slg if cfg_on else None, sampler=sampler or d.sampler):
                    if check_numerics and not bool(torch.isfinite(step.latents).all()):
                        raise NumericsError(
                            f"NaN/Inf in the latents at step {step.i + 1} of {n} (sigma {step.sigma:.4f}) with "
                            f"precision policy {self.policy!r} in {self.dtype}: stopped instead of saving a black "
                            f"image. {self._safer()}")
                    yield step
        finally:
            t.denoise_s = time.perf_counter() - t0
            if cuda:
                t.denoise_peak_gib = torch.cuda.max_memory_allocated(self.device) / 2**30
                t.peak_gib = max(t.peak_gib, t.denoise_peak_gib)

    @contextlib.contextmanager
    def denoising(self):
        """The denoiser (the fused / graphed / streamed forward, or the plain MMDiT) to call as MMDiT is called; in
        low-VRAM mode the MMDiT visits the GPU for the duration of the block."""
        if self._mmdit_parked is not None:
            self._mmdit_parked.on()
        try:
            yield self.denoiser
        finally:
            if self._mmdit_parked is not None:
                self._mmdit_parked.off()

    def _safer(self) -> str:
        """What to try after NaN/Inf: a safer precision than the one that failed."""
        tips = []
        if self.policy not in ("bf16", "weight-only"):
            tips.append("a safer FP8 policy (--fp8 weight-only) or none (bf16); `python -m minisd35 audit` shows "
                        "which layers go wrong")
        if self.dtype == torch.float16:
            tips.append("dtype bfloat16 or float32 instead of float16 (float16 overflows above 65504)")
        if not tips:
            tips.append("dtype float32; if it persists the weights are damaged")
        return "Try " + "; or ".join(tips)

    def decode(self, latents: torch.Tensor, tile: int | None = None) -> list[Image.Image]:
        from .vae import to_pil

        t0 = time.perf_counter()
        with _stage("VAE decoder", self.device, "try tiled decoding (tile=...), --low-vram or a smaller size"):
            vae = self.vae().to(self.device)
            images = vae.decode(latents.to(self.device, vae.dtype), tile=tile)
            if self.low_vram:
                vae.to("cpu")
        if not bool(torch.isfinite(images).all()):
            raise NumericsError(f"the VAE decoder produced NaN/Inf pixels in {vae.dtype} (that would be a black "
                                f"image): nothing saved. Decode in bfloat16 or float32 (float16 VAEs overflow)"
                                if bool(torch.isfinite(latents).all()) else
                                "the latents to decode hold NaN/Inf: nothing saved. " + self._safer())
        self.timings.decode_s = time.perf_counter() - t0
        if self.device.type == "cuda":
            self.timings.peak_gib = max(self.timings.peak_gib, torch.cuda.max_memory_allocated(self.device) / 2**30)
        return to_pil(images)

    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] = "", **kw) -> list[Image.Image]:
        tile = kw.pop("tile", None)
        *_, last = self.steps(prompt, negative_prompt, **kw)
        return self.decode(last.latents, tile=tile)

    def describe(self, **kw) -> dict:
        """The settings a call with these arguments uses (for PNG metadata and logs)."""
        d = self.defaults
        return {"model": self.preset.name, "precision": self.policy, "steps": kw.get("steps") or d.steps,
                "guidance": d.guidance if kw.get("guidance") is None else kw["guidance"],
                "height": kw.get("height") or d.height, "width": kw.get("width") or d.width,
                "sampler": kw.get("sampler") or d.sampler, "shift": d.shift,
                **({"attention": self.attention} if self.attention != "auto" else {}),
                **({"accumulation": "fast"} if self.fast_accum else {})}


def _from_pil(image: Image.Image, height: int, width: int) -> torch.Tensor:
    from .vae import from_pil

    if image.size != (width, height):
        image = image.convert("RGB").resize((width, height), Image.LANCZOS)
    return from_pil(image)


# --- finding the components -----------------------------------------------------------------------------------------

def _resolve(path: Path) -> dict:
    """Where each component of a model lives, from the path the user gave."""
    if path.is_dir():
        if (path / "transformer").is_dir():
            return {"kind": "diffusers", "mmdit": path, "vae": path, "text": path, "root": path}
        singles = sorted(p for p in path.glob("*.safetensors") if "vae" not in p.name and not p.name.startswith(
            ("clip_", "t5xxl")))
        if len(singles) == 1:
            return _resolve(singles[0])
        raise ConfigError(f"{path}: not a diffusers model root (no transformer/ folder) and not a folder with one "
                          f"MMDiT .safetensors file (found {[p.name for p in singles]}); pass the model file itself")
    ck = open_file(path)
    comps = detect_components(ck.keys())
    folder = path.parent
    te_folder = folder / "text_encoders" if (folder / "text_encoders").is_dir() else folder
    text = path if {"clip_l", "clip_g"} & set(comps) else te_folder
    vae = path if "vae" in comps else next((p for p in (folder / "vae", folder / "sd3_vae.safetensors") if p.exists()),
                                           None)
    return {"kind": "single", "mmdit": path, "vae": vae, "text": text, "root": folder}


def _scheduler_shift(root: Path) -> float | None:
    f = root / "scheduler" / "scheduler_config.json"
    if f.is_file():
        try:
            return float(json.loads(f.read_text()).get("shift", 3.0))
        except (ValueError, TypeError):
            return None
    return None


def load_pipeline(path: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device | None = None,
                  t5: bool = True, fp8: str | None = None, preset: str | None = None,
                  text_encoders: str | Path | None = None, vae: str | Path | None = None, low_vram: bool = False,
                  fp8_text: str | None = None, fp8_impl: str | None = None, t5_tokens: int | None = None,
                  keep_text: str = "offload", fast: bool | None = None, streamed: bool = False,
                  attention: str = "auto", fast_accum: bool = False) -> Pipeline:
    """Load everything needed for text-to-image. `fp8` names an FP8 policy for the MMDiT ('default', 'row', 'tensor',
    'weight-only' or a policy .json); it is applied while the weights are read, so the bf16 weights are never all in
    memory. `fp8_text` quantises T5 ('t5-w8'). `preset` forces the sampler defaults of a variant and checks the
    MMDiT against it; otherwise the variant is detected from the weights (and 'turbo' in the path picks Large Turbo).
    `fast` (default: on CUDA) runs the fused forward of fast.py, captured as CUDA graphs. `low_vram` keeps one
    component on the GPU at a time; `streamed` (implies low_vram) goes further: during each step the MMDiT's joint
    blocks visit the GPU one at a time from pinned CPU memory (streaming.py), for GPUs smaller than the MMDiT.
    Two speed options of the fused forward, off by default because they trade accuracy: `attention="fp8"` runs
    attention with E4M3 Q, K, P and V (kernels/fp8_attention.py; layers without QK norm stay bf16; other values:
    fast.ATTENTION), `fast_accum=True` lets the FP8 GEMMs accumulate in the tensor cores' ~13-bit accumulator
    without promotion (kernels/fp8_gemm.py's docstring). Either one turns `fast` on, also on the CPU, where FP8
    attention runs its torch emulation (fast.fp8_softmax_pv)."""
    from .fp8 import get_policy
    from .text import load_text_encoders
    from .vae import load_vae
    from .weights import load_mmdit

    path = Path(path)
    device = parse_device(device) if device is not None else default_device()
    low_vram = low_vram or streamed
    if not path.exists():
        raise ConfigError(f"{path}: no such file or folder")
    for p in (fp8, fp8_text):  # an unknown policy name fails now, not after minutes of loading
        if isinstance(p, str):
            get_policy(p)
    from .fast import ATTENTION

    if attention not in ATTENTION:
        raise InputError(f"attention={attention!r}; expected one of {ATTENTION}")
    where = _resolve(path)
    # low_vram: the MMDiT waits on the CPU between uses. With an FP8 policy it is still quantised on the GPU as it
    # is read (one layer in bf16 at a time, far faster than on the CPU), then parked on the CPU.
    load_dev = torch.device("cpu") if low_vram and not (fp8 and device.type == "cuda") else device
    with _stage("MMDiT loader", load_dev, "try --low-vram (the MMDiT waits on the CPU) or an FP8 policy (--fp8)"):
        mmdit = load_mmdit(where["mmdit"], dtype=dtype, device=load_dev, preset=preset, fp8=fp8, fp8_impl=fp8_impl)
    if low_vram:
        mmdit.to("cpu")
    name = preset or detect_variant(mmdit.cfg)
    if name == "sd3.5-large" and "turbo" in str(path).lower():
        name = "sd3.5-large-turbo"
    if name is None:
        raise ConfigError(f"{path}: the MMDiT matches no known variant ({mmdit.cfg}); pass preset=... to choose "
                          f"sampler defaults")
    pre = get_preset(name)
    shift = _scheduler_shift(where["root"])
    if shift is not None and shift != pre.sampler.shift:
        pre = Preset(pre.name, pre.mmdit, SamplerDefaults(**{**pre.sampler.__dict__, "shift": shift}), pre.clip_l,
                     pre.clip_g, pre.t5, pre.vae)
    tokens = t5_tokens or pre.sampler.t5_tokens

    def text_loader():
        te = load_text_encoders(text_encoders or where["text"], dtype=dtype, device="cpu", t5=t5, t5_tokens=tokens)
        if fp8_text:
            from .fp8 import quantize

            if te.has_t5:
                quantize(te.model("t5"), fp8_text, device=device if device.type == "cuda" else None)
        return te

    def vae_loader():
        src = vae or where["vae"]
        if src is None:
            raise ConfigError(f"{path}: no VAE found (not in the file, no vae/ folder or sd3_vae.safetensors beside "
                              f"it); pass vae=PATH")
        return load_vae(src, dtype=dtype, device=load_dev if not low_vram else "cpu")

    policy = fp8 if isinstance(fp8, str) else ("file" if any(True for _ in _fp8_layers(mmdit)) else "bf16")
    return Pipeline(mmdit, text_loader, vae_loader, preset=pre, device=device, dtype=dtype, low_vram=low_vram,
                    text_encoders=keep_text, policy=policy or "bf16", source=str(path), fast=fast, streamed=streamed,
                    attention=attention, fast_accum=fast_accum)


def _fp8_layers(model):
    from .fp8 import FP8Linear

    return (m for m in model.modules() if isinstance(m, FP8Linear))
