"""Attention, softmax(Q K^T / sqrt(hd)) V, as one fused kernel with bf16 or FP8 E4M3 operands (FlashAttention's
online softmax, written in Triton).

    q, k       [B, H, L, hd]   bf16, or E4M3 with one fp32 dequant scale per tensor (q ~= q8 * q_scale)
    v          [B, H, L, hd]   bf16; or E4M3 stored TRANSPOSED as vt [B, H, hd, Lp] (Lp >= L, see below), with one
                               fp32 dequant scale per batch row (or one for all)
    out        [B, H, L, hd]   bf16, allocated with q's strides (as SDPA does), so that out.transpose(1, 2) is the
                               [B, L, H * hd] token matrix the proj GEMM reads, without a copy

Why write it: at SD3.5 Large's shape (B = 2 with CFG, H = 38, L = 4096 image + 333 text tokens, hd = 64) attention
is 38 calls of 0.38 TFLOP per step, ~37 ms of a ~96 ms FP8 step on an H200 with cuDNN's bf16 kernel (~385
TFLOP/s; bench/results/2026-12-02_h200_session8). The GEMMs around it already run in FP8; attention is the largest
part of the step left in bf16.

How one program works (grid: one program per BLOCK_M query rows of one (batch, head)):
    s = (q8 @ k8^T) * (sm_scale * log2(e) * q_scale * k_scale)     one fp32 [BLOCK_M, BLOCK_N] tile of logits
    m = running row max;  p = exp2(s - m);  l = running row sum of p;  acc = running sum of p @ v
    when the max grows by d, the old l and acc are multiplied by exp2(-d) (the "online" softmax)
    out = acc / l (* v_scale)
Everything past the [BLOCK_M, BLOCK_N] tile of logits stays in registers; K and V are read once per program and
never written, the L x L matrix never exists in memory.

FP8 details:
- Q and K: the dot products of two E4M3 vectors are exact products summed in the MMA; their scales fold into the
  one multiplier of the logits (free). E4M3 keeps 3 mantissa bits, so a logit carries ~2-4% relative error
  (tests/test_fp8_attention.py measures the output error; the audit measures it in the model).
- P @ V in FP8: p is in [0, 1]; E4M3 has no values below 2**-9, so p is computed as exp2(s - m + 8), i.e. scaled
  by 256 into [0, 256] (<= 448: no clamp needed), and l sums the same scaled p, so the factor cancels in acc / l.
- Hopper's FP8 MMA wants both operands K-major in shared memory: for P @ V the reduction runs over keys, so V must
  be contiguous along the sequence: vt [B, H, hd, Lp], Lp a multiple of 16 so that each row starts 16-byte aligned
  (the TMA unit requires it). prepare_fp8 builds it.
- The MMA's accumulator keeps ~13 mantissa bits across a chain of FP8 MMAs (fp8_landscape.md); P @ V therefore
  goes into a fresh accumulator per key block and is added to acc in fp32, as fp8_gemm's promotion does.

Variants (one autotune list each, chosen by `variant`; "auto" = on Hopper "tma" for FP8 and "ws" for bf16, the
fastest measured there, else "ptr"):
    "ptr"   pointer loads with masks: any GPU with FP8 in Triton (sm89+), and the interpreter
    "tma"   K / V tiles through host TMA descriptors over the flattened [B * H * L, hd] tensors (Hopper); the key
            block that runs past L reads the next head's rows, which the -inf mask on the logits turns into p = 0
    "ws"    "tma" with tl.range(..., warp_specialize=True): producer warps issue the copies, consumers compute

Under the interpreter (TRITON_INTERPRET=1, the CPU tests) bf16 tl.dot multiplies raw bit patterns, so bf16 tiles
are widened to fp32 first (DOT_F32), and the fp32 -> e4m3 cast of p is not round-to-nearest-even, so p is rounded
to the E4M3 grid first (ROUND_FIRST), as the other kernels do (_common.py).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # `python kernels/fp8_attention.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import triton
import triton.language as tl

from kernels._common import (
    FP8,
    FP8_MAX,
    SCALE_FLOOR,
    capability,
    check_device,
    check_scale,
    check_tensor,
    interpreting,
    on_device,
    pick_configs,
    round_to_e4m3_grid,
    to_e4m3,
    tune_bench,
)
from minisd35.errors import HardwareError, InputError

P_SHIFT = 8.0  # p = exp2(s - m + 8) in [0, 256] for the FP8 P @ V product (see the docstring)
VARIANTS = ("auto", "ptr", "tma", "ws")


def _cfg(bm: int, bn: int, warps: int, stages: int, pre_hook=None) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages, pre_hook=pre_hook)


# BLOCK_M query rows per program (BLOCK_M / 16 rows per warp), BLOCK_N keys per iteration. With hd = 64 the
# logits tile is the register hog: 128 x 128 fp32 over 256 threads = 64 per thread. Triton 3.6 waits for every
# wgmma right after issuing it (the PTX of these kernels has only `wgmma.wait_group 0`), so a program's MMAs and
# its exp2 work take turns, and only other programs on the SM overlap them. Tried on an H200 and dropped: a
# software-pipelined loop (Q K^T of block j + 1 issued before block j's softmax: Triton still waits at once) and
# maxnreg=128 configs for two 8-warp programs per SM (within 2% of these; bench/results/2026-12-03_h200_session9).
# Also tried and dropped: a quarter or a half of the exponentials computed on the FMA pipes (2^x = 2^round(x) times a
# quadratic in the fraction, assembled with integer adds on the exponent bits; FlashAttention-4's trick against the
# MUFU unit's 16 ex2 per clock per SM). It compiled register-local, with 24% / 47% fewer ex2, and ran 10% / 16%
# slower at Large's shape (0.817 / 0.865 ms vs 0.745; bench/results/2026-12-03_h200_session10): with MMA and
# softmax taking turns, the extra FMA-pipe instructions cost more issue slots than the MUFU waits they remove.
_SHAPES = [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)]
ATTN_CONFIGS = [_cfg(bm, bn, w, st) for bm, bn, w, st in _SHAPES]


def _prune_pre_hopper(configs, named_args, **kwargs):
    """Without wgmma (sm8x: mma.sync, each warp owns BLOCK_M / num_warps query rows) tiles of more than 16 rows x
    64 keys per warp spill registers (sm89, ptxas: 128 x 64 at 4 warps 152 bytes in bf16, 128 x 128 at 8 warps
    48), so those configs are not even timed there."""
    dev = named_args["q_ptr"].device
    if dev.type != "cuda" or capability(dev) >= (9, 0):
        return configs
    return [c for c in configs if c.kwargs["BLOCK_M"] // c.num_warps <= 16 and c.kwargs["BLOCK_N"] <= 64] or configs[:1]
CPU_CONFIGS = [_cfg(16, 16, 4, 1)]  # the interpreter: small, so that odd L spans several key and query blocks


def _set_block_shapes(nargs):
    """Autotune pre-hook of the descriptor variants: the descriptors' block shapes follow the config being run."""
    bn, hd = nargs["BLOCK_N"], nargs["HD"]
    nargs["k_desc"].block_shape = [bn, hd]
    nargs["v_desc"].block_shape = [hd, bn] if nargs["V_T"] else [bn, hd]


