"""The SD3 VAE against diffusers' AutoencoderKL: small random configs written as real checkpoint files (a diffusers
vae/ folder, and Stability single files converted with vae_to_ldm), loaded both ways, compared on odd latent sizes."""

import json
import math
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from minisd35.checkpoint import open_folder, save_safetensors
from minisd35.config import VAEConfig
from minisd35.errors import CheckpointError, ConfigError, HardwareError, InputError
from minisd35.vae import (
    VAE,
    _ramp,
    _tile_starts,
    diffusers_config,
    from_pil,
    load_vae,
    random_vae_state,
    to_pil,
    vae_to_ldm,
    write_random_vae,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL  # noqa: E402
from diffusers.image_processor import VaeImageProcessor  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402

torch.set_grad_enabled(False)

CFG_A = VAEConfig(block_out_channels=(32, 64, 64, 64), layers_per_block=2, norm_groups=8)  # SD3's shape, narrow
CFG_B = VAEConfig(block_out_channels=(32, 48, 64), layers_per_block=1, norm_groups=16)  # 3 levels: factor 4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module", params=[CFG_A, CFG_B], ids=["A-4lvl-lpb2", "B-3lvl-lpb1"])
def folder(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    write_random_vae(root / "vae", request.param, seed=1)
    return root, request.param


def diffusers_vae(path, dtype=torch.float32):
    return AutoencoderKL.from_pretrained(path, torch_dtype=dtype).eval()


def test_config_json_is_diffusers_autoencoderkl(folder):
    root, cfg = folder
    c = json.loads((root / "vae" / "config.json").read_text())
    assert c["use_quant_conv"] is False and c["use_post_quant_conv"] is False and c["mid_block_add_attention"]
    ref = diffusers_vae(root / "vae")
    assert ref.quant_conv is None and ref.post_quant_conv is None
    assert tuple(ref.config.block_out_channels) == cfg.block_out_channels
    assert ref.config.scaling_factor == cfg.scaling_factor and ref.config.shift_factor == cfg.shift_factor


def test_real_sd3_architecture_keys_and_sizes():
    """At SD3's real size (built on the meta device): the same keys and shapes as diffusers' AutoencoderKL with
    SD3's vae/config.json, and the parameter counts of the spec (encoder 34,274,208 + decoder 49,545,475)."""
    with torch.device("meta"):
        ours = VAE(VAEConfig())
        ref = AutoencoderKL(**{k: v for k, v in diffusers_config(VAEConfig()).items() if not k.startswith("_")})
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert mine == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.encoder.parameters()) == 34_274_208
    assert sum(p.numel() for p in ours.decoder.parameters()) == 49_545_475
    ldm = vae_to_ldm(ours.state_dict())
    assert {"decoder.up.3.block.2.conv2.weight", "decoder.up.1.upsample.conv.weight", "encoder.norm_out.bias",
            "encoder.down.1.block.0.nin_shortcut.weight", "decoder.mid.attn_1.proj_out.weight"} <= ldm.keys()
    assert ldm["decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert ldm["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)  # LDM up.0 = diffusers' last


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_matches_diffusers_from_folder(folder, dtype):
    root, cfg = folder
    ref = diffusers_vae(root / "vae", dtype)
    ours = load_vae(root, dtype=dtype)  # the model root holding vae/
    assert ours.config == cfg and ours.dtype == dtype
    lat = torch.randn(2, 16, 5, 7, generator=torch.Generator().manual_seed(0)).to(dtype)
    want = ref.decode(lat / cfg.scaling_factor + cfg.shift_factor).sample  # what the SD3 pipeline does
    got = ours.decode(lat)
    assert got.shape == (2, 3, 5 * cfg.downscale, 7 * cfg.downscale) and got.dtype == dtype
    assert rel(got, want) < 1e-5
    # same ops in the same memory layouts (channels-last after the mid attention, as diffusers): bit-identical
    assert torch.equal(got, want)


def test_load_from_vae_folder_and_decoder_only(folder):
    root, cfg = folder
    full = load_vae(root / "vae", dtype=torch.float32)
    dec = load_vae(root / "vae", dtype=torch.float32, with_encoder=False)
    assert dec.encoder is None and not any(k.startswith("encoder.") for k in dec.state_dict())
    lat = torch.randn(1, 16, 3, 5)
    assert torch.equal(full.decode(lat), dec.decode(lat))
    with pytest.raises(InputError, match="with_encoder"):
        dec.encode(torch.zeros(1, 3, 16, 16))


@pytest.mark.parametrize("prefix", ["first_stage_model.", ""])
def test_stability_single_file(folder, tmp_path, prefix):
    root, cfg = folder
    state = {k: open_folder(root / "vae", "diffusion_pytorch_model").get(k) for k in
             open_folder(root / "vae", "diffusion_pytorch_model").keys()}
    ldm = vae_to_ldm(state)
    assert ldm["decoder.mid.attn_1.q.weight"].shape == (cfg.block_out_channels[-1],) * 2 + (1, 1)
    assert "decoder.up.0.block.0.conv1.weight" in ldm and "encoder.down.0.downsample.conv.weight" in ldm
    # diffusers' own LDM->diffusers converter must map our LDM names back onto the original state dict
    back = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in ldm.items()}, diffusers_config(cfg))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)

    tensors = {prefix + k: v for k, v in ldm.items()}
    if prefix:  # an all-in-one file: the MMDiT beside the VAE is ignored
        tensors["model.diffusion_model.x_embedder.proj.weight"] = torch.zeros(64, 16, 2, 2)
    f = save_safetensors(tensors, tmp_path / "sd3.5_tiny.safetensors")
    # shapes give everything but the GroupNorm group count (and scale/shift): pass those in the config
    ours = load_vae(f, dtype=torch.float32, config=cfg)
    assert ours.config == cfg
    ref = diffusers_vae(root / "vae")
    lat = torch.randn(2, 16, 7, 5, generator=torch.Generator().manual_seed(1))
    assert rel(ours.decode(lat), ref.decode(lat / cfg.scaling_factor + cfg.shift_factor).sample) < 1e-5
    img = torch.rand(1, 3, 8 * cfg.downscale, 4 * cfg.downscale) * 2 - 1
    assert rel(ours.encoder(img), ref.encode(img).latent_dist.parameters) < 1e-5


