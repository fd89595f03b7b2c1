"""The composed loss: Soft Truncation identity, equivalence with plain training, micro-batches, mixed mode, NaN."""

import math

import numpy as np
import pytest
import torch
from conftest import SDE_NAMES, make_sde, use_exact_score
from scipy import integrate

import losses
import sde_lib

SDES = {name: (lambda name=name: make_sde(name)[0]) for name in SDE_NAMES}


def shrink_score(sde, c):
    """Score of a model that under-denoises zero data: s(x, t) = -c(t) x / sigma(t)^2 (exact score has c = 1)."""

    def score_fn(x, t):
        std = sde.marginal_prob(torch.zeros_like(x), t)[1]
        shape = (-1, *([1] * (x.dim() - 1)))
        return -c(t).reshape(shape) * x / std.reshape(shape) ** 2

    return score_fn


@pytest.fixture
def patch_score(monkeypatch):
    def apply(score_fn):
        use_exact_score(monkeypatch, score_fn)

    return apply


def g2_over_sigma2(sde, t: float) -> float:
    tt = torch.tensor([t], dtype=torch.float64)
    g2 = sde.sde(torch.zeros(1, 1, dtype=torch.float64), tt)[1] ** 2
    std = sde.marginal_prob(torch.zeros(1, 1, dtype=torch.float64), tt)[1]
    return float(g2 / std**2)


def pk_cdf(tau: float, k: float, eps: float, T: float = 1.0) -> float:
    """Independent CDF of P_k(tau) ~ tau^-k on [eps, T]."""
    tau = min(max(tau, eps), T)
    if k == 1:
        return math.log(tau / eps) / math.log(T / eps)
    return (tau ** (1 - k) - eps ** (1 - k)) / (T ** (1 - k) - eps ** (1 - k))


@pytest.mark.parametrize("name,k", [("vp", 1.0), ("ve", 2.0), ("rve", 2.0), ("subvp", 0.5)])
def test_soft_truncation_expectation_is_g2_times_cdf_weighting(name, k, patch_score):
    """E_tau[L(theta; g^2, tau)] = L(theta; g^2 F_P, eps) (Kim et al. 2022, papers.md section 3)."""
    torch.manual_seed(0)
    sde = SDES[name]()
    eps = 1e-3 if name == "vp" else 1e-5
    # With x0 = 0 and s = -c x / sigma^2, std * s + z = (1 - c) z: the loss density is (1 - c(t))^2 per dimension.
    c = lambda t: 0.5 * t  # noqa: E731
    patch_score(shrink_score(sde, c))
    loss_fn = losses.get_per_sample_loss_fn(sde, train=True, reduce_mean=True, eps=eps, importance_sampling=True)
    D, B, n_tau = 256, 64, 400
    batch = torch.zeros(B, D)
    values = []
    for _ in range(n_tau):
        tau = float(sde_lib.sample_truncation_time(k, eps))
        values.append(loss_fn(None, batch, tau=tau).double())
    values = torch.cat(values)
    estimate = float(values.mean())
    std_err = float(values.std()) / math.sqrt(len(values))

    def integrand(t):
        return g2_over_sigma2(sde, t) * (1 - 0.5 * t) ** 2 * pk_cdf(t, k, eps)

    grid = np.geomspace(eps, 1.0, 60)
    expected = sum(integrate.quad(integrand, a, b, limit=200)[0] for a, b in zip(grid[:-1], grid[1:]))
    assert abs(estimate - expected) < 4 * std_err + 1e-3 * expected, (estimate, expected, std_err)


