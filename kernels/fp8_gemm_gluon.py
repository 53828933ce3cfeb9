"""Scaled FP8 GEMM with precise accumulation whose promotion overlaps the tensor cores (Hopper, Gluon).

    out[m, n] = (sum_k a[m, k] * w[n, k]) * a_scale[m] * w_scale[n] + bias[n]      (as kernels/fp8_gemm.py)

Why a second GEMM: precise accumulation (fp32 promotion every 128 products; see fp8_gemm.py's docstring for why
the default needs it) costs fp8_gemm ~30% against cuBLAS, because Triton's `tl.dot(..., max_num_imprecise_acc=128)`
waits for every K tile's MMAs before adding them into the fp32 accumulator, and the next tile's MMAs wait for the
adds: the tensor cores idle during the promotion. Triton's own warp specialisation, which would hide it, deadlocks
with Triton 3.6 on an H200 (fp8_gemm.py). Gluon (triton.experimental.gluon) exposes the asynchronous wgmma
directly, so here the overlap is written out: two partial accumulators P0 / P1 alternate, and while the MMAs of K
tile k run into one of them (issued async), the fp32 adds promote tile k-1's from the other:

    issue  P[k % 2] = A_k @ W_k^T          (wgmma, async, zero-initialised: use_acc=False)
    wait   until one wgmma group is outstanding: tile k-1's MMAs are done, tile k's still run
    add    acc += P[(k - 1) % 2]          (fp32 adds, on the CUDA cores, during tile k's MMAs)
    load   K tile k + STAGES - 1 by TMA into the stage tile k-1 used (free now)

Registers: three fp32 tiles (acc, P0, P1) of BLOCK_M * BLOCK_N / (32 * num_warps) each: 64 for 128 x 128 with 8
warps, 192 in all (ptxas: 204, no spills). The loop is unrolled by two so that each partial is a fixed register
set (a wgmma's accumulator is updated in place; issuing into a tile that is still being read would race). A CTA
barrier before each refill: a wgmma wait covers only the warpgroup that waits, and the stage being refilled was
read by both.

What it reaches (H200, Triton 3.6, GPU session 11, M = 8858; every ratio against torch._scaled_mm row-wise with
precise accumulation in the same run; bench/results/2026-12-03_h200_session11/gemm_gluon_run3.json, _run5.json):
    layer (K -> N)        cuBLAS          fp8_gemm (Triton)   this kernel, GROUP_M 8 / 16
    qkv  2432 -> 7296     0.263-0.264 ms  0.72x               0.71-0.75x / 0.77-0.78x
    proj 2432 -> 2432     0.095-0.098 ms  0.65-0.75x          0.55-0.79x / 0.79x
    fc1  2432 -> 9728     0.342 ms        0.65x               0.65-0.69x / 0.70x
    fc2  9728 -> 2432     0.327-0.329 ms  0.67-0.68x          0.81-0.82x / 0.83x (gated residual fused: 0.82x)
(GROUP_M 16 timed in run 5 on all four, in run 3 on qkv only; proj's spread is between the two runs.)
The overlap pays where K is long (fc2: 76 K tiles per output tile). Where it is short (19 K tiles), what is left is
each tile's prologue and epilogue: one program per SM (its 204 registers x 256 threads leave no room for a second),
so an SM idles while its program fills the pipeline and while it scales and stores 128 x 128 outputs. 64-row tiles
with one warpgroup (two programs per SM) were no better (session 11 run 5: 0.62-0.75x), nor was a persistent
rewrite without warp specialisation (run 4: qkv 0.61x, fc2 0.62x; not kept, gemm_gluon_run4_persistent.json).

variant="ws" (the default, below the pipelined kernel) is the warp-specialised persistent design: a TMA producer
warp, two consumer warpgroups on the halves of each 128-row tile, the same two-partial promotion in each, and the
output staged in shared memory and written by a TMA store, so that a consumer's next tile starts while its last
one is stored. GPU session 12 (H200, bench/results/2026-12-04_h200_session12/gemm_gluon_run*.json), ratios to
cuBLAS's precise row-wise kernel; run 6 is the median of three interleaved rounds (its per-round range after it):
    layer   pipelined   ws, stores from registers (run 4)   ws, TMA store (run 6)     ws + fused epilogue (run 6)
    qkv     0.71-0.76x  0.84x                               1.06x (1.00-1.08)
    proj    0.77-0.78x  0.84x                               1.00x (0.99-1.03)
    fc1     0.65-0.70x  0.80x                               1.01x (1.00-1.01)        0.77x (GELU)
    fc2     0.80-0.84x  0.90x                               1.00x (0.96-1.01)        0.91x (gated residual)
Run 7 (five rounds, same kernel): qkv 1.05x, fc1 0.99x, fc2 1.02x, and proj 0.81x with rounds from 0.39x to
0.92x (a ~0.1 ms call timed eagerly, whose launcher builds three TMA descriptors in Python; host time in the
timing is a guess, not checked). About parity with cuBLAS, then, not a clear win: the single-timing run 5 put
the TMA-store kernel anywhere from 0.71x to 1.04x on qkv (clocks and power drift on this GPU between neighbouring
timings), and cuBLAS itself ran
5% slower in run 6 than in runs 1-4 (qkv 0.278 against 0.260-0.264 ms); in absolute terms this kernel took
0.262 / 0.096 / 0.343 / 0.343 ms, cuBLAS in run 4 0.260 / 0.097 / 0.342 / 0.328 ms. The fused epilogues still
cost it (GELU's exp and division on the accumulator, the gate and residual loads) more than they save, and in the
step it is level with cuBLAS plus a separate epilogue pass: 95.93 against 96.36 ms with gemm="gluon" (SD3.5 Large
1024, CFG 2, run 6), so the default stays.
GPU session 13 (H100 80GB HBM3, bench/results/2026-12-07_h100_session13/run1_*): timed both eagerly and replayed in
CUDA graphs (kernels/_common.graph_bench, which takes the host's launch time out: this launcher builds three TMA
descriptors in Python per call), medians of interleaved rounds (3 in run 1, 5 in run 2), against cuBLAS in the same
round:
    layer   run 1: eager / graph   run 2: eager / graph   graph, split tail, runs 1 / 2 (default cap; at most 3)
    qkv     1.095x / 1.122x        1.091x / 1.116x        1.091x / 1.079x; 1.095x / 1.087x
    proj    0.999x / 1.024x        1.016x / 1.051x        0.976x / 1.000x; 0.997x / 1.020x
    fc1     1.088x / 1.092x        1.117x / 1.074x        1.077x / 1.083x; 1.075x / 1.060x
    fc2     1.057x / 1.069x        1.086x / 1.100x        1.060x / 1.086x; 1.101x / 1.126x
so on that GPU the kernel is ahead of cuBLAS on every layer once the host is out of the timing, and proj, the
shortest call (~0.1 ms), is where the host shows: run 7's 0.39-0.92x rounds on proj were eager timings.
The split tail (SPLIT_TAIL, off by default): proj and fc2 have 1330 tiles on 132 SMs, so 10 programs take an 11th
tile while 122 SMs idle, ~8% of the kernel by count. split_schedule cuts the last partial wave's tiles along K,
one item per program; each tile's owner waits for the others' fp32 partials (a release / acquire count per tail
tile, zeroed per call) and adds them in a fixed order, so the result is the same bits on every call. It is
correct (every check, the GPU tests) and slower on qkv and proj in both runs; it gains on fc2 with at most 3
splits (+3%, both runs). By count it should have gained ~6% on proj; that
the last wave costs less than a full tile-time is the likely reason (not profiled): with 10 SMs running, each has
the L2 to itself, where the full waves move ~8 TB/s of operands out of L2 between all of them; the split pays a
memset, 64 KB partials through L2 and the owner's wait instead.
Tried on the way (runs 1-5, all correct, slower or no faster, removed): each consumer on its own 128-row tile
with one 64-row partial per half (qkv 0.83x, fc2 0.83x, 48 bytes of epilogue spills); the same with the W tile
shared by the two consumers (a 256-row tile: a quarter less operand traffic, no better: 0.84x / 0.85x, and proj
lost 16% to the coarser wave); 64-row tiles with two partials but a ring per consumer (0.75-0.79x); 2-7 stages (6
best with the TMA store, whose staging leaves no room for a 7th); GROUP_M 8 / 16 / 32 (16 best on three layers).
The step from 0.84x to parity was the epilogue (run 6, same kernel, registers -> global stores: 0.78-0.91x).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # `python kernels/fp8_gemm_gluon.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from kernels._common import capability, on_device
from minisd35.errors import HardwareError, InputError

# GROUP_M 16 was the fastest of the configs timed in GPU session 11 on all four Large layers (run 5: 0.70-0.84x of
# cuBLAS against 0.69-0.82x with GROUP_M 8); 3 or 5 stages and 64-row tiles (two programs per SM) were slower
GLUON_CONFIGS = [{"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "STAGES": 4, "GROUP_M": 16, "num_warps": 8}]
# variant="ws": BLOCK_M rows per consumer (the program's tile is 2 * BLOCK_M), STAGES of 32 KB (192 KB); registers
# per thread of the consumer warpgroups and the producer (setmaxnreg), the launch cap being 65536 / 384 threads
# SPLIT_TAIL: split the last partial wave's tiles along K (split_schedule; off: slower on three of the four Large
# layers, see the module docstring); MAX_SPLITS: None = its default cap
GLUON_WS_CONFIGS = [{"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "STAGES": 6, "GROUP_M": 16, "num_warps": 4,
                     "CONSUMER_REGS": 232, "PRODUCER_REGS": 40, "maxnreg": 168, "SPLIT_TAIL": False,
                     "MAX_SPLITS": None}]
VARIANTS = ("pipelined", "ws")
TL_16 = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


@gluon.jit
def _load_tile(a_desc, w_desc, a_s, w_s, bars, t, off_m, off_n, k_tiles, STAGES: gl.constexpr,
               BLOCK_K: gl.constexpr):
    """TMA loads of K tile t into stage t % STAGES (predicated off past the last tile)."""
    s = t % STAGES
    ok = t < k_tiles
    mbarrier.expect(bars.index(s), a_desc.block_type.nbytes + w_desc.block_type.nbytes, pred=ok)
    tma.async_copy_global_to_shared(a_desc, [off_m, t * BLOCK_K], bars.index(s), a_s.index(s), pred=ok)
    tma.async_copy_global_to_shared(w_desc, [off_n, t * BLOCK_K], bars.index(s), w_s.index(s), pred=ok)


@gluon.jit
def _issue(a_s, w_s, bars, part, t, ROW0: gl.constexpr, ROWS: gl.constexpr, STAGES: gl.constexpr):
    """Wait for K tile t's operands (stage t % STAGES), then start its MMAs on rows ROW0 .. ROW0 + ROWS of the A
    box into `part` (zero-initialised), asynchronously."""
    s = t % STAGES
    mbarrier.wait(bars.index(s), (t // STAGES) & 1)
    return warpgroup_mma(a_s.index(s).slice(ROW0, ROWS), w_s.index(s).permute((1, 0)), part, use_acc=False,
                         is_async=True)


@gluon.jit
def _tile_offsets(tile, M, N, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr):
    """Grouped tile order (as kernels/_common.grouped_tile): GROUP_M row tiles share each column of W in turn."""
    num_pid_m = gl.cdiv(M, BLOCK_M)
    num_pid_n = gl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (tile // group) * GROUP_M
    size_m = gl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % group) % size_m
    pid_n = (tile % group) // size_m
    return pid_m * BLOCK_M, pid_n * BLOCK_N


@gluon.jit
def _epilogue(acc, off_m, off_n, layout: gl.constexpr, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, gate_ptr,
              res_ptr, M, N, rows_per_batch, stride_om, stride_gb, stride_rm,
              A_PER_ROW: gl.constexpr, W_PER_COL: gl.constexpr, HAS_BIAS: gl.constexpr, ACT: gl.constexpr,
              HAS_GATE: gl.constexpr, HAS_RES: gl.constexpr):
    """fp8_gemm's epilogue on an fp32 accumulator tile at (off_m, off_n); one rounding at the store."""
    acc = _epilogue_values(acc, off_m, off_n, layout, a_scale_ptr, w_scale_ptr, bias_ptr, gate_ptr, res_ptr, M, N,
                           rows_per_batch, stride_gb, stride_rm, A_PER_ROW, W_PER_COL, HAS_BIAS, ACT, HAS_GATE, HAS_RES)
    offs_m = off_m + gl.arange(0, acc.shape[0], layout=gl.SliceLayout(1, layout))
    offs_n = off_n + gl.arange(0, acc.shape[1], layout=gl.SliceLayout(0, layout))
    mask = gl.expand_dims(offs_m < M, 1) & gl.expand_dims(offs_n < N, 0)
    ptrs = out_ptr + gl.expand_dims(offs_m, 1) * stride_om + gl.expand_dims(offs_n, 0)
    gl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@gluon.jit
