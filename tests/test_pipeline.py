"""End-to-end parity with diffusers' StableDiffusion3Pipeline (and its img2img pipeline) on the same small random
components: the tiny model written as a diffusers root, loaded by both libraries from the same files (tokenizers
built from the project's own vocabulary files). Same prompt and seeds -> same final latents (relative RMS <= 1e-4,
fp32) and decoded uint8 images within 1 level in 99.9% of pixels; with CFG, skip-layer guidance, without T5, and
for image-to-image."""

import numpy as np
import pytest
import torch

from minisd35.pipeline import load_pipeline
from minisd35.sampling import SkipLayerGuidance
from minisd35.tiny import write_tiny

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

PROMPTS = ["a small red circle on the left, blue background", "a big green star"]


def rel_rms(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def close_images(ours, theirs) -> float:
    a = np.stack([np.asarray(im, dtype=np.int16) for im in ours])
    b = np.stack([np.asarray(im, dtype=np.int16) for im in theirs])
    assert a.shape == b.shape
    return float((np.abs(a - b) <= 1).mean())


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("tiny"), seed=7, layout="diffusers")


@pytest.fixture(scope="module")
def ref_pipe(root):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(root, torch_dtype=torch.float32)


@pytest.fixture(scope="module")
def ours(root):
    return load_pipeline(root, dtype=torch.float32, device="cpu")


def run_ours(pipe, **kw):
    *_, last = pipe.steps(**kw)
    return last.latents


def test_txt2img_cfg_batch(ours, ref_pipe):
    kw = dict(height=64, width=96, steps=4, guidance=4.5)
    lat = run_ours(ours, prompt=PROMPTS, negative_prompt="blurry", seed=11, batch_size=2, **kw)
    gens = [torch.Generator("cpu").manual_seed(s) for s in (11, 12, 11, 12)]
    ref = ref_pipe(prompt=PROMPTS, negative_prompt="blurry", num_images_per_prompt=2, generator=gens,
                   height=64, width=96, num_inference_steps=4, guidance_scale=4.5, max_sequence_length=32,
                   output_type="latent").images
    assert lat.shape == ref.shape == (4, 16, 8, 12)
    assert rel_rms(lat, ref) <= 1e-4
    images = ours.decode(lat)
    ref_images = ref_pipe(prompt=PROMPTS, negative_prompt="blurry", num_images_per_prompt=2,
                          generator=[torch.Generator("cpu").manual_seed(s) for s in (11, 12, 11, 12)], height=64,
                          width=96, num_inference_steps=4, guidance_scale=4.5, max_sequence_length=32).images
    assert close_images(images, ref_images) >= 0.999


def test_skip_layer_guidance(ours, ref_pipe):
    slg = SkipLayerGuidance(layers=(1,), scale=2.8, start=0.01, stop=0.5)
    lat = run_ours(ours, prompt=PROMPTS[0], seed=5, height=64, width=64, steps=6, guidance=4.0, slg=slg)
    ref = ref_pipe(prompt=PROMPTS[0], generator=[torch.Generator("cpu").manual_seed(5)], height=64, width=64,
                   num_inference_steps=6, guidance_scale=4.0, max_sequence_length=32, skip_guidance_layers=[1],
                   skip_layer_guidance_scale=2.8, skip_layer_guidance_start=0.01, skip_layer_guidance_stop=0.5,
                   output_type="latent").images
    assert rel_rms(lat, ref) <= 1e-4
    plain = run_ours(ours, prompt=PROMPTS[0], seed=5, height=64, width=64, steps=6, guidance=4.0, slg=False)
    assert rel_rms(plain, ref) > 1e-3  # SLG really did something


def test_without_t5(root):
    from diffusers import StableDiffusion3Pipeline

    ref_pipe = StableDiffusion3Pipeline.from_pretrained(root, text_encoder_3=None, tokenizer_3=None,
                                                        torch_dtype=torch.float32)
    with pytest.warns(UserWarning, match="T5 is not used"):
        pipe = load_pipeline(root, dtype=torch.float32, device="cpu", t5=False)
        lat = run_ours(pipe, prompt=PROMPTS[1], seed=2, height=64, width=64, steps=3, guidance=3.0)
    ref = ref_pipe(prompt=PROMPTS[1], generator=[torch.Generator("cpu").manual_seed(2)], height=64, width=64,
                   num_inference_steps=3, guidance_scale=3.0, max_sequence_length=32, output_type="latent").images
    assert rel_rms(lat, ref) <= 1e-4


def test_img2img(root, ours):
    from diffusers import StableDiffusion3Img2ImgPipeline
    from PIL import Image

    ref_pipe = StableDiffusion3Img2ImgPipeline.from_pretrained(root, torch_dtype=torch.float32)
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8))
    lat = run_ours(ours, prompt=PROMPTS[0], image=init, strength=0.6, seed=9, steps=5, guidance=4.0)
    ref = ref_pipe(prompt=PROMPTS[0], image=init, strength=0.6, generator=[torch.Generator("cpu").manual_seed(9)],
                   height=64, width=80, num_inference_steps=5, guidance_scale=4.0, max_sequence_length=32,
                   output_type="latent").images
    assert lat.shape == ref.shape == (1, 16, 8, 10)
    assert rel_rms(lat, ref) <= 1e-4


