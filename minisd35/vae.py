"""SD3's 16-channel AutoencoderKL: the decoder that turns latents into pixels, and the encoder for image-to-image.

Shapes (SD3 config: block_out_channels c = (128, 256, 512, 512), 2 resnets per level, 32 norm groups):

    decode  latents [B, 16, h, w] --(/1.5305 + 0.0609)--> z --> conv_in 16->512 --> mid (resnet, attention, resnet)
            --> up_blocks[0..3] at channels c reversed (512, 512, 256, 128), 3 resnets each, nearest x2 + conv3x3
            after all but the last --> GroupNorm, SiLU, conv_out 128->3 --> image [B, 3, 8h, 8w] in [-1, 1]
    encode  image [B, 3, H, W] --> conv_in 3->128 --> down_blocks[0..3] at channels c, 2 resnets each, then
            pad (0,1,0,1) + stride-2 conv3x3 after all but the last --> mid --> GroupNorm, SiLU, conv_out 512->32
            = [mean | logvar] --> z = mean + exp(logvar/2)*eps --> latents = (z - 0.0609) * 1.5305

Pieces: GroupNorm eps 1e-6 everywhere; a resnet is GN-SiLU-conv3x3-GN-SiLU-conv3x3 plus the input (through a 1x1
`conv_shortcut` when the width changes). The mid attention is one head of width C over all h*w positions
(scale 1/sqrt(C)) with a residual; it is the only global operation in the network. SD3 has no quant_conv /
post_quant_conv (SD1/SDXL VAEs do).

Weights: module attribute names are diffusers' keys (`decoder.up_blocks.0.resnets.1.conv2.weight`,
`decoder.mid_block.attentions.0.to_q.weight`, ...). The Stability/LDM single files (`first_stage_model.` prefix in
sd3.5_large.safetensors, no prefix in sd3_vae.safetensors) use the LDM names (`decoder.up.3.block.1.conv2.weight`,
`decoder.mid.attn_1.q.weight`): their up blocks are numbered the other way round, the attention projections are
1x1 convolutions [C, C, 1, 1] (diffusers: Linear [C, C]), and `nin_shortcut`/`norm_out` are `conv_shortcut`/
`conv_norm_out`. `_from_ldm_key` / `_to_ldm_key` are the two directions of that renaming.

Numerics: the same op sequence as diffusers (F.scaled_dot_product_attention, F.group_norm, nearest interpolate), so
an fp32 decode matches diffusers' to ~1e-6 relative; the latent scaling is done in the latents' dtype, as the SD3
pipeline does, before casting to the VAE's dtype.

Tiled decoding: see `VAE.decode` and `decode_memory_bytes`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .checkpoint import Checkpoint, check_finite, detect_components, open_file, open_folder, save_safetensors
from .config import VAEConfig
from .errors import CheckpointError, ConfigError, HardwareError, InputError, list_keys
from .sampling import noise


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    """Single-head self-attention over all positions of the (small) mid-level feature map, with a residual."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])  # diffusers' to_out = [Linear, Dropout]; key to_out.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        q, k, v = (p(h).unsqueeze(1) for p in (self.to_q, self.to_k, self.to_v))  # (B, 1 head, HW, C)
        o = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C)
        o = self.to_out[0](o.squeeze(1))  # (B, HW, C)
        # As diffusers: the transposed view is channels-last in memory and, being the first operand, makes the sum
        # channels-last too, so every later conv runs channels-last (a different kernel, different bf16 rounding).
        return o.transpose(1, 2).reshape(B, C, H, W) + x


