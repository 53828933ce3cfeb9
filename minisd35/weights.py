"""Loading the MMDiT from the formats people actually have, strictly, without holding anything twice.

Accepted:
- a diffusers model root (holding transformer/), or a transformer/ folder: config.json plus one or several
  diffusion_pytorch_model*.safetensors shards with their index;
- a Stability single file (sd3.5_large.safetensors, ...): keys under `model.diffusion_model.` (or no prefix); the
  VAE (`first_stage_model.*`) and text encoders (`text_encoders.*`) that some files carry are ignored here;
- ComfyUI scaled-fp8 files and minisd35's own pre-quantized files (fp8 weights plus scales): their FP8 linears are
  kept in FP8 (fp8.py builds the quantized modules); an fp8 tensor without a scale gets scale 1.

The model uses the Stability key names, so a Stability file maps 1:1. diffusers names are converted:
q/k/v are concatenated into qkv ([Wq; Wk; Wv] along the output dim), and the two AdaLayerNormContinuous weights
(the final layer's and the last block's context modulation, [2D, D]) have their halves swapped, because diffusers
stores (scale, shift) where Stability stores (shift, scale). The 6- and 9-chunk AdaLayerNormZero weights use the
same order in both formats and are never swapped.

Loading is: read the header(s) -> plan {target key: (shape, dtype, how to make it)} -> derive or check the config ->
build the model on the meta device -> compare the plan with the model's state dict (missing / unexpected / wrong
shape: one CheckpointError naming the file and the keys) -> read tensors one at a time, cast, move, check for
NaN/Inf -> load_state_dict(assign=True). Peak host memory is one copy of the weights, never two.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import (
    FP8_DTYPES,
    Checkpoint,
    check_finite,
    describe_component,
    detect_components,
    open_file,
    open_folder,
)
from .config import MMDiTConfig, check_against_preset, mmdit_config_from_shapes
from .errors import CheckpointError, ConfigError, OutputExistsError, list_keys
from .mmdit import MMDiT


@dataclass
class Planned:
    """One tensor the model will receive: its shape and source dtype, and a function that reads and converts it."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]
    source: str  # the key(s) in the file, for messages


# --- diffusers <-> Stability names -----------------------------------------------------------------------------------