@pytest.mark.parametrize("name", sorted(SDES))
def test_tau_at_eps_is_plain_likelihood_training(name, patch_score):
    """ST with tau = eps (k = inf) reproduces score_sde's likelihood-weighted loss bit for bit."""
    sde = SDES[name]()
    eps = 1e-5
    model_score = shrink_score(sde, lambda t: 0.3 + 0.5 * t)
    patch_score(model_score)
    batch = torch.randn(8, 3, 4, 4)
    assert float(sde_lib.sample_truncation_time(math.inf, eps)) == pytest.approx(eps, rel=1e-6)
    loss_fn = losses.get_sde_loss_fn(sde, train=True, reduce_mean=False, likelihood_weighting=True, eps=eps)
    torch.manual_seed(3)
    ours = loss_fn(None, batch, tau=eps)

    # score_sde's get_sde_loss_fn, written out independently
    torch.manual_seed(3)
    t = torch.rand(batch.shape[0]) * (sde.T - eps) + eps
    z = torch.randn_like(batch)
    mean, std = sde.marginal_prob(batch, t)
    x_t = mean + std[:, None, None, None] * z
    score = model_score(x_t, t)
    g2 = sde.sde(torch.zeros_like(batch), t)[1] ** 2
    reference = torch.mean(0.5 * torch.sum(torch.square(score + z / std[:, None, None, None]).reshape(8, -1), -1) * g2)
    torch.testing.assert_close(ours, reference, rtol=2e-6, atol=0)


def test_variance_weighting_matches_score_sde(patch_score):
    sde = SDES["vp"]()
    model_score = shrink_score(sde, lambda t: 0.8 + 0 * t)
    patch_score(model_score)
    batch = torch.randn(6, 2, 4, 4)
    loss_fn = losses.get_sde_loss_fn(sde, train=True, reduce_mean=True, likelihood_weighting=False, eps=1e-5)
    torch.manual_seed(5)
    ours = loss_fn(None, batch)
    torch.manual_seed(5)
    t = torch.rand(6) * (1 - 1e-5) + 1e-5
    z = torch.randn_like(batch)
    mean, std = sde.marginal_prob(batch, t)
    x_t = mean + std[:, None, None, None] * z
    score = model_score(x_t, t)
    reference = torch.mean(torch.mean(torch.square(score * std[:, None, None, None] + z).reshape(6, -1), -1))
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=0)


def test_importance_sampling_estimator_is_unbiased(patch_score):
    """Z_tau E_{p_iw}[(1-c)^2] equals the uniform-time likelihood-weighted integral, computed by quadrature."""
    torch.manual_seed(1)
    sde = SDES["vp"]()
    tau = 1e-3
    patch_score(shrink_score(sde, lambda t: t))
    loss_fn = losses.get_per_sample_loss_fn(sde, train=True, reduce_mean=True, importance_sampling=True)
    values = torch.cat([loss_fn(None, torch.zeros(256, 128), tau=tau).double() for _ in range(40)])
    expected = integrate.quad(lambda t: g2_over_sigma2(sde, t) * (1 - t) ** 2, tau, 1.0, limit=200)[0]
    std_err = float(values.std()) / math.sqrt(len(values))
    assert abs(float(values.mean()) - expected) < 4 * std_err + 1e-3 * expected


class Linear(torch.nn.Module):
    """A tiny 'score model' with parameters: s(x, t) = -(w x + b) / sigma^2 (works for every SDE)."""

    def __init__(self, sde):
        super().__init__()
        self.sde = sde
        self.w = torch.nn.Parameter(torch.tensor(0.7))
        self.b = torch.nn.Parameter(torch.tensor(0.1))

    def score(self, x, t):
        std = self.sde.marginal_prob(torch.zeros_like(x), t)[1].reshape(-1, *([1] * (x.dim() - 1)))
        return -(self.w * x + self.b) / std**2


class FakeEMA:
    def __init__(self):
        self.updates = 0

    def update(self, params):
        self.updates += 1


