"""QK RMSNorm + head split + [image, text] concatenation: the step between an MMDiT stream's qkv GEMM and attention,
in one pass over the GEMM output.

    qkv [B*L, 3*H*hd]   one stream's fused qkv output, row-major; a row is [q | k | v], each H heads of hd values
                        (the [Wq; Wk; Wv] weight layout, each head-major)
    q, k, v             the joint attention buffers [B, H, Ltot, hd], allocated by the caller, all three with the
                        same strides and hd contiguous; this stream's tokens go to sequence positions offset ..
                        offset+L of every batch row (image tokens at 0, text tokens after them, as the model
                        concatenates them). fast.py allocates them as [B, Ltot, H, hd] in memory (transposed
                        views): SDPA then returns its output in that layout too, and [B, Ltot, H * hd] - the
                        proj GEMM's input - is a view of it, not a copy
    q = RMSNorm(q_h) * wq,  k = RMSNorm(k_h) * wk,  v = v_h      per head h, over its hd values

Unfused, torch does this in about nine passes: view + permute, x.float(), pow, mean, rsqrt, the multiply, the cast,
the weight multiply, and the copy into the concatenated buffer, each over tensors of 20-60 MB at SD3.5 Large's
sizes. Here one program owns BLOCK_L tokens of one head of one sample: it reads their q, k and v slices (hd values
each, one 128-byte line at hd = 64 in bf16), normalises q and k in registers and writes three [BLOCK_L, hd] tiles,
each one contiguous block of the destination. The kernel is memory-bound: bytes = qkv read + q/k/v written (2 x
qkv), and its figure of merit is GB/s against a device-to-device copy (target >= 70%).

Numerics are mmdit.RMSNorm's, rounding for rounding:
    var = mean(x.float() ** 2) over hd;  y = x * rsqrt(var + eps) in fp32
    weight bf16/fp16: out = (y.to(w.dtype) * w)            two roundings to the weight's dtype
    weight fp32:      out = (y * w).to(x.dtype)             one rounding
and the result is cast to the buffer's dtype. The kernel is compiled without floating-point contraction
(enable_fp_fusion=False) so that x*x, the weight multiply and the roundings stay the separate operations torch
performs; only the order of the 64-term sum differs (a last-bit effect on var, which moves an output only when it
sits on a bf16 rounding boundary). wq / wk None: no QK norm (SD3 Medium), q and k are copied like v.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # `python kernels/qk_norm.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import triton
import triton.language as tl

from kernels._common import (
    FP8,
    TL_DTYPES,
    check_device,
    check_tensor,
    interpreting,
    next_pow2,
    on_device,
    pick_configs,
    round_to,
    to_e4m3,
)
from minisd35.errors import InputError

# BLOCK_L tokens per program x num_warps. At hd = 64 in bf16 a token's slice is 128 bytes, so BLOCK_L = 32 with 4
# warps gives each thread 16 values (two 16-byte loads) of each of q, k and v.
QK_CONFIGS = [triton.Config({"BLOCK_L": bl}, num_warps=w) for bl, w in [(16, 2), (32, 4), (64, 4), (64, 8), (128, 8)]]
CPU_CONFIGS = [triton.Config({"BLOCK_L": 4}, num_warps=1)]  # the interpreter: small, so that L = 5 spans two blocks


@triton.jit
def _rms_norm(x, w_ptr, d, HD: tl.constexpr, eps, HAS_W: tl.constexpr, W_LOWP: tl.constexpr, W_DT: tl.constexpr,
              X_DT: tl.constexpr, O_DT: tl.constexpr, ROUND_FIRST: tl.constexpr, EVEN_D: tl.constexpr):
    """x [BLOCK_L, BLOCK_D] (x's dtype) -> mmdit.RMSNorm(x) in fp32, already rounded as torch rounds it and to the
    output buffer's dtype O_DT. Without a weight: x unchanged (Identity)."""
    xf = x.to(tl.float32)
    if HAS_W:
        var = tl.sum(xf * xf, axis=1) / HD  # columns past hd were loaded as 0: they add nothing
        y = xf * tl.math.rsqrt(var + eps)[:, None]
        if EVEN_D:
            w = tl.load(w_ptr + d).to(tl.float32)
        else:
            w = tl.load(w_ptr + d, mask=d < HD, other=0.0).to(tl.float32)
        if W_LOWP:  # y.to(weight dtype) * weight: the product is computed in fp32 and rounded to the weight dtype
            y = round_to(round_to(y, W_DT, ROUND_FIRST) * w[None, :], W_DT, ROUND_FIRST)
        else:  # (y * weight).to(x dtype)
            y = round_to(y * w[None, :], X_DT, ROUND_FIRST)
        xf = y
    if O_DT == tl.float8e4nv:  # quantised by the caller
        return xf
    return round_to(xf, O_DT, ROUND_FIRST)  # the copy into the attention buffer


@triton.autotune(configs=pick_configs(QK_CONFIGS, CPU_CONFIGS), key=["L", "HD", "HAS_WQ", "HAS_WK"])
@triton.jit
def _qk_norm_kernel(
    qkv_ptr, wq_ptr, wk_ptr, q_ptr, k_ptr, v_ptr, vmax_ptr,
    L, heads, offset, vmax_stride, stride_row, stride_ob, stride_oh, stride_ol, eps, q_inv, k_inv,
    HD: tl.constexpr, BLOCK_D: tl.constexpr, HAS_WQ: tl.constexpr, HAS_WK: tl.constexpr,
    WQ_LOWP: tl.constexpr, WQ_DT: tl.constexpr, WK_LOWP: tl.constexpr, WK_DT: tl.constexpr,
    X_DT: tl.constexpr, O_DT: tl.constexpr, ROUND_FIRST: tl.constexpr, EVEN_D: tl.constexpr, HAS_VMAX: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    pid_l, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    tok = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    d = tl.arange(0, BLOCK_D)
    if EVEN_D:
        mask = (tok < L)[:, None]
    else:
        mask = (tok < L)[:, None] & (d < HD)[None, :]
    # source: row b*L + tok of qkv, columns h*hd (q), (heads + h)*hd (k), (2*heads + h)*hd (v)
    src = qkv_ptr + (b * L + tok)[:, None].to(tl.int64) * stride_row + h * HD + d[None, :]
    xq = tl.load(src, mask=mask, other=0.0)
    xk = tl.load(src + heads * HD, mask=mask, other=0.0)
    xv = tl.load(src + 2 * heads * HD, mask=mask, other=0.0)
    # destination: [b, h, offset + tok, :] of the [B, H, Ltot, hd] buffers (BLOCK_L rows of hd contiguous values)
    dst = (b.to(tl.int64) * stride_ob + h * stride_oh + (offset + tok).to(tl.int64)[:, None] * stride_ol
           + d[None, :])
    tl.store(v_ptr + dst, xv.to(v_ptr.dtype.element_ty), mask=mask)
    if HAS_VMAX:  # max |v| for fp8_attention's V scale, per batch row: one atomic per program (masked lanes hold 0)
        tl.atomic_max(vmax_ptr + b * vmax_stride, tl.max(tl.abs(xv.to(tl.float32))), sem="relaxed")
    yq = _rms_norm(xq, wq_ptr, d, HD, eps, HAS_WQ, WQ_LOWP, WQ_DT, X_DT, O_DT, ROUND_FIRST, EVEN_D)
    yk = _rms_norm(xk, wk_ptr, d, HD, eps, HAS_WK, WK_LOWP, WK_DT, X_DT, O_DT, ROUND_FIRST, EVEN_D)
    if O_DT == tl.float8e4nv:  # E4M3 q / k for fp8_attention: x / scale, clamped, cast (scale = 1 / inv)
        yq = to_e4m3(yq, q_inv, ROUND_FIRST)
        yk = to_e4m3(yk, k_inv, ROUND_FIRST)
    tl.store(q_ptr + dst, yq.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(k_ptr + dst, yk.to(k_ptr.dtype.element_ty), mask=mask)


FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def _check(fn: str, qkv, B: int, L: int, heads: int, hd: int, wq, wk, q, k, v, offset: int) -> int:
    """Validate the arguments; returns Ltot (the attention buffers' sequence length)."""
    check_tensor(fn, "qkv", qkv, FLOATS, ndim=2)
    for name, n in (("B", B), ("L", L), ("heads", heads), ("hd", hd)):
        if not isinstance(n, int) or n <= 0:
            raise InputError(f"{fn}: {name}={n!r} must be a positive int")
    if tuple(qkv.shape) != (B * L, 3 * heads * hd):
        raise InputError(f"{fn}: qkv has shape {tuple(qkv.shape)}; expected [B*L, 3*heads*hd] = "
                         f"[{B * L}, {3 * heads * hd}] for B={B}, L={L}, heads={heads}, hd={hd}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(fn, name, t, FLOATS + ((FP8,) if name != "v" else ()), ndim=4)
        if t.shape[:2] != (B, heads) or t.shape[3] != hd or t.shape != q.shape:
            raise InputError(f"{fn}: {name} has shape {tuple(t.shape)}; expected [B, heads, Ltot, hd] = "
                             f"[{B}, {heads}, Ltot, {hd}], the same for q, k and v")
        if t.stride() != q.stride() or t.stride(3) != 1:
            raise InputError(f"{fn}: {name} has strides {t.stride()}; q, k and v must share one layout with hd "
                             f"contiguous (q has {q.stride()}), e.g. torch.empty(B, Ltot, heads, hd).transpose(1, 2)")
    Ltot = q.shape[2]
    if not isinstance(offset, int) or offset < 0 or offset + L > Ltot:
        raise InputError(f"{fn}: offset={offset} with L={L} tokens does not fit the buffers' Ltot={Ltot}; "
                         f"need 0 <= offset and offset + L <= Ltot")
    for name, w in (("wq", wq), ("wk", wk)):
        if w is not None:
            check_tensor(fn, name, w, FLOATS, ndim=1)
            if w.shape[0] != hd:
                raise InputError(f"{fn}: {name} has shape {tuple(w.shape)}; expected [{hd}] (RMSNorm weight over "
                                 f"the head dim), or None for no QK norm")
    return Ltot


def qk_norm_split(qkv: torch.Tensor, B: int, L: int, heads: int, hd: int, wq: torch.Tensor | None,
                  wk: torch.Tensor | None, eps: float, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  offset: int, q_scale: float = 1.0, k_scale: float = 1.0, v_amax: torch.Tensor | None = None) -> None:
    """Write RMSNorm(q_h) * wq, RMSNorm(k_h) * wk and v_h of qkv [B*L, 3*heads*hd] into q, k, v [B, heads, Ltot, hd]
    at sequence positions offset .. offset+L. wq / wk: RMSNorm weights [hd], or None (no norm). q and k may be
    float8_e4m3fn buffers (v stays in the model dtype): then q / q_scale and k / k_scale are stored, clamped to
    +-448 (fp8_attention's per-tensor dequant scales; static ones come from fast.qk_fp8_scale). v_amax: fp32 [B]
    (or [1]), raised to max |v| of what is written for each batch row (or over all of them; the caller zeroes it once
    for all streams)."""
    fn = "qk_norm_split"
    _check(fn, qkv, B, L, heads, hd, wq, wk, q, k, v, offset)
    if v_amax is not None and (v_amax.dtype != torch.float32 or v_amax.numel() not in (1, B)
                               or not v_amax.is_contiguous()):
        raise InputError(f"{fn}: v_amax must be a contiguous fp32 tensor of B = {B} or 1 elements, got "
                         f"{v_amax.dtype} {tuple(v_amax.shape)}")
    dev = check_device(fn, qkv, wq, wk, q, k, v, v_amax, fp8=False)
    if q.dtype != k.dtype:
        raise InputError(f"{fn}: q is {q.dtype} but k is {k.dtype}; the buffers share one dtype")
    x_dt = TL_DTYPES[qkv.dtype]
    o_dt = tl.float8e4nv if q.dtype == FP8 else TL_DTYPES[q.dtype]

    def weight_flags(w):
        if w is None:
            return False, x_dt
        return w.dtype != torch.float32, TL_DTYPES[w.dtype]

    wq_lowp, wq_dt = weight_flags(wq)
    wk_lowp, wk_dt = weight_flags(wk)
    grid = lambda meta: (triton.cdiv(L, meta["BLOCK_L"]), heads, B)
    with on_device(dev):
        _qk_norm_kernel[grid](
            qkv, wq if wq is not None else qkv, wk if wk is not None else qkv, q, k, v,
            v_amax if v_amax is not None else qkv,
            L, heads, offset, int(v_amax is not None and v_amax.numel() > 1), qkv.stride(0), q.stride(0), q.stride(1),
            q.stride(2), float(eps), 1.0 / q_scale, 1.0 / k_scale,
            HD=hd, BLOCK_D=next_pow2(hd), HAS_WQ=wq is not None, HAS_WK=wk is not None,
            WQ_LOWP=wq_lowp, WQ_DT=wq_dt, WK_LOWP=wk_lowp, WK_DT=wk_dt, X_DT=x_dt, O_DT=o_dt,
            ROUND_FIRST=interpreting(), EVEN_D=next_pow2(hd) == hd, HAS_VMAX=v_amax is not None,
            enable_fp_fusion=False,  # torch's separate roundings: no fma of x*x into the sum or of y*w
        )


def rms_norm_ref(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    """mmdit.RMSNorm.forward with weight w (None: Identity), over the last dimension."""
    if w is None:
        return x
    var = x.float().pow(2).mean(-1, keepdim=True)
    y = x * torch.rsqrt(var + eps)  # promotes to fp32
    if w.dtype in (torch.float16, torch.bfloat16):
        return y.to(w.dtype) * w
    return (y * w).to(x.dtype)


def qk_norm_split_ref(qkv: torch.Tensor, B: int, L: int, heads: int, hd: int, wq: torch.Tensor | None,
                      wk: torch.Tensor | None, eps: float, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      offset: int, q_scale: float = 1.0, k_scale: float = 1.0,
                      v_amax: torch.Tensor | None = None) -> None:
    """Plain torch, the logic of fast.qk_norm_split's fallback: the same writes into q, k, v (and v_amax)."""
    _check("qk_norm_split_ref", qkv, B, L, heads, hd, wq, wk, q, k, v, offset)
    qh, kh, vh = qkv.view(B, L, 3, heads, hd).permute(2, 0, 3, 1, 4)
    for buf, x, w, scale in ((q, qh, wq, q_scale), (k, kh, wk, k_scale)):
        y = rms_norm_ref(x, w, eps)
        if buf.dtype == FP8:  # the kernel's to_e4m3: x * (1 / scale), clamped, cast
            y = (y.float() * (1.0 / scale)).clamp(-448.0, 448.0)
        buf[:, :, offset : offset + L] = y
    v[:, :, offset : offset + L] = vh
    if v_amax is not None:
        m = vh.abs().amax(dim=(1, 2, 3)).float() if v_amax.numel() == B else vh.abs().amax().float().reshape(1)
        torch.maximum(v_amax, m.reshape(v_amax.shape), out=v_amax)


if __name__ == "__main__":
    from kernels._common import bench_ms, check_line, print_table, rel_rms

    if not torch.cuda.is_available() and not interpreting():
        sys.exit("needs a CUDA GPU, or TRITON_INTERPRET=1 to run the check on the CPU")
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    # (B, L, heads, hd, Ltot, offset): SD3.5 Large image + text streams, Medium, MMDiT-X attn2 (image tokens only)
    cases = [(2, 4096, 38, 64, 4429, 0), (2, 333, 38, 64, 4429, 4096), (2, 4096, 24, 64, 4096, 0)] if dev == "cuda" \
        else [(2, 5, 3, 16, 12, 0), (2, 7, 3, 64, 12, 5)]
    torch.manual_seed(0)
    rows = []
    for B, L, H, hd, Ltot, off in cases:
        qkv = torch.randn(B * L, 3 * H * hd, device=dev, dtype=torch.bfloat16) * 2
        w = (torch.rand(hd, device=dev) + 0.5).to(torch.bfloat16)
        bufs = [torch.zeros(B, H, Ltot, hd, device=dev, dtype=torch.bfloat16) for _ in range(6)]
        qk_norm_split(qkv, B, L, H, hd, w, w, 1e-6, *bufs[:3], off)
        qk_norm_split_ref(qkv, B, L, H, hd, w, w, 1e-6, *bufs[3:], off)
        for name, a, r in zip("qkv", bufs[:3], bufs[3:]):
            check_line(f"qk_norm_split {name} B={B} L={L} heads={H} hd={hd} offset={off}", rel_rms(a, r), 1e-3)
        if dev == "cpu":
            continue
        moved = 2 * qkv.numel() * 2
        src = torch.empty_like(qkv)
        copy_ms = bench_ms(lambda: src.copy_(qkv))[0]
        for impl, f in [("triton", lambda: qk_norm_split(qkv, B, L, H, hd, w, w, 1e-6, *bufs[:3], off)),
                        ("torch ref", lambda: qk_norm_split_ref(qkv, B, L, H, hd, w, w, 1e-6, *bufs[3:], off))]:
            ms = bench_ms(f)[0]
            rows.append({"B": B, "L": L, "heads": H, "impl": impl, "ms": ms, "GB/s": moved / ms * 1e-6,
                         "copy GB/s": moved / copy_ms * 1e-6})
    if rows:
        print_table(rows, ["B", "L", "heads", "impl", "ms", "GB/s", "copy GB/s"])
