"""FP8 E4M3 inference as a module swap applied from outside the model.

The format. float8_e4m3fn has 1 sign bit, 4 exponent bits (bias 7) and 3 mantissa bits: 8 values per power of two,
so neighbouring values differ by 6.25% to 12.5% (worst-case relative rounding error 2^-4 = 6.25%). The largest finite
value is 448 (S.1111.110); S.1111.111 is NaN and there is no Inf. Normal numbers go down to 2^-6; subnormals (exponent
0) to 2^-9; anything below half of that flushes to 0. So E4M3 covers about 2^18 of dynamic range with 3 bits of
precision, and a tensor must be SCALED into that window before the cast:

    scale = amax / 448        x_fp8 = cast(clamp(x / scale, -448, 448))        x ~= x_fp8 * scale

Here a "scale" is always the dequantisation multiplier, kept in fp32, with a floor so that an all-zero row or tensor
does not divide by zero. Every cast clamps to +-448 first: PyTorch versions disagree on whether an overflowing cast
saturates (before 2.12: 465 -> NaN), and Triton's interpreter returns NaN or wraps (465 -> NaN, 1000 -> 256).

Granularity. One scale for a whole tensor ("tensor") is cheapest but one outlier shrinks everybody's precision; one
scale per output channel of a weight and one per token of an activation ("row") isolates outliers for the cost of two
vectors in the GEMM epilogue: Y[m, n] = sa[m] * sw[n] * sum_k a8[m, k] w8[n, k].

Recipes (per nn.Linear, chosen by a policy on the module's full name; first matching rule wins):
    w8a8-row     E4M3 weight with per-output-channel scales; activations quantised on the fly, one scale per token;
                 FP8 x FP8 tensor-core GEMM (needs compute capability >= 8.9: Ada, Hopper)
    w8a8-tensor  one scale per weight tensor and one per activation tensor, dynamic (amax of each call) or static
                 (calibrated: `calibrate`)
    w8-only      E4M3 weight storage with per-channel scales, bf16/fp16 compute: the weight is dequantised inside
                 the GEMM. Halves weight memory on any GPU (RTX 30xx has no FP8 tensor cores) and speeds up the
                 memory-bound M=2 adaLN modulation GEMVs
    bf16         left as it is

Why the default policy keeps some layers out: the embedders (x/t/y/context) and the final layer are tiny in FLOPs
and their errors reach every token; the adaLN modulations produce the shift/scale/gate vectors that multiply every
token of a block, so they get weight-only FP8 (their activation is a single [B, D] vector: nothing to gain from
FP8 compute). The audit (audit.py) measures all of this per layer.

Implementations of each quantised op, chosen once per device and overridable (quantize(impl=...), the
MINISD35_FP8_IMPL environment variable, or set_impl()):
    ref     plain torch: dequantise and multiply in fp32; the numerical ground truth; runs on any device
    torch   torch._scaled_mm (cuBLASLt / CUTLASS) for W8A8; dequantise + F.linear for w8-only
    triton  the kernels in kernels/ (fused quantisation, FP8 GEMM with scaling/bias in the epilogue, fused-dequant
            weight-only GEMM)
Without CUDA: ref. On CUDA without triton: torch (one message). W8A8 asked on a GPU without FP8 tensor cores runs
as w8-only (one message; the Pipeline converts such layers when it is built, see weight_only_fallback).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, InputError, list_keys

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
SCALE_FLOOR = 1e-12  # scale = max(amax, floor) / 448: an all-zero row quantises to zeros, not NaN
RECIPES = ("w8a8-row", "w8a8-tensor", "w8-only", "bf16")
IMPLS = ("ref", "torch", "triton")


# --- quantisation math (plain torch: the reference every kernel is checked against) --------------------------------

def amax_scale(amax: torch.Tensor) -> torch.Tensor:
    return amax.float().clamp(min=SCALE_FLOOR) / E4M3_MAX


def scales_from_amax(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, inverse) = (amax / 448, 448 / amax), each one IEEE fp32 division, amax floored. Quantising multiplies
    by the inverse, exactly as the Triton kernels do, so the reference and the kernels give the same codes."""
    a = amax.float().clamp(min=SCALE_FLOOR)
    return a / E4M3_MAX, E4M3_MAX / a