def make_state(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return dict(model=model, optimizer=opt, ema=FakeEMA(), step=0)


def sgd_step(optimizer, params, step):
    optimizer.step()


@pytest.fixture
def linear_score(monkeypatch):
    use_exact_score(monkeypatch)


def test_micro_batches_share_one_tau_and_average_gradients(monkeypatch, linear_score):
    sde = SDES["vp"]()
    taus = []
    monkeypatch.setattr(losses, "sample_tau", lambda st, k, eps, T=1.0: taus.append(0.2) or 0.2)
    seen = []
    original = losses.get_per_sample_loss_fn

    def spy(*args, **kwargs):
        fn = original(*args, **kwargs)

        def wrapped(model, batch, tau=None, reference=None):
            seen.append((tau, batch.shape[0]))
            return fn(model, batch, tau=tau, reference=reference)

        return wrapped

    monkeypatch.setattr(losses, "get_per_sample_loss_fn", spy)
    model = Linear(sde)
    state = make_state(model)
    step_fn = losses.get_step_fn(sde, True, sgd_step, reduce_mean=True, st=True, k=1.0, num_micro_batch=4)
    step_fn(state, torch.randn(8, 5))
    assert taus == [0.2] and seen == [(0.2, 2)] * 4
    assert state["step"] == 1 and state["ema"].updates == 1

    # gradient accumulation: the accumulated gradient equals the gradient of the full-batch mean loss
    batch = torch.randn(8, 5)
    per_sample = original(sde, True, reduce_mean=True)
    model_a, model_b = Linear(sde), Linear(sde)
    torch.manual_seed(9)
    step_a = losses.get_step_fn(sde, True, lambda o, p, step: None, reduce_mean=True, num_micro_batch=2)
    step_a(make_state(model_a), batch)
    torch.manual_seed(9)
    halves = [per_sample(model_b, chunk, tau=0.2) for chunk in torch.tensor_split(batch, 2)]
    torch.mean(torch.cat(halves)).backward()
    torch.testing.assert_close(model_a.w.grad, model_b.w.grad)
    torch.testing.assert_close(model_a.b.grad, model_b.b.grad)


def test_mixed_and_balanced_modes(monkeypatch, linear_score):
    sde = SDES["vp"]()
    batch = torch.randn(8, 5)
    per_sample = losses.get_per_sample_loss_fn
    for balanced in (False, True):
        model = Linear(sde)
        step_fn = losses.get_step_fn(
            sde,
            True,
            lambda o, p, step: None,
            reduce_mean=True,
            mixed=True,
            balanced=balanced,
            ddpm_weight=3.0,
        )
        torch.manual_seed(2)
        loss = step_fn(make_state(model), batch)
        torch.manual_seed(2)
        l_is = per_sample(sde, True, reduce_mean=True, importance_sampling=True)(model, batch[:4], tau=1e-5)
        l_u = per_sample(sde, True, reduce_mean=True)(model, batch[4:], tau=1e-5)
        weight = 3.0 * torch.mean(l_is / l_u) if balanced else 3.0
        torch.testing.assert_close(loss, torch.mean(l_is + weight * l_u).detach())


def test_nonfinite_loss_skips_the_step(linear_score):
    sde = SDES["vp"]()
    model = Linear(sde)
    with torch.no_grad():
        model.w.fill_(float("nan"))
    state = make_state(model)
    calls = []
    step_fn = losses.get_step_fn(sde, True, lambda o, p, step: calls.append(step), reduce_mean=True)
    loss = step_fn(state, torch.randn(4, 3))
    assert not torch.isfinite(loss)
    assert state["nonfinite"] and state["step"] == 0 and calls == [] and state["ema"].updates == 0


def test_invalid_options_are_rejected():
    sde = SDES["vp"]()
    with pytest.raises(ValueError, match="weighting"):
        losses.get_per_sample_loss_fn(sde, True, weighting="bogus")
    with pytest.raises(ValueError, match="num_micro_batch"):
        losses.get_step_fn(sde, True, None, num_micro_batch=0)
    with pytest.raises(ValueError):
        sde_lib.sample_truncation_time(-1.0, 1e-5)


@pytest.mark.parametrize("name", sorted(SDES))
def test_stf_with_own_source_only_is_exactly_dsm(name, patch_score):
    """n = 1: the reference batch holds only the sample's own source, and STF is the DSM loss."""
    sde = SDES[name]()
    patch_score(shrink_score(sde, lambda t: 0.5 + 0.3 * t))
    x0 = torch.randn(1, 3, 4, 4)
    dsm = losses.get_per_sample_loss_fn(sde, True, reduce_mean=True, likelihood_weighting=True)
    stf_loss = losses.get_per_sample_loss_fn(sde, True, reduce_mean=True, likelihood_weighting=True, stf=True)
    for seed in range(5):
        torch.manual_seed(seed)
        a = dsm(None, x0)
        torch.manual_seed(seed)
        b = stf_loss(None, x0, reference=x0.clone())
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_stf_target_moves_towards_the_weighted_mean(patch_score):
    """With two far-apart references and a tiny sigma, the STF target picks the source nearest to x_t."""
    sde = SDES["ve"]()
    patch_score(lambda x, t: torch.zeros_like(x))
    x0 = torch.zeros(1, 8)
    far = torch.full((1, 8), 100.0)
    stf_loss = losses.get_per_sample_loss_fn(sde, True, reduce_mean=True, stf=True)
    dsm = losses.get_per_sample_loss_fn(sde, True, reduce_mean=True)
    torch.manual_seed(0)
    a = stf_loss(None, x0, tau=0.01, reference=torch.cat([x0, far]))
    torch.manual_seed(0)
    b = dsm(None, x0, tau=0.01)
    torch.testing.assert_close(a, b)  # the far source gets zero weight


def test_soft_score_matching_loss_vanishes_for_the_true_clean_image():
    """Blur corruption: with h(x_t, t) = x0 (a network that knows the one training image) the loss is 0, and
    for another h it equals the direct formula ||C_t (h - x0)||^2 / s_t^2 (the 'ssm' weighting)."""
    import corruption

    blur = corruption.BlurCorruption(sigma_min=0.5, sigma_max=4.0, noise_min=0.01, noise_max=0.1)
    x0 = torch.rand(1, 3, 8, 8) * 2 - 1

    class Knows(torch.nn.Module):
        def __init__(self, offset):
            super().__init__()
            self.offset = offset

        def forward(self, x, labels):  # residual form: h = x + model(x) = x0 + offset
            return x0 + self.offset - x

    loss_fn = losses.get_per_sample_loss_fn(blur, True, reduce_mean=False, eps=1e-3)
    batch = x0.expand(4, -1, -1, -1)
    zero = loss_fn(Knows(0.0), batch)
    assert float(zero.abs().max()) < 1e-6 * float(loss_fn(Knows(0.1), batch).min())

    offset = 0.05 * torch.randn(1, 3, 8, 8)
    torch.manual_seed(4)
    ours = loss_fn(Knows(offset), batch)
    torch.manual_seed(4)
    t = torch.rand(4) * (1 - 1e-3) + 1e-3
    s = blur.noise_std(t)
    direct = 0.5 * torch.sum(blur.blur_at(offset.expand(4, -1, -1, -1), t).reshape(4, -1) ** 2, -1) / s**2
    torch.testing.assert_close(ours, direct, rtol=2e-3, atol=0)


def test_soft_truncation_repository_convention(patch_score):
    """ST configs compute 0.5 * Z_tau * mean(||std s + z||^2) with t ~ g^2/sigma^2 on [tau, T], as the ST repo."""
    from configs.vp.CIFAR10 import ddpmpp_nll_st

    config = ddpmpp_nll_st.get_config()
    sde = sde_lib.get_sde(config)[0]
    model_score = shrink_score(sde, lambda t: 0.2 + 0 * t)
    patch_score(model_score)

    class Frozen(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

    model = Frozen()
    captured = {}

    def optimize(optimizer, params, step):
        captured["called"] = True

    state = dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), ema=None, step=0)
    # the patched score does not depend on the parameter: give it a gradient path
    patch_score(lambda x, t: model_score(x, t) + 0 * model.w)
    step_fn = losses.get_step_fn_from_config(config, sde, train=True, optimize_fn=optimize)
    batch = torch.randn(4, 3, 4, 4)
    state["ema"] = type("E", (), {"update": lambda self, p: None})()
    torch.manual_seed(11)
    loss = step_fn(state, batch)
    torch.manual_seed(11)
    tau = float(sde_lib.sample_truncation_time(1.0, 1e-5))
    t = sde.sample_importance_t(4, tau)
    z = torch.randn_like(batch)
    mean, std = sde.marginal_prob(batch, t)
    x_t = mean + std[:, None, None, None] * z
    residual = model_score(x_t, t) * std[:, None, None, None] + z
    expected = torch.mean(0.5 * sde.importance_normalizer(tau) * torch.mean(residual.reshape(4, -1) ** 2, -1))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    assert captured["called"]


