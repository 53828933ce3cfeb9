"""`python -m minisd35 bench`: time, memory and energy of one denoising step (and a whole image) on a GPU, for
minisd35 in bf16 and under each FP8 policy, and for the systems a user would pick instead (diffusers in bf16,
diffusers + torchao FP8 row-wise, eager and compiled) when those packages are installed: all on the same random
weights at the real configs, the same inputs, in the same process, so ratios are fair.

Per system: ms/step (median, p20/p80 of >= 10 timed steps after warm-up, CUDA events), first-call time (JIT,
autotune, compile), peak GPU memory of the step, energy per step from NVML's energy counter (nvidia-ml-py,
optional), relative RMS error of the step output against minisd35 bf16, weight memory. Then a table, then one JSON
line (also written to --out): GPU name, driver, torch/triton versions and git commit ride along with every result.

Random weights: generated on the GPU directly in bf16 (8 B parameters would take minutes on a CPU), with the same
scale rules as weights.random_mmdit_state, so activations are O(1). They lack the outliers trained checkpoints have:
the error numbers show the mechanics of FP8, not real-image quality.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import MMDiTConfig, get_preset
from .mmdit import MMDiT
from .weights import sincos_pos_table


def env_info() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        info["cuda"] = torch.version.cuda
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,power.limit,memory.total",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout
            fields = [s.strip() for s in out.splitlines()[0].split(",")]
            info["driver"], info["power_limit"], info["gpu_memory"] = fields
        except (OSError, IndexError, ValueError, subprocess.TimeoutExpired):
            pass
    try:
        root = Path(__file__).resolve().parent.parent
        info["commit"] = os.environ.get("MINISD35_COMMIT") or subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        info["commit"] = os.environ.get("MINISD35_COMMIT")
    for pkg in ("diffusers", "torchao"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception:  # optional peers; any import failure just means "not available"
            info[pkg] = None
    return info


class NVML:
    """GPU energy (J, monotonic counter), temperature (C) and power (W) through nvidia-ml-py, if installed."""

    def __init__(self):
        self.h = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nv = pynvml
            self.h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        except Exception:  # no NVML: energy numbers are reported as None
            self.h = None

    def energy_j(self) -> float | None:
        if self.h is None:
            return None
        try:
            return self.nv.nvmlDeviceGetTotalEnergyConsumption(self.h) / 1000.0
        except Exception:
            return None

    def temp_power(self) -> tuple[float | None, float | None]:
        if self.h is None:
            return None, None
        try:
            return (float(self.nv.nvmlDeviceGetTemperature(self.h, 0)),
                    self.nv.nvmlDeviceGetPowerUsage(self.h) / 1000.0)
        except Exception:
            return None, None


def cuda_times(fn: Callable[[], object], iters: int = 10, warmup: int = 2) -> list[float]:
    """Milliseconds per call, each timed with CUDA events (after `warmup` untimed calls)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        out.append(s.elapsed_time(e))
    return out


def stats(ts: list[float]) -> dict:
    t = sorted(ts)
    q = lambda f: t[min(len(t) - 1, int(f * (len(t) - 1) + 0.5))]
    return {"median_ms": q(0.5), "p20_ms": q(0.2), "p80_ms": q(0.8), "min_ms": t[0], "max_ms": t[-1], "n": len(t)}


@torch.no_grad()
def random_mmdit(cfg: MMDiTConfig, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cuda") -> MMDiT:
    """A full-size MMDiT with random weights generated on `device` (same scale rules as random_mmdit_state)."""
    g = torch.Generator(device).manual_seed(seed)
    with torch.device("meta"):
        model = MMDiT(cfg)
    state = {}
    for k, v in model.state_dict().items():
        if k == "pos_embed":
            t = sincos_pos_table(cfg.hidden, cfg.pos_embed_max_size)[None].to(device)
        elif k.endswith((".ln_q.weight", ".ln_k.weight")):
            t = 1 + 0.1 * torch.randn(v.shape, generator=g, device=device)
        elif k.endswith(".bias"):
            t = 0.02 * torch.randn(v.shape, generator=g, device=device)
        else:
            t = torch.randn(v.shape, generator=g, device=device, dtype=dtype) / v[0].numel() ** 0.5
            if "adaLN_modulation" in k:
                t = t * 0.5
        state[k] = t.to(dtype)
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False)