def to_e4m3(x: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """x * inv (inv = 1 / scale), clamped to +-448, cast with round-to-nearest-even. inv broadcasts against x."""
    return (x.float() * inv).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def quantize_weight(w: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (w8 [N, K] e4m3, scale fp32 [N] or [1])."""
    wf = w.float()
    amax = wf.abs().amax(dim=1) if per_channel else wf.abs().amax().reshape(1)
    scale, inv = scales_from_amax(amax)
    return to_e4m3(wf, inv[:, None]), scale


def quantize_act(x: torch.Tensor, per_token: bool = True, scale: torch.Tensor | None = None):
    """x [M, K] -> (x8 [M, K] e4m3, scale fp32 [M] or [1]). A given (static) scale is used as is."""
    if scale is None:
        xf = x.float()
        amax = xf.abs().amax(dim=1) if per_token else xf.abs().amax().reshape(1)
        scale, inv = scales_from_amax(amax)
    else:
        scale = scale.float().reshape(-1)
        inv = 1.0 / scale
    return to_e4m3(x, inv.reshape(-1, 1)), scale.reshape(-1)


def dequantize(w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return w8.float() * scale.reshape(-1, 1).float()


# --- implementation choice -------------------------------------------------------------------------------------------

_override: str | None = None  # set_impl() for tests; None = automatic
_warned: set[str] = set()


def warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, stacklevel=3)


def set_impl(impl: str | None) -> None:
    """Force one implementation everywhere (tests, benchmarks); None restores the automatic choice."""
    if impl is not None and impl not in IMPLS:
        raise InputError(f"unknown FP8 implementation {impl!r}; choose one of {', '.join(IMPLS)}")
    global _override
    _override = impl


def has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def fp8_compute_capable(device: torch.device) -> bool:
    """FP8 tensor cores: compute capability 8.9 (Ada) or 9.x (Hopper) and newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fallback_recipe(recipe: str, device: torch.device) -> str:
    """The recipe a layer can run on `device`: W8A8 needs FP8 tensor cores (compute capability >= 8.9); on an
    older CUDA GPU (RTX 30xx, A100, ...) it runs weight-only instead, which still halves the weight memory. Says so
    once per process."""
    if recipe in ("w8a8-row", "w8a8-tensor") and device.type == "cuda" and not fp8_compute_capable(device):
        warn_once("w8a8-fallback", f"{torch.cuda.get_device_name(device)} has no FP8 tensor cores (compute "
                                   f"capability < 8.9): W8A8 layers run weight-only (FP8 storage, 16-bit compute); "
                                   f"--fp8 weight-only says the same without this message")
        return "w8-only"
    return recipe


def weight_only_fallback(model: nn.Module, device: torch.device) -> int:
    """Make every W8A8 FP8Linear of `model` weight-only when `device` cannot run FP8 x FP8 GEMMs (fallback_recipe),
    before the model runs there, so that every forward (the plain one and fast.py's fused one) takes the weight-only
    path. Returns the number of layers changed."""
    n = 0
    for m in fp8_layers(model).values():
        recipe = fallback_recipe(m.recipe, device)
        if recipe != m.recipe:
            m.recipe = recipe
            n += 1
    return n


def resolve_impl(device: torch.device, requested: str | None = None) -> str:
    impl = requested or _override or os.environ.get("MINISD35_FP8_IMPL") or None
    if impl is not None and impl not in IMPLS:
        raise InputError(f"unknown FP8 implementation {impl!r} (MINISD35_FP8_IMPL?); choose one of {', '.join(IMPLS)}")
    if device.type != "cuda":
        if impl not in (None, "ref"):
            warn_once(f"cpu-{impl}", f"FP8 implementation {impl!r} needs a CUDA GPU; using 'ref' on {device.type}")
        return "ref"
    if impl is None:
        if has_triton():
            return "triton"
        warn_once("no-triton", "triton is not installed: FP8 runs on torch's own ops ('torch'); "
                               "pip install minisd35[gpu] for the fused kernels")
        return "torch"
    if impl == "triton" and not has_triton():
        warn_once("no-triton-asked", "triton is not installed: using 'torch' instead of 'triton'")
        return "torch"
    return impl


# --- the quantised linear --------------------------------------------------------------------------------------------

class FP8Linear(nn.Module):
    """A Linear whose weight is stored in E4M3 with fp32 scales. State dict: weight (e4m3 [N, K]), weight_scale
    (fp32 [N] or [1]), bias (compute dtype) and, for static per-tensor activation scaling, input_scale (fp32 [1]).
    The storage dtypes survive model.to(dtype): only the bias follows the model's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool, recipe: str, per_channel: bool = True,
                 static_input: bool = False, dtype: torch.dtype = torch.bfloat16, impl: str | None = None):
        super().__init__()
        if recipe not in RECIPES[:3]:
            raise InputError(f"FP8Linear recipe must be one of {RECIPES[:3]}, not {recipe!r}")
        self.in_features, self.out_features, self.recipe, self.impl = in_features, out_features, recipe, impl
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=E4M3))
        self.register_buffer("weight_scale", torch.empty(out_features if per_channel else 1, dtype=torch.float32))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype) if bias else None)
        self.register_buffer("input_scale", torch.empty(1, dtype=torch.float32) if static_input else None)
        self.original: tuple[torch.Tensor, torch.Tensor | None] | None = None  # bf16 weights kept for A/B runs
        self.use_original = False
        self.calib_amax: torch.Tensor | None = None  # running activation amax while calibrating

    @classmethod
    def from_linear(cls, lin: nn.Linear, recipe: str, keep_original: bool = False, impl: str | None = None):
        w = lin.weight.detach()
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, recipe, per_channel=recipe != "w8a8-tensor",
                dtype=w.dtype, impl=impl)
        m.weight, m.weight_scale = quantize_weight(w, per_channel=recipe != "w8a8-tensor")
        m.bias = None if lin.bias is None else lin.bias.detach()
        if keep_original:
            m.original = (w, m.bias)
        return m

    def _apply(self, fn, recurse=True):
        # nn.Module.to(dtype) would cast the e4m3 weight and the fp32 scales: move them, cast only the bias.
        probe = fn(torch.zeros((), device=self.weight.device))
        for name in ("weight", "weight_scale", "input_scale"):
            t = self._buffers.get(name)
            if t is not None:
                self._buffers[name] = t.to(probe.device)
        if self.bias is not None:
            self._buffers["bias"] = fn(self.bias)
        if self.original is not None:
            self.original = tuple(None if t is None else fn(t) for t in self.original)
        return self

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, recipe={self.recipe}, impl={self.impl or 'auto'}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_original:
            w, b = self.original
            return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.calib_amax is not None:
            self.calib_amax = torch.maximum(self.calib_amax, x2.detach().abs().amax().float())
        impl = resolve_impl(x.device, self.impl)
        y = LINEAR[impl](self, x2, fallback_recipe(self.recipe, x.device))
        return y.reshape(*shape[:-1], self.out_features)


def _bias(m: FP8Linear, dtype):
    return None if m.bias is None else m.bias.to(dtype)


def _linear_ref(m: FP8Linear, x: torch.Tensor, recipe: str) -> torch.Tensor:
    w = dequantize(m.weight, m.weight_scale)  # fp32
    if recipe == "w8-only":
        return F.linear(x, w.to(x.dtype), _bias(m, x.dtype))
    xq, xs = quantize_act(x, per_token=recipe == "w8a8-row", scale=m.input_scale)
    y = dequantize(xq, xs) @ w.t()  # every product of two E4M3 values is exact in fp32; the sum rounds in fp32
    if m.bias is not None:
        y = y + m.bias.float()
    return y.to(x.dtype)


def _linear_torch(m: FP8Linear, x: torch.Tensor, recipe: str) -> torch.Tensor:
    if recipe == "w8-only" or m.in_features % 16 or m.out_features % 16:  # cuBLASLt FP8 needs K, N % 16 == 0
        if recipe != "w8-only":
            warn_once(f"torch-shape-{m.in_features}x{m.out_features}",
                      f"torch._scaled_mm needs K and N multiples of 16; a {m.in_features}->{m.out_features} "
                      f"layer runs on the reference path")
            return _linear_ref(m, x, recipe)
        return F.linear(x, dequantize(m.weight, m.weight_scale).to(x.dtype), _bias(m, x.dtype))
    xq, xs = quantize_act(x, per_token=recipe == "w8a8-row", scale=m.input_scale)
    return scaled_mm(xq, xs, m.weight, m.weight_scale, _bias(m, x.dtype), x.dtype)


_BIAS_IN_MM: dict = {}  # (row-wise?, device) -> does this torch's _scaled_mm take the bias itself?


def scaled_mm(a8: torch.Tensor, sa: torch.Tensor, w8: torch.Tensor, sw: torch.Tensor, bias, out_dtype,
              fast_accum: bool = False) -> torch.Tensor:
    """torch._scaled_mm with the layouts it wants: A row-major [M, K], B column-major [K, N] (w8.t() of a row-major
    [N, K] weight is exactly that, for free). Row-wise scales are [M, 1] and [1, N]; tensor-wise are scalars.
    The bias goes into the GEMM's epilogue where this torch supports it (measured on an H200: adding it outside
    costs one more pass over the output, ~60 us per SD3.5 Large GEMM, 19 ms per step); else it is added after.
    fast_accum=False promotes the FP8 accumulator to fp32 every 128 of K (see kernels/fp8_gemm.py)."""
    M, N = a8.shape[0], w8.shape[0]
    rowwise = not (sa.numel() == 1 and sw.numel() == 1)
    if rowwise:
        sa_, sw_ = sa.reshape(-1, 1).expand(M, 1).contiguous(), sw.reshape(1, -1).expand(1, N).contiguous()
    else:
        sa_, sw_ = sa.reshape(()), sw.reshape(())
    key = (rowwise, a8.device, out_dtype)
    if bias is not None and _BIAS_IN_MM.get(key, True):
        try:
            return torch._scaled_mm(a8, w8.t(), scale_a=sa_, scale_b=sw_, bias=bias.to(out_dtype),
                                    out_dtype=out_dtype, use_fast_accum=fast_accum)
        except RuntimeError:
            _BIAS_IN_MM[key] = False
    y = torch._scaled_mm(a8, w8.t(), scale_a=sa_, scale_b=sw_, out_dtype=out_dtype, use_fast_accum=fast_accum)
    return y if bias is None else y + bias


def _linear_triton(m: FP8Linear, x: torch.Tensor, recipe: str) -> torch.Tensor:
    if recipe == "w8-only":
        from kernels.fp8_dequant_gemm import dequant_gemm

        # pdl: the weight is a static parameter, never the previous kernel's output (see dequant_gemm)
        return dequant_gemm(x.contiguous(), m.weight, m.weight_scale, _bias(m, x.dtype), pdl=True)
    from kernels.fp8_gemm import fp8_gemm
    from kernels.fp8_quant import quant_fp8

    if m.input_scale is not None:
        xq, xs = quantize_act(x, per_token=False, scale=m.input_scale)
    else:
        xq, xs = quant_fp8(x.contiguous(), per_token=recipe == "w8a8-row")
    return fp8_gemm(xq, xs, m.weight, m.weight_scale, _bias(m, x.dtype), out_dtype=x.dtype)


LINEAR = {"ref": _linear_ref, "torch": _linear_torch, "triton": _linear_triton}


# --- policies ---------------------------------------------------------------------------------------------------------

_BLOCK_LINEARS = ["joint_blocks.*.attn.qkv", "joint_blocks.*.attn.proj", "joint_blocks.*.attn2.qkv",
                  "joint_blocks.*.attn2.proj", "joint_blocks.*.mlp.fc1", "joint_blocks.*.mlp.fc2"]
_T5_LINEARS = ["encoder.block.*.layer.0.SelfAttention.[qkvo]", "encoder.block.*.layer.1.DenseReluDense.w*"]

POLICIES: dict[str, list[tuple[str, str]]] = {
    # MMDiT: block GEMMs in FP8 x FP8, adaLN weight-only, embedders and final layer untouched (see the docstring)
    "default": [(p, "w8a8-row") for p in _BLOCK_LINEARS] + [("joint_blocks.*.adaLN_modulation.1", "w8-only"),
                                                             ("*", "bf16")],
    "row": [(p, "w8a8-row") for p in _BLOCK_LINEARS] + [("joint_blocks.*.adaLN_modulation.1", "w8a8-row"),
                                                         ("*", "bf16")],
    "tensor": [(p, "w8a8-tensor") for p in _BLOCK_LINEARS] + [("joint_blocks.*.adaLN_modulation.1", "w8-only"),
                                                               ("*", "bf16")],
    "weight-only": [(p, "w8-only") for p in _BLOCK_LINEARS] + [("joint_blocks.*.adaLN_modulation.1", "w8-only"),
                                                                ("*", "bf16")],
    "bf16": [("*", "bf16")],
    # T5-XXL: every projection weight-only (compute stays bf16, so wo's large activations never meet an FP8 cast):
    # 9.5 GB -> 4.8 GB. The embedding and norms stay as they are.
    "t5-w8": [(p, "w8-only") for p in _T5_LINEARS] + [("*", "bf16")],
    # CLIP-L weight-only; CLIP-G is known to suffer from 8-bit weights (Quanto blog), so its policy is separate
    "clip-w8": [("text_model.encoder.layers.*", "w8-only"), ("*", "bf16")],
}


@dataclass
class Policy:
    """Ordered (glob on the module's full name -> recipe) rules; the first match wins; no match means bf16."""

    name: str
    rules: list[tuple[str, str]]

    def __post_init__(self):
        for pat, recipe in self.rules:
            if recipe not in RECIPES:
                raise InputError(f"policy {self.name!r}: unknown recipe {recipe!r} for {pat!r}; "
                                 f"choose one of {', '.join(RECIPES)}")

    def recipe_for(self, name: str) -> tuple[str, str | None]:
        for pat, recipe in self.rules:
            if fnmatch.fnmatchcase(name, pat):
                return recipe, pat
        return "bf16", None

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "rules": [list(r) for r in self.rules]})

    def save(self, path: str | Path, force: bool = False) -> Path:
        from .checkpoint import write_atomic

        text = json.dumps({"name": self.name, "rules": [list(r) for r in self.rules]}, indent=1)
        return write_atomic(path, lambda tmp: Path(tmp).write_text(text + "\n"), force=force)


