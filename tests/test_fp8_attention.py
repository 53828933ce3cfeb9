"""kernels/fp8_attention.py (fused attention with bf16 or E4M3 operands), the E4M3 output of qk_norm_split that
feeds it, fast.py's attention="fp8" path and the FP8 attention audit.

The kernel runs under the Triton interpreter on the CPU (kernel_env.py) on small odd shapes: sequence lengths that
are not multiples of the CPU block (16), so that the masked last key block, the partial last query block and, in
the TMA variants, key tiles that run into the next head's rows are all exercised. References are the exact softmax
in fp32 over the same (dequantised) operands, and plain bf16 attention for what FP8 costs."""

import math

import pytest
import torch
import torch.nn.functional as F
from kernel_env import E4M3, codes, kernel_device, randn, run_aot

from kernels import fp8_attention, qk_norm

DEV = kernel_device((fp8_attention, qk_norm), fp8_attention._attn_ptr_kernel)

from kernels._common import rel_rms  # noqa: E402
from kernels.fp8_attention import (  # noqa: E402
    attention,
    attention_ref,
    padded_len,
    prepare_fp8,
    v_fp8_transposed,
    v_fp8_transposed_ref,
)
from kernels.qk_norm import qk_norm_split, qk_norm_split_ref  # noqa: E402
from minisd35.errors import InputError  # noqa: E402

SHAPES = [(1, 2, 37, 64), (2, 1, 16, 32), (1, 1, 5, 16)]  # (B, H, L, hd): 2 full key blocks + 5; exactly 1; 0 + 5


def qkv(B, H, L, hd, temp=1.5, seed=0):
    """Logits of standard deviation temp^2 (a peaked softmax: errors in the logits show)."""
    return (randn(B, H, L, hd, scale=temp, seed=seed).bfloat16(), randn(B, H, L, hd, scale=temp, seed=seed + 1)
            .bfloat16(), randn(B, H, L, hd, seed=seed + 2).bfloat16())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", ["ptr", "tma", "ws"])
def test_bf16_attention_matches_sdpa(shape, variant):
    q, k, v = qkv(*shape)
    out = attention(q, k, v, variant=variant)
    ref = attention_ref(q, k, v)
    assert out.dtype == torch.bfloat16 and out.stride() == q.stride()
    # fp32 softmax and accumulation, one bf16 rounding of P before P @ V and of the output: ~0.4%
    assert rel_rms(out, ref) < 1e-2
    assert rel_rms(out, F.scaled_dot_product_attention(q.float(), k.float(), v.float())) < 1e-2


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", ["ptr", "tma"])
@pytest.mark.parametrize("mode", ["qk", "pv", "qk+pv"])
def test_fp8_attention_matches_its_reference(shape, variant, mode):
    q, k, v = qkv(*shape)
    args = prepare_fp8(q, k, v, qk="qk" in mode, pv="pv" in mode)
    out = attention(*args[:6], v_transposed=args[6], variant=variant)
    ref = attention_ref(*args[:6], v_transposed=args[6])  # exact softmax over the same E4M3 operands
    assert not torch.isnan(out).any()
    # against its own reference the kernel adds only the rounding of P (to E4M3 when V is E4M3, else to bf16)
    assert rel_rms(out, ref) < (2e-2 if "pv" in mode else 1e-2)
    # against bf16 attention, FP8 costs a few percent (3 mantissa bits on q, k and v; logits of std 2.25 here)
    err = rel_rms(out, attention_ref(q, k, v))
    assert 1e-2 < err < 0.15


@pytest.mark.parametrize("variant", ["ptr", "tma"])
def test_fp8_attention_of_a_batch_equals_its_rows(variant):
    """V gets one scale per batch row (v_fp8_transposed, and the kernel reads v_scale[b]), so each image's output is
    what it would be alone, bit for bit: a batch (or a CFG pair) does not couple the images' roundings. The rows get
    different V ranges here, so one scale for the batch would round them differently."""
    q, k, v = qkv(2, 2, 37, 64, seed=7)
    v = v * torch.tensor([1.0, 5.0]).view(2, 1, 1, 1).bfloat16()
    q8, k8, _, qs, ks, _, _ = prepare_fp8(q, k, v)
    vt, vs = v_fp8_transposed(v.to(DEV))
    assert vs.shape == (2,) and vs[1] > 4 * vs[0]
    both = attention(q8, k8, vt, qs, ks, vs, v_transposed=True, variant=variant)
    for b in range(2):
        vt1, vs1 = v_fp8_transposed(v[b : b + 1].to(DEV))
        one = attention(q8[b : b + 1], k8[b : b + 1], vt1, qs, ks, vs1, v_transposed=True, variant=variant)
        assert torch.equal(vs1.cpu(), vs[b : b + 1].cpu())
        assert torch.equal(one.float().cpu(), both[b : b + 1].float().cpu())
    # the reference reads the per-row scales the same way
    assert rel_rms(both, attention_ref(q8, k8, vt, qs, ks, vs, v_transposed=True)) < 2e-2


