"""The T5 v1.1 encoder (SD3's third text encoder, T5-XXL: 24 layers, d_model 4096, 64 heads x 64, d_ff 10240).

ids [B, T] -> shared embedding (no scaling) -> 24 x [x += Attn(RMSNorm(x)); x += GatedFF(RMSNorm(x))] -> RMSNorm
           -> [B, T, d_model], the T5 part of SD3's context (T = 256 in diffusers).

What is unusual about T5, next to a textbook transformer:
- RMSNorm ("T5LayerNorm"): x / sqrt(mean(x^2) + eps) * weight, no mean subtraction, no bias; the mean of squares is
  taken in fp32 and the result is cast to the weight's dtype before the multiply.
- Attention has no biases and no 1/sqrt(d) logit scaling (the scale was folded into the initialisation).
- Positions enter only through a learned bias on the attention logits: relative distance key - query is put into
  one of 32 buckets (16 per direction: exact for |r| < 8, logarithmic up to 128, capped), and block 0 holds a
  [32, heads] table `relative_attention_bias`. The bias is computed once, in block 0, and added in *every* block.
- The FF is gated: wo(gelu_new(wi_0 x) * wi_1 x), with gelu_new the tanh approximation written out op by op
  (transformers does so; F.gelu(approximate="tanh") rounds differently in bf16).
- No attention mask: SD3 encodes the pad tokens like any other token.

Overflow. T5-XXL's FF output and residual stream exceed fp16's 65504 for ordinary prompts, giving inf and then NaN
(transformers issues 5651, 9295). Run it in bf16 or fp32. In fp16 we do what transformers does when it loads T5 in
fp16: the `wo` weights stay fp32, the gated activations are clamped to the fp16 range before they reach `wo` in fp32,
and the residual stream is carried in fp32 (transformers ends up there implicitly: fp16 + fp32 = fp32).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import T5Config

FP16_MAX = torch.finfo(torch.float16).max


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        y = x * torch.rsqrt(var + self.eps)
        return self.weight * y.to(self.weight.dtype)


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def relative_position_bucket(rel: torch.Tensor, buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """Bidirectional T5 buckets for rel = key_pos - query_pos: half the buckets for keys after the query, half for
    keys before; within a half, distances below buckets/4 get their own bucket, larger ones share logarithmically
    wider buckets up to max_distance, and everything farther lands in the last bucket."""
    half = buckets // 2
    out = (rel > 0).long() * half
    d = rel.abs()
    exact = half // 2
    log_bucket = exact + (torch.log(d.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                          * (half - exact)).long()
    return out + torch.where(d < exact, d, log_bucket.clamp(max=half - 1))


class Attention(nn.Module):
    def __init__(self, cfg: T5Config, has_bias_table: bool):
        super().__init__()
        self.cfg = cfg
        inner = cfg.heads * cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_bias_table:
            self.relative_attention_bias = nn.Embedding(cfg.buckets, cfg.heads)

    def position_bias(self, T: int) -> torch.Tensor:
        """[1, heads, T, T] additive logit bias (only block 0 has the table)."""
        pos = torch.arange(T, device=self.relative_attention_bias.weight.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.cfg.buckets, self.cfg.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.cfg.heads, self.cfg.d_kv).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


class SelfAttentionLayer(nn.Module):
    def __init__(self, cfg: T5Config, has_bias_table: bool):
        super().__init__()
        self.SelfAttention = Attention(cfg, has_bias_table)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = self.SelfAttention(self.layer_norm(x), bias)
        if h.dtype == torch.float16:
            h = h.clamp(-FP16_MAX, FP16_MAX)  # an overflowed inf becomes the largest finite fp16 value
        return x + h


class GatedFF(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = gelu_new(self.wi_0(x)) * self.wi_1(x)
        if h.dtype == torch.float16:
            h = h.clamp(-FP16_MAX, FP16_MAX)
        # wo may be kept in fp32 (fp16 runs): compute it in its own dtype. An FP8 wo (fp8.FP8Linear, policy t5-w8)
        # takes the activations as they are (casting them to e4m3 unscaled would overflow).
        dt = self.wo.weight.dtype
        return self.wo(h if dt.itemsize == 1 else h.to(dt))


class FFLayer(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = GatedFF(cfg)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class Block(nn.Module):
    def __init__(self, cfg: T5Config, index: int):
        super().__init__()
        self.layer = nn.ModuleList([SelfAttentionLayer(cfg, has_bias_table=index == 0), FFLayer(cfg)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.layer[1](self.layer[0](x, bias))


class Stack(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.block = nn.ModuleList(Block(cfg, i) for i in range(cfg.layers))
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.eps)


class T5Encoder(nn.Module):
    """forward(ids [B, T]) -> last hidden state [B, T, d_model] in the dtype of the weights (of `shared`)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Stack(cfg)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.shared(ids)
        dtype = x.dtype
        if dtype == torch.float16:
            # The residual stream runs in fp32; each sub-layer computes in fp16 (RMSNorm casts to its fp16 weight)
            # and its clamped output is added to the fp32 stream.
            x = x.float()
        blocks = self.encoder.block
        bias = blocks[0].layer[0].SelfAttention.position_bias(ids.shape[1])
        for block in blocks:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x).to(dtype)