def get_policy(spec: str | Policy | list) -> Policy:
    """A policy by name ('default', 'row', 'tensor', 'weight-only', 'bf16', 't5-w8', 'clip-w8'), from a JSON file
    ({"name": ..., "rules": [[glob, recipe], ...]}), or from a list of (glob, recipe)."""
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, list):
        return Policy("custom", [tuple(r) for r in spec])
    if spec in POLICIES:
        return Policy(spec, POLICIES[spec])
    path = Path(spec)
    if path.suffix == ".json" or path.is_file():
        try:
            d = json.loads(path.read_text())
            return Policy(d.get("name", path.stem), [tuple(r) for r in d["rules"]])
        except FileNotFoundError:
            raise InputError(f"policy file {path} does not exist") from None
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"policy file {path}: expected {{\"rules\": [[glob, recipe], ...]}} ({e})") from None
    raise InputError(f"unknown FP8 policy {spec!r}; choose one of {', '.join(POLICIES)} or give a .json policy file")


@dataclass
class QuantReport:
    total: int = 0
    converted: Counter = field(default_factory=Counter)  # recipe -> count
    kept: dict[str, str] = field(default_factory=dict)  # layer -> why

    def __str__(self) -> str:
        n = sum(self.converted.values())
        recipes = ", ".join(f"{r} {c}" for r, c in sorted(self.converted.items()))
        why = Counter(self.kept.values())
        kept = "; ".join(f"{c} by {w}" for w, c in why.most_common())
        return (f"converted {n} of {self.total} linears ({recipes or 'none'}), kept {len(self.kept)} in high precision"
                + (f": {list_keys(self.kept, 4)} ({kept})" if self.kept else ""))


