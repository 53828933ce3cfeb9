"""Fused LayerNorm + adaLN modulation + per-token FP8 quantisation: the prologue of every qkv and fc1 GEMM in an
MMDiT block, in one pass over the activations.

    y[m, :]   = LayerNorm(x[m, :]) * (1 + scale[b, :]) + shift[b, :],   b = m // rows_per_batch
    LayerNorm = (x - mean) / sqrt(var + eps), no affine parameters, statistics in fp32 (SD3: eps 1e-6)
    y_fp8, y_scale = per-token E4M3 quantisation of y (as kernels/fp8_quant.py: scale = max|y| / 448 per row)

Shapes: x [M, K] with M = B * rows_per_batch (the B samples' tokens, row-major, as x.reshape(-1, K) of a
[B, L, K] stream gives), shift / scale [B, K] (chunks of the adaLN output; rows may be strided, so
`mod.chunk(6, dim=1)` views work without a copy). Outputs: y_fp8 [M, K] float8_e4m3fn and y_scale [M] fp32,
ready for fp8_gemm(y_fp8, y_scale, w, w_scale, ...). ln_mod() is the same kernel without the quantisation, for
the bf16 path, and returns y in the dtype torch would produce.

Why fuse: unfused, the model reads and writes the [M, K] stream four times (LayerNorm, *(1+scale), +shift,
quantise) where one read of x and one write of 1-byte codes suffice; the kernel is purely memory-bound, so its
figure of merit is GB/s against the device's copy bandwidth. One program owns BLOCK_M whole rows (K <= 16384,
held in registers), so mean, variance, amax and the cast all happen on data already loaded. A row is held as two
power-of-two tiles, the largest power of two <= K and the rest rounded up (2432 = 2048 + 384 in a 512 tile),
because with the exact roundings below the kernel is bound by instruction issue rather than by DRAM: one
4096-wide tile for K = 2432 left 40% of the lanes computing on padding, 1024 SASS instructions per thread
(sm90, 4 warps, quantising; 496 without the quantisation), and measured 37% of the copy bandwidth on an H200.
Two tiles and a NaN-propagating min/max clamp (_common.to_e4m3) bring it to 720. On the H200, one config each
by autotuning (bench/results/2026-12-02_h200_session8, CUDA graph): K = 2432 35.6 vs 41.4 us (43% instead of 37%
of the copy bandwidth); K = 1536 21.9 vs 21.6 us; the bf16-output variant, whose padding cost less, got slower
(K = 1536: 21.7 vs 17.0 us; K = 2432: 28.6 vs 27.2 us). The quantising kernel is what FP8 blocks run.

Numerics match the plain model exactly, not just approximately: the reference is what minisd35's model does,
F.layer_norm(x) * (1 + scale) + shift in x's dtype, where torch rounds every intermediate (the LayerNorm output,
1 + scale, the product, the sum) to its result dtype. The kernel computes in fp32 but rounds at the same four
points to the same dtypes (given as constexprs), so its y is torch's y up to the last bit of the LayerNorm
statistics, and the fp8 codes agree except where that bit flips a rounding. This needs the kernel compiled
without floating-point contraction (enable_fp_fusion=False): otherwise LLVM narrows the rounded product and sum to
bf16 operations and fuses them into one bf16 fma, a single rounding where torch has two, which on an H200 moved a
quarter of the bf16 outputs by one ulp and flipped 4% of the fp8 codes (bench/results, GPU session 1).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # `python kernels/ln_mod_quant.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._common import (
    MAX_ROW_TILE,
    TL_DTYPES,
    check_device,
    check_tensor,
    interpreting,
    next_pow2,
    on_device,
    pick_configs,
    prune_row_tiles,
    round_first,
    round_to,
    to_e4m3,
    tune_bench,
)
from kernels.fp8_quant import quant_fp8_ref
from minisd35.errors import InputError

# BLOCK_M rows per program x num_warps; BLOCK_K = K rounded up to a power of two (whole rows), pruned as in
# fp8_quant.py so that the row tile fits in registers.
LN_CONFIGS = [triton.Config({"BLOCK_M": bm}, num_warps=w) for bm in (1, 2, 4) for w in (4, 8, 16)]
CPU_CONFIGS = [triton.Config({"BLOCK_M": 2}, num_warps=4)]  # the interpreter: one config, nothing to time


@triton.jit
def _modulate(d, rstd, b, cols, mask, shift_ptr, scale_ptr, stride_shift, stride_scale,
              LN_DT: tl.constexpr, T_DT: tl.constexpr, U_DT: tl.constexpr, Y_DT: tl.constexpr,
              ROUND_FIRST: tl.constexpr):
    """One tile of columns: y = LN * (1 + scale[b]) + shift[b] from the centred x (d) and 1/std, rounded where torch
    rounds. Masked columns have d = 0 and load scale = shift = 0, so their y is exactly 0."""
    ln = round_to(d * rstd[:, None], LN_DT, ROUND_FIRST)
    sc = tl.load(scale_ptr + b * stride_scale + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sh = tl.load(shift_ptr + b * stride_shift + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    t = round_to(1.0 + sc, T_DT, ROUND_FIRST)
    u = round_to(ln * t, U_DT, ROUND_FIRST)
    return round_to(u + sh, Y_DT, ROUND_FIRST)


@triton.jit
def _store(y_ptr, rows, cols, mask, stride_ym, y, inv, QUANT: tl.constexpr, ROUND_FIRST: tl.constexpr):
    y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :]
    if QUANT:
        tl.store(y_ptrs, to_e4m3(y, inv, ROUND_FIRST), mask=mask)
    else:
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.autotune(do_bench=tune_bench, configs=pick_configs(LN_CONFIGS, CPU_CONFIGS), key=["K", "QUANT"],
                 prune_configs_by={"early_config_prune": prune_row_tiles})
@triton.jit
def _ln_mod_kernel(
    x_ptr, shift_ptr, scale_ptr, y_ptr, y_scale_ptr,
    M, K, rows_per_batch, eps,
    stride_xm, stride_shift, stride_scale, stride_ym,
    QUANT: tl.constexpr, ROUND_FIRST: tl.constexpr,
    LN_DT: tl.constexpr, T_DT: tl.constexpr, U_DT: tl.constexpr, Y_DT: tl.constexpr,  # torch's result dtypes
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_K2: tl.constexpr, TAIL: tl.constexpr,
):
    # a row is two power-of-two tiles: columns [0, BLOCK_K) with BLOCK_K <= K (no column mask), and with TAIL the
    # rest, [BLOCK_K, K), in a BLOCK_K2-wide masked tile (see the module docstring: 2432 = 2048 + 384 of 512)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xm
    ca = tl.arange(0, BLOCK_K)
    ma = tl.broadcast_to(row_ok[:, None], (BLOCK_M, BLOCK_K))
    xa = tl.load(x_rows + ca[None, :], mask=ma, other=0.0).to(tl.float32)
    total = tl.sum(xa, axis=1)
    if TAIL:
        cb = BLOCK_K + tl.arange(0, BLOCK_K2)
        mb = row_ok[:, None] & (cb < K)[None, :]
        xb = tl.load(x_rows + cb[None, :], mask=mb, other=0.0).to(tl.float32)
        total += tl.sum(xb, axis=1)

    # LayerNorm statistics in fp32 (two-pass on registers: mean, then the centred sum of squares)
    mean = total / K
    da = xa - mean[:, None]
    sq = tl.sum(da * da, axis=1)
    if TAIL:
        db = tl.where(mb, xb - mean[:, None], 0.0)
        sq += tl.sum(db * db, axis=1)
    rstd = tl.math.rsqrt(sq / K + eps)

    # modulation with this row's sample's shift and scale, then (QUANT) per-token E4M3 as fp8_quant.py's ROW mode
    b = (rows // rows_per_batch)[:, None]
    ya = _modulate(da, rstd, b, ca, ma, shift_ptr, scale_ptr, stride_shift, stride_scale, LN_DT, T_DT, U_DT, Y_DT,
                   ROUND_FIRST)
    amax = tl.max(tl.abs(ya), axis=1)
    if TAIL:
        yb = _modulate(db, rstd, b, cb, mb, shift_ptr, scale_ptr, stride_shift, stride_scale, LN_DT, T_DT, U_DT,
                       Y_DT, ROUND_FIRST)
        amax = tl.maximum(amax, tl.max(tl.abs(yb), axis=1))
    inv = amax[:, None]  # unused without QUANT
    if QUANT:
        amax = tl.maximum(amax, 1e-12)
        tl.store(y_scale_ptr + rows, tl.math.div_rn(amax, tl.full((BLOCK_M,), 448.0, tl.float32)), mask=row_ok)
        inv = tl.math.div_rn(tl.full((BLOCK_M,), 448.0, tl.float32), amax)[:, None]
    _store(y_ptr, rows, ca, ma, stride_ym, ya, inv, QUANT, ROUND_FIRST)
    if TAIL:
        _store(y_ptr, rows, cb, mb, stride_ym, yb, inv, QUANT, ROUND_FIRST)


def _check(fn: str, x, shift, scale, rows_per_batch: int) -> None:
    floats = (torch.bfloat16, torch.float16, torch.float32)
    check_tensor(fn, "x", x, floats, ndim=2)
    check_tensor(fn, "shift", shift, floats, ndim=2)
    check_tensor(fn, "scale", scale, floats, ndim=2)
    M, K = x.shape
    if shift.shape != scale.shape or shift.shape[1] != K:
        raise InputError(f"{fn}: shift {tuple(shift.shape)} and scale {tuple(scale.shape)} must both be [B, {K}] "
                         f"(one row of modulation per sample, as wide as x)")
    B = shift.shape[0]
    if not isinstance(rows_per_batch, int) or rows_per_batch <= 0 or B * rows_per_batch != M:
        raise InputError(f"{fn}: x has M={M} rows but shift/scale have B={B} rows and rows_per_batch="
                         f"{rows_per_batch}; M must equal B * rows_per_batch (tokens per sample)")


def row_tiles(K: int) -> dict:
    """The kernel's two column tiles for rows of K: the largest power of two <= K, and the rest rounded up."""
    head = 1 << (K.bit_length() - 1)
    return dict(BLOCK_K=head, BLOCK_K2=next_pow2(K - head) if K > head else 1, TAIL=K > head)


