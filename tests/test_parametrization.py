"""The parametrisation layer (parametrization.py): labels, score and denoiser of every SDE, the discrete models,
the unbounded UDDPM++ label, the blur corruption and the autocast precision, checked against closed forms."""

import math

import numpy as np
import pytest
import torch

import corruption as corruption_lib
import parametrization
import sde_lib
from models import utils as mutils

pytestmark = pytest.mark.usefixtures("single_thread")

MU, S = 0.3, 0.5  # data ~ N(MU, S^2) per dimension


class RecordingNet(torch.nn.Module):
    """Returns a fixed function of (x, labels) and remembers the labels it was given."""

    def __init__(self, out_fn):
        super().__init__()
        self.out_fn = out_fn
        self.weight = torch.nn.Parameter(torch.ones(()))  # so that train()/eval() and autocast have a module
        self.seen = None

    def forward(self, x, labels):
        self.seen = labels
        return self.out_fn(x, labels) * self.weight


def _t(*values):
    return torch.tensor(values, dtype=torch.float64)


def _gaussian_posterior_mean(x, alpha, sigma):
    """E[x0 | x_t] for x0 ~ N(MU, S^2): MU + alpha S^2 (x - alpha MU) / (alpha^2 S^2 + sigma^2) (NumPy)."""
    return MU + alpha * S**2 * (x - alpha * MU) / (alpha**2 * S**2 + sigma**2)


def _vp_np(t, b0=0.1, b1=20.0):
    B = b0 * t + 0.5 * (b1 - b0) * t**2
    return np.exp(-B / 2), np.sqrt(1 - np.exp(-B))


