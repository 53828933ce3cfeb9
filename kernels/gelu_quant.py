"""GELU(tanh) + per-token FP8 quantisation of the MLP hidden state: the step between fc1 and fc2 of every MMDiT block
on the W8A8 path, in one pass.

    h [M, N]   fc1's output in bf16 (N = 4 * hidden: 9728 for SD3.5 Large, 6144 for Medium), row stride free
    g          = F.gelu(h, approximate="tanh") as torch computes it: fp32 inside, one rounding to h's dtype
    (g8, scale) = quant_fp8(g) per token: scale = max(max|g|, 1e-12) / 448 per row, g8 = g * (448 / that) as E4M3

Unfused this is two kernels and an extra [M, N] bf16 round trip through memory (172 MB at M = 8858 for Large):
GELU writes g, the quantiser reads it twice. Here h is read from DRAM once and only the 1-byte codes are written,
so the kernel is memory-bound at M*N*(2 + 1) bytes and its figure of merit is GB/s against a device copy (target
>= 80%). Two facts make that reachable:

1. The row's scale needs max|g| before the first code can be written, and a 9728-wide row does not fit a
   power-of-two register tile without wasting 40% of the lanes (Triton tiles are powers of two; 9728 = 19 * 512).
   But max|g| can be had without computing g: GELU is increasing for x >= -0.75 and its values for negative x lie
   in [-0.16997, 0], so whenever GELU(max x) >= NEG_BOUND (0.1705 > 0.16997 even after rounding to bf16/fp16),
   max|g| = GELU(max x): rounding to bf16 is monotonic too, so this holds for the rounded values exactly. So pass
   1 is a plain max over the row (a load and a max per element), and pass 2 reads the row again (from L1/L2: it
   was just loaded), computes g once per element and writes the codes. Rows whose max is below ~0.3 (never seen in
   a real fc1 output, but legal) take a slow pass that computes max|g| element by element; the result is the same.
2. GELU is evaluated as x * sigmoid(2u) = x / (1 + 2**(-2u*log2(e))), u = sqrt(2/pi) * (x + 0.044715 x^3): about
   eight instructions, two of them special-function (ex2, reciprocal; the sm90 SASS of pass 2 is 16.5 instructions
   per element with the loads, the bf16 rounding and the cast, pass 1 about 3), where torch's 0.5 x (1 + tanh(u))
   with an accurate tanhf costs ~25 and would make the kernel compute-bound (~35 instructions per element against
   a memory time worth ~24 at H200 rates). It is the same function, and as close to the exact one: after the rounding to
   bf16 both are 1.55e-3 (relative RMS) from GELU in fp64. They differ by a few fp32 ulps, and by torch's own
   cancellation in 1 + tanh(u) for x < -3, where tanh(u) is within 1e-4 of -1 and its fp32 rounding (6e-8) is a
   visible fraction of the tiny result. Measured on the CPU against torch's GELU for N(0, 1.5^2) data: 0.27% of
   the bf16 values differ by one ulp, all at x in [-7.6, -3] where |GELU| < 0.004, and 2e-5 of the E4M3 codes
   (a value that small sits near the bottom of its row's range); the row scales agree exactly. Reproducing
   libdevice's tanhf instead (both of its branches, selected per element) would cost ~10 more instructions per
   element and make the kernel compute-bound.

Tried and removed (GPU session 11, H200, graph replay at M = 8858, bench/results/2026-12-03_h200_session11): one
row per program held in registers between the passes (two power-of-two tiles, 8192 + 2048 for 9728, so pass 2
reads nothing again; same codes bit for bit). Slower: 116.5 vs 85.3 us at N = 9728 (52% vs 71% of copy
bandwidth), 60.1 vs 51.6 us at N = 6144. The likely reasons (not profiled): a whole row must arrive before its
first code can be written, so each program's loads and stores do not overlap, and its registers allow fewer rows
in flight per SM than the streaming steps keep.

Everything after g is quant_fp8's arithmetic, bit for bit: IEEE divisions for the scale and its inverse once per
row, one multiply per element, E4M3 round-to-nearest-even with saturation at +-448 (the GPU's cvt.rn.satfinite
saturates by itself, so the explicit clamp is compiled in only under the interpreter, whose cast wraps). NaN in h,
on the GPU: as in quant_fp8, the max ignores it (its row's scale comes from the other values) and its code is NaN;
torch's amax would make the whole row NaN (and so does the interpreter, whose maximum propagates NaN).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # `python kernels/gelu_quant.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._common import (
    FP8,
    FP8_MAX,
    SCALE_FLOOR,
    TL_DTYPES,
    check_device,
    check_tensor,
    interpreting,
    on_device,
    pick_configs,
    round_first,
    round_to,
    round_to_e4m3_grid,
    tune_bench,
)
from kernels.fp8_quant import quant_fp8_ref

# |GELU(x)| for x < 0 is at most 0.169971 (at x = -0.7518); rounded to bf16 that is 0.16992, to fp16 0.16992 or
# 0.17004. A row whose GELU(max x) reaches this bound has max|g| = GELU(max x).
NEG_BOUND = tl.constexpr(0.1705)
# -2u * log2(e) = x * (NA + NB x^2), with u = sqrt(2/pi) * (x + 0.044715 x^3): three instructions (mul, fma, mul)
_NA = tl.constexpr(-2.0 * 0.7978845608028654 * 1.4426950408889634)
_NB = tl.constexpr(-2.0 * 0.7978845608028654 * 1.4426950408889634 * 0.044715)


def _cfg(bm: int, bn: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps)


# BLOCK_M rows x BLOCK_N columns per step; every config gives each thread 8-16 values per step (16-byte loads).
# All are timed, also those whose BLOCK_N leaves a masked tail step: an earlier prune kept only the BLOCK_Ns that
# divide N, which at Large's 9728 = 19 * 512 meant 512-wide steps, and on an H200 (graph replay, M = 8858) those
# ran at 53% of the copy bandwidth where 2048-wide steps with 8 warps, half of the last step masked, reach 72%
# (115 vs 85 us: fewer, wider steps keep more loads in flight per thread; bench/results/2026-12-02_h200_session8).
GELU_CONFIGS = [_cfg(1, 1024, 4), _cfg(1, 2048, 8), _cfg(1, 512, 2), _cfg(2, 1024, 8), _cfg(1, 1024, 8),
                _cfg(2, 512, 4), _cfg(4, 512, 8)]
CPU_CONFIGS = [_cfg(2, 32, 1)]  # the interpreter: narrow steps, so that N = 100 has full steps and a tail


@triton.jit
def gelu_tanh_f32(x):
    """GELU(tanh) of fp32 x as x * sigmoid(2u): exp2 overflow for very negative x gives x / inf = -0, as torch's
    0.5 x (1 + tanh(u)) = 0.5 x * 0 does; x = +inf gives inf, -inf and NaN give NaN."""
    return x / (1.0 + tl.exp2(x * (_NA + _NB * (x * x))))


@triton.jit
def _load(ptrs, n0, cols, N, row_ok, MASKED: tl.constexpr, other):
    if MASKED:
        return tl.load(ptrs + n0, mask=row_ok[:, None] & (n0 + cols[None, :] < N), other=other).to(tl.float32)
    return tl.load(ptrs + n0).to(tl.float32)


@triton.jit
def _codes(x, inv, G_DT: tl.constexpr, ROUND_FIRST: tl.constexpr):
    """E4M3 codes of round(GELU(x)) * inv. The compiled cast (cvt.rn.satfinite) saturates by itself; the
    interpreter's does not, so there the value is clamped and rounded to the E4M3 grid first (see _common.py)."""
    q = round_to(gelu_tanh_f32(x), G_DT, ROUND_FIRST) * inv
    if ROUND_FIRST:
        q = round_to_e4m3_grid(tl.where(q > 448.0, 448.0, tl.where(q < -448.0, -448.0, q)))
    return q.to(tl.float8e4nv)