def step_inputs(cfg: MMDiTConfig, px: int, batch: int, text_tokens: int = 333, dtype=torch.bfloat16,
                device="cuda", seed: int = 1):
    g = torch.Generator(device).manual_seed(seed)
    lat = px // 8
    x = torch.randn(batch, cfg.in_channels, lat, lat, generator=g, device=device, dtype=dtype)
    ctx = torch.randn(batch, text_tokens, cfg.context_dim, generator=g, device=device, dtype=dtype)
    pooled = torch.randn(batch, cfg.pooled_dim, generator=g, device=device, dtype=dtype)
    t = torch.full((batch,), 500.0, device=device)
    return x, t, ctx, pooled


def diffusers_from_mmdit(model: MMDiT):
    """diffusers' SD3Transformer2DModel holding the same weights (a copy), in the model's dtype and device."""
    from diffusers import SD3Transformer2DModel

    from .weights import to_diffusers

    p = next(model.parameters())
    with torch.device("meta"):
        dm = SD3Transformer2DModel(**model.cfg.to_diffusers())
    sd = to_diffusers({k: v for k, v in model.state_dict().items()}, model.cfg.depth)
    dm.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True, assign=True)
    return dm.to(device=p.device, dtype=p.dtype).eval().requires_grad_(False)


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def measure(name: str, fn: Callable[[], torch.Tensor], ref: torch.Tensor | None, nv: NVML, iters: int = 10,
            weights_bytes: int | None = None, log=print, ref32: torch.Tensor | None = None) -> dict:
    """One system: first call (compile / autotune / graph capture), then timed steps with energy, peak memory and
    error vs ref. Memory: `extra_gib` is what the step allocates on top of what was allocated before its first call
    (activations, workspaces, CUDA-graph pools); the system's MMDiT peak is its own weights plus that."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    e0 = nv.energy_j()
    ts = cuda_times(fn, iters=iters, warmup=2)
    e1 = nv.energy_j()
    extra = (torch.cuda.max_memory_allocated() - base) / 2**30
    wg = None if weights_bytes is None else weights_bytes / 2**30
    rec = {"system": name, **stats(ts), "first_call_s": first, "extra_gib": extra, "weights_gib": wg,
           "mmdit_peak_gib": None if wg is None else wg + extra,
           "energy_j_per_step": None if e0 is None or e1 is None else (e1 - e0) / (iters + 2),
           "rel_rms_vs_bf16": None if ref is None else rel_rms(out.float(), ref.float()),
           "rel_rms_vs_fp32": None if ref32 is None else rel_rms(out.float(), ref32.float()),
           "finite": bool(torch.isfinite(out).all())}
    peak = f"{rec['mmdit_peak_gib']:6.2f}" if wg is not None else "   n/a"
    log(f"  {name:44s} {rec['median_ms']:8.2f} ms/step [{rec['p20_ms']:.2f}, {rec['p80_ms']:.2f}]  first "
        f"{first:6.1f}s  peak {peak} GiB  err {rec['rel_rms_vs_bf16'] or 0:.2e} (vs fp32 "
        f"{rec['rel_rms_vs_fp32'] or 0:.2e})"
        + (f"  {rec['energy_j_per_step']:.1f} J/step" if rec["energy_j_per_step"] else ""))
    return rec


def module_bytes(m: torch.nn.Module) -> int:
    seen, n = set(), 0
    for t in list(m.parameters()) + list(m.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
    return n


def attention_backends(B: int, H: int, L: int, hd: int = 64, log=print) -> dict:
    """SDPA alone at the step's joint-attention shape, per backend (the ones this torch/GPU can run)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(B, H, L, hd, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    out = {}
    for name, b in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                    ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel(b):
                y = F.scaled_dot_product_attention(q, k, v)
                ms = stats(cuda_times(lambda: F.scaled_dot_product_attention(q, k, v), iters=20))["median_ms"]
            out[name] = {"ms": ms, "tflops": 4 * B * H * L * L * hd / ms / 1e9, "rel_rms": rel_rms(y, ref)}
            r = out[name]
            log(f"  attention {name:10s} {ms:7.3f} ms  {r['tflops']:6.1f} TFLOP/s  err {r['rel_rms']:.1e}")
        except RuntimeError as e:
            out[name] = {"error": str(e)[:200]}
            log(f"  attention {name:10s} not available: {str(e)[:80]}")
    return out


