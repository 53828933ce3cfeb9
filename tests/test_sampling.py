"""Sampling against diffusers' FlowMatchEulerDiscreteScheduler and SD3 pipelines (bit for bit), and the DPM++ 2M option
against an exactly solvable flow."""

import math

import pytest
import torch

from minisd35.config import VAEConfig
from minisd35.errors import InputError
from minisd35.sampling import (
    SkipLayerGuidance,
    denoise,
    dpmpp_2m_step,
    euler_step,
    generators,
    img2img_sigmas,
    img2img_start,
    noise,
    sample,
    scale_noise,
    sigmas,
)
from minisd35.vae import load_vae, write_random_vae

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Img2ImgPipeline,
)
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

torch.set_grad_enabled(False)


def scheduler(steps: int, shift: float = 3.0) -> FlowMatchEulerDiscreteScheduler:
    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)  # SD3's scheduler_config.json
    s.set_timesteps(steps, device="cpu")
    return s


@pytest.mark.parametrize("shift", [3.0, 1.0])
@pytest.mark.parametrize("steps", [1, 4, 28, 40, 50])
def test_sigmas_equal_diffusers(steps, shift):
    s = scheduler(steps, shift)
    ours = sigmas(steps, shift)
    assert ours.dtype == torch.float32 and len(ours) == steps + 1 and ours[-1] == 0
    assert torch.equal(ours, s.sigmas)
    assert torch.equal(ours[:-1] * 1000, s.timesteps)  # the model's t


def test_sigma_reference_values():
    assert sigmas(4).tolist() == pytest.approx([1.0, 0.857692, 0.602151, 0.008929, 0.0], abs=1e-6)
    assert sigmas(28)[-2].item() == pytest.approx(3 * (0.003 / 1.002) / (1 + 2 * (0.003 / 1.002)), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_euler_step_is_diffusers_step_bit_for_bit(dtype):
    s = scheduler(28)
    ours = sigmas(28)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 9, 7, generator=g).to(dtype)
    for i, t in enumerate(s.timesteps):
        v = (torch.randn(2, 16, 9, 7, generator=g) * 1.7).to(dtype)
        want = s.step(v, t, x, return_dict=False)[0]
        assert want.dtype == dtype
        assert torch.equal(euler_step(x, v, ours[i], ours[i + 1]), want)
        assert torch.equal(euler_step(x, v, float(ours[i]), float(ours[i + 1])), want)  # floats work the same
        x = want


# ---------------------------------------------------------------------------------------------------------------------
# The loop against a hand-written diffusers loop with a real (tiny, random) SD3Transformer2DModel.

@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    t = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=8,
                              num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                              pooled_projection_dim=24, out_channels=16, pos_embed_max_size=16,
                              dual_attention_layers=(0,), qk_norm="rms_norm")
    return t.to(torch.bfloat16).eval()


def as_model(t):
    """The MMDiT forward contract: model(x, t, context, pooled, skip_layers=()) -> velocity."""
    return lambda x, ts, c, p, skip_layers=(): t(hidden_states=x, timestep=ts, encoder_hidden_states=c,
                                                  pooled_projections=p, skip_layers=list(skip_layers) or None,
                                                  return_dict=False)[0]


def diffusers_loop(tr, latents, ctx, pooled, nctx, npooled, steps, guidance, slg, begin=0):
    """StableDiffusion3Pipeline.__call__'s denoising loop (img2img's when begin > 0), transcribed."""
    s = scheduler(steps)
    timesteps = s.timesteps[begin:]
    if begin:
        s.set_begin_index(begin)
    n, cfg = len(timesteps), guidance > 1
    embeds, pooled_embeds = (torch.cat([nctx, ctx]), torch.cat([npooled, pooled])) if cfg else (ctx, pooled)
    out = []
    for i, t in enumerate(timesteps):
        x_in = torch.cat([latents] * 2) if cfg else latents
        v = tr(hidden_states=x_in, timestep=t.expand(x_in.shape[0]), encoder_hidden_states=embeds,
               pooled_projections=pooled_embeds, return_dict=False)[0]
        if cfg:
            v_u, v_c = v.chunk(2)
            v = v_u + guidance * (v_c - v_u)
            if slg is not None and i > n * slg.start and i < n * slg.stop:
                v_s = tr(hidden_states=latents, timestep=t.expand(latents.shape[0]), encoder_hidden_states=ctx,
                         pooled_projections=pooled, return_dict=False, skip_layers=list(slg.layers))[0]
                v = v + (v_c - v_s) * slg.scale
        latents = s.step(v, t, latents, return_dict=False)[0]
        out.append(latents)
    return out


