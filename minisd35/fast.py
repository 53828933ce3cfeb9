"""The fast MMDiT forward for CUDA: the same weights and the same math as mmdit.py, with the memory-bound work fused.

Where a plain eager step of SD3.5 Large spends its time (1024 px, CFG batch 2, H200): the GEMMs need ~48 TFLOP and
attention ~15 TFLOP, about 110 ms at the rates cuBLAS and SDPA reach, yet diffusers takes 183 ms and our plain
mmdit.py 201 ms. The difference is elementwise work between the GEMMs, each op a full pass over activations of
40-160 MB: LayerNorm, modulate (two passes), QK RMSNorm in fp32 (~7 passes), concatenations, gate * y, + residual,
plus 76 separate M=2 adaLN GEMVs. With FP8 the GEMMs halve and this overhead dominates, which is why eager FP8 is
slower than bf16 elsewhere (fp8_landscape.md 1.1) unless torch.compile fuses it (minutes of compile time).

This module removes that overhead by hand, without compiling anything:
- all adaLN modulations of the model (every block, both streams, and the final layer) are ONE GEMV, since they all
  read the same SiLU(c): the weights are concatenated once into one buffer (the original modules keep views into
  it, so the state dict and memory are unchanged); FP8 weight-only adaLN runs through the fused-dequant GEMV kernel;
- LayerNorm + modulate (+ per-token FP8 quantisation for W8A8 layers) is one pass feeding each qkv / fc1 GEMM
  (kernels/ln_mod_quant.py);
- q/k RMSNorm, the head split and the [image, text] concatenation are one pass writing straight into the attention
  buffers (qk_norm_split below), laid out so that attention's output feeds the proj GEMMs without a copy;
- gate * y + residual is one pass (kernels/gated_residual.py), or the GEMM's epilogue (Triton FP8 GEMM);
- GELU + per-token quantisation of the MLP hidden state is one pass;
- attention runs on the fastest SDPA backend available on the device (cuDNN on Hopper when it works), chosen once;
  or (attention="fp8") in FP8: the QK-norm pass writes E4M3 q and k with static scales, v is quantised and
  transposed in one pass, and kernels/fp8_attention.py runs Q K^T and P V on FP8 tensor cores (see fp8_attention);
- the whole step can be captured as a CUDA graph (`graphed`), removing ~2300 kernel launches of Python overhead.

Every fused op has its plain reference (mmdit.JointBlock is the reference of the whole block); tests compare them.
Linears may be nn.Linear (bf16) or fp8.FP8Linear of any recipe: the fast path reads the same buffers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .fp8 import E4M3, E4M3_MAX, SCALE_FLOOR, FP8Linear, amax_scale, quantize_act, resolve_impl, scaled_mm, to_e4m3
from .mmdit import MMDiT, layer_norm, modulate, timestep_embedding

# --- small fused ops, each with a plain-torch fallback ---------------------------------------------------------------


def _triton_ok(x: torch.Tensor) -> bool:
    return x.is_cuda and resolve_impl(x.device) == "triton"


def ln_mod(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, rows: int) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale[b]) + shift[b] for x [B*rows, K]: one pass on CUDA."""
    if _triton_ok(x):
        from kernels.ln_mod_quant import ln_mod as k

        return k(x, shift, scale, rows)
    B = shift.shape[0]
    return modulate(layer_norm(x.view(B, rows, -1)), shift, scale).view(B * rows, -1)


def ln_mod_quant(x, shift, scale, rows):
    if _triton_ok(x):
        from kernels.ln_mod_quant import ln_mod_quant as k

        return k(x, shift, scale, rows)
    return quantize_act(ln_mod(x, shift, scale, rows), per_token=True)


def quant_rows(x: torch.Tensor):
    """Per-token FP8 of x [M, K], or of a [B, L, K] / [B, L, H, hd] view (read in place on CUDA) as [B * L, K]."""
    if _triton_ok(x):
        from kernels.fp8_quant import quant_fp8

        return quant_fp8(x, per_token=True)
    return quantize_act(rows2d(x), per_token=True)