def test_fp8_pv_promotion_and_mma_accumulation_agree():
    q, k, v = qkv(1, 2, 53, 64, seed=3)
    args = prepare_fp8(q, k, v)
    ref = attention_ref(*args[:6], v_transposed=True)
    a = attention(*args[:6], v_transposed=True, pv_promote=True)
    b = attention(*args[:6], v_transposed=True, pv_promote=False)
    assert rel_rms(a, ref) < 2e-2 and rel_rms(b, ref) < 2e-2


def test_strided_bf16_inputs_and_output_layout():
    """The "blhd" buffers of fast.py (views of [B, L, H, hd] memory): read in place by the pointer variant, and the
    output takes q's strides, so out.transpose(1, 2) is a plain [B, L, H, hd] tensor."""
    B, H, L, hd = 2, 3, 21, 32
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv(B, H, L, hd))
    out = attention(q, k, v, variant="ptr")
    assert out.stride() == q.stride() and out.transpose(1, 2).is_contiguous()
    assert rel_rms(out, attention_ref(q, k, v)) < 1e-2


def test_v_fp8_transposed_is_bit_exact_and_saturates():
    v = randn(2, 3, 37, 64, scale=3.0, seed=4).bfloat16()
    vt, s = v_fp8_transposed(v)
    vt_ref, s_ref = v_fp8_transposed_ref(v)
    assert vt.shape == (2, 3, 64, padded_len(37)) == (2, 3, 64, 48) and vt.dtype == E4M3
    assert torch.equal(s.cpu(), s_ref.cpu())
    assert torch.equal(codes(vt), codes(vt_ref))  # the padding columns 37..47 included: zeros in both
    assert s.shape == (2,)  # one scale per batch row
    # strided input (fast.py's "blhd" layout), and amax given (as qk_norm_split gathers it): the same codes
    strided = v.transpose(1, 2).contiguous().transpose(1, 2)
    vt2, s2 = v_fp8_transposed(strided, v.float().abs().amax(dim=(1, 2, 3)))
    assert torch.equal(codes(vt2), codes(vt_ref)) and torch.equal(s2.cpu(), s_ref.cpu())
    # one amax for the whole batch: one scale, as the reference does it
    one = v.float().abs().amax().reshape(1)
    vt1, s1 = v_fp8_transposed(strided, one)
    vt1_ref, s1_ref = v_fp8_transposed_ref(v, one)
    assert s1.shape == (1,) and torch.equal(s1.cpu(), s1_ref.cpu()) and torch.equal(codes(vt1), codes(vt1_ref))
    # an amax below the true one: values beyond the grid clamp to +-448, never NaN (0x7F / 0xFF)
    vt3, _ = v_fp8_transposed(v, v.float().abs().amax().reshape(1) / 4)
    c = codes(vt3)
    assert not ((c & 0x7F) == 0x7F).any()
    assert vt3.float().abs().max() == 448.0


