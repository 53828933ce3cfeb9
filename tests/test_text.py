"""The text side against its references: CLIP and T5 encoders vs transformers, tokenizers vs transformers' on the
same files, the SD3 conditioning vs diffusers' StableDiffusion3Pipeline.encode_prompt, every file format against
the diffusers folder it was made from, and the errors for bad inputs. Everything is small and random, written as
real checkpoint files; the real OpenAI CLIP vocabulary comes from ../shared/testdata (skipped when absent)."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch

from minisd35.checkpoint import open_file, save_safetensors
from minisd35.config import PRESETS, CLIPConfig, T5Config
from minisd35.errors import CheckpointError, InputError
from minisd35.t5 import relative_position_bucket
from minisd35.text import (
    iter_raw_state,
    load_encoder,
    load_text_encoders,
    open_encoder,
    random_clip_state,
    random_t5_state,
    write_random_text_encoders,
    write_tokenizer_folders,
)
from minisd35.tokenizers import CLIPTokenizer, T5Tokenizer, read_spiece, t5_tokenizer_json, write_clip_files

REPO = Path(__file__).resolve().parents[1]
TESTDATA = Path(__file__).parents[2] / "shared" / "testdata"
OPENAI_BPE = TESTDATA / "clip_bpe_simple_vocab_16e6.txt.gz"
TINY_TOK = REPO / "weights" / "tokenizers"

PROMPTS = [
    "", " ", "a red cube on a table", "A  RED\tcube\n\non   a table  ", "!!!???...,,,;;:-)", "hello! world!!",
    "café naïve Ünïcödé Ωmega", "😀🎉 emoji party 🐱‍👤", "東京の夜景 日本語", "中文提示词，猫",
    "1234567890 3.14159 1,000,000",
    "don't it's they're I'LL we've", "<|endoftext|> inside <|startoftext|>", "ｆｕｌｌｗｉｄｔｈ ﬁ ligature ⅷ",
    "a\u00a0nbsp\u200bzero width", "e\u0301 combining", "&amp; html &lt;tag&gt;", "new\nline\r\nwindows\ttab",
    "a small red circle on the left, blue background", "x" * 300,
    " ".join(["a big green star next to a tiny purple hexagon"] * 12),  # > 77 CLIP tokens
    " ".join(f"word{i} star circle" for i in range(120)),  # > 256 T5 tokens
]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert b.float().norm() > 0
    return float((a.float() - b.float()).norm() / b.float().norm())


def quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


def encode(path, prompts, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """load_text_encoders(path, fp32, **kw).encode(prompts), without the warnings (T5 left out, truncation)."""
    return quiet(lambda: load_text_encoders(path, dtype=torch.float32, **kw).encode(prompts))


# Odd shapes on purpose: widths that are not powers of two, 3 heads, 3 layers.
CLIP_L = CLIPConfig(width=48, layers=3, heads=3, mlp_dim=80, act="quick_gelu", vocab_size=1000, projection_dim=48,
                    eos_token_id=999, pad_token_id=999)
CLIP_G = CLIPConfig(width=40, layers=3, heads=5, mlp_dim=72, act="gelu", vocab_size=1000, projection_dim=36,
                    eos_token_id=999, pad_token_id=0)
T5 = T5Config(d_model=96, d_kv=12, heads=3, d_ff=56, layers=3, vocab_size=1000)
PRESET = dataclasses.replace(PRESETS["tiny"], name="test", clip_l=CLIP_L, clip_g=CLIP_G, t5=T5)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A diffusers-layout root: random text encoders (T5 sharded) and the project's tiny tokenizers."""
    r = tmp_path_factory.mktemp("root")
    write_random_text_encoders(r, PRESET, seed=7, shard=True)
    write_tokenizer_folders(r, TINY_TOK / "clip", TINY_TOK / "t5")
    return r


@pytest.fixture(scope="module")
def openai_vocab(tmp_path_factory) -> Path:
    if not OPENAI_BPE.is_file():
        pytest.skip(f"{OPENAI_BPE} not present")
    # OpenAI's simple_tokenizer: line 0 is a header, lines 1..48894 the merges (49152 - 256 - 2 of them).
    merges = gzip.open(OPENAI_BPE).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    d = tmp_path_factory.mktemp("openai_clip")
    write_clip_files(d, merges)
    return d


