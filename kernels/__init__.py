"""Triton kernels for minisd35's FP8 paths. One kernel per file; each file carries its own torch reference and a
`__main__` that checks against it first and benchmarks second (`python -m kernels.fp8_gemm`, or with
TRITON_INTERPRET=1 on a CPU). bench/kernels_gpu.py runs all of them on a GPU and writes one JSON.

    fp8_quant.py         quant_fp8(x, per_token=True, scale=None) -> (x_fp8, scale)       activations -> E4M3
                         (x [M, K], or a [B, L, K] / [B, L, H, hd] view read in place)
    fp8_gemm.py          fp8_gemm(a, a_scale, w, w_scale, bias, out_dtype, act, gate, residual, rows_per_batch,
                         fast_accum, variant) -> out                                      W8A8 GEMM + epilogue
                         (variant: "default" | "add" | "tma" | "persistent"; "ws" = TMA + warp specialisation
                         deadlocks with Triton 3.6 on an H200 and is refused on a GPU)
                         scaled_mm(a, a_scale, w, w_scale, bias, out_dtype, fast_accum)   the torch._scaled_mm path
    fp8_gemm_gluon.py    fp8_gemm_gluon(a, a_scale, w, w_scale, bias, out_dtype, act, gate, residual,
                         rows_per_batch) -> out     the same, precise accumulation, in Gluon (Hopper): async wgmma
                         into two alternating partials, so the promotion adds overlap the next tile's MMAs
    fp8_dequant_gemm.py  dequant_gemm(x, w, w_scale, bias, bitcast=None, route="auto") -> y   weight-only FP8
                         (any GPU; M <= 4 picks the faster of two GEMV kernels on its first call per layer shape;
                         from M = 512 on: dequant_weight(w, w_scale, dtype) + F.linear, i.e. cuBLAS)
    ln_mod_quant.py      ln_mod_quant(x, shift, scale, rows_per_batch, eps) -> (y_fp8, y_scale), ln_mod(...) -> y
    qk_norm.py           qk_norm_split(qkv, B, L, heads, hd, wq, wk, eps, q, k, v, offset, q_scale, k_scale)
                         QK RMSNorm + head split into the attention buffers (bf16, or E4M3 q / k)
    gelu_quant.py        gelu_quant(h) -> (h8, scale)                                     GELU(tanh) + per-token FP8
    gated_residual.py    gated_residual(y, gate, residual, rows_per_batch) -> out         residual + gate[b] * y
    fp8_attention.py     attention(q, k, v, q_scale, k_scale, v_scale, v_transposed, variant) -> out    fused
                         softmax(q k^T / sqrt(hd)) v, bf16 or E4M3 q / k and v (E4M3 v stored transposed:
                         v_fp8_transposed(v) -> (vt, scale)); variant "ptr" | "tma" | "ws" (Hopper)
Every one has a `*_ref` twin in plain torch with the same semantics. Conventions (scale = dequant multiplier,
amax / 448, clamp before every cast) are in _common.py.

Nothing here is imported unless triton is installed; `HAS_TRITON` says whether it is. Kernels run on CUDA tensors,
or on CPU tensors when TRITON_INTERPRET=1 was set before the kernel modules were first imported. Every kernel
autotunes (times its configs) on its first call for a layer shape: make that call before capturing a CUDA graph."""

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # CPU-only installs: minisd35 runs its plain-torch reference paths
    HAS_TRITON = False