def gelu_quant(h: torch.Tensor):
    """GELU(tanh) then per-token FP8 quantisation of the MLP hidden state [M, 4D]."""
    if _triton_ok(h):
        from kernels.gelu_quant import gelu_quant as k

        return k(h)
    return quant_rows(F.gelu(h, approximate="tanh"))


def qk_norm_split(qkv: torch.Tensor, B: int, L: int, heads: int, hd: int, ln_q, ln_k, q: torch.Tensor,
                  k: torch.Tensor, v: torch.Tensor, offset: int, q_scale: float = 1.0, k_scale: float = 1.0,
                  v_amax: torch.Tensor | None = None) -> None:
    """qkv [B*L, 3*H*hd] -> q, k (RMS-normalised per head) and v written into the attention buffers [B, H, Ltot,
    hd] at sequence positions offset..offset+L. One pass on CUDA; the reference does what mmdit.Attention does.
    E4M3 q / k buffers receive q / q_scale and k / k_scale, clamped to +-448; v_amax (fp32 [B]) is raised to max
    |v| of this stream, per batch row."""
    if _triton_ok(qkv):  # SD3 Medium has no QK-norm (Identity): the kernel then only splits
        from kernels.qk_norm import qk_norm_split as kern

        return kern(qkv, B, L, heads, hd, getattr(ln_q, "weight", None), getattr(ln_k, "weight", None),
                    getattr(ln_q, "eps", 1e-6), q, k, v, offset, q_scale, k_scale, v_amax)
    qh, kh, vh = qkv.view(B, L, 3, heads, hd).permute(2, 0, 3, 1, 4)
    for buf, norm, x, scale in ((q, ln_q, qh, q_scale), (k, ln_k, kh, k_scale)):
        y = norm(x)
        buf[:, :, offset : offset + L] = to_e4m3(y, 1.0 / scale) if buf.dtype == E4M3 else y  # as the kernel
    v[:, :, offset : offset + L] = vh
    if v_amax is not None:
        torch.maximum(v_amax, vh.abs().amax(dim=(1, 2, 3)).float().reshape(v_amax.shape), out=v_amax)


def gated_residual(y: torch.Tensor, gate: torch.Tensor, residual: torch.Tensor, rows: int) -> torch.Tensor:
    """residual + gate[b] * y for [B*rows, N] matrices: one pass (addcmul, or its kernel on CUDA) instead of two."""
    if _triton_ok(y):
        from kernels.gated_residual import gated_residual as k

        return k(y, gate, residual, rows)
    B = gate.shape[0]
    return torch.addcmul(residual.view(B, rows, -1), gate[:, None], y.view(B, rows, -1)).view(B * rows, -1)


ATTENTION_LAYOUT = "bhld"  # the default of FastMMDiT.attention_layout


def attention_buffers(B: int, H: int, L: int, hd: int, like: torch.Tensor, layout: str = ATTENTION_LAYOUT,
                      qk_dtype: torch.dtype | None = None):
    """q, k, v [B, H, L, hd]: contiguous ("bhld"), or views of [B, L, H, hd] memory ("blhd", diffusers' layout).
    SDPA writes its output in the query's layout either way (tests/test_gpu.py checks it for the default CUDA
    backend at SD3.5 Large's shape; a backend that did not would cost a copy, not correctness), and the proj
    GEMMs' quantiser reads each stream's
    slice of out.transpose(1, 2) in place, so neither layout copies the attention output (reshaping it to
    [B * L, H * hd] did: 116 copies, 4.6 ms of kernel time in one SD3.5 Large FP8 step on an H200,
    bench/results/2026-12-02_h200_session8). The two layouts measured there in one process: cuDNN's attention
    took 37.5 ms per step on "bhld" buffers and 39.7 ms on "blhd" (profiled, ungraphed), the graphed steps
    97.2 vs 97.0 ms; "bhld" stays the default. qk_dtype: q and k in another dtype than v (E4M3 for FP8 attention)."""
    dts = [qk_dtype or like.dtype] * 2 + [like.dtype]
    if layout == "blhd":
        return [torch.empty(B, L, H, hd, dtype=dt, device=like.device).transpose(1, 2) for dt in dts]
    return [torch.empty(B, H, L, hd, dtype=dt, device=like.device) for dt in dts]


