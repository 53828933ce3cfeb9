"""The MMDiT: SD3's multimodal diffusion transformer (SD3 Medium, SD3.5 Medium with MMDiT-X blocks, SD3.5 Large).

Two token streams run side by side through `depth` joint blocks: the image x (2x2 latent patches, [B, Limg, D]) and
the text context e ([B, Ltxt, D]). Each stream has its own weights everywhere, except that attention is joint: the
queries, keys and values of both streams are concatenated along the sequence and attend together. A conditioning
vector c (timestep + pooled text, [B, D]) modulates every block through adaLN-zero: per block and stream a Linear
maps SiLU(c) to shift/scale/gate vectors that scale the LayerNorm output and gate the residual branches.

    x [B,16,h,w] --patchify (conv 2x2)--> [B, h/2*w/2, D] + cropped positional table
    context [B,L,4096] --Linear--> [B, L, D]
    c = MLP(timestep features(t)) + MLP(pooled)                                                [B, D]
    for each joint block:  (e, x) = block(e, x, c)          the last block updates x only (context_pre_only)
    x --adaLN + Linear(D -> 2*2*16)--> unpatchify --> velocity [B, 16, h, w]

Attribute names are the Stability checkpoint keys (joint_blocks.{i}.x_block.attn.qkv, ...adaLN_modulation.1, ...),
so the Stability single file loads with no remapping; diffusers-format weights are converted in weights.py. The
numerics follow diffusers' SD3Transformer2DModel step for step (token order [image, text] in joint attention, QK
RMSNorm in fp32, timestep features in fp32, (scale, shift) applied the same way) so that outputs match it to
rounding. This file knows nothing about FP8: quantisation swaps modules from the outside (fp8.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import MMDiTConfig
from .errors import InputError


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x [B, L, D] scaled and shifted per sample by [B, D] vectors; (1 + scale) so that zero-init is identity."""
    return x * (1 + scale[:, None]) + shift[:, None]


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)  # no affine parameters anywhere in the MMDiT


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of t = sigma*1000 (a float, not a step index): [cos(t*f_i) | sin(t*f_i)],
    f_i = max_period^(-i/half), in fp32 whatever the model dtype (t up to 1000 needs the mantissa)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class RMSNorm(nn.Module):
    """QK-norm of SD3.5: y = x / rms(x) * weight over the head dim (64), statistics in fp32 as diffusers does."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        y = x * torch.rsqrt(var + self.eps)  # promotes to fp32
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            return y.to(self.weight.dtype) * self.weight
        return (y * self.weight).to(x.dtype)


class MLP(nn.Sequential):
    """Linear -> SiLU -> Linear, as a Sequential so the keys are mlp.0 / mlp.2 (t_embedder, y_embedder)."""

    def __init__(self, d_in: int, d: int):
        super().__init__(nn.Linear(d_in, d), nn.SiLU(), nn.Linear(d, d))


class Attention(nn.Module):
    """Holds one stream's attention weights: fused qkv [3D, D] laid out [Wq; Wk; Wv] (each head-major), optional
    QK RMSNorm, and the output projection (absent for the context stream of the last block)."""

    def __init__(self, dim: int, heads: int, head_dim: int, qk_norm: bool, proj: bool = True):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.ln_q = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.ln_k = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(heads * head_dim, dim) if proj else None

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, L, D] -> q, k, v each [B, H, L, head_dim], q and k normalised."""
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return self.ln_q(q), self.ln_k(k), v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B, H, L, d] x3 -> [B, L, H*d]. Default scale 1/sqrt(d), no mask, not causal."""
    B, H, L, d = q.shape
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(B, L, H * d)


class StreamBlock(nn.Module):
    """One stream's half of a joint block. A plain container: its attribute names give the checkpoint keys
    (x_block.* / context_block.*); the computation is written out in JointBlock.forward.

    n_mod is the number of D-wide modulation vectors: 6 (shift/scale/gate for attention and MLP), 9 for an MMDiT-X
    image stream (plus shift/scale/gate of attn2), 2 for the last block's context stream (shift/scale only)."""

    def __init__(self, cfg: MMDiTConfig, pre_only: bool = False, dual: bool = False):
        super().__init__()
        D = cfg.hidden
        self.n_mod = 2 if pre_only else (9 if dual else 6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, self.n_mod * D))
        self.attn = Attention(D, cfg.heads, cfg.head_dim, cfg.qk_norm, proj=not pre_only)
        if dual:
            self.attn2 = Attention(D, cfg.heads, cfg.head_dim, cfg.qk_norm)
        if not pre_only:
            self.mlp = nn.Module()
            self.mlp.fc1 = nn.Linear(D, cfg.mlp_ratio * D)
            self.mlp.fc2 = nn.Linear(cfg.mlp_ratio * D, D)

    def mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.fc2(F.gelu(self.mlp.fc1(x), approximate="tanh"))


