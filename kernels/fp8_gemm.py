"""Scaled FP8 GEMM with a fused epilogue: the W8A8 linear layer of minisd35's FP8 path.

    Y[m, n]   = act( acc[m, n] * a_scale[m] * w_scale[n] + bias[n] ),   acc = sum_k a[m, k] * w[n, k]  (fp32)
    out[m, n] = residual[m, n] + gate[m // rows_per_batch, n] * Y[m, n]     (gate / residual optional)

Formats and shapes: a [M, K] float8_e4m3fn (the activation, quantised per token by kernels/fp8_quant.py), w [N, K]
float8_e4m3fn in nn.Linear layout (K contiguous), a_scale [M] and w_scale [N] fp32 dequant multipliers, or
1-element per-tensor scales. Both operands are K-major, which is what Hopper's FP8 tensor-core instruction (wgmma)
requires of its two inputs: the tile of W loaded as [BLOCK_K, BLOCK_N] is W^T "in column-major" for free.
The epilogue runs on the fp32 accumulator before the one rounding to out_dtype: act="gelu_tanh" is fc1 of the
MLP; gate/residual is the adaLN gated residual after proj and fc2 (gate [B, N] from the modulation, residual
[M, N] the block's input stream, M = B * rows_per_batch). Fusing them saves two or three full passes over the
[M, N] output per layer, which for a DiT block is most of what an unfused FP8 path loses to bf16 (measured by
others on H100: eager, unfused torchao FP8 is slower than bf16; only compiled, fused FP8 is faster).

The accumulator story (why `fast_accum` exists and defaults to False):
  an FP8 tensor-core MMA on Hopper/Ada does not accumulate in true fp32. The products are summed into an
  accumulator that keeps about 13 mantissa bits ("fp22"; bits below are dropped), so a long K sum drifts: the
  relative error grows with K and the later partial products lose their low bits against a large running sum.
  Triton's `tl.dot(a, b, acc)` on fp8 operands on sm90 uses max_num_imprecise_acc = 2**30 by default, i.e. it
  never promotes: the whole K loop stays in that accumulator (fast_accum=True here, and torch._scaled_mm's
  use_fast_accum=True). The precise variant (fast_accum=False, the default) promotes every 128 products:
  `tl.dot(a, b, acc, max_num_imprecise_acc=128)` makes the compiler accumulate each 128-long slice of K in a fresh
  MMA accumulator and add it into the fp32 `acc` with ordinary fp32 adds, as cuBLAS / CUTLASS slow-accum and
  DeepGEMM do. (`acc += tl.dot(a, b)` per K tile does the same by hand, because Triton only folds
  `acc + dot(a, b, 0)` back into one accumulating dot when max_num_imprecise_acc is 0, which it is not for fp8 on
  sm90; tests/test_kernels.py compiles both for sm90 and counts the fp32 adds.) Measured on an H200 at K = 9728
  (SD3.5's fc2, the worst case): relative error against fp64 1.3e-4 (precise) vs 2.3e-3 (fast) on zero-mean data,
  6.0e-4 vs 0.148 (!) on all-positive data, identical to torch._scaled_mm slow / fast. Hence the default. The
  price: the adds run while the tensor cores wait (no warp specialisation here), about 25% of the MMA time. Same
  H200, M = 8858, Large shapes: precise 753-829 TFLOP/s, fast 962-1179, torch._scaled_mm row-wise 1040-1142
  (slow accumulation) and 1195-1290 (fast) - the promotion is the gap, cuBLAS overlaps it with the next MMA.

Why the default variant cannot overlap them, and what the other variants try (fp8_gemm(variant=...); all four
compute the same sums; compile them for sm90 with tests/test_kernels_fused.py and time them with
bench/kernels_gpu.py). In the default kernel one warpgroup issues the four k32 wgmmas of a K tile into a fresh
register tile, and its fp32 adds read those registers, so ptxas waits for the MMAs first; the next tile's wgmmas
overwrite the same registers, so they wait for the adds. MMA and promotion alternate inside every warpgroup, and
all warpgroups of the program run the same schedule. A skewed loop (issue tile k's MMA, then add tile k-1's
partial; two partial tiles unrolled by two) was compiled and read in SASS: Triton still puts a full
wgmma.wait_group 0 after each dot and ptxas only hoists the adds above the first of the four wgmmas, so the overlap
is a quarter at best; it is not kept. What would overlap them is warp specialisation: variant "ws" loads through
TMA descriptors and lets Triton 3.6's Hopper pass split the program into a producer warpgroup (TMA only) and two
consumer warpgroups with their own halves of the tile and their own barriers, so one consumer's adds run during
the other's MMAs (ping-pong by scheduling rather than by construction). On the GPU it deadlocks: H200, Triton
3.6.0, GPU session 11 (bench/gemm_configs_gpu.py, each config alone in its own process): all seven configs, fast
and precise, compiled in 1.0-1.8 s and not one launch returned within 45 s, so fp8_gemm refuses it on a GPU
unless MINISD35_GEMM_WS=1 (to try another Triton; the interpreter runs it, ignoring the specialisation, and the
compile test checks the split). kernels/fp8_gemm_gluon.py writes the overlap out by hand instead (Gluon's async
wgmma, two alternating partial accumulators; warp-specialised): level with cuBLAS, see its docstring. "tma" is the
same kernel without the specialisation, to separate the two effects; "add" is the promotion by `acc += tl.dot` of
the earlier study; "persistent" (one program per SM over all output tiles) overlaps the next tile's loads with
this tile's epilogue, which cuBLAS also does, but not the promotion (see its docstring for what it measured).

Tiling: BLOCK_M x BLOCK_N output tiles, K walked in BLOCK_K steps, tiles visited in GROUP_M-row groups so that
neighbouring programs share A rows and W columns in L2 (the Triton matmul tutorial's ordering). Row and column
indices past the edge are wrapped (% M, % N) instead of masked, so the main loop's loads need no M/N mask; those
rows are computed and never stored. K tails are masked unless K % BLOCK_K == 0 (EVEN_K).

Autotuning is keyed on N and K (fixed per layer) plus the epilogue and accumulation flags, never on M: the first
call for a given layer shape picks the config, so benchmark (or warm up) with a representative M first.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # `python kernels/fp8_gemm.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._common import (
    FP8,
    capability,
    check_device,
    check_scale,
    check_tensor,
    grouped_tile,
    on_device,
    pick_configs,
    tune_bench,
)
from minisd35.errors import HardwareError, InputError

ACTS = ("none", "gelu_tanh")
# ACC_MODE: FAST never promotes; PRECISE promotes every 128 products inside the dot lowering
# (max_num_imprecise_acc=128, the default); PRECISE_ADD promotes with `acc += tl.dot(a, b)` per K tile (kept to
# compare: same error, measured 3-10% slower on an H200)
FAST, PRECISE_ADD, PRECISE = 0, 1, 2
# the kernel variants fp8_gemm(variant=...) selects; all compute the same thing with the same accumulation
VARIANTS = {
    "default": "pointer loads, software pipelining, promotion inside the dot lowering (max_num_imprecise_acc)",
    "add": "as default, promotion by `acc += tl.dot(a, b)` per K tile (PRECISE_ADD)",
    "tma": "TMA descriptor loads, no warp specialisation",
    "ws": "TMA descriptor loads + warp specialisation: producer warpgroup, two consumer warpgroups (Hopper; "
          "deadlocks with Triton 3.6 on an H200, refused on a GPU unless MINISD35_GEMM_WS=1)",
    "persistent": "TMA descriptor loads, one program per SM looping over output tiles (tile and K loops flattened)",
}


def _cfg(bm: int, bn: int, bk: int, stages: int, warps: int, group: int = 8) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                         num_stages=stages, num_warps=warps)


# Hopper FP8 wants BLOCK_K >= 128 (one 128-byte row of fp8 per operand row per stage) and big tiles. The first
# four hold 128 fp32 accumulator registers per thread: the best for fast accumulation, but the promotion needs a
# second tile of the same size and they spill (ptxas -v, sm90: 255 registers + 300-600 bytes of spills), so
# _prune_gemm keeps them for fast_accum only. The rest hold 64 per thread and fit both (164-248 registers).
GEMM_CONFIGS = [
    _cfg(128, 256, 128, 3, 8), _cfg(256, 128, 128, 3, 8), _cfg(128, 256, 128, 4, 8), _cfg(64, 256, 128, 4, 4),
    _cfg(128, 128, 128, 3, 8), _cfg(128, 128, 128, 4, 8), _cfg(128, 128, 256, 3, 8), _cfg(128, 64, 128, 4, 4),
    _cfg(64, 128, 128, 4, 4),
]
CPU_CONFIGS = [_cfg(32, 32, 32, 1, 4, group=2)]  # the interpreter: one small config, nothing to time


def _prune_gemm(configs, named_args, **kwargs):
    """Per accumulation mode: PRECISE_ADD promotes once per K tile, so BLOCK_K must stay <= 128; both precise modes
    need registers for a second fp32 tile, so at most 64 accumulator registers per thread."""
    acc_mode = {**named_args, **kwargs}["ACC_MODE"]

    def fits(c: triton.Config) -> bool:
        if acc_mode == FAST:
            return True
        acc_regs = c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] // (32 * c.num_warps)
        return acc_regs <= 64 and (acc_mode == PRECISE or c.kwargs["BLOCK_K"] <= 128)

    return [c for c in configs if fits(c)] or configs[-1:]


@triton.jit
def _gelu_tanh(x):
    # 0.5 x (1 + tanh(u)) == x * sigmoid(2u) with u = sqrt(2/pi) (x + 0.044715 x^3); exp overflow gives -0 / x.
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return x / (1.0 + tl.exp(-2.0 * u))


@triton.autotune(do_bench=tune_bench, configs=pick_configs(GEMM_CONFIGS, CPU_CONFIGS),
                 key=["N", "K", "ACC_MODE", "ACT", "HAS_GATE", "HAS_RES"],
                 prune_configs_by={"early_config_prune": _prune_gemm})
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0,
                    "PROMOTE": lambda args: min(args["BLOCK_K"], 128)})  # products per promotion (<= the dot's K)
@triton.jit
def _fp8_gemm_kernel(
    a_ptr, w_ptr, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, gate_ptr, res_ptr,
    M, N, K, rows_per_batch,
    stride_am, stride_wn, stride_om, stride_gb, stride_rm,
    A_PER_ROW: tl.constexpr, W_PER_COL: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_RES: tl.constexpr, ACC_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, PROMOTE: tl.constexpr,
):
    # grouped tile order: GROUP_M consecutive row-tiles share each column-tile while it is hot in L2
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m % M  # wrapped: always a valid row, so the loads below need no M/N mask
    rn = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * stride_am + offs_k[None, :]  # [BLOCK_M, BLOCK_K], K contiguous
    w_ptrs = w_ptr + rn[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]: W^T, K contiguous

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if ACC_MODE == 0:  # FAST: the tensor core's own accumulator for all of K
            acc = tl.dot(a, b, acc)
        elif ACC_MODE == 1:  # PRECISE_ADD: a fresh MMA accumulator per K tile, promoted with fp32 adds
            acc += tl.dot(a, b)
        else:  # PRECISE: the compiler adds a partial accumulator into acc after every PROMOTE (128) products
            acc = tl.dot(a, b, acc, max_num_imprecise_acc=PROMOTE)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    _gemm_epilogue(acc, offs_m, offs_n, rm, rn, M, N, rows_per_batch, out_ptr, stride_om, a_scale_ptr, w_scale_ptr,
                   bias_ptr, gate_ptr, stride_gb, res_ptr, stride_rm, A_PER_ROW, W_PER_COL, HAS_BIAS, ACT, HAS_GATE,
                   HAS_RES)


@triton.jit
def _gemm_epilogue(acc, offs_m, offs_n, rm, rn, M, N, rows_per_batch, out_ptr, stride_om, a_scale_ptr, w_scale_ptr,
                   bias_ptr, gate_ptr, stride_gb, res_ptr, stride_rm,
                   A_PER_ROW: tl.constexpr, W_PER_COL: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                   HAS_GATE: tl.constexpr, HAS_RES: tl.constexpr):
    """All in fp32 on the accumulator: scales, bias, activation, gate, residual; one rounding at the store. rm / rn
    are the wrapped (always valid) row / column indices used for loads; offs_m / offs_n decide what is stored."""
    if A_PER_ROW:
        acc = acc * tl.load(a_scale_ptr + rm)[:, None]
    else:
        acc = acc * tl.load(a_scale_ptr)
    if W_PER_COL:
        acc = acc * tl.load(w_scale_ptr + rn)[None, :]
    else:
        acc = acc * tl.load(w_scale_ptr)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn)[None, :].to(tl.float32)
    if ACT == "gelu_tanh":
        acc = _gelu_tanh(acc)
    if HAS_GATE:
        acc *= tl.load(gate_ptr + (rm // rows_per_batch)[:, None] * stride_gb + rn[None, :]).to(tl.float32)
    if HAS_RES:
        acc += tl.load(res_ptr + rm[:, None] * stride_rm + rn[None, :]).to(tl.float32)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# The TMA / warp-specialised variant (Hopper): the same product, the same epilogue, the operands fetched by the TMA
# unit through tensor descriptors. With warp_specialize the compiler (Triton 3.6: tl.range(..., warp_specialize=True)
# on sm90, which needs descriptor loads and num_warps=4) splits the program into a producer warpgroup that only
# issues TMA copies (40 registers) and two consumer warpgroups of 232 registers, each owning half of the BLOCK_M
# rows with its own accumulator and its own barriers. The promotion adds of one consumer then run while the other
# consumer's MMAs keep the tensor cores busy, which a single warpgroup's code cannot arrange: there, Triton (and
# ptxas, which must wait before reading an async MMA's registers) orders MMA -> wait -> adds -> next MMA, and the
# tensor cores idle during the adds. Checked by compiling for sm90 on the CPU (tests/test_kernels_fused.py). On an
# H200 with Triton 3.6 the warp-specialised kernel compiles and then never finishes (see the module docstring).


def _set_block_shapes(nargs):
    """Autotune pre-hook: the descriptors' block shapes follow the config being run."""
    nargs["a_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["w_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


def _tma_cfg(bm: int, bn: int, bk: int, stages: int, warps: int, group: int = 8) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group}, num_stages=stages,
                         num_warps=warps, pre_hook=_set_block_shapes)


