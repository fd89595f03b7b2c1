"""Tests of corruption.py: DCT, heat blur, schedules, Soft Score Matching, prior fit, Gaussian-data score."""

import json
import math

import numpy as np
import pytest
import scipy.fft
import scipy.ndimage
import scipy.stats
import torch

import corruption
from corruption import BlurCorruption, blur, dct_2d, dct_matrix, idct_2d


def _np_dct2(x: np.ndarray) -> np.ndarray:
    return scipy.fft.dctn(x, type=2, norm="ortho", axes=(-2, -1))


def _np_idct2(x: np.ndarray) -> np.ndarray:
    return scipy.fft.idctn(x, type=2, norm="ortho", axes=(-2, -1))


def _np_response(sigma: float, height: int, width: int) -> np.ndarray:
    n = np.arange(height)[:, None]
    m = np.arange(width)[None, :]
    return np.exp(-(np.pi**2) * (n**2 / height**2 + m**2 / width**2) * sigma**2 / 2)


def _make(**kw) -> BlurCorruption:
    args = dict(sigma_min=0.5, sigma_max=6.0, noise_min=0.02, noise_max=0.2, N=10)
    args.update(kw)
    return BlurCorruption(**args)


# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 5, 8, 13])
def test_dct_matrix_orthonormal(n):
    d = dct_matrix(n, dtype=torch.float64)
    assert torch.allclose(d @ d.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_dct_2d_matches_scipy_and_inverts():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 7, 10))
    ours = dct_2d(torch.from_numpy(x)).numpy()
    assert np.abs(ours - _np_dct2(x)).max() < 1e-12
    back = idct_2d(torch.from_numpy(ours)).numpy()
    assert np.abs(back - x).max() < 1e-12
    # float32 path uses its own cached matrices
    ours32 = dct_2d(torch.from_numpy(x).float())
    assert ours32.dtype == torch.float32
    assert np.abs(ours32.numpy() - _np_dct2(x)).max() < 1e-5


# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [1.5, 2.5])
def test_blur_equals_reflective_gaussian_convolution(sigma):
    """Heat kernel vs scipy's sampled Gaussian (mode='reflect' = half-sample symmetric, truncate 12 sigma).

    The heat kernel is the continuum Gaussian; the sampled one differs in frequency response by its aliasing,
    about exp(-pi^2 sigma^2 / 2) (1.5e-5 at sigma = 1.5), so sigma >= 1.5 makes a 1e-4 comparison fair.
    """
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (2, 3, 16, 12))
    ref = scipy.ndimage.gaussian_filter(x, sigma=(0, 0, sigma, sigma), mode="reflect", truncate=12.0)
    ours = blur(torch.from_numpy(x), sigma).numpy()
    assert np.abs(ours - ref).max() < 1e-4
    # the same in float32 with per-sample sigmas
    x2 = np.stack([x[0], x[1]])
    sig = torch.tensor([sigma, 2 * sigma], dtype=torch.float32)
    ours2 = blur(torch.from_numpy(x2).float(), sig).numpy()
    ref2 = scipy.ndimage.gaussian_filter(x2[1], sigma=(0, 2 * sigma, 2 * sigma), mode="reflect", truncate=12.0)
    assert np.abs(ours2[1] - ref2).max() < 1e-4
    assert np.abs(ours2[0] - ref[0]).max() < 1e-4


def test_frequency_response_closed_form():
    resp = corruption.blur_frequency_response(torch.tensor([0.7, 3.0], dtype=torch.float64), 6, 9)
    assert resp.shape == (2, 1, 6, 9)
    assert np.abs(resp[1, 0].numpy() - _np_response(3.0, 6, 9)).max() < 1e-14
    # a DCT basis image is an eigenvector of the blur
    basis = _np_idct2(np.eye(6)[2][:, None] * np.eye(9)[5][None, :])
    out = blur(torch.from_numpy(basis)[None, None], 0.7)[0, 0].numpy()
    assert np.abs(out - _np_response(0.7, 6, 9)[2, 5] * basis).max() < 1e-13


def test_blur_symmetric_and_composes():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 8, 11, generator=gen, dtype=torch.float64)
    b = torch.randn(2, 3, 8, 11, generator=gen, dtype=torch.float64)
    sig = torch.tensor([1.3, 0.4], dtype=torch.float64)
    assert torch.allclose((blur(a, sig) * b).sum(), (a * blur(b, sig)).sum(), atol=1e-10)
    sa, sb = 1.1, 2.3
    composed = blur(blur(a, sa), sb)
    direct = blur(a, math.sqrt(sa**2 + sb**2))
    assert (composed - direct).abs().max() < 1e-12
    # blur preserves the channel mean (DC coefficient) and does not blur at sigma = 0
    assert torch.allclose(blur(a, 5.0).mean((-1, -2)), a.mean((-1, -2)), atol=1e-12)
    assert torch.allclose(blur(a, 0.0), a, atol=1e-12)


