"""GPU checks (run on the device machine: `python -m pytest -m gpu tests/test_gpu.py`; skipped without CUDA).

- the full-size SD3.5 Large and Medium MMDiT (random weights) against diffusers in bf16 and fp16, 1024 px, CFG
  batch 2: relative RMS error, finiteness, forward time of both (written to $OUT/gpu_tests.json when OUT is set);
- the three FP8 implementations (ref, torch._scaled_mm, triton) agree on real SD3.5 layer shapes;
- the fused forward (fast.py) with its Triton kernels equals the plain forward, and SDPA keeps the attention
  buffers' layout (the proj GEMMs read its output without a copy); attention="triton" / "fp8" eager and graphed,
  and the attention kernel's variants at an SD3.5 shape;
- every FP8 GEMM variant a user may pick finishes and agrees with the reference ("ws" is refused); the Gluon GEMM
  with each epilogue on odd shapes, its error at K = 9728 that of precise accumulation;
- the weight-only kernel's uint8 bit-decoding path (for GPUs whose Triton has no fp8 type) equals the fp8 path;
  its FMA GEMV with programmatic dependent launch reads x only after the previous kernel wrote it (sm90+);
- the autotuners' timing helper allocates an L2-sized flush buffer and agrees with triton.testing.do_bench;
- determinism: the same seed gives byte-identical PNGs twice, in bf16 and in FP8.
"""

import io
import json
import os

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

RESULTS: dict = {}


@pytest.fixture(scope="module", autouse=True)
def write_results():
    yield
    out = os.environ.get("OUT")
    if out and RESULTS:
        with open(os.path.join(out, "gpu_tests.json"), "w") as f:
            json.dump(RESULTS, f, indent=1)