# num_warps=4 is what the compiler's Hopper warp specialisation accepts (it adds the producer and the second
# consumer itself); BLOCK_M >= 128 so that each consumer's half is a whole 64-row wgmma (64 x 256 does not compile).
# _prune_tma keeps the configs whose registers fit for precise accumulation.
WS_CONFIGS = [_tma_cfg(128, 128, 128, 4, 4), _tma_cfg(128, 128, 128, 3, 4), _tma_cfg(256, 128, 128, 3, 4),
              _tma_cfg(128, 128, 256, 3, 4), _tma_cfg(128, 256, 128, 3, 4), _tma_cfg(128, 128, 128, 5, 4),
              _tma_cfg(256, 128, 128, 4, 4)]
TMA_CONFIGS = [_tma_cfg(128, 128, 128, 4, 8), _tma_cfg(128, 128, 128, 3, 8), _tma_cfg(128, 256, 128, 3, 8),
               _tma_cfg(256, 128, 128, 3, 8)]
CPU_TMA_CONFIGS = [_tma_cfg(32, 32, 32, 1, 4, group=2)]


def _prune_tma(configs, named_args, **kwargs):
    """Tiles larger than 128 x 128 only where they fit in registers, as ptxas reports for sm90 (tests compile them):
    not with a fused epilogue (GELU / gate / residual spill there), and with precise accumulation (a promotion tile
    of BLOCK_N / 2 registers per thread next to the accumulator) only 256 x 128 in the warp-specialised kernel,
    whose consumer warpgroups get 232 registers."""
    args = {**named_args, **kwargs}
    epilogue = args["ACT"] != "none" or args["HAS_GATE"] or args["HAS_RES"]

    def fits(c: triton.Config) -> bool:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if bm * bn <= 128 * 128:
            return True
        return not epilogue and (args["ACC_MODE"] == FAST or (args["WARP_SPEC"] and bn == 128))

    return [c for c in configs if fits(c)] or configs[:1]


