"""The Triton kernels against their plain-torch references, on the CPU through the Triton interpreter.

The interpreter runs each kernel's own code (masks, tiling, epilogues, scale math) with numpy, one program at a
time, so shapes stay small and odd: M = 1, 3, 67 and N, K that are not multiples of the (small, CPU) block sizes,
plus K spanning several K tiles. Where the interpreter itself is not faithful to the GPU, the kernels compensate
and the tests say so: its fp32 -> e4m3 and fp32 -> bf16 casts do not round to nearest-even, so the kernels round
in fp32 first under the interpreter (ROUND_FIRST); its bf16 tl.dot is broken, so the weight-only kernel
multiplies in fp32 there. GEMM outputs are compared in fp32 (tight: the same quantised operands, only the
summation order differs) and in bf16, where the interpreter's truncating cast costs up to one bf16 ulp (1e-2).

The interpreter set-up and the ahead-of-time compile helper are shared with test_kernels_fused.py (kernel_env.py).
On a machine with a GPU the same tests run on CUDA tensors against the compiled kernels, where they also hold, but
autotune the full GPU config lists (minutes, not seconds).
"""

import re

import pytest
import torch
import torch.nn.functional as F
from kernel_env import E4M3, codes, kernel_device, randn, run_aot

from kernels import fp8_dequant_gemm, fp8_gemm, fp8_quant, ln_mod_quant  # noqa: E402
from minisd35.errors import InputError  # noqa: E402

DEV = kernel_device((fp8_quant, fp8_gemm, fp8_dequant_gemm, ln_mod_quant), fp8_quant._quant_kernel)

from kernels._common import rel_rms  # noqa: E402
from kernels.fp8_dequant_gemm import dequant_gemm, dequant_gemm_ref  # noqa: E402
from kernels.fp8_gemm import fp8_gemm as gemm  # noqa: E402
from kernels.fp8_gemm import fp8_gemm_ref, scaled_mm  # noqa: E402
from kernels.fp8_quant import quant_fp8, quant_fp8_ref  # noqa: E402
from kernels.ln_mod_quant import ln_mod, ln_mod_quant_ref, ln_mod_ref  # noqa: E402
from kernels.ln_mod_quant import ln_mod_quant as lnq  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# quant_fp8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M,K", [(1, 72), (3, 300), (67, 40)])
@pytest.mark.parametrize("per_token", [True, False])
def test_quant_matches_ref_bit_for_bit(M, K, dtype, per_token):
    x = randn(M, K, dtype=dtype, scale=3.0, seed=M * K)
    q, s = quant_fp8(x, per_token)
    qr, sr = quant_fp8_ref(x, per_token)
    assert q.dtype == E4M3 and q.shape == (M, K) and s.dtype == torch.float32
    assert s.shape == ((M,) if per_token else (1,))
    assert torch.equal(s, sr)
    assert torch.equal(codes(q), codes(qr))
    # and the quantisation is a good one: per-element error within half an E4M3 step (2**-4 relative)
    deq = q.float() * (s[:, None] if per_token else s)
    err = (deq - x.float()).abs()
    assert (err <= x.float().abs() * 2**-4 + s.max() * 2**-10).all()


def test_quant_wide_rows_and_strided_input():
    # K > 16384 takes the two-pass loop (amax pass, cast pass); a column slice has a row stride != K
    x = randn(3, 16500, dtype=torch.bfloat16, seed=1)
    q, s = quant_fp8(x)
    qr, sr = quant_fp8_ref(x)
    assert torch.equal(s, sr) and torch.equal(codes(q), codes(qr))
    xs = randn(5, 200, dtype=torch.bfloat16, seed=2)[:, 30:130]
    assert xs.stride(0) == 200
    q, s = quant_fp8(xs)
    qr, sr = quant_fp8_ref(xs.contiguous())
    assert torch.equal(s, sr) and torch.equal(codes(q), codes(qr))


@pytest.mark.parametrize("per_token", [True, False])
def test_quant_reads_strided_token_slices(per_token):
    # the image-token rows of a joint attention output [B, Li + Lt, D]: no 2-D stride describes them, the kernel
    # reads the [B, Li, D] view in place and writes rows in (b, l) order, as reshape(-1, D) of a copy would
    out = randn(3, 7 + 5, 72, dtype=torch.bfloat16, seed=5)
    for part in (out[:, :7], out[:, 7:]):
        q, s = quant_fp8(part, per_token)
        qr, sr = quant_fp8_ref(part.reshape(-1, 72), per_token)
        assert q.shape == (3 * part.shape[1], 72)
        assert torch.equal(s, sr) and torch.equal(codes(q), codes(qr))
    # SDPA's output [B, H, Ltot, hd] seen as [B, Ltot, H, hd]: row (b, l), columns (h, d), heads Ltot * hd apart
    attn = randn(3, 5, 7 + 5, 16, dtype=torch.bfloat16, seed=6).transpose(1, 2)
    for part in (attn[:, :7], attn[:, 7:]):
        q, s = quant_fp8(part, per_token)
        qr, sr = quant_fp8_ref(part.reshape(3, -1, 5 * 16), per_token)
        assert q.shape == (3 * part.shape[1], 5 * 16)
        assert torch.equal(s, sr) and torch.equal(codes(q), codes(qr))