def _epilogue_values(acc, off_m, off_n, layout: gl.constexpr, a_scale_ptr, w_scale_ptr, bias_ptr, gate_ptr, res_ptr,
                     M, N, rows_per_batch, stride_gb, stride_rm, A_PER_ROW: gl.constexpr, W_PER_COL: gl.constexpr,
                     HAS_BIAS: gl.constexpr, ACT: gl.constexpr, HAS_GATE: gl.constexpr, HAS_RES: gl.constexpr):
    """The epilogue's arithmetic: scales, bias, activation, gate, residual, in fp32."""
    offs_m = off_m + gl.arange(0, acc.shape[0], layout=gl.SliceLayout(1, layout))
    offs_n = off_n + gl.arange(0, acc.shape[1], layout=gl.SliceLayout(0, layout))
    rm = offs_m % M
    rn = offs_n % N
    if A_PER_ROW:
        acc = acc * gl.expand_dims(gl.load(a_scale_ptr + rm), 1)
    else:
        acc = acc * gl.load(a_scale_ptr)
    if W_PER_COL:
        acc = acc * gl.expand_dims(gl.load(w_scale_ptr + rn), 0)
    else:
        acc = acc * gl.load(w_scale_ptr)
    if HAS_BIAS:
        acc = acc + gl.expand_dims(gl.load(bias_ptr + rn).to(gl.float32), 0)
    if ACT == "gelu_tanh":  # as fp8_gemm's _gelu_tanh: x * sigmoid(2u)
        u = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
        acc = acc / (1.0 + gl.exp(-2.0 * u))
    if HAS_GATE:
        acc = acc * gl.load(gate_ptr + gl.expand_dims(rm // rows_per_batch, 1) * stride_gb
                            + gl.expand_dims(rn, 0)).to(gl.float32)
    if HAS_RES:
        acc = acc + gl.load(res_ptr + gl.expand_dims(rm, 1) * stride_rm + gl.expand_dims(rn, 0)).to(gl.float32)
    return acc


@gluon.jit
def _fp8_gemm_gluon_kernel(
    a_desc, w_desc, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, gate_ptr, res_ptr,
    M, N, K, rows_per_batch, stride_om, stride_gb, stride_rm,
    A_PER_ROW: gl.constexpr, W_PER_COL: gl.constexpr, HAS_BIAS: gl.constexpr, ACT: gl.constexpr,
    HAS_GATE: gl.constexpr, HAS_RES: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
    GROUP_M: gl.constexpr, num_warps: gl.constexpr,
):
    off_m, off_n = _tile_offsets(gl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    # wgmma accumulator layout: warps stacked along M (8 warps: two warpgroups of 64 rows each)
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                     instr_shape=[16, BLOCK_N, 32])
    a_s = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
    w_s = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(bars.index(s), count=1)

    k_tiles = gl.cdiv(K, BLOCK_K)
    for t in gl.static_range(STAGES):  # prologue: every stage loading
        _load_tile(a_desc, w_desc, a_s, w_s, bars, t, off_m, off_n, k_tiles, STAGES, BLOCK_K)

    # loop invariant at the top: p0 = tile k - 1's MMAs in flight (an async accumulator), p1 = a free register tile
    acc = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, layout)
    p1 = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, layout)
    p0 = _issue(a_s, w_s, bars, gl.zeros((BLOCK_M, BLOCK_N), gl.float32, layout), 0, 0, BLOCK_M, STAGES)
    for k in range(1, k_tiles - 1, 2):  # two tiles per trip, k and k + 1 (both < k_tiles)
        q1 = _issue(a_s, w_s, bars, p1, k, 0, BLOCK_M, STAGES)  # tile k into P1
        t0 = warpgroup_mma_wait(num_outstanding=1, deps=(p0,))  # tile k - 1 done, tile k running
        acc += t0  # promotion of tile k - 1, while tile k's MMAs run
        # tile k - 1's stage is free once *both* warpgroups are done with it (the wait is per warpgroup)
        gl.thread_barrier()
        _load_tile(a_desc, w_desc, a_s, w_s, bars, k - 1 + STAGES, off_m, off_n, k_tiles, STAGES, BLOCK_K)
        p0 = _issue(a_s, w_s, bars, t0, k + 1, 0, BLOCK_M, STAGES)  # tile k + 1 into P0
        p1 = warpgroup_mma_wait(num_outstanding=1, deps=(q1,))  # tile k done
        acc += p1
        gl.thread_barrier()
        _load_tile(a_desc, w_desc, a_s, w_s, bars, k + STAGES, off_m, off_n, k_tiles, STAGES, BLOCK_K)
    if k_tiles % 2 == 0:  # one tile left, into P1
        r1 = _issue(a_s, w_s, bars, p1, k_tiles - 1, 0, BLOCK_M, STAGES)
        r0 = warpgroup_mma_wait(num_outstanding=1, deps=(p0,))
        acc += r0
        r1 = warpgroup_mma_wait(num_outstanding=0, deps=(r1,))
        acc += r1
    else:
        r0 = warpgroup_mma_wait(num_outstanding=0, deps=(p0,))
        acc += r0
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(s))

    _epilogue(acc, off_m, off_n, layout, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, gate_ptr, res_ptr, M, N,
              rows_per_batch, stride_om, stride_gb, stride_rm, A_PER_ROW, W_PER_COL, HAS_BIAS, ACT, HAS_GATE, HAS_RES)


