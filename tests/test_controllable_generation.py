"""Inpainting and colorization (score_sde's controllable_generation) with exact scores of known data."""

import math

import pytest
import torch
from conftest import SDE_NAMES, make_sde, use_exact_score

import controllable_generation as cg
import sampling

SDES = {name: (lambda name=name: make_sde(name, sigma_max=20.0)) for name in SDE_NAMES}
S0 = 0.05  # std of each mixture component of the data


def mixture_score_fn(sde, centres: torch.Tensor, s0: float = S0):
    """Exact score of p_t for data = equal mixture of N(c_i, s0^2 I) (centres [K, C, H, W]), in float64."""
    flat = centres.reshape(centres.shape[0], -1).to(torch.float64)

    def score_fn(x, t):
        t64 = t.to(torch.float64)
        a = sde.alpha(t64)[:, None]
        v = a**2 * s0**2 + sde.marginal_std(t64)[:, None] ** 2  # [B, 1]
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        d2 = ((xf[:, None, :] - a[:, None] * flat[None]) ** 2).sum(-1)  # [B, K]
        w = torch.softmax(-d2 / (2 * v), dim=1)
        mean = a * (w @ flat)
        return (-(xf - mean) / v).reshape(x.shape).to(x.dtype)

    return score_fn


def fraction_near(samples: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of samples within 6 S0 of target in every entry (S0 = the data's per-pixel std)."""
    return float(((samples - target).flatten(1).abs().max(1).values < 6 * S0).float().mean())


def build(getter, sde, eps: float, predictor: str, corrector: str):
    """An inpainter / colorizer with the identity inverse scaler, snr 0.16, continuous-time labels."""
    return getter(
        sde,
        sampling.get_predictor(predictor),
        sampling.get_corrector(corrector),
        lambda x: x,
        snr=0.16,
        eps=eps,
        continuous=True,
    )


def use_score(monkeypatch, score_fn):
    use_exact_score(monkeypatch, score_fn)


def two_images(channels: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(2, channels, 4, 4, generator=gen) * 2 - 1


@pytest.mark.parametrize("name", sorted(SDES))
def test_inpainting_completes_the_image_the_known_half_belongs_to(name, monkeypatch):
    """Data: two images. Knowing the left half of one, the sampler returns its right half: the exact
    conditional puts all but ~1e-30 of its mass there; PC with replacement, an approximation, does so for at
    least 85 % of the samples (measured 92-100 % over three seeds, N = 1000). The known half comes back
    as the marginal mean alpha(eps) y."""
    sde, eps = SDES[name]()
    centres = two_images(1)
    use_score(monkeypatch, mixture_score_fn(sde, centres))
    inpainter = build(cg.get_pc_inpainter, sde, eps, "reverse_diffusion", "langevin")
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2] = 1.0
    torch.manual_seed(1)
    for k in range(2):
        data = centres[k : k + 1].repeat(64, 1, 1, 1)
        out = inpainter(None, data, mask)
        a = float(sde.alpha(torch.tensor([eps], dtype=torch.float64)))
        torch.testing.assert_close(out[..., :2], a * data[..., :2])
        assert (centres[1 - k, ..., 2:] - centres[k, ..., 2:]).abs().max() > 0.5  # the two completions differ
        assert fraction_near(out[..., 2:], data[:1, ..., 2:]) >= 0.85


def test_inpainting_of_independent_pixels_samples_their_marginal(monkeypatch):
    """Gaussian data N(c, 0.5^2 I): unknown pixels are independent of the known ones, so they follow the
    marginal p_eps = N(alpha c, alpha^2 0.5^2 + sigma^2) (4.5 standard errors; 10 % allowance on the variance
    for the N = 1000 discretisation, as in the PC sampler tests)."""
    sde, eps = SDES["vp"]()
    centre, s0 = two_images(1)[:1], 0.5
    use_score(monkeypatch, mixture_score_fn(sde, centre, s0))
    inpainter = build(cg.get_pc_inpainter, sde, eps, "euler_maruyama", "none")
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :1] = 1.0
    torch.manual_seed(2)
    n = 3000
    out = inpainter(None, torch.zeros(n, 1, 4, 4), mask).to(torch.float64)
    tt = torch.tensor([eps], dtype=torch.float64)
    a, sd = float(sde.alpha(tt)), float(sde.marginal_std(tt))
    unknown = out[..., 1:].reshape(n, -1)
    mean, var = a * centre[..., 1:].reshape(-1).to(torch.float64), a**2 * s0**2 + sd**2
    assert ((unknown.mean(0) - mean).abs() <= 4.5 * math.sqrt(var / n)).all()
    assert ((unknown.var(0) - var).abs() <= 4.5 * var * math.sqrt(2 / (n - 1)) + 0.1 * var).all()
    assert (out[..., :1] == 0).all()


def test_colorization_basis_is_orthonormal_with_a_grey_channel():
    m = cg.colorization_basis(torch.float64)
    torch.testing.assert_close(m.T @ m, torch.eye(3, dtype=torch.float64))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(cg.decouple(x)[:, 0], x.sum(1) / math.sqrt(3))
    torch.testing.assert_close(cg.couple(cg.decouple(x)), x)


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_colorization_recovers_the_colours_of_the_grey_image(name, monkeypatch):
    """Data: two colour images with different grey levels. Given the grey level of one, the colorizer returns
    that image's colours (at least 85 % of the samples), and the output's grey level is alpha(eps) times the
    input's."""
    sde, eps = SDES[name]()
    centres = two_images(3, seed=3)
    use_score(monkeypatch, mixture_score_fn(sde, centres))
    colorizer = build(cg.get_pc_colorizer, sde, eps, "reverse_diffusion", "langevin")
    torch.manual_seed(4)
    a = float(sde.alpha(torch.tensor([eps], dtype=torch.float64)))
    for k in range(2):
        grey = centres[k : k + 1].mean(1, keepdim=True).repeat(32, 3, 1, 1)
        out = colorizer(None, grey)
        torch.testing.assert_close(out.mean(1), a * grey[:, 0], atol=1e-5, rtol=1e-5)
        assert fraction_near(out, centres[k : k + 1]) >= 0.85


def test_colorizer_rejects_one_channel_input():
    sde, eps = SDES["vp"]()
    colorizer = cg.get_pc_colorizer(sde, None, None, lambda x: x, snr=0.16, eps=eps)
    with pytest.raises(ValueError, match="B, 3, H, W"):
        colorizer(None, torch.zeros(2, 1, 4, 4))