class MidBlock(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c, c, groups), ResnetBlock(c, c, groups)])
        self.attentions = nn.ModuleList([Attention(c, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric zero pad right/bottom, then stride 2: H -> H/2


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Block(nn.Module):
    """One resolution level: resnets, then optionally a down- or upsampler (keys downsamplers.0 / upsamplers.0)."""

    def __init__(self, cin: int, cout: int, n: int, groups: int, down: bool = False, up: bool = False):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(n)])
        self.downsamplers = nn.ModuleList([Downsample(cout)]) if down else None
        self.upsamplers = nn.ModuleList([Upsample(cout)]) if up else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        for s in (self.downsamplers or ()):
            x = s(x)
        for s in (self.upsamplers or ()):
            x = s(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        c, g, n = cfg.block_out_channels, cfg.norm_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, c[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([Block(c[max(i - 1, 0)], c[i], cfg.layers_per_block, g, down=i < n - 1)
                                          for i in range(n)])
        self.mid_block = MidBlock(c[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, c[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(c[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean | logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for b in self.down_blocks:
            x = b(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        c, g, n = tuple(reversed(cfg.block_out_channels)), cfg.norm_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, c[0], 3, padding=1)
        self.mid_block = MidBlock(c[0], g)
        self.up_blocks = nn.ModuleList([Block(c[max(i - 1, 0)], c[i], cfg.layers_per_block + 1, g, up=i < n - 1)
                                        for i in range(n)])
        self.conv_norm_out = nn.GroupNorm(g, c[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(c[-1], cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for b in self.up_blocks:
            x = b(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig, with_encoder: bool = True):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg) if with_encoder else None
        self.decoder = Decoder(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    # -----------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, image: torch.Tensor, generator: torch.Generator | list[torch.Generator] | int | None = None,
               sample: bool = True) -> torch.Tensor:
        """image [B, 3, H, W] in [-1, 1] (H, W multiples of 8) -> latents [B, 16, H/8, W/8], already shifted and scaled
        for the MMDiT. sample=True draws z = mean + std*eps exactly like diffusers' latent_dist.sample(generator):
        eps = randn in the VAE's dtype, on the generator's device (see sampling.noise), one draw per image when
        `generator` is a list. sample=False returns the mean (diffusers' latent_dist.mode())."""
        if self.encoder is None:
            raise InputError("this VAE was loaded with with_encoder=False; load it with the encoder for img2img")
        f = self.config.downscale
        if image.ndim != 4 or image.shape[1] != self.config.in_channels or image.shape[2] % f or image.shape[3] % f:
            raise InputError(f"VAE.encode: image must be [B, {self.config.in_channels}, H, W] with H and W multiples "
                             f"of {f}; got {tuple(image.shape)} (resize or crop the image)")
        h = self.encoder(image.to(device=self.device, dtype=self.dtype))
        mean, logvar = h.chunk(2, dim=1)
        if sample:
            std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
            z = mean + std * noise(mean.shape, generator, device=h.device, dtype=h.dtype)
        else:
            z = mean
        return (z - self.config.shift_factor) * self.config.scaling_factor

    # -----------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor, *, tile: int | None = None, overlap: int | None = None,
               max_memory_bytes: int | None = None) -> torch.Tensor:
        """latents [B, 16, h, w] straight from the sampler -> image [B, 3, 8h, 8w] in the VAE's dtype, about [-1, 1].

        tile=None (default) decodes the whole latent at once unless it would not fit: the memory budget is
        `max_memory_bytes` if given, else on CUDA the free device memory (torch.cuda.mem_get_info plus what torch's
        caching allocator holds unused), else (CPU) unlimited.
        When `decode_memory_bytes` exceeds the budget it first decodes one image at a time (exact), and if one image
        still does not fit it tiles, with the largest square tile that fits. tile=T (latent pixels) forces tiles of
        T x T latents overlapping by `overlap` latents (default T // 4).

        Tiles are blended with linear ramps across each overlap (per axis, weights summing to 1; the 2-D weight is
        the product of the two axis weights), accumulated in fp32. A tiled decode is NOT identical to a full decode:
        each tile sees only its own latents, and the mid-block attention, which is global in the full decode, only
        attends within the tile, GroupNorm statistics are the tile's, and convolutions near a tile edge see zero
        padding instead of the neighbour (the ramps give those edge pixels little weight). The difference shrinks
        with more latents per tile. Measured on the random test VAE (tests/test_vae.py): 8.5% relative difference
        at tile 32 / overlap 16, 13% at 24 / 8, and no step at the tile borders (a hard cut: 29% and visible
        steps). A trained VAE is expected to differ less; that has not been measured here."""
        if latents.ndim != 4 or latents.shape[1] != self.config.latent_channels:
            raise InputError(f"VAE.decode: latents must be [B, {self.config.latent_channels}, h, w]; "
                             f"got {tuple(latents.shape)}")
        z = (latents / self.config.scaling_factor + self.config.shift_factor).to(device=self.device, dtype=self.dtype)
        B, _, h, w = z.shape
        if tile is None:
            budget = max_memory_bytes
            if budget is None and z.device.type == "cuda":  # free on the device + cached by torch but unused
                budget = torch.cuda.mem_get_info(z.device)[0] + torch.cuda.memory_reserved(z.device) \
                    - torch.cuda.memory_allocated(z.device)
            if budget is None or self.decode_memory_bytes(B, h, w) <= budget:
                return self.decoder(z)
            if B > 1 and self.decode_memory_bytes(1, h, w) <= budget:
                return torch.cat([self.decoder(z[i : i + 1]) for i in range(B)])
            tile = next((t for t in range(min(max(h, w), 4096), 7, -1) if self.decode_memory_bytes(1, t, t) <= budget),
                        None)
            if tile is None:
                raise HardwareError(f"VAE.decode: even an 8x8-latent tile needs ~{self.decode_memory_bytes(1, 8, 8)} "
                                    f"bytes, more than the {budget}-byte budget; free memory or raise max_memory_bytes")
            return torch.cat([self._decode_tiled(z[i : i + 1], tile, overlap) for i in range(B)])
        return self._decode_tiled(z, tile, overlap)

    def _decode_tiled(self, z: torch.Tensor, tile: int, overlap: int | None) -> torch.Tensor:
        B, _, h, w = z.shape
        overlap = tile // 4 if overlap is None else overlap
        if tile < 1 or not 0 <= overlap < tile:
            raise InputError(f"VAE.decode: need tile >= 1 and 0 <= overlap < tile; got tile={tile}, overlap={overlap}")
        f = self.config.downscale  # pixels per latent
        ys, xs = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
        th, tw = min(tile, h), min(tile, w)
        out = torch.zeros(B, self.config.in_channels, h * f, w * f, device=z.device, dtype=torch.float32)
        wsum = torch.zeros(h * f, w * f, device=z.device, dtype=torch.float32)
        for i, y in enumerate(ys):
            wy = _ramp(ys, i, th, f, z.device)
            for j, x in enumerate(xs):
                wgt = wy[:, None] * _ramp(xs, j, tw, f, z.device)[None, :]
                img = self.decoder(z[:, :, y : y + th, x : x + tw]).float()
                out[:, :, y * f : (y + th) * f, x * f : (x + tw) * f] += img * wgt
                wsum[y * f : (y + th) * f, x * f : (x + tw) * f] += wgt
        return (out / wsum).to(self.dtype)

    def decode_memory_bytes(self, batch: int, h: int, w: int) -> int:
        """Estimated peak activation memory (bytes) of decoding a [batch, 16, h, w] latent in this VAE's dtype.

        Model (counting the tensors alive at once in eager PyTorch, in channels x pixels): a level turning cin into
        c channels at P pixels peaks inside a resnet after its first: the level input (still held by the caller),
        the resnet input, conv1's output and the GroupNorm and SiLU outputs, (cin + 4c) P; the first resnet's
        norm1/SiLU peak is 3 cin P. The upsampler holds the level input and its own input plus the 2x-nearest copy
        and the conv output at 4P, (cin + c) P + 8 c P. The end holds x, GroupNorm, SiLU and the RGB output. The mid
        block (at the smallest resolution) is counted as 9 C hw: q, k, v, the attention output and its inputs. No
        [hw, hw] score matrix: torch's fused SDPA kernels (CPU flash, CUDA flash/memory-efficient) never build it;
        a plain-math fallback would add batch * (hw)^2 elements. Weights and the fp32 accumulators of a tiled
        decode are not included. A 1.25 factor covers allocator slack and conv workspaces.
        Check: without the factor this equals the peak of live tensors measured op by op (a TorchDispatchMode
        tracker, CPU) on the test configs; tests/test_vae.py asserts est in [peak, 1.5 peak].
        SD3 at 1024x1024 (latent 128x128) in bf16: 1.9 GiB per image (768 channels at full resolution, from the
        first resnet of the last level, 256 -> 128); the math-path score matrix would add 0.5 GiB.
        """
        c = tuple(reversed(self.config.block_out_channels))
        P = h * w
        peak = 9 * c[0] * P  # mid block
        for i, ci in enumerate(c):
            cin = c[max(i - 1, 0)]
            peak = max(peak, 3 * cin * P, (cin + 4 * ci) * P)
            if i < len(c) - 1:
                peak = max(peak, (cin + ci) * P + 8 * ci * P)
                P *= 4
        peak = max(peak, (3 * c[-1] + self.config.in_channels) * P)  # norm_out, SiLU, conv_out at full resolution
        return int(1.25 * batch * peak * torch.empty((), dtype=self.dtype).element_size())


def _tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length `tile` covering [0, n) with at least `overlap` overlap, evenly spread so the
    first starts at 0 and the last ends at n (every tile is full size)."""
    if n <= tile:
        return [0]
    k = math.ceil((n - overlap) / (tile - overlap))  # tiles needed
    return [round(i * (n - tile) / (k - 1)) for i in range(k)]


def _ramp(starts: list[int], k: int, tile: int, f: int, device) -> torch.Tensor:
    """Pixel weights of tile k along one axis: 1 in the middle, rising linearly over the overlap with the previous
    tile and falling over the overlap with the next. In a two-tile overlap of P pixels the weights are (i+0.5)/P and
    1-(i+0.5)/P: they sum to 1 and are never 0 (the division by the weight sum then only matters where three tiles
    meet)."""
    n = tile * f
    w = torch.ones(n, dtype=torch.float32, device=device)
    i = torch.arange(n, dtype=torch.float32, device=device) + 0.5
    if k > 0:
        p = (starts[k - 1] + tile - starts[k]) * f
        w = torch.minimum(w, i / p)
    if k < len(starts) - 1:
        p = (starts[k] + tile - starts[k + 1]) * f
        w = torch.minimum(w, (n - i) / p)
    return w


# ---------------------------------------------------------------------------------------------------------------------
# Images <-> tensors, rounding as diffusers' VaeImageProcessor does.

def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> PIL images. Like diffusers' postprocess: (x*0.5 + 0.5).clamp(0, 1) in the tensor's
    own dtype (bf16 for a bf16 VAE: that rounding is part of the result), then float32, *255, round half to even,
    uint8. (The Stability reference clamps in fp32 and truncates instead of rounding: images differ by <= 1 level.)"""
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"to_pil: images must be [B, 3, H, W]; got {tuple(images.shape)}")
    x = (images * 0.5 + 0.5).clamp(0, 1).float()
    x = (x.detach().cpu().permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    return [Image.fromarray(a) for a in x]


def from_pil(images: Image.Image | Sequence[Image.Image], dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> torch.Tensor:
    """PIL image(s), all of one size -> [B, 3, H, W] in [-1, 1]: uint8/255 in fp32, then 2x - 1, then dtype (as
    diffusers' preprocess + prepare_latents). Resizing/cropping to multiples of 8 is the caller's job."""
    images = [images] if isinstance(images, Image.Image) else list(images)
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise InputError(f"from_pil: all images must have one size; got {sorted(sizes)}")
    x = np.stack([np.asarray(im.convert("RGB")).astype(np.float32) / 255.0 for im in images])
    return (2.0 * torch.from_numpy(x).permute(0, 3, 1, 2) - 1.0).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Key names: diffusers <-> LDM (Stability single files).

_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _to_ldm_key(k: str, levels: int) -> str:
    k = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", k)
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", k)
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
               lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", k)
    k = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", k)
    for d, ldm in _ATTN:
        k = k.replace(f".mid_block.attentions.0.{d}.", f".mid.attn_1.{ldm}.")
    return k.replace(".conv_shortcut.", ".nin_shortcut.")


def _from_ldm_key(k: str, levels: int) -> str:
    k = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", k)
    k = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", k)
    k = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", k)
    k = re.sub(r"^decoder\.up\.(\d+)\.block\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.", k)
    k = re.sub(r"^decoder\.up\.(\d+)\.upsample\.",
               lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.", k)
    k = re.sub(r"\.mid\.block_(\d+)\.", lambda m: f".mid_block.resnets.{int(m[1]) - 1}.", k)
    for d, ldm in _ATTN:
        k = k.replace(f".mid.attn_1.{ldm}.", f".mid_block.attentions.0.{d}.")
    return k.replace(".nin_shortcut.", ".conv_shortcut.")


def _is_attn_proj(k: str) -> bool:
    return ".mid_block.attentions.0.to_" in k and k.endswith(".weight")


def vae_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers-named VAE state dict -> LDM/Stability names, attention projections as 1x1 convs [C, C, 1, 1]. Prefix
    the keys with 'first_stage_model.' to get the VAE part of a Stability single file."""
    levels = 1 + max(int(m[1]) for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    return {_to_ldm_key(k, levels): (v[:, :, None, None] if _is_attn_proj(k) else v) for k, v in state.items()}


def _ldm_levels(keys: Sequence[str]) -> int:
    ups = [int(m[1]) for k in keys if (m := re.match(r"decoder\.up\.(\d+)\.", k))]
    return 1 + max(ups) if ups else 0


# ---------------------------------------------------------------------------------------------------------------------
# Configs: from diffusers' config.json, or from the tensor shapes of a single file.

def config_from_diffusers(c: dict, source: str = "config.json") -> VAEConfig:
    if c.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ConfigError(f"{source}: _class_name {c['_class_name']!r} is not AutoencoderKL")
    try:
        # missing entries take diffusers' AutoencoderKL defaults, as from_pretrained would
        cfg = VAEConfig(in_channels=int(c.get("in_channels", 3)), latent_channels=int(c.get("latent_channels", 4)),
                        block_out_channels=tuple(int(x) for x in c.get("block_out_channels", [64])),
                        layers_per_block=int(c.get("layers_per_block", 1)),
                        norm_groups=int(c.get("norm_num_groups", 32)),
                        scaling_factor=float(c.get("scaling_factor", 0.18215)),
                        shift_factor=float(c.get("shift_factor") or 0.0))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{source}: not an AutoencoderKL config ({type(e).__name__}: {e})") from None
    n = len(cfg.block_out_channels)
    problems = []
    if list(c.get("down_block_types", ["DownEncoderBlock2D"] * n)) != ["DownEncoderBlock2D"] * n:
        problems.append(f"down_block_types {c.get('down_block_types')} (need {n} x DownEncoderBlock2D)")
    if list(c.get("up_block_types", ["UpDecoderBlock2D"] * n)) != ["UpDecoderBlock2D"] * n:
        problems.append(f"up_block_types {c.get('up_block_types')} (need {n} x UpDecoderBlock2D)")
    if c.get("act_fn", "silu") != "silu":
        problems.append(f"act_fn {c['act_fn']!r} (need 'silu')")
    if int(c.get("out_channels", cfg.in_channels)) != cfg.in_channels:
        problems.append(f"out_channels {c['out_channels']} != in_channels {cfg.in_channels}")
    if not c.get("mid_block_add_attention", True):
        problems.append("mid_block_add_attention false (SD3's VAE has the mid attention)")
    if c.get("use_quant_conv", True) or c.get("use_post_quant_conv", True):
        problems.append("use_quant_conv/use_post_quant_conv not false (that is an SD1/SDXL-style VAE; SD3's has none)")
    if problems:
        raise ConfigError(f"{source}: not an SD3-style VAE: {'; '.join(problems)}")
    return _validate(cfg, source)


def _validate(cfg: VAEConfig, source: str) -> VAEConfig:
    bad = [c for c in cfg.block_out_channels if c % cfg.norm_groups]
    if bad or cfg.layers_per_block < 1 or not cfg.block_out_channels:
        raise ConfigError(f"{source}: block_out_channels {cfg.block_out_channels} must all be multiples of "
                          f"norm_groups {cfg.norm_groups}, and layers_per_block {cfg.layers_per_block} >= 1")
    return cfg


def config_from_shapes(shapes: dict[str, tuple[int, ...]], source: str, norm_groups: int = 32,
                       scaling_factor: float = 1.5305, shift_factor: float = 0.0609) -> VAEConfig:
    """From a diffusers-named state dict's shapes: widths from the decoder's up-block convs (in reverse), latent
    channels from decoder.conv_in, layers_per_block from the resnet count of up_blocks.0 (minus one). GroupNorm
    group counts and the latent scale/shift are not in the shapes: they come from the arguments (SD3's values)."""
    ups = sorted({int(m[1]) for k in shapes if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))})
    try:
        widths = tuple(shapes[f"decoder.up_blocks.{i}.resnets.0.conv1.weight"][0] for i in reversed(ups))
        latent_channels = shapes["decoder.conv_in.weight"][1]
        in_channels = shapes["decoder.conv_out.weight"][0]
    except KeyError as e:
        raise CheckpointError(f"{source}: not an AutoencoderKL state dict, missing {e.args[0]!r}") from None
    resnets = {int(m[1]) for k in shapes if (m := re.match(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.", k))}
    cfg = VAEConfig(in_channels=in_channels, latent_channels=latent_channels, block_out_channels=widths,
                    layers_per_block=len(resnets) - 1, norm_groups=norm_groups, scaling_factor=scaling_factor,
                    shift_factor=shift_factor)
    return _validate(cfg, source)


# ---------------------------------------------------------------------------------------------------------------------
# Loading and writing.

def load_vae(path: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
             config: VAEConfig | None = None, with_encoder: bool = True) -> VAE:
    """Load the SD3 VAE from a diffusers model folder (holding vae/), a vae/ folder (config.json +
    diffusion_pytorch_model.safetensors), or one .safetensors file: the VAE part of a Stability single file
    (`first_stage_model.` prefix), sd3_vae.safetensors (LDM names, no prefix), or a diffusers-named file.

    For a single file the architecture comes from the tensor shapes; `config` (if given) supplies what shapes
    cannot tell, the GroupNorm group count and the latent scale/shift (default SD3's 32, 1.5305, 0.0609). For a
    folder `config` replaces config.json. Loading is strict: any missing, unexpected or mis-shaped tensor is a
    CheckpointError naming the file and the keys. with_encoder=False skips the encoder (txt2img needs only the
    decoder: 49.5 M of the 83.8 M parameters)."""
    path = Path(path)
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        cfg_file = folder / "config.json"
        if config is None:
            if not cfg_file.is_file():
                raise CheckpointError(f"{path}: no vae/config.json or config.json here; pass the diffusers model "
                                      f"folder, its vae/ folder, or a .safetensors file")
            try:
                raw = json.loads(cfg_file.read_text())
            except (OSError, ValueError) as e:
                raise ConfigError(f"{cfg_file}: unreadable JSON ({e})") from None
            config = config_from_diffusers(raw, str(cfg_file))
        ck = open_folder(folder, "diffusion_pytorch_model")
        names = {k: k for k in ck.keys()}
        shapes = {k: ck.shape(k) for k in ck.keys()}
    elif path.is_file():
        ck = open_file(path)
        found = detect_components(ck.keys())
        if "vae" not in found:
            raise CheckpointError(f"{path}: no VAE in this file (no '*decoder.conv_in.weight' key); it holds "
                                  f"{', '.join(found) or 'no known component'}")
        ck = ck.sub(found["vae"])
        if _ldm_levels(ck.keys()):
            levels = _ldm_levels(ck.keys())
            names = {_from_ldm_key(k, levels): k for k in ck.keys()}
        else:
            names = {k: k for k in ck.keys()}
        shapes = {d: ck.shape(k) for d, k in names.items()}
        for d in names:  # LDM 1x1-conv attention projections [C, C, 1, 1] -> Linear [C, C]
            if _is_attn_proj(d) and len(shapes[d]) == 4:
                shapes[d] = shapes[d][:2]
        ref = config or VAEConfig()
        derived = config_from_shapes(shapes, f"{path} (prefix {found['vae']!r})", ref.norm_groups,
                                     ref.scaling_factor, ref.shift_factor)
        if config is not None and config != derived:
            raise ConfigError(f"{path}: the VAE in this file is {derived}, not the given {config}")
        config = derived
    else:
        raise CheckpointError(f"{path}: no such file or folder")

    with torch.device("meta"):
        model = VAE(config, with_encoder=with_encoder)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if not with_encoder:
        names = {d: k for d, k in names.items() if not d.startswith("encoder.")}
    _check_keys(ck, names, shapes, want)
    sd = {}
    for d, k in names.items():
        t = src = ck.get(k)
        if _is_attn_proj(d):
            t = t.reshape(t.shape[0], t.shape[1])
        t = t.to(device=device, dtype=dtype)
        check_finite(ck.name, ck.prefix + k, t, src)
        sd[d] = t
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def _check_keys(ck: Checkpoint, names: dict[str, str], shapes: dict[str, tuple[int, ...]],
                want: dict[str, tuple[int, ...]]) -> None:
    missing = [k for k in want if k not in names]
    unexpected = [ck.prefix + names[k] for k in names if k not in want]
    wrong = [f"{ck.prefix + names[k]} {shapes[k]} (expected {want[k]})" for k in want if k in names
             and shapes[k] != want[k]]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            no_enc = all(k.startswith("encoder.") for k in missing)
            hint = " (the file has no encoder: load it with with_encoder=False)" if no_enc else ""
            parts.append(f"{len(missing)} missing: {list_keys(missing)}{hint}")
        if unexpected:
            quant = any("quant_conv" in k for k in unexpected)
            hint = " (quant_conv keys: an SD1/SDXL VAE, not SD3's)" if quant else ""
            parts.append(f"{len(unexpected)} unexpected: {list_keys(unexpected)}{hint}")
        if wrong:
            parts.append(f"{len(wrong)} with the wrong shape: {list_keys(wrong, 3)}")
        raise CheckpointError(f"{ck.name}: does not match the VAE architecture: {'; '.join(parts)}. Check that the "
                              f"file is an SD3 VAE and that config.json (or the config passed) matches it")


def diffusers_config(cfg: VAEConfig) -> dict:
    n = len(cfg.block_out_channels)
    return {"_class_name": "AutoencoderKL", "in_channels": cfg.in_channels, "out_channels": cfg.in_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": list(cfg.block_out_channels), "layers_per_block": cfg.layers_per_block,
            "act_fn": "silu", "latent_channels": cfg.latent_channels, "norm_num_groups": cfg.norm_groups,
            "sample_size": 1024, "scaling_factor": cfg.scaling_factor, "shift_factor": cfg.shift_factor,
            "latents_mean": None, "latents_std": None, "force_upcast": True, "use_quant_conv": False,
            "use_post_quant_conv": False, "mid_block_add_attention": True}


def random_vae_state(cfg: VAEConfig, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Deterministic random weights of a sensible scale (diffusers names): conv/linear weights N(0, 1/fan_in) so
    activations keep unit scale, small random biases, GroupNorm weight 1 +- 0.1. Keys are filled in sorted order
    from one generator, so the same (cfg, seed) always gives the same tensors."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in VAE(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k in sorted(shapes):
        s = shapes[k]
        if "norm" in k.split(".")[-2]:
            t = (1.0 if k.endswith("weight") else 0.0) + 0.1 * torch.randn(s, generator=g)
        elif k.endswith("bias"):
            t = 0.05 * torch.randn(s, generator=g)
        else:
            t = torch.randn(s, generator=g) / math.sqrt(math.prod(s[1:]))
        out[k] = t.to(dtype)
    return out


def write_random_vae(folder: str | Path, cfg: VAEConfig, seed: int, dtype: torch.dtype = torch.float32) -> Path:
    """Write a diffusers vae/ folder (config.json in AutoencoderKL format + diffusion_pytorch_model.safetensors) with
    `random_vae_state` weights. diffusers' AutoencoderKL.from_pretrained(folder) loads it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(random_vae_state(cfg, seed, dtype), folder / "diffusion_pytorch_model.safetensors", force=True)
    (folder / "config.json").write_text(json.dumps(diffusers_config(cfg), indent=2))
    return folder