def quantize(model: nn.Module, policy: str | Policy | list = "default", *, impl: str | None = None,
             keep_original: bool = False, verbose: bool = False, device=None) -> QuantReport:
    """Replace every nn.Linear whose full name the policy maps to an FP8 recipe by an FP8Linear, in place.
    keep_original keeps the bf16 weights too (for `original_weights` A/B runs; costs their memory). device: move
    each converted layer there first and quantise it there (a CPU-loaded T5-XXL quantises in seconds on a GPU;
    its FP8 layers then live on that device)."""
    pol = get_policy(policy)
    report = QuantReport()
    for name, lin in list(model.named_modules()):
        if not isinstance(lin, nn.Linear):
            continue
        report.total += 1
        recipe, pat = pol.recipe_for(name)
        if recipe == "bf16":
            report.kept[name] = f"rule {pat!r}" if pat else "no rule"
            continue
        parent, _, attr = name.rpartition(".")
        src = lin if device is None else lin.to(device)
        setattr(model.get_submodule(parent) if parent else model, attr,
                FP8Linear.from_linear(src, recipe, keep_original=keep_original, impl=impl))
        report.converted[recipe] += 1
    if verbose:
        print(report)
    return report


def fp8_layers(model: nn.Module) -> dict[str, FP8Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FP8Linear)}