def _launch(x, shift, scale, rows_per_batch: int, eps: float, quant: bool):
    fn = "ln_mod_quant" if quant else "ln_mod"
    _check(fn, x, shift, scale, rows_per_batch)
    M, K = x.shape
    if K > MAX_ROW_TILE:
        raise InputError(f"{fn}: K={K} is wider than the {MAX_ROW_TILE} columns one program holds in registers; "
                         f"use ln_mod_quant_ref / ln_mod_ref for such rows")
    dev = check_device(fn, x, shift, scale, fp8=quant)
    # the dtypes torch gives the four intermediates of F.layer_norm(x) * (1 + scale) + shift
    t_dt = scale.dtype
    u_dt = torch.promote_types(x.dtype, t_dt)
    y_dt = torch.promote_types(u_dt, shift.dtype)
    y = torch.empty((M, K), dtype=torch.float8_e4m3fn if quant else y_dt, device=dev)
    y_scale = torch.empty(M, dtype=torch.float32, device=dev)
    if M == 0 or K == 0:
        return y, y_scale.fill_(1e-12 / 448.0)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)
    with on_device(dev):
        _ln_mod_kernel[grid](
            x, shift, scale, y, y_scale, M, K, rows_per_batch, float(eps),
            x.stride(0), shift.stride(0), scale.stride(0), y.stride(0),
            QUANT=quant, ROUND_FIRST=round_first(dev),
            LN_DT=TL_DTYPES[x.dtype], T_DT=TL_DTYPES[t_dt], U_DT=TL_DTYPES[u_dt], Y_DT=TL_DTYPES[y_dt],
            **row_tiles(K),
            enable_fp_fusion=False,  # keep torch's roundings: no fma across the rounded (1+scale) product and +shift
        )
    return y, y_scale