def conditioning(seed: int, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16)  # noqa: E731
    return mk(batch, 16, 8, 10), mk(batch, 7, 32), mk(batch, 24), mk(batch, 7, 32), mk(batch, 24)


@pytest.mark.parametrize("steps,guidance,slg", [
    (8, 4.5, SkipLayerGuidance(layers=(1,), scale=2.8, start=0.01, stop=0.6)),  # SLG on steps 1..4
    (5, 7.0, None),
    (4, 1.0, None),  # CFG off: cond batch only
])
def test_denoise_equals_diffusers_loop(transformer, steps, guidance, slg):
    x, ctx, pooled, nctx, npooled = conditioning(1)
    want = diffusers_loop(transformer, x, ctx, pooled, nctx, npooled, steps, guidance, slg)
    got = list(denoise(as_model(transformer), x, ctx, pooled, nctx, npooled, sigmas=sigmas(steps),
                       guidance=guidance, slg=slg))
    assert [s.i for s in got] == list(range(steps)) and got[-1].sigma_next == 0.0
    for s, w in zip(got, want, strict=True):
        assert s.latents.dtype == torch.bfloat16 and torch.equal(s.latents, w)
    if slg is not None:  # and SLG really changed the result
        plain = sample(as_model(transformer), x, ctx, pooled, nctx, npooled, sigmas=sigmas(steps), guidance=guidance)
        assert not torch.equal(plain, got[-1].latents)


@pytest.mark.parametrize("steps", [4, 28, 40])
@pytest.mark.parametrize("strength", [0.05, 0.1, 0.3, 0.5, 0.6, 0.75, 0.95, 0.99, 1.0])
def test_img2img_start_equals_diffusers_get_timesteps(steps, strength):
    s = scheduler(steps)
    pipe = StableDiffusion3Img2ImgPipeline(transformer=None, scheduler=s, vae=None, text_encoder=None, tokenizer=None,
                                           text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                           tokenizer_3=None)
    timesteps, n = pipe.get_timesteps(steps, strength, "cpu")
    if n == 0:  # diffusers would fail later; we say why up front
        with pytest.raises(InputError, match="no step"):
            img2img_start(steps, strength)
        return
    sub = img2img_sigmas(sigmas(steps), strength)
    assert len(sub) - 1 == n == len(timesteps) and steps - img2img_start(steps, strength) == n
    assert torch.equal(sub[:-1] * 1000, timesteps) and torch.equal(sub, s.sigmas[s.begin_index:])


def test_img2img_loop_and_noising_equal_diffusers(transformer):
    x, ctx, pooled, nctx, npooled = conditioning(2)
    steps, strength = 10, 0.6
    s = scheduler(steps)
    begin = img2img_start(steps, strength)
    s.set_begin_index(begin)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    want_x = s.scale_noise(x, s.timesteps[begin : begin + 1].repeat(2), eps)
    sub = img2img_sigmas(sigmas(steps), strength)
    got_x = scale_noise(x, eps, sub[0])
    assert torch.equal(got_x, want_x)
    want = diffusers_loop(transformer, want_x, ctx, pooled, nctx, npooled, steps, 5.0, None, begin=begin)
    got = sample(as_model(transformer), got_x, ctx, pooled, nctx, npooled, sigmas=sub, guidance=5.0)
    assert torch.equal(got, want[-1])