# The warp-specialised persistent variant (variant="ws"): one program per SM, looping over 128 x BLOCK_N output
# tiles (grouped order), in three partitions:
#   the producer (1 warp, few registers): TMA loads of each K tile's A box (128 rows) and W tile into a ring of
#       STAGES stages, running ahead into the next output tile while the consumers finish this one;
#   consumer 0 (the default partition) and consumer 1 (4 warps each): rows 0-63 and 64-127 of the tile, each with
#       the pipelined kernel's two alternating partials (tile k's wgmma runs while tile k - 1 is promoted), and
#       each frees a stage (an "empty" barrier of count 2) as soon as its own wgmma on it is known done.
# What it changes against the pipelined kernel: the TMA issue and the wait for data move out of the MMA warps; the
# two warpgroups are not tied by a CTA barrier per K tile (each runs at its own pace against the ring); the next
# tile's loads overlap this tile's epilogue; setmaxnreg gives the consumers 232 registers, the producer 40; and
# (TMA_STORE) each consumer writes its 64 x BLOCK_N outputs to a staging tile in shared memory (stmatrix) for one
# TMA store, clipped at M and N, instead of 32 scattered 4-byte stores per thread: it goes on to its next tile while
# the store runs. That epilogue took the kernel from 0.84x to parity with cuBLAS (see the module docstring).
@gluon.jit
def _ws_item(i, k_tiles, DP_TILES, SPLITS, K_CHUNK):
    """Work item i of the persistent schedule -> (output tile, first K tile, number of K tiles, split index).
    Items below DP_TILES are whole tiles; the rest are the split tail, SPLITS items per tile, K_CHUNK K tiles each
    (the last one shorter). Split index 0 is the tile's owner, the one that sums the others and stores."""
    tile = i
    k0 = i * 0
    nk = k_tiles
    c = i * 0
    if i >= DP_TILES:
        u = i - DP_TILES
        tile = DP_TILES + u // SPLITS
        c = u % SPLITS
        k0 = c * K_CHUNK
        nk = gl.minimum(k_tiles - k0, K_CHUNK)
    return tile, k0, nk, c


