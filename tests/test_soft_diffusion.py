"""Tests of soft_diffusion.py: naive and Momentum Sampler against independent NumPy implementations."""

import math

import ml_collections
import numpy as np
import pytest
import scipy.fft
import torch

import soft_diffusion
from corruption import BlurCorruption, default_blur_config

SIG_MIN, SIG_MAX, S_MIN, S_MAX = 0.4, 5.0, 0.02, 0.3


def _np_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Heat-equation blur written independently: scipy's orthonormal DCT-II and the closed-form response."""
    height, width = x.shape[-2:]
    n = np.arange(height)[:, None]
    m = np.arange(width)[None, :]
    resp = np.exp(-(np.pi**2) * (n**2 / height**2 + m**2 / width**2) * sigma**2 / 2)
    coeffs = scipy.fft.dctn(x, type=2, norm="ortho", axes=(-2, -1))
    return scipy.fft.idctn(resp * coeffs, type=2, norm="ortho", axes=(-2, -1))


def _np_sigma(t: float) -> float:
    return SIG_MIN * (SIG_MAX / SIG_MIN) ** t


def _np_noise(t: float, constant: bool = False) -> float:
    return S_MAX if constant else S_MIN * (S_MAX / S_MIN) ** t


def _corruption(noise_schedule: str = "geometric", num_steps: int = 12) -> BlurCorruption:
    return BlurCorruption(
        sigma_min=SIG_MIN,
        sigma_max=SIG_MAX,
        schedule="log",
        noise_schedule=noise_schedule,
        noise_min=S_MIN,
        noise_max=S_MAX,
        N=num_steps,
    )


class ToyNet(torch.nn.Module):
    """A fixed nonlinear residual network phi(x, labels) that mixes pixels and depends on the time label."""

    def forward(self, x, labels):
        t = (labels / 999).reshape(-1, 1, 1, 1)
        return -0.4 * torch.tanh(x) * t + 0.1 * torch.roll(x, 1, dims=-1) * (1 - t) + 0.05

    def np_h(self, x: np.ndarray, t: float) -> np.ndarray:
        return x + (-0.4 * np.tanh(x) * t + 0.1 * np.roll(x, 1, axis=-1) * (1 - t) + 0.05)