# --- s
def test_schedules_closed_form():
    t = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    c = _make(schedule="log", noise_schedule="geometric")
    assert torch.allclose(c.blur_sigma(t), torch.tensor([0.5, 0.5 * 12**0.25, 6.0], dtype=torch.float64))
    assert torch.allclose(c.noise_std(t), torch.tensor([0.02, 0.02 * 10**0.25, 0.2], dtype=torch.float64))
    c = _make(schedule="linear", noise_schedule="linear")
    assert torch.allclose(c.blur_sigma(t), torch.tensor([0.5, 0.5 + 0.25 * 5.5, 6.0], dtype=torch.float64))
    assert torch.allclose(c.noise_std(t), torch.tensor([0.02, 0.065, 0.2], dtype=torch.float64))
    c = _make(noise_schedule="constant")
    assert torch.allclose(c.noise_std(t), torch.full((3,), 0.2, dtype=torch.float64))
    mean, std = c.marginal_prob(torch.ones(3, 1, 4, 4, dtype=torch.float64), t)
    assert torch.allclose(mean, torch.ones_like(mean)) and torch.allclose(std, c.noise_std(t))


def test_file_schedule_interpolates_log_sigma(tmp_path):
    path = tmp_path / "sched.json"
    path.write_text(json.dumps({"t": [0.0, 0.5, 1.0], "sigma": [0.5, 2.0, 4.0]}))
    c = _make(schedule="file", schedule_file=str(path))
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.2])
    expected = torch.tensor([0.5, 1.0, 2.0, math.sqrt(8.0), 4.0, 4.0])
    assert torch.allclose(c.blur_sigma(t), expected, rtol=1e-5)