def test_p_scaling_keeps_small_probabilities():
    """P in E4M3 is computed as exp2(s - m + 8) in [0, 256]: probabilities down to 2^-17 keep a code instead of
    flushing below E4M3's 2^-9. One query with a dominant key and many keys at p ~ 1e-4 each: unscaled, they
    would round to zero and their 30% share of the output would vanish."""
    B, H, L, hd = 1, 1, 40, 16
    q = torch.zeros(B, H, L, hd)
    k = torch.zeros(B, H, L, hd)
    q[..., 0] = 1.0
    k[..., 0, 0] = 9.0 * 4  # logit 9 for key 0 (sm_scale = 1/4), 0 for the other 39 keys: p = e^-9 / (1 + ...)
    v = torch.zeros(B, H, L, hd)
    v[..., 0, 1] = 1.0
    v[..., 1:, 2] = 1.0
    q8, qs = fp8_attention.quant_tensor(q.to(DEV))
    k8, ks = fp8_attention.quant_tensor(k.to(DEV))
    vt, vs = v_fp8_transposed_ref(v.to(DEV).bfloat16())
    out = attention(q8, k8, vt, qs, ks, vs, v_transposed=True).float().cpu()
    share = 39 * math.exp(-9) / (1 + 39 * math.exp(-9))  # weight of the small keys: 0.0048
    assert abs(out[0, 0, 0, 2].item() - share) / share < 0.1


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_cpu_fallback_rounds_p_like_the_kernel(temp):
    """fast.fp8_softmax_pv (what attention="fp8" runs without a GPU) rounds P to E4M3 as the kernel does, so a CPU
    picture carries the kernel's error: against the exact softmax over the same operands both err by the same
    amount, and they sit closer to each other than either does to the exact one (their roundings agree where the
    running max already is the row max)."""
    from minisd35.fast import fp8_softmax_pv

    L = 37
    q, k, v = qkv(1, 2, L, 64, temp=temp)
    args = prepare_fp8(q, k, v)
    out = attention(*args[:6], v_transposed=True).float().cpu()
    exact = attention_ref(*args[:6], v_transposed=True).float().cpu()
    q8, k8, vt, qs, ks, vs = (t.cpu() for t in args[:6])
    emulated = fp8_softmax_pv(q8.float() * qs, k8.float() * ks, vt[..., :L].transpose(2, 3).float() * vs)
    e_kernel, e_emulated = rel_rms(out, exact), rel_rms(emulated, exact)
    assert e_kernel > 4e-3 and abs(e_emulated - e_kernel) < 0.25 * e_kernel
    assert rel_rms(out, emulated) < e_kernel


def test_attention_rejects_bad_arguments():
    q, k, v = qkv(1, 2, 9, 16)
    q8, k8, vt, qs, ks, vs, _ = prepare_fp8(q, k, v)
    with pytest.raises(InputError, match="transposed"):
        attention(q8, k8, v.to(E4M3), qs, ks, vs)  # FP8 v in the [B, H, L, hd] layout
    with pytest.raises(InputError, match="q_scale"):
        attention(q8, k8, vt, qs, None, vs, v_transposed=True)
    with pytest.raises(InputError, match="both bf16"):
        attention(q8, k, v, qs, ks, vs)
    with pytest.raises(InputError, match="head dim"):
        attention(*(randn(1, 1, 9, 24).bfloat16() for _ in range(3)))
    with pytest.raises(InputError, match="variant"):
        attention(q, k, v, variant="fast")


# ---------------------------------------------------------------------------------------------------------------
# E4M3 q / k from the QK-norm kernel


@pytest.mark.parametrize("hd", [16, 64])
def test_qk_norm_split_writes_e4m3_with_static_scales(hd):
    from minisd35.fast import qk_fp8_scale
    from minisd35.mmdit import RMSNorm

    B, L, H, Ltot, off = 2, 7, 3, 12, 5
    qkv_ = randn(B * L, 3 * H * hd, scale=2.0, seed=5).bfloat16()
    norm = RMSNorm(hd)
    with torch.no_grad():
        norm.weight.copy_((torch.rand(hd, generator=torch.Generator().manual_seed(6)) + 0.5).bfloat16())
    norm = norm.bfloat16().to(DEV)
    w = norm.weight
    sq = qk_fp8_scale(norm)
    bufs = [torch.zeros(B, H, Ltot, hd, dtype=dt, device=DEV) for _ in range(2) for dt in (E4M3, E4M3, torch.bfloat16)]
    amax = [torch.full((1,), 0.5, device=DEV) for _ in range(2)]  # as if an earlier stream had written |v| <= 0.5
    qk_norm_split(qkv_, B, L, H, hd, w, w, 1e-6, *bufs[:3], off, sq, sq, amax[0])
    qk_norm_split_ref(qkv_, B, L, H, hd, w, w, 1e-6, *bufs[3:], off, sq, sq, amax[1])
    for a, b in zip(bufs[:2], bufs[3:5]):
        assert torch.equal(codes(a), codes(b))
    assert torch.equal(bufs[2].cpu(), bufs[5].cpu())
    # v_amax is raised to max |v| of this stream's v (the third of each qkv row): over all rows for a [1] amax,
    # per batch row for a [B] one (the per-image V scales of fp8_attention)
    v_abs = qkv_.view(B, L, 3, H, hd)[:, :, 2].float().abs()
    assert amax[0].item() == amax[1].item() == v_abs.max().item() > 0.5
    amax_b = [torch.full((B,), 0.5, device=DEV) for _ in range(2)]
    qk_norm_split(qkv_, B, L, H, hd, w, w, 1e-6, *bufs[:3], off, sq, sq, amax_b[0])
    qk_norm_split_ref(qkv_, B, L, H, hd, w, w, 1e-6, *bufs[3:], off, sq, sq, amax_b[1])
    per_row = v_abs.amax(dim=(1, 2, 3)).clamp_min(0.5)
    assert torch.equal(amax_b[0].cpu(), per_row) and torch.equal(amax_b[1].cpu(), per_row)
    assert per_row[0] != per_row[1]
    # dequantised, q is RMSNorm(q) * w to E4M3 precision, and the static bound leaves it inside the grid
    q_bf = torch.zeros(B, H, Ltot, hd, dtype=torch.bfloat16, device=DEV)
    qk_norm_split_ref(qkv_, B, L, H, hd, w, w, 1e-6, q_bf, q_bf.clone(), q_bf.clone(), off)
    sl = slice(off, off + L)
    err = rel_rms(bufs[0][:, :, sl].float() * sq, q_bf[:, :, sl].float())
    assert 5e-3 < err < 0.06
    assert bufs[0].float().abs().max() < 448