# --------------------------------------------------------------------------------------------------------------------
# Tokenizers

def test_clip_tokenizer_matches_transformers_on_the_openai_vocabulary(openai_vocab, tmp_path):
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    vocab = json.loads((openai_vocab / "vocab.json").read_text("utf-8"))
    assert len(vocab) == 49408 and vocab["!"] == 0
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    write_tokenizer_folders(tmp_path, openai_vocab, TINY_TOK / "t5")
    for folder, pad_id in (("tokenizer", 49407), ("tokenizer_2", 0)):
        ours = CLIPTokenizer.from_folder(tmp_path / folder)
        hf = HFCLIPTokenizer.from_pretrained(tmp_path / folder)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = ours(PROMPTS)
        want = hf(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        assert ours.pad_id == hf.pad_token_id == pad_id
        assert torch.equal(got, want), [p for p, a, b in zip(PROMPTS, got, want) if not torch.equal(a, b)]
        # Exactly the prompts longer than 75 tokens warn, with the number dropped.
        n_long = [len(hf(p).input_ids) - 2 for p in PROMPTS]
        long = [n for n in n_long if n > 75]
        assert len(long) >= 2 and len(caught) == len(long)
        assert all(f"the last {n - 75} were dropped" in str(w.message) for w, n in zip(caught, long))
    # CLIP-G's pad "!" is a special token: a "!" typed in the prompt is id 0, not "!</w>" (256). transformers agrees.
    wow = vocab["wow</w>"]
    assert CLIPTokenizer.from_folder(tmp_path / "tokenizer")(["wow!"])[0, :4].tolist() == [49406, wow, 256, 49407]
    assert CLIPTokenizer.from_folder(tmp_path / "tokenizer_2")(["wow!"])[0, :4].tolist() == [49406, wow, 0, 49407]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    """A small T5-format SentencePiece model trained here, covering the scripts in PROMPTS."""
    import sentencepiece as spm

    text = ["a red cube on a table", "café naïve Ünïcödé Ωmega", "東京の夜景 日本語 中文提示词 猫",
            "hello world 1234567890",
            "the quick brown fox jumps over the lazy dog", "a big green star next to a tiny purple hexagon",
            "don't it's they're we've I'LL", "a small red circle on the left, blue background"] * 50
    d = tmp_path_factory.mktemp("spm")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(d / "spiece"), vocab_size=80,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, num_threads=1, minloglevel=2)
    return d / "spiece.model"


