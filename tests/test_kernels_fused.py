"""The kernels of the fused fast path (minisd35/fast.py) against their plain-torch references, on the CPU through
the Triton interpreter, plus an ahead-of-time compile of each for the GPU: qk_norm_split (QK RMSNorm + head split
into the attention buffers), gelu_quant (GELU + per-token FP8), the weight-only GEMM's large-M route
(dequant_weight + F.linear) and the FP8 GEMM's accumulation variants.

Shapes are small and odd (L = 5 and 7 tokens, 3 heads, hd 16 / 24 / 64, rows that are not multiples of the CPU
block sizes). See kernel_env.py for how the interpreter is set up and test_kernels.py for where it is not
faithful to the GPU."""

import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_env import E4M3, codes, kernel_device, randn, run_aot
from torch import nn

from kernels import fp8_dequant_gemm, fp8_gemm, fp8_quant, gated_residual, gelu_quant, qk_norm  # noqa: E402
from minisd35.errors import InputError  # noqa: E402

DEV = kernel_device((fp8_quant, fp8_gemm, fp8_dequant_gemm, gated_residual, gelu_quant, qk_norm),
                    qk_norm._qk_norm_kernel)

from kernels._common import rel_rms  # noqa: E402
from kernels.fp8_dequant_gemm import DEQUANT_ROUTE_MIN_M, dequant_gemm, dequant_gemm_ref, dequant_weight  # noqa: E402
from kernels.fp8_quant import quant_fp8_ref  # noqa: E402
from kernels.gelu_quant import gelu_quant as gq  # noqa: E402
from kernels.gelu_quant import gelu_quant_ref  # noqa: E402
from kernels.qk_norm import qk_norm_split, qk_norm_split_ref  # noqa: E402
from minisd35 import fast, mmdit  # noqa: E402

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


def attention_buffer(B: int, heads: int, Ltot: int, hd: int, fill: float, dtype, layout: str) -> torch.Tensor:
    """[B, heads, Ltot, hd] filled with `fill`: contiguous, or a view of [B, Ltot, heads, hd] memory (fast.py's)."""
    if layout == "bhld":
        return torch.full((B, heads, Ltot, hd), fill, dtype=dtype, device=DEV)
    return torch.full((B, Ltot, heads, hd), fill, dtype=dtype, device=DEV).transpose(1, 2)