def profile_table(fn: Callable[[], object], rows: int = 15) -> str:
    """The kernels one call spends its GPU time in (torch.profiler), as a text table."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    key = "cuda_time_total" if hasattr(prof.key_averages()[0], "cuda_time_total") else "device_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)


def image_time(step: Callable, cfg: MMDiTConfig, px: int, vae, steps: int = 28, guidance: float = 3.5) -> float:
    """Seconds for one whole image: `steps` CFG steps of the sampler plus the VAE decode (text encoding excluded)."""
    from .sampling import denoise, sigmas

    x, _, ctx, pooled = step_inputs(cfg, px, 1, seed=5)
    _, _, nctx, npooled = step_inputs(cfg, px, 1, seed=6)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in denoise(step, x, ctx, pooled, nctx, npooled, sigmas=sigmas(steps), guidance=guidance):
        x = s.latents
    vae.decode(x)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def sustained(fn: Callable[[], object], seconds: float, nv: NVML) -> dict:
    """Run fn back to back for `seconds`; GPU temperature and power at the end, energy over the run."""
    e0, t0, n = nv.energy_j(), time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
        if n % 5 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    temp, power = nv.temp_power()
    e1 = nv.energy_j()
    return {"seconds": dt, "steps": n, "temp_c_end": temp, "power_w_end": power,
            "avg_power_w": None if e0 is None or e1 is None else (e1 - e0) / dt}


def fast_options(config: str) -> dict:
    """'attn-fp8+fast-accum' -> accelerate() keywords."""
    kw = {}
    for opt in config.split("+"):
        if opt == "fast-accum":
            kw["fast_accum"] = True
        elif opt in ("triton-gemm", "gluon-gemm"):
            kw["gemm"] = opt.removesuffix("-gemm")
        elif opt.startswith("attn-"):
            kw["attention"] = opt.removeprefix("attn-")
        else:
            from .errors import InputError

            raise InputError(f"bench config {config!r}: unknown option {opt!r} "
                             "(fast-accum, triton-gemm, gluon-gemm, attn-MODE)")
    return kw


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="GPU benchmark: minisd35 bf16/FP8 vs diffusers (+torchao), one step and one image")
    b.add_argument("--variant", default="sd3.5-large", choices=["sd3.5-large", "sd3.5-medium", "sd3-medium", "tiny"])
    b.add_argument("--px", type=int, default=1024)
    b.add_argument("--batch", type=int, default=2, help="2 = one CFG step for one image")
    b.add_argument("--policies", default="default,row,tensor,weight-only")
    b.add_argument("--attention", default="triton,fp8",
                   help="fast.py attention modes to time besides SDPA (bf16 model: all but fp8; first FP8 policy: "
                        "all; with fp8 also the per-layer FP8 attention audit)")
    b.add_argument("--configs", help="comma list of fast-path options for the first FP8 policy, each '+'-joined "
                   "from fast-accum, triton-gemm, gluon-gemm, attn-MODE (default: see run_bench)")
    b.add_argument("--peers", default="diffusers,torchao", help="comma list; '' for none")
    b.add_argument("--compile", action="store_true", help="also torch.compile the torchao model (minutes)")
    b.add_argument("--plain", action="store_true", help="also time the plain (unfused) minisd35 forward")
    b.add_argument("--image-steps", type=int, default=0, help="also time whole images of this many steps + VAE")
    b.add_argument("--sustained", type=float, default=0, help="seconds of back-to-back steps for temperature/power")
    b.add_argument("--profile", action="store_true", help="print the top kernels of one step per system family")
    b.add_argument("--iters", type=int, default=10)
    b.add_argument("--out", help="write the JSON here (atomic)")
    b.set_defaults(func=cmd_bench)


def run_bench(variant: str = "sd3.5-large", px: int = 1024, batch: int = 2, policies=("default",),
              peers=("diffusers", "torchao"), compile_peer: bool = False, plain: bool = False, iters: int = 10,
              image_steps: int = 0, sustained_s: float = 0, profile: bool = False, attention=("triton", "fp8"),
              configs=None, log=print) -> dict:
    """The benchmark behind `python -m minisd35 bench` (see the module docstring). configs: the fast-path options
    timed on the first FP8 policy besides its default, each '+'-joined from fast-accum, triton-gemm, gluon-gemm and
    attn-MODE; None: fast-accum, triton-gemm, attn-MODE per `attention`, and attn-fp8+fast-accum. The sustained run
    covers the default and the last config."""
    from . import fp8
    from .fast import accelerate

    if not torch.cuda.is_available():
        from .errors import HardwareError

        raise HardwareError("bench needs a CUDA GPU")
    nv = NVML()
    res = {"env": env_info(), "variant": variant, "px": px, "batch": batch, "systems": [], "images": {},
           "sustained": {}, "profiles": {}}
    missing = [p for p in peers if res["env"].get(p) is None]
    if missing:  # optional: a peer that is not installed is left out with one line, not a crash after minutes
        log(f"peers not installed, left out: {', '.join(missing)} (pip install them to compare)")
        peers = tuple(p for p in peers if p not in missing)
    res["peers"] = list(peers)
    cfg = get_preset(variant).mmdit
    log(f"{variant} {px}px batch {batch} on {res['env'].get('gpu')} (torch {res['env']['torch']}, "
        f"triton {res['env']['triton']})")
    model = random_mmdit(cfg)
    inputs = step_inputs(cfg, px, batch)
    x, t, ctx, pooled = inputs
    L = (px // 16) ** 2 + ctx.shape[1]
    vae = None
    if image_steps:
        from .config import VAEConfig
        from .vae import VAE, random_vae_state

        with torch.device("meta"):
            vae = VAE(VAEConfig(), with_encoder=False)
        st = random_vae_state(VAEConfig(), 0)
        vae.load_state_dict({k: v for k, v in st.items() if k in vae.state_dict()}, assign=True)
        vae = vae.to("cuda", torch.bfloat16).eval()

    def fresh():
        """A new MMDiT object sharing the bf16 weights (so swaps and fusions do not touch `model`)."""
        with torch.device("meta"):
            m = MMDiT(cfg)
        m.load_state_dict(model.state_dict(), assign=True)
        return m.eval()

    def run(name, step, weights, prof=False):
        rec = measure(name, lambda: step(*inputs), ref, nv, iters, weights, log, ref32)
        if image_steps:
            rec["image_s"] = image_time(step, cfg, px, vae, image_steps)
            log(f"    whole image ({image_steps} steps + VAE decode): {rec['image_s']:.2f} s")
        if prof:
            res["profiles"][name] = profile_table(lambda: step(*inputs))
            log(res["profiles"][name])
        res["systems"].append(rec)
        return rec

    with torch.inference_mode():
        res["attention"] = attention_backends(batch, cfg.heads, L, cfg.head_dim, log)
        # the fp32 run of the same weights: every system's error against it, next to plain bf16's own, shows
        # which part of an error is bf16 noise (bf16 -> fp32 -> bf16 is exact, so the model is unchanged after)
        model.float()
        ref32 = model(*(a.float() for a in inputs))
        model.to(torch.bfloat16)
        ref = model(*inputs)
        wb = module_bytes(model)
        if plain:
            run("minisd35 bf16 plain", model, wb, profile)
        run("minisd35 bf16", accelerate(fresh()), wb, profile)
        for att in attention:
            if att != "fp8":
                run(f"minisd35 bf16 attn-{att}", accelerate(fresh(), attention=att), wb)
        if "diffusers" in peers:
            dm = diffusers_from_mmdit(model)
            dcall = lambda x, t, ctx, pooled, skip_layers=(): dm(hidden_states=x, timestep=t,
                                                                  encoder_hidden_states=ctx,
                                                                  pooled_projections=pooled, return_dict=False)[0]
            run("diffusers bf16 eager", dcall, module_bytes(dm), profile)
            if sustained_s:
                res["sustained"]["diffusers bf16 eager"] = sustained(lambda: dcall(*inputs), sustained_s, nv)
            if "torchao" in peers:
                try:
                    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

                    quantize_(dm, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
                    run("diffusers+torchao fp8 row eager", dcall, module_bytes(dm))
                    if compile_peer:
                        dmc = torch.compile(dm)
                        ccall = lambda x, t, ctx, pooled, skip_layers=(): dmc(
                            hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled,
                            return_dict=False)[0]
                        run("diffusers+torchao fp8 row compiled", ccall, module_bytes(dm))
                except ImportError as e:
                    log(f"  torchao not available: {e}")
            del dm
            gc.collect()
            torch.cuda.empty_cache()
        for pol in policies:
            q = fresh()
            fp8.quantize(q, pol)
            qb = module_bytes(q)
            if plain:
                run(f"minisd35 fp8 {pol} plain", q, qb)
            run(f"minisd35 fp8 {pol}", accelerate(q), qb, profile and pol == policies[0])
            if pol == policies[0]:
                if configs is None:
                    configs = ("fast-accum", *(("triton-gemm",) if fp8.has_triton() else ()),
                               *(f"attn-{a}" for a in attention), *(("attn-fp8+fast-accum",) if "fp8" in attention
                                                                    else ()))
                for c in configs:
                    run(f"minisd35 fp8 {pol} {c.replace('+', ' ')}", accelerate(q, **fast_options(c)), qb)
                if "fp8" in attention:
                    from .audit import attention_audit

                    res["attention_audit"] = attention_audit(q, inputs)
                    log(f"  FP8 attention audit: step rel RMS {res['attention_audit']['step_rel_rms']:.3g}, worst "
                        f"layer {res['attention_audit']['max_layer_rel_rms']}")
                if sustained_s:
                    step = accelerate(q)
                    res["sustained"][f"minisd35 fp8 {pol}"] = sustained(lambda: step(*inputs), sustained_s, nv)
                    if configs:
                        step = accelerate(q, **fast_options(configs[-1]))
                        res["sustained"][f"minisd35 fp8 {pol} {configs[-1].replace('+', ' ')}"] = sustained(
                            lambda: step(*inputs), sustained_s, nv)
            del q
            gc.collect()
            torch.cuda.empty_cache()
    return res


def cmd_bench(args) -> int:
    from .checkpoint import write_atomic

    res = run_bench(args.variant, args.px, args.batch, tuple(p for p in args.policies.split(",") if p),
                    tuple(p for p in args.peers.split(",") if p), args.compile, args.plain, args.iters,
                    args.image_steps, args.sustained, args.profile,
                    tuple(a for a in args.attention.split(",") if a),
                    None if args.configs is None else tuple(c for c in args.configs.split(",") if c))
    line = json.dumps(res)
    if args.out:
        write_atomic(args.out, lambda tmp: Path(tmp).write_text(line + "\n"), force=True)
    print(line)
    return 0
