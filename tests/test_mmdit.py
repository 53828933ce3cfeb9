"""MMDiT parity with diffusers' SD3Transformer2DModel, through the real file formats.

Random diffusers models (SD3-, SD3.5-Large- and SD3.5-Medium-style configs) are saved with save_pretrained (single
and sharded), converted to a Stability single file, loaded by minisd35.load_mmdit, and run on the same inputs
(batch > 1, non-square latents, skip_layers). The Stability layout itself is checked against diffusers' own
Stability -> diffusers converter.
"""

import json

import pytest
import torch

from minisd35.checkpoint import open_file
from minisd35.config import MMDiTConfig, check_against_preset, detect_variant, mmdit_config_from_shapes
from minisd35.errors import CheckpointError, ConfigError, InputError
from minisd35.weights import load_mmdit, random_mmdit_state, save_mmdit

diffusers = pytest.importorskip("diffusers")
from diffusers import SD3Transformer2DModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers  # noqa: E402

CONFIGS = {
    "sd3": MMDiTConfig(depth=3, heads=3, head_dim=16, context_dim=40, pooled_dim=24, pos_embed_max_size=12),
    "sd35-large": MMDiTConfig(depth=3, heads=3, head_dim=16, context_dim=40, pooled_dim=24, pos_embed_max_size=12,
                              qk_norm=True),
    "sd35-medium": MMDiTConfig(depth=4, heads=2, head_dim=16, context_dim=40, pooled_dim=24, pos_embed_max_size=16,
                               qk_norm=True, dual_attention_layers=(0, 2)),
}


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def random_diffusers_model(cfg: MMDiTConfig, seed: int = 0) -> SD3Transformer2DModel:
    """A diffusers model with every parameter random (norm weights near 1), so no block is an identity."""
    torch.manual_seed(seed)
    dm = SD3Transformer2DModel(**cfg.to_diffusers()).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in dm.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / max(p[0].numel(), 1) ** 0.5)
    return dm


def inputs(cfg: MMDiTConfig, B=3, h=10, w=14, L=7, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, h, w, generator=g)
    t = torch.rand(B, generator=g) * 1000
    ctx = torch.randn(B, L, cfg.context_dim, generator=g)
    pooled = torch.randn(B, cfg.pooled_dim, generator=g)
    return x.to(dtype), t, ctx.to(dtype), pooled.to(dtype)


def run_diffusers(dm, x, t, ctx, pooled, skip=None):
    with torch.no_grad():
        return dm(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled,
                  skip_layers=skip, return_dict=False)[0]


@pytest.fixture(scope="module", params=list(CONFIGS))
def saved(request, tmp_path_factory):
    """(cfg, diffusers model, diffusers folder, sharded folder, Stability file) for one config."""
    name = request.param
    cfg = CONFIGS[name]
    dm = random_diffusers_model(cfg)
    root = tmp_path_factory.mktemp(name)
    dm.save_pretrained(root / "transformer")
    dm.save_pretrained(root / "sharded", max_shard_size="40KB")
    m = load_mmdit(root / "transformer", dtype=torch.float32)
    stab = root / "sd3_single.safetensors"
    save_mmdit(m.state_dict(), cfg, stab, layout="stability")
    return name, cfg, dm, root, stab


def test_stability_layout_matches_diffusers_converter(saved):
    """Our Stability-named weights, run through diffusers' own Stability -> diffusers converter, reproduce the
    diffusers model's state dict exactly (qkv fusion order and the (shift, scale) swaps are right)."""
    _, cfg, dm, _, stab = saved
    ck = open_file(stab)
    sd = {k: ck.get(k) for k in ck.keys()}
    converted = convert_sd3_transformer_checkpoint_to_diffusers(sd)
    ref = dm.state_dict()
    assert set(converted) == set(ref)
    for k in ref:
        assert torch.equal(converted[k], ref[k]), k