def ln_mod_quant(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, rows_per_batch: int,
                 eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_fp8 [M, K] e4m3, y_scale [M] fp32) for y = LayerNorm(x) * (1 + scale[b]) + shift[b], b = m // rows."""
    return _launch(x, shift, scale, rows_per_batch, eps, quant=True)


def ln_mod(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, rows_per_batch: int,
           eps: float = 1e-6) -> torch.Tensor:
    """y = LayerNorm(x) * (1 + scale[b]) + shift[b] without quantisation, in the dtype torch would give (bf16)."""
    return _launch(x, shift, scale, rows_per_batch, eps, quant=False)[0]


def ln_mod_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, rows_per_batch: int,
               eps: float = 1e-6) -> torch.Tensor:
    """What the plain model computes, in x's dtype: F.layer_norm(x) * (1 + scale[b]) + shift[b]."""
    _check("ln_mod_ref", x, shift, scale, rows_per_batch)
    sh = shift.repeat_interleave(rows_per_batch, dim=0)
    sc = scale.repeat_interleave(rows_per_batch, dim=0)
    return F.layer_norm(x, (x.shape[1],), eps=eps) * (1 + sc) + sh


def ln_mod_quant_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, rows_per_batch: int,
                     eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """ln_mod_ref followed by quant_fp8_ref (per token)."""
    return quant_fp8_ref(ln_mod_ref(x, shift, scale, rows_per_batch, eps))