def test_encode_matches_diffusers(folder):
    root, cfg = folder
    ref, ours = diffusers_vae(root / "vae"), load_vae(root, dtype=torch.float32)
    f = cfg.downscale
    img = torch.rand(2, 3, 6 * f, 10 * f, generator=torch.Generator().manual_seed(2)) * 2 - 1
    dist = ref.encode(img).latent_dist
    mean, logvar = ours.encoder(img).chunk(2, dim=1)
    assert rel(mean, dist.mean) < 1e-5 and rel(logvar.clamp(-30, 20), dist.logvar) < 1e-5
    scale, shift = cfg.scaling_factor, cfg.shift_factor
    # sampled latents, same generator: eps is drawn identically, so the samples agree like the means do
    want = (dist.sample(torch.Generator().manual_seed(7)) - shift) * scale
    assert rel(ours.encode(img, generator=torch.Generator().manual_seed(7)), want) < 1e-5
    # img2img with one generator per image: diffusers encodes image i alone with generator i
    gens = lambda: [torch.Generator().manual_seed(s) for s in (3, 4)]  # noqa: E731
    want = torch.cat([ref.encode(img[i : i + 1]).latent_dist.sample(g) for i, g in enumerate(gens())])
    assert rel(ours.encode(img, generator=gens()), (want - shift) * scale) < 1e-5
    assert rel(ours.encode(img, sample=False), (dist.mode() - shift) * scale) < 1e-5
    with pytest.raises(InputError, match="multiples"):
        ours.encode(img[:, :, 1:])


def test_to_pil_and_from_pil_match_diffusers_image_processor():
    proc = VaeImageProcessor(vae_scale_factor=8)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 13, 17, generator=g) * 2.6 - 1.3  # beyond [-1, 1] too: clamping
    x[0, 0, 0, :6] = torch.tensor([-1.0, 1.0, 0.0, 1 / 255, 0.5 / 255 * 2 - 1, 1.5 / 255 * 2 - 1])  # edges, ties
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ours = [np.asarray(im) for im in to_pil(x.to(dtype))]
        want = [np.asarray(im) for im in proc.postprocess(x.to(dtype), output_type="pil")]
        assert all(o.dtype == np.uint8 and np.array_equal(o, w) for o, w in zip(ours, want, strict=True))
    pil = [Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)) for _ in range(2)]
    assert torch.equal(from_pil(pil), proc.preprocess(pil))
    assert from_pil(pil[0], dtype=torch.bfloat16).shape == (1, 3, 24, 40)
    with pytest.raises(InputError, match="one size"):
        from_pil([pil[0], pil[0].resize((16, 24))])