@triton.jit
def _tma_step(acc, a_desc, w_desc, off_m, off_n, k0, ACC_MODE: tl.constexpr, PROMOTE: tl.constexpr):
    """One K tile through the descriptors: rows / columns / K past the edge arrive as zeros, so no masks."""
    a = a_desc.load([off_m, k0])  # [BLOCK_M, BLOCK_K]
    b = w_desc.load([off_n, k0])  # [BLOCK_N, BLOCK_K], as stored; .T is free (K-major either way)
    if ACC_MODE == 0:
        return tl.dot(a, b.T, acc)
    return tl.dot(a, b.T, acc, max_num_imprecise_acc=PROMOTE)


@triton.jit
def _tma_epilogue(acc, off_m, off_n, M, N, rows_per_batch, out_ptr, stride_om, a_scale_ptr, w_scale_ptr, bias_ptr,
                  gate_ptr, stride_gb, res_ptr, stride_rm, A_PER_ROW: tl.constexpr, W_PER_COL: tl.constexpr,
                  HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RES: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    _gemm_epilogue(acc, offs_m, offs_n, offs_m % M, offs_n % N, M, N, rows_per_batch, out_ptr, stride_om,
                   a_scale_ptr, w_scale_ptr, bias_ptr, gate_ptr, stride_gb, res_ptr, stride_rm, A_PER_ROW, W_PER_COL,
                   HAS_BIAS, ACT, HAS_GATE, HAS_RES)


@triton.jit
def _fp8_gemm_tma_body(
    a_desc, w_desc, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, gate_ptr, res_ptr,
    M, N, K, rows_per_batch, stride_om, stride_gb, stride_rm,
    A_PER_ROW: tl.constexpr, W_PER_COL: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_RES: tl.constexpr, ACC_MODE: tl.constexpr, WARP_SPEC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PROMOTE: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)  # as in _fp8_gemm_kernel
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in tl.range(0, tl.cdiv(K, BLOCK_K), warp_specialize=WARP_SPEC):
        acc = _tma_step(acc, a_desc, w_desc, off_m, off_n, k * BLOCK_K, ACC_MODE, PROMOTE)
    _tma_epilogue(acc, off_m, off_n, M, N, rows_per_batch, out_ptr, stride_om, a_scale_ptr, w_scale_ptr, bias_ptr,
                  gate_ptr, stride_gb, res_ptr, stride_rm, A_PER_ROW, W_PER_COL, HAS_BIAS, ACT, HAS_GATE, HAS_RES,
                  BLOCK_M, BLOCK_N)


@triton.jit
def _fp8_gemm_persistent_body(
    a_desc, w_desc, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, gate_ptr, res_ptr,
    M, N, K, rows_per_batch, stride_om, stride_gb, stride_rm,
    A_PER_ROW: tl.constexpr, W_PER_COL: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_RES: tl.constexpr, ACC_MODE: tl.constexpr,
    NUM_SMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PROMOTE: tl.constexpr,
):
    """Variant "persistent": one program per SM walks the output tiles (tile = pid, pid + NUM_SMS, ...), the tile
    and K loops flattened into one (flatten=True) so that the TMA loads of the next tile start while this tile's
    last MMAs and its epilogue run, as cuBLAS's persistent kernels do. (Triton 3.6's Hopper warp specialisation
    does not take this loop nest: compiled with warp_specialize=True it emits no setmaxnreg, i.e. no producer /
    consumer split, so this variant has none.) H200, GPU session 6, M = 8858: precise accumulation 843 TFLOP/s on
    qkv (0.74x torch._scaled_mm row-wise; the default kernel 0.71x) and 800 on fc2 (0.64x; default 0.69x); fast
    accumulation 1193 TFLOP/s on qkv, the fastest Triton FP8 GEMM measured here (1.05x _scaled_mm's precise mode,
    0.92x its fast mode): what is left of the gap with precise accumulation is the promotion, not the epilogue."""
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_SMS, flatten=True):
        pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, k_tiles):
            acc = _tma_step(acc, a_desc, w_desc, off_m, off_n, k * BLOCK_K, ACC_MODE, PROMOTE)
        _tma_epilogue(acc, off_m, off_n, M, N, rows_per_batch, out_ptr, stride_om, a_scale_ptr, w_scale_ptr,
                      bias_ptr, gate_ptr, stride_gb, res_ptr, stride_rm, A_PER_ROW, W_PER_COL, HAS_BIAS, ACT,
                      HAS_GATE, HAS_RES, BLOCK_M, BLOCK_N)