# ----------------------------------------------------------------------------------------------------------------
# Soft Truncation repository fields: training.reconstruction_loss (with data.dequantization), ddpm_score,
# st_vp_only


def alpha_sigma_np(name: str, t: float) -> tuple[float, float]:
    """alpha(t), sigma(t) of SDES[name] from the closed forms (score_sde's parameters)."""
    if name == "vp":
        log_mean = -0.25 * t**2 * (20.0 - 0.1) - 0.5 * t * 0.1
        return math.exp(log_mean), math.sqrt(-math.expm1(2 * log_mean))
    return 1.0, 0.01 * (50.0 / 0.01) ** t


def original_reconstruction_np(name, x0, z, tau, c, lossless=False):
    """The Soft Truncation repository's reconstruction term per sample (NumPy, float64), for the shrink score
    s = -c x / sigma^2: x_tau = alpha x0 + sigma z, q_mean = x_tau / alpha + sigma^2 s / alpha, q_std = sigma /
    alpha; gaussian: q_recon - p_entropy; lossless: -sum log of the discretized decoder's bin masses."""
    from scipy.stats import norm

    alpha, sigma = alpha_sigma_np(name, tau)
    x0 = x0.reshape(x0.shape[0], -1).astype(np.float64)
    z = z.reshape(z.shape[0], -1).astype(np.float64)
    x_tau = alpha * x0 + sigma * z
    score = -c * x_tau / sigma**2
    q_mean = x_tau / alpha + sigma**2 * score / alpha
    q_std = sigma / alpha
    n_dim = x0.shape[1]
    if lossless:
        hi = norm.cdf((x0 + 1 / 255 - q_mean) / q_std)
        lo = norm.cdf((x0 - 1 / 255 - q_mean) / q_std)
        mass = np.where(x0 < -0.999, hi, np.where(x0 > 0.999, 1 - lo, hi - lo))
        return -np.log(np.maximum(mass, 1e-12)).sum(1)
    p_entropy = n_dim / 2 * (np.log(2 * np.pi) + 2 * np.log(sigma) + 1)
    q_recon = n_dim / 2 * (np.log(2 * np.pi) + 2 * np.log(q_std)) + 0.5 / q_std**2 * ((x0 - q_mean) ** 2).sum(1)
    return q_recon - p_entropy