def test_static_qk_scale_bounds_every_rmsnorm_output():
    """|RMSNorm(x)_i * w_i| <= sqrt(hd) * max|w|, reached by a one-hot row: no value is clamped, whatever x is."""
    from minisd35.fast import qk_fp8_scale
    from minisd35.mmdit import RMSNorm

    hd = 64
    norm = RMSNorm(hd).bfloat16()
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-2.0, 3.0, hd))
    scale = qk_fp8_scale(norm)
    x = torch.randn(500, hd) * torch.logspace(-3, 3, 500)[:, None]
    x[:64] = torch.eye(hd) * 7.0  # one-hot rows: the bound itself
    y = norm(x.bfloat16()).float()
    assert y.abs().max() <= 448 * scale
    assert y.abs().max() > 0.95 * 448 * scale  # and the bound is tight (the one-hot row at the largest weight)
    assert qk_fp8_scale(torch.nn.Identity()) is None  # no norm weight (SD3 Medium): no static bound


# ---------------------------------------------------------------------------------------------------------------
# the model: fast.py's attention="fp8", and the audit


def test_fast_fp8_attention_against_the_plain_model():
    from test_fp8 import tiny_inputs, tiny_model

    from minisd35 import fp8
    from minisd35.fast import FastMMDiT

    ref = tiny_model(seed=3)
    fp8.quantize(ref, "default")
    inputs = tiny_inputs()
    seen = []
    with torch.no_grad():
        want = ref(*inputs)
        fast = FastMMDiT(ref, attention="fp8")
        fast.probe = lambda name, modules, q, k, v, out: seen.append((name, q.dtype, k.dtype, v.dtype))
        got = fast(*inputs)
        base = FastMMDiT(ref)(*inputs)
    # every attention layer (joint and MMDiT-X attn2) ran on E4M3 q and k, v in the model dtype
    assert [n for n, *_ in seen] == ["joint_blocks.0", "joint_blocks.0.x_block.attn2", "joint_blocks.1",
                                     "joint_blocks.2"]
    assert all(dq == dk == E4M3 and dv == torch.float32 for _, dq, dk, dv in seen)
    # FP8 attention moves the step a little, more than the fused bf16-attention path does
    err, err_base = rel_rms(got, want), rel_rms(base, want)
    assert err_base < 2e-3 < err < 5e-2


def test_fast_fp8_attention_without_qk_norm_stays_bf16():
    """SD3 Medium has no QK norm, so no static q / k bound: attention="fp8" leaves those layers' q and k alone."""
    import dataclasses

    from test_fp8 import tiny_inputs

    from minisd35.config import get_preset
    from minisd35.fast import FastMMDiT
    from minisd35.mmdit import MMDiT
    from minisd35.weights import random_mmdit_state

    cfg = dataclasses.replace(get_preset("tiny").mmdit, qk_norm=False)
    with torch.device("meta"):
        m = MMDiT(cfg)
    m.load_state_dict(random_mmdit_state(cfg, 0, torch.float32), assign=True)
    m.eval()
    inputs = tiny_inputs()
    with torch.no_grad():
        a = FastMMDiT(m, attention="fp8")(*inputs)
        b = FastMMDiT(m)(*inputs)
    assert torch.equal(a, b)