_TMA_KEY = ["N", "K", "ACC_MODE", "ACT", "HAS_GATE", "HAS_RES", "WARP_SPEC"]
_tma_body = triton.heuristics({"PROMOTE": lambda args: min(args["BLOCK_K"], 128)})(_fp8_gemm_tma_body)
_fp8_gemm_ws = triton.autotune(do_bench=tune_bench, configs=pick_configs(WS_CONFIGS, CPU_TMA_CONFIGS), key=_TMA_KEY,
                               prune_configs_by={"early_config_prune": _prune_tma})(_tma_body)
_fp8_gemm_tma = triton.autotune(do_bench=tune_bench, configs=pick_configs(TMA_CONFIGS, CPU_TMA_CONFIGS), key=_TMA_KEY,
                                prune_configs_by={"early_config_prune": _prune_tma})(_tma_body)
# the persistent kernel: 8 warps (no warp specialisation), 128-row tiles; 128 x 256 spills with precise accumulation
PERSISTENT_CONFIGS = [_tma_cfg(128, 128, 128, 3, 8), _tma_cfg(128, 128, 128, 4, 8), _tma_cfg(128, 256, 128, 3, 8),
                      _tma_cfg(128, 128, 128, 5, 8)]
_fp8_gemm_persistent = triton.autotune(
    do_bench=tune_bench,
    configs=pick_configs(PERSISTENT_CONFIGS, CPU_TMA_CONFIGS), key=["N", "K", "ACC_MODE", "ACT", "HAS_GATE", "HAS_RES"],
    prune_configs_by={"early_config_prune": lambda cfgs, named_args, **kw: _prune_tma(
        cfgs, {**named_args, **kw, "WARP_SPEC": False})},
)(triton.heuristics({"PROMOTE": lambda args: min(args["BLOCK_K"], 128)})(_fp8_gemm_persistent_body))