def test_loading_is_strict_and_errors_name_file_and_keys(tmp_path):
    cfg = CFG_B
    state = random_vae_state(cfg, seed=0)
    ldm = vae_to_ldm(state)
    # missing tensor
    gone = "decoder.up.1.block.0.conv2.bias"
    f = save_safetensors({k: v for k, v in ldm.items() if k != gone}, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match=r"m\.safetensors.*1 missing: decoder\.up_blocks\.1\.resnets\.0\.conv2"):
        load_vae(f, config=cfg)
    # a decoder-only file needs with_encoder=False
    f = save_safetensors({k: v for k, v in ldm.items() if k.startswith("decoder.")}, tmp_path / "d.safetensors")
    with pytest.raises(CheckpointError, match="with_encoder=False"):
        load_vae(f, config=cfg)
    assert load_vae(f, config=cfg, with_encoder=False).encoder is None
    # wrong shape: a diffusers folder whose config.json says more channels than the weights have
    d = write_random_vae(tmp_path / "vae", cfg, seed=0)
    c = json.loads((d / "config.json").read_text())
    c["block_out_channels"] = [32, 48, 80]
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match=r"wrong shape: .*\(expected"):
        load_vae(d)
    # SD1/SDXL-style quant convs are unexpected keys, with a hint
    f = save_safetensors({**ldm, "quant_conv.weight": torch.zeros(32, 32, 1, 1)}, tmp_path / "q.safetensors")
    with pytest.raises(CheckpointError, match=r"1 unexpected: quant_conv\.weight.*SD1/SDXL"):
        load_vae(f, config=cfg)
    c.update(block_out_channels=[32, 48, 64], use_quant_conv=True)
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(ConfigError, match="use_quant_conv"):
        load_vae(d)
    clip = {"text_model.embeddings.token_embedding.weight": torch.zeros(4, 4)}
    f = save_safetensors(clip, tmp_path / "c.safetensors")
    with pytest.raises(CheckpointError, match="no VAE in this file"):
        load_vae(f)
    # a config that contradicts the shapes
    f = save_safetensors(ldm, tmp_path / "ok.safetensors")
    with pytest.raises(ConfigError, match="not the given"):
        load_vae(f, config=CFG_A)
    # NaN weights are reported at load time
    bad = dict(ldm)
    bad["decoder.conv_out.bias"] = torch.tensor([0.0, float("nan"), 0.0])
    f = save_safetensors(bad, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match=r"decoder\.conv_out\.bias.*NaN"):
        load_vae(f, config=cfg)


# ---------------------------------------------------------------------------------------------------------------------
# Tiled decoding.

@pytest.mark.parametrize("n,tile,overlap", [(72, 24, 8), (40, 16, 8), (37, 16, 4), (17, 16, 8), (100, 64, 16),
                                            (50, 20, 10), (9, 32, 8), (33, 12, 0)])
def test_tile_layout_and_weights_partition_of_unity(n, tile, overlap):
    s = _tile_starts(n, tile, overlap)
    t = min(tile, n)
    assert s[0] == 0 and s[-1] + t == n and all(b > a for a, b in zip(s, s[1:]))
    assert all(a + t - b >= overlap for a, b in zip(s, s[1:]))  # consecutive tiles overlap by at least `overlap`
    f = 8
    total = torch.zeros(n * f)
    for k, x in enumerate(s):
        w = _ramp(s, k, t, f, "cpu")
        assert w.min() > 0 and w.max() <= 1
        total[x * f : (x + t) * f] += w
    triple = any(s[k + 2] < s[k] + t for k in range(len(s) - 2))
    if not triple:  # where only two tiles meet, the linear ramps are complementary: no renormalisation needed
        assert torch.allclose(total, torch.ones_like(total), atol=1e-6)


@pytest.fixture(scope="module")
def tiling_vae():
    cfg = VAEConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_groups=8)
    m = VAE(cfg)
    m.load_state_dict(random_vae_state(cfg, seed=0))
    return m.eval()


def column_steps(d: torch.Tensor) -> torch.Tensor:
    """Per pixel-column boundary: the largest step of the row-averaged signal (per image and channel). A seam (two
    tiles that disagree, cut hard) shows up as a step at the border; averaging over rows removes pixel noise."""
    p = d.mean(dim=2)
    return (p[..., 1:] - p[..., :-1]).abs().amax(dim=(0, 1))