def test_quant_static_scale():
    x = randn(7, 72, dtype=torch.bfloat16, scale=5.0, seed=3)
    scale = torch.tensor([0.03], device=DEV)  # calibrated: some values saturate
    q, s = quant_fp8(x, scale=scale)
    qr, _ = quant_fp8_ref(x, scale=scale)
    assert s is scale
    assert torch.equal(codes(q), codes(qr))
    assert q.float().abs().max().item() == 448.0


def test_quant_saturates_never_nan():
    x = torch.tensor([[500.0, -1000.0, 1e6, -3e38, 448.0, 465.0, 464.0, -449.0, 0.5]], device=DEV)
    q, _ = quant_fp8(x, scale=torch.ones(1, device=DEV))
    assert not q.float().isnan().any()
    assert q.float().tolist() == [[448.0, -448.0, 448.0, -448.0, 448.0, 448.0, 448.0, -448.0, 0.5]]
    q, s = quant_fp8(randn(4, 50, scale=1e4, seed=4))  # dynamic: each row's amax lands exactly on +-448
    assert not q.float().isnan().any()
    assert torch.equal(q.float().abs().amax(dim=1).cpu(), torch.full((4,), 448.0))


def test_quant_zero_row_uses_the_scale_floor():
    x = randn(3, 72, seed=5)
    x[1] = 0.0
    for per_token in (True, False):
        q, s = quant_fp8(x, per_token)
        assert not q.float().isnan().any() and not s.isnan().any()
        assert (q[1].float() == 0).all()
    q, s = quant_fp8(x)
    assert s[1].item() == pytest.approx(1e-12 / 448.0, rel=1e-6)
    q, s = quant_fp8(torch.zeros(2, 40, device=DEV), per_token=False)
    assert s.item() == pytest.approx(1e-12 / 448.0, rel=1e-6) and (q.float() == 0).all()


def test_round_to_e4m3_grid_on_every_magnitude():
    # the interpreter path rounds in fp32 (ROUND_FIRST); it must be torch's round-to-nearest-even everywhere:
    # subnormals, ties, carries into the next power of two (124.3 -> 128), every code's own value
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3000, generator=g) * 10.0 ** torch.randint(-5, 3, (3000,), generator=g).float()
    ties = torch.tensor([1.0625, 84.0, 336.0, 124.29, 31.9, 0.001, 2**-10, 3 * 2**-10, -2**-11, 0.0, -0.0])
    table = torch.arange(256, dtype=torch.uint8).view(E4M3).float()
    x = torch.cat([x, ties, table[~table.isnan()]])
    q, _ = quant_fp8(x.reshape(1, -1).to(DEV), scale=torch.ones(1, device=DEV))
    assert torch.equal(codes(q), x.clamp(-448, 448).to(E4M3).view(torch.uint8).reshape(1, -1))


# ---------------------------------------------------------------------------------------------------------------
# fp8_gemm


def quantized_operands(M, K, N, per_row_a=True, per_col_w=True, seed=0):
    a, sa = quant_fp8_ref(randn(M, K, seed=seed), per_token=per_row_a)
    w, sw = quant_fp8_ref(randn(N, K, scale=0.05, seed=seed + 1), per_token=per_col_w)
    return a, sa, w, sw


@pytest.mark.parametrize("M", [1, 3, 67])
@pytest.mark.parametrize("K,N", [(72, 40), (100, 56), (64, 40)])  # tail in K, K over 4 tiles, K % BLOCK_K == 0
def test_fp8_gemm_matches_ref(M, K, N):
    a, sa, w, sw = quantized_operands(M, K, N, seed=M + K)
    bias = randn(N, dtype=torch.bfloat16, seed=7)
    ref = fp8_gemm_ref(a, sa, w, sw, bias, out_dtype=torch.float32)
    for fast in (False, True):
        out = gemm(a, sa, w, sw, bias, out_dtype=torch.float32, fast_accum=fast)
        assert out.shape == (M, N) and out.dtype == torch.float32
        assert rel_rms(out, ref) < 1e-5  # same operands: only the order of the fp32 sums differs
    out = gemm(a, sa, w, sw, bias)  # bf16 out: the interpreter truncates instead of rounding (one ulp)
    assert out.dtype == torch.bfloat16 and rel_rms(out, ref) < 1e-2


@pytest.mark.parametrize("per_row_a,per_col_w", [(False, False), (True, False), (False, True)])
def test_fp8_gemm_per_tensor_scales(per_row_a, per_col_w):
    a, sa, w, sw = quantized_operands(67, 72, 40, per_row_a, per_col_w, seed=8)
    assert sa.numel() == (67 if per_row_a else 1) and sw.numel() == (40 if per_col_w else 1)
    out = gemm(a, sa, w, sw, out_dtype=torch.float32)
    assert rel_rms(out, fp8_gemm_ref(a, sa, w, sw, out_dtype=torch.float32)) < 1e-5