def _check_epilogue(fn: str, M: int, N: int, bias, out_dtype, act, gate, residual, rows_per_batch) -> int:
    """Validate the epilogue arguments shared by fp8_gemm and fp8_gemm_ref; returns rows_per_batch resolved."""
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise InputError(f"{fn}: out_dtype={out_dtype} is not supported; use torch.bfloat16, float16 or float32")
    if act not in ACTS:
        raise InputError(f"{fn}: act={act!r} is not supported; use one of {ACTS}")
    floats = (torch.bfloat16, torch.float16, torch.float32)
    if bias is not None:
        check_tensor(fn, "bias", bias, floats, ndim=1)
        if bias.shape[0] != N:
            raise InputError(f"{fn}: bias has shape {tuple(bias.shape)}; expected [{N}] (one per output channel)")
    if residual is not None:
        check_tensor(fn, "residual", residual, (out_dtype,), ndim=2)
        if tuple(residual.shape) != (M, N):
            raise InputError(f"{fn}: residual has shape {tuple(residual.shape)}; expected [{M}, {N}]")
    if gate is not None:
        check_tensor(fn, "gate", gate, floats, ndim=2)
        B = gate.shape[0]
        if gate.shape[1] != N or B == 0:
            raise InputError(f"{fn}: gate has shape {tuple(gate.shape)}; expected [B, {N}]")
        if rows_per_batch == 0:
            rows_per_batch = M // B if M % B == 0 else 0
        if rows_per_batch <= 0 or B * rows_per_batch != M:
            raise InputError(f"{fn}: gate has {B} rows and rows_per_batch={rows_per_batch}, but M={M}; "
                             f"M must equal B * rows_per_batch (M rows of the activation are B samples' tokens)")
    return max(rows_per_batch, 1)


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
             bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16, act: str = "none",
             gate: torch.Tensor | None = None, residual: torch.Tensor | None = None, rows_per_batch: int = 0,
             fast_accum: bool = False, variant: str = "default") -> torch.Tensor:
    """out = residual + gate * act(a @ w.T * a_scale[:, None] * w_scale[None, :] + bias), computed in fp32 and
    rounded once to out_dtype. a [M, K] e4m3, w [N, K] e4m3, scales fp32 [M] / [N] or 1-element. rows_per_batch=0
    infers M // gate.shape[0]. fast_accum=True skips the fp32 promotion of the accumulator (see module docstring).
    variant: "default" (pointer loads, promotion inside the dot), "add" (promotion by acc += dot per K tile),
    "tma" (TMA descriptor loads), "ws" (TMA + warp specialisation, Hopper); see VARIANTS."""
    if variant not in VARIANTS:
        raise InputError(f"fp8_gemm: variant={variant!r} is not one of {tuple(VARIANTS)}")
    acc_mode = FAST if fast_accum else PRECISE_ADD if variant == "add" else PRECISE
    return _fp8_gemm(a, a_scale, w, w_scale, bias, out_dtype, act, gate, residual, rows_per_batch, acc_mode,
                     variant)