@triton.autotune(do_bench=tune_bench, configs=pick_configs(GELU_CONFIGS, CPU_CONFIGS), key=["N"])
@triton.heuristics({"N_FULL": lambda a: a["N"] - a["N"] % a["BLOCK_N"]})
@triton.jit
def _gelu_quant_kernel(
    h_ptr, q_ptr, scale_ptr,  # h [M, N] (row stride stride_hm), q [M, N] e4m3 contiguous, scale [M] fp32
    M, N, stride_hm,
    G_DT: tl.constexpr, ROUND_FIRST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    N_FULL: tl.constexpr,  # columns covered by whole BLOCK_N steps; a masked step does the rest
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rm = tl.where(row_ok, rows, 0)  # rows past M read row 0 (no load mask needed) and store nothing
    cols = tl.arange(0, BLOCK_N)
    h_rows = h_ptr + rm[:, None].to(tl.int64) * stride_hm + cols[None, :]
    q_rows = q_ptr + rm[:, None].to(tl.int64) * N + cols[None, :]

    # pass 1: the row maximum of h (not of |GELU(h)|, see the module docstring), elementwise across the steps and
    # reduced across threads once at the end
    xm = tl.full((BLOCK_M, BLOCK_N), float("-inf"), tl.float32)
    for n0 in range(0, N_FULL, BLOCK_N):
        xm = tl.maximum(xm, _load(h_rows, n0, cols, N, row_ok, False, 0.0))
    if N_FULL < N:
        xm = tl.maximum(xm, _load(h_rows, N_FULL, cols, N, row_ok, True, float("-inf")))
    amax = round_to(gelu_tanh_f32(tl.max(xm, axis=1)), G_DT, ROUND_FIRST)
    if tl.min(amax, axis=0) < NEG_BOUND:  # some row's largest |GELU| may come from a negative input: compute it
        am = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for n0 in range(0, N, BLOCK_N):
            g = round_to(gelu_tanh_f32(_load(h_rows, n0, cols, N, row_ok, True, 0.0)), G_DT, ROUND_FIRST)
            am = tl.maximum(am, tl.abs(g))
        amax = tl.max(am, axis=1)

    # the scale and its inverse, IEEE divisions once per row (as quant_fp8)
    amax = tl.maximum(amax, 1e-12)
    tl.store(scale_ptr + rows, tl.math.div_rn(amax, tl.full((BLOCK_M,), 448.0, tl.float32)), mask=row_ok)
    inv = tl.math.div_rn(tl.full((BLOCK_M,), 448.0, tl.float32), amax)[:, None]

    # pass 2: GELU once per element, the codes (the row is hot in L1/L2 from pass 1)
    for n0 in range(0, N_FULL, BLOCK_N):
        tl.store(q_rows + n0, _codes(_load(h_rows, n0, cols, N, row_ok, False, 0.0), inv, G_DT, ROUND_FIRST),
                 mask=row_ok[:, None])
    if N_FULL < N:
        mask = row_ok[:, None] & (N_FULL + cols[None, :] < N)
        tl.store(q_rows + N_FULL, _codes(_load(h_rows, N_FULL, cols, N, row_ok, True, 0.0), inv, G_DT, ROUND_FIRST),
                 mask=mask)


def gelu_quant(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h [M, N] (bf16; fp16 / fp32 work the same way) -> (g8 [M, N] e4m3, scale [M] fp32): per-token FP8 of
    F.gelu(h, approximate="tanh"), which is computed in fp32 and rounded to h's dtype first, as torch does."""
    fn = "gelu_quant"
    check_tensor(fn, "h", h, (torch.bfloat16, torch.float16, torch.float32), ndim=2)
    dev = check_device(fn, h)
    M, N = h.shape
    q = torch.empty((M, N), dtype=FP8, device=dev)
    scale = torch.empty(M, dtype=torch.float32, device=dev)
    if M == 0 or N == 0:
        return q, scale.fill_(SCALE_FLOOR / FP8_MAX)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)
    with on_device(dev):
        _gelu_quant_kernel[grid](h, q, scale, M, N, h.stride(0), G_DT=TL_DTYPES[h.dtype], ROUND_FIRST=round_first(dev))
    return q, scale


def gelu_quant_ref(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: quant_fp8_ref(F.gelu(h, approximate="tanh")) (per token)."""
    return quant_fp8_ref(F.gelu(h, approximate="tanh"))


if __name__ == "__main__":
    from kernels._common import bench_ms, check_line, print_table, rel_rms

    if not torch.cuda.is_available() and not interpreting():
        sys.exit("needs a CUDA GPU, or TRITON_INTERPRET=1 to run the check on the CPU")
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    shapes = [(8858, 9728), (8858, 6144)] if dev == "cuda" else [(5, 100), (3, 64)]
    torch.manual_seed(0)
    rows = []
    for M, N in shapes:
        h = torch.randn(M, N, device=dev, dtype=torch.bfloat16) * 2
        q, s = gelu_quant(h)  # 1. check: dequantised values and the share of codes that differ
        qr, sr = gelu_quant_ref(h)
        check_line(f"gelu_quant M={M} N={N}", rel_rms(q.float() * s[:, None], qr.float() * sr[:, None]), 1e-3)
        print(f"   codes differing: {(q.view(torch.uint8) != qr.view(torch.uint8)).float().mean().item():.2e}, "
              f"scales equal: {torch.equal(s, sr)}")
        if dev == "cpu":
            continue
        moved = M * N * (2 + 1) + 4 * M  # 2. bandwidth against a copy of h
        copy_ms = bench_ms(lambda: torch.empty_like(h).copy_(h))[0]
        for impl, f in [("triton gelu_quant", lambda: gelu_quant(h)),
                        ("torch: F.gelu, quant", lambda: gelu_quant_ref(h))]:
            ms = bench_ms(f)[0]
            rows.append({"M": M, "N": N, "impl": impl, "ms": ms, "GB/s": moved / ms * 1e-6,
                         "copy GB/s": 2 * h.numel() * 2 / copy_ms * 1e-6})
    if rows:
        print_table(rows, ["M", "N", "impl", "ms", "GB/s", "copy GB/s"])
