"""The adaLN gated residual of an MMDiT block, out = residual + gate[b] * y, in one pass: what follows every proj and
fc2 GEMM whose epilogue cannot do it (torch._scaled_mm, cuBLAS).

    y [M, N]          the GEMM output (bf16), M = B * rows_per_batch, row stride free
    residual [M, N]   the block's input stream (row stride free)
    gate [B, N]       this stream's gate chunk of the adaLN output (a strided view of it is fine)
    out [M, N]        residual + gate[m // rows_per_batch] * y, contiguous, in y's dtype

computed in fp32 with one rounding at the store, as torch.addcmul(residual, gate[:, None], y) does (its opmath
is fp32 for bf16). Why a kernel for three flops per element: torch's addcmul broadcasts gate over the rows, which
drops it off its vectorised path onto the generic strided TensorIterator loop (elementwise_kernel<128, 4>). In one
SD3.5 Large FP8 step on an H200 (torch.profiler, bench/results/2026-12-02_h200_session8) its 150 calls took
5.51 ms of GPU time; this kernel's take 2.46-2.53 ms. It is a plain tiled elementwise kernel: [BLOCK_M, BLOCK_N]
tiles, 16-byte accesses, the gate row of a tile read once per row and kept in L1/L2. Memory-bound at 3 * M * N * 2
bytes; its figure of merit is GB/s against a device-to-device copy. (Its `__main__` times eager calls with
do_bench, where a ~25 us kernel is bound by Triton's host-side launch cost: there it looks slower than addcmul.
Inside the step, which is one CUDA graph, only the GPU time counts.)

Out of place on purpose: the autotuner times every config on the real arguments, and an in-place update would
apply the residual once per timing run.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # `python kernels/gated_residual.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import triton
import triton.language as tl

from kernels._common import (
    TL_DTYPES,
    check_device,
    check_tensor,
    interpreting,
    on_device,
    pick_configs,
    round_to,
    tune_bench,
)
from minisd35.errors import InputError


def _cfg(bm: int, bn: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps)


# 8-32 values per thread per operand: enough loads in flight to cover DRAM latency without spilling
GR_CONFIGS = [_cfg(8, 256, 4), _cfg(16, 256, 8), _cfg(4, 512, 4), _cfg(8, 512, 8), _cfg(2, 1024, 4),
              _cfg(4, 1024, 8)]
CPU_CONFIGS = [_cfg(4, 32, 1)]  # the interpreter: small tiles, so odd shapes have partial tiles in both dims


@triton.autotune(do_bench=tune_bench, configs=pick_configs(GR_CONFIGS, CPU_CONFIGS), key=["N"])
@triton.jit
def _gated_residual_kernel(
    y_ptr, gate_ptr, res_ptr, out_ptr,
    M, N, rows_per_batch, stride_ym, stride_gb, stride_rm,
    OUT_DT: tl.constexpr, ROUND_FIRST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    y = tl.load(y_ptr + r64 * stride_ym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    res = tl.load(res_ptr + r64 * stride_rm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    b = (rows // rows_per_batch)[:, None]  # the sample of each row: its gate row
    g = tl.load(gate_ptr + b * stride_gb + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    # round_to: the interpreter's fp32 -> bf16 cast truncates, so there the rounding is done on the bits first
    tl.store(out_ptr + r64 * N + cols[None, :], round_to(res + g * y, OUT_DT, ROUND_FIRST).to(OUT_DT), mask=mask)


def gated_residual(y: torch.Tensor, gate: torch.Tensor, residual: torch.Tensor, rows_per_batch: int) -> torch.Tensor:
    """residual + gate[m // rows_per_batch] * y for y, residual [M, N] and gate [B, N]; a new [M, N] tensor."""
    fn = "gated_residual"
    floats = (torch.bfloat16, torch.float16, torch.float32)
    for name, t in (("y", y), ("gate", gate), ("residual", residual)):
        check_tensor(fn, name, t, floats, ndim=2)
    M, N = y.shape
    B = gate.shape[0]
    if residual.shape != y.shape or gate.shape[1] != N:
        raise InputError(f"{fn}: y {tuple(y.shape)}, residual {tuple(residual.shape)} and gate {tuple(gate.shape)} "
                         f"must be [M, N], [M, N] and [B, N]")
    if not isinstance(rows_per_batch, int) or rows_per_batch <= 0 or B * rows_per_batch != M:
        raise InputError(f"{fn}: y has M={M} rows but gate has B={B} rows and rows_per_batch={rows_per_batch}; "
                         f"M must equal B * rows_per_batch (tokens per sample)")
    dev = check_device(fn, y, gate, residual, fp8=False)
    out = torch.empty((M, N), dtype=y.dtype, device=dev)
    if M == 0 or N == 0:
        return out
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))
    with on_device(dev):
        _gated_residual_kernel[grid](y, gate, residual, out, M, N, rows_per_batch, y.stride(0), gate.stride(0),
                                     residual.stride(0), OUT_DT=TL_DTYPES[y.dtype], ROUND_FIRST=interpreting())
    return out


def gated_residual_ref(y: torch.Tensor, gate: torch.Tensor, residual: torch.Tensor, rows_per_batch: int
                       ) -> torch.Tensor:
    """Plain torch, what the model computes: residual + gate[:, None] * y per sample, as one addcmul."""
    B, N = gate.shape
    return torch.addcmul(residual.reshape(B, rows_per_batch, N), gate[:, None], y.reshape(B, rows_per_batch, N)
                         ).reshape(B * rows_per_batch, N)


if __name__ == "__main__":
    from kernels._common import bench_ms, check_line, print_table, rel_rms

    if not torch.cuda.is_available() and not interpreting():
        sys.exit("needs a CUDA GPU, or TRITON_INTERPRET=1 to run the check on the CPU")
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    # (B, rows, N): SD3.5 Large image and text streams, Medium's image stream
    cases = [(2, 4096, 2432), (2, 333, 2432), (2, 4096, 1536)] if dev == "cuda" else [(2, 5, 72), (3, 7, 100)]
    torch.manual_seed(0)
    rows = []
    for B, L, N in cases:
        y = torch.randn(B * L, N, device=dev, dtype=torch.bfloat16)
        res = torch.randn(B * L, N, device=dev, dtype=torch.bfloat16) * 4
        gate = (torch.randn(B, 6 * N, device=dev, dtype=torch.bfloat16))[:, 2 * N : 3 * N]  # a strided chunk
        check_line(f"gated_residual B={B} L={L} N={N}",
                   rel_rms(gated_residual(y, gate, res, L), gated_residual_ref(y, gate, res, L)), 1e-3)
        if dev == "cpu":
            continue
        moved = 3 * y.numel() * 2
        copy_ms = bench_ms(lambda: torch.empty_like(y).copy_(y))[0]
        for impl, f in [("triton", lambda: gated_residual(y, gate, res, L)),
                        ("torch addcmul", lambda: gated_residual_ref(y, gate, res, L))]:
            ms = bench_ms(f)[0]
            rows.append({"B": B, "L": L, "N": N, "impl": impl, "ms": ms, "GB/s": moved / ms * 1e-6,
                         "copy GB/s": 2 * y.numel() * 2 / copy_ms * 1e-6})
    if rows:
        print_table(rows, ["B", "L", "N", "impl", "ms", "GB/s", "copy GB/s"])