def check_gemm_args(fn: str, a, a_scale, w, w_scale, bias, out_dtype, act, gate, residual, rows_per_batch):
    """The checks every scaled FP8 GEMM here makes (fp8_gemm, fp8_gemm_gluon): returns M, N, K, rows_per_batch
    resolved and the device."""
    check_tensor(fn, "a", a, (FP8,), ndim=2)
    check_tensor(fn, "w", w, (FP8,), ndim=2)
    M, K = a.shape
    N = w.shape[0]
    if w.shape[1] != K:
        raise InputError(f"{fn}: a is [{M}, {K}] but w is {list(w.shape)}; w must be [N, {K}] (nn.Linear layout)")
    check_scale(fn, "a_scale", a_scale, M, "row of a (token)")
    check_scale(fn, "w_scale", w_scale, N, "row of w (output channel)")
    rows_per_batch = _check_epilogue(fn, M, N, bias, out_dtype, act, gate, residual, rows_per_batch)
    return M, N, K, rows_per_batch, check_device(fn, a, w, a_scale, w_scale, bias, gate, residual)


def _fp8_gemm(a, a_scale, w, w_scale, bias, out_dtype, act, gate, residual, rows_per_batch, acc_mode: int,
              variant: str = "default"):
    M, N, K, rows_per_batch, dev = check_gemm_args("fp8_gemm", a, a_scale, w, w_scale, bias, out_dtype, act, gate,
                                                   residual, rows_per_batch)

    out = torch.empty((M, N), dtype=out_dtype, device=dev)
    if M == 0 or N == 0:
        return out
    if K == 0:  # an empty sum: the epilogue of zeros
        return fp8_gemm_ref(a, a_scale, w, w_scale, bias, out_dtype, act, gate, residual, rows_per_batch)
    tiles = lambda meta: triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
    # what every variant takes after its two operands: the output, scales, epilogue tensors (absent ones point at
    # `out` and are never read), sizes; then the strides the operands' own loads do not need
    epi = (out, a_scale, w_scale, *(t if t is not None else out for t in (bias, gate, residual)), M, N, K,
           rows_per_batch)
    strides = (out.stride(0), gate.stride(0) if gate is not None else 0,
               residual.stride(0) if residual is not None else 0)
    flags = dict(A_PER_ROW=a_scale.numel() > 1, W_PER_COL=w_scale.numel() > 1, HAS_BIAS=bias is not None, ACT=act,
                 HAS_GATE=gate is not None, HAS_RES=residual is not None)
    with on_device(dev):
        if variant == "default" or variant == "add":
            _fp8_gemm_kernel[lambda meta: (tiles(meta),)](a, w, *epi, a.stride(0), w.stride(0), *strides, **flags,
                                                          ACC_MODE=acc_mode)
            return out
        if variant == "ws" and dev.type == "cuda" and os.environ.get("MINISD35_GEMM_WS") != "1":
            raise HardwareError("fp8_gemm: variant 'ws' deadlocked on the GPU (H200, Triton 3.6: every config "
                                "compiled and no launch returned within 45 s); use variant='default' or 'tma', or "
                                "set MINISD35_GEMM_WS=1 to try it with another Triton")
        a_desc, w_desc = _descriptors(a, w, dev, variant)
        acc_mode = FAST if acc_mode == FAST else PRECISE
        if variant == "persistent":
            sms = _num_sms(dev)
            _fp8_gemm_persistent[lambda meta: (min(sms, tiles(meta)),)](a_desc, w_desc, *epi, *strides, **flags,
                                                                        ACC_MODE=acc_mode, NUM_SMS=sms)
        else:
            launch = _fp8_gemm_ws if variant == "ws" else _fp8_gemm_tma
            launch[lambda meta: (tiles(meta),)](a_desc, w_desc, *epi, *strides, **flags, ACC_MODE=acc_mode,
                                                WARP_SPEC=variant == "ws")
    return out