def test_bad_configs_and_files_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="schedule"):
        _make(schedule="cosine")
    with pytest.raises(ValueError, match="noise_schedule"):
        _make(noise_schedule="exp")
    with pytest.raises(ValueError, match="noise_min"):
        _make(noise_min=0.0)
    with pytest.raises(ValueError, match="sigma_min"):
        _make(sigma_min=3.0, sigma_max=1.0)
    with pytest.raises(FileNotFoundError, match="blur_schedule"):
        _make(schedule="file", schedule_file=str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"t": [0, 1]')
    with pytest.raises(ValueError, match="not a valid schedule"):
        _make(schedule="file", schedule_file=str(bad))
    bad.write_text(json.dumps({"t": [0.0, 0.7, 0.5, 1.0], "sigma": [1, 2, 3, 4]}))
    with pytest.raises(ValueError, match="increase"):
        _make(schedule="file", schedule_file=str(bad))
    with pytest.raises(ValueError, match="weighting"):
        corruption.ssm_lambda(torch.ones(1), "likelihood")
    with pytest.raises(RuntimeError, match="fit_prior"):
        _make().prior_sampling((1, 1, 4, 4))


# --- Soft Score Matching
def test_generic_dsm_form_equals_soft_score_matching():
    """(lambda/s^2) ||s score(x_t) + z||^2 / 2 (x_t = C_t x0 + s z) = lambda ||C_t(h - x0)||^2 / (2 s^4)."""
    c = _make()
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(3, 2, 8, 8, dtype=torch.float64, generator=gen)
    t = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
    z = torch.randn(x0.shape, dtype=torch.float64, generator=gen)

    class Net(torch.nn.Module):
        def forward(self, x, labels):
            return 0.3 * torch.tanh(x) * (labels / 999).reshape(-1, 1, 1, 1)

    net = Net()
    mean, std = c.marginal_prob(x0, t)
    x_t = mean + std.reshape(-1, 1, 1, 1) * z
    score = c.get_score_fn(net)(x_t, t)
    lam = corruption.ssm_lambda(std, "ssm")
    generic = lam / std**2 * ((std.reshape(-1, 1, 1, 1) * score + z) ** 2).sum((1, 2, 3)) / 2
    h = x_t + 0.3 * torch.tanh(x_t) * t.reshape(-1, 1, 1, 1)
    residual = c.blur_at(h - x0, t).reshape(3, -1)
    direct = lam * (residual**2).sum(1) / (2 * std**4)
    assert torch.allclose(generic, direct, rtol=1e-9)


# --- Gaussian
def _gaussian_data_params(channels, height, width):
    """Per-DCT-coefficient mean and variance of a stationary-looking Gaussian image model."""
    n = np.arange(height)[:, None]
    m = np.arange(width)[None, :]
    var = 0.5 / (1.0 + n**2 + m**2) + 1e-3
    var = np.broadcast_to(var, (channels, height, width)) * np.linspace(1.0, 0.5, channels)[:, None, None]
    mean = np.zeros((channels, height, width))
    mean[:, 0, 0] = np.linspace(-0.5, 0.5, channels) * math.sqrt(height * width)
    mean[:, 1, 0] = 0.3
    return mean, np.ascontiguousarray(var)


class PosteriorMeanNet(torch.nn.Module):
    """Residual network of the optimal denoiser E[x0 | x_t] for x0 ~ N(m, diag v) in the DCT basis (NumPy)."""

    def __init__(self, mean, var, sigma_of_t, noise_of_t):
        super().__init__()
        self.mean, self.var, self.sigma_of_t, self.noise_of_t = mean, var, sigma_of_t, noise_of_t

    def forward(self, x, labels):
        xs = x.detach().cpu().numpy().astype(np.float64)
        out = np.empty_like(xs)
        for b, lab in enumerate(labels.detach().cpu().numpy()):
            t = lab / 999.0
            c = _np_response(self.sigma_of_t(t), xs.shape[-2], xs.shape[-1])
            s2 = self.noise_of_t(t) ** 2
            coeffs = _np_dct2(xs[b])
            post = self.mean + self.var * c * (coeffs - c * self.mean) / (c**2 * self.var + s2)
            out[b] = _np_idct2(post) - xs[b]
        return torch.from_numpy(out).to(x.dtype)


def test_optimal_denoiser_score_matches_analytic_score():
    channels, height, width = 2, 8, 6
    mean, var = _gaussian_data_params(channels, height, width)
    c = _make()
    sig_fn = lambda t: 0.5 * 12**t  # noqa: E731  (the 'log' schedule, written independently)
    noise_fn = lambda t: 0.02 * 10**t  # noqa: E731
    net = PosteriorMeanNet(mean, var, sig_fn, noise_fn)
    score_fn = c.get_score_fn(net)
    rng = np.random.default_rng(7)
    t = np.array([0.05, 0.4, 0.95])
    x = rng.standard_normal((3, channels, height, width))
    ours = score_fn(torch.from_numpy(x), torch.from_numpy(t)).numpy()
    for b in range(3):
        resp = _np_response(sig_fn(t[b]), height, width)
        total_var = resp**2 * var + noise_fn(t[b]) ** 2
        analytic = _np_idct2(-(_np_dct2(x[b]) - resp * mean) / total_var)
        assert np.abs(ours[b] - analytic).max() < 1e-8 * max(1.0, np.abs(analytic).max())


def test_fit_prior_recovers_mean_and_variance_and_samples():
    channels, height, width = 2, 6, 6
    mean, var = _gaussian_data_params(channels, height, width)
    rng = np.random.default_rng(11)
    count = 16000
    coeffs = mean + np.sqrt(var) * rng.standard_normal((count, channels, height, width))
    images = torch.from_numpy(_np_idct2(coeffs)).float()
    c = _make(sigma_max=3.0)
    batches = [{"image": (images[i : i + 4000] + 1) / 2} for i in range(0, count, 4000)]
    c.fit_prior(batches, scaler=lambda x: 2 * x - 1)
    resp = _np_response(3.0, height, width)
    exp_mean = resp * mean
    exp_var = resp**2 * var + 0.2**2
    assert c.num_fit_images == count
    # Monte Carlo: standard errors sqrt(v / n) for the mean, v sqrt(2 / n) for the variance (5 s.e. tolerance)
    assert np.all(np.abs(c.prior_mean.numpy() - exp_mean) < 5 * np.sqrt(exp_var / count) + 1e-5)
    assert np.all(np.abs(c.prior_var.numpy() - exp_var) < 5 * (exp_var - 0.04) * math.sqrt(2 / count) + 1e-5)
    # samples of the fitted prior have those moments in the DCT basis
    samples = c.prior_sampling((count, channels, height, width), generator=torch.Generator().manual_seed(0))
    sc = _np_dct2(samples.double().numpy())
    fitted_mean, fitted_var = c.prior_mean.double().numpy(), c.prior_var.double().numpy()
    assert np.all(np.abs(sc.mean(0) - fitted_mean) < 5 * np.sqrt(fitted_var / count) + 1e-5)
    assert np.all(np.abs(sc.var(0) / fitted_var - 1) < 5 * math.sqrt(2 / count))
    # prior_logp equals the pixel-space Gaussian density with covariance D^T diag(var) D (one channel here)
    c1 = _make(sigma_max=3.0).fit_prior(images[:2000, :1])
    basis = np.stack([_np_idct2(np.eye(height * width)[k].reshape(height, width)) for k in range(height * width)])
    d_mat = basis.reshape(height * width, -1)  # rows: basis images, so pixel = d_mat^T coeff
    cov = d_mat.T @ np.diag(c1.prior_var.double().numpy().ravel()) @ d_mat
    mu = d_mat.T @ c1.prior_mean.double().numpy().ravel()
    z = rng.standard_normal((4, 1, height, width))
    ref = scipy.stats.multivariate_normal(mu, cov).logpdf(z.reshape(4, -1))
    ours = c1.prior_logp(torch.from_numpy(z)).numpy()
    assert np.allclose(ours, ref, rtol=1e-6)


def test_state_dict_round_trip(tmp_path):
    images = torch.randn(50, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    c = _make().fit_prior(images)
    path = tmp_path / "corruption.pt"
    torch.save({"corruption": c.state_dict()}, path)
    state = torch.load(path, weights_only=True)["corruption"]
    c2 = _make()
    c2.load_state_dict(state)
    a = c.prior_sampling((4, 3, 8, 8), generator=torch.Generator().manual_seed(9))
    b = c2.prior_sampling((4, 3, 8, 8), generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    assert c2.num_fit_images == 50
    with pytest.raises(ValueError, match="does not match"):
        c2.prior_sampling((4, 1, 8, 8))
    with pytest.raises(KeyError, match="prior_var"):
        c2.load_state_dict({"prior_mean": state["prior_mean"]})


def test_file_schedule_is_stored_in_state(tmp_path):
    path = tmp_path / "sched.json"
    path.write_text(json.dumps({"t": [0.0, 1.0], "sigma": [0.5, 4.0]}))
    c = _make(schedule="file", schedule_file=str(path)).fit_prior(torch.randn(10, 1, 4, 4))
    state = c.state_dict()
    path.unlink()  # sampling needs nothing but the stored state
    c2 = _make()
    c2.load_state_dict(state)
    t = torch.tensor([0.5])
    assert torch.allclose(c2.blur_sigma(t), torch.tensor([math.sqrt(2.0)]), rtol=1e-6)


def test_get_corruption_from_config():
    import ml_collections

    config = ml_collections.ConfigDict()
    config.training = ml_collections.ConfigDict({"corruption": "blur"})
    with pytest.raises(ValueError, match="config.blur"):
        corruption.get_corruption(config)
    config.blur = corruption.default_blur_config()
    config.blur.sigma_max = 7.0
    c = corruption.get_corruption(config)
    assert isinstance(c, BlurCorruption) and c.sigma_max == 7.0 and c.N == config.blur.num_steps and c.T == 1
    config.training.corruption = "motion_blur"
    with pytest.raises(ValueError, match="'gaussian', 'blur'"):
        corruption.get_corruption(config)


def test_get_corruption_gaussian_returns_sde():
    import sde_lib
    from configs.default_cifar10_configs import get_default_configs

    config = get_default_configs()
    config.training.sde = "vesde"
    sde = corruption.get_corruption(config)
    assert isinstance(sde, sde_lib.VESDE)


def test_dtype_and_device_follow_input():
    c = _make()
    x = torch.randn(2, 1, 5, 7, dtype=torch.float64)
    mean, std = c.marginal_prob(x, torch.tensor([0.2, 0.8], dtype=torch.float64))
    assert mean.dtype == torch.float64 and std.dtype == torch.float64
    if torch.cuda.is_available():
        xc = x.float().cuda()
        out = c.blur_at(xc, 0.5)
        assert out.device == xc.device
        assert torch.allclose(out.cpu(), c.blur_at(x.float(), 0.5), atol=1e-5)


@pytest.mark.parametrize("name", ["cifar10_blur", "celeba_blur", "demo_blur"])
def test_blur_configs_build_their_corruption(name):
    import importlib

    config = importlib.import_module(f"configs.{name}").get_config()
    assert config.training.corruption == "blur" and config.sampling.method == "momentum"
    assert config.model.embedding_type == "positional" and config.data.centered
    c = corruption.get_corruption(config)
    # at t = 1 the first DCT harmonic keeps at most ~15% of its amplitude (heavy blur: a Gaussian prior fits)
    size = config.data.image_size
    first = math.exp(-(math.pi**2) / size**2 * c.sigma_max**2 / 2)
    assert first < 0.2
    assert 0.01 <= c.noise_min <= c.noise_max <= 0.1