def qk_fp8_scale(norm: nn.Module) -> float | None:
    """The static per-tensor dequant scale for E4M3 q (or k) after the QK RMSNorm `norm`, or None without a norm
    weight (SD3 Medium). An RMSNorm row y = x / sqrt(mean(x^2) + eps) has sum(y^2) < hd, so |y_i| < sqrt(hd), and
    |y_i * w_i| < sqrt(hd) * max|w|: that bound, with a margin for the two bf16 roundings (2**-6), maps to 448.
    The bound is reached only by a one-hot row; typical rows sit 3-8x below it, which E4M3, a floating-point format,
    absorbs with no loss of relative precision (values stay far above its 2**-6 normal limit). A static scale needs
    no amax pass over q and k, and the QK-norm kernel writes E4M3 directly."""
    w = getattr(norm, "weight", None)
    if w is None:
        return None
    bound = math.sqrt(w.numel()) * float(w.detach().float().abs().max()) * (1 + 2**-6)
    return max(bound, SCALE_FLOOR) / E4M3_MAX


def fp8_attention(q8: torch.Tensor, k8: torch.Tensor, v: torch.Tensor, q_scale: torch.Tensor,
                  k_scale: torch.Tensor, v_amax: torch.Tensor | None = None) -> torch.Tensor:
    """Attention over E4M3 q8, k8 [B, H, L, hd] (dequant scales q_scale, k_scale: fp32 [1]) and v in the model
    dtype, which is quantised here with one scale per batch row (scale = amax / 448; v_amax: max |v| per row if
    known, fp32 [B]), so that no image's rounding depends on the rest of the batch. CUDA:
    kernels/fp8_attention.py, Q K^T and P V on FP8 tensor cores. Elsewhere: the same operands dequantised, exact
    softmax in fp32 with P rounded to E4M3 as the kernel rounds it (fp8_softmax_pv)."""
    if _triton_ok(q8):
        from kernels.fp8_attention import attention, v_fp8_transposed

        vt, v_scale = v_fp8_transposed(v, v_amax)
        return attention(q8, k8, vt, q_scale, k_scale, v_scale, v_transposed=True)
    v_scale = amax_scale(v.abs().amax(dim=(1, 2, 3)) if v_amax is None else v_amax).view(-1, 1, 1, 1)
    qf, kf, vf = q8.float() * q_scale, k8.float() * k_scale, to_e4m3(v, 1.0 / v_scale).float() * v_scale
    return fp8_softmax_pv(qf, kf, vf).to(v.dtype)