def test_fp8_gemm_epilogues_against_the_model_formula():
    # the MLP of a DiT block: fc1 + GELU(tanh), then fc2 with the adaLN gated residual, written out as the model
    # does it on [B, L, N] streams, in fp32
    B, L, K, N = 3, 23, 72, 40
    M = B * L
    a, sa, w, sw = quantized_operands(M, K, N, seed=9)
    bias = randn(N, seed=10)
    gate = randn(B, N, dtype=torch.bfloat16, seed=11)
    res = randn(M, N, seed=12)
    lin = (a.float() * sa[:, None]) @ (w.float() * sw[:, None]).t() + bias
    act = F.gelu(lin, approximate="tanh")
    model = (res.view(B, L, N) + gate.float()[:, None, :] * act.view(B, L, N)).reshape(M, N)
    for kw, expect in [({}, lin), ({"act": "gelu_tanh"}, act),
                       ({"act": "gelu_tanh", "gate": gate, "residual": res, "rows_per_batch": L}, model),
                       ({"gate": gate, "residual": res}, (res.view(B, L, N) + gate.float()[:, None] * lin.view(B, L, N))
                        .reshape(M, N)),  # rows_per_batch inferred as M // B
                       ({"residual": res}, res + lin),
                       ({"gate": gate, "rows_per_batch": L},
                        (gate.float()[:, None] * lin.view(B, L, N)).reshape(M, N))]:
        ref = fp8_gemm_ref(a, sa, w, sw, bias, out_dtype=torch.float32, **kw)
        assert rel_rms(ref, expect) < 1e-6, kw
        assert rel_rms(gemm(a, sa, w, sw, bias, out_dtype=torch.float32, **kw), ref) < 1e-5, kw
    # bf16 residual stream, bf16 out, as in the model
    out = gemm(a, sa, w, sw, bias, act="gelu_tanh", gate=gate, residual=res.bfloat16(), rows_per_batch=L)
    assert out.dtype == torch.bfloat16 and rel_rms(out, model) < 1e-2


def test_w8a8_error_level_against_fp32():
    # what FP8 costs on random data: per-row W8A8 vs the unquantised fp32 product lands at a few percent
    # (E4M3's 3 mantissa bits: relative step 2**-3 .. 2**-4 per operand, averaged over K products)
    x, wt = randn(67, 512, seed=13), randn(96, 512, scale=0.05, seed=14)
    exact = x @ wt.t()
    a, sa = quant_fp8_ref(x)
    w, sw = quant_fp8_ref(wt)
    err_ref = rel_rms(fp8_gemm_ref(a, sa, w, sw, out_dtype=torch.float32), exact)
    err_kernel = rel_rms(gemm(a, sa, w, sw, out_dtype=torch.float32), exact)
    assert 0.01 < err_ref < 0.08
    assert err_kernel == pytest.approx(err_ref, rel=1e-3)
    err_bf16 = rel_rms(x.bfloat16().float() @ wt.bfloat16().float().t(), exact)
    assert err_bf16 < err_ref / 4  # bf16 operands (8 bits of mantissa) are far closer


def test_fp8_gemm_rejects_bad_arguments():
    a, sa, w, sw = quantized_operands(6, 72, 40, seed=15)
    with pytest.raises(InputError, match="w must be"):
        gemm(a, sa, w[:, :64], sw)
    with pytest.raises(InputError, match="a_scale"):
        gemm(a, sa[:5], w, sw)
    with pytest.raises(InputError, match="dtype"):
        gemm(a.float(), sa, w, sw)
    with pytest.raises(InputError, match="rows_per_batch"):
        gemm(a, sa, w, sw, gate=randn(4, 40), rows_per_batch=2)
    with pytest.raises(InputError, match="act"):
        gemm(a, sa, w, sw, act="relu")
    with pytest.raises(InputError, match="residual"):
        gemm(a, sa, w, sw, residual=randn(6, 40))  # fp32 residual but bf16 out


def test_scaled_mm_helper():
    a, sa, w, sw = quantized_operands(37, 64, 48, seed=16)
    bias = randn(48, dtype=torch.bfloat16, seed=17)
    try:
        torch._scaled_mm(a[:16], w[:16].t(), scale_a=sa[:1].reshape(()), scale_b=sw[:1].reshape(()),
                         out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"torch._scaled_mm does not run on {DEV} with this torch: {e}")
    ref = fp8_gemm_ref(a, sa, w, sw, bias, out_dtype=torch.float32)
    assert rel_rms(scaled_mm(a, sa, w, sw, bias), ref) < 1e-2  # row-wise
    sa1, sw1 = sa.amax().reshape(1), sw.amax().reshape(1)
    assert rel_rms(scaled_mm(a, sa1, w, sw1, bias.float()), fp8_gemm_ref(a, sa1, w, sw1, bias)) < 1e-2  # tensor
    assert rel_rms(scaled_mm(a, sa1, w, sw), fp8_gemm_ref(a, sa1, w, sw)) < 1e-2  # mixed -> row-wise
    with pytest.raises(InputError, match="multiples of 16"):
        scaled_mm(*quantized_operands(5, 72, 40))