def test_tiled_decode_close_to_full_and_seamless(tiling_vae):
    m, f = tiling_vae, 8
    z = torch.randn(1, 16, 16, 72, generator=torch.Generator().manual_seed(0))  # statistically uniform latents
    full = m.decode(z)
    assert torch.equal(m.decode(z, tile=80), full)  # one tile covering everything is the full decode
    tiled = m.decode(z, tile=24, overlap=8)
    errs = {24: rel(tiled, full), 32: rel(m.decode(z, tile=32, overlap=16), full)}
    # A random VAE is far more sensitive to context than a trained one (GroupNorm statistics and the mid attention
    # are per tile), so "close" is relative: more context per tile, less error, and well below a hard cut's.
    assert errs[32] < errs[24] < 0.2 and errs[32] < 0.1
    xs = _tile_starts(72, 24, 8)
    borders = sorted({f * x - 1 for x in xs[1:]} | {f * (x + 24) - 1 for x in xs[:-1]})
    steps = column_steps(tiled - full)
    away = torch.ones_like(steps, dtype=torch.bool)
    away[borders] = False
    assert steps[borders].max() <= steps[away].max()  # no seam: tile borders are no worse than elsewhere
    # the same measure does see the seams of hard-cut tiles (no overlap, no blending)
    cut = torch.cat([m.decoder(z[..., x : x + 24] / 1.5305 + 0.0609) for x in (0, 24, 48)], dim=3)
    assert column_steps(cut - full)[[f * 24 - 1, f * 48 - 1]].max() > 3 * steps.max()
    assert rel(cut, full) > 2 * errs[24]


def test_auto_tiling_under_a_memory_budget(tiling_vae):
    m = tiling_vae
    z = torch.randn(2, 16, 20, 28, generator=torch.Generator().manual_seed(1))
    full = m.decode(z)
    one, two = m.decode_memory_bytes(1, 20, 28), m.decode_memory_bytes(2, 20, 28)
    assert two == 2 * one and m.decode_memory_bytes(1, 40, 28) == 2 * one  # linear in batch and area
    assert torch.equal(m.decode(z, max_memory_bytes=two), full)  # fits: no tiling
    assert rel(m.decode(z, max_memory_bytes=one), full) < 1e-5  # one image at a time: same up to conv batching
    budget = one // 3
    tile = max(t for t in range(8, 29) if m.decode_memory_bytes(1, t, t) <= budget)
    auto = m.decode(z, max_memory_bytes=budget)
    assert torch.equal(auto, torch.cat([m.decode(z[i : i + 1], tile=tile) for i in range(2)]))
    assert rel(auto, full) > 1e-3  # it really tiled
    with pytest.raises(HardwareError, match="budget"):
        m.decode(z, max_memory_bytes=1000)
    with pytest.raises(InputError, match="overlap"):
        m.decode(z, tile=8, overlap=8)


class LiveTensorPeak(TorchDispatchMode):
    """Peak bytes of tensor storages alive at once, tracked op by op (storages freed when their last tensor dies)."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def _free(self, key):
        n, size = self.live[key]
        self.live[key] = (n - 1, size)
        if n == 1:
            del self.live[key]
            self.now -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                n, size = self.live.get(st.data_ptr(), (0, st.nbytes()))
                if n == 0:
                    self.now += size
                    self.peak = max(self.peak, self.now)
                self.live[st.data_ptr()] = (n + 1, size)
                weakref.finalize(t, self._free, st.data_ptr())
        return out


@pytest.mark.parametrize("widths,lpb,shape", [((32, 64, 64, 64), 1, (1, 24, 16)), ((64, 32, 48), 2, (2, 12, 20)),
                                              ((16, 16, 256), 2, (1, 10, 14))])
def test_memory_estimate_covers_measured_peak(widths, lpb, shape):
    cfg = VAEConfig(block_out_channels=widths, layers_per_block=lpb, norm_groups=8)
    m = VAE(cfg, with_encoder=False)
    m.load_state_dict({k: v for k, v in random_vae_state(cfg, 0).items() if k.startswith("decoder.")})
    z = torch.randn(shape[0], 16, shape[1], shape[2])
    with LiveTensorPeak() as tracker:
        out = m.decoder(z)
    del out
    est = m.decode_memory_bytes(*shape)
    assert tracker.peak <= est <= 1.5 * tracker.peak, (tracker.peak, est)


def test_random_vae_is_deterministic_and_sensible():
    a, b = random_vae_state(CFG_B, 5), random_vae_state(CFG_B, 5)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["decoder.conv_in.weight"], random_vae_state(CFG_B, 6)["decoder.conv_in.weight"])
    m = VAE(CFG_B)
    m.load_state_dict(a)
    img = m.decode(torch.randn(1, 16, 6, 6))
    assert 0.1 < img.std().item() < 3 and math.isfinite(img.abs().max().item())
    assert F.mse_loss(img, torch.zeros_like(img)) > 0