def draws_after_main_term(seed, batch):
    """The noise of x_tau: drawn after the main term's t ~ U[tau, T] and z."""
    torch.manual_seed(seed)
    torch.rand(batch.shape[0])
    torch.randn_like(batch)
    return torch.randn_like(batch)


@pytest.mark.parametrize("name", ["vp", "ve"])
@pytest.mark.parametrize("reduce_mean", [True, False])
def test_reconstruction_loss_matches_the_original_formula(name, reduce_mean, patch_score):
    sde = SDES[name]()
    c = 0.7  # a model that under-denoises: the decoder's mean is off
    patch_score(shrink_score(sde, lambda t: c + 0 * t))
    torch.manual_seed(0)
    x0 = 0.5 * torch.randn(3, 3, 2, 2)
    tau = 0.02  # the step's truncation time (not eps) is where the decoder sits
    for factor in (0.5, 1.0):  # Soft Truncation convention: added as is; score_sde's: twice (same ratio)
        common = dict(train=False, reduce_mean=reduce_mean, continuous=True, eps=1e-5, loss_factor=factor)
        plain = losses.get_per_sample_loss_fn(sde, **common)
        with_recon = losses.get_per_sample_loss_fn(sde, reconstruction_loss=True, **common)
        torch.manual_seed(3)
        a = plain(None, x0, tau=tau)
        torch.manual_seed(3)
        b = with_recon(None, x0, tau=tau)
        z = draws_after_main_term(3, x0)
        expected = original_reconstruction_np(name, x0.numpy(), z.numpy(), tau, c)
        expected = 2 * factor * (expected / 12 if reduce_mean else expected)
        np.testing.assert_allclose((b - a).detach().numpy(), expected, rtol=2e-4, atol=1e-5)


