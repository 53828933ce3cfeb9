"""The CLIP text transformer, one class for both of SD3's CLIP encoders:

    CLIP-L (OpenAI ViT-L/14):     12 layers, width 768,  12 heads, MLP 3072, quick_gelu, projection 768x768 (identity)
    CLIP-G (OpenCLIP ViT-bigG/14): 32 layers, width 1280, 20 heads, MLP 5120, exact gelu, projection 1280x1280 (learned)

ids [B, 77] -> token embedding + learned position embedding -> pre-LN residual blocks with a causal mask ->
    hidden = the output of the second-to-last block (no final LayerNorm): what SD3 puts into its context, [B, 77, W]
    pooled = text_projection(final_layer_norm(last block output) at the first EOS token): [B, P]

The module attribute names are the transformers CLIPTextModelWithProjection key names (`text_model.encoder.layers.3.
self_attn.q_proj.weight`, `text_projection.weight`), so a diffusers text_encoder/ or a Stability clip_l.safetensors
loads as is. SD3's CLIP-L projection is an identity matrix; Stability's single files are read without it
(`projection=False`), exactly as diffusers' single-file loader replaces it with eye(768).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import CLIPConfig
from .errors import InputError


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # OpenAI's cheap GELU approximation, which CLIP-L was trained with.
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class Attention(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, W = x.shape
        q, k, v = (p(x).view(B, L, self.heads, W // self.heads).transpose(1, 2) for p in (self.q_proj, self.k_proj,
                                                                                          self.v_proj))
        # Causal: token i attends to tokens 0..i, so the pad tokens after EOS never change the tokens before it.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, heads, L, head_dim]
        return self.out_proj(y.transpose(1, 2).reshape(B, L, W))


class MLP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.act]
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class Encoder(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))


class TextTransformer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)


class CLIPTextModel(nn.Module):
    """CLIP text tower with its projection. forward(ids [B, L]) -> (penultimate hidden [B, L, W], pooled [B, P])."""

    def __init__(self, cfg: CLIPConfig, projection: bool = True):
        super().__init__()
        self.cfg = cfg
        self.text_model = TextTransformer(cfg)
        # Without a stored projection the pooled output is the unprojected final-LN EOS state (identity).
        self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False) if projection else None

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if ids.shape[1] > self.cfg.max_positions:
            raise InputError(f"CLIP takes at most {self.cfg.max_positions} tokens, got {ids.shape[1]}")
        tm = self.text_model
        x = tm.embeddings(ids)
        penultimate = x
        for i, layer in enumerate(tm.encoder.layers):
            x = layer(x)
            if i == len(tm.encoder.layers) - 2:
                penultimate = x
        # Pool at the first EOS. The tokenizer always writes one; CLIP-L pads with EOS too, hence "first".
        eos = (ids == self.cfg.eos_token_id).int().argmax(dim=-1)
        pooled = tm.final_layer_norm(x[torch.arange(x.shape[0], device=x.device), eos])
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return penultimate, pooled