TMA_CONFIGS = [_cfg(bm, bn, w, st, _set_block_shapes) for bm, bn, w, st in _SHAPES]
WS_CONFIGS = [_cfg(128, 64, 4, 3, _set_block_shapes), _cfg(128, 128, 4, 3, _set_block_shapes),
              _cfg(128, 128, 4, 2, _set_block_shapes)]
CPU_TMA_CONFIGS = [_cfg(16, 16, 4, 1, _set_block_shapes)]


@triton.jit
def _qk(q, k, DOT_F32: tl.constexpr):
    """Logits of one key block, q [BLOCK_M, HD] @ k [BLOCK_N, HD]^T in an fp32 accumulator (fp8 x fp8 or bf16)."""
    if DOT_F32 and q.dtype != tl.float8e4nv:  # the interpreter's bf16 dot multiplies raw bits: widen first
        return tl.dot(q.to(tl.float32), k.to(tl.float32).T)
    return tl.dot(q, k.T)


@triton.jit
def _softmax(s, m_i, l_i, qk_scale, offs_n, L, MASK: tl.constexpr, PV_FP8: tl.constexpr,
             ROUND_FIRST: tl.constexpr):
    """Online-softmax update for one block of raw logits s -> (p, alpha, m, l). MASK: the block runs past L; its
    logits there are -inf (p = 0)."""
    s = s * qk_scale
    if MASK:
        s = tl.where((offs_n < L)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    if PV_FP8:
        p = tl.math.exp2(s - (m_new - 8.0)[:, None])  # in [0, 256]: see the docstring (P_SHIFT)
    else:
        p = tl.math.exp2(s - m_new[:, None])
    l_new = l_i * alpha + tl.sum(p, 1)
    if PV_FP8 and ROUND_FIRST:
        p = round_to_e4m3_grid(p)
    return p, alpha, m_new, l_new


@triton.jit
def _pv(acc, alpha, p, v, PV_FP8: tl.constexpr, DOT_F32: tl.constexpr, PROMOTE: tl.constexpr):
    """acc * alpha + p @ v. PROMOTE (FP8): the product in a fresh accumulator, added in fp32 (see the docstring);
    otherwise the MMA accumulates onto acc * alpha."""
    if PV_FP8:
        if PROMOTE:
            return acc * alpha[:, None] + tl.dot(p.to(tl.float8e4nv), v)
        return tl.dot(p.to(tl.float8e4nv), v, acc * alpha[:, None])
    if DOT_F32:
        return tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc * alpha[:, None])
    return tl.dot(p.to(v.dtype), v, acc * alpha[:, None])