class JointBlock(nn.Module):
    def __init__(self, cfg: MMDiTConfig, index: int):
        super().__init__()
        self.pre_only = index == cfg.depth - 1
        self.dual = index in cfg.dual_attention_layers
        self.context_block = StreamBlock(cfg, pre_only=self.pre_only)
        self.x_block = StreamBlock(cfg, dual=self.dual)

    def forward(self, e: torch.Tensor, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """e [B, Ltxt, D] text, x [B, Limg, D] image, c [B, D] conditioning -> (e', x'); e' is None for the last."""
        xb, cb = self.x_block, self.context_block
        Limg = x.shape[1]

        # adaLN modulation vectors for both streams, [B, D] each
        x_mod = xb.adaLN_modulation(c).chunk(xb.n_mod, dim=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = x_mod[:6]
        if self.pre_only:
            # The Stability layout stores (shift, scale) for this 2-vector modulation; diffusers stores (scale,
            # shift) and weights.py swaps the halves on load. The Linear's input is cast to e's dtype as in diffusers.
            c_shift_msa, c_scale_msa = cb.adaLN_modulation[1](F.silu(c).to(e.dtype)).chunk(2, dim=1)
        else:
            e_mod = cb.adaLN_modulation(c).chunk(6, dim=1)
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = e_mod

        # pre-attention: LayerNorm + modulate, then q/k/v per stream [B, H, L, d]
        x_norm = layer_norm(x)
        qx, kx, vx = xb.attn.qkv_heads(modulate(x_norm, shift_msa, scale_msa))
        qe, ke, ve = cb.attn.qkv_heads(modulate(layer_norm(e), c_shift_msa, c_scale_msa))

        # joint attention over [image tokens, text tokens] (diffusers' order), then split back
        out = attention(torch.cat([qx, qe], dim=2), torch.cat([kx, ke], dim=2), torch.cat([vx, ve], dim=2))
        attn_x, attn_e = out[:, :Limg], out[:, Limg:]

        # image stream: gated attention residual, MMDiT-X second attention (image tokens only), gated MLP residual
        x = x + gate_msa[:, None] * xb.attn.proj(attn_x)
        if self.dual:
            shift_msa2, scale_msa2, gate_msa2 = x_mod[6:]
            q2, k2, v2 = xb.attn2.qkv_heads(modulate(x_norm, shift_msa2, scale_msa2))  # same LN(x), own modulation
            x = x + gate_msa2[:, None] * xb.attn2.proj(attention(q2, k2, v2))
        x = x + gate_mlp[:, None] * xb.mlp_forward(modulate(layer_norm(x), shift_mlp, scale_mlp))

        if self.pre_only:  # the last block's text stream only served keys and values
            return None, x
        e = e + c_gate_msa[:, None] * cb.attn.proj(attn_e)
        e = e + c_gate_mlp[:, None] * cb.mlp_forward(modulate(layer_norm(e), c_shift_mlp, c_scale_mlp))
        return e, x


class PatchEmbed(nn.Module):
    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden, kernel_size=p, stride=p)


class FinalLayer(nn.Module):
    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        D = cfg.hidden
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))  # (shift, scale), Stability order
        self.linear = nn.Linear(D, cfg.patch_size**2 * cfg.out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation[1](F.silu(c).to(x.dtype)).chunk(2, dim=1)
        return self.linear(modulate(layer_norm(x), shift, scale))


class MMDiT(nn.Module):
    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.cfg = cfg.validate()
        P, D = cfg.pos_embed_max_size, cfg.hidden
        self.x_embedder = PatchEmbed(cfg)
        # The positional table is loaded from the checkpoint (never generated here): [1, P*P, D], row-major grid.
        self.register_buffer("pos_embed", torch.zeros(1, P * P, D))
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = MLP(256, D)
        self.y_embedder = nn.Module()
        self.y_embedder.mlp = MLP(cfg.pooled_dim, D)
        self.context_embedder = nn.Linear(cfg.context_dim, D)
        self.joint_blocks = nn.ModuleList(JointBlock(cfg, i) for i in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)

    def check_latent_size(self, h: int, w: int) -> None:
        cfg = self.cfg
        p, P = cfg.patch_size, cfg.pos_embed_max_size
        if h % p or w % p:
            raise InputError(f"latent size {h}x{w} must be a multiple of the patch size {p} (image sides a multiple "
                             f"of {8 * p} px)")
        if h // p > P or w // p > P:
            raise InputError(f"latent size {h}x{w} exceeds the positional table ({P}x{P} patches): the largest image "
                             f"side this model covers is {cfg.max_image_side} px")

    def cropped_pos_embed(self, hp: int, wp: int) -> torch.Tensor:
        """Centre crop of the stored P x P table to hp x wp patches -> [1, hp*wp, D] (top = (P - hp)//2)."""
        P = self.cfg.pos_embed_max_size
        top, left = (P - hp) // 2, (P - wp) // 2
        table = self.pos_embed.reshape(1, P, P, -1)[:, top : top + hp, left : left + wp, :]
        return table.reshape(1, hp * wp, -1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                skip_layers: tuple[int, ...] | list[int] = ()) -> torch.Tensor:
        """x [B, C, h, w] latents, t [B] = sigma*1000, context [B, L, context_dim], pooled [B, pooled_dim]
        -> velocity [B, C, h, w]. Blocks listed in skip_layers are not run at all (skip-layer guidance)."""
        B, _, h, w = x.shape
        self.check_latent_size(h, w)
        p = self.cfg.patch_size
        hp, wp = h // p, w // p

        tokens = self.x_embedder.proj(x).flatten(2).transpose(1, 2)  # [B, hp*wp, D], row-major
        x_tok = (tokens + self.cropped_pos_embed(hp, wp)).to(tokens.dtype)
        c = self.t_embedder.mlp(timestep_embedding(t).to(pooled.dtype)) + self.y_embedder.mlp(pooled)
        e = self.context_embedder(context)

        for i, block in enumerate(self.joint_blocks):
            if i in skip_layers:
                continue
            e, x_tok = block(e, x_tok, c)

        out = self.final_layer(x_tok, c)  # [B, hp*wp, p*p*C], each vector ordered (py, px, c)
        C = self.cfg.out_channels
        out = out.reshape(B, hp, wp, p, p, C).permute(0, 5, 1, 3, 2, 4)  # n h w p q c -> n c h p w q
        return out.reshape(B, C, hp * p, wp * p)

    def flops_per_step(self, h: int, w: int, text_tokens: int, batch: int = 1) -> int:
        """Forward FLOPs (2 per multiply-add) of linears and attention at latent size h x w: the roofline numerator."""
        cfg, D = self.cfg, self.cfg.hidden
        Li, Lt = (h // cfg.patch_size) * (w // cfg.patch_size), text_tokens
        f = 0
        for blk in self.joint_blocks:
            n_lin_x = 3 * D * D + D * D + 2 * cfg.mlp_ratio * D * D
            n_lin_e = 3 * D * D + (0 if blk.pre_only else D * D + 2 * cfg.mlp_ratio * D * D)
            f += 2 * (Li * n_lin_x + Lt * n_lin_e)
            f += 4 * (Li + Lt) ** 2 * D  # QK^T and PV
            if blk.dual:
                f += 2 * Li * 4 * D * D + 4 * Li * Li * D
        return batch * f