def fp8_softmax_pv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v in fp32 with P rounded to E4M3 the way the kernel rounds it, so that the CPU
    draws what the GPU draws: P = exp2(s - max + 8) in (0, 256] (the kernel's P_SHIFT: probabilities down to 2^-17
    keep a code), rounded, multiplied by v, divided by the sum of the unrounded P. The kernel takes the max over the
    keys seen so far, not the whole row; the rounding is relative, so that changes only codes below 2^-9 of the
    max. q, k, v: fp32 [B, H, L, hd] (already dequantised)."""
    s = (q @ k.transpose(-1, -2)) * (math.log2(math.e) / math.sqrt(q.shape[-1]))
    p = torch.exp2(s - s.amax(-1, keepdim=True) + 8.0)
    return (p.to(E4M3).float() @ v) / p.sum(-1, keepdim=True)


def rows2d(x: torch.Tensor) -> torch.Tensor:
    """[M, K], [B, L, K] or [B, L, H, hd] -> the [M, K] token matrix (a copy unless the view allows one)."""
    return x if x.dim() == 2 else x.reshape(x.shape[0] * x.shape[1], -1)


class Linear8:
    """How the fast path calls one linear layer, whatever it is: nn.Linear (bf16) or FP8Linear (any recipe).
    gemm: "scaled_mm" runs W8A8 GEMMs on torch._scaled_mm (cuBLASLt/CUTLASS) with the epilogue as one extra
    pass; "triton" runs kernels/fp8_gemm.py with the epilogue fused. Measured on an H200 (bench/results/
    2026-11-22_h200_session1/kernels.json), _scaled_mm + a separate pass was faster on every SD3.5 shape, so it is
    the default; the Triton kernel is kept for the fused variants and as the teaching implementation. "gluon"
    runs kernels/fp8_gemm_gluon.py (Hopper; warp-specialised, precise accumulation whose promotion overlaps the
    MMAs, epilogue fused) and, with fast_accum, the Triton kernel; level with the default in the step (SD3.5
    Large 1024, H200: 95.93 vs 96.36 ms, bench/results/2026-12-04_h200_session12/step_run6.json), so not the
    default."""

    def __init__(self, lin: nn.Module, fast_accum: bool = False, gemm: str = "scaled_mm"):
        self.lin, self.fast_accum, self.gemm = lin, fast_accum, gemm
        self.per_token = isinstance(lin, FP8Linear) and lin.recipe == "w8a8-row" and lin.input_scale is None

    def takes_fp8(self) -> bool:
        """True when this layer wants its input quantised per token (so a fused prologue can produce it)."""
        return self.per_token

    def gemm8(self, x8, xs, out_dtype, gate=None, residual=None, rows=0):
        """W8A8 GEMM on an already-quantised input, then the optional gated residual."""
        m = self.lin
        bias = None if m.bias is None else m.bias.to(out_dtype)
        if x8.is_cuda and self.gemm in ("triton", "gluon") and resolve_impl(x8.device, m.impl) == "triton":
            if self.gemm == "gluon" and not self.fast_accum:
                from kernels.fp8_gemm_gluon import fp8_gemm_gluon

                return fp8_gemm_gluon(x8, xs, m.weight, m.weight_scale, bias, out_dtype, gate=gate,
                                      residual=residual, rows_per_batch=rows)
            from kernels.fp8_gemm import fp8_gemm

            return fp8_gemm(x8, xs, m.weight, m.weight_scale, bias, out_dtype, gate=gate, residual=residual,
                            rows_per_batch=rows, fast_accum=self.fast_accum)
        if x8.is_cuda:
            y = scaled_mm(x8, xs, m.weight, m.weight_scale, bias, out_dtype, fast_accum=self.fast_accum)
        else:  # the reference: every product of two E4M3 values is exact in fp32
            y = ((x8.float() * xs[:, None]) @ (m.weight.float() * m.weight_scale[:, None]).t())
            y = (y if bias is None else y + bias.float()).to(out_dtype)
        return y if gate is None else gated_residual(y, gate, residual, rows)

    def __call__(self, x, gate=None, residual=None, rows=0):
        """x [M, K] (or a [B, L, K] / [B, L, H, hd] view, M = B * L) in the model dtype -> y [M, N]; with gate
        [B, N] and residual [M, N]: residual + gate * y. A W8A8 layer's quantiser reads a view in place; other
        layers flatten it."""
        if self.per_token:
            x8, xs = quant_rows(x)
            return self.gemm8(x8, xs, x.dtype, gate, residual, rows)
        y = self.lin(rows2d(x))
        return y if gate is None else gated_residual(y, gate, residual, rows)


# --- the fast model ---------------------------------------------------------------------------------------------------


def _adaln_layers(model: MMDiT) -> list[tuple[str, nn.Module]]:
    """The joint blocks' adaLN linears, [x_block, context_block] per block (the final layer's is kept apart: the
    default FP8 policy leaves it in bf16 while the blocks' run weight-only)."""
    out = []
    for i, blk in enumerate(model.joint_blocks):
        out.append((f"joint_blocks.{i}.x_block", blk.x_block.adaLN_modulation[1]))
        out.append((f"joint_blocks.{i}.context_block", blk.context_block.adaLN_modulation[1]))
    return out