_B = r"transformer_blocks\.(\d+)\."
_RENAME = [  # (diffusers regex, Stability template); \1 is the block index where there is one
    (r"pos_embed\.pos_embed", "pos_embed"),
    (r"pos_embed\.proj\.(weight|bias)", r"x_embedder.proj.\1"),
    (r"time_text_embed\.timestep_embedder\.linear_1\.(weight|bias)", r"t_embedder.mlp.0.\1"),
    (r"time_text_embed\.timestep_embedder\.linear_2\.(weight|bias)", r"t_embedder.mlp.2.\1"),
    (r"time_text_embed\.text_embedder\.linear_1\.(weight|bias)", r"y_embedder.mlp.0.\1"),
    (r"time_text_embed\.text_embedder\.linear_2\.(weight|bias)", r"y_embedder.mlp.2.\1"),
    (r"context_embedder\.(weight|bias)", r"context_embedder.\1"),
    (_B + r"norm1\.linear\.(weight|bias)", r"joint_blocks.\1.x_block.adaLN_modulation.1.\2"),
    (_B + r"norm1_context\.linear\.(weight|bias)", r"joint_blocks.\1.context_block.adaLN_modulation.1.\2"),
    (_B + r"attn\.norm_q\.weight", r"joint_blocks.\1.x_block.attn.ln_q.weight"),
    (_B + r"attn\.norm_k\.weight", r"joint_blocks.\1.x_block.attn.ln_k.weight"),
    (_B + r"attn\.norm_added_q\.weight", r"joint_blocks.\1.context_block.attn.ln_q.weight"),
    (_B + r"attn\.norm_added_k\.weight", r"joint_blocks.\1.context_block.attn.ln_k.weight"),
    (_B + r"attn\.to_out\.0\.(weight|bias)", r"joint_blocks.\1.x_block.attn.proj.\2"),
    (_B + r"attn\.to_add_out\.(weight|bias)", r"joint_blocks.\1.context_block.attn.proj.\2"),
    (_B + r"attn2\.norm_q\.weight", r"joint_blocks.\1.x_block.attn2.ln_q.weight"),
    (_B + r"attn2\.norm_k\.weight", r"joint_blocks.\1.x_block.attn2.ln_k.weight"),
    (_B + r"attn2\.to_out\.0\.(weight|bias)", r"joint_blocks.\1.x_block.attn2.proj.\2"),
    (_B + r"ff\.net\.0\.proj\.(weight|bias)", r"joint_blocks.\1.x_block.mlp.fc1.\2"),
    (_B + r"ff\.net\.2\.(weight|bias)", r"joint_blocks.\1.x_block.mlp.fc2.\2"),
    (_B + r"ff_context\.net\.0\.proj\.(weight|bias)", r"joint_blocks.\1.context_block.mlp.fc1.\2"),
    (_B + r"ff_context\.net\.2\.(weight|bias)", r"joint_blocks.\1.context_block.mlp.fc2.\2"),
    (r"norm_out\.linear\.(weight|bias)", r"final_layer.adaLN_modulation.1.\1"),
    (r"proj_out\.(weight|bias)", r"final_layer.linear.\1"),
]
_RENAME = [(re.compile(a + "$"), b) for a, b in _RENAME]
_QKV = [  # diffusers q/k/v projections -> one fused Stability qkv; group(2) is q/k/v, group(3) weight/bias
    (re.compile(_B + r"attn\.to_([qkv])\.(weight|bias)$"), "joint_blocks.{}.x_block.attn.qkv.{}"),
    (re.compile(_B + r"attn\.add_([qkv])_proj\.(weight|bias)$"), "joint_blocks.{}.context_block.attn.qkv.{}"),
    (re.compile(_B + r"attn2\.to_([qkv])\.(weight|bias)$"), "joint_blocks.{}.x_block.attn2.qkv.{}"),
]


def swapped_keys(depth: int) -> set[str]:
    """The (scale, shift) <-> (shift, scale) weights: final layer and the last block's context modulation."""
    last = f"joint_blocks.{depth - 1}.context_block.adaLN_modulation.1."
    return {p + s for p in (last, "final_layer.adaLN_modulation.1.") for s in ("weight", "bias")}


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _depth_of(names) -> int:
    idx = [int(m.group(1)) for k in names if (m := re.match(r"(?:transformer|joint)_blocks\.(\d+)\.", k))]
    return max(idx) + 1 if idx else 0


def plan_from_diffusers(ck: Checkpoint) -> tuple[dict[str, Planned], list[str]]:
    """Stability-named plan from diffusers-named tensors; returns (plan, keys that map to nothing)."""
    plan: dict[str, Planned] = {}
    qkv: dict[str, dict[str, str]] = {}
    unknown = []
    depth = _depth_of(ck.keys())
    swap = swapped_keys(depth)
    for k in ck.keys():
        for pat, tmpl in _QKV:
            if m := pat.match(k):
                qkv.setdefault(tmpl.format(m.group(1), m.group(3)), {})[m.group(2)] = k
                break
        else:
            for pat, tmpl in _RENAME:
                if pat.match(k):
                    target = pat.sub(tmpl, k)
                    fix = swap_halves if target in swap else (lambda t: t)
                    plan[target] = Planned(ck.shape(k), ck.dtype(k), lambda k=k, fix=fix: fix(ck.get(k)), k)
                    break
            else:
                unknown.append(k)
    for target, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            unknown += list(parts.values())  # an incomplete q/k/v set: report the pieces as unusable
            continue
        srcs = [parts[c] for c in "qkv"]
        shapes = [ck.shape(s) for s in srcs]
        if len({s[1:] for s in shapes}) != 1:
            raise CheckpointError(f"{ck.name}: q/k/v shapes differ for {target}: {dict(zip(srcs, shapes))}")
        shape = (sum(s[0] for s in shapes),) + shapes[0][1:]
        plan[target] = Planned(shape, ck.dtype(srcs[0]), lambda srcs=srcs: torch.cat([ck.get(s) for s in srcs]),
                               " + ".join(srcs))
    return plan, unknown


