"""SD3 prompt conditioning: finding and loading CLIP-L, CLIP-G and T5-XXL, tokenizing, and building the two tensors
the MMDiT reads, exactly as diffusers' StableDiffusion3Pipeline.encode_prompt builds them:

    CLIP-L ids [B, 77] -> hidden_L [B, 77, 768]  (penultimate block), pooled_L [B, 768]  (EOS state, identity proj.)
    CLIP-G ids [B, 77] -> hidden_G [B, 77, 1280] (penultimate block), pooled_G [B, 1280] (EOS state, learned proj.)
    T5     ids [B, T] -> hidden_T [B, T, 4096]   (T = 256 by default; zeros when T5 is left out, as in diffusers)

    context = cat([pad(cat([hidden_L, hidden_G], channels), to 4096 channels with zeros), hidden_T], tokens)
            -> [B, 77 + T, 4096]: the CLIP tokens first, then T5's
    pooled  = cat([pooled_L, pooled_G]) -> [B, 2048]

(In general the context width is T5's d_model and the CLIP part is zero-padded to it, so toy configs work too.)

Where the weights come from (`load_text_encoders(path)`, `path` being any of):
- a diffusers root: text_encoder/ (CLIP-L), text_encoder_2/ (CLIP-G), text_encoder_3/ (T5, often sharded with a
  model.safetensors.index.json; optional), each with a transformers config.json; tokenizer/, tokenizer_2/,
  tokenizer_3/ next to them;
- a folder of Stability/ComfyUI files (the text_encoders/ folder of the SD3.5 repos): clip_l.safetensors,
  clip_g.safetensors and one t5xxl*.safetensors (fp16, fp8_e4m3fn, or ComfyUI's fp8_e4m3fn_scaled); the
  tokenizer folders must sit next to them or one level up (they are not in those repos, and we never download);
- an all-in-one .safetensors with text_encoders.clip_l.transformer.*, text_encoders.clip_g.transformer.* and
  text_encoders.t5xxl.transformer.* keys (SD3 Medium incl_clips, ComfyUI all-in-one files).
All of these use transformers' key names inside; the model classes use the same names, so loading is a
rename-free, strict state-dict load.

FP8 files. t5xxl_fp8_e4m3fn stores every tensor as float8_e4m3fn without scales; ComfyUI's scaled files store
Linear weights as fp8 with a per-layer fp32 scalar `<layer>.scale_weight` (newer spelling `weight_scale`), optional
`scale_input`/`input_scale` (only used by fp8 x fp8 matmuls), `comfy_quant` (a JSON format tag as uint8 bytes) and
a `scaled_fp8` marker. Here every fp8 tensor is dequantised once at load, W = (W_fp8.float() * scale).to(dtype),
scale 1 when there is none. `iter_raw_state` hands out the stored tensors and their scales before that step, for
code that wants to keep the weights in fp8. fp8 embedding tables can hold NaN codes: they are replaced by 0 with a
warning (ComfyUI applies nan_to_num after the lookup, which is the same thing).

Memory: weights are read one tensor at a time (memory-mapped), cast and moved right away, then handed to a model
built on the meta device (`load_state_dict(assign=True)`), so T5-XXL (9.5 GB in bf16) is never held twice. Encoders
load on first use and `release()` drops them (the pipeline encodes, releases, then loads the MMDiT).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import (
    FP8_DTYPES,
    Checkpoint,
    check_finite,
    describe_component,
    detect_components,
    open_file,
    open_folder,
    save_safetensors,
)
from .clip import ACTIVATIONS, CLIPTextModel
from .config import PRESETS, CLIPConfig, Preset, T5Config, get_preset
from .errors import CheckpointError, ConfigError, InputError, list_keys
from .t5 import T5Encoder
from .tokenizers import EOS, CLIPTokenizer, T5Tokenizer, _special_token, check_t5_length, t5_tokenizer_json

log = logging.getLogger("minisd35")

ROLES = ("clip_l", "clip_g", "t5")
NAMES = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5": "T5"}
DIFFUSERS_FOLDERS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5": "text_encoder_3"}
DEFAULT_CONTEXT_DIM = 4096  # T5-XXL's width, used for the zero T5 block when no T5 file is around to ask
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------------------------------
# Configs: transformers' config.json <-> ours, and configs from tensor shapes (Stability files have no config).

def clip_config_from_hf(c: dict, source: str = "config.json") -> CLIPConfig:
    try:
        vocab, width = int(c["vocab_size"]), int(c["hidden_size"])
        eos = int(c.get("eos_token_id", vocab - 1))
        # The OpenAI and SD3 configs say eos_token_id = 2, a known wrong value; transformers then pools at
        # argmax(ids), i.e. at the first <|endoftext|>, the highest id in the vocabulary. Same thing, said plainly:
        if eos == 2:
            eos = vocab - 1
        cfg = CLIPConfig(width=width, layers=int(c["num_hidden_layers"]), heads=int(c["num_attention_heads"]),
                         mlp_dim=int(c["intermediate_size"]), act=str(c.get("hidden_act", "quick_gelu")),
                         vocab_size=vocab, max_positions=int(c.get("max_position_embeddings", 77)),
                         eps=float(c.get("layer_norm_eps", 1e-5)), projection_dim=int(c.get("projection_dim", width)),
                         eos_token_id=eos)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{source}: not a CLIP text model config ({type(e).__name__}: {e})") from None
    if cfg.act not in ACTIVATIONS:
        raise ConfigError(f"{source}: hidden_act={cfg.act!r}; CLIP text models use one of {', '.join(ACTIVATIONS)}")
    if cfg.width % cfg.heads:
        raise ConfigError(f"{source}: hidden_size {cfg.width} is not a multiple of num_attention_heads {cfg.heads}")
    return cfg


def clip_config_to_hf(cfg: CLIPConfig, bos_token_id: int, pad_token_id: int) -> dict:
    return {"architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model",
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.width, "intermediate_size": cfg.mlp_dim,
            "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
            "max_position_embeddings": cfg.max_positions, "hidden_act": cfg.act, "layer_norm_eps": cfg.eps,
            "projection_dim": cfg.projection_dim, "bos_token_id": bos_token_id, "eos_token_id": cfg.eos_token_id,
            "pad_token_id": pad_token_id, "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0,
            "initializer_range": 0.02, "torch_dtype": "float32"}


def t5_config_from_hf(c: dict, source: str = "config.json") -> T5Config:
    if c.get("feed_forward_proj", "relu") != "gated-gelu":
        raise ConfigError(f"{source}: feed_forward_proj={c.get('feed_forward_proj', 'relu')!r}; minisd35 implements "
                          f"the T5 v1.1 encoder (gated-gelu) that SD3 uses")
    try:
        return T5Config(d_model=int(c["d_model"]), d_kv=int(c["d_kv"]), heads=int(c["num_heads"]), d_ff=int(c["d_ff"]),
                        layers=int(c["num_layers"]), vocab_size=int(c["vocab_size"]),
                        buckets=int(c.get("relative_attention_num_buckets", 32)),
                        max_distance=int(c.get("relative_attention_max_distance", 128)),
                        eps=float(c.get("layer_norm_epsilon", 1e-6)))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{source}: not a T5 config ({type(e).__name__}: {e})") from None


def t5_config_to_hf(cfg: T5Config) -> dict:
    return {"architectures": ["T5EncoderModel"], "model_type": "t5", "d_model": cfg.d_model, "d_kv": cfg.d_kv,
            "d_ff": cfg.d_ff, "num_heads": cfg.heads, "num_layers": cfg.layers, "vocab_size": cfg.vocab_size,
            "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True,
            "relative_attention_num_buckets": cfg.buckets, "relative_attention_max_distance": cfg.max_distance,
            "layer_norm_epsilon": cfg.eps, "dropout_rate": 0.0, "initializer_factor": 1.0,
            "tie_word_embeddings": False, "is_encoder_decoder": False, "use_cache": False, "pad_token_id": 0,
            "eos_token_id": 1, "decoder_start_token_id": 0, "torch_dtype": "float32"}


def _layer_count(ck: Checkpoint, pattern: str) -> int:
    idx = [int(m.group(1)) for k in ck.keys() if (m := re.match(pattern, k))]
    return max(idx) + 1 if idx else 0


def clip_config_from_shapes(ck: Checkpoint, role: str, preset: Preset | None = None) -> CLIPConfig:
    """Widths, depth and vocabulary come from the shapes. The head count and activation do not: they are taken
    from `preset`, else from a preset whose CLIP of this role has these shapes (SD3's CLIP-L/G, tiny), else from
    SD3's CLIP of this role with 64-wide heads (true of both real CLIPs)."""
    try:
        vocab, width = ck.shape("text_model.embeddings.token_embedding.weight")
        positions = ck.shape("text_model.embeddings.position_embedding.weight")[0]
        mlp = ck.shape("text_model.encoder.layers.0.mlp.fc1.weight")[0]
    except KeyError as e:
        raise CheckpointError(f"{ck.name}: not a CLIP text encoder in transformers layout (no {e.args[0]!r})") from None
    proj = ck.shape("text_projection.weight")[0] if role == "clip_g" and "text_projection.weight" in ck else width
    shapes = dict(width=width, layers=_layer_count(ck, r"text_model\.encoder\.layers\.(\d+)\."), mlp_dim=mlp,
                  vocab_size=vocab, max_positions=positions, projection_dim=proj)
    if preset is not None:
        return dataclasses.replace(getattr(preset, role), eos_token_id=vocab - 1, **shapes)
    for p in PRESETS.values():
        c = getattr(p, role)
        if all(getattr(c, k) == v for k, v in shapes.items()):
            return dataclasses.replace(c, eos_token_id=vocab - 1)
    if width % 64:
        raise ConfigError(f"{ck.name}: a {width}-wide CLIP matches no preset and is not a multiple of 64, so its head "
                          f"count is unknown; pass preset=, or save it as a diffusers folder with a config.json")
    return dataclasses.replace(getattr(PRESETS["sd3.5-large"], role), heads=width // 64, eos_token_id=vocab - 1,
                               **shapes)


def t5_config_from_shapes(ck: Checkpoint) -> T5Config:
    emb = "shared.weight" if "shared.weight" in ck else "encoder.embed_tokens.weight"
    att = "encoder.block.0.layer.0.SelfAttention."
    try:
        vocab, d_model = ck.shape(emb)
        buckets, heads = ck.shape(att + "relative_attention_bias.weight")
        inner = ck.shape(att + "q.weight")[0]
        d_ff = ck.shape("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")[0]
    except KeyError as e:
        raise CheckpointError(f"{ck.name}: not a T5 v1.1 encoder in transformers layout (no {e.args[0]!r})") from None
    return T5Config(d_model=d_model, d_kv=inner // heads, heads=heads, d_ff=d_ff, vocab_size=vocab, buckets=buckets,
                    layers=_layer_count(ck, r"encoder\.block\.(\d+)\."))


# ---------------------------------------------------------------------------------------------------------------------
# One encoder's file(s): which tensors feed which model keys.

@dataclass
class Stored:
    """One model tensor as the file stores it: the file key, and for fp8 weights the keys of their scales."""

    source: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    weight_scale: str | None = None  # fp32 scalar (or per-row vector): W = W_fp8 * scale
    input_scale: str | None = None  # ComfyUI's activation scale for fp8 x fp8 matmuls; not needed to dequantise


FP8_SIDE = re.compile(r"\.(scale_weight|weight_scale|scale_input|input_scale|comfy_quant)$|(^|\.)scaled_fp8$")
IGNORED = {  # keys some files carry that are not weights
    "text_model.embeddings.position_ids": "the arange(77) buffer older transformers versions saved",
}


@dataclass
class EncoderFile:
    """Where one encoder's weights are: a checkpoint view with any key prefix stripped, the config, and whether it
    is a diffusers folder (config.json) or a single file (Stability / ComfyUI / all-in-one)."""

    role: str
    ck: Checkpoint
    config: CLIPConfig | T5Config
    layout: str  # "diffusers" | "single"

    @property
    def name(self) -> str:
        return self.ck.name + (f" [{self.ck.prefix}*]" if self.ck.prefix else "")

    @property
    def projection(self) -> bool:
        # SD3's CLIP-L projection is the identity: diffusers' single-file loader replaces whatever a single file holds
        # (clip_l.safetensors may carry OpenAI's original projection) with eye(768). Single files: no projection.
        return not (self.role == "clip_l" and self.layout == "single")

    def build(self) -> torch.nn.Module:
        """The model on the meta device (no memory)."""
        with torch.device("meta"):
            if self.role == "t5":
                return T5Encoder(self.config)
            return CLIPTextModel(self.config, projection=self.projection)

    def plan(self) -> dict[str, Stored]:
        """{model key: Stored}, after attaching fp8 scales to their weights, dropping known non-weights, and
        resolving T5's twice-stored embedding. Raises on tensors that fit nowhere and on unknown quant formats."""
        ck, plan, side, unknown = self.ck, {}, {}, []
        for k in ck.keys():
            if FP8_SIDE.search(k):
                side[k] = ck.dtype(k)
            elif k not in IGNORED and not (k == "text_projection.weight" and not self.projection):
                plan[k] = Stored(k, ck.shape(k), ck.dtype(k))
        for k in side:
            if k.endswith("scaled_fp8"):
                continue  # the marker: its dtype names the fp8 format, which each weight's own dtype tells anyway
            layer, kind = k.rsplit(".", 1)
            if kind == "comfy_quant":
                fmt = _comfy_format(ck, k)
                if fmt not in ("float8_e4m3fn", "float8_e5m2"):
                    raise CheckpointError(f"{self.name}: layer {layer!r} uses quantization format {fmt!r}; minisd35 "
                                          f"reads float8_e4m3fn / float8_e5m2 (scaled) weights only")
                continue
            w = plan.get(layer + ".weight")
            if w is None:
                unknown.append(k)
            elif kind in ("scale_weight", "weight_scale"):
                w.weight_scale = k
            else:
                w.input_scale = k
        if self.role == "t5":
            # t5xxl_fp16.safetensors stores the embedding twice (shared.weight and encoder.embed_tokens.weight, tied
            # in the model); diffusers folders store only shared.weight. Read whichever exists, once.
            alias = plan.pop("encoder.embed_tokens.weight", None)
            if alias is not None and "shared.weight" in plan and alias.shape != plan["shared.weight"].shape:
                raise CheckpointError(f"{self.name}: shared.weight {list(plan['shared.weight'].shape)} and "
                                      f"encoder.embed_tokens.weight {list(alias.shape)} differ; the file is damaged")
            if alias is not None and "shared.weight" not in plan:
                plan["shared.weight"] = alias
        if unknown:
            raise CheckpointError(f"{self.name}: scale tensors without a weight: {list_keys(unknown)}")
        return plan

    def check(self) -> dict[str, Stored]:
        """Compare the plan with the model's keys and shapes: one CheckpointError naming the file and the keys."""
        plan = self.plan()
        expected = {k: tuple(v.shape) for k, v in self.build().state_dict().items()}
        missing = [k for k in expected if k not in plan]
        unexpected = [s.source for k, s in plan.items() if k not in expected]
        wrong = [f"{s.source}: file {list(s.shape)} vs model {list(expected[k])}" for k, s in plan.items()
                 if k in expected and s.shape != expected[k]]
        problems = [f"{len(v)} {what}: {list_keys(v, n)}" for v, what, n in
                    ((missing, "missing", 5), (unexpected, "unexpected", 5), (wrong, "with the wrong shape", 3)) if v]
        if problems:
            raise CheckpointError(f"{self.name}: does not match the {NAMES[self.role]} text encoder "
                                  f"({'; '.join(problems)}). The file is incomplete, damaged, or another model")
        return plan


def _comfy_format(ck: Checkpoint, key: str) -> str:
    try:
        return json.loads(bytes(ck.get(key).to(torch.uint8).tolist()).decode("utf-8")).get("format", "?")
    except (ValueError, AttributeError) as e:
        raise CheckpointError(f"{ck.name}: {key!r} is not a JSON quantization tag ({e})") from None


def iter_raw_state(enc: EncoderFile) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
    """(model key, tensor as stored, weight scale or None, input scale or None), one tensor at a time, before any
    dequantisation or cast: for code that keeps fp8 weights in fp8 (a fp8 weight without scale has scale 1)."""
    for key, s in enc.check().items():
        yield (key, enc.ck.get(s.source), enc.ck.get(s.weight_scale).float() if s.weight_scale else None,
               enc.ck.get(s.input_scale).float() if s.input_scale else None)


def _dequantize(w: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype, where: str) -> torch.Tensor:
    w = w.float()
    if scale is not None:
        if scale.numel() == 1:
            w = w * scale.reshape(())
        elif scale.numel() == w.shape[0]:
            w = w * scale.reshape(-1, *[1] * (w.dim() - 1))  # one scale per output row
        else:
            raise CheckpointError(f"{where}: scale of shape {list(scale.shape)} does not fit weight {list(w.shape)}")
    return w.to(dtype)


def load_encoder(enc: EncoderFile, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
    """Build `enc`'s model on the meta device, read each tensor once (cast / dequantised, moved, checked for
    NaN/Inf), and assign them. Returns the model in eval mode without gradients."""
    plan = enc.check()
    state = {}
    for key, s in plan.items():
        # fp16 T5: the FF output projection stays fp32, see t5.py
        target = torch.float32 if dtype == torch.float16 and key.endswith("DenseReluDense.wo.weight") else dtype
        t = src = enc.ck.get(s.source).to(device)
        where = f"{enc.name}: {s.source}"
        if t.dtype in FP8_DTYPES:
            scale = enc.ck.get(s.weight_scale).to(device) if s.weight_scale else None
            t = _dequantize(t, scale, target, where)
            nan = int(torch.isnan(t).sum())
            if nan and (key == "shared.weight" or key.endswith("embedding.weight")):
                warnings.warn(f"{where}: {nan} NaN codes in this fp8 embedding table were replaced by 0 (ComfyUI does "
                              f"the same); a 16-bit copy of the file avoids this", stacklevel=2)
                t = torch.nan_to_num(t, nan=0.0)
        elif t.is_floating_point():
            t = t.to(target)
        check_finite(enc.name, s.source, t, src)
        state[key] = t
    model = enc.build()
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------------------
# Finding the files.

def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _check_kind(role: str, ck: Checkpoint, name: str) -> str:
    """The key prefix of `role`'s tensors in `ck`; a clear error when the file holds something else."""
    comps = detect_components(ck.keys())
    if role in comps:
        return comps[role]
    if role != "t5" and "clip" in comps:
        return comps["clip"]
    what = ", ".join(describe_component(c) for c in comps) or "no known SD3 component"
    hint = {"t5": " (pass it as t5_path=)", "clip_l": " (pass it as clip_l=)", "clip_g": " (pass it as clip_g=)"}
    hints = "".join(hint[c] for c in comps if c in hint) if len(comps) == 1 else ""
    raise CheckpointError(f"{name}: this file holds {what}{hints}, not {describe_component(role)}")


def open_encoder(role: str, path: str | os.PathLike, preset: Preset | None = None) -> EncoderFile:
    """One encoder from a diffusers component folder (config.json + model*.safetensors) or a single file (alone,
    or the text_encoders.<role>.transformer.* part of an all-in-one file; `preset` supplies what the shapes do not
    tell: CLIP's head count and activation)."""
    path = Path(path)
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{path}: not a text encoder folder (no config.json); pass a diffusers "
                                  f"{DIFFUSERS_FOLDERS[role]}/ folder or a .safetensors file")
        ck = open_folder(path, "model")
        _check_kind(role, ck, str(path))
        raw = _read_json(cfg_file)
        cfg = t5_config_from_hf(raw, str(cfg_file)) if role == "t5" else clip_config_from_hf(raw, str(cfg_file))
        enc = EncoderFile(role, ck, cfg, "diffusers")
    else:
        ck = open_file(path)
        ck = ck.sub(_check_kind(role, ck, str(path)))
        cfg = t5_config_from_shapes(ck) if role == "t5" else clip_config_from_shapes(ck, role, preset)
        enc = EncoderFile(role, ck, cfg, "single")
    if role != "t5":
        # CLIP-L and CLIP-G have the same key names; the real ones differ in width.
        other = {"clip_l": ("clip_g", 1280), "clip_g": ("clip_l", 768)}[role]
        if enc.config.width == other[1]:
            raise CheckpointError(f"{enc.name}: a {enc.config.width}-wide CLIP is {NAMES[other[0]]}, not "
                                  f"{NAMES[role]}; pass it as {other[0]}=")
    return enc


T5_PREFERENCE = ("fp32", "bf16", "fp16", "scaled", "fp8", "")  # the first match wins: 16-bit over fp8


def _stability_files(folder: Path) -> dict[str, Path]:
    """clip_l*.safetensors, clip_g*.safetensors, t5*.safetensors in `folder` or its text_encoders/ subfolder."""
    found: dict[str, Path] = {}
    for d in (folder, folder / "text_encoders"):
        if not d.is_dir():
            continue
        files = sorted(p for p in d.glob("*.safetensors") if p.is_file())
        for role, stem in (("clip_l", "clip_l"), ("clip_g", "clip_g"), ("t5", "t5")):
            matches = [p for p in files if p.name.lower().startswith(stem)]
            if role == "t5" and matches:
                rank = lambda p: next(i for i, tag in enumerate(T5_PREFERENCE) if tag in p.name.lower())  # noqa: E731
                matches.sort(key=rank)
                if len(matches) > 1:
                    log.info("%s: several T5 files, using %s", d, matches[0].name)
            if matches and role not in found:
                found[role] = matches[0]
    return found


CLIP_TOKENIZER_DIRS = {"clip_l": ("tokenizer", "clip_tokenizer", "clip", "tokenizers/clip"),
                       "clip_g": ("tokenizer_2", "tokenizer", "clip_tokenizer", "clip", "tokenizers/clip")}
T5_TOKENIZER_DIRS = ("tokenizer_3", "t5_tokenizer", "t5", "tokenizers/t5")


def find_tokenizers(search: Sequence[Path], t5: bool, t5_tokens: int) -> dict:
    """The three tokenizers from the first of `search` that has each. Pads: CLIP-L's from its folder's config (EOS
    by default); CLIP-G's from tokenizer_2/'s config, else "!" (id 0), since a shared CLIP folder carries L's pad."""
    out: dict = {}
    for role in ("clip_l", "clip_g"):
        dirs = [b / n for b in search for n in CLIP_TOKENIZER_DIRS[role] if (b / n / "vocab.json").is_file()]
        if dirs:
            d = dirs[0]
            pad = _special_token(d, "pad_token") if role == "clip_l" or d.name == "tokenizer_2" else None
            out[role] = CLIPTokenizer.from_folder(d, pad or (EOS if role == "clip_l" else "!"), name=NAMES[role])
    dirs = [b / n for b in search for n in T5_TOKENIZER_DIRS
            if (b / n / "spiece.model").is_file() or (b / n / "tokenizer.json").is_file()]
    if t5 and dirs:
        out["t5"] = T5Tokenizer.from_folder(dirs[0], max_length=t5_tokens)
    missing = [r for r in (ROLES if t5 else ROLES[:2]) if r not in out]
    if missing:
        where = ", ".join(str(b) for b in dict.fromkeys(search))
        raise CheckpointError(
            f"no {' / '.join(NAMES[r] for r in missing)} tokenizer found in {where}. Put vocab.json and merges.txt "
            f"(from the tokenizer/ folder of any SD3 diffusers model) into <folder>/tokenizer/, the same files with "
            f"tokenizer_config.json into <folder>/tokenizer_2/ (or let CLIP-G share tokenizer/), and spiece.model "
            f"(from tokenizer_3/) into <folder>/tokenizer_3/, next to the weights or one level up; or pass "
            f"tokenizers=<folder>. minisd35 never downloads files")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The conditioning object.

class TextEncoders:
    """The three encoders with their tokenizers. Weights load on first use (encode, model, load) and `release()`
    drops them; files were already checked (keys, shapes, tokenizers) when this object was made."""

    def __init__(self, files: dict[str, EncoderFile], tokenizers: dict, *, dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu", t5_tokens: int = 256, context_dim: int = DEFAULT_CONTEXT_DIM,
                 t5_note: str | None = None):
        if dtype not in DTYPES:
            raise InputError(f"text encoder dtype {dtype} is not supported; use torch.bfloat16 (default), "
                             f"torch.float32 or torch.float16")
        self.files, self.tokenizers = files, tokenizers
        self.dtype, self.device = dtype, torch.device(device)
        self.t5_tokens = check_t5_length(t5_tokens)
        self.context_dim = context_dim
        self._models: dict[str, torch.nn.Module] = {}
        self._parked: dict = {}  # role -> streaming.Parked, after park()
        clip_width = files["clip_l"].config.width + files["clip_g"].config.width
        if clip_width > context_dim:
            raise ConfigError(f"CLIP-L + CLIP-G are {clip_width} channels wide, more than the context width "
                              f"{context_dim} (T5's d_model) they are zero-padded to")
        for role, enc in files.items():
            tok = tokenizers.get(role)
            vocab = enc.config.vocab_size
            if tok is not None and tok.vocab_size > vocab:
                raise CheckpointError(f"the {NAMES[role]} tokenizer has {tok.vocab_size} tokens but {enc.name} has "
                                      f"{vocab} embedding rows: the tokenizer does not belong to this model")
            if role != "t5" and tok is not None and tok.eos_id != enc.config.eos_token_id:
                raise CheckpointError(f"the {NAMES[role]} tokenizer's EOS id {tok.eos_id} differs from the model's "
                                      f"{enc.config.eos_token_id} ({enc.name}): the tokenizer does not belong here")
        if not self.has_t5 and t5_note:
            warnings.warn(f"T5 is not used ({t5_note}): its {self.t5_tokens} context tokens are zeros, as diffusers "
                          f"does without text_encoder_3; prompts are followed less closely", stacklevel=3)

    @property
    def has_t5(self) -> bool:
        return "t5" in self.files

    @property
    def pooled_dim(self) -> int:
        return sum(e.config.projection_dim if e.projection else e.config.width
                   for r, e in self.files.items() if r != "t5")

    def tokenize(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """{'clip_l': [B, 77], 'clip_g': [B, 77], 't5': [B, T] (only with T5)} int64 token ids."""
        return {role: tok(prompts) if role != "t5" else tok(prompts, self.t5_tokens)
                for role, tok in self.tokenizers.items() if role in self.files}

    def model(self, role: str) -> torch.nn.Module:
        if role not in self._models:
            if role not in self.files:
                raise InputError(f"no {NAMES.get(role, role)} text encoder is loaded")
            self._models[role] = load_encoder(self.files[role], self.dtype, self.device)
        return self._models[role]

    def load(self) -> TextEncoders:
        for role in self.files:
            self.model(role)
        return self

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context [B, 77 + T, D], pooled [B, P]) in self.dtype on self.device."""
        ids = self.tokenize(prompts)
        dev = self.device
        hidden_l, pooled_l = self.model("clip_l")(ids["clip_l"].to(dev))
        hidden_g, pooled_g = self.model("clip_g")(ids["clip_g"].to(dev))
        clip = torch.cat([hidden_l, hidden_g], dim=-1)
        if self.has_t5:
            t5 = self.model("t5")(ids["t5"].to(dev))
        else:
            t5 = torch.zeros(clip.shape[0], self.t5_tokens, self.context_dim, dtype=clip.dtype, device=dev)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat([pooled_l, pooled_g], dim=-1)

    @property
    def parked(self) -> bool:
        return bool(self._parked)

    def park(self, device: str | torch.device) -> TextEncoders:
        """Load the weights and keep them in pinned CPU memory (streaming.Parked), for encoders that visit `device`
        for each prompt: to(device) is then one DMA per tensor, and to("cpu") drops the device copies instead of
        copying them back."""
        from .streaming import Parked

        self.to("cpu").load()
        self._parked = {role: Parked(m, torch.device(device)) for role, m in self._models.items()}
        return self

    def to(self, device: str | torch.device) -> TextEncoders:
        self.device = torch.device(device)
        for role, m in self._models.items():
            parked = self._parked.get(role)
            if parked is None:
                m.to(self.device)
            elif self.device.type == "cpu":
                parked.off()
            else:
                parked.device = self.device
                parked.on()
        return self

    def release(self) -> None:
        """Drop the weights (they reload on the next encode)."""
        self._models.clear()
        self._parked.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __repr__(self) -> str:
        parts = [f"{NAMES[r]}: {e.name}" for r, e in self.files.items()]
        return f"TextEncoders({'; '.join(parts)}; dtype={self.dtype}, device={self.device}, T5 tokens={self.t5_tokens})"


def load_text_encoders(path: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.bfloat16,
                       device: str | torch.device = "cpu", t5: bool = True, clip_l: str | os.PathLike | None = None,
                       clip_g: str | os.PathLike | None = None, t5_path: str | os.PathLike | None = None,
                       t5_tokens: int = 256, tokenizers: str | os.PathLike | None = None,
                       context_dim: int | None = None, preset: Preset | str | None = None) -> TextEncoders:
    """Find, check and prepare SD3's text encoders (weights load on first use). `path`: a diffusers root, a folder
    of clip_l / clip_g / t5xxl .safetensors files, or an all-in-one .safetensors file; clip_l=, clip_g=, t5_path=
    (files or diffusers component folders) override what `path` provides. t5=False, or no T5 file, leaves T5 out
    (zeros in its place, with a warning). tokenizers= names a folder holding tokenizer/, tokenizer_2/, tokenizer_3/
    (or clip/ and t5/). context_dim sets the context width when there is no T5 file to read it from. preset (a
    Preset or its name) gives the CLIP head count and activation for single files whose shapes match no preset."""
    if isinstance(preset, str):
        preset = get_preset(preset)
    files: dict[str, EncoderFile] = {}
    search: list[Path] = [Path(tokenizers)] if tokenizers is not None else []
    where = "the given paths"

    def add(role: str, p: Path) -> None:
        try:
            files[role] = open_encoder(role, p, preset)
        except CheckpointError:
            if role != "t5" or t5:
                raise  # with t5=False a broken or partial T5 does not matter; its config may still give the width

    if path is not None:
        path = Path(path)
        where = str(path)
        if path.is_file():  # all-in-one
            ck = open_file(path)
            comps = detect_components(ck.keys())
            for role in ROLES:
                if role in comps:
                    add(role, path)
            search += [path.parent, path.parent.parent]
        elif path.is_dir() and ((path / "text_encoder").is_dir() or (path / "model_index.json").is_file()):
            for role in ROLES:
                d = path / DIFFUSERS_FOLDERS[role]
                # A text_encoder_3/ with a config but no weights at all (deleted to save 9.5 GB) means: no T5.
                if d.is_dir() and (role != "t5" or any(d.glob("model*.safetensors*"))):
                    add(role, d)
            search.append(path)
        elif path.is_dir():
            for role, f in _stability_files(path).items():
                add(role, f)
            search += [path, path.parent]
        else:
            raise CheckpointError(f"{path}: no such file or folder")
    for role, explicit in (("clip_l", clip_l), ("clip_g", clip_g), ("t5", t5_path)):
        if explicit is not None:
            add(role, Path(explicit))
            search += [Path(explicit).parent, Path(explicit).parent.parent]
    missing = [NAMES[r] for r in ("clip_l", "clip_g") if r not in files]
    if missing:
        raise CheckpointError(f"no {' and '.join(missing)} text encoder found in {where}: expected a diffusers root "
                              f"(text_encoder/, text_encoder_2/), clip_l.safetensors and clip_g.safetensors, or an "
                              f"all-in-one file with text_encoders.clip_l/clip_g keys; or pass clip_l= / clip_g=")
    note = None if t5 and "t5" in files else ("t5=False" if not t5 else f"no T5 file in {where}")
    dim = context_dim
    if dim is None and "t5" in files:
        dim = files["t5"].config.d_model
    elif dim is None and path is not None and (Path(path) / "text_encoder_3" / "config.json").is_file():
        dim = t5_config_from_hf(_read_json(Path(path) / "text_encoder_3" / "config.json")).d_model
    if not t5:
        files.pop("t5", None)
    for enc in files.values():
        enc.check()  # keys and shapes now, so that a bad file fails here rather than at the first encode
    toks = find_tokenizers(list(dict.fromkeys(search)), t5="t5" in files, t5_tokens=t5_tokens)
    return TextEncoders(files, toks, dtype=dtype, device=device, t5_tokens=t5_tokens,
                        context_dim=dim or DEFAULT_CONTEXT_DIM, t5_note=note)


# ---------------------------------------------------------------------------------------------------------------------
# Writing: tokenizer folders and random encoders in the diffusers layout (tests, the tiny model).

def write_tokenizer_folders(root: str | os.PathLike, clip_dir: str | os.PathLike, t5_dir: str | os.PathLike,
                            t5_extra_ids: int = 0) -> None:
    """tokenizer/ (CLIP-L, pad EOS), tokenizer_2/ (CLIP-G, pad "!" = id 0) and tokenizer_3/ (T5) under `root`, in the
    files transformers and diffusers read: vocab.json, merges.txt and configs; spiece.model plus a tokenizer.json
    (so that transformers needs no protobuf to read it) and configs. t5_extra_ids: transformers' <extra_id_N>
    sentinels (100 for the real T5; 0 for a vocabulary that has no room for them)."""
    root, clip_dir, t5_dir = Path(root), Path(clip_dir), Path(t5_dir)
    specials = {"bos_token": "<|startoftext|>", "eos_token": EOS, "unk_token": EOS}
    for name, pad in (("tokenizer", EOS), ("tokenizer_2", "!")):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for f in ("vocab.json", "merges.txt"):
            shutil.copyfile(clip_dir / f, d / f)
        (d / "special_tokens_map.json").write_text(json.dumps({**specials, "pad_token": pad}, indent=2))
        (d / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, "errors": "replace",
             "add_prefix_space": False, **specials, "pad_token": pad}, indent=2))
    d = root / "tokenizer_3"
    d.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(t5_dir / "spiece.model", d / "spiece.model")
    (d / "tokenizer.json").write_text(t5_tokenizer_json(d / "spiece.model"), "utf-8")
    specials = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (d / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": t5_extra_ids, **specials}, indent=2))


def random_clip_state(cfg: CLIPConfig, seed: int, identity_projection: bool = False) -> dict[str, torch.Tensor]:
    """Deterministic random CLIP weights at a scale that keeps the hidden states O(1) and distinct per token."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in CLIPTextModel(cfg).state_dict().items()}
    state = {}
    for k, shape in shapes.items():
        if k == "text_projection.weight" and identity_projection:
            t = torch.eye(*shape)  # SD3's CLIP-L projection
        elif "layer_norm" in k and k.endswith(".weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        elif k.endswith(".bias"):
            t = 0.02 * torch.randn(shape, generator=g)
        elif k.endswith("token_embedding.weight"):
            t = 0.5 * torch.randn(shape, generator=g)
        elif k.endswith("position_embedding.weight"):
            t = 0.1 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / shape[1] ** 0.5
        state[k] = t
    return state


def random_t5_state(cfg: T5Config, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic random T5 weights: unit-scale embeddings like the real T5, 1/sqrt(fan_in) projections (so the
    unscaled attention logits are O(sqrt(d_kv))), a position-bias table large enough to matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in T5Encoder(cfg).state_dict().items()}
    state = {}
    for k, shape in shapes.items():
        if k.endswith("layer_norm.weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        elif k == "shared.weight":
            t = torch.randn(shape, generator=g)
        elif k.endswith("relative_attention_bias.weight"):
            t = 0.5 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / shape[1] ** 0.5
        state[k] = t
    return state


def write_random_text_encoders(root: str | os.PathLike, preset: Preset, seed: int, dtype: torch.dtype = torch.float32,
                               shard: bool = False, force: bool = False) -> dict[str, Path]:
    """CLIP-L, CLIP-G and T5 of `preset` with deterministic random weights, written as the diffusers folders
    text_encoder/, text_encoder_2/, text_encoder_3/ (transformers config.json + model.safetensors; T5 in two shards
    with model.safetensors.index.json when shard=True), loadable by transformers too. CLIP-L's projection is the
    identity, as in SD3. Seeds: seed, seed + 1, seed + 2 for L, G, T5."""
    root = Path(root)
    out = {}
    for i, role in enumerate(ROLES):
        d = root / DIFFUSERS_FOLDERS[role]
        d.mkdir(parents=True, exist_ok=True)
        cfg = getattr(preset, role)
        if role == "t5":
            state, config = random_t5_state(cfg, seed + i), t5_config_to_hf(cfg)
        else:
            state = random_clip_state(cfg, seed + i, identity_projection=role == "clip_l")
            pad = cfg.pad_token_id if cfg.pad_token_id < cfg.vocab_size else cfg.eos_token_id
            config = clip_config_to_hf(cfg, bos_token_id=cfg.vocab_size - 2, pad_token_id=pad)
        state = {k: v.to(dtype) for k, v in state.items()}
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
        (d / "config.json").write_text(json.dumps(config, indent=2))
        if role == "t5" and shard:
            late = {k for k in state if (m := re.match(r"encoder\.block\.(\d+)\.", k)) and int(m[1]) >= cfg.layers // 2}
            parts = [[k for k in state if k not in late], [k for k in state if k in late]]
            weight_map = {}
            for j, part in enumerate(parts):
                name = f"model-{j + 1:05d}-of-00002.safetensors"
                save_safetensors({k: state[k] for k in part}, d / name, {"format": "pt"}, force=force)
                weight_map.update({k: name for k in part})
            total = sum(t.numel() * t.element_size() for t in state.values())
            (d / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        else:
            save_safetensors(state, d / "model.safetensors", {"format": "pt"}, force=force)
        out[role] = d
    return out