@triton.jit
def _step(acc, l_i, m_i, q, k, v, offs_n, L, qk_scale, MASK: tl.constexpr, PV_FP8: tl.constexpr,
          DOT_F32: tl.constexpr, ROUND_FIRST: tl.constexpr, PROMOTE: tl.constexpr):
    """One key block: q [BLOCK_M, HD], k [BLOCK_N, HD], v [BLOCK_N, HD] (a view of vt's tile when V_T) ->
    the updated (acc, l, m)."""
    p, alpha, m_i, l_i = _softmax(_qk(q, k, DOT_F32), m_i, l_i, qk_scale, offs_n, L, MASK, PV_FP8, ROUND_FIRST)
    return _pv(acc, alpha, p, v, PV_FP8, DOT_F32, PROMOTE), l_i, m_i


@triton.jit
def _prologue(q_ptr, qs_ptr, ks_ptr, vs_ptr, vs_off, offs_m, d, L, stride_ql, sm_scale, HAS_SCALES: tl.constexpr):
    """This program's query tile (rows past L read as 0) and the two scalars: the logits' multiplier (softmax
    scale, log2(e) for exp2, and the q / k dequant scales) and the output's (v's dequant scale, vs_ptr[vs_off]: one
    per batch row, or one for all)."""
    q = tl.load(q_ptr + offs_m[:, None] * stride_ql + d[None, :], mask=(offs_m < L)[:, None], other=0.0)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e)
    v_scale = 1.0
    if HAS_SCALES:
        qk_scale *= tl.load(qs_ptr) * tl.load(ks_ptr)
        v_scale = tl.load(vs_ptr + vs_off)
    return q, qk_scale, v_scale


@triton.jit
def _store(acc, l_i, o_ptr, offs_m, d, L, stride_ol, v_scale):
    out = acc * (v_scale / l_i)[:, None]
    tl.store(o_ptr + offs_m[:, None] * stride_ol + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=(offs_m < L)[:, None])


