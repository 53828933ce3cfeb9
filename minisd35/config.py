"""Configurations: one dataclass per component, named presets, per-variant sampler defaults, and the reverse
direction, deriving an MMDiT config from a checkpoint's keys and shapes (used to detect a file's variant and to
cross-check a chosen preset).

The four real variants share everything but the MMDiT (text encoders, VAE and scheduler are identical):

    variant            depth  hidden  heads  pos table  qk_norm  MMDiT-X dual-attention blocks
    sd3-medium           24    1536     24    192x192     no      -
    sd3.5-medium         24    1536     24    384x384     yes     0..12
    sd3.5-large          38    2432     38    192x192     yes     -
    sd3.5-large-turbo    38    2432     38    192x192     yes     -     (same network as Large, timestep-distilled)

head_dim is always 64 in the real models, so hidden = 64 * depth = 64 * heads. `tiny` is a 3-block model at width
64 that runs on a CPU in milliseconds and still exercises every feature (QK RMSNorm, a dual-attention block, the
context_pre_only last block); its text encoders and VAE are equally small.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from .errors import ConfigError


@dataclass(frozen=True)
class MMDiTConfig:
    depth: int = 24  # number of joint blocks (diffusers: num_layers); the last one is context_pre_only
    heads: int = 24
    head_dim: int = 64
    patch_size: int = 2
    in_channels: int = 16  # latent channels of the SD3 VAE
    out_channels: int = 16
    context_dim: int = 4096  # width of the text tokens fed in (T5-XXL's d_model; diffusers: joint_attention_dim)
    pooled_dim: int = 2048  # CLIP-L pooled (768) | CLIP-G pooled (1280)
    pos_embed_max_size: int = 192  # the stored positional table is a pos_embed_max_size^2 grid of patches
    qk_norm: bool = False  # RMSNorm on q and k per head (SD3.5)
    dual_attention_layers: tuple[int, ...] = ()  # MMDiT-X blocks with a second, image-only attention (SD3.5 Medium)
    mlp_ratio: int = 4
    sample_size: int = 128  # default latent side (1024 px)

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    @property
    def max_image_side(self) -> int:
        """Largest height/width in pixels the positional table covers (VAE factor 8)."""
        return self.pos_embed_max_size * self.patch_size * 8

    def to_diffusers(self) -> dict:
        return dict(sample_size=self.sample_size, patch_size=self.patch_size, in_channels=self.in_channels,
                    num_layers=self.depth, attention_head_dim=self.head_dim, num_attention_heads=self.heads,
                    joint_attention_dim=self.context_dim, caption_projection_dim=self.hidden,
                    pooled_projection_dim=self.pooled_dim, out_channels=self.out_channels,
                    pos_embed_max_size=self.pos_embed_max_size, dual_attention_layers=tuple(self.dual_attention_layers),
                    qk_norm="rms_norm" if self.qk_norm else None)

    @classmethod
    def from_diffusers(cls, c: dict, source: str = "config.json") -> MMDiTConfig:
        try:
            heads, head_dim = int(c["num_attention_heads"]), int(c["attention_head_dim"])
            cin = int(c.get("in_channels", 16))
            cfg = cls(depth=int(c["num_layers"]), heads=heads, head_dim=head_dim,
                      patch_size=int(c.get("patch_size", 2)), in_channels=cin,
                      out_channels=int(c.get("out_channels") or cin),
                      context_dim=int(c.get("joint_attention_dim", 4096)),
                      pooled_dim=int(c.get("pooled_projection_dim", 2048)),
                      pos_embed_max_size=int(c["pos_embed_max_size"]), qk_norm=c.get("qk_norm") == "rms_norm",
                      dual_attention_layers=tuple(int(i) for i in c.get("dual_attention_layers") or ()),
                      sample_size=int(c.get("sample_size", 128)))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{source}: not an SD3 transformer config ({type(e).__name__}: {e})") from None
        if c.get("qk_norm") not in (None, "rms_norm"):
            raise ConfigError(f"{source}: qk_norm={c['qk_norm']!r} is not supported (SD3 uses none or 'rms_norm')")
        if int(c.get("caption_projection_dim", cfg.hidden)) != cfg.hidden:
            raise ConfigError(f"{source}: caption_projection_dim {c['caption_projection_dim']} must equal "
                              f"heads*head_dim = {cfg.hidden} (the context stream runs at the model width)")
        return cfg.validate(source)

    def validate(self, source: str = "config") -> MMDiTConfig:
        if min(self.depth, self.heads, self.head_dim, self.patch_size, self.pos_embed_max_size) < 1:
            raise ConfigError(f"{source}: depth, heads, head_dim, patch_size, pos_embed_max_size must be >= 1: {self}")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.depth - 1]
        if bad:
            raise ConfigError(f"{source}: dual_attention_layers {bad} outside 0..{self.depth - 2} (the last block "
                              f"is context_pre_only and never dual)")
        return self


@dataclass(frozen=True)
class CLIPConfig:
    """A CLIP text tower: CLIP-L (OpenAI ViT-L/14) or OpenCLIP bigG. Returns (penultimate hidden, pooled)."""

    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    act: str = "quick_gelu"  # CLIP-L: x*sigmoid(1.702x); CLIP-G: exact erf gelu
    vocab_size: int = 49408
    max_positions: int = 77
    eps: float = 1e-5
    projection_dim: int = 768  # text_projection output; identity for CLIP-L in SD3, learned for CLIP-G
    eos_token_id: int = 49407  # pooled = the hidden state at the first EOS
    pad_token_id: int = 49407  # CLIP-L pads with EOS, CLIP-G with 0 ("!")


@dataclass(frozen=True)
class T5Config:
    """T5 v1.1 encoder: gated-GELU FF, RMSNorm, relative-position bias from layer 0 shared by all layers."""

    d_model: int = 4096
    d_kv: int = 64
    heads: int = 64
    d_ff: int = 10240
    layers: int = 24
    vocab_size: int = 32128
    buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6


@dataclass(frozen=True)
class VAEConfig:
    """SD3's 16-channel AutoencoderKL (no quant convs)."""

    in_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_groups: int = 32
    scaling_factor: float = 1.5305  # latents = (z - shift) * scale
    shift_factor: float = 0.0609

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class SamplerDefaults:
    steps: int = 28
    guidance: float = 7.0  # classifier-free guidance scale; <= 1 turns CFG off (batch 1)
    shift: float = 3.0  # time shift of the flow-matching schedule
    sampler: str = "euler"
    slg_layers: tuple[int, ...] = ()  # skip-layer guidance (SD3.5 Medium): blocks skipped in the extra cond pass
    slg_scale: float = 0.0
    slg_start: float = 0.01
    slg_stop: float = 0.2
    t5_tokens: int = 256  # T5 sequence length (diffusers' max_sequence_length)
    height: int = 1024
    width: int = 1024