@contextlib.contextmanager
def original_weights(model: nn.Module):
    """Run a quantised model on its original bf16 weights inside the block (they must have been kept:
    quantize(..., keep_original=True))."""
    layers = fp8_layers(model)
    missing = [n for n, m in layers.items() if m.original is None]
    if missing:
        raise InputError(f"the original weights of {len(missing)} FP8 layers were not kept ({list_keys(missing, 3)}); "
                         f"quantize with keep_original=True for A/B runs")
    for m in layers.values():
        m.use_original = True
    try:
        yield model
    finally:
        for m in layers.values():
            m.use_original = False


@contextlib.contextmanager
def calibrate(model: nn.Module):
    """Record each w8a8-tensor layer's activation amax over the runs inside the block, then freeze it as a static
    input scale (amax / 448). Layers of other recipes are left dynamic."""
    layers = {n: m for n, m in fp8_layers(model).items() if m.recipe == "w8a8-tensor"}
    for m in layers.values():
        m.calib_amax = torch.zeros((), device=m.weight.device)
    try:
        yield model
    finally:
        for m in layers.values():
            m.input_scale = amax_scale(m.calib_amax.reshape(1))
            m.calib_amax = None


# --- FP8 checkpoints: saving minisd35 files, loading ours and ComfyUI's ---------------------------------------------

