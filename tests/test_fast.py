"""The fused fast forward (fast.py) computes what the plain model computes: on the CPU its fused ops run their
torch fallbacks, so this checks the restructured block (batched adaLN GEMV, fused prologue/epilogue placement,
q/k split into the attention buffers, MMDiT-X, the pre-only last block, skip_layers) against mmdit.py, for bf16
and every FP8 policy. The CUDA kernels behind the fallbacks are checked in test_kernels.py and on the GPU."""

import pytest
import torch
from test_fp8 import rel_rms, tiny_inputs, tiny_model

from minisd35 import fp8
from minisd35.fast import FastMMDiT, Graphed, accelerate


@pytest.mark.parametrize("policy", [None, "default", "row", "tensor", "weight-only"])
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_fast_matches_plain(policy, layout):
    ref = tiny_model(seed=3)
    if policy:
        fp8.quantize(ref, policy)
    x, t, ctx, pooled = tiny_inputs()
    with torch.no_grad():
        want = ref(x, t, ctx, pooled)
        want_skip = ref(x, t, ctx, pooled, skip_layers=[1])
        fast = FastMMDiT(ref)
        fast.attention_layout = layout
        got, got_skip = fast(x, t, ctx, pooled), fast(x, t, ctx, pooled, skip_layers=[1])
    # bf16 weights: rounding-level agreement. FP8: the batched adaLN GEMV changes the last bits of the modulations,
    # and activation quantisation turns a last-bit difference at a rounding boundary into a one-code (6%) flip of
    # that element; a few such flips give ~5e-4, still 80x below FP8's own error vs bf16 (~4%).
    tol = 1e-5 if policy is None else 2e-3
    assert rel_rms(got, want) < tol and rel_rms(got_skip, want_skip) < tol
    assert rel_rms(got_skip, got) > 1e-2


def test_fast_bf16_and_weights_shared():
    ref = tiny_model(seed=4, dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    x, t, ctx, pooled = (a.bfloat16() if a.is_floating_point() and a.ndim > 1 else a for a in tiny_inputs())
    with torch.no_grad():
        want = ref(x, t, ctx, pooled)
        fast = accelerate(ref)  # on the CPU Graphed just calls through
        got = fast(x, t, ctx, pooled)
    assert isinstance(fast, Graphed) and got.dtype == torch.bfloat16
    assert rel_rms(got, want) < 1e-2
    # fusing the adaLN weights into one buffer re-points the modules at views: the state dict is unchanged
    after = ref.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    w = ref.joint_blocks[1].x_block.adaLN_modulation[1].weight
    assert w.data_ptr() != before["joint_blocks.1.x_block.adaLN_modulation.1.weight"].data_ptr()


@pytest.mark.parametrize("policy", [None, "default"])
def test_streamed_forward_matches_resident(policy):
    """Streamed mode (streaming.BlockStreamer): the joint blocks visit the device one at a time, with `ahead` blocks
    prefetched; the result is exactly the resident fused forward's (same modules, same order of operations), the
    skipped blocks of skip-layer guidance are neither run nor fetched, and after the pass no block is left on the
    device. On the CPU the "device" is the CPU, so this checks the bookkeeping; tests/test_gpu.py checks the
    streams and the memory on a GPU."""
    from minisd35.fast import stream

    ref = tiny_model(seed=5)
    if policy:
        fp8.quantize(ref, policy)
    x, t, ctx, pooled = tiny_inputs()
    with torch.no_grad():
        resident = accelerate(ref, graphs=False, fuse_adaln=False)
        want, want_skip = resident(x, t, ctx, pooled), resident(x, t, ctx, pooled, skip_layers=[1])
        streamed = stream(ref, torch.device("cpu"), ahead=1)
        s = streamed.streamer
        entered = []
        enter = s.enter
        s.enter = lambda i, skip=(): (entered.append((i, sorted(s.ready))), enter(i, skip))[1]
        got = streamed(x, t, ctx, pooled)
        assert not s.ready and s.max_resident == 2
        assert [i for i, _ in entered] == list(range(ref.cfg.depth))
        assert all(on in ([], [i]) for i, on in entered)  # block i was prefetched by block i-1 (or is the first)
        entered.clear()
        got_skip = streamed(x, t, ctx, pooled, skip_layers=[1])
        assert [i for i, _ in entered] == [i for i in range(ref.cfg.depth) if i != 1]
        assert all(1 not in on for _, on in entered) and not s.ready
    assert torch.equal(got, want) and torch.equal(got_skip, want_skip)


def test_bench_config_names():
    """`minisd35 bench --configs`: each '+'-joined name becomes accelerate() keywords; an unknown option fails with
    its name."""
    from minisd35.bench import fast_options
    from minisd35.errors import InputError

    assert fast_options("attn-fp8+fast-accum") == {"attention": "fp8", "fast_accum": True}
    assert fast_options("triton-gemm") == {"gemm": "triton"}
    assert fast_options("gluon-gemm+attn-fp8") == {"gemm": "gluon", "attention": "fp8"}
    with pytest.raises(InputError, match="'fast'"):
        fast_options("attn-fp8+fast")