@pytest.mark.parametrize("source", ["folder", "root", "sharded", "stability"])
def test_fp32_parity(saved, source):
    name, cfg, dm, root, stab = saved
    path = {"folder": root / "transformer", "root": root, "sharded": root / "sharded", "stability": stab}[source]
    if source == "root":  # a diffusers model root holds transformer/ (plus other components we ignore here)
        (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    m = load_mmdit(path, dtype=torch.float32)
    x, t, ctx, pooled = inputs(cfg)
    ours = m(x, t, ctx, pooled)
    ref = run_diffusers(dm, x, t, ctx, pooled)
    assert ours.shape == ref.shape == x.shape
    assert rel_rms(ours, ref) <= 1e-5


def test_skip_layers_parity(saved):
    _, cfg, dm, root, _ = saved
    m = load_mmdit(root / "transformer", dtype=torch.float32)
    x, t, ctx, pooled = inputs(cfg, B=2, h=8, w=8)
    ref_full = run_diffusers(dm, x, t, ctx, pooled)
    for skip in ([1], [0, 1]):
        ours = m(x, t, ctx, pooled, skip_layers=skip)
        ref = run_diffusers(dm, x, t, ctx, pooled, skip=skip)
        assert rel_rms(ours, ref) <= 1e-5
        assert rel_rms(ours, ref_full) > 1e-3  # skipping really changes the output


def test_bf16_parity(saved):
    _, cfg, dm, root, stab = saved
    x, t, ctx, pooled = inputs(cfg)
    ref32 = run_diffusers(dm, x, t, ctx, pooled)
    m = load_mmdit(stab, dtype=torch.bfloat16)
    ours = m(x.bfloat16(), t, ctx.bfloat16(), pooled.bfloat16())
    assert ours.dtype == torch.bfloat16
    dm16 = random_diffusers_model(cfg).to(torch.bfloat16)
    ref16 = run_diffusers(dm16, x.bfloat16(), t, ctx.bfloat16(), pooled.bfloat16())
    assert rel_rms(ours, ref16) <= 2e-2
    assert rel_rms(ours, ref32) <= 2e-2


def test_config_from_file(saved):
    name, cfg, dm, root, stab = saved
    ck = open_file(stab).sub("model.diffusion_model.")
    shapes = {k: ck.shape(k) for k in ck.keys()}
    if not cfg.qk_norm:  # without ln_q nothing in the file says head_dim; real models use 64 and this one does not
        with pytest.raises(ConfigError, match="not a multiple of head_dim 64"):
            mmdit_config_from_shapes(shapes)
        return
    derived = mmdit_config_from_shapes(shapes)
    assert derived == MMDiTConfig(**{**cfg.__dict__, "sample_size": derived.sample_size})


def test_real_configs_detected():
    """The shape-based detection recognises each released architecture, checked on meta-device models."""
    from minisd35.config import PRESETS
    from minisd35.mmdit import MMDiT

    for name in ("sd3-medium", "sd3.5-medium", "sd3.5-large"):
        with torch.device("meta"):
            m = MMDiT(PRESETS[name].mmdit)
        shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
        cfg = mmdit_config_from_shapes(shapes)
        assert detect_variant(cfg) == name
        check_against_preset(cfg, name)
    # Large's 8.06 B parameters (without pos_embed), as counted in the architecture spec
    with torch.device("meta"):
        large = MMDiT(PRESETS["sd3.5-large"].mmdit)
    assert sum(p.numel() for p in large.parameters()) == 8_056_627_520
    with pytest.raises(ConfigError, match="sd3.5-large"):
        check_against_preset(mmdit_config_from_shapes({k: tuple(v.shape) for k, v in large.state_dict().items()}),
                             "sd3.5-medium")


def test_latent_size_errors(saved):
    _, cfg, _, root, _ = saved
    m = load_mmdit(root / "transformer", dtype=torch.float32)
    x, t, ctx, pooled = inputs(cfg, B=1, h=9, w=8)
    with pytest.raises(InputError, match="multiple of the patch size"):
        m(x, t, ctx, pooled)
    P = cfg.pos_embed_max_size
    x, t, ctx, pooled = inputs(cfg, B=1, h=2 * P + 2, w=8)
    with pytest.raises(InputError, match=f"largest image side this model covers is {cfg.max_image_side} px"):
        m(x, t, ctx, pooled)
    x, t, ctx, pooled = inputs(cfg, B=1, h=2 * P, w=2)  # the largest allowed side runs
    assert m(x, t, ctx, pooled).shape == x.shape


# --- strict loading: each problem is one clear error naming the file and the keys ---------------------------------

@pytest.fixture(scope="module")
def tiny_state():
    cfg = CONFIGS["sd35-medium"]
    return cfg, random_mmdit_state(cfg, seed=3)


def test_missing_key(tmp_path, tiny_state):
    cfg, state = tiny_state
    bad = dict(state)
    del bad["joint_blocks.1.x_block.mlp.fc2.weight"]
    path = save_mmdit(bad, cfg, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match=r"m\.safetensors.*1 missing: joint_blocks\.1\.x_block\.mlp\.fc2\.weight"):
        load_mmdit(path)


def test_unexpected_key(tmp_path, tiny_state):
    cfg, state = tiny_state
    bad = dict(state, **{"joint_blocks.0.x_block.extra.weight": torch.randn(3)})
    path = save_mmdit(bad, cfg, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match=r"1 unexpected: joint_blocks\.0\.x_block\.extra\.weight"):
        load_mmdit(path)


def test_wrong_shape(tmp_path, tiny_state):
    cfg, state = tiny_state
    bad = dict(state)
    bad["joint_blocks.2.context_block.mlp.fc1.bias"] = torch.randn(5)
    path = save_mmdit(bad, cfg, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match=r"wrong shape: joint_blocks\.2\.context_block\.mlp\.fc1\.bias: file \[5"):
        load_mmdit(path)


def test_nan_weights_reported(tmp_path, tiny_state):
    cfg, state = tiny_state
    bad = dict(state)
    w = bad["joint_blocks.1.x_block.attn.qkv.weight"].clone()
    w[3, 4] = float("nan")
    bad["joint_blocks.1.x_block.attn.qkv.weight"] = w
    path = save_mmdit(bad, cfg, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match=r"joint_blocks\.1\.x_block\.attn\.qkv\.weight.*1 NaN/Inf"):
        load_mmdit(path)


def test_diffusers_round_trip(tmp_path, tiny_state):
    """Stability -> diffusers folder (sharded) -> load: bit-identical weights."""
    cfg, state = tiny_state
    save_mmdit(state, cfg, tmp_path / "transformer", layout="diffusers", shards=3)
    m = load_mmdit(tmp_path, dtype=torch.float32)
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_input_file_untouched(tmp_path, tiny_state):
    cfg, state = tiny_state
    path = save_mmdit(state, cfg, tmp_path / "m.safetensors")
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    load_mmdit(path)
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before


def test_from_diffusers_model_in_memory(saved):
    _, cfg, dm, _, _ = saved
    from minisd35.weights import mmdit_from_diffusers_model

    m = mmdit_from_diffusers_model(dm)
    x, t, ctx, pooled = inputs(cfg)
    assert rel_rms(m(x, t, ctx, pooled), run_diffusers(dm, x, t, ctx, pooled)) <= 1e-5