@dataclass(frozen=True)
class Preset:
    name: str
    mmdit: MMDiTConfig
    sampler: SamplerDefaults = field(default_factory=SamplerDefaults)
    clip_l: CLIPConfig = field(default_factory=CLIPConfig)
    clip_g: CLIPConfig = field(default_factory=lambda: CLIPG)
    t5: T5Config = field(default_factory=T5Config)
    vae: VAEConfig = field(default_factory=VAEConfig)


CLIPG = CLIPConfig(width=1280, layers=32, heads=20, mlp_dim=5120, act="gelu", projection_dim=1280, pad_token_id=0)

PRESETS: dict[str, Preset] = {
    "sd3-medium": Preset("sd3-medium", MMDiTConfig(depth=24, heads=24, pos_embed_max_size=192),
                         SamplerDefaults(steps=28, guidance=7.0)),
    "sd3.5-medium": Preset("sd3.5-medium", MMDiTConfig(depth=24, heads=24, pos_embed_max_size=384, qk_norm=True,
                                                       dual_attention_layers=tuple(range(13))),
                           SamplerDefaults(steps=40, guidance=4.5, slg_layers=(7, 8, 9), slg_scale=2.8)),
    "sd3.5-large": Preset("sd3.5-large", MMDiTConfig(depth=38, heads=38, pos_embed_max_size=192, qk_norm=True),
                          SamplerDefaults(steps=28, guidance=3.5)),
    "sd3.5-large-turbo": Preset("sd3.5-large-turbo",
                                MMDiTConfig(depth=38, heads=38, pos_embed_max_size=192, qk_norm=True),
                                SamplerDefaults(steps=4, guidance=0.0)),
    # tiny: every feature at toy size. Text widths: CLIP-L 32 + CLIP-G 32 = pooled 64; T5 width 64 = context width.
    "tiny": Preset(
        "tiny",
        MMDiTConfig(depth=3, heads=2, head_dim=32, context_dim=64, pooled_dim=64, pos_embed_max_size=32, qk_norm=True,
                    dual_attention_layers=(0,), sample_size=32),
        SamplerDefaults(steps=4, guidance=4.0, t5_tokens=32, height=128, width=128),
        clip_l=CLIPConfig(width=32, layers=2, heads=2, mlp_dim=64, vocab_size=1000, projection_dim=32,
                          eos_token_id=999, pad_token_id=999),
        clip_g=CLIPConfig(width=32, layers=2, heads=2, mlp_dim=64, act="gelu", vocab_size=1000, projection_dim=32,
                          eos_token_id=999, pad_token_id=0),
        t5=T5Config(d_model=64, d_kv=16, heads=4, d_ff=96, layers=2, vocab_size=1000, buckets=32, max_distance=128),
        vae=VAEConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_groups=8),
    ),
    # shapes: the model the project trains itself (weights/train_shapes.py, shipped in weights/shapes/) on 64x64
    # pictures of coloured shapes (minisd35/shapes.py). Its VAE has 3 levels, so it downsamples 4x (SD3's: 8x): 16x16
    # latents, 64 image tokens, and a small shape spans 4x4 latents instead of 2x2. 77 CLIP + 24 T5 text tokens.
    # Frozen random text encoders (CLIP-L 64 + CLIP-G 64 = pooled 128 = T5 width = context width). The VAE's latent
    # scale/shift here are SD3's placeholders: the trained values are in weights/shapes/vae/config.json.
    # DPM++ 2M: chosen over Euler on validation and tuning prompts (weights/shapes/README.md, 'Sampler settings').
    "shapes": Preset(
        "shapes",
        MMDiTConfig(depth=5, heads=2, head_dim=64, context_dim=128, pooled_dim=128, pos_embed_max_size=16, qk_norm=True,
                    dual_attention_layers=(0, 1), sample_size=16),
        SamplerDefaults(steps=20, guidance=5.0, shift=1.0, sampler="dpmpp_2m", t5_tokens=24, height=64, width=64),
        clip_l=CLIPConfig(width=64, layers=2, heads=2, mlp_dim=128, vocab_size=1000, projection_dim=64,
                          eos_token_id=999, pad_token_id=999),
        clip_g=CLIPConfig(width=64, layers=2, heads=2, mlp_dim=128, act="gelu", vocab_size=1000, projection_dim=64,
                          eos_token_id=999, pad_token_id=0),
        t5=T5Config(d_model=128, d_kv=32, heads=4, d_ff=256, layers=2, vocab_size=1000, buckets=32, max_distance=128),
        vae=VAEConfig(block_out_channels=(16, 32, 64), layers_per_block=1, norm_groups=8),
    ),
}
VARIANTS = [n for n in PRESETS if n != "tiny"]


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