def test_lossless_reconstruction_loss_matches_the_original_formula(patch_score):
    sde = SDES["ve"]()
    c = 0.9
    patch_score(shrink_score(sde, lambda t: c + 0 * t))
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, 256, (3, 3, 2, 2), generator=g).float() / 127.5 - 1.0  # 8-bit data in [-1, 1]
    x0[0, 0, 0] = torch.tensor([-1.0, 1.0])  # both edge levels
    tau = 0.05  # sigma = 0.015: a few bins wide
    kwargs = dict(train=False, reduce_mean=False, continuous=True, loss_factor=0.5)
    plain = losses.get_per_sample_loss_fn(sde, **kwargs)
    lossless = losses.get_per_sample_loss_fn(
        sde, reconstruction_loss=True, decoder="lossless", inverse_scaler=lambda x: (x + 1) / 2, **kwargs
    )
    torch.manual_seed(4)
    a = plain(None, x0, tau=tau)
    torch.manual_seed(4)
    b = lossless(None, x0, tau=tau)
    z = draws_after_main_term(4, x0)
    expected = original_reconstruction_np("ve", x0.numpy(), z.numpy(), tau, c, lossless=True)
    np.testing.assert_allclose((b - a).numpy(), expected, rtol=1e-4)
    with pytest.raises(ValueError, match="inverse_scaler"):
        losses.get_per_sample_loss_fn(sde, reconstruction_loss=True, decoder="lossless", **kwargs)(None, x0)


def st_config(**training):
    from configs.default_cifar10_configs import get_default_configs

    config = get_default_configs()
    config.training.sde = "vpsde"
    config.training.continuous = True
    config.training.reduce_mean = True
    config.training.loss_convention = "soft_truncation"
    config.data.centered = True
    for key, value in training.items():
        config.training[key] = value
    return config


def test_config_reconstruction_loss_and_lossless_dequantization_drive_the_step(patch_score):
    """training.reconstruction_loss and data.dequantization = 'lossless' reach the loss through the config."""
    sde = SDES["vp"]()
    c = 0.8
    patch_score(shrink_score(sde, lambda t: c + 0 * t))
    model = torch.nn.Linear(1, 1)
    state = dict(model=model, optimizer=None, step=0, ema=FakeStoreEMA())
    g = torch.Generator().manual_seed(2)
    x0 = torch.randint(0, 256, (4, 3, 2, 2), generator=g).float() / 127.5 - 1.0
    values = {}
    for recon, dequantization in ((False, "none"), (True, "none"), (True, "lossless")):
        config = st_config(reconstruction_loss=recon)
        config.data.dequantization = dequantization
        step_fn = losses.get_step_fn_from_config(config, sde, train=False)
        torch.manual_seed(6)
        values[recon, dequantization] = float(step_fn(state, x0))
    z = draws_after_main_term(6, x0).numpy()
    eps = float(st_config().training.truncation_time)  # the eval step sits at tau = eps
    for dequantization in ("none", "lossless"):
        term = original_reconstruction_np("vp", x0.numpy(), z, eps, c, lossless=dequantization == "lossless")
        assert values[True, dequantization] - values[False, "none"] == pytest.approx(np.mean(term) / 12, rel=1e-4)


class FakeStoreEMA:
    def store(self, params):
        pass

    def copy_to(self, params):
        pass

    def restore(self, params):
        pass


def test_ddpm_score_false_takes_the_output_as_the_score():
    """training.ddpm_score (VP / sub-VP): True -> score = -output / sigma (score_sde); False -> output."""
    from models import utils as mutils

    sde = SDES["vp"]()

    class Net(torch.nn.Module):
        def __init__(self, ddpm_score):
            super().__init__()
            self.config = st_config(ddpm_score=ddpm_score)

        def forward(self, x, labels):
            return x * (1 + labels.reshape(-1, 1, 1, 1) / 999)

    x = torch.randn(2, 3, 2, 2)
    t = torch.tensor([0.1, 0.6])
    std = sde.marginal_prob(torch.zeros_like(x), t)[1].reshape(-1, 1, 1, 1)
    out = x * (1 + t.reshape(-1, 1, 1, 1))
    torch.testing.assert_close(mutils.get_score_fn(sde, Net(True), continuous=True)(x, t), -out / std)
    torch.testing.assert_close(mutils.get_score_fn(sde, Net(False), continuous=True)(x, t), out)