def test_img2img_latents_equal_diffusers_prepare_latents(tmp_path):
    """VAE encode (posterior sample) then noise, drawn from one generator in diffusers' order, then scale_noise."""
    cfg = VAEConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_groups=8)
    write_random_vae(tmp_path / "vae", cfg, seed=0)
    ref_vae = AutoencoderKL.from_pretrained(tmp_path / "vae", torch_dtype=torch.float32).eval()
    s = scheduler(12)
    pipe = StableDiffusion3Img2ImgPipeline(transformer=None, scheduler=s, vae=ref_vae, text_encoder=None,
                                           tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                           text_encoder_3=None, tokenizer_3=None)
    image = torch.rand(1, 3, 48, 40, generator=torch.Generator().manual_seed(4)) * 2 - 1
    timesteps, _ = pipe.get_timesteps(12, 0.7, "cpu")
    want = pipe.prepare_latents(image, timesteps[:1], 1, 1, torch.float32, "cpu", torch.Generator().manual_seed(9))

    vae = load_vae(tmp_path, dtype=torch.float32)
    g = torch.Generator().manual_seed(9)
    lat = vae.encode(image, generator=g)  # draws the posterior eps first ...
    eps = noise(lat.shape, g, dtype=torch.float32)  # ... then the noise, from the same generator
    got = scale_noise(lat, eps, img2img_sigmas(sigmas(12), 0.7)[0])
    assert ((got - want).norm() / want.norm()).item() < 1e-5


# ---------------------------------------------------------------------------------------------------------------------
# Noise.

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_noise_follows_randn_tensor(dtype):
    shape = (3, 16, 5, 7)
    one = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    assert torch.equal(noise(shape, one(), dtype=dtype), randn_tensor(shape, generator=one(), dtype=dtype))
    many = lambda: [torch.Generator().manual_seed(s) for s in (5, 6, 7)]  # noqa: E731
    assert torch.equal(noise(shape, many(), dtype=dtype), randn_tensor(shape, generator=many(), dtype=dtype))
    assert torch.equal(noise((1,) + shape[1:], [one()], dtype=dtype),
                       randn_tensor((1,) + shape[1:], generator=[one()], dtype=dtype))


def test_seeded_batch_equals_single_runs():
    shape = (4, 16, 6, 6)
    batch = noise(shape, 100)
    singles = torch.cat([noise((1,) + shape[1:], 100 + k) for k in range(4)])
    assert torch.equal(batch, singles)
    assert torch.equal(batch, noise(shape, generators(100, 4)))
    assert torch.equal(batch, randn_tensor(shape, generator=generators(100, 4), dtype=torch.bfloat16))
    with pytest.raises(InputError, match="one per image"):
        noise(shape, generators(0, 3))


# ---------------------------------------------------------------------------------------------------------------------
# DPM++ 2M on flows with a known answer.

def gaussian_flow(mu: torch.Tensor, s: torch.Tensor):
    """Data x0 ~ N(mu, s^2) per element, noise N(0, 1), x = (1 - sigma) x0 + sigma eps. The exact velocity field is
    v(x, sigma) = E[eps - x0 | x] = (sigma - (1 - sigma) s^2) / V (x - m) - mu with m = (1 - sigma) mu,
    V = (1 - sigma)^2 s^2 + sigma^2, and the ODE carries noise z at sigma = 1 to x0 = mu + s z exactly."""
    def model(x, t, context, pooled, skip_layers=()):
        sig = (t.double() / 1000).view(-1, 1, 1, 1)
        m, V = (1 - sig) * mu, (1 - sig) ** 2 * s**2 + sig**2
        return ((sig - (1 - sig) * s**2) / V * (x.double() - m) - mu).to(x.dtype)
    return model


def reference_dpmpp_2m(model, x, sig):
    """The Stability reference's / k-diffusion's sample_dpmpp_2m, written out in float64 on x0_hat = x - sigma v."""
    t_fn, sigma_fn = (lambda s: -math.log(s)), (lambda t: math.exp(-t))
    old = None
    for i in range(len(sig) - 1):
        s, sn = float(sig[i]), float(sig[i + 1])
        den = x - s * model(x, torch.full((x.shape[0],), s * 1000), None, None)
        if old is None or sn == 0:
            d = den
        else:
            h, h_last = t_fn(sn) - t_fn(s), t_fn(s) - t_fn(float(sig[i - 1]))
            r = h_last / h
            d = (1 + 1 / (2 * r)) * den - (1 / (2 * r)) * old
        x = den if sn == 0 else sigma_fn(t_fn(sn)) / sigma_fn(t_fn(s)) * x - math.expm1(-(t_fn(sn) - t_fn(s))) * d
        old = den
    return x


