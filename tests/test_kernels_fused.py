"""The kernels of the fused fast path (minisd35/fast.py) against their plain-torch references, on the CPU through
the Triton interpreter, plus an ahead-of-time compile of each for the GPU: qk_norm_split (QK RMSNorm + head split
into the attention buffers), gelu_quant (GELU + per-token FP8), the weight-only GEMM's large-M route
(dequant_weight + F.linear) and the FP8 GEMM's accumulation variants.

Shapes are small and odd (L = 5 and 7 tokens, 3 heads, hd 16 / 24 / 64, rows that are not multiples of the CPU
block sizes). See test_kernels.py for how the interpreter is set up and where it is not faithful to the GPU."""

import importlib
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

if not torch.cuda.is_available():  # on a GPU machine leave the env alone: other tests there want compiled kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from kernels import _common, fp8_dequant_gemm, fp8_gemm, fp8_quant, gelu_quant, qk_norm  # noqa: E402
from minisd35.errors import InputError  # noqa: E402


def _interpreted(kernel) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    while kernel is not None:
        if isinstance(kernel, InterpretedFunction):
            return True
        kernel = getattr(kernel, "fn", None)
    return False


if _common.interpreting() and not _interpreted(qk_norm._qk_norm_kernel):  # imported earlier without the interpreter
    for _m in (_common, fp8_quant, fp8_gemm, fp8_dequant_gemm, gelu_quant, qk_norm):
        importlib.reload(_m)

if _common.interpreting():
    DEV = "cpu"
elif torch.cuda.is_available():
    DEV = "cuda"
else:
    pytest.skip("TRITON_INTERPRET=0 and no CUDA GPU: nothing can run the kernels", allow_module_level=True)

from kernels._common import rel_rms  # noqa: E402
from kernels.fp8_dequant_gemm import DEQUANT_ROUTE_MIN_M, dequant_gemm, dequant_gemm_ref, dequant_weight  # noqa: E402
from kernels.fp8_quant import quant_fp8_ref  # noqa: E402
from kernels.gelu_quant import gelu_quant as gq  # noqa: E402
from kernels.gelu_quant import gelu_quant_ref  # noqa: E402
from kernels.qk_norm import qk_norm_split, qk_norm_split_ref  # noqa: E402
from minisd35 import fast, mmdit  # noqa: E402

E4M3 = torch.float8_e4m3fn


def randn(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEV)


def codes(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8).cpu()