# ---------------------------------------------------------------------------------------------------------------------
# From a checkpoint's keys and shapes to a config (Stability key names, after the 'model.diffusion_model.' prefix).

def mmdit_config_from_shapes(shapes: dict[str, tuple[int, ...]], source: str = "checkpoint") -> MMDiTConfig:
    """Derive the MMDiT config from the tensor shapes of a Stability-layout state dict, the way the Stability
    reference does: hidden from x_embedder, depth from the highest joint block, pos table side from pos_embed,
    qk_norm from the presence of ln_k, MMDiT-X layers from attn2 keys. head_dim comes from ln_q when there is one,
    else it is 64 (true of every released model)."""
    try:
        hidden, cin, p, _ = shapes["x_embedder.proj.weight"]
        n_pos = shapes["pos_embed"][1]
        context_dim = shapes["context_embedder.weight"][1]
        pooled_dim = shapes["y_embedder.mlp.0.weight"][1]
        out_channels = shapes["final_layer.linear.weight"][0] // (p * p)
    except KeyError as e:
        raise ConfigError(f"{source}: not an MMDiT state dict, missing {e.args[0]!r}") from None
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"joint_blocks\.(\d+)\.", k))}
    depth = max(blocks) + 1 if blocks else 0
    side = round(n_pos**0.5)
    if side * side != n_pos:
        raise ConfigError(f"{source}: pos_embed has {n_pos} positions, not a square grid")
    ln = shapes.get("joint_blocks.0.x_block.attn.ln_q.weight")
    head_dim = ln[0] if ln else 64
    attn2 = re.compile(r"joint_blocks\.(\d+)\.x_block\.attn2\.")
    dual = tuple(sorted({int(m.group(1)) for k in shapes if (m := attn2.match(k))}))
    if hidden % head_dim:
        raise ConfigError(f"{source}: width {hidden} is not a multiple of head_dim {head_dim}")
    return MMDiTConfig(depth=depth, heads=hidden // head_dim, head_dim=head_dim, patch_size=p, in_channels=cin,
                       out_channels=out_channels, context_dim=context_dim, pooled_dim=pooled_dim,
                       pos_embed_max_size=side, qk_norm="joint_blocks.0.context_block.attn.ln_k.weight" in shapes,
                       dual_attention_layers=dual).validate(source)


def detect_variant(cfg: MMDiTConfig) -> str | None:
    """The preset whose MMDiT has this architecture ('sd3.5-large' for Large and Large Turbo alike), or None."""
    for name in ("sd3-medium", "sd3.5-medium", "sd3.5-large", "tiny", "shapes"):
        if PRESETS[name].mmdit == dataclasses.replace(cfg, sample_size=PRESETS[name].mmdit.sample_size):
            return name
    return None


def check_against_preset(cfg: MMDiTConfig, preset: str, source: str = "checkpoint") -> None:
    want = get_preset(preset).mmdit
    names = [f.name for f in dataclasses.fields(MMDiTConfig) if f.name != "sample_size"]
    diff = [f"{n}: file {getattr(cfg, n)} vs preset {getattr(want, n)}"
            for n in names if getattr(cfg, n) != getattr(want, n)]
    if diff:
        found = detect_variant(cfg)
        raise ConfigError(f"{source} does not match preset {preset!r} ({'; '.join(diff)})"
                          + (f"; it looks like {found!r}" if found else ""))