def test_dpmpp_2m_converges_to_the_exact_answer_at_second_order():
    g = torch.Generator().manual_seed(0)
    shape = (2, 16, 6, 8)
    mu = torch.randn(shape, generator=g, dtype=torch.float64)
    s = 0.2 + 1.5 * torch.rand(shape, generator=g, dtype=torch.float64)
    model, z = gaussian_flow(mu, s), torch.randn(shape, generator=g)
    x0 = mu + s * z.double()
    ctx, pooled = torch.zeros(2, 3, 4), torch.zeros(2, 4)
    err = {}
    for sampler in ("euler", "dpmpp_2m"):
        for n in (25, 50, 100, 200):
            y = sample(model, z, ctx, pooled, sigmas=sigmas(n), guidance=1.0, sampler=sampler)
            err[sampler, n] = ((y.double() - x0).norm() / x0.norm()).item()
    for sampler in ("euler", "dpmpp_2m"):  # both reach the known x0
        assert err[sampler, 200] < err[sampler, 100] < err[sampler, 50] < err[sampler, 25]
    assert err["dpmpp_2m", 200] < 2e-3 and err["euler", 200] < 1e-2
    # order: Euler's error halves per doubling of steps, DPM++ 2M's falls ~4x
    assert 1.7 < err["euler", 100] / err["euler", 200] < 2.3
    assert err["dpmpp_2m", 100] / err["dpmpp_2m", 200] > 3.0
    assert err["dpmpp_2m", 50] < err["euler", 50] and err["dpmpp_2m", 200] < err["euler", 200] / 5
    # it is the reference's algorithm: same trajectory as a float64 transcription of sample_dpmpp_2m
    ref = reference_dpmpp_2m(model, z.double(), sigmas(12))
    ours = sample(model, z.double(), ctx, pooled, sigmas=sigmas(12), guidance=1.0, sampler="dpmpp_2m")
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-12
    # and deterministic
    again = sample(model, z.double(), ctx, pooled, sigmas=sigmas(12), guidance=1.0, sampler="dpmpp_2m")
    assert torch.equal(ours, again)


def test_point_mass_is_reached_exactly_by_both_samplers():
    """A single data point: every trajectory is a straight line, x0_hat is exact at every step, so Euler and
    DPM++ 2M both land on it for any number of steps (the 2M extrapolation of a constant is the constant), to
    float32 precision (the update is computed in fp32, and t = 1000 sigma is a float32 input)."""
    mu = torch.randn(1, 16, 4, 6, dtype=torch.float64)
    model = gaussian_flow(mu, torch.zeros_like(mu))
    z = torch.randn(1, 16, 4, 6)
    for sampler in ("euler", "dpmpp_2m"):
        for n in (1, 3, 28):
            y = sample(model, z, torch.zeros(1, 2, 4), torch.zeros(1, 4), sigmas=sigmas(n), guidance=0.0,
                       sampler=sampler)
            assert ((y.double() - mu).norm() / mu.norm()).item() < 1e-6


def test_dpmpp_first_order_step_is_euler():
    x, v = torch.randn(2, 16, 3, 5, dtype=torch.float64), torch.randn(2, 16, 3, 5, dtype=torch.float64)
    got, x0 = dpmpp_2m_step(x, v, None, 0.7, 0.4, None)
    assert torch.allclose(got, x + (0.4 - 0.7) * v, rtol=1e-12, atol=1e-12) and torch.equal(x0, x - 0.7 * v)
    last, _ = dpmpp_2m_step(x, v, 0.9, 0.7, 0.0, x0)
    assert torch.equal(last, x - 0.7 * v)


def test_input_errors():
    x, ctx, pooled = torch.zeros(1, 16, 4, 4), torch.zeros(1, 3, 8), torch.zeros(1, 8)
    model = lambda x, t, c, p, skip_layers=(): x  # noqa: E731
    with pytest.raises(InputError, match="unknown sampler"):
        next(denoise(model, x, ctx, pooled, sigmas=sigmas(2), guidance=1.0, sampler="heun"))
    with pytest.raises(InputError, match="neg_context"):
        next(denoise(model, x, ctx, pooled, sigmas=sigmas(2), guidance=4.0))
    with pytest.raises(InputError, match="batch"):
        next(denoise(model, x, torch.zeros(2, 3, 8), pooled, sigmas=sigmas(2), guidance=1.0))
    with pytest.raises(InputError, match="strength"):
        img2img_start(28, 0.0)
    with pytest.raises(InputError, match="steps"):
        sigmas(0)