if __name__ == "__main__":
    from kernels._common import bench_ms, check_line, print_table, rel_rms

    if not torch.cuda.is_available() and not interpreting():
        sys.exit("needs a CUDA GPU, or TRITON_INTERPRET=1 to run the check on the CPU")
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    cases = [(2, 4429, 2432), (2, 4429, 1536)] if dev == "cuda" else [(3, 5, 72), (1, 3, 300)]
    torch.manual_seed(0)
    rows = []
    for B, L, K in cases:
        x = torch.randn(B * L, K, device=dev, dtype=torch.bfloat16) * 2 + 0.5
        mod = torch.randn(B, 6 * K, device=dev, dtype=torch.bfloat16) * 0.5
        shift, scale = mod[:, :K], mod[:, K:2 * K]  # strided chunks, as the model passes them
        q, s = ln_mod_quant(x, shift, scale, L)  # 1. check
        qr, sr = ln_mod_quant_ref(x, shift, scale, L)
        check_line(f"ln_mod_quant B={B} L={L} K={K}", rel_rms(q.float() * s[:, None], qr.float() * sr[:, None]), 1e-3)
        check_line(f"ln_mod B={B} L={L} K={K}", rel_rms(ln_mod(x, shift, scale, L), ln_mod_ref(x, shift, scale, L)),
                   1e-3)
        if dev == "cpu":
            continue
        nbytes = B * L * K * (2 + 1) + 4 * B * L  # 2. bandwidth, against a copy of x
        copy_ms = bench_ms(lambda: torch.empty_like(x).copy_(x))[0]
        for impl, f in [("triton ln_mod_quant", lambda: ln_mod_quant(x, shift, scale, L)),
                        ("torch ref (LN, modulate, quant)", lambda: ln_mod_quant_ref(x, shift, scale, L)),
                        ("triton ln_mod (bf16 out)", lambda: ln_mod(x, shift, scale, L))]:
            ms = bench_ms(f)[0]
            moved = nbytes + (B * L * K if "bf16" in impl else 0)
            rows.append({"M": B * L, "K": K, "impl": impl, "ms": ms, "GB/s": moved / ms * 1e-6,
                         "copy GB/s": 2 * x.numel() * 2 / copy_ms * 1e-6})
    if rows:
        print_table(rows, ["M", "K", "impl", "ms", "GB/s", "copy GB/s"])