def rel_rms(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("variant", ["sd3.5-large", "sd3.5-medium"])
def test_full_size_parity_with_diffusers(variant):
    from minisd35.bench import cuda_times, diffusers_from_mmdit, random_mmdit, stats, step_inputs
    from minisd35.config import get_preset

    torch.cuda.empty_cache()
    cfg = get_preset(variant).mmdit
    model = random_mmdit(cfg)
    dm = diffusers_from_mmdit(model)
    x, t, ctx, pooled = step_inputs(cfg, 1024, 2)
    rec = {}
    with torch.inference_mode():
        for dtype in (torch.bfloat16, torch.float16):
            model.to(dtype)
            dm.to(dtype)
            inp = (x.to(dtype), t, ctx.to(dtype), pooled.to(dtype))
            ours = model(*inp)
            call = lambda: dm(hidden_states=inp[0], timestep=t, encoder_hidden_states=inp[2],
                              pooled_projections=inp[3], return_dict=False)[0]
            theirs = call()
            err = rel_rms(ours, theirs)
            rec[str(dtype)] = {"rel_rms": err, "finite": bool(torch.isfinite(ours).all()),
                               "ours_ms": stats(cuda_times(lambda: model(*inp), iters=5))["median_ms"],
                               "diffusers_ms": stats(cuda_times(call, iters=5))["median_ms"]}
            assert torch.isfinite(ours).all() and torch.isfinite(theirs).all()
            assert err <= 2e-2, (variant, dtype, err)
    RESULTS[f"parity_{variant}"] = rec


SHAPES = [(8858, 2432, 7296), (8858, 9728, 2432), (666, 2432, 2432), (2, 2432, 14592), (67, 1536, 4608)]


@pytest.mark.parametrize("recipe", ["w8a8-row", "w8a8-tensor", "w8-only"])
def test_fp8_implementations_agree(recipe):
    from minisd35 import fp8

    torch.manual_seed(0)
    rec = {}
    for M, K, N in SHAPES:
        lin = torch.nn.Linear(K, N, device="cuda", dtype=torch.bfloat16)
        q = fp8.FP8Linear.from_linear(lin, recipe)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        outs = {}
        for impl in ("ref", "torch", "triton"):
            q.impl = impl
            outs[impl] = q(x)
        exact = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
        e = {f"{a}_vs_ref": rel_rms(outs[a], outs["ref"]) for a in ("torch", "triton")}
        e["ref_vs_fp32"] = rel_rms(outs["ref"], exact)
        rec[f"{M}x{K}x{N}"] = e
        assert e["triton_vs_ref"] < 5e-3 and e["torch_vs_ref"] < 5e-3, (recipe, M, K, N, e)
        assert e["ref_vs_fp32"] < 0.08
    RESULTS[f"impls_{recipe}"] = rec


@pytest.mark.parametrize("policy", [None, "default", "row"])
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_fast_forward_with_its_kernels_matches_plain(policy, layout):
    """fast.py on CUDA, where every fused op is its Triton kernel (test_fast.py runs the torch fallbacks): the tiny
    model in bf16, MMDiT-X blocks and the pre-only last block included, against the plain mmdit.py forward."""
    from test_fp8 import tiny_inputs, tiny_model

    from minisd35 import fp8
    from minisd35.fast import FastMMDiT

    ref = tiny_model(seed=3, dtype=torch.bfloat16).cuda()
    if policy:
        fp8.quantize(ref, policy)
    x, t, ctx, pooled = (a.cuda().bfloat16() if a.ndim > 1 else a.cuda() for a in tiny_inputs())
    with torch.inference_mode():
        want = ref(x, t, ctx, pooled).float()
        fast = FastMMDiT(ref)
        fast.attention_layout = layout
        got = fast(x, t, ctx, pooled).float()
    err = rel_rms(got, want)
    RESULTS[f"fast_vs_plain_{policy}_{layout}"] = err
    assert torch.isfinite(got).all() and err < 1e-2, (policy, err)


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_attention_output_is_in_the_query_layout(layout):
    """The default SDPA backend writes its output in q's memory layout, whichever fast.attention_buffers made, and
    the proj GEMMs' quantiser reads it in place (a different layout would still be read correctly: this pins what
    the step's profile assumes)."""
    from minisd35.fast import attention_buffers, quant_rows

    B, H, L, hd = 2, 38, 4429, 64
    like = torch.empty(1, device="cuda", dtype=torch.bfloat16)
    q, k, v = attention_buffers(B, H, L, hd, like, layout)
    for t in (q, k, v):
        t.normal_()
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert out.stride() == q.stride(), (out.stride(), q.stride())
    ref = torch.nn.functional.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
    assert rel_rms(out, ref) < 1e-2
    part = out.transpose(1, 2)[:, 4096:]  # the text tokens, as the context stream's proj reads them
    a8, s8 = quant_rows(part)
    want = ref.transpose(1, 2)[:, 4096:].reshape(-1, H * hd).float()
    assert rel_rms(a8.float() * s8[:, None], want) < 0.05


@pytest.mark.parametrize("attention", ["triton", "fp8"])
def test_fast_forward_with_triton_attention_graphed(attention):
    """fast.py's attention="triton" / "fp8" on CUDA (kernels/fp8_attention.py, E4M3 q / k from the QK-norm kernel,
    v quantised and transposed on the device): eager and CUDA-graphed runs agree, and the FP8 error against the
    plain model stays at the level the CPU tests bound."""
    from test_fp8 import tiny_inputs, tiny_model

    from minisd35 import fp8
    from minisd35.fast import accelerate

    ref = tiny_model(seed=3, dtype=torch.bfloat16).cuda()
    fp8.quantize(ref, "default")
    inputs = tuple(a.cuda().bfloat16() if a.ndim > 1 else a.cuda() for a in tiny_inputs())
    with torch.inference_mode():
        want = ref(*inputs).float()
        eager = accelerate(ref, graphs=False, attention=attention)(*inputs).float()
        graphed = accelerate(ref, attention=attention)
        got = graphed(*inputs).float()
        again = graphed(*inputs).float()
    err = rel_rms(got, want)
    RESULTS[f"fast_attention_{attention}"] = err
    assert torch.isfinite(got).all() and torch.equal(got, again)
    assert rel_rms(got, eager) < 1e-3
    assert err < (1e-2 if attention == "triton" else 5e-2), err


@pytest.mark.parametrize("variant", ["ptr", "tma", "ws"])
def test_attention_kernel_at_sd35_shape(variant):
    """kernels/fp8_attention.py at SD3.5 Large 512 px's joint shape (L = 1357: a partial last key block) against the
    fp32 reference, bf16 and FP8."""
    from kernels.fp8_attention import attention, attention_ref, prepare_fp8

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 38, 1357, 64, device="cuda", generator=g).bfloat16() for _ in range(3))
    ref = attention_ref(q, k, v)
    err = rel_rms(attention(q, k, v, variant=variant), ref)
    args = prepare_fp8(q, k, v)
    err8 = rel_rms(attention(*args[:6], v_transposed=True, variant=variant), ref)
    RESULTS[f"attention_{variant}"] = {"bf16": err, "fp8": err8}
    assert err < 1e-2 and 1e-2 < err8 < 0.1, (err, err8)
    # one V scale per batch row: each image's output is what it is alone, bit for bit
    both = attention(*args[:6], v_transposed=True, variant=variant)
    one = attention(args[0][1:], args[1][1:], args[2][1:], args[3], args[4], args[5][1:], v_transposed=True,
                    variant=variant)
    assert torch.equal(one, both[1:])