@pytest.mark.parametrize("length", [256, 512])
def test_t5_tokenizer_matches_transformers(spm_model, tmp_path, length):
    from transformers import T5Tokenizer as HFT5Tokenizer

    pieces, charsmap = read_spiece(spm_model)
    assert [p for p, _, _ in pieces[:3]] == ["<pad>", "</s>", "<unk>"]
    # transformers' own construction from the same pieces and normaliser table (it cannot read spiece.model without
    # protobuf), independent of our tokenizer.json writer.
    hf = HFT5Tokenizer(vocab=[(p, s) for p, s, _ in pieces], _spm_precompiled_charsmap=charsmap, extra_ids=0)
    want = hf(PROMPTS, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    (tmp_path / "tokenizer.json").write_text(t5_tokenizer_json(spm_model), "utf-8")
    for path in (spm_model, tmp_path / "tokenizer.json"):
        tok = T5Tokenizer(path, max_length=length)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = tok(PROMPTS)
        assert torch.equal(got, want), [p for p, a, b in zip(PROMPTS, got, want) if not torch.equal(a, b)]
        assert (got == 2).any() and (got[:, -1] != 0).any()  # some unknown characters; some prompts fill the length
        assert len(caught) == sum(len(hf(p).input_ids) > length for p in PROMPTS) >= 1


def test_tiny_tokenizers_are_reproducible_and_sensible(tmp_path):
    import runpy

    runpy.run_path(str(REPO / "weights" / "train_tokenizers.py"), run_name="not_main")["main"](["--out", str(tmp_path)])
    for f in ("clip/vocab.json", "clip/merges.txt", "t5/spiece.model"):
        assert (tmp_path / f).read_bytes() == (TINY_TOK / f).read_bytes(), f
    clip = CLIPTokenizer(TINY_TOK / "clip" / "vocab.json", TINY_TOK / "clip" / "merges.txt")
    assert (clip.vocab_size, clip.bos_id, clip.eos_id) == (1000, 998, 999)
    assert clip.eos_id == PRESETS["tiny"].clip_l.eos_token_id and clip.vocab_size == PRESETS["tiny"].clip_l.vocab_size
    ids = clip(["a small red circle on the left, blue background"])[0]
    assert ids[:12].tolist().count(999) == 1 and len([i for i in ids.tolist() if i != 999]) == 11  # one token a word
    t5 = T5Tokenizer(TINY_TOK / "t5" / "spiece.model")
    assert t5.vocab_size == PRESETS["tiny"].t5.vocab_size == 1000
    assert (t5(["a red cube on a table"])[0] > 0).sum() == 7 and 2 not in t5(["a red cube on a table"])[0].tolist()


def test_tokenizer_folders_load_in_transformers(root):
    from transformers import CLIPTokenizer as HFCLIPTokenizer
    from transformers import T5TokenizerFast

    enc = quiet(load_text_encoders, root, dtype=torch.float32)
    ids = quiet(enc.tokenize, PROMPTS)
    for role, folder in (("clip_l", "tokenizer"), ("clip_g", "tokenizer_2")):
        hf = HFCLIPTokenizer.from_pretrained(root / folder)
        assert torch.equal(ids[role], hf(PROMPTS, padding="max_length", max_length=77, truncation=True,
                                         return_tensors="pt").input_ids)
    hf = T5TokenizerFast.from_pretrained(root / "tokenizer_3")
    assert torch.equal(ids["t5"], hf(PROMPTS, padding="max_length", max_length=256, truncation=True,
                                     return_tensors="pt").input_ids)


# --------------------------------------------------------------------------------------------------------------------
# Encoders vs transformers

def test_clip_matches_transformers(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    for cfg, eos in ((CLIP_L, 2), (CLIP_G, 999)):  # 2: the legacy eos_token_id of the real configs (argmax pooling)
        hc = CLIPTextConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_dim,
                            num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, hidden_act=cfg.act,
                            projection_dim=cfg.projection_dim, max_position_embeddings=77, eos_token_id=eos)
        hf = CLIPTextModelWithProjection(hc).eval()
        hf.load_state_dict(random_clip_state(cfg, seed=3))  # a random, non-identity projection
        hf.save_pretrained(tmp_path / cfg.act)
        ours = load_encoder(open_encoder("clip_g", tmp_path / cfg.act), dtype=torch.float32)
        ids = torch.randint(0, 998, (3, 77))
        ids[:, 0] = 998
        ids[0, 9:] = 999  # CLIP-L style: padded with EOS; pooled at the first one
        ids[1, 76] = 999
        ids[2, 30], ids[2, 31:] = 999, 0  # CLIP-G style: pad 0
        with torch.no_grad():
            want = hf(ids, output_hidden_states=True)
            hidden, pooled = ours(ids)
        assert rel(hidden, want.hidden_states[-2]) <= 1e-5
        assert rel(pooled, want.text_embeds) <= 1e-5


def test_t5_matches_transformers_sharded(tmp_path):
    from transformers import T5Config as HFT5Config
    from transformers import T5EncoderModel

    hc = HFT5Config(vocab_size=T5.vocab_size, d_model=T5.d_model, d_kv=T5.d_kv, num_heads=T5.heads, d_ff=T5.d_ff,
                    num_layers=T5.layers, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    hf = T5EncoderModel(hc).eval()
    state = random_t5_state(T5, seed=5)
    hf.load_state_dict({**state, "encoder.embed_tokens.weight": state["shared.weight"]})
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = load_encoder(open_encoder("t5", tmp_path), dtype=torch.float32)
    ids = torch.randint(0, T5.vocab_size, (2, 300))  # > 128 positions: every relative-position bucket is used
    with torch.no_grad():
        assert rel(ours(ids), hf(ids).last_hidden_state) <= 1e-5
    pos = torch.arange(-300, 301)
    assert torch.equal(relative_position_bucket(pos), hf.encoder.block[0].layer[0].SelfAttention
                       ._relative_position_bucket(pos, bidirectional=True, num_buckets=32, max_distance=128))


def test_t5_fp16_keeps_large_activations_finite(tmp_path):
    # Weights that push the FF output and the residual stream far past fp16's 65504.
    state = random_t5_state(T5, seed=11)
    for k in state:
        if k.endswith(("wi_0.weight", "wi_1.weight", "wo.weight")):
            state[k] = state[k] * 40
    save_safetensors(state, tmp_path / "t5xxl_big.safetensors")
    enc = open_encoder("t5", tmp_path / "t5xxl_big.safetensors")
    ids = torch.randint(0, T5.vocab_size, (2, 40))
    ref32 = load_encoder(enc, torch.float32)
    with torch.no_grad():
        x = ref32.shared(ids)
        block = ref32.encoder.block[0]
        ff_out = block.layer[1].DenseReluDense(block.layer[1].layer_norm(block.layer[0](x, block.layer[0]
                                              .SelfAttention.position_bias(40))))
        assert ff_out.abs().max() > 65504  # the input really overflows fp16
        want = ref32(ids)
        naive = load_encoder(enc, torch.float32).half()(ids)  # everything fp16, no safeguards
        got = load_encoder(enc, torch.float16)(ids)
    assert not torch.isfinite(naive).all()
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    assert rel(got, want) < 5e-3  # fp16 rounding (unit roundoff 4.9e-4) over a few ops


# --------------------------------------------------------------------------------------------------------------------
# Conditioning vs diffusers

def _diffusers_pipeline(root: Path, with_t5: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    # The transformer only tells encode_prompt the context width (joint_attention_dim) for the zero T5 block.
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=T5.d_model, caption_projection_dim=16, out_channels=4, pos_embed_max_size=8,
        pooled_projection_dim=CLIP_L.projection_dim + CLIP_G.projection_dim)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
        text_encoder=CLIPTextModelWithProjection.from_pretrained(root / "text_encoder").eval(),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2").eval(),
        text_encoder_3=T5EncoderModel.from_pretrained(root / "text_encoder_3").eval() if with_t5 else None,
        tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(root / "tokenizer_2"),
        tokenizer_3=T5TokenizerFast.from_pretrained(root / "tokenizer_3"))


@pytest.mark.parametrize("with_t5", [True, False])
def test_conditioning_matches_diffusers(root, with_t5):
    prompts = ["a small red circle on the left, blue background", "wow! a star!!", PROMPTS[20], ""]
    pipe = _diffusers_pipeline(root, with_t5)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want_ctx, _, want_pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False)
        ids_l = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids
        ids_g = pipe.tokenizer_2(prompts, padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids
        ids_t5 = pipe.tokenizer_3(prompts, padding="max_length", max_length=256, truncation=True,
                                  return_tensors="pt").input_ids
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        enc = load_text_encoders(root, dtype=torch.float32, t5=with_t5)
        ids = enc.tokenize(prompts)
        ctx, pooled = enc.encode(prompts)
    assert torch.equal(ids["clip_l"], ids_l) and torch.equal(ids["clip_g"], ids_g)
    assert (ids_l == 999).any() and (ids_g == 0).any() and not torch.equal(ids_l, ids_g)  # the pads really differ
    if with_t5:
        assert torch.equal(ids["t5"], ids_t5)
    else:
        assert "t5" not in ids and enc.has_t5 is False
        assert sum("T5 is not used" in str(w.message) for w in caught) == 1
    assert ctx.shape == want_ctx.shape == (4, 77 + 256, T5.d_model) and pooled.shape == want_pooled.shape == (4, 84)
    assert rel(ctx, want_ctx) <= 1e-5 and rel(pooled, want_pooled) <= 1e-5
    assert rel(ctx[:, :77], want_ctx[:, :77]) <= 1e-5  # the CLIP part alone (when T5 dominates the norm)
    assert (ctx[:, :77, CLIP_L.width + CLIP_G.width :] == 0).all()
    assert bool((ctx[:, 77:] == 0).all()) is (not with_t5)


def test_release_reloads_and_bf16_runs(root):
    enc = quiet(load_text_encoders, root, dtype=torch.float32)
    a = quiet(enc.encode, ["a red cube"])
    assert set(enc._models) == {"clip_l", "clip_g", "t5"}
    enc.release()
    assert enc._models == {}
    assert torch.equal(quiet(enc.encode, ["a red cube"])[0], a[0])
    bf = quiet(load_text_encoders, root)  # default bf16
    ctx, pooled = bf.to("cpu").encode(["a red cube"])
    assert ctx.dtype == pooled.dtype == torch.bfloat16 and rel(ctx, a[0]) < 0.05
    assert quiet(load_text_encoders(root, t5_tokens=512).encode, ["a"])[0].shape == (1, 77 + 512, T5.d_model)
    with pytest.raises(InputError, match="1..512"):
        load_text_encoders(root, t5_tokens=513)


# --------------------------------------------------------------------------------------------------------------------
# File formats: each gives the outputs of the diffusers folder it was made from.

def _fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax().float() / 448
    return (w.float() / scale).to(torch.float8_e4m3fn), scale


def _sd(folder: Path) -> dict[str, torch.Tensor]:
    ck = open_encoder("t5" if folder.name.endswith("3") else "clip_l", folder).ck
    return {k: ck.get(k) for k in ck.keys()}


@pytest.fixture(scope="module")
def root16(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("root16")
    write_random_text_encoders(r, PRESET, seed=9, dtype=torch.float16, shard=True)
    write_tokenizer_folders(r, TINY_TOK / "clip", TINY_TOK / "t5")
    return r


def test_stability_files_and_all_in_one_match_the_diffusers_folder(root16, tmp_path):
    prompts = ["a big green star next to a tiny purple hexagon", "wow!"]
    want = encode(root16, prompts)
    L, G, T = _sd(root16 / "text_encoder"), _sd(root16 / "text_encoder_2"), _sd(root16 / "text_encoder_3")
    # Stability/ComfyUI separate files: clip_l with an extra position_ids buffer and a (non-identity) projection
    # that SD3 ignores; T5 with its embedding stored twice.
    te = tmp_path / "text_encoders"
    save_safetensors({**L, "text_model.embeddings.position_ids": torch.arange(77)[None],
                      "text_projection.weight": torch.randn(48, 48).half()}, te / "clip_l.safetensors")
    save_safetensors(G, te / "clip_g.safetensors")
    save_safetensors({**T, "encoder.embed_tokens.weight": T["shared.weight"].clone()}, te / "t5xxl_fp16.safetensors")
    shutil.copytree(root16 / "tokenizer", tmp_path / "tokenizer")
    shutil.copytree(root16 / "tokenizer_3", tmp_path / "tokenizer_3")  # CLIP-G shares tokenizer/ with pad "!"
    got = encode(te, prompts, preset=PRESET)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # All-in-one with the MMDiT's keys around (ignored here).
    allin = {"model.diffusion_model.x_embedder.proj.weight": torch.zeros(4, 4, 2, 2)}
    for prefix, sd in (("clip_l", L), ("clip_g", G), ("t5xxl", T)):
        allin.update({f"text_encoders.{prefix}.transformer.{k}": v for k, v in sd.items()})
    save_safetensors(allin, tmp_path / "sd3_all_in_one.safetensors")
    got = encode(tmp_path / "sd3_all_in_one.safetensors", prompts, preset=PRESET)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("fmt", ["fp8", "scaled_legacy", "scaled_new", "all_in_one_scaled"])
def test_fp8_t5_files_match_their_dequantised_weights(root16, tmp_path, fmt):
    prompts = ["a big green star next to a tiny purple hexagon", "a red cube on a table"]
    T = _sd(root16 / "text_encoder_3")
    stored, exact = {}, {}  # the fp8 file, and the 16-bit weights it stands for
    for k, w in T.items():
        linear = k.endswith(("q.weight", "k.weight", "v.weight", "o.weight", "wi_0.weight", "wi_1.weight", "wo.weight"))
        if fmt == "fp8":  # every tensor fp8, no scales
            stored[k] = w.to(torch.float8_e4m3fn)
            exact[k] = stored[k].float()
        elif linear:
            stored[k], s = _fp8(w)
            exact[k] = stored[k].float() * s
            if fmt == "scaled_new":
                stored[k[:-7] + ".weight_scale"] = s
                stored[k[:-7] + ".input_scale"] = torch.tensor(0.5)
                stored[k[:-7] + ".comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
            else:
                stored[k[:-7] + ".scale_weight"] = s
                stored[k[:-7] + ".scale_input"] = torch.tensor(1.0)
        else:
            stored[k], exact[k] = w, w.float()
    if fmt == "fp8":
        codes = stored["shared.weight"].view(torch.uint8).clone()
        codes[5, :3] = 0x7F  # NaN codes in the embedding, as in some fp8 T5 files
        stored["shared.weight"] = codes.view(torch.float8_e4m3fn)
        exact["shared.weight"][5, :3] = 0
    if fmt.startswith("scaled"):
        stored["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    te = tmp_path / "te"
    shutil.copytree(root16 / "tokenizer", tmp_path / "tokenizer")
    shutil.copytree(root16 / "tokenizer_2", tmp_path / "tokenizer_2")
    shutil.copytree(root16 / "tokenizer_3", tmp_path / "tokenizer_3")
    save_safetensors(exact, tmp_path / "exact" / "t5xxl_exact.safetensors")
    if fmt == "all_in_one_scaled":
        allin = {f"text_encoders.t5xxl.transformer.{k}": v for k, v in stored.items()}
        for prefix, folder in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")):
            allin.update({f"text_encoders.{prefix}.transformer.{k}": v for k, v in _sd(root16 / folder).items()})
        save_safetensors(allin, tmp_path / "all.safetensors")
        path, kw = tmp_path / "all.safetensors", {"preset": PRESET}
    else:
        save_safetensors(stored, te / f"t5xxl_{fmt}.safetensors")
        path, kw = None, {"clip_l": root16 / "text_encoder", "clip_g": root16 / "text_encoder_2",
                          "t5_path": te / f"t5xxl_{fmt}.safetensors", "tokenizers": tmp_path}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = load_text_encoders(path, dtype=torch.float32, **kw).encode(prompts)
    assert (sum("NaN codes" in str(w.message) for w in caught) == 1) is (fmt == "fp8")
    ref = encode(None, prompts, clip_l=root16 / "text_encoder", clip_g=root16 / "text_encoder_2",
                 t5_path=tmp_path / "exact" / "t5xxl_exact.safetensors", tokenizers=tmp_path)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    original = encode(root16, prompts)[0]
    assert 0 < rel(got[0], original) < 0.15  # fp8 rounding, no more
    if fmt != "fp8":  # the raw (fp8 weight, scale) pairs are visible before dequantisation
        enc = open_encoder("t5", path or te / f"t5xxl_{fmt}.safetensors")
        raw = {k: (t, s) for k, t, s, _ in iter_raw_state(enc)}
        w, s = raw["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
        assert w.dtype == torch.float8_e4m3fn and s is not None and s.numel() == 1
        assert torch.equal(w.float() * s, exact["encoder.block.1.layer.1.DenseReluDense.wo.weight"])


# --------------------------------------------------------------------------------------------------------------------
# Missing parts and bad inputs: clear errors that name the file.

def test_missing_t5_file_gives_zeros_and_one_warning(tmp_path):
    # Stability-style files of the `tiny` preset: no config anywhere, the preset is recognised from the shapes.
    tiny = tmp_path / "tiny"
    write_random_text_encoders(tiny, PRESETS["tiny"], seed=1)
    write_tokenizer_folders(tiny, TINY_TOK / "clip", TINY_TOK / "t5")
    te = tmp_path / "text_encoders"
    save_safetensors(_sd(tiny / "text_encoder"), te / "clip_l.safetensors")
    save_safetensors(_sd(tiny / "text_encoder_2"), te / "clip_g.safetensors")
    shutil.copytree(TINY_TOK / "clip", tmp_path / "clip")  # our own tokenizer folder layout: clip/ (pads by role)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        enc = load_text_encoders(te, dtype=torch.float32, context_dim=PRESETS["tiny"].t5.d_model)
        ctx, pooled = enc.encode(["a red cube!"])
        enc.encode(["a blue cube"])
    assert [str(w.message).count("no T5 file") for w in caught] == [1]
    assert enc.files["clip_g"].config == PRESETS["tiny"].clip_g and enc.tokenizers["clip_g"].pad_id == 0
    want = encode(tiny, ["a red cube!"], t5=False)
    assert torch.equal(ctx, want[0]) and torch.equal(pooled, want[1])
    assert (ctx[:, 77:] == 0).all() and ctx.shape == (1, 77 + 256, 64) and pooled.shape == (1, 64)


def test_bad_inputs_name_the_file(root16, tmp_path):
    clip_l = tmp_path / "clip_l.safetensors"
    save_safetensors(_sd(root16 / "text_encoder"), clip_l)
    # A truncated download.
    cut = tmp_path / "cut" / "clip_l.safetensors"
    cut.parent.mkdir()
    cut.write_bytes(clip_l.read_bytes()[: clip_l.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_text_encoders(cut.parent)
    assert str(cut) in str(e.value)
    # A T5 file handed as CLIP.
    t5 = tmp_path / "t5xxl_fp16.safetensors"
    save_safetensors(_sd(root16 / "text_encoder_3"), t5)
    with pytest.raises(CheckpointError, match="T5-XXL") as e:
        load_text_encoders(root16, clip_l=t5)
    assert str(t5) in str(e.value) and "t5_path=" in str(e.value)
    # A missing tensor: strict loading lists it.
    sd = _sd(root16 / "text_encoder_2")
    del sd["text_model.encoder.layers.1.mlp.fc2.bias"]
    save_safetensors(sd, tmp_path / "g" / "clip_g.safetensors")
    with pytest.raises(CheckpointError, match=r"1 missing: text_model\.encoder\.layers\.1\.mlp\.fc2\.bias"):
        load_text_encoders(root16, clip_g=tmp_path / "g" / "clip_g.safetensors", preset=PRESET)
    # Wrong tokenizer files: not JSON, not a SentencePiece model, a vocabulary of another model.
    bad = tmp_path / "badtok"
    shutil.copytree(root16, bad, ignore=shutil.ignore_patterns("*.safetensors*", "text_encoder*"))
    for sub in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        (bad / sub).symlink_to(root16 / sub)
    (bad / "tokenizer" / "vocab.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a CLIP vocab.json") as e:
        load_text_encoders(bad)
    assert str(bad / "tokenizer" / "vocab.json") in str(e.value)
    shutil.copyfile(root16 / "tokenizer" / "vocab.json", bad / "tokenizer" / "vocab.json")
    (bad / "tokenizer_3" / "spiece.model").write_bytes(b"\x0a\x05hello garbage")
    with pytest.raises(CheckpointError, match="not a SentencePiece model") as e:
        load_text_encoders(bad)
    assert str(bad / "tokenizer_3" / "spiece.model") in str(e.value)
    shutil.copyfile(root16 / "tokenizer_3" / "spiece.model", bad / "tokenizer_3" / "spiece.model")
    if OPENAI_BPE.is_file():
        merges = gzip.open(OPENAI_BPE).read().decode("utf-8").split("\n")[1:48895]
        write_clip_files(bad / "tokenizer_2", merges)
        with pytest.raises(CheckpointError, match="49408 tokens .* 1000 embedding rows"):
            load_text_encoders(bad)
    # Stability files without tokenizer folders: say where to put them.
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copyfile(clip_l, lone / "clip_l.safetensors")
    save_safetensors(_sd(root16 / "text_encoder_2"), lone / "clip_g.safetensors")
    with pytest.raises(CheckpointError, match="tokenizer/.*never downloads"):
        load_text_encoders(lone, t5=False, preset=PRESET)


def test_transformers_loads_the_written_folders(root):
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    ids = quiet(load_text_encoders(root).tokenize, ["a red cube on a table", "wow!"])
    for dtype in (torch.float32, torch.bfloat16):
        enc = quiet(load_text_encoders, root, dtype=dtype)
        with torch.no_grad():
            hf = T5EncoderModel.from_pretrained(root / "text_encoder_3", dtype=dtype).eval()
            got, want = enc.model("t5")(ids["t5"]), hf(ids["t5"]).last_hidden_state
            assert rel(got, want) <= 1e-5 and (dtype == torch.float32 or torch.equal(got, want))  # bf16: bit-exact
            for role, folder in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")):
                hf = CLIPTextModelWithProjection.from_pretrained(root / folder, dtype=dtype).eval()
                out = hf(ids[role], output_hidden_states=True)
                hidden, pooled = enc.model(role)(ids[role])
                assert rel(hidden, out.hidden_states[-2]) <= 1e-5 and rel(pooled, out.text_embeds) <= 1e-5
                assert dtype == torch.float32 or (torch.equal(hidden, out.hidden_states[-2])
                                                  and torch.equal(pooled, out.text_embeds))
                assert hidden.float().std() > 0.1 and pooled.float().std() > 0.1  # not degenerate
    assert torch.equal(open_file(root / "text_encoder" / "model.safetensors").get("text_projection.weight"),
                       torch.eye(CLIP_L.width))


def _header_only_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A valid fp16 safetensors file whose data part is a hole (sparse): real shapes at no disk cost."""
    header, offset = {}, 0
    for k, shape in shapes.items():
        n = 2 * int(torch.tensor(shape).prod()) if shape else 2
        header[k] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)


def test_real_sd3_text_encoder_layouts_are_recognised(tmp_path):
    """transformers' own CLIP-L / CLIP-G / T5-XXL at the real sizes (built on the meta device), written as
    header-only Stability files: detected as the SD3 configs, strict key/shape check passes, parameter counts match
    the spec (CLIP-L 123,650,304 with its projection; CLIP-G 694,659,840; T5-XXL 4,762,310,656 with the embedding
    counted once)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5EncoderModel
    from transformers import T5Config as HFT5Config

    probe = tmp_path / "probe"
    with open(probe, "wb") as f:
        f.truncate(2**30)
    if probe.stat().st_blocks * 512 > 2**20:
        pytest.skip("this file system does not support sparse files")
    real = PRESETS["sd3.5-large"]
    with torch.device("meta"):
        models = {
            "clip_l": CLIPTextModelWithProjection(CLIPTextConfig(
                vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                hidden_act="quick_gelu", projection_dim=768)),
            "clip_g": CLIPTextModelWithProjection(CLIPTextConfig(
                vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                num_attention_heads=20, hidden_act="gelu", projection_dim=1280)),
            "t5": T5EncoderModel(HFT5Config(vocab_size=32128, d_model=4096, d_kv=64, num_heads=64, d_ff=10240,
                                            num_layers=24, feed_forward_proj="gated-gelu")),
        }
    counts = {}
    for role, m in models.items():
        shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
        if role == "t5":
            assert "encoder.embed_tokens.weight" in shapes  # stored twice, as in t5xxl_fp16.safetensors
        _header_only_safetensors(tmp_path / f"{role}.safetensors", shapes)
        enc = open_encoder(role, tmp_path / f"{role}.safetensors")
        assert enc.config == getattr(real, role)
        counts[role] = sum(math.prod(s.shape) for s in enc.check().values())
    # CLIP-L single files are read without their projection (identity in SD3): 768*768 fewer.
    assert counts == {"clip_l": 123_650_304 - 768 * 768, "clip_g": 694_659_840, "t5": 4_762_310_656}
    with pytest.raises(CheckpointError, match="CLIP-G, not CLIP-L; pass it as clip_g="):
        open_encoder("clip_l", tmp_path / "clip_g.safetensors")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
