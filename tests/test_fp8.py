"""FP8 core on the CPU (reference path): quantisation error levels, saturation, policies and their counts,
quantize -> save -> load round trips, ComfyUI scaled-fp8 files (both spellings), plain e4m3 files, bad scales."""

import json

import pytest
import torch

from minisd35 import fp8
from minisd35.checkpoint import open_file, save_safetensors
from minisd35.config import get_preset
from minisd35.errors import CheckpointError, InputError
from minisd35.fp8 import E4M3, FP8Linear, get_policy, quantize, quantize_act, quantize_weight
from minisd35.mmdit import MMDiT
from minisd35.weights import load_mmdit, random_mmdit_state, save_mmdit

CFG = get_preset("tiny").mmdit


def rel_rms(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def tiny_model(seed=0, dtype=torch.float32):
    with torch.device("meta"):
        m = MMDiT(CFG)
    m.load_state_dict(random_mmdit_state(CFG, seed, dtype), assign=True)
    return m.eval()


def tiny_inputs(B=2, h=12, w=10, L=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 16, h, w, generator=g), torch.tensor([900.0, 250.0])[:B],
            torch.randn(B, L, CFG.context_dim, generator=g), torch.randn(B, CFG.pooled_dim, generator=g))


def test_e4m3_error_levels():
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(67, 301, generator=g), torch.randn(45, 301, generator=g)
    exact = a @ w.t()
    a8, sa = quantize_act(a, per_token=True)
    w8, sw = quantize_weight(w, per_channel=True)
    err = rel_rms((a8.float() * sa[:, None]) @ (w8.float() * sw[:, None]).t(), exact)
    assert 0.01 < err < 0.08  # one quantised operand pair: a few percent, as 3 mantissa bits predict
    # one operand alone: ~2-4% relative RMS rounding error
    assert 0.01 < rel_rms(w8.float() * sw[:, None], w) < 0.05


def test_saturation_and_zero_rows():
    x = torch.tensor([[1.0, -2.0, 3.0], [0.0, 0.0, 0.0]])
    x8, s = quantize_act(x, per_token=True)
    assert torch.isfinite(x8.float()).all() and float(s[1]) > 0  # zero row: floored scale, zeros out, no NaN
    assert torch.equal(x8[1].float(), torch.zeros(3))
    # a static scale that is too small: values beyond 448 saturate to +-448, never NaN
    x8, _ = quantize_act(torch.tensor([[465.0, -1000.0, 5000.0, 3.0]]), scale=torch.ones(1))
    assert x8.float().tolist() == [[448.0, -448.0, 448.0, 3.0]]