@functools.cache
def _num_sms(dev: torch.device) -> int:
    """Programs of the persistent variant: one per SM (4 under the interpreter, so that programs loop); cached, as
    it is asked on every launch."""
    if dev.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(dev).multi_processor_count


def _descriptors(a: torch.Tensor, w: torch.Tensor, dev: torch.device, variant: str):
    """Host-side TMA descriptors for a [M, K] and w [N, K] (block shapes are set per config by the autotuner's
    pre-hook). TMA wants 16-byte aligned base addresses and row strides, i.e. K % 16 == 0 for fp8 rows."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError as e:
        raise HardwareError(f"fp8_gemm: variant {variant!r} needs triton.tools.tensor_descriptor (Triton 3.4+), "
                            f"this Triton {triton.__version__} has none ({e}); use variant='default'") from e
    if dev.type == "cuda" and capability(dev) < (9, 0):
        raise HardwareError(f"fp8_gemm: variant {variant!r} needs the TMA unit of Hopper (sm90+); use "
                            "variant='default'")
    for name, t in (("a", a), ("w", w)):
        if t.stride(0) % 16 or t.data_ptr() % 16 or t.stride(1) != 1:
            raise InputError(f"fp8_gemm: variant {variant!r} needs {name} with 16-byte aligned rows (K % 16 == 0, "
                             f"got {name} of shape {tuple(t.shape)}, strides {t.stride()}); use variant='default'")
    return (TensorDescriptor(a, list(a.shape), list(a.stride()), [1, 1]),
            TensorDescriptor(w, list(w.shape), list(w.stride()), [1, 1]))


def fp8_gemm_ref(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                 bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16, act: str = "none",
                 gate: torch.Tensor | None = None, residual: torch.Tensor | None = None, rows_per_batch: int = 0,
                 fast_accum: bool = False, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Plain torch: dequantize both operands to compute_dtype (fp32; fp64 for error studies), matmul, the same
    epilogue in compute_dtype, one cast. fast_accum is accepted for signature parity and ignored."""
    M, N = a.shape[0], w.shape[0]
    rows_per_batch = _check_epilogue("fp8_gemm_ref", M, N, bias, out_dtype, act, gate, residual, rows_per_batch)
    sa = a_scale.to(compute_dtype).reshape(-1, 1)
    sw = w_scale.to(compute_dtype).reshape(-1, 1)
    y = (a.to(compute_dtype) * sa) @ (w.to(compute_dtype) * sw).t()
    if bias is not None:
        y = y + bias.to(compute_dtype)
    if act == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    if gate is not None:
        y = y * gate.to(compute_dtype).repeat_interleave(rows_per_batch, dim=0)
    if residual is not None:
        y = y + residual.to(compute_dtype)
    return y.to(out_dtype)