# ---------------------------------------------------------------------------------------------------------------
# dequant_gemm (weight-only)


@pytest.mark.parametrize("bitcast", [False, True])
@pytest.mark.parametrize("M", [1, 3, 7, 20])  # FMA GEMV up to 4 rows, MMA GEMV configs up to 16, GEMM above
def test_dequant_decodes_every_code(bitcast, M):
    # x = ones [M, 1], w = one code per output channel, scale 1: out[m, n] is the decoded code, exactly
    table = torch.arange(256, dtype=torch.uint8)
    finite = table[(table & 0x7F) != 0x7F]  # 254 codes; NaN aside
    w = finite.reshape(-1, 1).view(E4M3).to(DEV)
    out = dequant_gemm(torch.ones(M, 1, dtype=torch.float16, device=DEV), w, torch.ones(1, device=DEV),
                       bitcast=bitcast)
    expect = finite.view(E4M3).float().to(torch.float16)
    assert torch.equal(out.cpu(), expect.expand(M, -1))


def test_dequant_bitcast_nan_codes():
    w = torch.tensor([[0x7F], [0xFF], [0x38]], dtype=torch.uint8, device=DEV)  # NaN, -NaN, 1.0
    out = dequant_gemm(torch.ones(2, 1, dtype=torch.float16, device=DEV), w, torch.ones(1, device=DEV))
    assert out[:, :2].isnan().all() and (out[:, 2] == 1.0).all()


@pytest.mark.parametrize("bitcast", [False, True])
@pytest.mark.parametrize("M,K,N", [(1, 72, 40), (3, 100, 56), (9, 100, 40), (67, 72, 40), (67, 64, 56)])
def test_dequant_gemm_matches_ref(bitcast, M, K, N):
    x = randn(M, K, dtype=torch.float16, seed=M + K)
    w, sw = quant_fp8_ref(randn(N, K, scale=0.05, seed=18))
    bias = randn(N, dtype=torch.bfloat16, seed=19)
    ref = dequant_gemm_ref(x, w, sw, bias)
    exact = (x.float() @ (w.float() * sw[:, None]).t() + bias.float())
    out = dequant_gemm(x, w, sw, bias, bitcast=bitcast)
    assert out.shape == (M, N) and out.dtype == torch.float16
    assert rel_rms(out, exact) < 1e-3  # fp16 output rounding only
    assert rel_rms(out, ref) < 1e-3
    xb = x.bfloat16()  # bf16 activations; the interpreter truncates the bf16 output (one ulp)
    assert rel_rms(dequant_gemm(xb, w, sw, None, bitcast=bitcast), dequant_gemm_ref(xb, w, sw)) < 1e-2


@pytest.mark.parametrize("path", ["fma", "mma"])
def test_dequant_gemv_paths_agree(path):
    # at M <= 4 the default is the FMA GEMV, the MMA GEMV the one for K > FMA_MAX_K: both compute the same thing
    from kernels.fp8_dequant_gemm import _dequant_gemm

    for M in (1, 2, 4):
        x = randn(M, 100, dtype=torch.float16, seed=M)
        w, sw = quant_fp8_ref(randn(56, 100, scale=0.05, seed=30))
        bias = randn(56, dtype=torch.bfloat16, seed=31)
        for bitcast in (False, True):
            assert rel_rms(_dequant_gemm(x, w, sw, bias, bitcast, path), dequant_gemm_ref(x, w, sw, bias)) < 1e-3


@pytest.mark.parametrize("bitcast", [False, True])
def test_dequant_gemm_pdl_runs_where_unsupported(bitcast):
    # pdl=True under the interpreter (and on the CPU, below sm90, on the MMA path) runs the same kernel without PDL;
    # on an sm90+ GPU it is the PDL kernel, whose arithmetic is the same: equal outputs either way
    from kernels.fp8_dequant_gemm import pdl_supported

    assert DEV == "cuda" or not pdl_supported(torch.device(DEV))
    w, sw = quant_fp8_ref(randn(56, 100, scale=0.05, seed=32))
    bias = randn(56, dtype=torch.bfloat16, seed=33)
    for M in (1, 2, 4, 7):  # the FMA GEMV up to 4 rows, the MMA one at 7 (pdl ignored)
        x = randn(M, 100, dtype=torch.bfloat16, seed=M)
        out = dequant_gemm(x, w, sw, bias, bitcast=bitcast, pdl=True)
        assert torch.equal(out, dequant_gemm(x, w, sw, bias, bitcast=bitcast)), M
        assert rel_rms(out, dequant_gemm_ref(x, w, sw, bias)) < 1e-2, M