@pytest.mark.parametrize("outlier,hurts", [(1e2, False), (1e5, True)])
def test_outliers_and_tensor_scaling(outlier, hurts):
    """E4M3 is a float: a per-tensor scale set by a 100x outlier leaves the other values in the normal range
    (down to 2^-6 of 448), so it costs almost nothing (unlike int8). Only outliers beyond ~448 / 2^-6 = 28672x
    the typical value push the rest into subnormals, where row-wise scaling is needed."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g)
    w[5, 7] = outlier
    keep = torch.arange(64) != 5
    row = rel_rms(fp8.dequantize(*quantize_weight(w, per_channel=True))[keep], w[keep])
    tensor = rel_rms(fp8.dequantize(*quantize_weight(w, per_channel=False))[keep], w[keep])
    assert (tensor > 3 * row) if hurts else (tensor < 1.05 * row)


def test_default_policy_counts():
    m = tiny_model()
    rep = quantize(m, "default")
    # tiny: 3 blocks (block 0 MMDiT-X, block 2 context_pre_only): 29 block linears + 7 embedder/final = 36
    assert rep.total == 36
    assert rep.converted == {"w8a8-row": 23, "w8-only": 6}
    assert set(rep.kept) == {"t_embedder.mlp.0", "t_embedder.mlp.2", "y_embedder.mlp.0", "y_embedder.mlp.2",
                             "context_embedder", "final_layer.adaLN_modulation.1", "final_layer.linear"}
    assert "converted 29 of 36 linears (w8-only 6, w8a8-row 23), kept 7" in str(rep)
    layers = fp8.fp8_layers(m)
    assert layers["joint_blocks.0.x_block.attn2.qkv"].recipe == "w8a8-row"
    assert layers["joint_blocks.2.context_block.adaLN_modulation.1"].recipe == "w8-only"


def test_policy_first_match_wins_and_errors(tmp_path):
    pol = get_policy([("joint_blocks.1.*", "bf16"), ("joint_blocks.*.mlp.*", "w8-only"), ("*", "bf16")])
    assert pol.recipe_for("joint_blocks.1.x_block.mlp.fc1") == ("bf16", "joint_blocks.1.*")
    assert pol.recipe_for("joint_blocks.0.x_block.mlp.fc1")[0] == "w8-only"
    with pytest.raises(InputError, match="unknown recipe 'fp4'"):
        get_policy([("*", "fp4")])
    with pytest.raises(InputError, match="unknown FP8 policy 'fastest'"):
        get_policy("fastest")
    path = pol.save(tmp_path / "p.json")
    assert get_policy(str(path)).rules == pol.rules
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="bad.json"):
        get_policy(str(tmp_path / "bad.json"))


@pytest.mark.parametrize("policy", ["default", "row", "tensor", "weight-only"])
def test_quantized_model_close_to_bf16(policy):
    ref = tiny_model()
    q = tiny_model()
    quantize(q, policy, keep_original=True)
    x, t, ctx, pooled = tiny_inputs()
    with torch.no_grad():
        y_ref, y_q = ref(x, t, ctx, pooled), q(x, t, ctx, pooled)
        with fp8.original_weights(q):
            y_orig = q(x, t, ctx, pooled)
    assert torch.equal(y_orig, y_ref)  # A/B on the original weights reproduces the bf16 model exactly
    err = rel_rms(y_q, y_ref)
    assert torch.isfinite(y_q).all() and 1e-4 < err < 0.15, err


def test_original_weights_needs_them():
    q = tiny_model()
    quantize(q, "default")
    with pytest.raises(InputError, match="keep_original=True"):
        with fp8.original_weights(q):
            pass


def test_storage_dtypes_survive_to():
    q = tiny_model()
    quantize(q, "default")
    q.to(torch.bfloat16)
    lin = q.joint_blocks[1].x_block.mlp.fc1
    assert lin.weight.dtype == E4M3 and lin.weight_scale.dtype == torch.float32 and lin.bias.dtype == torch.bfloat16
    x, t, ctx, pooled = tiny_inputs()
    y = q(x.bfloat16(), t, ctx.bfloat16(), pooled.bfloat16())
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_calibrated_static_scales():
    q = tiny_model()
    quantize(q, "tensor")
    x, t, ctx, pooled = tiny_inputs()
    lin = q.joint_blocks[1].x_block.mlp.fc2
    seen = []
    h = lin.register_forward_pre_hook(lambda mod, args: seen.append(args[0].abs().amax()))
    with fp8.calibrate(q):
        q(x, t, ctx, pooled)
    h.remove()
    assert torch.allclose(lin.input_scale, torch.stack(seen).max() / 448)
    assert torch.isfinite(q(x, t, ctx, pooled)).all()


def test_quantize_save_load_round_trip(tmp_path):
    q = tiny_model()
    quantize(q, "default")
    path = fp8.save_quantized(q, tmp_path / "q.safetensors", policy=get_policy("default"), source="tiny",
                              prefix="model.diffusion_model.",
                              extra_metadata={"minisd35.mmdit_config": json.dumps(CFG.to_diffusers())})
    meta = open_file(path).files[0].metadata
    assert json.loads(meta["minisd35.fp8_policy"])["name"] == "default" and meta["minisd35.source"] == "tiny"
    loaded = load_mmdit(path, dtype=torch.float32)
    a, b = q.state_dict(), loaded.state_dict()
    assert set(a) == set(b)
    for k in a:  # bit-exact: fp8 codes, fp32 scales, biases
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8) if a[k].dtype == E4M3 else a[k],
                                                        b[k].view(torch.uint8) if b[k].dtype == E4M3 else b[k]), k
    recipes = lambda model: {n: m.recipe for n, m in fp8.fp8_layers(model).items()}
    assert recipes(loaded) == recipes(q)
    x, t, ctx, pooled = tiny_inputs()
    assert torch.equal(loaded(x, t, ctx, pooled), q(x, t, ctx, pooled))


def comfy_file(tmp_path, spelling: str, with_input_scale=False):
    """A ComfyUI-style scaled-fp8 MMDiT single file: block linears in e4m3 with per-tensor fp32 scalar scales."""
    state = random_mmdit_state(CFG, seed=5)
    out, deq = {}, {}
    for k, v in state.items():
        layer = k.rsplit(".", 1)[0]
        if k.endswith(".weight") and k.startswith("joint_blocks.") and v.ndim == 2:
            s = v.abs().max() / 448
            w8 = (v / s).clamp(-448, 448).to(E4M3)
            out[k] = w8
            deq[k] = w8.float() * s
            if spelling == "legacy":
                out[f"{layer}.scale_weight"] = s.reshape(())
                if with_input_scale:
                    out[f"{layer}.scale_input"] = torch.tensor(0.5)
            else:
                out[f"{layer}.weight_scale"] = s.reshape(())
                out[f"{layer}.comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
        else:
            out[k] = v.to(torch.bfloat16)
            deq[k] = v.to(torch.bfloat16).float()
    prefix = "model.diffusion_model."
    tensors = {prefix + k: v for k, v in out.items()}
    if spelling == "legacy":
        tensors[prefix + "scaled_fp8"] = torch.zeros(0, dtype=E4M3)
    meta = {"minisd35.mmdit_config": json.dumps(CFG.to_diffusers())}
    path = save_safetensors(tensors, tmp_path / f"comfy_{spelling}.safetensors", meta)
    return path, deq


@pytest.mark.parametrize("spelling", ["legacy", "new"])
def test_comfy_scaled_fp8(tmp_path, spelling):
    path, deq = comfy_file(tmp_path, spelling, with_input_scale=True)
    m = load_mmdit(path, dtype=torch.float32)
    layers = fp8.fp8_layers(m)
    assert len(layers) == 29  # every block linear stays FP8 in memory (not upcast on load)
    for name, lin in layers.items():
        assert lin.weight.dtype == E4M3
        assert torch.equal(fp8.dequantize(lin.weight, lin.weight_scale), deq[name + ".weight"]), name
    # the same numbers as a bf16 model built from the dequantised weights, up to activation quantisation
    ref = tiny_model()
    ref.load_state_dict(deq)
    x, t, ctx, pooled = tiny_inputs()
    quantize(m, "bf16")
    with torch.no_grad():
        err = rel_rms(m(x, t, ctx, pooled), ref(x, t, ctx, pooled))
    assert err < 0.1


def test_plain_e4m3_file_and_nan_codes(tmp_path):
    state = random_mmdit_state(CFG, seed=2)
    k = "joint_blocks.1.x_block.mlp.fc1.weight"
    state[k] = (state[k] * 10).to(E4M3)  # no scale: scale 1
    path = save_mmdit(state, CFG, tmp_path / "plain.safetensors")
    with pytest.warns(UserWarning, match="no scale"):
        m = load_mmdit(path, dtype=torch.float32)
    lin = m.joint_blocks[1].x_block.mlp.fc1
    assert isinstance(lin, FP8Linear) and lin.weight_scale.tolist() == [1.0]
    assert torch.equal(lin.weight.view(torch.uint8), state[k].view(torch.uint8))
    bad = state[k].view(torch.uint8).clone()
    bad[0, :3] = 0x7F  # NaN codes
    state[k] = bad.view(E4M3)
    path = save_mmdit(state, CFG, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match=r"mlp\.fc1\.weight.*3 NaN codes"):
        load_mmdit(path)


@pytest.mark.parametrize("bad,msg", [(0.0, "zero, negative or NaN"), (-1.0, "zero, negative or NaN"),
                                     (float("nan"), "zero, negative or NaN"), ("shape", "expected 1 .* or")])
def test_bad_scales(tmp_path, bad, msg):
    path, _ = comfy_file(tmp_path, "new")
    ck = open_file(path)
    tensors = {k: ck.get(k) for k in ck.keys()}
    key = "model.diffusion_model.joint_blocks.0.x_block.mlp.fc2.weight_scale"
    tensors[key] = torch.ones(3) if bad == "shape" else torch.tensor(bad)
    path = save_safetensors(tensors, tmp_path / "bad.safetensors", ck.metadata)
    with pytest.raises(CheckpointError, match=rf"mlp\.fc2\.weight_scale.*{msg}"):
        load_mmdit(path)


def test_impl_resolution(monkeypatch):
    cpu = torch.device("cpu")
    assert fp8.resolve_impl(cpu) == "ref"
    monkeypatch.setenv("MINISD35_FP8_IMPL", "cuda-magic")
    with pytest.raises(InputError, match="unknown FP8 implementation 'cuda-magic'"):
        fp8.resolve_impl(cpu)
    with pytest.raises(InputError):
        fp8.set_impl("nope")


def test_quantize_on_load_equals_quantize_after(tmp_path):
    """load_mmdit(fp8=policy) quantises each weight as it is read; the result is bit-identical to loading in full
    precision and quantising afterwards, and the report counts the same."""
    path = save_mmdit(random_mmdit_state(CFG, seed=4), CFG, tmp_path / "m.safetensors")
    on_load = load_mmdit(path, dtype=torch.float32, fp8="default")
    after = load_mmdit(path, dtype=torch.float32)
    rep = quantize(after, "default")
    assert str(on_load.quant_report) == str(rep)
    a, b = on_load.state_dict(), after.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k].view(torch.uint8) if a[k].dtype == E4M3 else a[k],
                           b[k].view(torch.uint8) if b[k].dtype == E4M3 else b[k]), k
