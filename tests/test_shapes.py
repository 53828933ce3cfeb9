"""The `shapes` world and model: the picture generator and the judge against hand-made truths, the held-out split,
the caption vocabulary against the project's tokenizers, the batched evaluation helper against the pipeline, and
(when weights/shapes exists; MINISD35_SHAPES points elsewhere) the shipped model: its files in the real SD3 formats,
the loaders it goes through, parity with diffusers on it, and that it draws what it is asked. Nothing here trains."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minisd35 import shapes as S
from minisd35.config import get_preset

REPO = Path(__file__).resolve().parents[1]
SHAPES_DIR = Path(os.environ.get("MINISD35_SHAPES", REPO / "weights" / "shapes"))
needs_weights = pytest.mark.skipif(not (SHAPES_DIR / "transformer").is_dir(),
                                   reason=f"no trained shapes model in {SHAPES_DIR} (python weights/train_shapes.py "
                                          f"writes it; see weights/README.md)")


def all_prompts():
    return S.heldout_prompts("test") + S.heldout_prompts("val") + S.heldout_prompts("novel")


# --- the judge on pictures whose truth we know ---------------------------------------------------------------------

def test_judge_reads_ground_truth():
    """>= 99% (in fact all) of the held-out pictures, jittered with 3 seeds each, are read back exactly: all five
    attributes; and the un-jittered templates too."""
    rows = []
    for seed in range(3):
        for k, (_, s) in enumerate(all_prompts()):
            rows.append(S.score(S.judge(S.render(s, 1000 * seed + k)), s))
    for attr in ("match", *S.ATTRIBUTES):
        assert sum(r[attr] for r in rows) / len(rows) >= 0.99, attr
    assert all(all(S.score(S.judge(S.render(s)), s).values()) for _, s in S.heldout_prompts("test", 60))


def test_judge_catches_each_wrong_attribute():
    """A picture judged against a prompt that differs in one attribute fails on exactly that attribute."""
    rng = random.Random(3)
    for _ in range(40):
        s = S.random_scene(rng)
        reading = S.judge(S.render(s, rng.randrange(10**6)))
        others = {"shape": [x for x in S.SHAPES if x != s.shape],
                  "colour": [c for c in S.COLOURS if c not in (s.colour, s.background)],
                  "size": [z for z in S.SIZES if z != s.size],
                  "position": [p for p in S.POSITIONS if p != s.position],
                  "background": [c for c in S.COLOURS if c not in (s.colour, s.background)]}
        for attr, values in others.items():
            wrong = S.Scene(**{**s.__dict__, attr: rng.choice(values)})
            got = S.score(reading, wrong)
            assert not got[attr] and all(got[a] for a in S.ATTRIBUTES if a != attr), (s, attr)
            assert got["match"] == (attr in ("size", "background"))


def test_judge_on_empty_and_noisy_pictures():
    blank = Image.new("RGB", (64, 64), S.COLOURS["blue"])
    r = S.judge(blank)
    assert r.shape is None and r.background == "blue"
    assert not S.score(r, S.Scene("circle", "red", "small", "left", "blue"))["match"]
    # Gaussian noise of 10 levels (more than a decent decoder leaves) does not change the reading.
    s = S.Scene("triangle", "orange", "large", "top right", "purple")
    noisy = np.asarray(S.render(s, 1), dtype=np.float64) + np.random.default_rng(0).normal(0, 10, (64, 64, 3))
    assert all(S.score(S.judge(np.clip(noisy, 0, 255).astype(np.uint8)), s).values())
    # A bigger picture is judged after resizing (a 2x upscale reads the same).
    assert all(S.score(S.judge(S.render(s, 1).resize((128, 128), Image.NEAREST)), s).values())


# --- the generator and the split -----------------------------------------------------------------------------------

def test_render_is_deterministic_and_jittered():
    s = S.Scene("star", "red", "small", "center", "white")
    a, b, c = (np.asarray(S.render(s, k)) for k in (5, 5, 6))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    batch = S.render_batch([s, s], seed=2)
    assert np.array_equal(batch[1], np.asarray(S.render(s, 2 * 1_000_003 + 1)))


def test_heldout_split():
    """Training never draws a held-out combination or a novel pair; test and val are disjoint held-out sets; the
    prompt sets are fixed (the same strings on any machine)."""
    rng = random.Random(0)
    drawn = {S.random_scene(rng) for _ in range(20000)}
    assert not any(S.is_heldout(s) for s in drawn)
    assert not any((s.shape, s.colour) in S.NOVEL_PAIRS for s in drawn)
    assert len(drawn) > 5000  # nearly every allowed combination appears
    test, val, novel = (S.heldout_prompts(x) for x in ("test", "val", "novel"))
    assert (len(test), len(val), len(novel)) == (200, 77, 72)
    assert not {s for _, s in test} & {s for _, s in val}
    assert all(s in S.HELDOUT for _, s in test + val)
    assert all((s.shape, s.colour) in S.NOVEL_PAIRS for _, s in novel)
    assert test[0][0] == S.heldout_prompts("test")[0][0] == test[0][1].caption()
    assert test[0][0] == "a large orange square at the bottom, black background"
    tune = S.tuning_prompts()  # chooses sampler settings: drawn from training combinations, never held out
    assert len({s for _, s in tune}) == 400 and not any(S.is_heldout(s) for _, s in tune)
    assert tune == S.tuning_prompts() and tune[0][0] == "a small red square at the bottom left, yellow background"


def test_captions_are_single_tokens_and_fit():
    """Every caption word is one token in the project's CLIP and T5 vocabularies, and the longest caption fits the
    shapes preset's T5 length with room to spare."""
    from minisd35.tokenizers import CLIPTokenizer, T5Tokenizer

    clip = CLIPTokenizer.from_folder(REPO / "weights" / "tokenizers" / "clip", "<|endoftext|>")
    t5 = T5Tokenizer.from_folder(REPO / "weights" / "tokenizers" / "t5", max_length=64)
    rng = random.Random(1)
    captions = [S.random_caption(S.random_scene(rng), rng) for _ in range(300)] + [p for p, _ in all_prompts()]
    words = {w.strip(",") for c in captions for w in c.split()}
    for w in words:
        ids = [i for i in clip([w])[0].tolist() if i < 998]
        assert len(ids) == 1, (w, ids)
    longest = max(int((t5([c]) != 0).sum()) for c in captions)  # tokens + EOS
    assert longest <= get_preset("shapes").sampler.t5_tokens - 4