# ---------------------------------------------------------------------------------------------------------------
# qk_norm_split


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of b's last place, in b's dtype (0 where equal)."""
    eps = torch.finfo(b.dtype).eps
    return (a.double() - b.double()).abs() / (b.double().abs().clamp_min(1e-30) * eps)


QK_CASES = [  # (B, L, heads, hd, Ltot, offset)
    (2, 5, 3, 16, 12, 0),  # image-like stream at the front of the buffers
    (2, 7, 3, 64, 12, 5),  # text-like stream after it
    (1, 5, 3, 24, 5, 0),  # hd not a power of two; MMDiT-X attn2: the buffers hold this stream only
]


@pytest.mark.parametrize("B,L,heads,hd,Ltot,offset", QK_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("weights", ["bf16", "fp32", "none", "mixed"])
def test_qk_norm_split_matches_the_model(B, L, heads, hd, Ltot, offset, dtype, weights):
    qkv = randn(B * L, 3 * heads * hd, dtype=dtype, scale=2.0, seed=B * L * hd) + 0.3
    wdt = {"bf16": torch.bfloat16, "fp32": torch.float32, "none": None, "mixed": torch.bfloat16}[weights]
    wq = None if wdt is None else (randn(hd, seed=1).abs() + 0.5).to(wdt)
    wk = None if wdt is None or weights == "mixed" else (randn(hd, seed=2).abs() + 0.5).to(wdt)
    fill = 7.0  # positions outside offset .. offset+L must keep it
    out = [torch.full((B, heads, Ltot, hd), fill, dtype=dtype, device=DEV) for _ in range(3)]
    ref = [t.clone() for t in out]
    qk_norm_split(qkv, B, L, heads, hd, wq, wk, 1e-6, *out, offset)
    qk_norm_split_ref(qkv, B, L, heads, hd, wq, wk, 1e-6, *ref, offset)

    # the reference is what fast.py's fallback does with the model's own modules (mmdit.RMSNorm / Identity)
    def module(w):
        if w is None:
            return nn.Identity()
        m = mmdit.RMSNorm(hd, eps=1e-6).to(DEV)
        m.weight = nn.Parameter(w.clone(), requires_grad=False)
        return m

    model = [torch.full_like(t, fill) for t in out]
    with torch.no_grad():
        fast.qk_norm_split(qkv, B, L, heads, hd, module(wq), module(wk), *model, offset)
    for r, m in zip(ref, model):
        assert torch.equal(r, m)

    for name, a, r, w in zip("qkv", out, ref, (wq, wk, None)):
        outside = torch.ones(Ltot, dtype=torch.bool)
        outside[offset : offset + L] = False
        assert (a[:, :, outside.to(DEV)] == fill).all(), name  # nothing written outside the stream's positions
        if w is None:
            assert torch.equal(a, r), name  # a copy, bit for bit
            continue
        # the same roundings; only the order of the hd-term sum (and rsqrt's last bit) differ. In bf16 that moves
        # an output only on a rounding boundary, by one ulp; an fp32 output carries it in its last bits
        if a.dtype == torch.float32 and w.dtype == torch.float32:
            assert ulps_apart(a, r).max().item() <= 8, name
        else:
            assert (a != r).float().mean().item() < 0.01, name
            assert ulps_apart(a, r).max().item() <= 1.0 + 1e-9, name
    if wq is not None:  # and it is an RMS norm: rows of q / wq have unit RMS
        qn = out[0][:, :, offset : offset + L].double() / wq.double()
        assert (qn.pow(2).mean(-1).sqrt() - 1).abs().max().item() < 2e-2


def test_qk_norm_split_fp32_weight_with_bf16_activations_rounds_once():
    # fp32 weight: (y * w).to(bf16), one rounding; bf16 weight: two. Pick a case where they differ.
    B, L, heads, hd = 1, 7, 3, 64
    qkv = randn(B * L, 3 * heads * hd, dtype=torch.bfloat16, seed=3)
    w32 = randn(hd, seed=4).abs() + 0.37
    outs = {}
    for w in (w32, w32.bfloat16()):
        q, k, v = (torch.zeros(B, heads, L, hd, dtype=torch.bfloat16, device=DEV) for _ in range(3))
        qk_norm_split(qkv, B, L, heads, hd, w, None, 1e-6, q, k, v, 0)
        rq, rk, rv = (torch.zeros_like(q) for _ in range(3))
        qk_norm_split_ref(qkv, B, L, heads, hd, w, None, 1e-6, rq, rk, rv, 0)
        assert (q != rq).float().mean().item() < 0.01
        outs[w.dtype] = q
    assert not torch.equal(outs[torch.float32], outs[torch.bfloat16])


def test_qk_norm_split_rejects_bad_arguments():
    B, L, heads, hd = 2, 5, 3, 16
    qkv = randn(B * L, 3 * heads * hd, dtype=torch.bfloat16)
    bufs = [torch.empty(B, heads, 8, hd, dtype=torch.bfloat16, device=DEV) for _ in range(3)]
    with pytest.raises(InputError, match="offset"):
        qk_norm_split(qkv, B, L, heads, hd, None, None, 1e-6, *bufs, 4)  # 4 + 5 > 8
    with pytest.raises(InputError, match="qkv has shape"):
        qk_norm_split(qkv, B, L, heads + 1, hd, None, None, 1e-6, *bufs, 0)
    with pytest.raises(InputError, match="wq"):
        qk_norm_split(qkv, B, L, heads, hd, torch.ones(hd + 1, device=DEV), None, 1e-6, *bufs, 0)
    with pytest.raises(InputError, match="contiguous"):
        qk_norm_split(qkv, B, L, heads, hd, None, None, 1e-6, bufs[0].transpose(1, 2).contiguous().transpose(1, 2),
                      *bufs[1:], 0)


# ---------------------------------------------------------------------------------------------------------------
# gelu_quant


def check_gelu_quant(h: torch.Tensor):
    q, s = gq(h)
    qr, sr = gelu_quant_ref(h)
    assert q.dtype == E4M3 and q.shape == h.shape and s.shape == (h.shape[0],) and s.dtype == torch.float32
    if h.dtype == torch.float32:  # no rounding of GELU's output: the scales carry its last-bit differences
        assert rel_rms(s, sr) < 1e-6
    else:  # the row maximum rounded to bf16 / fp16: the same value
        assert torch.equal(s, sr)
    # GELU as x * sigmoid(2u) vs torch's 0.5 x (1 + tanh(u)): a few fp32 ulps apart, so a code may flip only where
    # the bf16 value sits on a rounding boundary
    assert (codes(q) != codes(qr)).float().mean().item() < 0.005
    assert rel_rms(q.float() * s[:, None], qr.float() * sr[:, None]) < 1e-3
    return q, s


@pytest.mark.parametrize("M,N", [(1, 72), (3, 100), (5, 300), (2, 64)])  # N = 64: no tail step
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gelu_quant_matches_ref(M, N, dtype):
    h = randn(M, N, dtype=dtype, scale=2.0, seed=M * N)
    q, s = check_gelu_quant(h)
    # and against GELU in float64: every element within half an E4M3 step (2**-4 relative) plus the subnormal floor
    g = F.gelu(h.double(), approximate="tanh")
    assert ((q.double() * s[:, None] - g).abs() <= g.abs() * 2**-4 + s.double()[:, None] * 2**-9 * 1.01).all()


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2")  # the interpreter's numpy; the GPU's ex2 gives inf
def test_gelu_quant_rows_whose_max_is_not_the_largest_gelu():
    # pass 1 takes max|GELU| from the row's largest input; rows where a negative input gives the largest |GELU|
    # (all negative, a small maximum, the GELU minimum at x = -0.75) take the element-by-element pass
    N = 100
    h = randn(6, N, scale=0.2, seed=5)
    h[0] = -h[0].abs() - 0.1  # all negative
    h[1, :] = -0.7518  # the GELU minimum, and a small positive maximum
    h[1, 7] = 0.05
    h[2] = h[2].clamp(max=0.25)  # GELU(0.25) = 0.149 < 0.17 = |GELU(-0.75)| but no input near -0.75
    h[3] = 0.0  # zero row: the scale floor
    h[4, 3] = -0.75  # GELU(max) is large enough here: the fast path
    h[4, 50] = 3.0
    h[5] = randn(N, scale=30.0, seed=6)  # exp overflow: GELU(-60) = -0, GELU(60) = 60
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        q, s = check_gelu_quant(h.to(dtype))
        assert s[3].item() == pytest.approx(1e-12 / 448.0, rel=1e-6) and (q[3].float() == 0).all()
        assert not q.float().isnan().any()


def test_gelu_quant_strided_rows():
    h = randn(5, 200, dtype=torch.bfloat16, seed=7)[:, 30:130]
    assert h.stride(0) == 200
    q, s = gq(h)
    qr, sr = gq(h.contiguous())
    assert torch.equal(codes(q), codes(qr)) and torch.equal(s, sr)


# ---------------------------------------------------------------------------------------------------------------
# weight-only GEMM: dequant_weight and the large-M route


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("bitcast", [False, True])
def test_dequant_weight_bit_exact(dtype, per_channel, bitcast):
    w, sw = quant_fp8_ref(randn(37, 50, scale=0.05, seed=8), per_token=per_channel)
    table = torch.arange(256, dtype=torch.uint8)
    w[0, :] = table[(table & 0x7F) != 0x7F][:50].view(E4M3).to(DEV)  # a row of assorted codes, subnormals too
    out = dequant_weight(w.view(torch.uint8) if bitcast else w, sw, dtype, bitcast=bitcast)
    expect = (w.float() * (sw[:, None] if per_channel else sw)).to(dtype)
    assert out.dtype == dtype and torch.equal(out, expect)


def test_dequant_route_is_the_reference_linear():
    # the large-M route is exactly fp8.py's ref / torch w8-only path: F.linear on the dequantised weight
    K, N = 72, 40
    w, sw = quant_fp8_ref(randn(N, K, scale=0.05, seed=9))
    bias = randn(N, dtype=torch.float32, seed=10)
    for M in (3, DEQUANT_ROUTE_MIN_M):
        x = randn(M, K, dtype=torch.bfloat16, seed=M)
        want = F.linear(x, (w.float() * sw[:, None]).to(x.dtype), bias.to(x.dtype))
        assert torch.equal(dequant_gemm(x, w, sw, bias, route="dequant"), want)
        assert rel_rms(dequant_gemm(x, w, sw, bias, route="dequant"), dequant_gemm_ref(x, w, sw, bias)) < 1e-2
    assert torch.equal(dequant_gemm(x, w, sw, bias), want)  # "auto" at M = DEQUANT_ROUTE_MIN_M: this route
    x = randn(67, K, dtype=torch.float16, seed=11)
    assert torch.equal(dequant_gemm(x, w, sw, bias), dequant_gemm(x, w, sw, bias, route="fused"))  # below: fused
    with pytest.raises(InputError, match="route"):
        dequant_gemm(x, w, sw, route="cublas")
    with pytest.raises(InputError, match="w must be"):
        dequant_gemm(x, w[:, :64], sw, route="dequant")