@gluon.jit
def _ws_producer(a_desc, w_desc, a_s, w_s, ready, empty, M, N, K, DP_TILES, SPLITS, K_CHUNK, BLOCK_N: gl.constexpr,
                 BLOCK_K: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr):
    TILE_M: gl.constexpr = a_desc.block_type.shape[0]
    k_tiles = gl.cdiv(K, BLOCK_K)
    n_items = DP_TILES + (gl.cdiv(M, TILE_M) * gl.cdiv(N, BLOCK_N) - DP_TILES) * SPLITS
    g = 0  # K tiles loaded so far: stage g % STAGES, on pass g // STAGES over the ring
    for i in range(gl.program_id(0), n_items, gl.num_programs(0)):
        tile, k0, nk, c = _ws_item(i, k_tiles, DP_TILES, SPLITS, K_CHUNK)
        off_m, off_n = _tile_offsets(tile, M, N, TILE_M, BLOCK_N, GROUP_M)
        for k in range(k0, k0 + nk):
            s = g % STAGES
            # both consumers free a stage once their wgmmas on it are done; a fresh barrier passes phase 1 at once
            mbarrier.wait(empty.index(s), ((g // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(s), a_desc.block_type.nbytes + w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(a_desc, [off_m, k * BLOCK_K], ready.index(s), a_s.index(s))
            tma.async_copy_global_to_shared(w_desc, [off_n, k * BLOCK_K], ready.index(s), w_s.index(s))
            g += 1


@gluon.jit
def _split_fixup(acc, c, t, ws_ptr, cnt_ptr, SPLITS, layout: gl.constexpr, C: gl.constexpr, BLOCK_M: gl.constexpr,
                 BLOCK_N: gl.constexpr):
    """The split tail's reduction, for this consumer's rows of tail tile t. Split c > 0 writes its fp32 partial to
    its own slot of the workspace and counts itself in (release); the owner (c = 0) waits until the count reaches
    SPLITS - 1 (acquire) and adds the slots in order 1, 2, ... (the same sum on every run: no fp32 atomics). The
    owner only ever waits for items that wait for nothing, so with all programs resident (one per SM) this ends."""
    TILE: gl.constexpr = 2 * BLOCK_M * BLOCK_N
    rows = C * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
    offs = gl.expand_dims(rows, 1) * BLOCK_N + gl.expand_dims(cols, 0)  # within one [2 * BLOCK_M, BLOCK_N] slot
    slots = ws_ptr + t * (SPLITS - 1) * TILE
    cnt = cnt_ptr + 2 * t + C  # one count per tail tile and consumer
    if c > 0:
        gl.store(slots + (c - 1) * TILE + offs, acc)
        gl.thread_barrier()  # every thread of this warpgroup has stored before the one release below
        gl.atomic_add(cnt, 1, sem="release", scope="gpu")
    else:
        seen = gl.atomic_add(cnt, 0, sem="acquire", scope="gpu")
        while seen < SPLITS - 1:
            seen = gl.atomic_add(cnt, 0, sem="acquire", scope="gpu")
        for j in range(SPLITS - 1):
            acc += gl.load(slots + j * TILE + offs)
    return acc


@gluon.jit
def _ws_consumer(a_s, w_s, ready, empty, c_desc, c_s, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, gate_ptr, res_ptr,
                 ws_ptr, cnt_ptr, M, N, K, rows_per_batch, stride_om, stride_gb, stride_rm, DP_TILES, SPLITS, K_CHUNK,
                 C: gl.constexpr, A_PER_ROW: gl.constexpr, W_PER_COL: gl.constexpr, HAS_BIAS: gl.constexpr,
                 ACT: gl.constexpr, HAS_GATE: gl.constexpr, HAS_RES: gl.constexpr, BLOCK_M: gl.constexpr,
                 BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                 TMA_STORE: gl.constexpr, SPLIT: gl.constexpr):
    ROW0: gl.constexpr = C * BLOCK_M  # this consumer's rows of the A box (BLOCK_M = 64: one wgmma per K tile)
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                     instr_shape=[16, BLOCK_N, 32])
    k_tiles = gl.cdiv(K, BLOCK_K)
    n_items = DP_TILES + (gl.cdiv(M, 2 * BLOCK_M) * gl.cdiv(N, BLOCK_N) - DP_TILES) * SPLITS
    g = 0  # the ring's K tile number at the start of this work item
    for i in range(gl.program_id(0), n_items, gl.num_programs(0)):
        tile, k0, nk, c = _ws_item(i, k_tiles, DP_TILES, SPLITS, K_CHUNK)
        off_m, off_n = _tile_offsets(tile, M, N, 2 * BLOCK_M, BLOCK_N, GROUP_M)
        acc = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, layout)
        p1 = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, layout)
        p0 = _issue(a_s, w_s, ready, gl.zeros((BLOCK_M, BLOCK_N), gl.float32, layout), g, ROW0, BLOCK_M, STAGES)
        for k in range(1, nk - 1, 2):  # as the pipelined kernel: K tiles k and k + 1 per trip
            q1 = _issue(a_s, w_s, ready, p1, g + k, ROW0, BLOCK_M, STAGES)
            t0 = warpgroup_mma_wait(num_outstanding=1, deps=(p0,))  # tile k - 1 done, tile k running
            mbarrier.arrive(empty.index((g + k - 1) % STAGES), count=1)
            acc += t0
            p0 = _issue(a_s, w_s, ready, t0, g + k + 1, ROW0, BLOCK_M, STAGES)
            p1 = warpgroup_mma_wait(num_outstanding=1, deps=(q1,))  # tile k done
            mbarrier.arrive(empty.index((g + k) % STAGES), count=1)
            acc += p1
        if nk % 2 == 0:  # one tile left, into P1
            r1 = _issue(a_s, w_s, ready, p1, g + nk - 1, ROW0, BLOCK_M, STAGES)
            r0 = warpgroup_mma_wait(num_outstanding=1, deps=(p0,))
            mbarrier.arrive(empty.index((g + nk - 2) % STAGES), count=1)
            acc += r0
            r1 = warpgroup_mma_wait(num_outstanding=0, deps=(r1,))
            mbarrier.arrive(empty.index((g + nk - 1) % STAGES), count=1)
            acc += r1
        else:
            r0 = warpgroup_mma_wait(num_outstanding=0, deps=(p0,))
            mbarrier.arrive(empty.index((g + nk - 1) % STAGES), count=1)
            acc += r0
        g += nk
        if SPLIT:
            if i >= DP_TILES:
                acc = _split_fixup(acc, c, tile - DP_TILES, ws_ptr, cnt_ptr, SPLITS, layout, C, BLOCK_M, BLOCK_N)
        if c == 0:  # a whole tile, or a split tile's owner: the epilogue and the store
            if TMA_STORE:  # through shared memory, stored by TMA while this consumer starts its next tile
                acc = _epilogue_values(acc, off_m + ROW0, off_n, layout, a_scale_ptr, w_scale_ptr, bias_ptr,
                                       gate_ptr, res_ptr, M, N, rows_per_batch, stride_gb, stride_rm, A_PER_ROW,
                                       W_PER_COL, HAS_BIAS, ACT, HAS_GATE, HAS_RES)
                tma.store_wait(0)  # the previous tile's store has read the buffer
                c_s.store(acc.to(c_desc.dtype))
                fence_async_shared()
                tma.async_copy_shared_to_global(c_desc, [off_m + ROW0, off_n], c_s)  # clipped at M and N
            else:
                _epilogue(acc, off_m + ROW0, off_n, layout, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, gate_ptr,
                          res_ptr, M, N, rows_per_batch, stride_om, stride_gb, stride_rm, A_PER_ROW, W_PER_COL,
                          HAS_BIAS, ACT, HAS_GATE, HAS_RES)
    if TMA_STORE:
        tma.store_wait(0)


