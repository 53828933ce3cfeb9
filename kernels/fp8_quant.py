"""Activation quantisation to FP8 E4M3: x [M, K] in bf16/fp16/fp32 -> (x_fp8 [M, K] float8_e4m3fn, scale fp32).

Per token (the default, one scale per row, shape [M]): one program owns BLOCK_M rows. It reads the rows once,
takes amax = max|x| per row, sets scale = max(amax, 1e-12) / 448, writes x * (448 / max(amax, 1e-12)) clamped
to +-448 as E4M3, and the scale. When a row fits in registers (K <= 16384) it is loaded once and kept, so the
kernel moves exactly M*K*(in bytes + 1) + 4*M bytes: a copy with a reduction in the middle, and the target is the
device's copy bandwidth (>= 80% of it at M=8858, K=2432 and K=9728). Wider rows are streamed twice (amax pass,
cast pass).

Per tensor (one scale, shape [1]): two launches (plus a one-element memset). The first kernel reduces amax over
its rows and folds it into one fp32 with an atomic max (max is order-independent, so the result is
deterministic); the second derives the scale from that amax and casts. A static, calibrated scale (`scale=`)
skips the first launch.

Numerics, identical to quant_fp8_ref below, bit for bit: scale and its inverse are IEEE divisions, once per row
(tl.math.div_rn; Triton's plain `/` is an approximate division that could flip a rounding boundary); each element
costs one multiply by the inverse, not a division. Values beyond +-448 saturate to +-448; NaN passes through
(note that max|x| ignores a NaN, so a NaN stays where it was instead of poisoning its row's scale). The GPU's
fp32 -> e4m3 conversion (cvt.rn.satfinite) rounds to nearest-even like torch. The Triton interpreter's does not
(ties round up, the carry into the next power of two is lost: 124.3 -> 64, subnormals flush), so under the
interpreter the kernel rounds to the E4M3 grid in fp32 first (ROUND_FIRST, see _common.py) and matches torch there
too.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # `python kernels/fp8_quant.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import triton
import triton.language as tl

from kernels._common import (
    FP8,
    FP8_MAX,
    MAX_ROW_TILE,
    SCALE_FLOOR,
    check_device,
    check_scale,
    check_tensor,
    interpreting,
    next_pow2,
    on_device,
    pick_configs,
    prune_row_tiles,
    round_first,
    to_e4m3,
    tune_bench,
)
from minisd35.errors import InputError

# MODE: what one launch does. Globals that a kernel reads must be tl.constexpr (Triton refuses plain Python
# globals in compiled code); the wrapper passes MODE=mode.value.
ROW = tl.constexpr(0)  # per-row amax, scale and cast
AMAX = tl.constexpr(1)  # per-tensor, launch 1: amax only (atomic max into one fp32)
TENSOR = tl.constexpr(2)  # per-tensor, launch 2: scale from that amax, cast
STATIC = tl.constexpr(3)  # the scale is given: cast only

# BLOCK_M rows per program x num_warps. BLOCK_K is not tuned: it is the row width rounded up to a power of two
# (or 4096 for rows wider than MAX_ROW_TILE), and prune_row_tiles drops configs whose tile would not fit in
# registers or would leave threads idle.
QUANT_CONFIGS = [triton.Config({"BLOCK_M": bm}, num_warps=w) for bm in (1, 2, 4, 8) for w in (4, 8, 16)]
CPU_CONFIGS = [triton.Config({"BLOCK_M": 2}, num_warps=4)]  # the interpreter: one config, nothing to time


@triton.jit
def _col_offsets(cols, HD: tl.constexpr, stride_xh):
    return (cols // HD) * stride_xh + cols % HD


@triton.autotune(do_bench=tune_bench, configs=pick_configs(QUANT_CONFIGS, CPU_CONFIGS), key=["K", "MODE", "HD"],
                 prune_configs_by={"early_config_prune": prune_row_tiles})
@triton.jit
def _quant_kernel(
    x_ptr, q_ptr, scale_ptr, amax_ptr,  # x [M, K] (or a view, see below), q [M, K] contiguous, scale [M] or [1]
    M, K, L, stride_xb, stride_xm, stride_xh,
    MODE: tl.constexpr, ONE_TILE: tl.constexpr, ROUND_FIRST: tl.constexpr, HD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_K)
    # row r of the [M, K] matrix is token r % L of sample r // L (a 2-D x has L = M, one "sample"); column c is
    # element c % HD of head c // HD. HD is a power-of-two constexpr, so the compiler still sees runs of HD
    # contiguous columns and vectorises the loads; a 2-D or 3-D x is one run (HD = BLOCK_K, stride_xh = HD).
    x_rows = x_ptr + (rows // L).to(tl.int64)[:, None] * stride_xb + (rows % L).to(tl.int64)[:, None] * stride_xm
    q_rows = q_ptr + rows[:, None].to(tl.int64) * K

    # 1. amax per row (not needed when the scale or the tensor's amax is given)
    if MODE == ROW or MODE == AMAX:
        if ONE_TILE:  # the whole row is one tile: load it once and keep it for the cast
            mask = row_ok[:, None] & (cols[None, :] < K)
            x = tl.load(x_rows + _col_offsets(cols, HD, stride_xh)[None, :], mask=mask, other=0.0).to(tl.float32)
            amax = tl.max(tl.abs(x), axis=1)
        else:
            amax = tl.zeros((BLOCK_M,), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                mask = row_ok[:, None] & (k0 + cols[None, :] < K)
                offs = _col_offsets(k0 + cols, HD, stride_xh)[None, :]
                xk = tl.load(x_rows + offs, mask=mask, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.max(tl.abs(xk), axis=1))
        if MODE == AMAX:
            tl.atomic_max(amax_ptr, tl.max(amax, axis=0))
    if MODE == TENSOR:
        amax = tl.full((BLOCK_M,), 1.0, tl.float32) * tl.load(amax_ptr)  # the tensor's amax, once per row

    # 2. scale = max(amax, 1e-12) / 448 (stored) and its inverse 448 / max(amax, 1e-12) (used), both IEEE divisions
    if MODE == ROW or MODE == TENSOR:
        amax = tl.maximum(amax, 1e-12)
        scale = tl.math.div_rn(amax, tl.full((BLOCK_M,), 448.0, tl.float32))
        inv = tl.math.div_rn(tl.full((BLOCK_M,), 448.0, tl.float32), amax)[:, None]
        if MODE == ROW:
            tl.store(scale_ptr + rows, scale, mask=row_ok)
        else:
            tl.store(scale_ptr + rows * 0, scale, mask=rows == 0)  # row 0's program writes the one scale
    if MODE == STATIC:
        inv = tl.math.div_rn(tl.full((BLOCK_M,), 1.0, tl.float32), tl.load(scale_ptr + rows * 0))[:, None]

    # 3. the cast
    if MODE != AMAX:
        if ONE_TILE and MODE == ROW:
            tl.store(q_rows + cols[None, :], to_e4m3(x, inv, ROUND_FIRST), mask=mask)
        else:
            for k0 in range(0, K, BLOCK_K):
                mask = row_ok[:, None] & (k0 + cols[None, :] < K)
                offs = _col_offsets(k0 + cols, HD, stride_xh)[None, :]
                xk = tl.load(x_rows + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(q_rows + k0 + cols[None, :], to_e4m3(xk, inv, ROUND_FIRST), mask=mask)


def quant_fp8(x: torch.Tensor, per_token: bool = True, scale: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (bf16/fp16/fp32, last dim contiguous) -> (x_fp8 [M, K] e4m3, scale fp32 [M] or [1]).

    x may also be a [B, L, K] view, or a [B, L, H, hd] view with K = H * hd (hd a power of two), with any strides
    but a contiguous last dimension; M = B * L. That is one stream's slice of the joint attention output,
    `out.transpose(1, 2)[:, :Li]` of SDPA's [B, H, Ltot, hd], which no 2-D stride describes: the kernel reads it in
    place instead of the copy reshape would make, and writes the rows in (b, l) order, columns in (h, d) order.

    per_token=True: one scale per row. per_token=False: one scale for the whole tensor (two launches).
    scale=: a calibrated per-tensor dequant scale (1 element, fp32); no amax is computed, per_token is ignored
    and the same tensor is returned as the scale.
    """
    fn = "quant_fp8"
    check_tensor(fn, "x", x, (torch.bfloat16, torch.float16, torch.float32), ndim=x.dim() if x.dim() in (3, 4) else 2)
    if scale is not None:
        check_scale(fn, "scale", scale, 1, "tensor")
    dev = check_device(fn, x, scale)
    x4 = x.view(1, *x.shape) if x.dim() == 2 else x  # [B, L, K] or [B, L, H, hd]
    B, L = x4.shape[:2]
    M, K = B * L, x4.shape[2:].numel()
    if x4.dim() == 4 and x4.shape[3] != next_pow2(x4.shape[3]):
        raise InputError(f"{fn}: x has shape {tuple(x.shape)}; a [B, L, H, hd] view needs hd a power of two "
                         f"(pass x.reshape(B, L, -1) for other head sizes)")
    q = torch.empty((M, K), dtype=FP8, device=dev)
    if scale is not None:
        mode, out_scale = STATIC, scale
    elif per_token:
        mode, out_scale = ROW, torch.empty(M, dtype=torch.float32, device=dev)
    else:
        mode, out_scale = TENSOR, torch.empty(1, dtype=torch.float32, device=dev)
    if M == 0 or K == 0:  # nothing to read: an empty row has amax 0, so its scale is the floor
        return q, out_scale.fill_(SCALE_FLOOR / FP8_MAX) if scale is None else out_scale
    one_tile = K <= MAX_ROW_TILE
    block_k = next_pow2(K) if one_tile else 4096
    # head width and stride: [B, L, H, hd] reads runs of hd; [B, L, K] one run per BLOCK_K (see the kernel)
    hd, stride_h = (x4.shape[3], x4.stride(2)) if x4.dim() == 4 else (block_k, block_k)
    strides = (x4.stride(0), x4.stride(1), stride_h)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)
    with on_device(dev):
        amax = out_scale  # unused unless per-tensor
        if mode is TENSOR:  # launch 1 of 2: amax over the whole tensor (atomic max into one fp32)
            amax = torch.zeros(1, dtype=torch.float32, device=dev)
            _quant_kernel[grid](x, q, out_scale, amax, M, K, L, *strides, MODE=AMAX.value, ONE_TILE=one_tile,
                                ROUND_FIRST=round_first(dev), HD=hd, BLOCK_K=block_k)
        _quant_kernel[grid](x, q, out_scale, amax, M, K, L, *strides, MODE=mode.value, ONE_TILE=one_tile,
                            ROUND_FIRST=round_first(dev), HD=hd, BLOCK_K=block_k)
    return q, out_scale


