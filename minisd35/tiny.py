"""The built-in `tiny` model: the whole SD3 pipeline at toy size with deterministic random weights, written as
real checkpoint files so that `--model tiny`, the tests and the examples go through exactly the loaders real weights
use. Random weights draw noise: what tiny proves is that every stage runs, not that it makes pictures (the trained
`shapes` model under weights/shapes/ does that).

Two layouts, both complete:
- "diffusers": a model root with model_index.json, scheduler/, transformer/, vae/, text_encoder{,_2,_3}/ and
  tokenizer{,_2,_3}/, as on the Hugging Face hub;
- "stability": sd3_tiny.safetensors (MMDiT under model.diffusion_model., VAE under first_stage_model.) beside
  clip_l.safetensors, clip_g.safetensors, t5xxl_fp16.safetensors (which, like the real one, stores the T5 embedding
  twice) and the tokenizer folders, as people keep the Stability downloads.
The tokenizers are the project's own (weights/tokenizers/, trained by weights/train_tokenizers.py): no third-party
vocabulary ships with minisd35.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from . import __version__
from .checkpoint import PREFIXES, save_safetensors
from .config import get_preset
from .errors import ConfigError

# The component table of the real SD3/SD3.5 diffusers repos (so diffusers itself can load what we write).
MODEL_INDEX = {
    "_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.42.1",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_3": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"], "tokenizer_3": ["transformers", "T5TokenizerFast"],
    "image_encoder": [None, None], "feature_extractor": [None, None],
}
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
TOKENIZERS = WEIGHTS_DIR / "tokenizers"


def tokenizer_dirs() -> tuple[Path, Path]:
    clip, t5 = TOKENIZERS / "clip", TOKENIZERS / "t5"
    if not (clip / "vocab.json").is_file() or not (t5 / "spiece.model").is_file():
        raise ConfigError(f"the project's tokenizer files are missing under {TOKENIZERS} (a source checkout of "
                          f"minisd35 has them; `python weights/train_tokenizers.py` regenerates them)")
    return clip, t5


def write_tiny(root: str | Path, seed: int = 0, layout: str = "diffusers", dtype: torch.dtype = torch.float32,
               force: bool = False) -> Path:
    """Write the tiny model under `root` in the given layout; deterministic in `seed`. Returns the path to load:
    the root (diffusers) or the MMDiT single file (stability)."""
    from .text import write_random_text_encoders, write_tokenizer_folders
    from .vae import random_vae_state, vae_to_ldm, write_random_vae
    from .weights import random_mmdit_state, save_mmdit

    preset = get_preset("tiny")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    clip_dir, t5_dir = tokenizer_dirs()
    write_tokenizer_folders(root, clip_dir, t5_dir)
    mmdit_state = random_mmdit_state(preset.mmdit, seed, dtype)
    if layout == "diffusers":
        save_mmdit(mmdit_state, preset.mmdit, root / "transformer", layout="diffusers", force=force)
        write_random_vae(root / "vae", preset.vae, seed + 10, dtype)
        write_random_text_encoders(root, preset, seed + 20, dtype, force=force)
        (root / "scheduler").mkdir(exist_ok=True)
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
            {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}, indent=2))
        (root / "model_index.json").write_text(json.dumps(MODEL_INDEX | {"_minisd35": f"tiny seed {seed}"}, indent=2))
        return root
    if layout != "stability":
        raise ConfigError(f"unknown layout {layout!r}; choose 'diffusers' or 'stability'")
    vae_ldm = vae_to_ldm(random_vae_state(preset.vae, seed + 10, dtype))
    single = {PREFIXES["mmdit"] + k: v for k, v in mmdit_state.items()}
    single.update({PREFIXES["vae"] + k: v for k, v in vae_ldm.items()})
    out = root / "sd3_tiny.safetensors"
    from .weights import CONFIG_META

    save_safetensors(single, out, {CONFIG_META: json.dumps(preset.mmdit.to_diffusers())}, force=force)
    with tempfile.TemporaryDirectory() as tmp:  # the diffusers text folders, re-saved as Stability-style files
        dirs = write_random_text_encoders(tmp, preset, seed + 20, dtype)
        for role, name in (("clip_l", "clip_l.safetensors"), ("clip_g", "clip_g.safetensors"),
                           ("t5", "t5xxl_fp16.safetensors")):
            from .checkpoint import open_folder

            ck = open_folder(dirs[role], "model")
            state = {k: ck.get(k) for k in ck.keys()}
            if role == "t5":
                state["encoder.embed_tokens.weight"] = state["shared.weight"].clone()
            save_safetensors(state, root / name, force=force)
    return out


def cache_dir() -> Path:
    base = os.environ.get("MINISD35_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "minisd35")
    return Path(base).expanduser()


def tiny_root(seed: int = 0, layout: str = "diffusers") -> Path:
    """The tiny model in the local cache (written once, then reused): the path to pass to load_pipeline."""
    final = cache_dir() / f"tiny-{layout}-seed{seed}-v{__version__}"
    target = final if layout == "diffusers" else final / "sd3_tiny.safetensors"
    if (final / ".complete").is_file():
        return target
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        write_tiny(tmp, seed, layout)
        (tmp / ".complete").write_text("ok\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if (final / ".complete").is_file():  # another process finished first
            return target
        raise
    return target