def test_generate_equals_pipeline_calls():
    """The batched evaluation helper draws exactly what one pipeline call per prompt draws (tiny random model), with
    the pipeline's own forward: with attention="fp8" the pictures are the FP8-attention ones, not the plain model's
    (an earlier version sampled pipe.mmdit and so measured the default path under every option)."""
    from minisd35.pipeline import load_pipeline
    from minisd35.tiny import tiny_root

    prompts, seeds = ["a red circle", "a big green star on the left"], [3, 11]
    drawn = {}
    for attention in ("auto", "fp8"):
        pipe = load_pipeline(tiny_root(), dtype=torch.float32, device="cpu", attention=attention)
        batched = S.generate(pipe, prompts, seeds, steps=3, guidance=4.0)
        single = [pipe(p, seed=s, steps=3, guidance=4.0)[0] for p, s in zip(prompts, seeds)]
        for a, b in zip(batched, single):
            diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
            assert (diff <= 1).mean() > 0.999  # FP8 attention too: its V scales are per batch row
        drawn[attention] = np.stack([np.asarray(im, dtype=np.int16) for im in batched])
    assert np.abs(drawn["fp8"] - drawn["auto"]).max() > 1


# --- the shipped model ------------------------------------------------------------------------------------------------

@needs_weights
def test_shipped_files_are_the_real_formats():
    from minisd35.checkpoint import open_file, open_folder
    from minisd35.config import MMDiTConfig
    from minisd35.tiny import MODEL_INDEX

    index = json.loads((SHAPES_DIR / "model_index.json").read_text())
    assert {k: v for k, v in index.items() if not k.startswith("_")} == {k: v for k, v in MODEL_INDEX.items()
                                                                         if not k.startswith("_")}
    cfg = json.loads((SHAPES_DIR / "transformer" / "config.json").read_text())
    assert cfg["_class_name"] == "SD3Transformer2DModel"
    assert MMDiTConfig.from_diffusers(cfg) == get_preset("shapes").mmdit
    vae = json.loads((SHAPES_DIR / "vae" / "config.json").read_text())
    assert vae["_class_name"] == "AutoencoderKL" and vae["latent_channels"] == 16
    assert (vae["scaling_factor"], vae["shift_factor"]) != (1.5305, 0.0609)  # set from the trained latents
    assert json.loads((SHAPES_DIR / "scheduler" / "scheduler_config.json").read_text())["shift"] == 1.0
    single = open_file(SHAPES_DIR / "sd3_shapes.safetensors")
    assert all(k.startswith("model.diffusion_model.") for k in single.keys())
    for ck in (single, open_folder(SHAPES_DIR / "transformer", "diffusion_pytorch_model"),
               open_folder(SHAPES_DIR / "vae", "diffusion_pytorch_model")):
        assert {ck.dtype(k) for k in ck.keys()} == {torch.bfloat16}
    total = sum(f.stat().st_size for f in SHAPES_DIR.rglob("*") if f.is_file())
    assert total < 24 * 2**20