def test_batch_equals_single_runs(ours):
    """batch_size=n with seed s gives the images of n single runs with seeds s, s+1, ..."""
    kw = dict(height=64, width=64, steps=3, guidance=4.0)
    batch = run_ours(ours, prompt=PROMPTS[0], seed=20, batch_size=3, **kw)
    for k in range(3):
        single = run_ours(ours, prompt=PROMPTS[0], seed=20 + k, **kw)
        assert torch.allclose(batch[k : k + 1], single, rtol=0, atol=1e-5)


def test_stability_layout_same_result(tmp_path, ours):
    """The same tiny weights as a Stability single file + separate text-encoder files give the same latents."""
    single = write_tiny(tmp_path, seed=7, layout="stability")
    pipe = load_pipeline(single, dtype=torch.float32, device="cpu", preset="tiny")
    kw = dict(prompt=PROMPTS[0], seed=1, height=64, width=64, steps=2, guidance=4.0)
    assert torch.equal(run_ours(pipe, **kw), run_ours(ours, **kw))


def test_parked_module_round_trip():
    """Parked (the low-VRAM / text-encoder offload mechanism): on() gives every parameter and buffer a copy on the
    device, off() points them back at the CPU copies without copying anything back, and the outputs after a round
    trip are bit-identical. The meta device stands in for the GPU here (no data, but every tensor must move)."""
    from minisd35.config import get_preset
    from minisd35.mmdit import MMDiT
    from minisd35.streaming import Parked
    from minisd35.weights import random_mmdit_state

    cfg = get_preset("tiny").mmdit
    with torch.device("meta"):
        model = MMDiT(cfg)
    model.load_state_dict(random_mmdit_state(cfg, seed=0), assign=True)
    model.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_channels, 16, 16, generator=g)
    ctx = torch.randn(1, 7, cfg.context_dim, generator=g)
    pooled = torch.randn(1, cfg.pooled_dim, generator=g)
    t = torch.tensor([500.0])
    before = model(x, t, ctx, pooled)
    n_tensors = len(list(model.parameters())) + len([b for b in model.buffers() if b is not None])

    parked = Parked(model, torch.device("meta"))
    assert len(parked.slots) == n_tensors and not parked.pinned
    hosts = [h for _, _, h in parked.slots]
    parked.on()
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(b.device.type == "meta" for b in model.buffers())
    parked.off()
    # back on the very CPU tensors Parked holds (no copy), and the model computes exactly as before
    assert all(store[name] is h or store[name].data.data_ptr() == h.data_ptr() for store, name, h in parked.slots)
    assert [h.data_ptr() for _, _, h in parked.slots] == [h.data_ptr() for h in hosts]
    assert torch.equal(model(x, t, ctx, pooled), before)


def test_streamed_pipeline_same_latents(root, ours):
    """load_pipeline(streamed=True): the whole pipeline with the MMDiT's blocks streamed gives the latents of the
    resident fused forward exactly, and stays within fp32 rounding of the plain reference model."""
    kw = dict(prompt="a red cube", seed=3, steps=3, guidance=4.0, height=64, width=48)
    streamed = load_pipeline(root, dtype=torch.float32, device="cpu", streamed=True)
    assert streamed.streamed and streamed.low_vram and streamed.denoiser.streamer is not None
    resident = load_pipeline(root, dtype=torch.float32, device="cpu", fast=True, low_vram=True)
    got, want = run_ours(streamed, **kw), run_ours(resident, **kw)
    assert torch.equal(got, want)
    assert rel_rms(got, run_ours(ours, **kw)) < 1e-5


def test_parked_text_encoders(root):
    """TextEncoders.park (the pipeline's text-encoder offload on CUDA): the weights stay loaded in one CPU copy that
    to(device) uploads and to("cpu") points back at, and the prompts encode exactly as before. The CPU stands in for
    the GPU here."""
    from minisd35.text import load_text_encoders

    te = load_text_encoders(root, dtype=torch.float32)
    want = te.encode(["a red cube", ""])
    te.park("cpu")
    assert te.parked
    hosts = {h.data_ptr() for p in te._parked.values() for _, _, h in p.slots}
    te.to("cpu")
    assert all(t.data_ptr() in hosts for m in te._models.values() for t in (*m.parameters(), *m.buffers()))
    got = te.encode(["a red cube", ""])
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    te.release()
    assert not te.parked


def test_speed_options_reach_the_fused_forward(root, ours):
    """load_pipeline(attention="fp8", fast_accum=True): the options land on the fused forward (on the CPU too, where
    FP8 attention runs its emulation), the settings record them, and FP8 attention moves the final latents by about
    what E4M3 q, k, P, v cost: more than fp32 rounding, a few percent at most. Asking for them without the fused
    forward, or for an unknown backend, is an error."""
    from minisd35.errors import InputError

    kw = dict(prompt="a red cube", seed=3, steps=3, guidance=4.0, height=64, width=48)
    pipe = load_pipeline(root, dtype=torch.float32, device="cpu", attention="fp8", fast_accum=True)
    den = pipe.denoiser
    assert (den.attention_backend, den.fast_accum) == ("fp8", True)
    settings = pipe.describe(**kw)
    assert settings["attention"] == "fp8" and settings["accumulation"] == "fast"
    assert "attention" not in ours.describe(**kw)
    err = rel_rms(run_ours(pipe, **kw), run_ours(ours, **kw))
    assert 1e-3 < err < 5e-2
    with pytest.raises(InputError, match="fast=True"):
        load_pipeline(root, dtype=torch.float32, device="cpu", attention="fp8", fast=False)
    with pytest.raises(InputError, match="expected one of"):
        load_pipeline(root, dtype=torch.float32, device="cpu", attention="fp4")