@pytest.mark.parametrize("B,L,heads,hd,Ltot,offset", QK_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("weights", ["bf16", "fp32", "none", "mixed"])
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_qk_norm_split_matches_the_model(B, L, heads, hd, Ltot, offset, dtype, weights, layout):
    qkv = randn(B * L, 3 * heads * hd, dtype=dtype, scale=2.0, seed=B * L * hd) + 0.3
    wdt = {"bf16": torch.bfloat16, "fp32": torch.float32, "none": None, "mixed": torch.bfloat16}[weights]
    wq = None if wdt is None else (randn(hd, seed=1).abs() + 0.5).to(wdt)
    wk = None if wdt is None or weights == "mixed" else (randn(hd, seed=2).abs() + 0.5).to(wdt)
    fill = 7.0  # positions outside offset .. offset+L must keep it
    out = [attention_buffer(B, heads, Ltot, hd, fill, dtype, layout) for _ in range(3)]
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
    with pytest.raises(InputError, match="share one layout"):  # each layout is fine alone, not mixed
        qk_norm_split(qkv, B, L, heads, hd, None, None, 1e-6, bufs[0].transpose(1, 2).contiguous().transpose(1, 2),
                      *bufs[1:], 0)
    with pytest.raises(InputError, match="contiguous last"):
        qk_norm_split(qkv, B, L, heads, hd, None, None, 1e-6, *(b.transpose(2, 3).contiguous().transpose(2, 3)
                                                                 for b in bufs), 0)


# ---------------------------------------------------------------------------------------------------------------
# gated_residual


@pytest.mark.parametrize("B,L,N", [(2, 5, 72), (3, 7, 100), (1, 1, 33)])
def test_gated_residual_is_the_models_addcmul(B, L, N):
    # y and the residual as column slices (row stride != N), the gate a strided chunk of an adaLN output
    y = randn(B * L, N + 9, dtype=torch.bfloat16, seed=B * N)[:, 4 : 4 + N]
    res = randn(B * L, N + 3, dtype=torch.bfloat16, scale=4.0, seed=B * N + 1)[:, :N]
    gate = randn(B, 6 * N, dtype=torch.bfloat16, seed=B * N + 2)[:, 2 * N : 3 * N]
    out = gated_residual.gated_residual(y, gate, res, L)
    ref = gated_residual.gated_residual_ref(y, gate, res, L)
    by_hand = (res.double().view(B, L, N) + gate.double()[:, None] * y.double().view(B, L, N)).view(B * L, N)
    assert out.is_contiguous() and out.dtype == torch.bfloat16
    assert rel_rms(out, by_hand) < 4e-3  # one bf16 rounding of the exact value
    # fp32 inside, one rounding at the end, as addcmul: equal but where a different fp32 contraction crosses a
    # bf16 rounding boundary (one ulp)
    assert (out != ref).float().mean().item() < 0.01
    assert ulps_apart(out, ref).max().item() <= 1.0 + 1e-9
    # the gate is per sample: sample 0's rows do not see sample 1's gate
    if B > 1:
        g2 = gate.clone()
        g2[1:] = 0
        assert torch.equal(gated_residual.gated_residual(y, g2, res, L)[:L], out[:L])
        assert torch.equal(gated_residual.gated_residual(y, g2, res, L)[L:], res[L:])


def test_gated_residual_rejects_bad_arguments():
    y = randn(10, 8, dtype=torch.bfloat16)
    with pytest.raises(InputError, match="rows_per_batch"):
        gated_residual.gated_residual(y, randn(3, 8, dtype=torch.bfloat16), y, 5)
    with pytest.raises(InputError, match="must be"):
        gated_residual.gated_residual(y, randn(2, 9, dtype=torch.bfloat16), y, 5)


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


# ---------------------------------------------------------------------------------------------------------------
# fp8_gemm variants (TMA descriptors, warp specialisation): the same product and epilogue as the default kernel


@pytest.mark.parametrize("variant", ["tma", "ws", "add", "persistent"])
@pytest.mark.parametrize("M,K,N", [(67, 96, 40), (3, 64, 48)])  # M and N tails; K a multiple of 16 (TMA rows)
def test_fp8_gemm_variants_match_ref(variant, M, K, N):
    from kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref

    B, L = (1, M) if M % 2 else (2, M // 2)
    a, sa = quant_fp8_ref(randn(M, K, seed=M + K))
    w, sw = quant_fp8_ref(randn(N, K, scale=0.05, seed=12))
    bias = randn(N, dtype=torch.bfloat16, seed=13)
    gate, res = randn(B, N, dtype=torch.bfloat16, seed=14), randn(M, N, seed=15)
    for kw in ({}, {"act": "gelu_tanh", "gate": gate, "residual": res, "rows_per_batch": L}):
        ref = fp8_gemm_ref(a, sa, w, sw, bias, out_dtype=torch.float32, **kw)
        for fast_accum in (False, True):
            out = fp8_gemm(a, sa, w, sw, bias, out_dtype=torch.float32, fast_accum=fast_accum, variant=variant, **kw)
            assert out.shape == (M, N) and rel_rms(out, ref) < 1e-5, (kw.keys(), fast_accum)
    sa1, sw1 = sa.amax().reshape(1), sw.amax().reshape(1)  # per-tensor scales
    out = fp8_gemm(a, sa1, w, sw1, out_dtype=torch.float32, variant=variant)
    assert rel_rms(out, fp8_gemm_ref(a, sa1, w, sw1, out_dtype=torch.float32)) < 1e-5


def test_fp8_gemm_gluon_arguments():
    # the Gluon GEMM (Hopper only, no interpreter) checks its inputs before anything else, and refuses a CPU
    pytest.importorskip("triton.experimental.gluon")
    from kernels.fp8_gemm_gluon import fp8_gemm_gluon
    from minisd35.errors import HardwareError

    a, sa = quant_fp8_ref(randn(5, 72, seed=16))
    w, sw = quant_fp8_ref(randn(40, 72, scale=0.05, seed=17))
    with pytest.raises(InputError, match="K % 16"):
        fp8_gemm_gluon(a, sa, w, sw)
    with pytest.raises(InputError, match="w must be"):
        fp8_gemm_gluon(a, sa, w[:, :64].contiguous(), sw)
    a, sa = quant_fp8_ref(randn(5, 64, seed=16))
    w, sw = quant_fp8_ref(randn(40, 64, scale=0.05, seed=17))
    with pytest.raises(InputError, match="act"):
        fp8_gemm_gluon(a, sa, w, sw, act="relu")
    with pytest.raises(HardwareError, match="Hopper"):
        fp8_gemm_gluon(a, sa, w, sw)


@settings(max_examples=300, deadline=None)
@given(tiles=st.integers(1, 6000), k_tiles=st.integers(1, 100), programs=st.integers(1, 160),
       max_splits=st.one_of(st.none(), st.integers(1, 40)))
def test_gluon_split_schedule_covers_every_k_tile_once(tiles, k_tiles, programs, max_splits):
    # the Gluon WS GEMM's persistent schedule (kernels/fp8_gemm_gluon.split_schedule), walked as the kernel's
    # _ws_item walks it: program p takes items p, p + grid, ...; item i < dp_tiles is tile i whole, the others are
    # tail tile dp_tiles + u // splits, K tiles [c * k_chunk, ...) with c = u % splits (c = 0: the owner, which
    # waits for the rest). Every K tile of every output tile is done exactly once; all programs do the same whole
    # tiles and then at most one tail item (so an owner waits only for items that are already running); and the
    # busiest program does no more K tiles than without the split
    pytest.importorskip("triton.experimental.gluon")
    from kernels.fp8_gemm_gluon import split_schedule

    grid, dp, splits, kc = split_schedule(tiles, k_tiles, programs, max_splits)
    assert 1 <= grid <= programs and 0 <= dp <= tiles and splits >= 1
    done, work, owners = {}, [], {}
    n_items = dp + (tiles - dp) * splits
    for p in range(grid):
        mine = list(range(p, n_items, grid))
        assert sum(i >= dp for i in mine) <= 1 and all(i < dp for i in mine[:-1])
        ks = 0
        for i in mine:
            if i < dp:
                tile, k0, nk = i, 0, k_tiles
            else:
                u = i - dp
                tile, c = dp + u // splits, u % splits
                k0 = c * kc
                nk = min(k_tiles - k0, kc)
                assert nk >= 1
                owners[tile] = owners.get(tile, 0) + (c == 0)
            for k in range(k0, k0 + nk):
                done[(tile, k)] = done.get((tile, k), 0) + 1
            ks += nk
        work.append(ks)
    assert len(done) == tiles * k_tiles and set(done.values()) == {1}
    if splits > 1:
        assert dp % grid == 0 and len({len(range(p, dp, grid)) for p in range(grid)}) == 1
        assert set(owners.values()) == {1} and len(owners) == tiles - dp and (tiles - dp) * splits <= grid
    assert max(work) <= -(-tiles // min(tiles, programs)) * k_tiles


def test_gluon_split_schedule_on_the_large_layers():
    # SD3.5 Large at M = 8858 on 132 SMs, by hand: proj / fc2 have 70 x 19 = 1330 tiles, 10 full waves and 10 left;
    # proj's 19 K tiles -> at most round(sqrt(38)) = 6 splits -> chunks of 4 -> 5 items (4, 4, 4, 4, 3); fc2's 76
    # -> 12 -> chunks of 7 -> 11 items. qkv (3990 tiles, 30 left) splits 4 ways, fc1 (5320, 40 left) 3 ways; a
    # tail over half a wave, or splitting switched off, leaves the plain round-robin
    pytest.importorskip("triton.experimental.gluon")
    from kernels.fp8_gemm_gluon import split_schedule

    assert split_schedule(1330, 19, 132) == (132, 1320, 5, 4)
    assert split_schedule(1330, 76, 132) == (132, 1320, 11, 7)
    assert split_schedule(3990, 19, 132) == (132, 3960, 4, 5)
    assert split_schedule(5320, 19, 132) == (132, 5280, 3, 7)
    assert split_schedule(1330, 19, 132, split=False) == (132, 1330, 1, 19)
    assert split_schedule(200, 19, 132) == (132, 200, 1, 19)  # 68 left: more than half a wave
    assert split_schedule(3, 19, 132) == (15, 0, 5, 4)  # fewer tiles than SMs: split-K


def test_fp8_gemm_variant_arguments():
    from kernels.fp8_gemm import _prune_tma, fp8_gemm

    a, sa = quant_fp8_ref(randn(5, 72, seed=16))
    w, sw = quant_fp8_ref(randn(40, 72, scale=0.05, seed=17))
    with pytest.raises(InputError, match="16-byte"):
        fp8_gemm(a, sa, w, sw, variant="ws")  # K = 72: rows are not 16-byte aligned for TMA
    with pytest.raises(InputError, match="variant"):
        fp8_gemm(a, sa, w, sw, variant="pingpong")
    # the configs that spill on sm90 (see the compile test) are pruned: precise 128 x 256, fused epilogues on big tiles
    cfgs = fp8_gemm.__globals__["WS_CONFIGS"]
    shapes = lambda kept: {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept}
    base = {"ACT": "none", "HAS_GATE": False, "HAS_RES": False, "WARP_SPEC": True}
    assert shapes(_prune_tma(cfgs, {**base, "ACC_MODE": 2})) == {(128, 128), (256, 128)}
    assert shapes(_prune_tma(cfgs, {**base, "ACC_MODE": 0})) == {(128, 128), (256, 128), (128, 256)}
    assert shapes(_prune_tma(cfgs, {**base, "ACC_MODE": 0, "HAS_RES": True})) == {(128, 128)}
    assert shapes(_prune_tma(cfgs, {**base, "ACC_MODE": 2, "WARP_SPEC": False})) == {(128, 128)}


# ---------------------------------------------------------------------------------------------------------------
# the compiled GPU path, without a GPU (as in test_kernels.py): Triton's compiler and bundled ptxas build each new
# kernel for Hopper (sm90) and, where it applies, Ampere (sm80). Checked in the PTX / SASS: what the interpreter
# cannot see (vectorised 16-byte accesses of the memory-bound kernels, no contraction where torch rounds twice,
# the saturating E4M3 conversion the GELU kernel relies on instead of a clamp, the warp-specialised GEMM really
# being split into producer and consumers, no register spills).

_AOT_SCRIPT = r'''
qk_sig = {"qkv_ptr": "*bf16", "wq_ptr": "*bf16", "wk_ptr": "*bf16", "q_ptr": "*bf16", "k_ptr": "*bf16",
          "vmax_ptr": "*fp32", "v_ptr": "*bf16", "L": "i32", "heads": "i32", "offset": "i32", "vmax_stride": "i32",
          "stride_row": "i32", "stride_ob": "i32", "stride_oh": "i32", "stride_ol": "i32", "eps": "fp32",
          "q_inv": "fp32", "k_inv": "fp32"}
qk = dict(HD=64, BLOCK_D=64, WQ_DT=tl.bfloat16, WK_DT=tl.bfloat16, X_DT=tl.bfloat16, O_DT=tl.bfloat16,
          ROUND_FIRST=False, EVEN_D=True, HAS_VMAX=False)
for cfg in qk_norm.QK_CONFIGS[:2]:
    build(f"qk_norm bf16 weights {cfg.kwargs}", qk_norm._qk_norm_kernel, qk_sig,
          dict(qk, HAS_WQ=True, HAS_WK=True, WQ_LOWP=True, WK_LOWP=True), cfg=cfg, enable_fp_fusion=False)
build("qk_norm fp32 weights", qk_norm._qk_norm_kernel, {**qk_sig, "wq_ptr": "*fp32", "wk_ptr": "*fp32"},
      dict(qk, HAS_WQ=True, HAS_WK=True, WQ_LOWP=False, WK_LOWP=False, WQ_DT=tl.float32, WK_DT=tl.float32,
           BLOCK_L=32), warps=4, enable_fp_fusion=False)
build("qk_norm no weights", qk_norm._qk_norm_kernel, qk_sig, dict(qk, HAS_WQ=False, HAS_WK=False, WQ_LOWP=False,
      WK_LOWP=False, BLOCK_L=32), warps=4, enable_fp_fusion=False)
build("qk_norm e4m3 q/k", qk_norm._qk_norm_kernel, {**qk_sig, "q_ptr": "*fp8e4nv", "k_ptr": "*fp8e4nv"},
      dict(qk, HAS_WQ=True, HAS_WK=True, WQ_LOWP=True, WK_LOWP=True, O_DT=tl.float8e4nv, HAS_VMAX=True, BLOCK_L=32),
      warps=4, enable_fp_fusion=False)

g_sig = {"h_ptr": "*bf16", "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "M": "i32", "N": "i32", "stride_hm": "i32"}
for cfg in gelu_quant.GELU_CONFIGS[:3]:
    n_full = 9728 - 9728 % cfg.kwargs["BLOCK_N"]
    build(f"gelu_quant {cfg.kwargs} w{cfg.num_warps}", gelu_quant._gelu_quant_kernel, g_sig,
          dict(G_DT=tl.bfloat16, ROUND_FIRST=False, N_FULL=n_full), cfg=cfg)

# Ada (sm89): the E4M3 quantisers round to the grid in fp32 first (_common.round_first)
build("gelu_quant sm89 round first", gelu_quant._gelu_quant_kernel, g_sig,
      dict(G_DT=tl.bfloat16, ROUND_FIRST=True, N_FULL=9728, BLOCK_M=1, BLOCK_N=512), arch=89, warps=2)
build("quant sm89 round first", fp8_quant._quant_kernel, {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32",
      "amax_ptr": "*fp32", "M": "i32", "K": "i32", "L": "i32", "stride_xb": "i32", "stride_xm": "i32",
      "stride_xh": "i32"}, dict(MODE=0, ONE_TILE=True, ROUND_FIRST=True, HD=4096, BLOCK_M=1, BLOCK_K=4096), arch=89,
      warps=8)
build("ln_mod_quant sm89 round first", ln_mod_quant._ln_mod_kernel, {"x_ptr": "*bf16", "shift_ptr": "*bf16",
      "scale_ptr": "*bf16", "y_ptr": "*fp8e4nv", "y_scale_ptr": "*fp32", "M": "i32", "K": "i32",
      "rows_per_batch": "i32", "eps": "fp32", "stride_xm": "i32", "stride_shift": "i32", "stride_scale": "i32",
      "stride_ym": "i32"}, dict(QUANT=True, ROUND_FIRST=True, LN_DT=tl.bfloat16, T_DT=tl.bfloat16, U_DT=tl.bfloat16,
      Y_DT=tl.bfloat16, BLOCK_M=1, BLOCK_K=2048, BLOCK_K2=512, TAIL=True), arch=89, warps=8, enable_fp_fusion=False)

gr_sig = {"y_ptr": "*bf16", "gate_ptr": "*bf16", "res_ptr": "*bf16", "out_ptr": "*bf16", "M": "i32", "N": "i32",
          "rows_per_batch": "i32", "stride_ym": "i32", "stride_gb": "i32", "stride_rm": "i32"}
for cfg in gated_residual.GR_CONFIGS[:2]:
    build(f"gated_residual {cfg.kwargs}", gated_residual._gated_residual_kernel, gr_sig,
          dict(OUT_DT=tl.bfloat16, ROUND_FIRST=False), cfg=cfg)

dw_sig = {"w_ptr": "*fp8e4nv", "s_ptr": "*fp32", "out_ptr": "*bf16", "N": "i32", "K": "i32", "stride_wn": "i32",
          "stride_on": "i32"}
cfg = {k: v for k, v in fp8_dequant_gemm.DEQUANT_W_CONFIG.items() if k != "num_warps"}
build("dequant_weight", fp8_dequant_gemm._dequant_weight_kernel, dw_sig,
      dict(W_PER_COL=True, BITCAST=False, ROUND_FIRST=False, OUT_DT=tl.bfloat16, **cfg), warps=4)
build("dequant_weight sm80 bitcast fp16", fp8_dequant_gemm._dequant_weight_kernel,
      {**dw_sig, "w_ptr": "*u8", "out_ptr": "*fp16"},
      dict(W_PER_COL=False, BITCAST=True, ROUND_FIRST=False, OUT_DT=tl.float16, **cfg), arch=80, warps=4)

def gemm_sig(c):
    bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
    return {"a_desc": f"tensordesc<fp8e4nv[{bm}, {bk}]>", "w_desc": f"tensordesc<fp8e4nv[{bn}, {bk}]>",
            "out_ptr": "*bf16", "a_scale_ptr": "*fp32", "w_scale_ptr": "*fp32", "bias_ptr": "*bf16",
            "gate_ptr": "*bf16", "res_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "rows_per_batch": "i32",
            "stride_om": "i32", "stride_gb": "i32", "stride_rm": "i32"}
pick = lambda cfgs, bm, bn: next(c for c in cfgs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) == (bm, bn))
full = dict(ACT="gelu_tanh", HAS_GATE=True, HAS_RES=True)
plain = dict(ACT="none", HAS_GATE=False, HAS_RES=False)
for name, cfgs, ws, bm, bn, acc, epi in [
        ("ws precise 128x128 fused epilogue", fp8_gemm.WS_CONFIGS, True, 128, 128, 2, full),
        ("ws precise 256x128", fp8_gemm.WS_CONFIGS, True, 256, 128, 2, plain),
        ("ws fast 128x256", fp8_gemm.WS_CONFIGS, True, 128, 256, 0, plain),
        ("ws fast 128x128", fp8_gemm.WS_CONFIGS, True, 128, 128, 0, plain),
        ("tma precise 128x128 fused epilogue", fp8_gemm.TMA_CONFIGS, False, 128, 128, 2, full),
        ("tma fast 128x256", fp8_gemm.TMA_CONFIGS, False, 128, 256, 0, plain)]:
    c = pick(cfgs, bm, bn)
    build(f"gemm {name}", fp8_gemm._fp8_gemm_tma_body, gemm_sig(c), dict(A_PER_ROW=True, W_PER_COL=True,
          HAS_BIAS=True, ACC_MODE=acc, WARP_SPEC=ws, PROMOTE=min(c.kwargs["BLOCK_K"], 128), **epi), cfg=c)
if fp8_gemm_gluon is not None:  # the Gluon GEMM: descriptor types as its launcher spells them
    import torch
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type
    gcfg = dict(fp8_gemm_gluon.GLUON_CONFIGS[0])
    bm, bn, bk = gcfg["BLOCK_M"], gcfg["BLOCK_N"], gcfg["BLOCK_K"]
    t = torch.empty(256, 256, dtype=torch.float8_e4m3fn)
    desc = lambda r: mangle_type(TensorDescriptor(t, [256, 256], [256, 1], [r, bk],
                                                  gl.NVMMASharedLayout.get_default_for([r, bk], gl.float8e4nv)))
    build("gemm gluon precise", fp8_gemm_gluon._fp8_gemm_gluon_kernel,
          {"a_desc": desc(bm), "w_desc": desc(bn), "out_ptr": "*bf16", "a_scale_ptr": "*fp32", "w_scale_ptr": "*fp32",
           "bias_ptr": "*bf16", "gate_ptr": "*bf16", "res_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
           "rows_per_batch": "i32", "stride_om": "i32", "stride_gb": "i32", "stride_rm": "i32"},
          dict(A_PER_ROW=True, W_PER_COL=True, HAS_BIAS=True, ACT="gelu_tanh", HAS_GATE=True, HAS_RES=True,
               **gcfg), warps=gcfg["num_warps"])
    wcfg = dict(fp8_gemm_gluon.GLUON_WS_CONFIGS[0], TMA_STORE=True)  # the output stored by TMA, as for bf16
    maxnreg = wcfg.pop("maxnreg")
    o = torch.empty(256, 256, dtype=torch.bfloat16)
    box = [wcfg["BLOCK_M"], wcfg["BLOCK_N"]]
    out_desc = mangle_type(TensorDescriptor(o, [256, 256], [256, 1], box,
                                            gl.NVMMASharedLayout.get_default_for(box, gl.bfloat16)))
    del wcfg["SPLIT_TAIL"], wcfg["MAX_SPLITS"]  # the launcher's schedule options, not the kernel's
    build("gemm gluon ws", fp8_gemm_gluon._fp8_gemm_gluon_ws_kernel,
          {"a_desc": desc(2 * wcfg["BLOCK_M"]), "w_desc": desc(wcfg["BLOCK_N"]), "c_desc": out_desc, "out_ptr": "*bf16",
           "a_scale_ptr": "*fp32", "w_scale_ptr": "*fp32", "bias_ptr": "*bf16", "gate_ptr": "*bf16",
           "res_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32",
           "rows_per_batch": "i32", "stride_om": "i32", "stride_gb": "i32", "stride_rm": "i32", "DP_TILES": "i32",
           "SPLITS": "i32", "K_CHUNK": "i32"},
          dict(A_PER_ROW=True, W_PER_COL=True, HAS_BIAS=True, ACT="gelu_tanh", HAS_GATE=True, HAS_RES=True,
               SPLIT=True, **wcfg), warps=wcfg["num_warps"], maxnreg=maxnreg, keep=("ptx",))
for name, bm, bn, acc, epi in [("precise 128x128 fused epilogue", 128, 128, 2, full),
                               ("fast 128x256", 128, 256, 0, plain)]:
    c = pick(fp8_gemm.PERSISTENT_CONFIGS, bm, bn)
    build(f"gemm persistent {name}", fp8_gemm._fp8_gemm_persistent_body, gemm_sig(c), dict(A_PER_ROW=True,
          W_PER_COL=True, HAS_BIAS=True, ACC_MODE=acc, NUM_SMS=132, PROMOTE=128, **epi), cfg=c)
'''


@pytest.mark.slow
def test_fused_kernels_compile_for_the_gpu():
    builds = {r["name"]: r for r in run_aot(_AOT_SCRIPT)}
    for name, r in builds.items():
        assert r["shared"] <= {90: 227, 89: 99, 80: 163}[r["arch"]] * 1024, name
        assert r["stack"] in (0, None), f"{name}: {r['stack']} bytes of register spills"
    # memory-bound kernels move 16 bytes per access
    for name in ("qk_norm bf16 weights {'BLOCK_L': 32}", "qk_norm no weights"):
        assert builds[name]["v4_loads"] > 0, name
    assert all(r["v4_loads"] > 0 for n, r in builds.items() if n.startswith(("gelu_quant", "gated_residual")))
    # qk_norm keeps torch's separate roundings: no fp32 fma (x*x into the sum, y*w)
    assert all(r["fma"] == 0 for n, r in builds.items() if n.startswith("qk_norm"))
    # gelu_quant compiles no clamp: it relies on the conversion saturating (cvt.rn.satfinite) as it does on sm89+
    assert all(r["satfinite"] > 0 for n, r in builds.items() if n.startswith("gelu_quant"))
    # the warp-specialised GEMM is split into producer / consumer warpgroups (register re-allocation), the plain
    # TMA one is not; precise accumulation promotes with fp32 adds (one per accumulator element per thread)
    for n, r in builds.items():
        if n.startswith("gemm ws"):
            assert r["setmaxnreg"] > 0, n
        if n.startswith("gemm tma") or n.startswith("gemm persistent"):
            assert r["setmaxnreg"] == 0, n
    assert builds["gemm ws precise 128x128 fused epilogue"]["fadd"] >= 128 * 128 // 256
    # the Gluon GEMM waits for all but the newest wgmma group before its promotion adds (the overlap it is for):
    # one wait(1) per promotion in the loop (two per trip) and the tail, wait(0) only at the end
    import importlib.util

    if importlib.util.find_spec("triton.experimental.gluon") is not None:
        g = builds["gemm gluon precise"]
        assert g["wgmma_waits"].count(1) >= 3 and g["wgmma_waits"].count(0) <= 2, g["wgmma_waits"]
        assert g["fadd"] >= 3 * 128 * 128 // 256  # 64 adds per promotion site, at least three sites
        # the warp-specialised one: consumers and producer re-allocate registers (setmaxnreg), each consumer keeps
        # one wgmma group in flight during its promotions, and nothing spills (checked for every build above)
        ws = builds["gemm gluon ws"]
        assert ws["setmaxnreg"] > 0 and ws["wgmma_waits"].count(1) >= 3, ws["wgmma_waits"]
        # the split tail's handshake, in each consumer: the partial's stores, a barrier of that warpgroup alone
        # (a named barrier of 128 threads: bar.sync 0 of the whole CTA would wait for the other partitions), one
        # thread's release add; the owner's acquire load, broadcast behind the same barrier
        ptx = ws["ptx"]
        assert ptx.count("atom.global.gpu.release.add.u32") == 2, "one release per consumer"
        assert ptx.count("ld.global.gpu.acquire.b32") == 2
        assert not re.search(r"\bbar\.sync\s+\d+;", ptx), "a CTA-wide barrier inside a partition"
        assert set(re.findall(r"\bbar\.sync\s+(\d+), 128;", ptx)) == {"0", "2"}, "each consumer its own barrier"
        for m in re.finditer(r"atom\.global\.gpu\.release\.add", ptx):  # its warpgroup's stores come first
            before = ptx[:m.start()]
            assert before.rfind("bar.sync") > before.rfind("st.global"), "release before the barrier"
    assert builds["gemm ws fast 128x128"]["fadd"] < builds["gemm ws precise 256x128"]["fadd"]