META_POLICY, META_RECIPES, META_SOURCE = "minisd35.fp8_policy", "minisd35.fp8_recipes", "minisd35.source"


def quantized_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict with fp8 weights and scales, {layer: recipe}) of a quantised model."""
    return model.state_dict(), {n: m.recipe for n, m in fp8_layers(model).items()}


def check_scale(scale: torch.Tensor, n_out: int, source: str, key: str) -> torch.Tensor:
    s = scale.float().reshape(-1)
    if s.numel() not in (1, n_out):
        raise CheckpointError(f"{source}: scale {key!r} has {s.numel()} values; expected 1 (per tensor) or {n_out} "
                              f"(per output channel)")
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        bad = s[~torch.isfinite(s) | (s <= 0)][:3].tolist()
        raise CheckpointError(f"{source}: scale {key!r} holds zero, negative or NaN values {bad}; an FP8 scale must be "
                              f"a positive finite number (re-quantize the file)")
    return s


def plan_quantize(model: nn.Module, plan: dict, policy: str | Policy | list, device, impl: str | None = None,
                  dtype: torch.dtype = torch.bfloat16) -> tuple[dict, frozenset[str], QuantReport]:
    """Quantise while loading: swap the Linears the policy converts for FP8Linears on the meta-device model and
    change the load plan so each weight is read, moved to `device`, quantised there and only then kept. Peak memory
    is the quantised model plus one layer in bf16, never the whole bf16 model. Returns (plan, keys whose dtype must
    be kept, report)."""
    from .weights import Planned

    pol = get_policy(policy)
    report = QuantReport()
    new_plan, keep = {}, set()
    layers = {}
    for name, lin in model.named_modules():
        if isinstance(lin, FP8Linear):
            report.total += 1
            report.converted[lin.recipe] += 1  # FP8 in the file already
        elif isinstance(lin, nn.Linear):
            report.total += 1
            recipe, pat = pol.recipe_for(name)
            if recipe == "bf16":
                report.kept[name] = f"rule {pat!r}" if pat else "no rule"
            else:
                layers[name] = (lin, recipe)
                report.converted[recipe] += 1
    for name, (lin, recipe) in layers.items():
        parent, _, attr = name.rpartition(".")
        per_channel = recipe != "w8a8-tensor"
        setattr(model.get_submodule(parent) if parent else model, attr,
                FP8Linear(lin.in_features, lin.out_features, lin.bias is not None, recipe, per_channel, dtype=dtype,
                          impl=impl))
    for k, p in plan.items():
        layer = k.rsplit(".", 1)[0]
        if k.endswith(".weight") and layer in layers:
            cache = {}

            def make_w(p=p, cache=cache, pc=layers[layer][1] != "w8a8-tensor"):
                w8, s = quantize_weight(p.make().to(device), per_channel=pc)
                cache["scale"] = s
                return w8

            new_plan[k] = Planned(p.shape, E4M3, make_w, p.source)
            n = p.shape[0] if layers[layer][1] != "w8a8-tensor" else 1
            new_plan[f"{layer}.weight_scale"] = Planned((n,), torch.float32, lambda c=cache: c.pop("scale"),
                                                        f"{p.source} (scale)")
            keep |= {k, f"{layer}.weight_scale"}
        else:
            new_plan[k] = p
    return new_plan, frozenset(keep), report


def prepare_fp8_load(model: nn.Module, plan: dict, side: dict, layers: list[str], source: str, dtype: torch.dtype,
                     impl: str | None = None, recipes: dict[str, str] | None = None,
                     policy: str | Policy | list | None = None):
    """Called by the loader (weights.py) on a meta-device model when a file holds FP8 linears: swap those Linears
    for FP8Linears (the weight stays E4M3, nothing is upcast) and add the scales to the load plan.

    Recipes: a minisd35 file names each layer's recipe in its metadata; otherwise (ComfyUI scaled fp8, plain e4m3
    files) the default policy's recipe is used, and layers the policy keeps in bf16 run weight-only, since their
    weights are FP8 already. A per-tensor weight scale works with every recipe (it broadcasts over channels).
    Returns (plan, keys whose dtype must be kept)."""
    from .weights import Planned

    recipes = recipes or {}
    pol = get_policy(policy or "default")
    keep = set()
    no_scale = []
    for layer in layers:
        wkey = f"{layer}.weight"
        try:
            lin = model.get_submodule(layer)
        except AttributeError:
            lin = None
        if not isinstance(lin, nn.Linear) or wkey not in plan:
            raise CheckpointError(f"{source}: FP8 scale or weight for {layer!r}, which is not a linear layer of the "
                                  f"model (only nn.Linear weights can be FP8 here)")
        entry = side.get(layer, {})
        if "comfy_quant" in entry:
            try:
                fmt = json.loads(bytes(entry["comfy_quant"].make().tolist()).decode()).get("format", "float8_e4m3fn")
            except (ValueError, TypeError, AttributeError, OverflowError) as e:
                raise CheckpointError(f"{source}: {layer}.comfy_quant is not a JSON object in bytes ({e})") from None
            if fmt != "float8_e4m3fn":
                raise CheckpointError(f"{source}: layer {layer!r} uses quantisation format {fmt!r}; minisd35 reads "
                                      f"float8_e4m3fn only")
        if plan[wkey].dtype != E4M3:
            scales = list(entry)
            why = (f"it has FP8 scales ({', '.join(scales)}) but is stored as {plan[wkey].dtype}: a scale belongs to "
                   f"a float8_e4m3fn weight (the file was converted incompletely)" if plan[wkey].dtype not in
                   (torch.float8_e5m2,) and scales else f"it is {plan[wkey].dtype}; minisd35 reads FP8 weights in "
                   f"float8_e4m3fn only (convert e5m2 files to e4m3 or to bf16)")
            raise CheckpointError(f"{source}: {wkey}: {why}")
        recipe = recipes.get(layer) or pol.recipe_for(layer)[0]
        if recipe == "bf16":
            recipe = "w8-only"
        n_out = lin.out_features
        if "weight_scale" in entry:
            sp = entry["weight_scale"]
            per_channel = int(torch.Size(sp.shape).numel()) == n_out and n_out > 1
            make = lambda sp=sp, n=n_out: check_scale(sp.make(), n, source, sp.source)
            plan[f"{layer}.weight_scale"] = Planned((n_out if per_channel else 1,), torch.float32, make, sp.source)
        else:
            no_scale.append(layer)
            per_channel = False
            plan[f"{layer}.weight_scale"] = Planned((1,), torch.float32, lambda: torch.ones(1), f"{wkey} (scale 1)")
        static = "input_scale" in entry and recipe == "w8a8-tensor" and layer in recipes
        if static:
            ip = entry["input_scale"]
            make = lambda ip=ip: check_scale(ip.make(), 1, source, ip.source)
            plan[f"{layer}.input_scale"] = Planned((1,), torch.float32, make, ip.source)
        parent, _, attr = layer.rpartition(".")
        new = FP8Linear(lin.in_features, n_out, lin.bias is not None, recipe, per_channel=per_channel,
                        static_input=static, dtype=dtype, impl=impl)
        setattr(model.get_submodule(parent) if parent else model, attr, new)
        keep |= {wkey, f"{layer}.weight_scale", f"{layer}.input_scale"}
    if no_scale:
        warn_once(f"noscale-{source}", f"{source}: {len(no_scale)} FP8 weights have no scale "
                                       f"({list_keys(no_scale, 3)}); using scale 1, as plain e4m3 files mean")
    return plan, frozenset(keep)


def save_quantized(model: nn.Module, dest: str | Path, *, policy: Policy, source: str, prefix: str = "",
                   extra_metadata: dict[str, str] | None = None, force: bool = False) -> Path:
    """Write a quantised model as one safetensors file (fp8 weights + fp32 scales + the rest), atomically, with the
    policy, each layer's recipe and the source file in the metadata."""
    from .checkpoint import save_safetensors

    state, recipes = quantized_state(model)
    meta = {META_POLICY: policy.to_json(), META_RECIPES: json.dumps(recipes), META_SOURCE: str(source),
            **(extra_metadata or {})}
    return save_safetensors({prefix + k: v for k, v in state.items()}, dest, meta, force=force)


def weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