def test_st_vp_only_keeps_ve_on_the_fixed_interval(monkeypatch):
    """training.st_vp_only: the Soft Truncation repository drew tau for VP / sub-VP only."""
    drawn = []
    monkeypatch.setattr(losses, "sample_tau", lambda st, k, eps, T=1.0: drawn.append(st) or eps)
    model = Linear(SDES["vp"]())
    for name, vp_only, expected in (("ve", True, False), ("rve", True, False), ("ve", False, True), ("vp", True, True)):
        sde = SDES[name]()
        config = st_config(st=True, st_vp_only=vp_only)
        assert losses.soft_truncation_applies(config, sde) is expected
        use_exact_score(monkeypatch)
        step_fn = losses.get_step_fn_from_config(config, sde, train=True, optimize_fn=lambda o, p, step: None)
        drawn.clear()
        step_fn(make_state(model), torch.randn(4, 5))
        assert drawn == [expected]


def test_released_rve_runs_draw_t_uniform_in_one_over_t_with_the_variance_weighting(patch_score):
    """configs/ve/CIFAR10/uncsnpp_st.py reproduces the ST repository's reciprocal VE training: t = 1 / U(1, 1/eps)
    (KS test against that closed-form CDF) and the variance weighting without a Z factor (Monte Carlo mean)."""
    from scipy import stats

    import run_lib
    from configs.ve.CIFAR10 import uncsnpp_st
    from models.ema import ExponentialMovingAverage

    config = uncsnpp_st.get_config()
    assert config.training.time_sampling == "importance" and not config.training.importance_sampling
    sde, _ = run_lib.get_corruption(config)
    eps = float(config.training.truncation_time)
    c = 0.6
    drawn = []

    def score_fn(x, t):
        drawn.append(t.detach().clone())
        return shrink_score(sde, lambda s: c + 0 * s)(x, t)

    patch_score(score_fn)
    step_fn = losses.get_step_fn_from_config(config, sde, train=False)
    torch.manual_seed(0)
    batch = torch.zeros(4000, 1, 2, 2)
    net = torch.nn.Linear(1, 1)
    state = dict(model=net, optimizer=None, ema=ExponentialMovingAverage(net.parameters(), 0.9), step=0)
    loss = float(step_fn(state, batch))
    t = torch.cat(drawn).double().numpy()
    assert t.min() >= eps and t.max() <= 1.0
    cdf = lambda s: (1.0 / eps - 1.0 / s) / (1.0 / eps - 1.0)  # noqa: E731  P(1/U <= s), U ~ U(1, 1/eps)
    assert stats.kstest(t, cdf).pvalue > 1e-3
    assert stats.kstest(t, stats.uniform(eps, 1 - eps).cdf).pvalue < 1e-6  # not uniform on [eps, 1]
    # zero data: residual = (1 - c)^2 ||z||^2; ST convention 0.5 * (0.5 * sum) -> mean 0.25 (1 - c)^2 D
    expected = 0.25 * (1 - c) ** 2 * 4
    standard_error = 0.25 * (1 - c) ** 2 * math.sqrt(2 * 4) / math.sqrt(4000)
    assert abs(loss - expected) < 4 * standard_error


def test_time_sampling_field_is_checked():
    assert losses.resolve_time_sampling("variance", "") is False
    assert losses.resolve_time_sampling("importance", "") is True
    assert losses.resolve_time_sampling("variance", "importance") is True
    with pytest.raises(ValueError, match="time_sampling"):
        losses.resolve_time_sampling("importance", "uniform")
    with pytest.raises(ValueError, match="time_sampling"):
        losses.resolve_time_sampling("variance", "log")