@triton.jit
def _attn_ptr_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, qs_ptr, ks_ptr, vs_ptr, vs_stride, sm_scale, L, H,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl, stride_vd, stride_ob, stride_oh, stride_ol,
    HD: tl.constexpr, HAS_SCALES: tl.constexpr, PV_FP8: tl.constexpr, V_T: tl.constexpr, PROMOTE: tl.constexpr,
    DOT_F32: tl.constexpr, ROUND_FIRST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    q_ptr += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_ptr += b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_ptr += b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    o_ptr += b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HD)
    n = tl.arange(0, BLOCK_N)
    q, qk_scale, v_scale = _prologue(q_ptr, qs_ptr, ks_ptr, vs_ptr, b * vs_stride, offs_m, d, L, stride_ql, sm_scale,
                                     HAS_SCALES)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HD], tl.float32)
    full = (L // BLOCK_N) * BLOCK_N
    for start in range(0, full, BLOCK_N):  # whole key blocks: no masks
        offs_n = start + n
        k = tl.load(k_ptr + offs_n[:, None] * stride_kl + d[None, :])
        v = tl.load(v_ptr + offs_n[:, None] * stride_vl + d[None, :] * stride_vd)
        acc, l_i, m_i = _step(acc, l_i, m_i, q, k, v, offs_n, L, qk_scale, False, PV_FP8, DOT_F32, ROUND_FIRST,
                              PROMOTE)
    if full < L:  # the last, partial key block
        offs_n = full + n
        kv_mask = (offs_n < L)[:, None]
        k = tl.load(k_ptr + offs_n[:, None] * stride_kl + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + offs_n[:, None] * stride_vl + d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        acc, l_i, m_i = _step(acc, l_i, m_i, q, k, v, offs_n, L, qk_scale, True, PV_FP8, DOT_F32, ROUND_FIRST,
                              PROMOTE)
    _store(acc, l_i, o_ptr, offs_m, d, L, stride_ol, v_scale)


@triton.jit
def _attn_tma_kernel(
    q_ptr, k_desc, v_desc, o_ptr, qs_ptr, ks_ptr, vs_ptr, vs_stride, sm_scale, L, H,
    stride_qb, stride_qh, stride_ql, stride_ob, stride_oh, stride_ol,
    HD: tl.constexpr, HAS_SCALES: tl.constexpr, PV_FP8: tl.constexpr, V_T: tl.constexpr, PROMOTE: tl.constexpr,
    WARP_SPEC: tl.constexpr, DOT_F32: tl.constexpr, ROUND_FIRST: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """k_desc over k as [B * H * L, hd]; v_desc over v as [B * H * L, hd], or (V_T) over vt as [B * H * hd, L] with
    row stride Lp. Q is read once with pointer loads (masked), the output stored with pointers (masked)."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    q_ptr += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    o_ptr += b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HD)
    q, qk_scale, v_scale = _prologue(q_ptr, qs_ptr, ks_ptr, vs_ptr, b * vs_stride, offs_m, d, L, stride_ql, sm_scale,
                                     HAS_SCALES)
    row0 = bh * L  # this head's first key row in the flattened [B * H * L, hd] view

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HD], tl.float32)
    n = tl.arange(0, BLOCK_N)
    full = L // BLOCK_N
    for j in tl.range(0, full, warp_specialize=WARP_SPEC):
        k = k_desc.load([row0 + j * BLOCK_N, 0])
        if V_T:
            v = v_desc.load([bh * HD, j * BLOCK_N]).T  # [hd, BLOCK_N] tile of vt, viewed as [BLOCK_N, hd]
        else:
            v = v_desc.load([row0 + j * BLOCK_N, 0])
        acc, l_i, m_i = _step(acc, l_i, m_i, q, k, v, j * BLOCK_N + n, L, qk_scale, False, PV_FP8, DOT_F32,
                              ROUND_FIRST, PROMOTE)
    if full * BLOCK_N < L:
        # rows past L belong to the next head (or are zero-filled past the tensor's end): the mask makes p = 0
        # there, and those rows hold finite values (E4M3 codes are clamped; no NaN), so 0 * v adds nothing
        k = k_desc.load([row0 + full * BLOCK_N, 0])
        if V_T:
            v = v_desc.load([bh * HD, full * BLOCK_N]).T  # columns past L: zero-filled by TMA
        else:
            v = v_desc.load([row0 + full * BLOCK_N, 0])
        acc, l_i, m_i = _step(acc, l_i, m_i, q, k, v, full * BLOCK_N + n, L, qk_scale, True, PV_FP8, DOT_F32,
                              ROUND_FIRST, PROMOTE)
    _store(acc, l_i, o_ptr, offs_m, d, L, stride_ol, v_scale)


_KEY = ["L", "HD", "HAS_SCALES", "PV_FP8", "V_T", "PROMOTE"]
_attn_ptr = triton.autotune(configs=pick_configs(ATTN_CONFIGS, CPU_CONFIGS), key=_KEY, do_bench=tune_bench,
                            prune_configs_by={"early_config_prune": _prune_pre_hopper})(_attn_ptr_kernel)
_attn_tma = triton.autotune(configs=pick_configs(TMA_CONFIGS, CPU_TMA_CONFIGS), key=_KEY + ["WARP_SPEC"],
                            do_bench=tune_bench)(_attn_tma_kernel)
_attn_ws = triton.autotune(configs=pick_configs(WS_CONFIGS, CPU_TMA_CONFIGS), key=_KEY + ["WARP_SPEC"],
                           do_bench=tune_bench)(_attn_tma_kernel)



@triton.jit
def _v_fp8_t_kernel(v_ptr, vt_ptr, amax_ptr, scale_ptr, amax_stride, L, Lp, H, stride_vb, stride_vh, stride_vl,
                    stride_tb, stride_th, stride_td, HD: tl.constexpr, ROUND_FIRST: tl.constexpr,
                    BLOCK_L: tl.constexpr):
    """v [B, H, L, hd] (model dtype) -> vt [B, H, hd, Lp] E4M3 = v / scale, clamped, with scale = max(amax, floor) /
    448 from amax[b * amax_stride] (one per batch row, or one for all; program (0, b, h = 0) also stores it, for the
    attention kernel). BLOCK_L tokens of one head per program: read as [BLOCK_L, hd] rows (16-byte loads),
    transposed in registers / shared memory, written as hd rows of BLOCK_L bytes. The store mask runs to Lp (a
    multiple of 16; the padding gets zeros), so that the compiler can prove 16-byte alignment and write 16 bytes per
    instruction: with the mask at L (odd at SD3.5's 4429 tokens) it wrote one byte per instruction and took 154 us
    per call at Large's shape (H200, session 9)."""
    pid_l, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    tok = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    d = tl.arange(0, HD)
    x = tl.load(v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh + tok[:, None].to(tl.int64) * stride_vl
                + d[None, :], mask=(tok < L)[:, None], other=0.0)
    scale = tl.maximum(tl.load(amax_ptr + b * amax_stride), 1e-12) / 448.0
    if pid_l == 0 and h == 0 and (b == 0 or amax_stride > 0):
        tl.store(scale_ptr + b * amax_stride, scale)
    q = tl.trans(to_e4m3(x.to(tl.float32), 1.0 / scale, ROUND_FIRST))  # [HD, BLOCK_L]
    tl.store(vt_ptr + b.to(tl.int64) * stride_tb + h.to(tl.int64) * stride_th + d[:, None] * stride_td + tok[None, :],
             q, mask=(tok < Lp)[None, :])


V_BLOCK_L = 128  # 128 tokens x 64 dims: 16 KB of bf16 read, 8 KB of E4M3 written per program


# ----------------------------------------------------------------------------------------------------------------
# The wrapper: check, allocate, launch.


def _check(fn: str, q, k, v, v_transposed: bool, q_scale, k_scale, v_scale) -> tuple[int, int, int, int]:
    for name, t in (("q", q), ("k", k)):
        check_tensor(fn, name, t, (torch.bfloat16, FP8), ndim=4)
    check_tensor(fn, "v", v, (torch.bfloat16, FP8), ndim=4)
    B, H, L, hd = q.shape
    if tuple(k.shape) != (B, H, L, hd):
        raise InputError(f"{fn}: k has shape {tuple(k.shape)}; expected q's shape {(B, H, L, hd)} (self-attention "
                         f"over one joint sequence)")
    if q.dtype != k.dtype:
        raise InputError(f"{fn}: q is {q.dtype} and k is {k.dtype}; both bf16 or both float8_e4m3fn")
    if hd not in (16, 32, 64, 128):
        raise InputError(f"{fn}: head dim {hd} is not supported (16, 32, 64 or 128; SD3.5 uses 64)")
    if v_transposed:
        if v.dtype != FP8 or v.shape[:3] != (B, H, hd) or v.shape[3] < L or v.stride(3) != 1:
            raise InputError(f"{fn}: a transposed v must be float8_e4m3fn [B, H, hd, Lp >= L] = [{B}, {H}, {hd}, "
                             f">= {L}] with the sequence contiguous (prepare_fp8 builds it); got {v.dtype} "
                             f"{tuple(v.shape)} strides {v.stride()}")
    else:
        if tuple(v.shape) != (B, H, L, hd):
            raise InputError(f"{fn}: v has shape {tuple(v.shape)}; expected {(B, H, L, hd)}")
        if v.dtype == FP8:
            raise InputError(f"{fn}: an FP8 v must be stored transposed, [B, H, hd, Lp] (Hopper's FP8 MMA reads "
                             f"the reduction dim contiguous); build it with prepare_fp8 and pass v_transposed=True")
    fp8_in = q.dtype == FP8 or v.dtype == FP8
    scales = (q_scale, k_scale, v_scale)
    given = sum(s is not None for s in scales)
    if (fp8_in and given < 3) or given not in (0, 3):
        raise InputError(f"{fn}: pass all of q_scale, k_scale, v_scale (fp32 dequant scales, 1-element, v_scale "
                         f"also [B]; FP8 inputs need them; torch.ones(1) for a bf16 tensor in a mixed call) or none "
                         f"of them")
    for name, s in zip(("q_scale", "k_scale"), scales[:2]):
        if s is not None:
            check_scale(fn, name, s, 1, "tensor")
    if v_scale is not None:
        check_scale(fn, "v_scale", v_scale, B, "batch row")
    return B, H, L, hd


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_scale: torch.Tensor | None = None,
              k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None, *, v_transposed: bool = False,
              sm_scale: float | None = None, out: torch.Tensor | None = None, variant: str = "auto",
              pv_promote: bool = True) -> torch.Tensor:
    """softmax(q k^T * sm_scale) v over [B, H, L, hd] tensors (no mask, non-causal; sm_scale = 1/sqrt(hd) by default)
    -> bf16 [B, H, L, hd] with q's strides. q, k: both bf16 or both E4M3 with q_scale, k_scale; v: bf16 [B, H, L,
    hd], or E4M3 stored transposed [B, H, hd, Lp] with v_scale and v_transposed=True. Scales are fp32 tensors read
    on the device (a CUDA graph can replay with new values): q_scale and k_scale 1-element, v_scale 1-element or one
    per batch row ([B], as v_fp8_transposed writes it, so that no image's V rounding depends on another's).
    pv_promote=False: the FP8 P @ V products accumulate in the MMA's accumulator across key blocks (one register
    tile fewer, fewer adds; see the docstring for what that costs in precision)."""
    fn = "attention"
    B, H, L, hd = _check(fn, q, k, v, v_transposed, q_scale, k_scale, v_scale)
    dev = check_device(fn, q, k, v, q_scale, k_scale, v_scale, fp8=q.dtype == FP8 or v.dtype == FP8)
    if variant not in VARIANTS:
        raise InputError(f"{fn}: variant={variant!r}; expected one of {VARIANTS}")
    if variant == "auto":  # the fastest per mode on an H200 (bench/results/2026-12-03_h200_session9/attention_run2)
        fp8 = q.dtype == FP8 or v.dtype == FP8
        variant = ("tma" if fp8 else "ws") if dev.type == "cuda" and capability(dev) >= (9, 0) else "ptr"
    if out is None:
        out = torch.empty_strided(q.shape, q.stride(), dtype=torch.bfloat16, device=q.device)
    elif out.shape != q.shape or out.dtype != torch.bfloat16 or out.stride(3) != 1:
        raise InputError(f"{fn}: out must be bf16 {tuple(q.shape)} with hd contiguous; got {out.dtype} "
                         f"{tuple(out.shape)} strides {out.stride()}")
    has_scales = q_scale is not None
    scales = (q_scale, k_scale, v_scale) if has_scales else (q, q, q)  # without scales: unused pointers
    vs_stride = int(has_scales and v_scale.numel() > 1)  # [B] (checked) or one for all
    sm = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(hd)
    flags = dict(HD=hd, HAS_SCALES=has_scales, PV_FP8=v.dtype == FP8, V_T=v_transposed, PROMOTE=pv_promote,
                 DOT_F32=interpreting(), ROUND_FIRST=interpreting())
    grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), B * H)
    with on_device(dev):
        if variant == "ptr":
            vs = (v.stride(0), v.stride(1), 1, v.stride(2)) if v_transposed else (*v.stride()[:3], 1)
            _attn_ptr[grid](q, k, v, out, *scales, vs_stride, sm, L, H, *q.stride()[:3], *k.stride()[:3], *vs,
                            *out.stride()[:3], **flags)
        else:
            k_desc, v_desc = _descriptors(k, v, v_transposed, dev, variant)
            launch = _attn_ws if variant == "ws" else _attn_tma
            launch[grid](q, k_desc, v_desc, out, *scales, vs_stride, sm, L, H, *q.stride()[:3], *out.stride()[:3],
                         WARP_SPEC=variant == "ws", **flags)
    return out


def _descriptors(k: torch.Tensor, v: torch.Tensor, v_transposed: bool, dev: torch.device, variant: str):
    """Host TMA descriptors over k as [B * H * L, hd] and v as [B * H * L, hd] or vt as [B * H * hd, L] (row stride
    Lp): both need a contiguous batch / head layout, and TMA needs 16-byte aligned rows."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError as e:
        raise HardwareError(f"attention: variant {variant!r} needs triton.tools.tensor_descriptor (Triton 3.4+); "
                            f"use variant='ptr'") from e
    if dev.type == "cuda" and capability(dev) < (9, 0):
        raise HardwareError(f"attention: variant {variant!r} needs Hopper's TMA unit (sm90+); use variant='ptr'")
    B, H, L, hd = k.shape
    if k.stride() != (H * L * hd, L * hd, hd, 1):
        raise InputError(f"attention: variant {variant!r} needs a contiguous k [B, H, L, hd] (got strides "
                         f"{k.stride()}); use variant='ptr' for other layouts")
    kd = TensorDescriptor(k, [B * H * L, hd], [hd, 1], [1, 1])
    if v_transposed:
        Lp = v.shape[3]
        if v.stride() != (H * hd * Lp, hd * Lp, Lp, 1) or Lp % 16:
            raise InputError(f"attention: variant {variant!r} needs vt contiguous [B, H, hd, Lp] with Lp % 16 == 0 "
                             f"(got {tuple(v.shape)}, strides {v.stride()}); prepare_fp8 builds it")
        vd = TensorDescriptor(v, [B * H * hd, L], [Lp, 1], [1, 1])
    else:
        if v.stride() != k.stride():
            raise InputError(f"attention: variant {variant!r} needs a contiguous v [B, H, L, hd] (got strides "
                             f"{v.stride()}); use variant='ptr'")
        vd = TensorDescriptor(v, [B * H * L, hd], [hd, 1], [1, 1])
    return kd, vd


# ----------------------------------------------------------------------------------------------------------------
# Preparing FP8 operands (plain torch: the model fuses this into the kernels that write q, k, v) and the reference.


def quant_tensor(x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (E4M3 codes, fp32 [1] dequant scale): one scale for the whole tensor, amax / 448 unless given."""
    if scale is None:
        scale = (x.abs().amax().float().clamp_min(SCALE_FLOOR) / FP8_MAX).reshape(1)
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale.reshape(1).float()


def padded_len(L: int) -> int:
    """Lp: the row length of a transposed E4M3 v, L rounded up to 16 bytes (TMA's row alignment)."""
    return -(-L // 16) * 16


def v_fp8_transposed(v: torch.Tensor, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """v [B, H, L, hd] bf16 / fp16 (hd contiguous) -> (vt [B, H, hd, Lp] E4M3, scale fp32 [B]): one scale per batch
    row, max(amax, 1e-12) / 448, computed on the device (no host sync, graph-safe), and the transpose that Hopper's
    FP8 P @ V needs, in one pass. Per batch row, not per tensor, so that an image's V codes (and so its pixels) do
    not depend on what else is in the batch. amax: fp32 [B] max |v| per batch row if already known (fast.py has
    qk_norm_split gather it while it writes v; [1] for one scale over all rows), else one pass over v here."""
    fn = "v_fp8_transposed"
    check_tensor(fn, "v", v, (torch.bfloat16, torch.float16), ndim=4)
    dev = check_device(fn, v, amax)
    B, H, L, hd = v.shape
    if amax is None:
        amax = v.abs().amax(dim=(1, 2, 3)).float()
    else:
        check_scale(fn, "amax", amax, B, "batch row")
    Lp = padded_len(L)
    vt = torch.empty(B, H, hd, Lp, dtype=FP8, device=v.device)
    scale = torch.empty(amax.numel(), dtype=torch.float32, device=v.device)
    with on_device(dev):
        _v_fp8_t_kernel[(triton.cdiv(Lp, V_BLOCK_L), B * H)](
            v, vt, amax, scale, int(amax.numel() > 1), L, Lp, H, *v.stride()[:3], *vt.stride()[:3],
            HD=hd, ROUND_FIRST=interpreting(), BLOCK_L=V_BLOCK_L, num_warps=4)
    return vt, scale


def v_fp8_transposed_ref(v: torch.Tensor, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch v_fp8_transposed (the padding columns are zero in both)."""
    B, H, L, hd = v.shape
    amax = v.abs().amax(dim=(1, 2, 3)) if amax is None else amax
    scale = (amax.float().clamp_min(SCALE_FLOOR) / FP8_MAX).reshape(-1)
    v8 = (v.float() / scale.view(-1, 1, 1, 1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    vt = torch.zeros(B, H, hd, padded_len(L), dtype=FP8, device=v.device)
    vt[..., :L] = v8.transpose(2, 3)
    return vt, scale


def prepare_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk: bool = True, pv: bool = True):
    """bf16 q, k, v [B, H, L, hd] -> the arguments of attention() with the chosen operands in FP8: (q, k, v_arg,
    q_scale, k_scale, v_scale, v_transposed). qk: q and k as E4M3 with per-tensor scales (else bf16, scale 1);
    pv: v as E4M3 transposed [B, H, hd, Lp] with one scale per batch row (else bf16 v, scale 1). Plain torch, for
    tests and benchmarks: the model writes E4M3 q and k straight from its QK-norm kernel."""
    one = torch.ones(1, device=q.device)
    q8, qs = quant_tensor(q) if qk else (q, one)
    k8, ks = quant_tensor(k) if qk else (k, one)
    if not pv:
        return q8.contiguous(), k8.contiguous(), v, qs, ks, one, False
    vt, vs = v_fp8_transposed_ref(v)
    return q8.contiguous(), k8.contiguous(), vt, qs, ks, vs, True


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_scale: torch.Tensor | None = None,
                  k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None, *,
                  v_transposed: bool = False, sm_scale: float | None = None) -> torch.Tensor:
    """The same arguments as attention(): dequantise, then the exact softmax in fp32; bf16 out."""
    L = q.shape[2]
    qf, kf = q.float(), k.float()
    vf = v[..., :L].transpose(2, 3).float() if v_transposed else v.float()
    if q_scale is not None:
        qf, kf, vf = qf * q_scale, kf * k_scale, vf * v_scale.reshape(-1, 1, 1, 1)
    sm = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    p = torch.softmax((qf @ kf.transpose(2, 3)) * sm, dim=-1)
    return (p @ vf).to(torch.bfloat16)


if __name__ == "__main__":
    from kernels._common import bench_ms, check_line, print_table, rel_rms

    if not torch.cuda.is_available() and not interpreting():
        sys.exit("needs a CUDA GPU, or TRITON_INTERPRET=1 to run the check on the CPU")
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    cases = [(2, 38, 4429, 64), (2, 24, 4429, 64), (2, 38, 1357, 64)] if dev == "cuda" else [(1, 2, 37, 64)]
    variants = ["ptr", "tma", "ws"] if dev == "cuda" and capability(torch.device(dev)) >= (9, 0) else ["ptr"]
    torch.manual_seed(0)
    rows = []
    for B, H, L, hd in cases:
        q, k, v = (torch.randn(B, H, L, hd, device=dev).to(torch.bfloat16) * s for s in (2.0, 2.0, 1.0))
        ref = attention_ref(q, k, v)
        flop = 4 * B * H * L * L * hd
        modes = {"bf16": (q, k, v, None, None, None, False), "fp8 qk": prepare_fp8(q, k, v, pv=False),
                 "fp8 pv": prepare_fp8(q, k, v, qk=False), "fp8 qk+pv": prepare_fp8(q, k, v)}
        for mode, args in modes.items():
            tol = 2e-2 if mode == "bf16" else 0.12
            for var in variants:
                try:
                    o = attention(*args[:6], v_transposed=args[6], variant=var)
                except Exception as e:  # a variant this GPU / Triton cannot compile: say so, keep going
                    print(f"❌ {mode} {var}: {type(e).__name__}: {str(e)[:200]}")
                    continue
                check_line(f"attention {mode} {var} B={B} H={H} L={L}", rel_rms(o, ref), tol)
                if dev == "cuda":
                    ms = bench_ms(lambda: attention(*args[:6], v_transposed=args[6], variant=var))[0]
                    rows.append({"B": B, "H": H, "L": L, "mode": mode, "variant": var, "ms": ms,
                                 "TFLOP/s": flop / ms * 1e-9, "rel_err": rel_rms(o, ref)})
        if dev == "cuda":
            import torch.nn.functional as F

            ms = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v))[0]
            rows.append({"B": B, "H": H, "L": L, "mode": "bf16", "variant": "torch sdpa", "ms": ms,
                         "TFLOP/s": flop / ms * 1e-9, "rel_err": rel_rms(F.scaled_dot_product_attention(q, k, v), ref)})
    if rows:
        print_table(rows, ["B", "H", "L", "mode", "variant", "ms", "TFLOP/s", "rel_err"])