def test_pipeline_speed_options():
    """load_pipeline(attention="fp8", fast_accum=True) on CUDA: the graphed fused forward with FP8 attention and
    unpromoted FP8 GEMMs; the final latents stay within a few percent of the default FP8 pipeline's."""
    from minisd35.pipeline import load_pipeline
    from minisd35.tiny import tiny_root

    kw = dict(prompt="a red circle", seed=3, steps=4)
    lat = {}
    for name, opts in {"default": {}, "fast": {"attention": "fp8", "fast_accum": True}}.items():
        pipe = load_pipeline(tiny_root(), device="cuda", fp8="default", preset="tiny", **opts)
        assert pipe.denoiser.model.attention_backend == ("fp8" if opts else "auto")  # Graphed(FastMMDiT)
        *_, last = pipe.steps(**kw)
        lat[name] = last.latents.float()
    err = rel_rms(lat["fast"], lat["default"])
    RESULTS["pipeline_speed_options"] = err
    assert torch.isfinite(lat["fast"]).all() and 1e-3 < err < 5e-2, err


def test_autotuning_flushes_with_an_l2_sized_buffer():
    # the autotuners' timing (kernels._common.tune_bench) allocates one L2-sized flush buffer, not Triton's 256 MB,
    # and measures what a CUDA-event timing of the same call measures
    from kernels._common import tune_bench

    x = torch.randn(64 * 2**20 // 4, device="cuda")  # 64 MB: a copy takes tens of microseconds
    y = torch.empty_like(x)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    med, p20, p80 = tune_bench(lambda: y.copy_(x))
    extra = torch.cuda.max_memory_allocated() - base
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    assert extra <= l2 + 2**20 < 256 * 2**20, (extra, l2)
    assert 0 < p20 <= med <= p80
    import triton.testing

    ref = triton.testing.do_bench(lambda: y.copy_(x))
    assert 0.7 < med / ref < 1.4, (med, ref)
    # graph_bench (the same flush, the calls replayed in a CUDA graph) agrees on a call the host launches quickly
    from kernels._common import graph_bench

    gmed, g20, g80 = graph_bench(lambda: y.copy_(x))
    assert 0 < g20 <= gmed <= g80 and 0.7 < gmed / med < 1.3, (gmed, med)


@pytest.mark.parametrize("variant", ["default", "add", "tma", "persistent"])
def test_fp8_gemm_variants_at_an_sd35_shape(variant):
    # every GEMM variant a user may pick runs to completion and computes the product (K = 2432, M and N not
    # multiples of the tiles); "ws" deadlocks with Triton 3.6 on an H200, so it is refused, not launched
    from kernels._common import rel_rms as rr
    from kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref
    from kernels.fp8_quant import quant_fp8_ref
    from minisd35.errors import HardwareError

    torch.manual_seed(2)
    a, sa = quant_fp8_ref(torch.randn(1000, 2432, device="cuda"))
    w, sw = quant_fp8_ref(torch.randn(2500, 2432, device="cuda") * 0.02)
    bias = torch.randn(2500, device="cuda", dtype=torch.bfloat16)
    ref = fp8_gemm_ref(a, sa, w, sw, bias)
    for fast in (False, True):
        assert rr(fp8_gemm(a, sa, w, sw, bias, fast_accum=fast, variant=variant), ref) < 5e-3, (variant, fast)
    if os.environ.get("MINISD35_GEMM_WS") != "1":
        with pytest.raises(HardwareError, match="deadlock"):
            fp8_gemm(a, sa, w, sw, bias, variant="ws")


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0), reason="Hopper")
@pytest.mark.parametrize("variant", ["pipelined", "ws"])
def test_gluon_gemm_matches_the_reference(variant):
    # the Gluon GEMMs (precise accumulation, epilogue fused) on odd shapes (one K tile, an odd and an even number of
    # K tiles, N off the tile; (3000, 512, 1500) gives the persistent variant 2-3 output tiles per program), with
    # each epilogue, against fp8_gemm_ref; and the error at K = 9728 is the precise path's (an accumulator without
    # promotion is 3x worse there on zero-mean data)
    from kernels._common import rel_rms as rr
    from kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref
    from kernels.fp8_gemm_gluon import fp8_gemm_gluon
    from kernels.fp8_quant import quant_fp8_ref

    torch.manual_seed(3)
    for M, K, N in [(1, 80, 40), (67, 2432, 300), (130, 1536, 257), (3000, 512, 1500), (1000, 9728, 2432)]:
        a, sa = quant_fp8_ref(torch.randn(M, K, device="cuda"))
        w, sw = quant_fp8_ref(torch.randn(N, K, device="cuda") * 0.05)
        bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
        gate = torch.randn(1, N, device="cuda", dtype=torch.bfloat16)
        res = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        for kw in ({}, {"act": "gelu_tanh"}, {"gate": gate, "residual": res, "rows_per_batch": M}):
            ref = fp8_gemm_ref(a, sa, w, sw, bias, **kw)
            assert rr(fp8_gemm_gluon(a, sa, w, sw, bias, variant=variant, **kw), ref) < 5e-3, (M, K, N, list(kw))
    exact = (a.double() * sa[:, None].double()) @ (w.double() * sw[:, None].double()).t() + bias.double()
    err = rr(fp8_gemm_gluon(a, sa, w, sw, bias, out_dtype=torch.float32, variant=variant), exact)
    assert err < 2 * rr(fp8_gemm(a, sa, w, sw, bias, out_dtype=torch.float32), exact) + 1e-6, err


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0), reason="Hopper")
def test_gluon_ws_split_tail_is_exact_and_repeatable():
    # the WS kernel's split tail (split_schedule): the last partial wave's tiles cut along K, each owner summing the
    # others' fp32 partials in a fixed order. Shapes: proj at M = 8858 (1330 tiles, 10 split 5 ways), one with
    # fewer tiles than SMs (split-K throughout), and one whose tail is split 2 ways after 2 whole tiles per program.
    # Each against the reference, repeated (the same bits every call: no atomics in the sum), replayed in a CUDA
    # graph (the counts' memset is captured with it), and within bf16 rounding of the unsplit schedule
    from kernels._common import rel_rms as rr
    from kernels.fp8_gemm import fp8_gemm_ref
    from kernels.fp8_gemm_gluon import GLUON_WS_CONFIGS, fp8_gemm_gluon
    from kernels.fp8_quant import quant_fp8_ref

    torch.manual_seed(5)
    unsplit, split = ({**GLUON_WS_CONFIGS[0], "SPLIT_TAIL": on} for on in (False, True))
    for M, K, N in [(8858, 2432, 2432), (300, 9728, 1000), (3000, 512, 1500)]:
        a, sa = quant_fp8_ref(torch.randn(M, K, device="cuda"))
        w, sw = quant_fp8_ref(torch.randn(N, K, device="cuda") * 0.05)
        bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
        ref = fp8_gemm_ref(a, sa, w, sw, bias)
        outs = [fp8_gemm_gluon(a, sa, w, sw, bias, config=split) for _ in range(4)]
        assert rr(outs[0], ref) < 5e-3, (M, K, N)
        assert all(torch.equal(outs[0], o) for o in outs[1:]), (M, K, N)
        assert rr(outs[0], fp8_gemm_gluon(a, sa, w, sw, bias, config=unsplit)) < 2e-3, (M, K, N)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            graphed = fp8_gemm_gluon(a, sa, w, sw, bias, config=split)
        for _ in range(3):
            graphed.fill_(float("nan"))
            g.replay()
            torch.cuda.synchronize()
            assert torch.equal(graphed, outs[0]), (M, K, N)