def test_dequant_gemm_uint8_weight_and_per_tensor_scale():
    x = randn(5, 72, dtype=torch.float16, seed=20)
    w, sw = quant_fp8_ref(randn(40, 72, scale=0.05, seed=21), per_token=False)
    ref = dequant_gemm_ref(x, w, sw)
    assert rel_rms(dequant_gemm(x, w.view(torch.uint8), sw), ref) < 1e-3  # uint8 -> bit decoding, automatically
    with pytest.raises(InputError, match="w_scale"):
        dequant_gemm(x, w, torch.ones(7, device=DEV))
    with pytest.raises(InputError, match="dtype"):
        dequant_gemm(x.float(), w, sw)


# ---------------------------------------------------------------------------------------------------------------
# ln_mod_quant


def modulation(B, K, dtype=torch.bfloat16, seed=0):
    mod = randn(B, 6 * K, dtype=dtype, scale=0.5, seed=seed)
    return mod[:, :K], mod[:, K:2 * K]  # strided chunks, as the model's mod.chunk(6, dim=1) gives


@pytest.mark.parametrize("B,L,K", [(1, 1, 72), (3, 5, 72), (2, 3, 300), (2, 3, 64)])
def test_ln_mod_quant_matches_the_model(B, L, K):
    x = randn(B * L, K, dtype=torch.bfloat16, scale=2.0, seed=B * L * K) + 0.5
    shift, scale = modulation(B, K, seed=K)
    # the reference is the model's formula on [B, L, K] streams
    x3 = x.view(B, L, K)
    model = (F.layer_norm(x3, (K,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]).reshape(B * L, K)
    assert torch.equal(ln_mod_ref(x, shift, scale, L), model)
    y = ln_mod(x, shift, scale, L)
    assert y.dtype == torch.bfloat16
    assert (y != model).float().mean().item() < 0.01  # bit-equal but for a rare last-bit flip of the LN statistics
    assert rel_rms(y, model) < 1e-3
    q, s = lnq(x, shift, scale, L)
    qr, sr = ln_mod_quant_ref(x, shift, scale, L)
    assert q.dtype == E4M3 and s.shape == (B * L,)
    assert rel_rms(s, sr) < 1e-3
    assert (codes(q) != codes(qr)).float().mean().item() < 0.01
    assert rel_rms(q.float() * s[:, None], qr.float() * sr[:, None]) < 1e-3


def test_ln_mod_promotes_like_torch():
    # fp32 modulation with bf16 activations: torch promotes the product and the sum to fp32
    B, L, K = 2, 4, 72
    x = randn(B * L, K, dtype=torch.bfloat16, seed=22)
    shift, scale = modulation(B, K, dtype=torch.float32, seed=23)
    y = ln_mod(x, shift, scale, L)
    ref = ln_mod_ref(x, shift, scale, L)
    assert y.dtype == ref.dtype == torch.float32
    assert rel_rms(y, ref) < 1e-5


def test_ln_mod_quant_constant_row_and_bad_arguments():
    B, L, K = 2, 3, 40
    x = randn(B * L, K, dtype=torch.bfloat16, seed=24)
    x[2] = 1.5  # a constant row normalises to 0: y = shift, no NaN
    shift, scale = modulation(B, K, seed=25)
    q, s = lnq(x, shift, scale, L)
    assert not q.float().isnan().any() and not s.isnan().any()
    qr, sr = ln_mod_quant_ref(x, shift, scale, L)
    assert rel_rms(q[2].float() * s[2], qr[2].float() * sr[2]) < 1e-3
    with pytest.raises(InputError, match="rows_per_batch"):
        lnq(x, shift, scale, 4)
    with pytest.raises(InputError, match="shift"):
        lnq(x, shift[:, :30], scale, L)


# ---------------------------------------------------------------------------------------------------------------
# the compiled GPU path, without a GPU: Triton's own compiler and its bundled ptxas build each kernel for Hopper
# (sm90), Ada (sm89) and Ampere (sm80, the weight-only bit-decoding path) on the CPU. This catches what the
# interpreter cannot: Python globals the compiler refuses, type promotion that differs once compiled, shared memory
# beyond the device, a main loop that is not software-pipelined, a "precise" accumulation that got fused away.

_AOT_SCRIPT = r'''
q_sig = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "amax_ptr": "*fp32", "M": "i32", "K": "i32",
         "L": "i32", "stride_xb": "i32", "stride_xm": "i32", "stride_xh": "i32"}
for mode in range(4):
    for one_tile in (True, False):
        build(f"quant mode={mode} one_tile={one_tile}", fp8_quant._quant_kernel, q_sig,
              dict(MODE=mode, ONE_TILE=one_tile, ROUND_FIRST=False, HD=4096, BLOCK_M=1, BLOCK_K=4096), 90, warps=8)
build("quant [B, L, H, 64] view", fp8_quant._quant_kernel, q_sig, dict(MODE=0, ONE_TILE=True, ROUND_FIRST=False,
      HD=64, BLOCK_M=1, BLOCK_K=4096), 90, warps=8)
build("quant sm89", fp8_quant._quant_kernel, q_sig, dict(MODE=0, ONE_TILE=True, ROUND_FIRST=False, HD=4096,
      BLOCK_M=2, BLOCK_K=4096), 89, warps=8)

g_sig = {"a_ptr": "*fp8e4nv", "w_ptr": "*fp8e4nv", "out_ptr": "*bf16", "a_scale_ptr": "*fp32", "w_scale_ptr": "*fp32",
         "bias_ptr": "*bf16", "gate_ptr": "*bf16", "res_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
         "rows_per_batch": "i32", "stride_am": "i32", "stride_wn": "i32", "stride_om": "i32", "stride_gb": "i32",
         "stride_rm": "i32"}
big = next(c for c in fp8_gemm.GEMM_CONFIGS if c.kwargs["BLOCK_K"] == 128  # a config the precise modes use
           and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] // (32 * c.num_warps) <= 64)
for acc in (0, 1, 2):
    build(f"gemm acc={acc}", fp8_gemm._fp8_gemm_kernel, g_sig, dict(A_PER_ROW=True, W_PER_COL=True, HAS_BIAS=True,
          ACT="none", HAS_GATE=False, HAS_RES=False, ACC_MODE=acc, EVEN_K=True, PROMOTE=128), 90, cfg=big)
build("gemm gelu + gate + residual, per-tensor, K tail, fp32 out", fp8_gemm._fp8_gemm_kernel,
      {**g_sig, "out_ptr": "*fp32", "res_ptr": "*fp32"}, dict(A_PER_ROW=False, W_PER_COL=False, HAS_BIAS=True,
      ACT="gelu_tanh", HAS_GATE=True, HAS_RES=True, ACC_MODE=2, EVEN_K=False, PROMOTE=128), 90, cfg=big)
for cfg in [c for c in fp8_gemm.GEMM_CONFIGS if c is not big]:
    build(f"gemm config {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}", fp8_gemm._fp8_gemm_kernel, g_sig,
          dict(A_PER_ROW=True, W_PER_COL=True, HAS_BIAS=True, ACT="none", HAS_GATE=False, HAS_RES=False,
          ACC_MODE=0 if cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] // (32 * cfg.num_warps) > 64 else 2,
          EVEN_K=True, PROMOTE=min(cfg.kwargs["BLOCK_K"], 128)), 90, cfg=cfg)
build("gemm sm89", fp8_gemm._fp8_gemm_kernel, g_sig, dict(A_PER_ROW=True, W_PER_COL=True, HAS_BIAS=True,
      ACT="none", HAS_GATE=False, HAS_RES=False, ACC_MODE=2, EVEN_K=True, PROMOTE=64, BLOCK_M=64, BLOCK_N=64,
      BLOCK_K=64, GROUP_M=8), 89, warps=4)

d_sig = {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "out_ptr": "*bf16", "w_scale_ptr": "*fp32", "bias_ptr": "*bf16",
         "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_om": "i32",
         "M_BUCKET": "i32"}
gemv, gemm = fp8_dequant_gemm.GEMV_CONFIGS, fp8_dequant_gemm.GEMM_CONFIGS
swap = lambda cfgs, s: next(c for c in cfgs if c.kwargs["SWAP_AB"] == s)
for cfg in (swap(gemv, True), swap(gemv, False), swap(gemm, True), swap(gemm, False)):  # each code path once
    for bitcast in (False, True):
        build(f"dequant {cfg.kwargs} bitcast={bitcast}", fp8_dequant_gemm._dequant_gemm_kernel,
              {**d_sig, "w_ptr": "*u8"} if bitcast else d_sig,
              dict(W_PER_COL=True, HAS_BIAS=True, BITCAST=bitcast, DOT_F32=False, EVEN_K=True), 90, cfg=cfg)
D = fp8_dequant_gemm
fma_cases = [(D.FMA_GEMV_CONFIG, K, False, 90) for K in (1536, 2432, D.FMA_WIDE_K)]
fma_cases += [(D.FMA_GEMV_BITCAST_CONFIG, K, True, 80) for K in (1536, 2432, D.FMA_WIDE_K)]
fma_cases += [(D.FMA_GEMV_WIDE_CONFIG, K, bc, arch) for K in (D.FMA_WIDE_K + 16, D.FMA_MAX_K)
              for bc, arch in ((False, 90), (True, 80))]
for cfg, K, bitcast, arch in fma_cases:  # SD3.5's adaLN widths and each config's widest rows
    bk = cfg.kwargs["BLOCK_K"]
    build(f"dequant FMA GEMV {cfg.kwargs} maxnreg={cfg.maxnreg} K={K} bitcast={bitcast}", D._dequant_gemv_kernel,
          {**d_sig, "w_ptr": "*u8"} if bitcast else d_sig, dict(W_PER_COL=True, HAS_BIAS=True, BITCAST=bitcast,
          ROWS=2, K_TILES=-(-K // bk), EVEN_K=K % bk == 0, PDL=False, PDL_TILES=1), arch, cfg=cfg)
for cfg in (D.FMA_GEMV_BITCAST_CONFIG, D.FMA_GEMV_WIDE_CONFIG):  # 3 rows, a masked K tail, fp16 (the sm80 case)
    build(f"dequant FMA GEMV sm80 {cfg.kwargs} fp16 bitcast", D._dequant_gemv_kernel,
          {**d_sig, "x_ptr": "*fp16", "out_ptr": "*fp16", "w_ptr": "*u8"},
          dict(W_PER_COL=False, HAS_BIAS=False, BITCAST=True, ROWS=3, K_TILES=5, EVEN_K=False, PDL=False,
               PDL_TILES=1), 80, cfg=cfg)
for cfg in (fp8_dequant_gemm.GEMV_CONFIGS[1], fp8_dequant_gemm.GEMM_CONFIGS[2]):
    build(f"dequant sm80 bitcast {cfg.kwargs}", fp8_dequant_gemm._dequant_gemm_kernel,
          {**d_sig, "x_ptr": "*fp16", "out_ptr": "*fp16", "w_ptr": "*u8"},
          dict(W_PER_COL=False, HAS_BIAS=False, BITCAST=True, DOT_F32=False, EVEN_K=False), 80, cfg=cfg)

l_sig = {"x_ptr": "*bf16", "shift_ptr": "*bf16", "scale_ptr": "*bf16", "y_ptr": "*fp8e4nv", "y_scale_ptr": "*fp32",
         "M": "i32", "K": "i32", "rows_per_batch": "i32", "eps": "fp32", "stride_xm": "i32", "stride_shift": "i32",
         "stride_scale": "i32", "stride_ym": "i32"}
for quant in (True, False):
    build(f"ln_mod quant={quant}", ln_mod_quant._ln_mod_kernel, l_sig if quant else {**l_sig, "y_ptr": "*bf16"},
          dict(QUANT=quant, ROUND_FIRST=False, LN_DT=tl.bfloat16, T_DT=tl.bfloat16, U_DT=tl.bfloat16,
               Y_DT=tl.bfloat16, BLOCK_M=2, BLOCK_K=2048, BLOCK_K2=512, TAIL=True),  # as launched at K = 2432
          90, warps=8, enable_fp_fusion=False)
'''


@pytest.mark.slow
def test_kernels_compile_for_the_gpu():
    builds = {(r["name"], r["arch"]): r for r in run_aot(_AOT_SCRIPT)}
    smem_limit = {90: 227 * 1024, 89: 99 * 1024, 80: 163 * 1024}  # the most one program may use: H100, L40/4090, A100
    for (name, arch), r in builds.items():
        assert r["shared"] <= smem_limit[arch], (name, arch, r["shared"])
    # the main loop is software-pipelined (operand tiles of several K steps in flight), not load-then-compute
    big = next(c for c in fp8_gemm.GEMM_CONFIGS if c.kwargs["BLOCK_K"] == 128
               and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] // (32 * c.num_warps) <= 64)
    stage = (big.kwargs["BLOCK_M"] + big.kwargs["BLOCK_N"]) * big.kwargs["BLOCK_K"]  # fp8: one byte per element
    assert builds[("gemm acc=1", 90)]["shared"] >= stage * (big.num_stages - 1)
    # precise accumulation really promotes: fp32 adds of the per-K-tile MMA result into the accumulator, one per
    # accumulator element per thread (BLOCK_M * BLOCK_N / threads), which the fast path does not have
    per_thread = big.kwargs["BLOCK_M"] * big.kwargs["BLOCK_N"] // (32 * big.num_warps)
    fast, precise_add, precise = (builds[(f"gemm acc={i}", 90)]["fadd"] for i in range(3))
    assert precise - fast >= per_thread and precise_add - fast >= per_thread
    # the FMA GEMV's configs (one with a register cap, which buys programs per SM) spill nothing up to the widest
    # rows each takes: a spill to local memory in a kernel that lives on memory parallelism gives back the gain
    gemv = [r for (name, _), r in builds.items() if name.startswith("dequant FMA GEMV {") and "K=" in name]
    assert len(gemv) == 10
    if gemv[0]["stack"] is not None:
        assert all(r["stack"] == 0 for r in gemv), [(r["name"], r["stack"]) for r in gemv if r["stack"]]
    # the quantiser's loads stay 16 bytes wide when it reads attention's output head by head (runs of 64 columns)
    heads, rows = builds[("quant [B, L, H, 64] view", 90)], builds[("quant mode=0 one_tile=True", 90)]
    assert heads["v4_loads"] > 0 and heads["v4_loads"] == rows["v4_loads"]
    # ln_mod keeps torch's two roundings of x * (1 + scale) + shift: no bf16 fma fusing them into one
    assert builds[("ln_mod quant=False", 90)]["bf16_fma"] == 0 and builds[("ln_mod quant=True", 90)]["bf16_fma"] == 0


# the FMA GEMV with programmatic dependent launch (dequant_gemm(..., pdl=True)), compiled for sm90: SD3.5's two adaLN
# widths and the capped config's widest rows, 1 and 2 token rows, the wide config with a masked K tail, and the same
# kernel without PDL
_PDL_SCRIPT = r'''
D = fp8_dequant_gemm
d_sig = {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "out_ptr": "*bf16", "w_scale_ptr": "*fp32", "bias_ptr": "*bf16",
         "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_om": "i32"}
cases = [(D.FMA_GEMV_CONFIG, K, rows, True) for K in (1536, 2432, D.FMA_WIDE_K) for rows in (1, 2)]
cases += [(D.FMA_GEMV_WIDE_CONFIG, D.FMA_MAX_K - 40, 2, True), (D.FMA_GEMV_CONFIG, 2432, 2, False)]
for cfg, K, rows, pdl in cases:
    bk = cfg.kwargs["BLOCK_K"]
    build(f"FMA GEMV BLOCK_K={bk} K={K} rows={rows} pdl={pdl}", D._dequant_gemv_kernel, d_sig,
          dict(W_PER_COL=True, HAS_BIAS=True, BITCAST=False, ROWS=rows, K_TILES=-(-K // bk), EVEN_K=K % bk == 0,
               PDL=pdl, PDL_TILES=D.FMA_PDL_TILES), 90, cfg=cfg, keep=("ptx", "sass"), launch_pdl=pdl)
'''


@pytest.mark.slow
def test_fma_gemv_pdl_waits_before_reading_x():
    # PDL lets the kernel start while the previous one (which may have written x) is still running: the only memory
    # operations before griddepcontrol.wait may be the L2 prefetches of the weight's first tiles; every load (weight,
    # x, scale, bias) and every store after it. Checked in the PTX and again in the SASS, where ptxas could have
    # moved them: launch_dependents is PREEXIT, the wait ACQBULK, a prefetch CCTL.E.PF2.
    D = fp8_dequant_gemm
    for r in run_aot(_PDL_SCRIPT):
        name, ptx, sass = r["name"], r["ptx"], r["sass"]
        if name.endswith("pdl=False"):  # the kernel dequant_gemm runs by default: untouched
            assert "griddepcontrol" not in ptx and "prefetch" not in ptx and r["launch_pdl"] is False, name
            continue
        bk, K = (int(v) for v in re.search(r"BLOCK_K=(\d+) K=(\d+)", name).groups())
        tiles = min(D.FMA_PDL_TILES, K // bk)  # full tiles only: a masked tail's lines may lie past the weight
        assert r["launch_pdl"] is True, name  # the launcher sets the stream attribute from this
        assert ptx.count("griddepcontrol.launch_dependents") == 1 and ptx.count("griddepcontrol.wait") == 1, name
        before, after = ptx.split("griddepcontrol.wait")
        assert "griddepcontrol.launch_dependents" in before, name
        assert not re.search(r"\b(ld|st)\.global", before), name
        # one prefetch per tile and piece: a thread holds BLOCK_N * BLOCK_K / 8 / threads pieces of 8 codes of the
        # [BLOCK_N, BLOCK_K] tile (4 in both configs, each in a row of its own)
        cfg = D.FMA_GEMV_CONFIG if bk == D.FMA_GEMV_CONFIG.kwargs["BLOCK_K"] else D.FMA_GEMV_WIDE_CONFIG
        pieces = cfg.kwargs["BLOCK_N"] * bk // 8 // (32 * cfg.num_warps)
        assert before.count("prefetch.global.L2") == tiles * pieces, name
        assert "prefetch" not in after, name
        # all the weight's 8-byte loads (one per tile and piece) and the x loads come after the wait
        assert len(re.findall(r"ld\.global\.v2\.b32", after)) == -(-K // bk) * pieces, name
        assert re.search(r"ld\.global\.v4\.b32", after) and re.search(r"st\.global", after), name
        if sass is None:  # no cuobjdump in this Triton
            continue
        assert r["stack"] == 0, (name, r["stack"])  # no spills under the 128-register cap
        ops = [line.split()[1] if line.startswith("@") else line.split()[0] for line in sass]
        wait = ops.index("ACQBULK")
        assert ops.count("ACQBULK") == 1 and "PREEXIT" in ops[:wait], name
        assert not [op for op in ops[:wait] if op.startswith(("LDG", "STG", "LD.", "ST.", "LDL", "STL"))], name
        prefetches = [line for line in sass[:wait] if line.startswith("CCTL.E.PF2")]
        assert len(prefetches) == tiles * pieces and not [op for op in ops[wait:] if op.startswith("CCTL")], name
        # and they are the weight's tiles: 4 row bases, offsets k0 = 0, BLOCK_K, ... (x, bf16, steps 2 * BLOCK_K)
        offsets = {int(m.group(1), 16) if (m := re.search(r"\+0x([0-9a-f]+)\]", p)) else 0 for p in prefetches}
        assert offsets == {t * bk for t in range(tiles)}, (name, sorted(offsets))