def to_diffusers(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Stability-named MMDiT state dict -> diffusers names (split qkv, swap the continuous-adaLN halves back)."""
    out: dict[str, torch.Tensor] = {}
    swap = swapped_keys(depth)
    for k, t in state.items():
        if k in swap:
            t = swap_halves(t)
        m = re.match(r"joint_blocks\.(\d+)\.(x_block|context_block)\.(attn2?)\.qkv\.(weight|bias)$", k)
        if m:
            i, stream, attn, wb = m.groups()
            names = ({"x_block": ["to_q", "to_k", "to_v"], "context_block": ["add_q_proj", "add_k_proj", "add_v_proj"]}
                     [stream])
            for name, part in zip(names, t.chunk(3, dim=0)):
                out[f"transformer_blocks.{i}.{attn}.{name}.{wb}"] = part.contiguous()
            continue
        out[_stability_to_diffusers_name(k)] = t
    return out


def _stability_to_diffusers_name(k: str) -> str:
    rules = [
        (r"^pos_embed$", "pos_embed.pos_embed"),
        (r"^x_embedder\.proj\.", "pos_embed.proj."),
        (r"^t_embedder\.mlp\.0\.", "time_text_embed.timestep_embedder.linear_1."),
        (r"^t_embedder\.mlp\.2\.", "time_text_embed.timestep_embedder.linear_2."),
        (r"^y_embedder\.mlp\.0\.", "time_text_embed.text_embedder.linear_1."),
        (r"^y_embedder\.mlp\.2\.", "time_text_embed.text_embedder.linear_2."),
        (r"^final_layer\.adaLN_modulation\.1\.", "norm_out.linear."),
        (r"^final_layer\.linear\.", "proj_out."),
        (r"^joint_blocks\.(\d+)\.x_block\.adaLN_modulation\.1\.", r"transformer_blocks.\1.norm1.linear."),
        (r"^joint_blocks\.(\d+)\.context_block\.adaLN_modulation\.1\.", r"transformer_blocks.\1.norm1_context.linear."),
        (r"^joint_blocks\.(\d+)\.x_block\.attn\.ln_q\.", r"transformer_blocks.\1.attn.norm_q."),
        (r"^joint_blocks\.(\d+)\.x_block\.attn\.ln_k\.", r"transformer_blocks.\1.attn.norm_k."),
        (r"^joint_blocks\.(\d+)\.context_block\.attn\.ln_q\.", r"transformer_blocks.\1.attn.norm_added_q."),
        (r"^joint_blocks\.(\d+)\.context_block\.attn\.ln_k\.", r"transformer_blocks.\1.attn.norm_added_k."),
        (r"^joint_blocks\.(\d+)\.x_block\.attn\.proj\.", r"transformer_blocks.\1.attn.to_out.0."),
        (r"^joint_blocks\.(\d+)\.context_block\.attn\.proj\.", r"transformer_blocks.\1.attn.to_add_out."),
        (r"^joint_blocks\.(\d+)\.x_block\.attn2\.ln_q\.", r"transformer_blocks.\1.attn2.norm_q."),
        (r"^joint_blocks\.(\d+)\.x_block\.attn2\.ln_k\.", r"transformer_blocks.\1.attn2.norm_k."),
        (r"^joint_blocks\.(\d+)\.x_block\.attn2\.proj\.", r"transformer_blocks.\1.attn2.to_out.0."),
        (r"^joint_blocks\.(\d+)\.x_block\.mlp\.fc1\.", r"transformer_blocks.\1.ff.net.0.proj."),
        (r"^joint_blocks\.(\d+)\.x_block\.mlp\.fc2\.", r"transformer_blocks.\1.ff.net.2."),
        (r"^joint_blocks\.(\d+)\.context_block\.mlp\.fc1\.", r"transformer_blocks.\1.ff_context.net.0.proj."),
        (r"^joint_blocks\.(\d+)\.context_block\.mlp\.fc2\.", r"transformer_blocks.\1.ff_context.net.2."),
        (r"^context_embedder\.", "context_embedder."),
    ]
    for pat, rep in rules:
        if re.match(pat, k):
            return re.sub(pat, rep, k)
    raise KeyError(f"no diffusers name for MMDiT key {k!r}")


class StateDictSource:
    """A state dict in memory, seen through the Checkpoint read interface (keys/shape/dtype/get), so in-memory
    weights (a diffusers model built in a benchmark, say) go through the same conversion and checks as files."""

    def __init__(self, state: dict[str, torch.Tensor], name: str = "state dict"):
        self.state, self.name, self.metadata = state, name, {}

    def keys(self) -> list[str]:
        return list(self.state)

    def __contains__(self, key: str) -> bool:
        return key in self.state

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.state[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self.state[key].dtype

    def get(self, key: str) -> torch.Tensor:
        return self.state[key]


def mmdit_from_diffusers_model(dm: torch.nn.Module, cfg: MMDiTConfig | None = None) -> MMDiT:
    """An MMDiT holding a diffusers SD3Transformer2DModel's weights (converted: fused qkv, swapped halves), on the
    same device and in the same dtype; for side-by-side runs. Tensors that need no conversion are shared."""
    cfg = cfg or MMDiTConfig.from_diffusers(dict(dm.config), "diffusers model config")
    src = StateDictSource(dm.state_dict(), "diffusers model")
    plan, unknown = plan_from_diffusers(src)
    if unknown:
        raise CheckpointError(f"diffusers model: unconvertible keys {list_keys(unknown)}")
    with torch.device("meta"):
        model = MMDiT(cfg)
    check_plan(plan, model, src.name)
    model.load_state_dict({k: p.make() for k, p in plan.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


# --- finding the files -----------------------------------------------------------------------------------------------

def open_mmdit(path: str | Path) -> tuple[Checkpoint, str, MMDiTConfig | None]:
    """Find the MMDiT tensors under `path` -> (checkpoint view, 'diffusers' | 'stability', config from config.json)."""
    path = Path(path)
    if path.is_dir():
        folder = path / "transformer" if (path / "transformer").is_dir() else path
        cfg_file = folder / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{path}: not a diffusers model root or transformer/ folder (no "
                                  f"{'transformer/' if folder == path else ''}config.json); pass the folder that holds "
                                  f"config.json and diffusion_pytorch_model*.safetensors, or a .safetensors file")
        try:
            raw = json.loads(cfg_file.read_text())
        except (OSError, ValueError, RecursionError) as e:
            raise CheckpointError(f"{cfg_file}: unreadable config ({e})") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{cfg_file}: not a diffusers config (JSON is not an object)")
        cls = raw.get("_class_name") or " ".join(raw.get("architectures") or [])
        other = next((c for key, c in (("AutoencoderKL", "vae"), ("T5", "t5"), ("CLIP", "clip")) if key in str(cls)),
                     None)
        if other:
            raise CheckpointError(f"{folder}: this folder holds {describe_component(other)} ({cls}), not an MMDiT; "
                                  f"pass the diffusers model root or its transformer/ folder")
        cfg = MMDiTConfig.from_diffusers(raw, str(cfg_file))
        return open_folder(folder, "diffusion_pytorch_model"), "diffusers", cfg
    ck = open_file(path)
    comps = detect_components(ck.keys())
    if "mmdit" not in comps:
        what = ", ".join(describe_component(c) for c in comps) or "no known SD3 component"
        raise CheckpointError(f"{path}: this file holds {what}, not an MMDiT; pass the diffusion model file "
                              f"(e.g. sd3.5_large.safetensors) or a diffusers model root")
    prefix = comps["mmdit"]
    layout = "diffusers" if f"{prefix}pos_embed.proj.weight" in ck else "stability"
    return ck.sub(prefix), layout, None


def plan_mmdit(ck: Checkpoint, layout: str) -> tuple[dict[str, Planned], list[str]]:
    if layout == "diffusers":
        return plan_from_diffusers(ck)
    plan = {k: Planned(ck.shape(k), ck.dtype(k), lambda k=k: ck.get(k), k) for k in ck.keys()}
    return plan, []


CONFIG_META = "minisd35.mmdit_config"  # files we write carry their config (diffusers' config.json format) here
FP8_SIDECARS = re.compile(r"\.(scale_weight|weight_scale|scale_input|input_scale|comfy_quant)$|(^|\.)scaled_fp8$")


def split_fp8(plan: dict[str, Planned]) -> tuple[dict[str, Planned], dict[str, dict[str, Planned]]]:
    """Separate FP8 side tensors (ComfyUI's scaled_fp8 marker, scale_weight/weight_scale, scale_input/input_scale,
    comfy_quant) from model tensors. Returns (model plan, {layer: {'weight_scale': .., 'input_scale': ..}})."""
    main, side = {}, {}
    for k, p in plan.items():
        m = FP8_SIDECARS.search(k)
        if not m:
            main[k] = p
            continue
        if k.endswith("scaled_fp8"):
            continue  # the marker's dtype names the format; every fp8 tensor carries its own dtype anyway
        layer, kind = k.rsplit(".", 1)
        kind = {"scale_weight": "weight_scale", "scale_input": "input_scale"}.get(kind, kind)
        side.setdefault(layer, {})[kind] = p
    return main, side


def check_plan(plan: dict[str, Planned], model: torch.nn.Module, source: str) -> None:
    state = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in state.items()}
    missing = [k for k in expected if k not in plan]
    unexpected = [f"{plan[k].source}" for k in plan if k not in expected]
    wrong = [f"{plan[k].source}: file {list(plan[k].shape)} vs model {list(expected[k])}"
             for k in plan if k in expected and tuple(plan[k].shape) != expected[k]]
    # integer or bool data where the model holds floats (weights, biases, scales) cannot be cast meaningfully
    dtypes = [f"{plan[k].source}: file {str(plan[k].dtype).removeprefix('torch.')} vs model floating point"
              for k in plan if k in state and state[k].is_floating_point() and not plan[k].dtype.is_floating_point]
    problems = [f"{len(dtypes)} with a non-float dtype: {list_keys(dtypes, 3)}"] if dtypes else []
    if missing:
        problems.append(f"{len(missing)} missing: {list_keys(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {list_keys(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} with the wrong shape: {list_keys(wrong, 3)}")
    if problems:
        raise CheckpointError(f"{source}: does not match the MMDiT architecture ({'; '.join(problems)}). The file is "
                              f"incomplete, damaged, or a different model variant")


def materialize(plan: dict[str, Planned], dtype: torch.dtype, device, source: str, finite: bool = True,
                keep: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Read every planned tensor once, cast floating tensors to dtype (those in `keep`, FP8 weights and their fp32
    scales, keep their dtype), move to device, and check for NaN/Inf (NaN codes for FP8) after the cast, so that an
    overflow caused by the cast itself is caught too."""
    out = {}
    for k, p in plan.items():
        t = src = p.make()
        if t.is_floating_point() and k not in keep:
            t = t.to(device=device, dtype=dtype)  # an FP8 tensor outside an FP8 layer is upcast with scale 1
        else:
            t = t.to(device=device)
        if finite:
            check_finite(source, p.source, t, src)
        out[k] = t
    return out


def _check_depth(cfg: MMDiTConfig, plan: dict[str, Planned], source: str) -> None:
    """The config's depth against the blocks the file holds, before the model is built: a damaged config or key
    (joint_blocks.99999...) gives one clear message instead of building a huge model only to list its keys."""
    blocks = {int(m.group(1)) for k in plan if (m := re.match(r"joint_blocks\.(\d+)\.", k))}
    # never materialise range(depth): a damaged config can claim 2**62 blocks
    extra = sorted(b for b in blocks if b >= cfg.depth)[:3]
    if extra or len(blocks) != cfg.depth:
        absent = list(itertools.islice((i for i in range(cfg.depth) if i not in blocks), 3))
        raise CheckpointError(f"{source}: expected joint blocks 0..{cfg.depth - 1} (depth {cfg.depth}) but the file "
                              f"holds {len(blocks)} blocks" + (f"; missing: {absent}..." if absent else "")
                              + (f"; unexpected: {extra}..." if extra else "")
                              + "; the file is incomplete, damaged or does not belong to this config")


def _config_from_file(ck: Checkpoint, plan: dict[str, Planned]) -> MMDiTConfig:
    """The config a file carries (minisd35 metadata) or implies (tensor shapes). Anything wrong with it is wrong
    with the file, so it is a CheckpointError."""
    try:
        if CONFIG_META in ck.metadata:
            return MMDiTConfig.from_diffusers(json.loads(ck.metadata[CONFIG_META]), f"{ck.name} metadata")
        return mmdit_config_from_shapes({k: p.shape for k, p in plan.items()}, ck.name)
    except (ValueError, TypeError, IndexError, AttributeError, RecursionError) as e:  # ConfigError is a ValueError
        msg = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
        raise CheckpointError(f"{ck.name}: cannot tell the MMDiT architecture from the file ({msg}); the file is "
                              f"damaged, or pass config=/preset=") from None


def load_mmdit(path: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
               preset: str | None = None, config: MMDiTConfig | None = None, check_finite: bool = True,
               fp8=None, fp8_impl: str | None = None, verbose: bool = False) -> MMDiT:
    """Load an MMDiT from a diffusers root/folder, a Stability single file, or an FP8 file (ComfyUI scaled fp8,
    minisd35 quantized). `preset` cross-checks the architecture ('sd3.5-large', ...) and fails with the difference.
    The config comes from `config`, else config.json, else the file's minisd35 metadata, else the tensor shapes.
    FP8 linears found in the file stay FP8 (fp8.FP8Linear); everything else is cast to `dtype`. `fp8` (a policy name,
    .json file or rule list) quantises the other linears while they are read (see fp8.plan_quantize)."""
    ck, layout, cfg = open_mmdit(path)
    plan, unknown = plan_mmdit(ck, layout)
    plan, fp8_side = split_fp8(plan)
    if config is not None:
        cfg = config.validate()
    elif cfg is None:
        cfg = _config_from_file(ck, plan)
    if preset is not None:
        check_against_preset(cfg, preset, ck.name)
    _check_depth(cfg, plan, ck.name)
    try:
        with torch.device("meta"):
            model = MMDiT(cfg)
    except (RuntimeError, ValueError, TypeError, OverflowError) as e:  # sizes no model can have (negative, ...)
        err = ConfigError if config is not None else CheckpointError
        raise err(f"{ck.name}: no MMDiT can be built with {cfg} ({e}); the configuration or the file is "
                  f"damaged") from None
    fp8_weights = {k.rsplit(".", 1)[0] for k, p in plan.items() if p.dtype in FP8_DTYPES and k.endswith(".weight")}
    fp8_layers = sorted(fp8_weights | set(fp8_side))
    keep: frozenset[str] = frozenset()
    if fp8_layers:
        from .fp8 import (
            META_RECIPES,
            prepare_fp8_load,  # the loader (not the model) knows about FP8
        )

        recipes = json.loads(ck.metadata.get(META_RECIPES, "{}"))
        plan, keep = prepare_fp8_load(model, plan, fp8_side, fp8_layers, ck.name, dtype, impl=fp8_impl,
                                      recipes=recipes, policy=fp8)
    if fp8 is not None:
        from .fp8 import plan_quantize

        plan, keep_q, report = plan_quantize(model, plan, fp8, device, impl=fp8_impl, dtype=dtype)
        keep = keep | keep_q
        model.quant_report = report
        if verbose:
            print(report)
    if unknown:
        raise CheckpointError(f"{ck.name}: {len(unknown)} tensors that are not part of an SD3 MMDiT: "
                              f"{list_keys(unknown)}")
    check_plan(plan, model, ck.name)
    state = materialize(plan, dtype, device, ck.name, finite=check_finite, keep=keep)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


# --- writing (tests, the tiny model, conversions) --------------------------------------------------------------------

def save_mmdit(state: dict[str, torch.Tensor], cfg: MMDiTConfig, dest: str | Path, layout: str = "stability",
               shards: int = 1, prefix: str = "model.diffusion_model.", metadata: dict[str, str] | None = None,
               force: bool = False) -> Path:
    """Write a Stability-named MMDiT state dict as a Stability single file (`dest` = file) or as a diffusers
    transformer/ folder (`dest` = folder; config.json + shards + index when shards > 1). Atomic per file."""
    from .checkpoint import save_safetensors, write_atomic

    dest = Path(dest)
    if layout == "stability":
        meta = {CONFIG_META: json.dumps(cfg.to_diffusers()), **(metadata or {})}
        return save_safetensors({prefix + k: v for k, v in state.items()}, dest, meta, force=force)
    sd = to_diffusers(state, cfg.depth)
    names = (["diffusion_pytorch_model.safetensors"] if shards == 1 else
             [f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
             + ["diffusion_pytorch_model.safetensors.index.json"])
    existing = [n for n in names + ["config.json"] if (dest / n).exists()]
    if existing and not force:  # refuse before writing anything, so that no folder is left half old, half new
        raise OutputExistsError(f"{dest} already holds {list_keys(existing, 3)}; pass force=True to overwrite")
    dest.mkdir(parents=True, exist_ok=True)

    def write_json(name: str, obj: dict) -> None:
        write_atomic(dest / name, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2)), force=force)

    if shards == 1:
        save_safetensors(sd, dest / names[0], metadata, force=force)
    else:
        keys = sorted(sd)
        weight_map = {}
        for i, name in enumerate(names[:-1]):
            chunk = keys[i::shards]
            save_safetensors({k: sd[k] for k in chunk}, dest / name, metadata, force=force)
            weight_map.update({k: name for k in chunk})
        total = sum(t.numel() * t.element_size() for t in sd.values())
        write_json(names[-1], {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json("config.json", {"_class_name": "SD3Transformer2DModel", **cfg.to_diffusers()})  # last: the folder
    return dest


def random_mmdit_state(cfg: MMDiTConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Deterministic random weights with a scale that keeps activations O(1) through the blocks (unlike the
    zero-init of training, which would make every block an identity and hide bugs). QK-norm weights near 1, the
    positional table the sincos table SD3 was trained with."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = MMDiT(cfg)
    state = {}
    for k, v in model.state_dict().items():
        if k == "pos_embed":
            t = sincos_pos_table(cfg.hidden, cfg.pos_embed_max_size)[None]
        elif k.endswith((".ln_q.weight", ".ln_k.weight")):
            t = 1 + 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith(".bias"):
            t = 0.02 * torch.randn(v.shape, generator=g)
        else:
            fan_in = v[0].numel()
            t = torch.randn(v.shape, generator=g) / fan_in**0.5
            if "adaLN_modulation" in k:
                t = t * 0.5  # modulation near identity, gates O(0.5)
        state[k] = t.to(dtype)
    return state


def sincos_pos_table(D: int, P: int) -> torch.Tensor:
    """MAE-style 2-D sincos table [P*P, D], rows = grid row-major; first D/2 channels encode the column (w)
    coordinate, the last D/2 the row (h), each as [sin | cos] with frequencies 1/10000^(i/(D/4))."""
    omega = 1.0 / 10000 ** (torch.arange(D // 4, dtype=torch.float64) / (D / 4))
    def emb(pos):
        out = pos.flatten()[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)
    grid = torch.arange(P, dtype=torch.float64)
    rows, cols = torch.meshgrid(grid, grid, indexing="ij")
    return torch.cat([emb(cols), emb(rows)], dim=1).float()
