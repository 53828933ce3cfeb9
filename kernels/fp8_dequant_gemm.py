"""Weight-only FP8 GEMM: y = x @ (w * w_scale).T + bias with the weight stored as E4M3 and the math in bf16/fp16.

Who needs it: GPUs without FP8 tensor cores (RTX 30xx / A100: sm80/86), where FP8 is a storage format that
halves weight memory, and the memory-bound M = 2 adaLN GEMVs on any GPU, where reading 1 byte per weight instead
of 2 is the whole game (SD3.5 Large: N = 6 * 2432 = 14592, K = 2432, i.e. 35 MB of fp8 per call instead of 71 MB).

Formats and shapes: x [M, K] bf16 or fp16 (last dim contiguous), w [N, K] float8_e4m3fn or its uint8 view
(nn.Linear layout), w_scale [N] fp32 (or 1 element), bias [N] or None; the output has x's dtype. Each program
loads a tile of fp8 bytes, turns it into x's dtype in registers, and feeds a bf16/fp16 tl.dot that accumulates
in fp32. E4M3 values are exact in bf16 and fp16 (3 mantissa bits, exponents 2**-9 .. 2**8), so the dequantised
tile is exact; the per-channel scale is applied once to the fp32 accumulator (sum_k x*w*s[n] = s[n] * sum_k x*w),
then bias, then the one rounding to x's dtype.

Two ways to decode the bytes (bitcast=):
  False: the pointer is typed float8e4nv and Triton converts (`w.to(tl.bfloat16)`); needs Triton FP8 support,
         i.e. compute capability 8.9+.
  True:  the pointer is uint8 and the kernel decodes E4M3 itself, so it runs on sm80/86 too. A code is
         s eeee mmm (sign, exponent with bias 7, 3-bit mantissa). Put it into an fp32 bit pattern with the sign
         in bit 31 and eeee mmm in bits 26..20: ((u & 0x7F) << 20) | ((u & 0x80) << 24). The exponent field is
         then 0000eeee, which fp32 reads with bias 127 instead of 7, so multiply by 2**120 (one FMUL, exact).
         The subnormals come out right for free: e = 0 makes an fp32 subnormal m * 2**-129 (fp32 arithmetic keeps
         subnormals unless told to flush them, and Triton does not), times 2**120 = m * 2**-9, exactly E4M3's
         subnormal. The one code that does not map is NaN (0x7F / 0xFF, which would decode as 480), so it is
         selected explicitly. (The first version went through an fp16 pattern and a conversion to fp32: 13.6
         instead of 11.6 instructions per weight in the FMA GEMV compiled for sm80.) Forced on an H200 (GPU
         session 8, bench/results/2026-12-02_h200_session8/gemv_run1.json, M = 2, CUDA graph): the one GEMV over
         Large's adaLN 1.456 ms against bf16 F.linear's 1.252 (0.86x of its speed; the first decode: 0.76x in
         session 7) and 0.729 ms with the hardware conversion; per layer 27.1 vs 19.8 us (Large), 17.3 vs 13.8 us
         (Medium). The decode is ALU work the fp8 path does not have, so on Hopper it only checks correctness;
         on the GPUs it is for (RTX 30, A100: no fp8 type, Triton's own fp8 casts are emulated there too) it is
         not measured.
  None (default): True for a uint8 weight or a GPU below sm89, otherwise False. Force True on Hopper to measure it.

What is fused when, and why (route="auto"; "fused" / "dequant" force one):
  M <= 4 (the adaLN modulation: one row per sample) and K <= 8192: an FMA GEMV without tensor cores: each
    program owns a few whole weight rows, with the K loop unrolled so that all of a row's 16-byte loads are in
    flight at once (see _dequant_gemv_kernel, and FMA_GEMV_CONFIG for its one launch config). H200, GPU session 7
    (bench/results/2026-12-02_h200_session7), M = 2, each call on its own weight in a CUDA graph (no launch cost,
    no L2 reuse): SD3.5 Large's adaLN (2432 -> 14592) 13.0-13.2 us against bf16 F.linear's 19.5-19.8 us
    (1.49-1.50x), Medium's (1536 -> 13824) 9.2-9.4 vs 13.3-13.4 us (1.42-1.45x), and the one GEMV over all of
    Large's adaLN weights that minisd35/fast.py runs per step (1,108,992 rows) 0.708-0.733 vs 1.203-1.255 ms
    (1.68-1.71x, 3.7-3.8 TB/s of fp8 weight; copy bandwidth 4.2 TB/s). The MMA kernel's GEMV configs are slower
    at all three (session 6: 20.9 us, 13.7 us, 0.968 ms), so the route is fixed rather than timed. With
    pdl=True (sm90+) it is launched with programmatic dependent launch: it starts while the previous kernel drains,
    prefetches its first weight tiles into L2 and waits for that kernel before it reads x (the per-layer call pays
    ~3.7 us of ramp and drain beyond its bytes, see FMA_GEMV_CONFIG). H200, GPU session 12 (bench/results/
    2026-12-04_h200_session12/gemv_run8.json), back-to-back calls on distinct weights in one CUDA graph: Large
    12.13 us against 13.16 without PDL and bf16 F.linear's 19.73 (1.63x), Medium 7.86 / 9.28 / 13.75 us (1.75x);
    the one all-adaLN GEMV, replayed alone (no predecessor to overlap), 0.736 vs 0.731 ms (1.71x / 1.72x).
  4 < M < DEQUANT_ROUTE_MIN_M (512): the fused MMA kernel, with a GEMV-shaped (M <= 16) and a GEMM-shaped autotune
    set. Here the product is memory-bound or close to it, and reading 1 byte per weight instead of 2 (and never
    writing a bf16 copy) is what the fusion buys.
  M >= DEQUANT_ROUTE_MIN_M: dequantise the whole weight to x's dtype in one memory-bound pass (dequant_weight: a
    small Triton kernel, read 1 byte + write 2 per weight), then F.linear (cuBLAS). At large M the GEMM is compute-
    bound and the weight's bytes no longer matter, while this kernel's bf16 MMA main loop (the decode sits between
    the loads and the MMA, with no warp specialisation to hide it) reached only 0.65x cuBLAS's rate (GPU session 1,
    H200, M = 8858: 1.55x F.linear's time). The extra pass costs 3*N*K bytes, ~13 us for 2432 x 7296 at ~4 TB/s,
    against a ~460 us GEMM. Where the threshold sits: with the fused kernel at ~0.65x cuBLAS's rate, the two routes
    cost the same where the GEMM time saved, 2*M*N*K * (1/(0.65 R) - 1/R) with R ~ 660 TFLOP/s (bf16 dense, H200),
    equals the pass, 3*N*K / ~3.5 TB/s: M ~ 450-550, for every N and K (both sides scale with N*K). Below that the
    fused kernel is also still partly memory-bound, which favours it further. bench/kernels_gpu.py times both
    routes at M = 64 .. 8858 so that the threshold can be checked on the device. The dequant route rounds w * scale
    to x's dtype before the GEMM (exactly fp8.py's "ref" / "torch" w8-only path), where the fused kernel applies
    the scale to the fp32 accumulator; both are within a bf16 rounding of the fp32 product.

Tiling: SWAP_AB (a config flag the autotuner chooses) computes the transposed product out^T = W @ x^T, so the
dequantised weight tile (which lives in registers) is the left operand of the MMA; Hopper's wgmma can read its
left operand from registers but the right one only from shared memory. For M <= 16 this is also the natural
GEMV shape: the token dimension becomes the MMA's narrow N (16), and the grid spreads over N so that enough
programs stream the weight at once. Two autotuned config sets (same kernel): GEMV (M <= 16) and GEMM.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # `python kernels/fp8_dequant_gemm.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

try:  # grid dependency control (Triton 3.3+): inline PTX griddepcontrol.launch_dependents / griddepcontrol.wait
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None

from kernels._common import (
    FP8,
    TL_DTYPES,
    capability,
    check_device,
    check_scale,
    check_tensor,
    grouped_tile,
    interpreting,
    on_device,
    pick_configs,
    round_to,
    tune_bench,
)
from minisd35.errors import HardwareError, InputError

GEMV_MAX_M = 16  # M up to this uses the GEMV config set (one 16-row MMA tile covers all tokens)


def _cfg(bm: int, bn: int, bk: int, stages: int, warps: int, swap: bool, group: int = 8) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "SWAP_AB": swap},
                         num_stages=stages, num_warps=warps)


# GEMV (M <= 16): narrow N tiles so that N = 14592 gives 114-456 programs, long K tiles so each one keeps several
# 8-32 KB weight loads in flight. GEMM: the usual bf16 Hopper tiles (BLOCK_K 64), with and without the swap.
GEMV_CONFIGS = [
    _cfg(16, 32, 256, 4, 4, True), _cfg(16, 64, 256, 4, 4, True), _cfg(16, 128, 128, 4, 4, True),
    _cfg(16, 32, 512, 3, 4, True), _cfg(16, 64, 256, 4, 4, False),
]
GEMM_CONFIGS = [
    _cfg(128, 256, 64, 3, 8, False), _cfg(256, 128, 64, 3, 8, False), _cfg(128, 128, 64, 4, 8, False),
    _cfg(128, 128, 64, 4, 4, False), _cfg(128, 256, 64, 3, 8, True), _cfg(128, 128, 64, 4, 8, True),
    _cfg(64, 128, 64, 4, 4, False), _cfg(64, 256, 64, 3, 8, False),  # for M of a few dozen to a few hundred
]
# FMA GEMV (M <= 4, no tensor cores): BLOCK_N whole weight rows per program, K unrolled in BLOCK_K tiles. What
# makes it fast is how many weight rows are in flight per SM, i.e. rows per program x programs per SM, and the
# latter is set by registers: 65536 per SM / (registers per thread x threads). 32 x 128 at 4 warps needs 132
# registers, so 3 programs (96 rows) fit an SM; capped at 128 (maxnreg; no spills up to K = 4096, which
# tests/test_kernels.py checks) 4 programs (128 rows) do. H200, GPU session 7 (bench/kernels_gpu.py's gemv
# section, 20 configs each timed alone in a CUDA graph, four runs): the capped 32 x 128 was the fastest config per
# layer in every run (Large 2432 -> 14592: 13.0-13.2 us, 18.3 uncapped; Medium 1536 -> 13824: 9.2-9.4 us) and
# within 1% of the fastest on the one GEMV over all of Large's adaLN (0.708-0.733 ms, 0.81 uncapped). It is a
# fixed choice, not autotuned: Triton's autotuner, timing eager calls, picked configs 3.5-5.7% slower per layer in
# two of three runs (a 13 us kernel's eager timing does not separate them). Rows wider than 4096 (no
# M <= 4 layer of SD3.5 has them) take the 8 x 256 config, 2 warps (no spills to K = 8192; not timed there).
# Tried and removed (GPU session 11): a per layer GEMV is one partial wave (Large: 456 programs of 32 rows on 132
# SMs x 4 slots, so 60 SMs stream 128 rows and 72 stream 96), and giving each program ceil(N / 528) rows instead
# (28; the last lanes clamped, not masked, which spilled) evens the SMs out to 1.3% - and changed nothing: 13.06
# vs 13.10 us (Large), 9.39 vs 9.26 us (Medium). The SMs with less to do leave their share of DRAM bandwidth to
# the others; what the per-layer call pays beyond its bytes (~3.7 us at the one GEMV's 3.8 TB/s) is the wave's
# ramp and drain, which only overlapping consecutive kernels (programmatic dependent launch) would hide.
# dequant_gemm(..., pdl=True) does that on sm90+ (see _dequant_gemv_kernel and FMA_PDL_TILES): Large 13.16 -> 12.13 us
# (1.50x -> 1.63x bf16's speed), Medium 9.28 -> 7.86 us (1.48x -> 1.75x), session 12 run 8.
FMA_GEMV_CONFIG = triton.Config({"BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4, num_stages=1, maxnreg=128)
FMA_GEMV_WIDE_CONFIG = triton.Config({"BLOCK_N": 8, "BLOCK_K": 256}, num_warps=2, num_stages=1)
# decoding uint8 codes by hand (bitcast=True) needs more registers: under the cap 32 x 128 spills (112 bytes, sm80),
# so this path runs it uncapped (166 registers, no spills). Forced on an H200 (session 8), the alternatives were
# within a few percent on the one all-adaLN GEMV (16 x 128, 4 warps: 1.403 vs 1.456 ms) and up to 10% faster per
# layer (8 x 256, 2 warps: 24.6 vs 27.1 us); kept, as Hopper is not where this path runs.
FMA_GEMV_BITCAST_CONFIG = triton.Config({"BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4, num_stages=1)
# With programmatic dependent launch (dequant_gemm(..., pdl=True), sm90+): the tiles of each row that a program asks
# L2 for before it waits for the previous kernel. 8 x 128 bytes per row is 32 KB per program, so Large's 456
# programs can have 15 MB of its 35 MB layer on the way from DRAM while the previous kernel drains (those that have
# an SM slot by then). On the one GEMV over all layers only the first wave starts early; every later program just
# has its first 8 tiles requested ahead of its loads. Session 12 run 8 (H200), depths 2 / 8 / 32: Large 12.19 /
# 12.13 / 12.08 us, Medium 7.86 / 7.86 / 7.91 us, the one all-adaLN GEMV 0.738 / 0.736 / 0.843 ms (32 tiles per
# row, likely thrashing L2 there; not profiled); so the overlap, not the depth, is the gain, and 8 stays.
FMA_PDL_TILES = 8
FMA_WIDE_K = 4096  # K above this takes FMA_GEMV_WIDE_CONFIG
FMA_MAX_K = 8192  # wider rows take the MMA GEMV (its K loop runs at run time; the FMA one's is unrolled)
# the interpreter: one small config per set, nothing to time (the GEMV one takes the swapped path)
CPU_GEMV_CONFIGS, CPU_GEMM_CONFIGS = [_cfg(16, 32, 32, 1, 4, True)], [_cfg(32, 32, 32, 1, 4, False, group=2)]
CPU_FMA_GEMV_CONFIG = triton.Config({"BLOCK_N": 16, "BLOCK_K": 32}, num_warps=4, num_stages=1)


@triton.jit
def e4m3_bits_to_float(u):
    """uint8 E4M3 codes -> fp32 values by bit manipulation (see the module docstring); NaN for 0x7F / 0xFF."""
    u = u.to(tl.int32)  # widen first (Triton versions differ on how uint8 op int-literal promotes)
    v = (((u & 0x7F) << 20) | ((u & 0x80) << 24)).to(tl.float32, bitcast=True) * 1.329227995784916e36  # 2**120
    return tl.where((u & 0x7F) == 0x7F, float("nan"), v)


@triton.jit
def _epilogue(acc, offs_m, offs_n, rn, M, N, out_ptr, stride_om, w_scale_ptr, bias_ptr,
              W_PER_COL: tl.constexpr, HAS_BIAS: tl.constexpr):
    """acc [rows, cols] fp32 -> * w_scale[n] + bias[n] -> x's dtype, rows >= M and cols >= N not stored."""
    if W_PER_COL:
        acc = acc * tl.load(w_scale_ptr + rn)[None, :]
    else:
        acc = acc * tl.load(w_scale_ptr)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn)[None, :].to(tl.float32)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_gemm_kernel(
    x_ptr, w_ptr, out_ptr, w_scale_ptr, bias_ptr,
    M, N, K, stride_xm, stride_wn, stride_om,
    M_BUCKET,  # unused in the kernel: part of the autotune key, so that M = 64 and M = 8858 get their own configs
    W_PER_COL: tl.constexpr, HAS_BIAS: tl.constexpr, BITCAST: tl.constexpr, DOT_F32: tl.constexpr,
    SWAP_AB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)  # as in _fp8_gemm_kernel

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m % M  # wrapped rows/cols: loads need no M/N mask, the extra results are not stored
    rn = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rm[:, None] * stride_xm + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + offs_k[None, :]  # [BLOCK_N, BLOCK_K], as stored
    dtype = x_ptr.dtype.element_ty
    # the MMA's input type: x's dtype; fp32 only under the interpreter, whose tl.dot multiplies bf16 tiles as raw
    # 16-bit integers (fp32 is exact here: bf16 and E4M3 values are fp32 values, and products fit in fp32)
    dot_dtype = tl.float32 if DOT_F32 else dtype

    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            x = tl.load(x_ptrs)
            wq = tl.load(w_ptrs)
        else:
            k_left = K - k * BLOCK_K
            x = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            wq = tl.load(w_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        if BITCAST:
            w = e4m3_bits_to_float(wq).to(dot_dtype)
        else:
            w = wq.to(dot_dtype)
        x = x.to(dot_dtype)
        if SWAP_AB:
            acc = tl.dot(w, tl.trans(x), acc)  # [BLOCK_N, BLOCK_K] @ [BLOCK_K, BLOCK_M]
        else:
            acc = tl.dot(x, tl.trans(w), acc)  # [BLOCK_M, BLOCK_K] @ [BLOCK_K, BLOCK_N]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if SWAP_AB:
        acc = tl.trans(acc)
    _epilogue(acc, offs_m, offs_n, rn, M, N, out_ptr, stride_om, w_scale_ptr, bias_ptr, W_PER_COL, HAS_BIAS)


@triton.jit
def _x_row(x_ptr, row: tl.constexpr, stride_xm, k0, offs_k, zero_n, K, MASKED: tl.constexpr):
    """Row `row` of x at columns k0 + offs_k, broadcast over the tile's BLOCK_N rows, in fp32 (zeros past K when
    MASKED). Loaded as a [BLOCK_N, BLOCK_K] tile (zero_n: BLOCK_N zeros) rather than as [BLOCK_K] and broadcast:
    the 2-D load gets the weight tile's register layout, so each thread reads exactly the x values its weights
    need (L1 hits), where a 1-D load would be re-laid out through shared memory with barriers on every tile."""
    ptrs = x_ptr + row * stride_xm + k0 + zero_n[:, None] + offs_k[None, :]
    if MASKED:
        return tl.load(ptrs, mask=(offs_k < K - k0)[None, :], other=0.0).to(tl.float32)
    return tl.load(ptrs).to(tl.float32)


@triton.jit
def _prefetch_l2(ptrs):
    """Ask L2 for the lines holding a tile of weight codes, with no register to load them into: one PTX
    prefetch.global.L2 (SASS CCTL.E.PF2) per 8 consecutive codes, i.e. per thread and row of the tile (pack=8: the
    asm takes a thread's 8 pointers, $8..$15, and names 8 dummy outputs, $0..$7; a warp's 16 pieces of one row are
    one 128-byte line). A prefetch is a hint without a result: L2 is the GPU's point of coherence, so it cannot
    make a later load read stale data."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$8]; // $0 $1 $2 $3 $4 $5 $6 $7 $9 $10 $11 $12 $13 $14 $15",
                              "=r,=r,=r,=r,=r,=r,=r,=r,l,l,l,l,l,l,l,l", [ptrs], dtype=tl.int32, is_pure=False, pack=8)


@triton.jit
def _gemv_rows(acc0, acc1, acc2, acc3, x_ptr, w_ptrs, stride_xm, k0, offs_k, zero_n, K,
               ROWS: tl.constexpr, BITCAST: tl.constexpr, MASKED: tl.constexpr):
    """One K tile: decode a [BLOCK_N, BLOCK_K] tile of weight codes and multiply-add it into one fp32 product tile
    per token row (elementwise: the reduction over K waits for the end)."""
    if MASKED:
        wq = tl.load(w_ptrs + k0, mask=(offs_k < K - k0)[None, :], other=0.0)
    else:
        wq = tl.load(w_ptrs + k0)
    w = e4m3_bits_to_float(wq) if BITCAST else wq.to(tl.float32)
    acc0 += w * _x_row(x_ptr, 0, stride_xm, k0, offs_k, zero_n, K, MASKED)
    if ROWS > 1:
        acc1 += w * _x_row(x_ptr, 1, stride_xm, k0, offs_k, zero_n, K, MASKED)
    if ROWS > 2:
        acc2 += w * _x_row(x_ptr, 2, stride_xm, k0, offs_k, zero_n, K, MASKED)
    if ROWS > 3:
        acc3 += w * _x_row(x_ptr, 3, stride_xm, k0, offs_k, zero_n, K, MASKED)
    return acc0, acc1, acc2, acc3


@triton.jit
def _gemv_store(acc, row: tl.constexpr, offs_n, rn, N, out_ptr, stride_om, w_scale_ptr, bias_ptr,
                W_PER_COL: tl.constexpr, HAS_BIAS: tl.constexpr):
    # _epilogue's scale / bias / store on a 1-D row. Not _epilogue itself on a [1, BLOCK_N] tile: compiled for sm90
    # that took the 16 x 256 config (the one the H200 autotuner picked for SD3.5 Large) from 128 to 255 registers
    y = tl.sum(acc, axis=1)  # [BLOCK_N]: the one cross-thread reduction of the kernel
    if W_PER_COL:
        y = y * tl.load(w_scale_ptr + rn)
    else:
        y = y * tl.load(w_scale_ptr)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn).to(tl.float32)
    tl.store(out_ptr + row * stride_om + offs_n, y.to(out_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _dequant_gemv_kernel(
    x_ptr, w_ptr, out_ptr, w_scale_ptr, bias_ptr,
    M, N, K, stride_xm, stride_wn, stride_om,
    W_PER_COL: tl.constexpr, HAS_BIAS: tl.constexpr, BITCAST: tl.constexpr, ROWS: tl.constexpr,
    K_TILES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    PDL: tl.constexpr, PDL_TILES: tl.constexpr,
):
    """ROWS = M <= 4 tokens, fp32 FMAs, no tensor cores. A GEMV is a stream over the weight: the kernel is fast
    exactly when enough weight bytes are in flight to cover the memory latency (~27 KB per SM on an H200: 4.8 TB/s
    x ~0.75 us / 132 SMs). So each program owns BLOCK_N whole weight rows, and the K loop is unrolled at compile
    time (K_TILES = cdiv(K, BLOCK_K) is a constexpr): every tile's load is independent of the others' arithmetic,
    so the compiler issues all of a row's loads before the first multiply, and each thread keeps K / BLOCK_K
    16-byte loads in flight instead of one. The products stay elementwise in one fp32 [BLOCK_N, BLOCK_K] tile per
    token (no reduction inside the loop, whose shuffles would serialise the tiles again); one sum at the end.
    (The first version reduced every tile and looped at run time: ~1.2 TB/s of weight, GPU session 2.)

    PDL (programmatic dependent launch; sm90+, launched with launch_pdl): the kernel may start while the one before
    it in the stream is still draining. It lets its own successor launch, asks L2 for its first PDL_TILES weight
    tiles (a static weight, not the predecessor's output: see dequant_gemm's pdl; DRAM has bandwidth to spare in a
    drain), and only then waits for the predecessor to finish with its writes visible (griddepcontrol.wait): every
    load of x, scale and bias and every store comes after the wait. Prefetched into L2 rather than loaded into
    registers, because at the 128-register cap there is no room to hold tiles across the wait: holding 1-4 of them
    spilled 8-56 bytes, depending on K (ptxas keeps the loads before the wait, and the live values with them)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = offs_n % N  # wrapped: the loads need no N mask, the extra rows are not stored
    # 0 .. BLOCK_K-1 written so that the compiler sees runs of 8 contiguous columns, not BLOCK_K: the weight tile
    # is then loaded 8 codes (8 bytes) per thread and access, the same register layout as 8 bf16 values of x (16
    # bytes, the widest load), so the two tiles meet in registers without a layout conversion
    offs_k = (tl.arange(0, BLOCK_K) // 8) * 8 + tl.arange(0, BLOCK_K) % 8
    zero_n = offs_n * 0
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + offs_k[None, :]  # [BLOCK_N, BLOCK_K], 64-bit offsets
    acc0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if PDL:
        gdc_launch_dependents()  # the next kernel may launch once every program got here (or exited)
        for t in tl.static_range(min(PDL_TILES, K_TILES if EVEN_K else K_TILES - 1)):  # never past the last row
            _prefetch_l2(w_ptrs + t * BLOCK_K)
        gdc_wait()
    for t in tl.static_range(K_TILES - 1):  # the full tiles
        acc0, acc1, acc2, acc3 = _gemv_rows(acc0, acc1, acc2, acc3, x_ptr, w_ptrs, stride_xm, t * BLOCK_K, offs_k,
                                            zero_n, K, ROWS, BITCAST, False)
    acc0, acc1, acc2, acc3 = _gemv_rows(acc0, acc1, acc2, acc3, x_ptr, w_ptrs, stride_xm, (K_TILES - 1) * BLOCK_K,
                                        offs_k, zero_n, K, ROWS, BITCAST, not EVEN_K)  # the last, masked if K % BLOCK_K
    if PDL:  # clamped, not wrapped: recomputed from offs_n, where holding rn through the loop spilled with PDL
        rn = tl.minimum(offs_n, N - 1)
    _gemv_store(acc0, 0, offs_n, rn, N, out_ptr, stride_om, w_scale_ptr, bias_ptr, W_PER_COL, HAS_BIAS)
    if ROWS > 1:
        _gemv_store(acc1, 1, offs_n, rn, N, out_ptr, stride_om, w_scale_ptr, bias_ptr, W_PER_COL, HAS_BIAS)
    if ROWS > 2:
        _gemv_store(acc2, 2, offs_n, rn, N, out_ptr, stride_om, w_scale_ptr, bias_ptr, W_PER_COL, HAS_BIAS)
    if ROWS > 3:
        _gemv_store(acc3, 3, offs_n, rn, N, out_ptr, stride_om, w_scale_ptr, bias_ptr, W_PER_COL, HAS_BIAS)


@triton.jit
def _dequant_weight_kernel(
    w_ptr, s_ptr, out_ptr, N, K, stride_wn, stride_on,
    W_PER_COL: tl.constexpr, BITCAST: tl.constexpr, ROUND_FIRST: tl.constexpr, OUT_DT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[n, k] = (w[n, k] as fp32 * w_scale[n]) rounded once to OUT_DT: what (w.float() * s[:, None]).to(dtype)
    gives, in one pass (torch needs two and an fp32 intermediate four times the weight's size)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    rows = offs_n[:, None].to(tl.int64)  # a model's fused weights can exceed 2**31 elements
    wq = tl.load(w_ptr + rows * stride_wn + offs_k[None, :], mask=mask, other=0.0)
    w = e4m3_bits_to_float(wq) if BITCAST else wq.to(tl.float32)
    if W_PER_COL:
        w = w * tl.load(s_ptr + offs_n, mask=offs_n < N, other=1.0)[:, None]
    else:
        w = w * tl.load(s_ptr)
    w = round_to(w, OUT_DT, ROUND_FIRST)
    tl.store(out_ptr + rows * stride_on + offs_k[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


DEQUANT_W_CONFIG = {"BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4}  # 8 KB of codes per program, 16-byte stores
CPU_DEQUANT_W_CONFIG = {"BLOCK_N": 8, "BLOCK_K": 32, "num_warps": 1}


def dequant_weight(w: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                   bitcast: bool | None = None) -> torch.Tensor:
    """w [N, K] e4m3 (or its uint8 view) and w_scale fp32 [N] / [1] -> (w.float() * w_scale[:, None]).to(dtype),
    one memory-bound pass. bitcast: decode the bytes by bit manipulation (uint8 weights, GPUs below sm89)."""
    fn = "dequant_weight"
    check_tensor(fn, "w", w, (FP8, torch.uint8), ndim=2, int64=True)
    N, K = w.shape
    check_scale(fn, "w_scale", w_scale, N, "output channel")
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise InputError(f"{fn}: dtype={dtype} is not supported; use torch.bfloat16, float16 or float32")
    if bitcast is None:
        bitcast = w.dtype == torch.uint8 or (w.device.type == "cuda" and capability(w.device) < (8, 9))
    dev = check_device(fn, w, w_scale, fp8=not bitcast)
    w = w.view(torch.uint8) if bitcast else w.view(FP8)
    out = torch.empty((N, K), dtype=dtype, device=dev)
    if N == 0 or K == 0:
        return out
    cfg = dict(CPU_DEQUANT_W_CONFIG if interpreting() or dev.type != "cuda" else DEQUANT_W_CONFIG)
    warps = cfg.pop("num_warps")
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(K, cfg["BLOCK_K"]))
    with on_device(dev):
        _dequant_weight_kernel[grid](w, w_scale, out, N, K, w.stride(0), out.stride(0), W_PER_COL=w_scale.numel() > 1,
                                     BITCAST=bool(bitcast), ROUND_FIRST=interpreting(), OUT_DT=TL_DTYPES[dtype],
                                     num_warps=warps, **cfg)
    return out


# The launchers: the FMA GEMV for M <= 4 (one fixed config, see FMA_GEMV_CONFIG), and the MMA kernel with its
# GEMV (M <= 16) and GEMM config sets, autotuned on the layer shape N, K.
_even_k = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
_k_tiles = triton.heuristics({"K_TILES": lambda args: triton.cdiv(args["K"], args["BLOCK_K"])})


def fma_gemv_config(K: int, bitcast: bool = False) -> triton.Config:
    """The FMA GEMV's launch config for rows of K (see FMA_GEMV_CONFIG; FMA_GEMV_BITCAST_CONFIG for uint8 codes)."""
    if interpreting() or not torch.cuda.is_available():
        return CPU_FMA_GEMV_CONFIG
    if K > FMA_WIDE_K:
        return FMA_GEMV_WIDE_CONFIG
    return FMA_GEMV_BITCAST_CONFIG if bitcast else FMA_GEMV_CONFIG


_fma_gemv = _even_k(_k_tiles(_dequant_gemv_kernel))


@functools.cache
def _triton_has_pdl() -> bool:
    """This Triton has both halves of PDL: the griddepcontrol intrinsics and the launch_pdl launch option."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return gdc_wait is not None and "launch_pdl" in CUDAOptions.__dataclass_fields__


def pdl_supported(dev: torch.device) -> bool:
    """Whether the FMA GEMV can run with programmatic dependent launch on dev: compiled (not the interpreter), a
    CUDA GPU of compute capability 9.0+ (griddepcontrol is sm90 PTX), and a Triton that has it."""
    return not interpreting() and dev.type == "cuda" and capability(dev) >= (9, 0) and _triton_has_pdl()


def fma_gemv_launch(cfg: triton.Config, args: tuple, M: int, N: int, flags: dict, pdl: bool = False,
                    pdl_tiles: int = FMA_PDL_TILES) -> None:
    """Launch the FMA GEMV with one config; args as _dequant_gemv_kernel takes them, up to stride_om. pdl: launch
    with programmatic dependent launch where pdl_supported() (else ignored), prefetching pdl_tiles tiles per row."""
    pdl = pdl and pdl_supported(args[0].device)
    opts = {"num_warps": cfg.num_warps, "num_stages": 1, **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}),
            **({"launch_pdl": True} if pdl else {})}
    _fma_gemv[(triton.cdiv(N, cfg.kwargs["BLOCK_N"]),)](*args, ROWS=M, **flags, PDL=pdl, PDL_TILES=pdl_tiles,
                                                        **cfg.kwargs, **opts)


_mma = _even_k(_dequant_gemm_kernel)
_gemv = triton.autotune(do_bench=tune_bench, configs=pick_configs(GEMV_CONFIGS, CPU_GEMV_CONFIGS),
                        key=["N", "K", "BITCAST"])(_mma)
_gemm = triton.autotune(do_bench=tune_bench, configs=pick_configs(GEMM_CONFIGS, CPU_GEMM_CONFIGS),
                        key=["N", "K", "BITCAST", "M_BUCKET"])(_mma)
FMA_MAX_M = 4  # M up to this may use the FMA GEMV
DEQUANT_ROUTE_MIN_M = 512  # M from this on: dequantise the weight, then cuBLAS (see the module docstring)
ROUTES = ("auto", "fused", "dequant")


def dequant_gemm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                 bitcast: bool | None = None, route: str = "auto", pdl: bool = False) -> torch.Tensor:
    """y [M, N] (x's dtype) = x @ (w.float() * w_scale[:, None]).T + bias, with fp32 accumulation.
    x [M, K] bf16/fp16, w [N, K] e4m3 or uint8, w_scale fp32 [N] or [1]. bitcast: see the module docstring.
    route: "auto" (fused kernels below DEQUANT_ROUTE_MIN_M rows, dequant_weight + F.linear from there on), or
    "fused" / "dequant" to force one.

    pdl: launch the FMA GEMV (M <= 4) with programmatic dependent launch: it may start while the previous kernel
    in the stream drains, and overlaps its ramp with that drain (see _dequant_gemv_kernel). Ignored where it does
    not apply: the interpreter, the CPU, GPUs below sm90, the MMA and dequant routes. x, w_scale and bias are read,
    and y written, only after the kernel's wait for the previous kernel, so they may be its output. w is touched
    before the wait, and that is the hazard this opts into: w must not be written by a kernel that may still be
    running, which with chains of PDL kernels (each lets its successor start at once) is not only the one just
    before. Module parameters qualify. (Today the touch is an L2 prefetch, a hint without a result, and L2 is
    coherent, so even a w written just before is read correctly; the contract is kept for a prologue that would
    load w into registers.) Off by default: the caller vouches for w (fp8.py and fast.py do)."""
    if route not in ROUTES:
        raise InputError(f"dequant_gemm: route={route!r} is not one of {ROUTES}")
    M = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() == 2 else 0
    if route == "dequant" or (route == "auto" and M >= DEQUANT_ROUTE_MIN_M):
        return _dequant_then_linear(x, w, w_scale, bias, bitcast)
    # a handful of rows: the FMA GEMV, which streams the weight faster than the 16-row MMA tile at every measured
    # shape (H200: 1.2-1.5x, see the module docstring); wider rows than its unrolled loop takes go to the MMA one
    if M > FMA_MAX_M or (M and x.shape[1] > FMA_MAX_K):
        return _dequant_gemm(x, w, w_scale, bias, bitcast, "mma")
    return _dequant_gemm(x, w, w_scale, bias, bitcast, "fma", pdl)


def _dequant_then_linear(x, w, w_scale, bias, bitcast) -> torch.Tensor:
    """The large-M route: the weight in x's dtype (one pass), then cuBLAS."""
    check_tensor("dequant_gemm", "x", x, (torch.bfloat16, torch.float16), ndim=2)
    if w.dim() == 2 and w.shape[1] != x.shape[1]:
        raise InputError(f"dequant_gemm: x is {list(x.shape)} but w is {list(w.shape)}; w must be [N, {x.shape[1]}]")
    if bias is not None:
        check_tensor("dequant_gemm", "bias", bias, (torch.bfloat16, torch.float16, torch.float32), ndim=1)
    wd = dequant_weight(w, w_scale, x.dtype, bitcast)
    return F.linear(x, wd, None if bias is None else bias.to(x.dtype))


def _dequant_gemm(x, w, w_scale, bias, bitcast, path: str, pdl: bool = False) -> torch.Tensor:
    """path: "fma" (the FMA GEMV, M <= 4; pdl: see dequant_gemm) or "mma" (tensor cores; GEMV configs up to 16
    rows, GEMM above; pdl is ignored)."""
    fn = "dequant_gemm"
    check_tensor(fn, "x", x, (torch.bfloat16, torch.float16), ndim=2)
    check_tensor(fn, "w", w, (FP8, torch.uint8), ndim=2, int64=True)  # e.g. all of a model's adaLN weights at once
    M, K = x.shape
    N = w.shape[0]
    if w.shape[1] != K:
        raise InputError(f"dequant_gemm: x is [{M}, {K}] but w is {list(w.shape)}; w must be [N, {K}]")
    check_scale(fn, "w_scale", w_scale, N, "output channel")
    if bias is not None:
        check_tensor(fn, "bias", bias, (torch.bfloat16, torch.float16, torch.float32), ndim=1)
        if bias.shape[0] != N:
            raise InputError(f"dequant_gemm: bias has shape {tuple(bias.shape)}; expected [{N}]")
    if bitcast is None:
        old_gpu = x.device.type == "cuda" and capability(x.device) < (8, 9)
        bitcast = w.dtype == torch.uint8 or old_gpu
    dev = check_device(fn, x, w, w_scale, bias, fp8=not bitcast)
    if not bitcast and w.dtype == torch.uint8:
        w = w.view(FP8)
    if bitcast:
        w = w.view(torch.uint8)
    if dev.type == "cuda" and x.dtype == torch.bfloat16 and capability(dev) < (8, 0):
        raise HardwareError("dequant_gemm: bf16 needs compute capability 8.0+; pass fp16 activations")

    out = torch.empty((M, N), dtype=x.dtype, device=dev)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return dequant_gemm_ref(x, w, w_scale, bias)
    args = (x, w, out, w_scale, bias if bias is not None else out, M, N, K, x.stride(0), w.stride(0), out.stride(0))
    flags = dict(W_PER_COL=w_scale.numel() > 1, HAS_BIAS=bias is not None, BITCAST=bool(bitcast))
    with on_device(dev):
        if path == "fma":
            if M > FMA_MAX_M:
                raise InputError(f"dequant_gemm: the FMA GEMV takes at most {FMA_MAX_M} rows, got M={M}")
            if K > FMA_MAX_K:
                raise InputError(f"dequant_gemm: the FMA GEMV takes K <= {FMA_MAX_K} (its K loop is unrolled), "
                                 f"got K={K}")
            fma_gemv_launch(fma_gemv_config(K, bool(bitcast)), args, M, N, flags, pdl)
        else:
            launch = _gemv if M <= GEMV_MAX_M else _gemm
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
            bucket = 16 if M <= GEMV_MAX_M else 128 if M <= 128 else 512 if M <= 512 else 4096
            launch[grid](*args, bucket, DOT_F32=interpreting(), **flags)
    return out


def dequant_gemm_ref(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                     bitcast: bool | None = None) -> torch.Tensor:
    """Plain torch, fp32 math: (x @ w.T) * w_scale + bias, cast to x's dtype. bitcast is accepted and ignored."""
    wf = (w.view(FP8) if w.dtype == torch.uint8 else w).float()
    y = (x.float() @ wf.t()) * w_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


if __name__ == "__main__":
    from kernels._common import bench_ms, check_line, print_table, rel_rms
    from kernels.fp8_quant import quant_fp8_ref

    if not torch.cuda.is_available() and not interpreting():
        sys.exit("needs a CUDA GPU, or TRITON_INTERPRET=1 to run the check on the CPU")
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    cases = [(2, 2432, 6 * 2432), (2, 1536, 9 * 1536), (256, 2432, 7296), (666, 2432, 7296), (8858, 2432, 2432)] \
        if dev == "cuda" else [(2, 72, 40), (67, 100, 56)]
    torch.manual_seed(0)
    rows = []
    for M, K, N in cases:
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        wq, ws = quant_fp8_ref(torch.randn(N, K, device=dev) * 0.02)
        bias = torch.randn(N, device=dev, dtype=torch.bfloat16)
        ref = dequant_gemm_ref(x, wq, ws, bias)  # 1. check
        for bitcast in (False, True):
            for route in ("fused", "dequant"):
                check_line(f"dequant_gemm M={M} K={K} N={N} bitcast={bitcast} route={route}",
                           rel_rms(dequant_gemm(x, wq, ws, bias, bitcast=bitcast, route=route), ref), 1e-2)
        if dev == "cpu":
            continue
        wb = (wq.float() * ws[:, None]).to(torch.bfloat16)  # 2. time against bf16 F.linear with the same weight
        for impl, f in [("triton fp8 (auto route)", lambda: dequant_gemm(x, wq, ws, bias)),
                        ("triton fp8, fused route", lambda: dequant_gemm(x, wq, ws, bias, route="fused")),
                        ("dequant_weight + F.linear", lambda: dequant_gemm(x, wq, ws, bias, route="dequant")),
                        ("dequant_weight alone", lambda: dequant_weight(wq, ws)),
                        ("triton bitcast", lambda: dequant_gemm(x, wq, ws, bias, bitcast=True)),
                        ("bf16 F.linear", lambda: F.linear(x, wb, bias))]:
            ms = bench_ms(f)[0]
            rows.append({"M": M, "K": K, "N": N, "impl": impl, "ms": ms, "TFLOP/s": 2 * M * N * K / ms * 1e-9,
                         "weight GB/s": N * K * (2 if "bf16" in impl else 3 if "alone" in impl else 1) / ms * 1e-6})
    if rows:
        print_table(rows, ["M", "K", "N", "impl", "ms", "TFLOP/s", "weight GB/s"])