class ConstantImageNet(torch.nn.Module):
    """Predicts the one training image exactly: h(x, t) = x0 (residual x0 - x); records its inputs."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0
        self.inputs = []

    def forward(self, x, labels):
        self.inputs.append((x.clone(), labels.clone()))
        return self.x0 - x


def _identity(x):
    return x


def test_time_grid():
    ts = soft_diffusion.time_grid(5, 1.0, 0.2)
    assert torch.allclose(ts, torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2], dtype=torch.float64))
    assert soft_diffusion.time_grid(1, 1.0, 0.2).tolist() == [1.0]
    with pytest.raises(ValueError):
        soft_diffusion.time_grid(0, 1.0, 0.2)


def test_one_image_dataset_momentum_sampler_returns_the_image():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(1, 1, 8, 8, generator=gen, dtype=torch.float64) * 2 - 1
    corr = _corruption(num_steps=40)
    corr.fit_prior(x0.expand(8, -1, -1, -1))
    net = ConstantImageNet(x0)
    batch = 64
    sampler = soft_diffusion.get_momentum_sampler(
        corr, (batch, 1, 8, 8), lambda x: (x + 1) / 2, eps=1e-3, generator=torch.Generator().manual_seed(1)
    )
    z = corr.prior_sampling((batch, 1, 8, 8), generator=gen).double()
    out, nfe = sampler(net, z)
    assert nfe == 40 and len(net.inputs) == 40
    assert torch.allclose(out, ((x0 + 1) / 2).expand(batch, -1, -1, -1), atol=1e-12)
    # labels are 999 t on the grid from T to eps
    assert math.isclose(net.inputs[0][1][0].item(), 999.0) and math.isclose(net.inputs[-1][1][0].item(), 0.999)
    # the last state x_eps = C_eps x0 + r: r follows r' = (s'^2/s^2) r + sqrt(s^2 - s'^2) eta
    # from r_T ~ N(0, s_T^2)
    ts = np.linspace(1.0, 1e-3, 40)
    var = _np_noise(1.0) ** 2
    for t, t_next in zip(ts[:-1], ts[1:]):
        s2, s2n = _np_noise(t) ** 2, _np_noise(t_next) ** 2
        var = (s2n / s2) ** 2 * var + s2 - s2n
    resid = net.inputs[-1][0].numpy() - _np_blur(x0.numpy(), _np_sigma(1e-3))
    # Monte Carlo over 64 * 64 values: the variance estimate is within 4 standard errors
    # (sqrt(2 / 4096) ~ 2.2%)
    assert abs(resid.var() / var - 1) < 4 * math.sqrt(2 / resid.size)
    assert abs(resid.mean()) < 4 * math.sqrt(var / resid.size)


def test_constant_noise_without_injection_is_cold_diffusion_improved_sampler():
    corr = _corruption(noise_schedule="constant", num_steps=9)
    net = ToyNet()
    z = torch.randn(3, 2, 8, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    sampler = soft_diffusion.get_momentum_sampler(corr, z.shape, _identity, eps=0.05, noise=False)
    out, nfe = sampler(net, z)
    # Cold Diffusion (Bansal et al. 2022) Algorithm 2: x_(s-1) = x_s - D(x0_hat, s) + D(x0_hat, s-1)
    x = z.numpy()
    ts = np.linspace(1.0, 0.05, 9)
    for i, t in enumerate(ts):
        x0_hat = net.np_h(x, t)
        if i == len(ts) - 1:
            break
        x = x - _np_blur(x0_hat, _np_sigma(t)) + _np_blur(x0_hat, _np_sigma(ts[i + 1]))
    assert nfe == 9
    assert np.abs(out.numpy() - x0_hat).max() < 1e-10


def _replay_etas(seed, shape, count):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64).numpy() for _ in range(count)]


def test_momentum_sampler_exact_update_with_noise():
    corr = _corruption(num_steps=7)
    net = ToyNet()
    z = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    sampler = soft_diffusion.get_momentum_sampler(
        corr, z.shape, _identity, eps=0.01, generator=torch.Generator().manual_seed(21)
    )
    out, _ = sampler(net, z)
    etas = _replay_etas(21, z.shape, 6)
    x = z.numpy()
    ts = np.linspace(1.0, 0.01, 7)
    for i in range(6):
        t, tn = ts[i], ts[i + 1]
        s2, s2n = _np_noise(t) ** 2, _np_noise(tn) ** 2
        x0_hat = net.np_h(x, t)
        y = _np_blur(x0_hat, _np_sigma(t))
        e = y - x
        zz = x - (s2n / s2 - 1) * e + math.sqrt(s2 - s2n) * etas[i]
        x = zz + (_np_blur(x0_hat, _np_sigma(tn)) - y)
    expected = net.np_h(x, ts[-1])
    assert np.abs(out.numpy() - expected).max() < 1e-10


def test_naive_sampler_exact_update_with_and_without_noise():
    corr = _corruption(num_steps=5)
    net = ToyNet()
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ts = np.linspace(1.0, 0.02, 5)
    for noise in (True, False):
        sampler = soft_diffusion.get_naive_sampler(
            corr, z.shape, _identity, eps=0.02, noise=noise, generator=torch.Generator().manual_seed(5)
        )
        out, nfe = sampler(net, z)
        etas = _replay_etas(5, z.shape, 4)
        x = z.numpy()
        for i in range(4):
            x0_hat = net.np_h(x, ts[i])
            x = _np_blur(x0_hat, _np_sigma(ts[i + 1])) + (_np_noise(ts[i + 1]) * etas[i] if noise else 0.0)
        assert nfe == 5
        assert np.abs(out.numpy() - net.np_h(x, ts[-1])).max() < 1e-10


def test_sampler_draws_from_the_fitted_prior_and_applies_inverse_scaler():
    corr = _corruption(num_steps=3)
    corr.fit_prior(torch.randn(20, 1, 4, 4, generator=torch.Generator().manual_seed(0)))

    class Zero(torch.nn.Module):
        def forward(self, x, labels):
            return torch.zeros_like(x)

    shape = (5, 1, 4, 4)
    sampler = soft_diffusion.get_naive_sampler(
        corr, shape, lambda x: 10 * x, num_steps=1, generator=torch.Generator().manual_seed(2)
    )
    out, nfe = sampler(Zero())
    expected = corr.prior_sampling(shape, generator=torch.Generator().manual_seed(2))
    assert nfe == 1 and torch.allclose(out, 10 * expected)


def test_registered_in_sampling():
    import sampling

    config = ml_collections.ConfigDict()
    config.training = ml_collections.ConfigDict({"corruption": "blur"})
    config.sampling = ml_collections.ConfigDict({"method": "momentum"})
    config.blur = default_blur_config()
    config.blur.num_steps = 4
    config.device = torch.device("cpu")
    corr = _corruption()
    x0 = torch.zeros(1, 1, 4, 4)
    corr.fit_prior(torch.cat([x0, x0 + 0.1]))
    net = ConstantImageNet(torch.full((1, 1, 4, 4), 0.5))
    for method in ("momentum", "naive_blur"):
        config.sampling.method = method
        sampling_fn = sampling.get_sampling_fn(config, corr, (2, 1, 4, 4), _identity, 1e-3)
        out, nfe = sampling_fn(net)
        assert nfe == 4 and torch.allclose(out, torch.full((2, 1, 4, 4), 0.5))
    with pytest.raises(ValueError, match="corruption = 'blur'"):
        soft_diffusion.build_momentum_sampler(config, object(), (2, 1, 4, 4), _identity, 1e-3)