def quant_fp8_ref(x: torch.Tensor, per_token: bool = True, scale: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch quant_fp8 with the same semantics (runs anywhere, any torch >= 2.4)."""
    if x.dim() not in (2, 3, 4):
        raise InputError(f"quant_fp8_ref: x has shape {tuple(x.shape)}; expected [M, K], [B, L, K] or [B, L, H, hd]")
    xf = x.float().reshape(-1, x.shape[2:].numel() if x.dim() == 4 else x.shape[-1])
    if scale is None:
        amax = xf.abs().amax(dim=1) if per_token else xf.abs().amax().reshape(1)
        amax = amax.clamp_min(SCALE_FLOOR)
        # tensor / tensor: an IEEE division, as the kernel's div_rn. A Python-scalar operand is not: CUDA torch
        # divides by a scalar as a multiply by its reciprocal and computes 448 / t as reciprocal(t) * 448, which
        # is one ulp off now and then (H200, GPU session 1: the scales differed while every code agreed)
        scale = amax / torch.full_like(amax, FP8_MAX)
        inv = torch.full_like(amax, FP8_MAX) / amax
    else:
        inv = torch.ones_like(scale) / scale
    q = xf * (inv[:, None] if inv.numel() > 1 else inv.reshape(1, 1))
    return q.clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


if __name__ == "__main__":
    from kernels._common import bench_ms, check_line, print_table, rel_rms

    if not torch.cuda.is_available() and not interpreting():
        sys.exit("needs a CUDA GPU, or TRITON_INTERPRET=1 to run the check on the CPU")
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    shapes = [(8858, 2432), (8858, 9728)] if dev == "cuda" else [(67, 72), (3, 300)]
    torch.manual_seed(0)
    for M, K in shapes:  # 1. check against the reference (dequantized values, so a flipped code counts)
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16) * 3
        for per_token in (True, False):
            q, s = quant_fp8(x, per_token)
            qr, sr = quant_fp8_ref(x, per_token)
            deq = lambda q, s: q.float() * (s[:, None] if s.numel() > 1 else s)
            check_line(f"quant_fp8 M={M} K={K} per_token={per_token}", rel_rms(deq(q, s), deq(qr, sr)), 1e-3)
    if dev == "cpu":
        sys.exit(0)
    rows = []  # 2. bandwidth: bytes read + written per call, against a device-to-device copy of x
    for M, K in shapes:
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        nbytes = M * K * (2 + 1) + 4 * M
        copy_ms = bench_ms(lambda: torch.empty_like(x).copy_(x))[0]
        for name, f in [("triton per-token", lambda: quant_fp8(x)), ("torch ref per-token", lambda: quant_fp8_ref(x)),
                        ("triton per-tensor", lambda: quant_fp8(x, per_token=False))]:
            ms = bench_ms(f)[0]
            rows.append({"M": M, "K": K, "impl": name, "ms": ms, "GB/s": nbytes / ms * 1e-6,
                         "copy GB/s": 2 * M * K * 2 / copy_ms * 1e-6})
    print_table(rows, ["M", "K", "impl", "ms", "GB/s", "copy GB/s"])