@needs_weights
def test_shipped_model_loads_through_the_sd35_loaders():
    """Both layouts go through load_mmdit / load_vae / load_text_encoders exactly as SD3.5's files do, are detected
    as the 'shapes' variant, and hold the same MMDiT."""
    from minisd35.cli import describe_path
    from minisd35.pipeline import _resolve, load_pipeline
    from minisd35.weights import load_mmdit

    assert _resolve(SHAPES_DIR)["kind"] == "diffusers"
    where = _resolve(SHAPES_DIR / "sd3_shapes.safetensors")
    assert where["kind"] == "single" and where["vae"] == SHAPES_DIR / "vae"
    a = load_mmdit(SHAPES_DIR, dtype=torch.float32)
    b = load_mmdit(SHAPES_DIR / "sd3_shapes.safetensors", dtype=torch.float32)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert describe_path(SHAPES_DIR)["variant"] == "shapes"
    assert describe_path(SHAPES_DIR / "sd3_shapes.safetensors")["variant"] == "shapes"
    pipe = load_pipeline(SHAPES_DIR / "sd3_shapes.safetensors", dtype=torch.float32, device="cpu")
    assert pipe.preset.name == "shapes" and pipe.defaults.shift == 1.0
    assert pipe.vae().config.scaling_factor == json.loads((SHAPES_DIR / "vae" / "config.json").read_text())[
        "scaling_factor"]


@needs_weights
def test_shipped_model_matches_diffusers():
    """diffusers' StableDiffusion3Pipeline reads the same folder and, from the same noise, reaches the same latents
    (fp32, 3 steps with CFG). The folder's scheduler/ is diffusers' flow-matching Euler, so ours runs Euler here
    (minisd35's shapes preset defaults to DPM++ 2M, which test_sampling checks against the Stability reference's
    sample_dpmpp_2m written out in float64)."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from minisd35.pipeline import load_pipeline

    ref = diffusers.StableDiffusion3Pipeline.from_pretrained(SHAPES_DIR, torch_dtype=torch.float32)
    ours = load_pipeline(SHAPES_DIR, dtype=torch.float32, device="cpu")
    prompt = "a small red circle on the left, blue background"
    *_, last = ours.steps(prompt, seed=5, steps=3, guidance=5.0, sampler="euler")
    theirs = ref(prompt=prompt, generator=torch.Generator("cpu").manual_seed(5), height=64, width=64,
                 num_inference_steps=3, guidance_scale=5.0, max_sequence_length=24, output_type="latent").images
    err = float((last.latents.double() - theirs.double()).norm() / theirs.double().norm())
    assert err < 1e-4, err


@needs_weights
def test_shipped_model_draws_what_it_is_asked(tmp_path):
    """The bf16 model at its default settings, on the first 24 held-out test prompts: the judge agrees on most; and
    the command line draws a requested picture in a few seconds."""
    from minisd35.cli import main
    from minisd35.pipeline import load_pipeline

    items = S.heldout_prompts("test", 24)
    pipe = load_pipeline(SHAPES_DIR, dtype=torch.bfloat16, device="cpu")
    images = S.generate(pipe, [p for p, _ in items], list(range(len(items))))
    acc = S.accuracy(images, [s for _, s in items])
    assert acc["match"] >= 0.6, acc
    out = tmp_path / "star.png"
    assert main(["generate", "a large yellow star in the center, blue background", "--weights", str(SHAPES_DIR),
                 "-o", str(out)]) == 0
    r = S.judge(Image.open(out))
    assert (r.colour, r.background) == ("yellow", "blue"), r