@gluon.jit
def _fp8_gemm_gluon_ws_kernel(
    a_desc, w_desc, c_desc, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, gate_ptr, res_ptr, ws_ptr, cnt_ptr,
    M, N, K, rows_per_batch, stride_om, stride_gb, stride_rm, DP_TILES, SPLITS, K_CHUNK,
    A_PER_ROW: gl.constexpr, W_PER_COL: gl.constexpr, HAS_BIAS: gl.constexpr, ACT: gl.constexpr,
    HAS_GATE: gl.constexpr, HAS_RES: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
    GROUP_M: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, TMA_STORE: gl.constexpr,
    SPLIT: gl.constexpr, num_warps: gl.constexpr,
):
    gl.static_assert(num_warps == 4, "the default partition is consumer 0: one warpgroup")
    gl.static_assert(a_desc.block_type.shape[0] == 2 * BLOCK_M, "the A box holds both consumers' rows")
    a_s = gl.allocate_shared_memory(a_desc.dtype, [STAGES, 2 * BLOCK_M, BLOCK_K], a_desc.layout)
    w_s = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)  # the producer's expect + the TMA bytes
        mbarrier.init(empty.index(s), count=2)  # one arrive per consumer
    # TMA_STORE: one output staging tile per consumer (c_desc: out in 64 x BLOCK_N boxes); else c_desc is a dummy
    c_s = gl.allocate_shared_memory(c_desc.dtype, [2 if TMA_STORE else 1] + c_desc.block_type.shape, c_desc.layout)
    # the partitions' arguments, written out (tuple concatenation would turn the constexpr flags into tensors)
    gl.warp_specialize([
        (_ws_consumer, (a_s, w_s, ready, empty, c_desc, c_s.index(0), out_ptr, a_scale_ptr,
                        w_scale_ptr, bias_ptr, gate_ptr, res_ptr, ws_ptr, cnt_ptr, M, N, K, rows_per_batch, stride_om,
                        stride_gb, stride_rm, DP_TILES, SPLITS, K_CHUNK, 0, A_PER_ROW, W_PER_COL, HAS_BIAS, ACT,
                        HAS_GATE, HAS_RES, BLOCK_M, BLOCK_N, BLOCK_K, STAGES, GROUP_M, TMA_STORE, SPLIT)),
        (_ws_consumer, (a_s, w_s, ready, empty, c_desc, c_s.index(1 if TMA_STORE else 0), out_ptr, a_scale_ptr,
                        w_scale_ptr, bias_ptr, gate_ptr, res_ptr, ws_ptr, cnt_ptr, M, N, K, rows_per_batch, stride_om,
                        stride_gb, stride_rm, DP_TILES, SPLITS, K_CHUNK, 1, A_PER_ROW, W_PER_COL, HAS_BIAS, ACT,
                        HAS_GATE, HAS_RES, BLOCK_M, BLOCK_N, BLOCK_K, STAGES, GROUP_M, TMA_STORE, SPLIT)),
        (_ws_producer, (a_desc, w_desc, a_s, w_s, ready, empty, M, N, K, DP_TILES, SPLITS, K_CHUNK, BLOCK_N, BLOCK_K,
                        STAGES, GROUP_M)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def fp8_gemm_gluon(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                   bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16, act: str = "none",
                   gate: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                   rows_per_batch: int = 0, config: dict | None = None, variant: str = "ws") -> torch.Tensor:
    """The same product and epilogue as fp8_gemm(..., fast_accum=False) on a Hopper GPU (TMA + wgmma).
    a [M, K], w [N, K] float8_e4m3fn with K % 16 == 0; scales [M] / [N] or [1]. variant: "pipelined" (one output
    tile per program, the promotion overlapped by hand) or "ws" (the default: persistent, warp-specialised)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from kernels.fp8_gemm import check_gemm_args

    fn = "fp8_gemm_gluon"
    M, N, K, rows_per_batch, dev = check_gemm_args(fn, a, a_scale, w, w_scale, bias, out_dtype, act, gate, residual,
                                                   rows_per_batch)
    if K % 16 or a.stride(1) != 1 or w.stride(1) != 1:
        raise InputError(f"{fn}: TMA needs K % 16 == 0 and K-contiguous rows (K = {K})")
    if dev.type != "cuda" or capability(dev) < (9, 0):  # Gluon has no interpreter; TMA and wgmma are sm90+
        raise HardwareError(f"{fn}: needs a Hopper (sm90+) GPU, got {dev}; use kernels.fp8_gemm.fp8_gemm")
    if variant not in VARIANTS:
        raise InputError(f"{fn}: variant={variant!r} is not one of {VARIANTS}")
    cfg = dict(config or (GLUON_WS_CONFIGS if variant == "ws" else GLUON_CONFIGS)[0])
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    out = torch.empty((M, N), dtype=out_dtype, device=dev)
    if M == 0 or N == 0:
        return out
    if variant == "ws":  # the two consumers' rows in one A box
        bm *= 2
    a_layout = gl.NVMMASharedLayout.get_default_for([bm, bk], gl.float8e4nv)
    w_layout = gl.NVMMASharedLayout.get_default_for([bn, bk], gl.float8e4nv)
    a_desc = TensorDescriptor(a, list(a.shape), list(a.stride()), [bm, bk], a_layout)
    w_desc = TensorDescriptor(w, list(w.shape), list(w.stride()), [bn, bk], w_layout)
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    kernel, descs = _fp8_gemm_gluon_kernel, (a_desc, w_desc)
    extra, sched = (), ()
    if variant == "ws":  # persistent: one program per SM
        kernel = _fp8_gemm_gluon_ws_kernel
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        grid, dp_tiles, splits, k_chunk = split_schedule(tiles, triton.cdiv(K, bk), sms, cfg.pop("MAX_SPLITS", None),
                                                         cfg.pop("SPLIT_TAIL", False))
        # the split tail's fp32 partials (one 128 x BLOCK_N slot per non-owner item) and the owners' counts, two
        # per tail tile, zeroed per call (a memset): a buffer kept between calls and reset by the owners would be
        # shared by launches on two streams, or pin a CUDA graph's memory pool when first made during a capture.
        # Without a split the kernel never touches them: a_scale stands in, and no memset is launched
        extra = (a_scale, a_scale)
        if splits > 1:
            tail = tiles - dp_tiles
            extra = (torch.empty(tail * (splits - 1) * bm * bn, dtype=torch.float32, device=dev),
                     torch.zeros(2 * tail, dtype=torch.int32, device=dev))
        sched, cfg["SPLIT"] = (dp_tiles, splits, k_chunk), splits > 1
        tiles = grid
        # the output by TMA where its rows are 16-byte aligned and its type 16-bit (the staging fits beside 6
        # stages); otherwise the descriptor is a placeholder the kernel does not use
        tma_store = cfg["TMA_STORE"] = cfg.get("TMA_STORE", True) and out.element_size() == 2 and N % 8 == 0
        c = out if tma_store else torch.empty((cfg["BLOCK_M"], bn), dtype=torch.bfloat16, device=dev)
        c_layout = gl.NVMMASharedLayout.get_default_for([cfg["BLOCK_M"], bn], TL_16[c.dtype])
        descs += (TensorDescriptor(c, list(c.shape), list(c.stride()), [cfg["BLOCK_M"], bn], c_layout),)
    with on_device(dev):
        kernel[(tiles,)](
            *descs, out, a_scale, w_scale, *(t if t is not None else out for t in (bias, gate, residual)), *extra,
            M, N, K, rows_per_batch, out.stride(0), gate.stride(0) if gate is not None else 0,
            residual.stride(0) if residual is not None else 0, *sched, A_PER_ROW=a_scale.numel() > 1,
            W_PER_COL=w_scale.numel() > 1, HAS_BIAS=bias is not None, ACT=act, HAS_GATE=gate is not None,
            HAS_RES=residual is not None, **cfg)
    return out


def split_schedule(tiles: int, k_tiles: int, programs: int, max_splits: int | None = None,
                   split: bool = True) -> tuple[int, int, int, int]:
    """The persistent WS kernel's schedule -> (grid, dp_tiles, splits, k_chunk).

    `programs` persistent programs (one per SM) take output tiles round-robin. With 1330 tiles on 132 SMs (proj and
    fc2 of SD3.5 Large at M = 8858) that is 10 full waves and a last one of 10 tiles, during which 122 SMs idle: the
    kernel takes 11 tile-times for 10.08 tiles of work. Here the last partial wave's `tail` tiles are cut along K
    into `splits` items of `k_chunk` K tiles each, one item per program, after `dp_tiles` (a multiple of
    `programs`) whole tiles: the tail costs ~1/splits of a tile plus the reduction (the owner of each tail tile reads
    splits - 1 fp32 partials of 64 KB). That trade sets the default cap, splits <= sqrt(2 k_tiles): a K tile's MMAs
    against reading one partial, about equal (an estimate). No split where the tail is more than half a wave
    (splits would be 1) or K is a single tile. Measured (H100, session 13), the split is slower than the plain
    schedule on qkv, proj and fc1 and only gains on fc2 with at most 3 splits, so the launcher uses it only when
    asked (config SPLIT_TAIL)."""
    tail = tiles % programs if tiles >= programs else tiles
    splits = 1
    if split and tail and k_tiles > 1:
        cap = max_splits if max_splits is not None else max(2, round(math.sqrt(2 * k_tiles)))
        splits = min(programs // tail, k_tiles, cap)
    if splits < 2:
        return min(tiles, programs), tiles, 1, k_tiles
    k_chunk = -(-k_tiles // splits)
    splits = -(-k_tiles // k_chunk)  # no empty items: e.g. 19 K tiles in 5 splits of 4, 4, 4, 4, 3
    dp_tiles = tiles - tail
    return (programs if dp_tiles else tail * splits), dp_tiles, splits, k_chunk


if __name__ == "__main__":
    # check first (odd shapes, the split tail, the fused epilogues), then time the SD3.5 Large layers at M = 8858
    # against cuBLAS, two ways: eagerly (tune_bench: an event pair around each call) and in CUDA graphs
    # (graph_bench: the host's launch time taken out), each over ROUNDS interleaved passes
    import json
    import os

    from kernels._common import graph_bench, rel_rms, tune_bench
    from kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref, scaled_mm
    from kernels.fp8_quant import quant_fp8_ref

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        sys.exit("needs a Hopper GPU (Gluon's TMA + wgmma); there is no interpreter for Gluon")
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
           "commit": os.environ.get("MINISD35_COMMIT", "unknown"), "sms": sms, "checks": [], "rows": []}

    def save():  # after every step: a launch that hangs leaves what came before it
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "gemm_gluon.json"), "w") as fh:
                json.dump(res, fh, indent=1)

    def check(name, out, ref, tol=1e-2, **info):
        err = rel_rms(out, ref)
        res["checks"].append({"check": name, **info, "rel_err": err, "ok": err < tol})
        print(f"check {name} {info}: rel err {err:.2e} {'ok' if err < tol else 'FAILED'}", flush=True)

    variants = os.environ.get("GLUON_VARIANTS", ",".join(VARIANTS)).split(",")
    # odd shapes; (3000, 512, 1500) has 288 tiles, so the persistent variant's programs take two or three each and
    # the last 24 are split; (67, 2432, 136) and (300, 9728, 2432) have fewer tiles than SMs (split-K throughout);
    # (8858, 2432, 2432) is proj with its 10-tile tail
    for M, K, N in [(1, 80, 40), (3, 2432, 200), (67, 1536, 136), (300, 9728, 2432), (129, 256, 257),
                    (3000, 512, 1500), (8858, 2432, 2432)]:
        a, sa = quant_fp8_ref(torch.randn(M, K, device="cuda"))
        w, sw = quant_fp8_ref(torch.randn(N, K, device="cuda") * 0.05)
        bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
        ref = fp8_gemm_ref(a, sa, w, sw, bias)
        for v in variants:
            check(v, fp8_gemm_gluon(a, sa, w, sw, bias, variant=v), ref, M=M, K=K, N=N)
        if "ws" in variants:  # the split tail: the same bits on every call (no atomics in the sum), and level
            # with the unsplit schedule up to bf16 rounding (its sum is in a different order)
            cfg = {**GLUON_WS_CONFIGS[0], "SPLIT_TAIL": True}
            runs = [fp8_gemm_gluon(a, sa, w, sw, bias, config=cfg) for _ in range(5)]
            same = all(torch.equal(runs[0], r) for r in runs[1:])
            res["checks"].append({"check": "ws split repeatable", "M": M, "K": K, "N": N, "ok": same})
            print(f"check ws split repeatable M={M} K={K} N={N}: {'ok' if same else 'FAILED'}", flush=True)
            check("ws split vs unsplit", runs[0], fp8_gemm_gluon(a, sa, w, sw, bias, config={**cfg,
                  "SPLIT_TAIL": False}), tol=5e-3, M=M, K=K, N=N)
        save()
    # the fused epilogues (fc1 + GELU, fc2 + gated residual), two samples of 67 rows
    a, sa = quant_fp8_ref(torch.randn(134, 2432, device="cuda"))
    w, sw = quant_fp8_ref(torch.randn(300, 2432, device="cuda") * 0.05)
    bias = torch.randn(300, device="cuda", dtype=torch.bfloat16)
    gate = torch.randn(2, 300, device="cuda", dtype=torch.bfloat16)
    resid = torch.randn(134, 300, device="cuda", dtype=torch.bfloat16)
    for v in variants:
        for kw in ({"act": "gelu_tanh"}, {"gate": gate, "residual": resid, "rows_per_batch": 67}):
            check(f"{v} epilogue {list(kw)}", fp8_gemm_gluon(a, sa, w, sw, bias, variant=v, **kw),
                  fp8_gemm_ref(a, sa, w, sw, bias, **kw))
    save()
    # the default config of each variant, and the candidates timed beside it
    ws_cfg = GLUON_WS_CONFIGS[0]
    configs = [("pipelined", "pipelined", GLUON_CONFIGS[0]), ("ws", "ws (default)", ws_cfg),
               ("ws", "ws split tail", {**ws_cfg, "SPLIT_TAIL": True}),
               ("ws", "ws split tail, max 3", {**ws_cfg, "SPLIT_TAIL": True, "MAX_SPLITS": 3})]
    configs = [(v, name, c) for v, name, c in configs if v in variants]
    timers = {"eager": tune_bench, "graph": graph_bench}
    for layer, (K, N) in {"qkv": (2432, 7296), "proj": (2432, 2432), "fc1": (2432, 9728),
                          "fc2": (9728, 2432)}.items():
        M = 8858
        a, sa = quant_fp8_ref(torch.randn(M, K, device="cuda"))
        w, sw = quant_fp8_ref(torch.randn(N, K, device="cuda") * 0.02)
        bias = torch.randn(N, device="cuda", dtype=torch.bfloat16) * 0.1
        ref = fp8_gemm_ref(a, sa, w, sw, bias)
        impls = [("_scaled_mm row-wise", lambda: scaled_mm(a, sa, w, sw, bias), ref),
                 ("_scaled_mm row-wise fast_accum", lambda: scaled_mm(a, sa, w, sw, bias, fast_accum=True), ref),
                 ("fp8_gemm precise", lambda: fp8_gemm(a, sa, w, sw, bias), ref)]
        impls += [(f"gluon {name}", lambda v=v, c=c: fp8_gemm_gluon(a, sa, w, sw, bias, config=c, variant=v), ref)
                  for v, name, c in configs]
        if layer in ("fc1", "fc2"):  # with the epilogue the model fuses there, against fp8_gemm's
            kw = {"act": "gelu_tanh"} if layer == "fc1" else {
                "gate": torch.randn(2, N, device="cuda", dtype=torch.bfloat16),
                "residual": torch.randn(M, N, device="cuda", dtype=torch.bfloat16), "rows_per_batch": M // 2}
            fused = fp8_gemm_ref(a, sa, w, sw, bias, **kw)
            impls += [("fp8_gemm precise fused", lambda kw=kw: fp8_gemm(a, sa, w, sw, bias, **kw), fused),
                      *((f"gluon {v} fused", lambda kw=kw, v=v: fp8_gemm_gluon(a, sa, w, sw, bias, variant=v, **kw),
                         fused) for v in variants)]
        # ROUNDS passes over all impls, interleaved, each ratio against cuBLAS's time in the same pass: clocks and
        # power drift on this GPU moved single timings by up to 0.3x between neighbouring rows (session 12 run 5)
        errs = [rel_rms(f(), r) for _, f, r in impls]
        times = {t: [[] for _ in impls] for t in timers}
        for _ in range(int(os.environ.get("ROUNDS", "3"))):
            for t, bench in timers.items():
                for i, (_, f, _) in enumerate(impls):
                    times[t][i].append(bench(f)[0])
        for i, (name, _, _) in enumerate(impls):
            row = {"layer": layer, "M": M, "K": K, "N": N, "impl": name, "rel_err_vs_ref": errs[i],
                   "config": next((c for v, n, c in configs if f"gluon {n}" == name), None)}
            for t in timers:
                ratios = sorted(b / x for b, x in zip(times[t][0], times[t][i]))
                ms = sorted(times[t][i])[len(times[t][i]) // 2]
                row.update({f"{t}_ms": ms, f"{t}_ms_rounds": times[t][i], f"{t}_TFLOPs": 2 * M * N * K / ms * 1e-9,
                            f"{t}_vs_scaled_mm": ratios[len(ratios) // 2], f"{t}_rounds": ratios})
            res["rows"].append(row)
            print(f"{layer:5s} {name[:60]:60s} eager {row['eager_ms']:.4f} ms {row['eager_vs_scaled_mm']:.3f}x  "
                  f"graph {row['graph_ms']:.4f} ms {row['graph_vs_scaled_mm']:.3f}x "
                  f"(rounds {', '.join(f'{r:.3f}' for r in row['graph_rounds'])}) err {errs[i]:.1e}", flush=True)
        save()
    bad = [c for c in res["checks"] if not c["ok"]]
    print(f"{len(res['checks']) - len(bad)} of {len(res['checks'])} checks passed", flush=True)
    sys.exit(1 if bad else 0)