def test_dequant_bitcast_path_matches():
    from kernels.fp8_dequant_gemm import dequant_gemm

    torch.manual_seed(1)
    for M, K, N in [(2, 2432, 14592), (8858, 2432, 2432), (5, 1000, 333)]:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = (torch.randn(N, K, device="cuda") * 40).clamp(-448, 448).to(torch.float8_e4m3fn)
        s = torch.rand(N, device="cuda") + 0.5
        a = dequant_gemm(x, w, s, None, bitcast=False)
        b = dequant_gemm(x, w, s, None, bitcast=True)
        # the decode is exact (checked on all 256 codes on the CPU); the two kernels may pick different tiles, so
        # their bf16 outputs can differ by a rounding in a few elements
        assert rel_rms(a, b) < 1e-4, (M, K, N)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0), reason="PDL: sm90")
@pytest.mark.parametrize("graphed", [False, True])
@pytest.mark.parametrize("feed", ["torch", "gemv"])
def test_dequant_gemv_pdl_reads_x_after_the_wait(feed, graphed):
    # 20 back-to-back GEMVs with pdl=True on distinct weights, each one's x written by the kernel just before it: a
    # torch kernel (feed="torch"), or the previous GEMV itself (feed="gemv": x is a view of its output, and that
    # GEMV lets its successor launch early). A GEMV that read x before its griddepcontrol.wait would see the
    # buffer's old contents. Eager, and replayed in a CUDA graph, where the captured launches keep their PDL edges;
    # replayed twice, with a different x0 the second time (a stale read would then see the first replay's x).
    from kernels.fp8_dequant_gemm import dequant_gemm, dequant_gemm_ref, pdl_supported
    from kernels.fp8_quant import quant_fp8_ref

    assert pdl_supported(torch.device("cuda"))
    torch.manual_seed(4)
    M, K, N = 2, 2432, 6 * 2432  # SD3.5 Large's adaLN
    ws = [quant_fp8_ref(torch.randn(N, K, device="cuda") / K**0.5) for _ in range(20)]  # outputs stay ~N(0, 1)
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16) * 0.1
    x0 = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)

    def chain():
        xs, ys = [], []
        for i, (w, s) in enumerate(ws):
            if i == 0:
                x = x0 * 1.0001
            else:
                prev = ys[-1][:, (i % 6) * K : (i % 6 + 1) * K]
                x = prev * 1.0001 if feed == "torch" else prev
            xs.append(x)
            ys.append(dequant_gemm(x, w, s, bias, pdl=True))
        return xs, ys

    def check(xs, ys):
        torch.cuda.synchronize()
        for i, (x, y) in enumerate(zip(xs, ys)):
            assert rel_rms(y, dequant_gemm_ref(x, *ws[i], bias)) < 1e-2, (feed, graphed, i)

    xs, ys = chain()  # also compiles the kernel, outside any capture
    check(xs, ys)
    if graphed:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            xs, ys = chain()
        for sign in (1, -1):
            x0.mul_(sign)
            g.replay()
            check(xs, ys)


@pytest.mark.parametrize("policy", [None, "default"])
def test_same_seed_same_png(tmp_path, policy):
    from minisd35.pipeline import load_pipeline
    from minisd35.tiny import tiny_root

    pngs = []
    for _ in range(2):
        pipe = load_pipeline(tiny_root(), device="cuda", fp8=policy, preset="tiny")
        img = pipe("a red circle", seed=3, steps=4)[0]
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        pngs.append(buf.getvalue())
    RESULTS[f"determinism_{policy or 'bf16'}"] = pngs[0] == pngs[1]
    assert pngs[0] == pngs[1]