ATTENTION = ("auto", "cudnn", "flash", "efficient", "math", "triton", "fp8")


class FastMMDiT(nn.Module):
    """A faster forward over an MMDiT's own modules (shared, not copied). Same call signature as MMDiT.

    attention: "auto" (SDPA's choice), an SDPA backend ("cudnn", "flash", "efficient", "math"), "triton"
    (kernels/fp8_attention.py in bf16) or "fp8" (the same kernel with E4M3 Q, K, P and V; layers without QK norm,
    as in SD3 Medium, have no static q / k scale and run the bf16 kernel). On the CPU every choice runs SDPA, and
    "fp8" its torch reference."""

    def __init__(self, model: MMDiT, fast_accum: bool = False, attention: str = "auto", gemm: str = "scaled_mm",
                 fuse_adaln: bool = True):
        super().__init__()
        if attention not in ATTENTION:
            from .errors import InputError

            raise InputError(f"attention={attention!r}; expected one of {ATTENTION}")
        self.model = model
        self.cfg = model.cfg
        self.fast_accum, self.attention_backend, self.gemm = fast_accum, attention, gemm
        self.attention_layout = ATTENTION_LAYOUT  # attention_buffers' layout; an attribute so benchmarks can flip it
        self.adaln_kind = None
        self.streamer = None  # a streaming.BlockStreamer in streamed mode (set by stream())
        self.qk_scales: dict[tuple, tuple | None] = {}  # ids of attention modules -> static E4M3 q / k scales
        self.probe = None  # audit.attention_audit's hook: called as probe(name, modules, q, k, v, out) per attention
        if fuse_adaln:  # not for a model that moves between devices: .to() would copy the views apart
            self._fuse_adaln()

    def lin(self, module: nn.Module) -> Linear8:
        return Linear8(module, self.fast_accum, self.gemm)

    # one buffer for every adaLN weight; the modules keep views into it
    def _fuse_adaln(self) -> None:
        layers = _adaln_layers(self.model)
        kinds = {type(m) for _, m in layers}
        recipes = {getattr(m, "recipe", None) for _, m in layers}
        if kinds == {nn.Linear}:
            self.adaln_kind = "linear"
        elif kinds == {FP8Linear} and recipes == {"w8-only"}:
            self.adaln_kind = "w8"
        else:
            return  # mixed recipes: each adaLN runs on its own
        first = layers[0][1]
        dev = first.weight.device
        N = sum(m.out_features for _, m in layers)
        K = first.in_features
        W = torch.empty(N, K, dtype=first.weight.dtype, device=dev)
        Bv = torch.empty(N, dtype=first.bias.dtype, device=dev)
        S = torch.empty(N, dtype=torch.float32, device=dev) if self.adaln_kind == "w8" else None
        self.adaln_slices = []
        off = 0
        for _, m in layers:
            n = m.out_features
            W[off : off + n].copy_(m.weight)
            Bv[off : off + n].copy_(m.bias)
            if self.adaln_kind == "linear":
                m.weight = nn.Parameter(W[off : off + n], requires_grad=False)
                m.bias = nn.Parameter(Bv[off : off + n], requires_grad=False)
            else:
                S[off : off + n].copy_(m.weight_scale.expand(n))
                m.weight, m.bias, m.weight_scale = W[off : off + n], Bv[off : off + n], S[off : off + n]
            self.adaln_slices.append((off, n))
            off += n
        self.adaln_w, self.adaln_b, self.adaln_s = W, Bv, S

    def modulations(self, c: torch.Tensor) -> list[torch.Tensor]:
        """Every block's adaLN output from one GEMV: [x_mod, e_mod] per block, in block order."""
        sc = F.silu(c)
        layers = _adaln_layers(self.model)
        if self.adaln_kind is None:
            outs = [m(sc.to(m.bias.dtype)) for _, m in layers]
        else:
            if self.adaln_kind == "linear":
                allm = F.linear(sc.to(self.adaln_w.dtype), self.adaln_w, self.adaln_b)
            elif sc.is_cuda and resolve_impl(sc.device) == "triton":
                from kernels.fp8_dequant_gemm import dequant_gemm

                # pdl: adaln_w is written once, in _fuse_adaln, never by the kernel before (see dequant_gemm)
                allm = dequant_gemm(sc.to(self.adaln_b.dtype).contiguous(), self.adaln_w, self.adaln_s, self.adaln_b,
                                    pdl=True)
            else:
                w = (self.adaln_w.float() * self.adaln_s[:, None]).to(self.adaln_b.dtype)
                allm = F.linear(sc.to(w.dtype), w, self.adaln_b)
            outs = [allm[:, o : o + n] for o, n in self.adaln_slices]
        return outs

    def fp8_scales(self, *attns) -> tuple | None:
        """(q_scale, k_scale, q_scale_t, k_scale_t) for E4M3 q / k buffers shared by these attention modules (the
        joint buffer holds both streams: the larger of their bounds), or None when attention is not "fp8" or a module
        has no QK norm. Computed once (a host sync: in the eager warm-up, never inside a graph capture)."""
        if self.attention_backend != "fp8":
            return None
        key = tuple(id(a) for a in attns)
        if key not in self.qk_scales:
            sq = [qk_fp8_scale(a.ln_q) for a in attns]
            sk = [qk_fp8_scale(a.ln_k) for a in attns]
            if None in sq or None in sk:
                self.qk_scales[key] = None
            else:
                dev = attns[0].qkv.weight.device
                sq, sk = max(sq), max(sk)
                self.qk_scales[key] = (sq, sk, torch.tensor([sq], device=dev), torch.tensor([sk], device=dev))
        return self.qk_scales[key]

    def attend(self, q, k, v, scales=None, name: str = "", modules: tuple = (), v_amax=None):
        """Attention over the joint buffers; scales: fp8_scales() when q and k are E4M3 (v_amax: max |v|, gathered
        by qk_norm_split). name / modules (the attention modules whose q, k, v these are) go to the probe."""
        out = self._attend(q, k, v, scales, v_amax)
        if self.probe is not None:
            self.probe(name, modules, q, k, v, out)
        return out

    def _attend(self, q, k, v, scales, v_amax):
        if scales is not None:
            return fp8_attention(q, k, v, scales[2], scales[3], v_amax)
        backend = self.attention_backend
        if backend in ("triton", "fp8") and _triton_ok(q):
            from kernels.fp8_attention import attention

            return attention(q, k, v)
        if backend in ("auto", "triton", "fp8") or not q.is_cuda:
            return F.scaled_dot_product_attention(q, k, v)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        b = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[backend]
        with sdpa_kernel(b):
            return F.scaled_dot_product_attention(q, k, v)

    def buffers(self, B: int, H: int, L: int, hd: int, like: torch.Tensor, scales):
        if scales is not None:  # E4M3 q and k; the kernel's TMA descriptors want contiguous [B, H, L, hd]
            return attention_buffers(B, H, L, hd, like, "bhld", qk_dtype=E4M3)
        return attention_buffers(B, H, L, hd, like, self.attention_layout)

    def block(self, i: int, e: torch.Tensor, x: torch.Tensor, x_mod: torch.Tensor, e_mod: torch.Tensor):
        """One joint block; e [B*Lt, D], x [B*Li, D] as 2-D row-major token matrices."""
        blk = self.model.joint_blocks[i]
        xb, cb = blk.x_block, blk.context_block
        cfg = self.cfg
        H, hd = cfg.heads, cfg.head_dim
        B = x_mod.shape[0]
        Li, Lt = x.shape[0] // B, e.shape[0] // B
        xm = x_mod.chunk(xb.n_mod, dim=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = xm[:6]
        em = e_mod.chunk(cb.n_mod, dim=1)

        # q, k, v of both streams straight into the joint attention buffers [B, H, Li + Lt, hd]
        Ltot = Li + Lt
        sc = self.fp8_scales(xb.attn, cb.attn)
        q, k, v = self.buffers(B, H, Ltot, hd, x, sc)
        vmax = None if sc is None else torch.zeros(B, dtype=torch.float32, device=x.device)
        self.qkv(xb.attn, x, shift_msa, scale_msa, Li, q, k, v, 0, sc, vmax)
        self.qkv(cb.attn, e, em[0], em[1], Lt, q, k, v, Li, sc, vmax)
        out = self.attend(q, k, v, sc, f"joint_blocks.{i}", (xb.attn, cb.attn), vmax)
        out = out.transpose(1, 2)  # [B, Ltot, H, hd], a view: each stream's slice goes to its proj
        x_in = x
        x = self.lin(xb.attn.proj)(out[:, :Li], gate=gate_msa, residual=x, rows=Li)

        if blk.dual:  # MMDiT-X: a second attention over image tokens only, from the same LN(x_in), own modulation
            shift2, scale2, gate2 = xm[6:]
            sc2 = self.fp8_scales(xb.attn2)
            q2, k2, v2 = self.buffers(B, H, Li, hd, x, sc2)
            vmax2 = None if sc2 is None else torch.zeros(B, dtype=torch.float32, device=x.device)
            self.qkv(xb.attn2, x_in, shift2, scale2, Li, q2, k2, v2, 0, sc2, vmax2)
            o2 = self.attend(q2, k2, v2, sc2, f"joint_blocks.{i}.x_block.attn2", (xb.attn2,), vmax2)
            o2 = o2.transpose(1, 2)
            x = self.lin(xb.attn2.proj)(o2, gate=gate2, residual=x, rows=Li)

        x = self.mlp(xb, x, shift_mlp, scale_mlp, gate_mlp, Li)
        if blk.pre_only:
            return None, x
        e = self.lin(cb.attn.proj)(out[:, Li:], gate=em[2], residual=e, rows=Lt)
        e = self.mlp(cb, e, em[3], em[4], em[5], Lt)
        return e, x

    def qkv(self, attn, inp, shift, scale, rows, q, k, v, offset, scales=None, v_amax=None):
        """LN + modulate (+ quantise) -> qkv GEMM -> q/k norm, split into the attention buffers (E4M3 q / k with
        the static scales of fp8_scales(); v_amax gathers max |v|)."""
        lin = self.lin(attn.qkv)
        if lin.takes_fp8():
            a8, asc = ln_mod_quant(inp, shift, scale, rows)
            out = lin.gemm8(a8, asc, inp.dtype)
        else:
            out = lin(ln_mod(inp, shift, scale, rows))
        B = shift.shape[0]
        sq, sk = scales[:2] if scales is not None else (1.0, 1.0)
        qk_norm_split(out, B, rows, attn.heads, attn.head_dim, attn.ln_q, attn.ln_k, q, k, v, offset, sq, sk, v_amax)

    def mlp(self, sb, x, shift, scale, gate, rows):
        fc1, fc2 = self.lin(sb.mlp.fc1), self.lin(sb.mlp.fc2)
        if fc1.takes_fp8() and fc2.takes_fp8():
            a8, asc = ln_mod_quant(x, shift, scale, rows)
            h = fc1.gemm8(a8, asc, x.dtype)
            h8, hs = gelu_quant(h)
            return fc2.gemm8(h8, hs, x.dtype, gate=gate, residual=x, rows=rows)
        h = fc1(ln_mod(x, shift, scale, rows))
        return fc2(F.gelu(h, approximate="tanh"), gate=gate, residual=x, rows=rows)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                skip_layers: tuple[int, ...] | list[int] = ()) -> torch.Tensor:
        m, cfg = self.model, self.cfg
        B, _, h, w = x.shape
        m.check_latent_size(h, w)
        p = cfg.patch_size
        hp, wp = h // p, w // p
        tokens = m.x_embedder.proj(x).flatten(2).transpose(1, 2)
        xt = (tokens + m.cropped_pos_embed(hp, wp)).to(tokens.dtype).reshape(B * hp * wp, -1)
        c = m.t_embedder.mlp(timestep_embedding(t).to(pooled.dtype)) + m.y_embedder.mlp(pooled)
        e = m.context_embedder(context).reshape(B * context.shape[1], -1)
        streamer = self.streamer
        if streamer is None:
            mods = self.modulations(c)
            for i in range(cfg.depth):
                if i not in skip_layers:
                    e, xt = self.block(i, e, xt, mods[2 * i], mods[2 * i + 1])
        else:  # streamed (streaming.BlockStreamer): block i, with its adaLN, is on the GPU only between enter and leave
            sc = F.silu(c)
            for i in range(cfg.depth):
                if i in skip_layers:
                    continue
                streamer.enter(i, skip_layers)
                blk = m.joint_blocks[i]
                x_mod, e_mod = (b.adaLN_modulation[1](sc.to(b.adaLN_modulation[1].bias.dtype))
                                for b in (blk.x_block, blk.context_block))
                e, xt = self.block(i, e, xt, x_mod, e_mod)
                streamer.leave(i)
        shift, scale = m.final_layer.adaLN_modulation[1](F.silu(c).to(xt.dtype)).chunk(2, dim=1)
        out = m.final_layer.linear(ln_mod(xt, shift, scale, hp * wp))
        C = cfg.out_channels
        out = out.reshape(B, hp, wp, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(B, C, hp * p, wp * p)


class Graphed(nn.Module):
    """Replays a CUDA graph of `model`'s forward for each distinct input signature (shapes, dtypes, skip_layers).
    The first call with a signature runs the model twice eagerly (Triton autotuning, cuBLAS handles, workspace
    allocation) and then captures it; later calls copy the inputs into the static buffers and replay. The output is
    copied out, so a later replay never overwrites a tensor the caller still holds."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.cfg = getattr(model, "cfg", None)
        self.graphs: dict = {}

    def forward(self, x, t, context, pooled, skip_layers=()):
        if not x.is_cuda:
            return self.model(x, t, context, pooled, skip_layers)
        key = (tuple(x.shape), tuple(context.shape), x.dtype, tuple(skip_layers))
        if key not in self.graphs:
            static = [a.clone() for a in (x, t, context, pooled)]
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    self.model(*static, skip_layers)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = self.model(*static, skip_layers)
            self.graphs[key] = (g, static, out)
        g, static, out = self.graphs[key]
        for dst, src in zip(static, (x, t, context, pooled)):
            dst.copy_(src)
        g.replay()
        return out.clone()


def stream(model: MMDiT, device: torch.device, *, ahead: int = 1, fast_accum: bool = False,
           attention: str = "auto", gemm: str = "scaled_mm") -> FastMMDiT:
    """The fused forward with the joint blocks streamed from pinned CPU memory (streaming.BlockStreamer): for GPUs
    smaller than the model. No CUDA graph (the weights' addresses change every pass) and no fused adaLN (each block's
    modulation runs with the block)."""
    from .streaming import BlockStreamer

    fast = FastMMDiT(model, fast_accum=fast_accum, attention=attention, gemm=gemm, fuse_adaln=False)
    fast.streamer = BlockStreamer(model, torch.device(device), ahead=ahead)
    return fast


def accelerate(model: MMDiT, *, graphs: bool = True, fast_accum: bool = False, attention: str = "auto",
               gemm: str = "scaled_mm", fuse_adaln: bool = True) -> nn.Module:
    """The fast forward for this model (CUDA; on the CPU the same code runs its torch fallbacks). Pass the result
    wherever the model was called: load_pipeline(..., fast=True) does it for you."""
    fast = FastMMDiT(model, fast_accum=fast_accum, attention=attention, gemm=gemm, fuse_adaln=fuse_adaln)
    return Graphed(fast) if graphs else fast