@pytest.mark.parametrize("continuous", [True, False])
def test_vp_noise_prediction_labels_and_score(continuous):
    sde = sde_lib.VPSDE(N=1000)
    eps_out = torch.randn(3, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    net = RecordingNet(lambda x, labels: eps_out)
    param = parametrization.get_parametrization(sde, net, continuous=continuous)
    t = _t(0.01, 0.5, 1.0)
    x = torch.zeros(3, 1, 2, 2, dtype=torch.float64)
    score = param.score(x, t)
    if continuous:
        np.testing.assert_allclose(net.seen.detach().numpy(), 999.0 * t.detach().numpy())
        sigma = _vp_np(t.detach().numpy())[1]
    else:  # DDPM: label t (N - 1), sigma from the discrete table sqrt(1 - alpha_bar)
        np.testing.assert_allclose(net.seen.detach().numpy(), t.detach().numpy() * 999)
        betas = np.linspace(0.1 / 1000, 20.0 / 1000, 1000)
        sigma = np.sqrt(1 - np.cumprod(1 - betas))[(t.detach().numpy() * 999).astype(int)]
    # the discrete table is float32, as score_sde's (relative error ~1e-5 against the float64 one)
    np.testing.assert_allclose(
        score.detach().numpy(),
        -eps_out.detach().numpy() / sigma[:, None, None, None],
        rtol=1e-6 if continuous else 3e-5,
    )


def test_vp_denoise_is_the_posterior_mean_for_the_exact_network():
    """A network predicting the exact noise E[z | x_t] gives denoise = E[x0 | x_t] (independent NumPy formula)."""
    sde = sde_lib.VPSDE()

    def exact_noise(x, labels):
        t = labels / 999.0
        a, s = (torch.as_tensor(v).reshape(-1, 1, 1, 1) for v in _vp_np(t.detach().numpy()))
        x0 = _gaussian_posterior_mean(x, a, s)
        return (x - a * x0) / s

    param = parametrization.get_parametrization(sde, RecordingNet(exact_noise), continuous=True)
    x = torch.randn(4, 1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = _t(0.05, 0.2, 0.6, 0.9)
    a, s = _vp_np(t.detach().numpy())
    expected = _gaussian_posterior_mean(x.detach().numpy(), a[:, None, None, None], s[:, None, None, None])
    np.testing.assert_allclose(param.denoise(x, t).detach().numpy(), expected, rtol=1e-9)
    # a scalar time: float64 coefficients applied as Python floats
    np.testing.assert_allclose(
        param.denoise(x, torch.tensor(0.2, dtype=torch.float64)).detach().numpy()[1], expected[1]
    )


def test_uddpm_label_matches_its_closed_form():
    sde = sde_lib.VPSDE()
    net = RecordingNet(lambda x, labels: torch.zeros_like(x))
    config = _config(unbounded_parametrization=True, truncation_time=1e-5, stabilizing_constant=1e-3)
    param = parametrization.get_parametrization(sde, net, continuous=True, config=config)
    t = _t(1e-5, 0.1, 1.0)
    param.score(torch.zeros(3, 1, 1, 1, dtype=torch.float64), t)

    def a_c(tt):
        B = 0.1 * tt + 0.5 * 19.9 * tt**2
        return math.log(1 - math.exp(-B) + 1e-3) + B

    expected = [999.0 * (a_c(v) - a_c(1e-5)) / (a_c(1.0) - a_c(1e-5)) for v in (1e-5, 0.1, 1.0)]
    np.testing.assert_allclose(net.seen.detach().numpy(), expected, rtol=1e-9, atol=1e-9)


def test_ddpm_score_false_takes_the_output_as_the_score():
    sde = sde_lib.VPSDE()
    net = RecordingNet(lambda x, labels: x * 2.0)
    param = parametrization.get_parametrization(sde, net, continuous=True, config=_config(ddpm_score=False))
    x = torch.ones(2, 1, 1, 1, dtype=torch.float64)
    assert torch.equal(param.score(x, _t(0.3, 0.4)), 2.0 * x)
    assert isinstance(param, parametrization.ScoreOutput)


@pytest.mark.parametrize("name", ["ve", "rve"])
def test_ve_and_rve_sigma_labels_and_tweedie(name):
    sde = sde_lib.VESDE(0.01, 50.0) if name == "ve" else sde_lib.RVESDE(1e-3, 50.0, eps=1e-5)
    # exact score of the Gaussian data: -(x - MU) / (S^2 + sigma^2) with sigma the label
    net = RecordingNet(lambda x, sigma: -(x - MU) / (S**2 + sigma.reshape(-1, 1, 1, 1) ** 2))
    param = parametrization.get_parametrization(sde, net, continuous=True)
    t = _t(0.2, 0.5, 0.99) if name == "ve" else _t(2e-5, 1e-3, 0.5)
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x0 = param.denoise(x, t)
    sigma = sde.marginal_std(t).detach().numpy()
    np.testing.assert_allclose(net.seen.detach().numpy(), sigma)
    expected = _gaussian_posterior_mean(x.detach().numpy(), 1.0, sigma[:, None, None, None])
    np.testing.assert_allclose(x0.detach().numpy(), expected, rtol=1e-9)


def test_discrete_ve_label_is_the_sigma_index():
    sde = sde_lib.VESDE(0.01, 50.0, N=10)
    net = RecordingNet(lambda x, labels: torch.zeros_like(x))
    param = parametrization.get_parametrization(sde, net, continuous=False)
    param.score(torch.zeros(3, 1, 1, 1), torch.tensor([1.0, 0.5, 0.0]))
    assert net.seen.tolist() == [0, 4, 9]  # round((T - t)(N - 1)); index 0 is the largest sigma of the network


def test_blur_residual_denoise_and_score():
    config = _config()
    with config.unlocked():
        config.training.corruption = "blur"
        config.data.image_size = 8
        config.data.num_channels = 1
    blur = corruption_lib.BlurCorruption.from_config(config)
    residual = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    net = RecordingNet(lambda x, labels: residual)
    param = parametrization.get_parametrization(blur, net)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    t = _t(0.25, 0.75)
    h = param.denoise(x, t)
    np.testing.assert_allclose(net.seen.detach().numpy(), 999.0 * t.detach().numpy())
    assert torch.equal(h, x + residual)
    s = blur.noise_std(t).reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(
        param.score(x, t).detach().numpy(), (-(x - blur.blur_at(h, t)) / s**2).detach().numpy(), rtol=1e-12
    )


def test_get_score_fn_is_the_parametrisation_score():
    sde = sde_lib.subVPSDE()
    net = RecordingNet(lambda x, labels: x + labels.reshape(-1, 1, 1, 1))
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    t = _t(0.3, 0.8)
    a = mutils.get_score_fn(sde, net, train=False, continuous=False)(x, t)  # sub-VP is always continuous
    b = parametrization.get_parametrization(sde, net, continuous=True).score(x, t)
    assert torch.equal(a, b)


def test_bf16_precision_runs_the_network_in_bf16_and_returns_float32():
    sde = sde_lib.VESDE()
    seen = {}

    class Conv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x, labels):
            out = self.conv(x)
            seen["dtype"] = out.dtype
            return out

    net = Conv()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([0.3, 0.6])
    fp32 = parametrization.get_parametrization(sde, net).score(x, t)
    bf16 = parametrization.get_parametrization(sde, net, precision="bf16").score(x, t)
    assert seen["dtype"] == torch.bfloat16 and bf16.dtype == torch.float32
    assert (bf16 - fp32).abs().max() < 0.02 * fp32.abs().max()  # bf16 has 8 significant bits
    with pytest.raises(ValueError, match="precision"):
        parametrization.get_parametrization(sde, net, precision="fp8")


def test_unknown_corruption_names_the_fix():
    with pytest.raises(ValueError, match="parametrization.py"):
        parametrization.get_parametrization(object(), torch.nn.Identity())


def _config(**training):
    from configs.default_cifar10_configs import get_default_configs
    from configs.defaults import complete_config

    config = get_default_configs()
    for key, value in training.items():
        setattr(config.training, key, value)
    return complete_config(config)
