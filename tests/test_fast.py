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
def test_fast_matches_plain(policy):
    ref = tiny_model(seed=3)
    if policy:
        fp8.quantize(ref, policy)
    x, t, ctx, pooled = tiny_inputs()
    with torch.no_grad():
        want = ref(x, t, ctx, pooled)
        want_skip = ref(x, t, ctx, pooled, skip_layers=[1])
        fast = FastMMDiT(ref)
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