def scaled_mm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
              fast_accum: bool = False) -> torch.Tensor:
    """The same product through torch._scaled_mm (cuBLASLt per-tensor, CUTLASS / cuBLAS row-wise): fp8.py's
    "torch" implementation and the baseline the Triton kernel is measured against. No act/gate/residual.

    Layout: _scaled_mm wants mat1 row-major [M, K] and mat2 column-major [K, N]; w.t() of a row-major [N, K]
    weight is exactly that, without a copy. Scales: both 1-element -> per-tensor; otherwise row-wise, which
    needs scale_a [M, 1] and scale_b [1, N] fp32 (a 1-element scale is expanded to match). Sizes: K and N must be
    multiples of 16 (a cuBLASLt rule checked by torch for every scaling mode); M is free, so nothing is padded.
    Bias: passed through when it has out_dtype (bf16/fp16), else added afterwards. torch 2.4+ returns one
    tensor; older versions returned (out, amax), which is unwrapped."""
    fn = "scaled_mm"
    check_tensor(fn, "a", a, (FP8,), ndim=2)
    check_tensor(fn, "w", w, (FP8,), ndim=2)
    M, K = a.shape
    N = w.shape[0]
    if w.shape[1] != K:
        raise InputError(f"scaled_mm: a is [{M}, {K}] but w is {list(w.shape)}; w must be [N, {K}]")
    if K % 16 or N % 16:
        raise InputError(f"scaled_mm: torch._scaled_mm needs K and N to be multiples of 16, got K={K}, N={N}; "
                         f"use fp8_gemm (any shape) or the reference path for this layer")
    check_scale(fn, "a_scale", a_scale, M, "row of a")
    check_scale(fn, "w_scale", w_scale, N, "row of w")
    if a_scale.numel() == 1 and w_scale.numel() == 1:
        sa, sb = a_scale.reshape(()), w_scale.reshape(())
    else:
        sa = a_scale.reshape(-1, 1).expand(M, 1).contiguous()
        sb = w_scale.reshape(1, -1).expand(1, N).contiguous()
    fused_bias = bias is not None and bias.dtype == out_dtype and out_dtype in (torch.bfloat16, torch.float16)
    out = torch._scaled_mm(a, w.t(), scale_a=sa, scale_b=sb, bias=bias if fused_bias else None,
                           out_dtype=out_dtype, use_fast_accum=fast_accum)
    if isinstance(out, tuple):
        out = out[0]
    if bias is not None and not fused_bias:
        out = (out.float() + bias.float()).to(out_dtype)
    return out


if __name__ == "__main__":
    from kernels._common import bench_ms, check_line, interpreting, print_table, rel_rms
    from kernels.fp8_quant import quant_fp8_ref

    if not torch.cuda.is_available() and not interpreting():
        sys.exit("needs a CUDA GPU, or TRITON_INTERPRET=1 to run the check on the CPU")
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    M = 8858 if dev == "cuda" else 67
    shapes = {"qkv": (2432, 7296), "proj": (2432, 2432), "fc1": (2432, 9728), "fc2": (9728, 2432)}
    if dev == "cpu":
        shapes = {"odd": (72, 40), "multi-tile": (100, 56)}
    torch.manual_seed(0)
    rows = []
    for name, (K, N) in shapes.items():
        a, sa = quant_fp8_ref(torch.randn(M, K, device=dev))
        w, sw = quant_fp8_ref(torch.randn(N, K, device=dev) * 0.02)
        bias = torch.randn(N, device=dev, dtype=torch.bfloat16)
        ref = fp8_gemm_ref(a, sa, w, sw, bias)  # 1. check first
        for fast in (False, True):
            check_line(f"fp8_gemm {name} M={M} K={K} N={N} fast_accum={fast}",
                       rel_rms(fp8_gemm(a, sa, w, sw, bias, fast_accum=fast), ref), 1e-2)
        if dev == "cpu":
            continue
        flop = 2 * M * N * K  # 2. then time it against torch._scaled_mm and bf16 F.linear
        xb = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        wb = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        for impl, f in [("triton", lambda: fp8_gemm(a, sa, w, sw, bias)),
                        ("triton fast_accum", lambda: fp8_gemm(a, sa, w, sw, bias, fast_accum=True)),
                        ("_scaled_mm row-wise", lambda: scaled_mm(a, sa, w, sw, bias)),
                        ("_scaled_mm per-tensor", lambda: scaled_mm(a, sa.amax().reshape(1), w, sw.amax().reshape(1),
                                                                    bias)),
                        ("bf16 F.linear", lambda: F.linear(xb, wb, bias))]:
            ms = bench_ms(f)[0]
            rows.append({"layer": name, "M": M, "K": K, "N": N, "impl": impl, "ms": ms, "TFLOP/s": flop / ms * 1e-9})
    if rows:
        print_table(rows, ["layer", "M", "K", "N", "impl", "ms", "TFLOP/s"])