def test_attention_audit_reports_every_layer(tmp_path):
    from test_fp8 import tiny_inputs, tiny_model

    from minisd35.audit import attention_audit

    res = attention_audit(tiny_model(seed=3), tiny_inputs(), tmp_path)
    rows = res["layers"]
    assert len(rows) == 4 and all(r["fp8"] for r in rows)
    for r in rows:
        assert 5e-3 < r["rel_rms"] < 0.1  # an E4M3 attention's isolated error: a few percent
        assert 0 < r["q_range_used"] <= 1 and 0 < r["k_range_used"] <= 1  # the static bound is never exceeded
    assert 0 < res["step_rel_rms"] < res["max_layer_rel_rms"]
    assert (tmp_path / "attention.png").stat().st_size > 1000 and (tmp_path / "attention.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# the compiled GPU path, without a GPU: every variant builds for Hopper without register spills, and the pointer
# variant for Ada (sm89: FP8 tensor cores, no TMA)

_AOT_SCRIPT = r'''
A = fp8_attention
class Ada:  # what the pre-Hopper prune reads from its q argument: an sm89 CUDA device
    device = type("D", (), {"type": "cuda", "index": 0})()
A.capability = lambda dev: (8, 9)
def strides(*names):
    return {n: "i32" for n in names}
common = {"o_ptr": "*bf16", "qs_ptr": "*fp32", "ks_ptr": "*fp32", "vs_ptr": "*fp32", "vs_stride": "i32",
          "sm_scale": "fp32", "L": "i32",
          "H": "i32", **strides("stride_qb", "stride_qh", "stride_ql", "stride_ob", "stride_oh", "stride_ol")}
ptr_sig = {**common, **strides("stride_kb", "stride_kh", "stride_kl", "stride_vb", "stride_vh", "stride_vl",
                               "stride_vd")}
for mode, qdt, vdt, vt in [("bf16", "bf16", "bf16", False), ("fp8", "fp8e4nv", "fp8e4nv", True)]:
    consts = dict(HD=64, HAS_SCALES=mode == "fp8", PV_FP8=vt, V_T=vt, PROMOTE=True, DOT_F32=False, ROUND_FIRST=False)
    for cfg in A.ATTN_CONFIGS[:4]:
        sig = {**ptr_sig, "q_ptr": f"*{qdt}", "k_ptr": f"*{qdt}", "v_ptr": f"*{vdt}"}
        build(f"ptr {mode} {cfg}", A._attn_ptr_kernel, sig, consts, cfg=cfg)
        bn = cfg.kwargs["BLOCK_N"]
        tsig = {**common, "q_ptr": f"*{qdt}", "k_desc": f"tensordesc<{qdt}[{bn}, 64]>",
                "v_desc": f"tensordesc<{vdt}[64, {bn}]>" if vt else f"tensordesc<{vdt}[{bn}, 64]>"}
        build(f"tma {mode} {cfg}", A._attn_tma_kernel, tsig, {**consts, "WARP_SPEC": False}, cfg=cfg)
    for cfg in A._prune_pre_hopper(A.ATTN_CONFIGS, {"q_ptr": Ada()}):
        build(f"ptr {mode} sm89 {cfg}", A._attn_ptr_kernel, {**ptr_sig, "q_ptr": f"*{qdt}", "k_ptr": f"*{qdt}",
              "v_ptr": f"*{vdt}"}, consts, arch=89, cfg=cfg)
    for cfg in A.WS_CONFIGS:
        bn = cfg.kwargs["BLOCK_N"]
        tsig = {**common, "q_ptr": f"*{qdt}", "k_desc": f"tensordesc<{qdt}[{bn}, 64]>",
                "v_desc": f"tensordesc<{vdt}[64, {bn}]>" if vt else f"tensordesc<{vdt}[{bn}, 64]>"}
        build(f"ws {mode} {cfg}", A._attn_tma_kernel, tsig, {**consts, "WARP_SPEC": True}, cfg=cfg)
build("v_fp8_t", A._v_fp8_t_kernel, {"v_ptr": "*bf16", "vt_ptr": "*fp8e4nv", "amax_ptr": "*fp32",
      "scale_ptr": "*fp32", "amax_stride": "i32", "L": "i32", "Lp": "i32", "H": "i32",
      **strides("stride_vb", "stride_vh", "stride_vl", "stride_tb", "stride_th", "stride_td")},
      dict(HD=64, ROUND_FIRST=False, BLOCK_L=A.V_BLOCK_L), warps=4)
'''


@pytest.mark.slow
def test_attention_kernels_compile_for_the_gpu():
    builds = run_aot(_AOT_SCRIPT)
    assert len(builds) == 2 * (4 * 2 + 2 + len(fp8_attention.WS_CONFIGS)) + 1
    for r in builds:
        assert r["shared"] <= {90: 227, 89: 99}[r["arch"]] * 1024, r["name"]
        assert r["stack"] in (0, None), f"{r['name']}: {r['stack']} bytes of register spills"
