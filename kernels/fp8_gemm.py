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

Tiling: BLOCK_M x BLOCK_N output tiles, K walked in BLOCK_K steps, tiles visited in GROUP_M-row groups so that
neighbouring programs share A rows and W columns in L2 (the Triton matmul tutorial's ordering). Row and column
indices past the edge are wrapped (% M, % N) instead of masked, so the main loop's loads need no M/N mask; those
rows are computed and never stored. K tails are masked unless K % BLOCK_K == 0 (EVEN_K).

Autotuning is keyed on N and K (fixed per layer) plus the epilogue and accumulation flags, never on M: the first
call for a given layer shape picks the config, so benchmark (or warm up) with a representative M first.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # `python kernels/fp8_gemm.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._common import FP8, check_device, check_scale, check_tensor, on_device, pick_configs
from minisd35.errors import InputError

ACTS = ("none", "gelu_tanh")
# ACC_MODE: FAST never promotes; PRECISE promotes every 128 products inside the dot lowering
# (max_num_imprecise_acc=128, the default); PRECISE_ADD promotes with `acc += tl.dot(a, b)` per K tile (kept to
# compare: same error, measured 3-10% slower on an H200)
FAST, PRECISE_ADD, PRECISE = 0, 1, 2


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


@triton.autotune(configs=pick_configs(GEMM_CONFIGS, CPU_CONFIGS),
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
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % group) % group_m)
    pid_n = (pid % group) // group_m

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

    # epilogue, all in fp32: scales, bias, activation, gate, residual; one rounding at the store
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
             fast_accum: bool = False) -> torch.Tensor:
    """out = residual + gate * act(a @ w.T * a_scale[:, None] * w_scale[None, :] + bias), computed in fp32 and
    rounded once to out_dtype. a [M, K] e4m3, w [N, K] e4m3, scales fp32 [M] / [N] or 1-element. rows_per_batch=0
    infers M // gate.shape[0]. fast_accum=True skips the fp32 promotion of the accumulator (see module docstring)."""
    return _fp8_gemm(a, a_scale, w, w_scale, bias, out_dtype, act, gate, residual, rows_per_batch,
                     FAST if fast_accum else PRECISE)


def _fp8_gemm(a, a_scale, w, w_scale, bias, out_dtype, act, gate, residual, rows_per_batch, acc_mode: int):
    fn = "fp8_gemm"
    check_tensor(fn, "a", a, (FP8,), ndim=2)
    check_tensor(fn, "w", w, (FP8,), ndim=2)
    M, K = a.shape
    N = w.shape[0]
    if w.shape[1] != K:
        raise InputError(f"fp8_gemm: a is [{M}, {K}] but w is {list(w.shape)}; w must be [N, {K}] (nn.Linear layout)")
    check_scale(fn, "a_scale", a_scale, M, "row of a (token)")
    check_scale(fn, "w_scale", w_scale, N, "row of w (output channel)")
    rows_per_batch = _check_epilogue(fn, M, N, bias, out_dtype, act, gate, residual, rows_per_batch)
    dev = check_device(fn, a, w, a_scale, w_scale, bias, gate, residual)

    out = torch.empty((M, N), dtype=out_dtype, device=dev)
    if M == 0 or N == 0:
        return out
    if K == 0:  # an empty sum: the epilogue of zeros
        return fp8_gemm_ref(a, a_scale, w, w_scale, bias, out_dtype, act, gate, residual, rows_per_batch)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    with on_device(dev):
        _fp8_gemm_kernel[grid](
            a, w, out, a_scale, w_scale,
            bias if bias is not None else out, gate if gate is not None else out,
            residual if residual is not None else out,
            M, N, K, rows_per_batch,
            a.stride(0), w.stride(0), out.stride(0), gate.stride(0) if gate is not None else 0,
            residual.stride(0) if residual is not None else 0,
            A_PER_ROW=a_scale.numel() > 1, W_PER_COL=w_scale.numel() > 1, HAS_BIAS=bias is not None, ACT=act,
            HAS_GATE=gate is not None, HAS_RES=residual is not None, ACC_MODE=acc_mode,
        )
    return out


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
