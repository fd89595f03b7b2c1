"""Stochastic few-step samplers (samplers/stochastic.py) against the exact law of a Gaussian mixture.

Data: x0 ~ sum_k w_k N(m_k, s_k^2 I) (1-D and 2-D). The exact denoiser of x_t = alpha x0 + sigma z is the posterior
mean sum_k r_k(x) [m_k + alpha s_k^2 / v_k (x - alpha m_k)], v_k = alpha^2 s_k^2 + sigma^2, r_k the responsibilities,
and p_t is the mixture of N(alpha m_k, v_k I). Checks, for VP, subVP, VE and RVE:
- mean and variance of the samples at eps against p_eps, within 5 Monte-Carlo standard errors (from the mixture's
  exact second and fourth moments and the sample size);
- convergence: the 1-D Wasserstein-1 distance to p_eps (exact CDF) decreases with the step count and is small at
  the largest one (under 4 % of the std of p_eps; the Monte-Carlo floor of W1 is printed in the message);
- noise-prediction and score parametrisations of the same mixture give the same samples for the same seed;
- nfe counting, the NFE-budget helpers, determinism without noise, and argument validation.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SDE_NAMES, make_sde

from samplers import stochastic as st

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64

# 1-D mixture: asymmetric, separated modes of different widths.
W_1D = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
M_1D = torch.tensor([[-0.6], [0.3], [0.8]], dtype=F64)
S_1D = torch.tensor([0.08, 0.05, 0.15], dtype=F64)
# 2-D mixture.
W_2D = torch.tensor([0.4, 0.35, 0.25], dtype=F64)
M_2D = torch.tensor([[-0.5, 0.4], [0.6, 0.2], [0.0, -0.7]], dtype=F64)
S_2D = torch.tensor([0.1, 0.2, 0.06], dtype=F64)


SDES = {name: make_sde(name) for name in SDE_NAMES}


def logsnr_grid(sde, num_points: int, eps: float) -> torch.Tensor:
    """num_points times from T to eps uniform in lambda = log(alpha / sigma), float64."""
    ends = torch.tensor([float(sde.T), eps], dtype=F64)
    lam = torch.log(sde.alpha(ends)) - torch.log(sde.marginal_std(ends))
    ts = sde.t_from_log_snr(2.0 * torch.linspace(float(lam[0]), float(lam[1]), num_points, dtype=F64)).to(F64)
    ts[0], ts[-1] = ends[0], ends[1]
    return ts


# --------------------------------------------------------------------------------------------------
# The mixture: exact denoiser, score, noise, moments and CDF
# --------------------------------------------------------------------------------------------------


def _components(sde, t: torch.Tensor, means: torch.Tensor, stds: torch.Tensor):
    """alpha [B, 1], sigma [B, 1] and the component variances v_k = alpha^2 s_k^2 + sigma^2 [B, K]."""
    a = sde.alpha(t.to(F64)).reshape(-1, 1).to(F64)
    s = sde.marginal_std(t.to(F64)).reshape(-1, 1).to(F64)
    return a, s, a**2 * stds**2 + s**2


def _responsibilities(x, a, v, weights, means):
    """r_k(x) of p_t at x [B, d]: softmax_k(log w_k + log N(x; alpha m_k, v_k I))."""
    d = x.shape[1]
    sq = ((x[:, None, :] - a[:, :, None] * means[None]) ** 2).sum(-1)  # [B, K]
    return torch.softmax(torch.log(weights) - 0.5 * d * torch.log(v) - 0.5 * sq / v, dim=1)


def mixture_denoiser(sde, weights, means, stds):
    """Exact E[x0 | x_t = x] of the mixture (posterior mean), x of shape [B, d]."""

    def denoise_fn(x, t):
        a, _, v = _components(sde, t, means, stds)
        r = _responsibilities(x.to(F64), a, v, weights, means)
        gain = (a * stds**2 / v)[:, :, None]  # [B, K, 1]
        post = means[None] + gain * (x.to(F64)[:, None, :] - a[:, :, None] * means[None])
        return (r[:, :, None] * post).sum(1).to(x.dtype)

    return denoise_fn


def mixture_score(sde, weights, means, stds):
    """Exact score of p_t: sum_k r_k(x) (-(x - alpha m_k) / v_k)."""

    def score_fn(x, t):
        a, _, v = _components(sde, t, means, stds)
        r = _responsibilities(x.to(F64), a, v, weights, means)
        comp = -(x.to(F64)[:, None, :] - a[:, :, None] * means[None]) / v[:, :, None]
        return (r[:, :, None] * comp).sum(1).to(x.dtype)

    return score_fn


def marginal_moments(sde, t: float, weights, means, stds):
    """Per-coordinate mean, variance and fourth central moment of p_t (a mixture of N(alpha m_k, v_k))."""
    a, _, v = _components(sde, torch.tensor([t], dtype=F64), means, stds)
    mu_k, v_k = a[0] * means, v[0][:, None]  # [K, d], [K, 1]
    mean = (weights[:, None] * mu_k).sum(0)
    delta = mu_k - mean
    var = (weights[:, None] * (v_k + delta**2)).sum(0)
    mu4 = (weights[:, None] * (delta**4 + 6 * delta**2 * v_k + 3 * v_k**2)).sum(0)
    return mean, var, mu4


def mixture_cdf(sde, t: float, grid: torch.Tensor, weights, means, stds) -> torch.Tensor:
    """Exact CDF of the 1-D p_t on a grid (t = 0: the data law)."""
    if t == 0.0:
        a, v = torch.ones(1, 1, dtype=F64), (stds**2)[None]
    else:
        a, _, v = _components(sde, torch.tensor([t], dtype=F64), means, stds)
    z = (grid.reshape(-1, 1) - a * means[:, 0]) / torch.sqrt(v)
    return (weights * 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))).sum(1)


def w1_to_exact(samples: torch.Tensor, cdf) -> tuple[float, float]:
    """(W1 = int |F_n - F| dx, the Monte-Carlo floor E W1 ~ sqrt(2 / (pi n)) int sqrt(F (1 - F)) dx)."""
    x = torch.sort(samples.flatten().to(F64))[0]
    grid = torch.linspace(min(float(x[0]), -3.0) - 0.5, max(float(x[-1]), 3.0) + 0.5, 40001, dtype=F64)
    f_n = torch.searchsorted(x, grid, right=True).to(F64) / x.numel()
    f = cdf(grid)
    floor = math.sqrt(2.0 / (math.pi * x.numel())) * float(torch.trapz(torch.sqrt(f * (1 - f)), grid))
    return float(torch.trapz((f_n - f).abs(), grid)), floor


# --------------------------------------------------------------------------------------------------
# The samplers under test, each as run(sde, denoise_fn, x, ts, generator, denoise) and its NFE helper
# --------------------------------------------------------------------------------------------------


def _edm(sde, fn, x, ts, gen, denoise=False):
    return st.edm_stochastic_sample(sde, fn, x, ts, s_churn=10.0, s_noise=1.0, denoise=denoise, generator=gen)


def _dpm2(sde, fn, x, ts, gen, denoise=False):
    return st.dpm_solver_sde_sample(sde, fn, x, ts, order=2, eta=1.0, denoise=denoise, generator=gen)


def _dpm3(sde, fn, x, ts, gen, denoise=False):
    return st.dpm_solver_sde_sample(sde, fn, x, ts, order=3, eta=1.0, denoise=denoise, generator=gen)


def _ancestral(sde, fn, x, ts, gen, denoise=False):
    return st.euler_ancestral_sample(sde, fn, x, ts, eta=1.0, denoise=denoise, generator=gen)


# name: (run, num_points(nfe, denoise), NFE budgets of the convergence test, NFE of the moment test)
SAMPLERS = {
    "edm": (_edm, st.edm_stochastic_num_points, (8, 28, 98), 98),
    "dpm2": (_dpm2, st.dpm_solver_sde_num_points, (4, 12, 100), 100),
    "dpm3": (_dpm3, st.dpm_solver_sde_num_points, (4, 12, 100), 100),
    "ancestral": (_ancestral, st.euler_ancestral_num_points, (4, 12, 200), 200),
}


def run_sampler(name, sde, eps, fn, n, dim, nfe, seed=0, denoise=False):
    """Samples [n, dim] from x_T ~ p_T (float64) with the sampler `name` at the NFE budget `nfe`."""
    run, num_points, _, _ = SAMPLERS[name]
    gen = torch.Generator().manual_seed(seed)
    x = sde.prior_sampling((n, dim), generator=gen).to(F64)
    ts = logsnr_grid(sde, num_points(nfe, denoise), eps)
    return run(sde, fn, x, ts, gen, denoise)


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("sde_name", list(SDES))
def test_moments_match_the_mixture_2d(sde_name, sampler):
    """Mean and variance per coordinate of 20000 2-D samples at eps within 5 standard errors of p_eps."""
    sde, eps = SDES[sde_name]
    n = 20000
    fn = mixture_denoiser(sde, W_2D, M_2D, S_2D)
    x, _ = run_sampler(sampler, sde, eps, fn, n, 2, SAMPLERS[sampler][3])
    mean, var, mu4 = marginal_moments(sde, eps, W_2D, M_2D, S_2D)
    se_mean = torch.sqrt(var / n)
    se_var = torch.sqrt((mu4 - var**2) / n)
    got_mean, got_var = x.mean(0), x.var(0)
    assert torch.all((got_mean - mean).abs() < 5 * se_mean), (got_mean, mean, se_mean)
    assert torch.all((got_var - var).abs() < 5 * se_var), (got_var, var, se_var)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("sde_name", list(SDES))
def test_converges_to_the_exact_law_1d(sde_name, sampler):
    """W1 to p_eps decreases with the NFE budget and is under 4 % of std(p_eps) at the largest budget."""
    sde, eps = SDES[sde_name]
    fn = mixture_denoiser(sde, W_1D, M_1D, S_1D)
    _, var, _ = marginal_moments(sde, eps, W_1D, M_1D, S_1D)
    budgets = SAMPLERS[sampler][2]
    distances, floor = [], 0.0
    for nfe in budgets:
        x, _ = run_sampler(sampler, sde, eps, fn, 10000, 1, nfe)
        w1, floor = w1_to_exact(x, lambda g: mixture_cdf(sde, eps, g, W_1D, M_1D, S_1D))
        distances.append(w1)
    message = f"W1 at NFE {budgets}: {distances} (Monte-Carlo floor {floor:.4f})"
    assert distances[0] > distances[1] > distances[2], message
    assert distances[-1] < 0.04 * math.sqrt(float(var[0])), message


@pytest.mark.parametrize("sampler", ["edm", "dpm2", "ancestral"])
def test_final_denoise_reaches_the_data_law(sampler):
    """With denoise, the samples approach the data law p_0 (VP): W1 < 3 x Monte-Carlo floor + sigma_hat(eps)."""
    sde, eps = SDES["vp"]
    fn = mixture_denoiser(sde, W_1D, M_1D, S_1D)
    x, nfe = run_sampler(sampler, sde, eps, fn, 10000, 1, SAMPLERS[sampler][3], denoise=True)
    w1, floor = w1_to_exact(x, lambda g: mixture_cdf(sde, 0.0, g, W_1D, M_1D, S_1D))
    t_eps = torch.tensor([eps], dtype=F64)
    sigma_hat = float(sde.marginal_std(t_eps)[0] / sde.alpha(t_eps)[0])
    assert w1 < 3 * floor + sigma_hat, (w1, floor, sigma_hat)
    assert nfe <= SAMPLERS[sampler][3]


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("sde_name", list(SDES))
def test_noise_and_score_parametrisations_give_the_same_samples(sde_name, sampler):
    """x0 = (x - sigma eps) / alpha from a noise-prediction net and x0 = (x + sigma^2 s) / alpha from a score net
    (both exact for the mixture) give the same samples as the posterior mean for the same seed."""
    sde, eps = SDES[sde_name]
    score = mixture_score(sde, W_2D, M_2D, S_2D)

    def eps_net(x, t):  # the noise prediction of the exact model: -sigma score
        return -sde.marginal_std(t).reshape(-1, 1).to(x.dtype) * score(x, t)

    def from_eps(x, t):
        return (x - sde.marginal_std(t).reshape(-1, 1) * eps_net(x, t)) / sde.alpha(t).reshape(-1, 1)

    def from_score(x, t):
        return (x + sde.marginal_std(t).reshape(-1, 1) ** 2 * score(x, t)) / sde.alpha(t).reshape(-1, 1)

    outs = [run_sampler(sampler, sde, eps, fn, 500, 2, 12, seed=3)[0] for fn in (from_eps, from_score)]
    direct, _ = run_sampler(sampler, sde, eps, mixture_denoiser(sde, W_2D, M_2D, S_2D), 500, 2, 12, seed=3)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(outs[1], direct, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("denoise", [False, True])
@pytest.mark.parametrize("nfe", [5, 10, 20, 35, 50])
def test_nfe_counts_and_budget_helpers(nfe, denoise):
    """The returned nfe counts the denoiser calls and stays within the budget the helper was given."""
    sde, eps = SDES["vp"]
    calls = []
    exact = mixture_denoiser(sde, W_1D, M_1D, S_1D)

    def fn(x, t):
        calls.append(1)
        return exact(x, t)

    expected = {"edm": 2 * ((nfe - denoise) // 2) + denoise, "dpm2": nfe, "ancestral": nfe}
    for name, want in expected.items():
        calls.clear()
        _, got = run_sampler(name, sde, eps, fn, 8, 1, nfe, denoise=denoise)
        assert got == len(calls) == want, (name, got, len(calls), want)


def test_without_noise_the_samplers_are_deterministic():
    """s_churn = 0 (EDM) and eta = 0 (DPM-Solver++ SDE, Euler ancestral) ignore the generator; noise changes it."""
    sde, eps = SDES["ve"]
    fn = mixture_denoiser(sde, W_1D, M_1D, S_1D)
    x = sde.prior_sampling((64, 1), generator=torch.Generator().manual_seed(0)).to(F64)
    ts = logsnr_grid(sde, 11, eps)
    runs = {
        "edm": lambda g, noisy: st.edm_stochastic_sample(sde, fn, x, ts, s_churn=10.0 * noisy, generator=g),
        "dpm": lambda g, noisy: st.dpm_solver_sde_sample(sde, fn, x, ts, eta=float(noisy), generator=g),
        "anc": lambda g, noisy: st.euler_ancestral_sample(sde, fn, x, ts, eta=float(noisy), generator=g),
    }
    for name, run in runs.items():
        a = run(torch.Generator().manual_seed(1), False)[0]
        b = run(torch.Generator().manual_seed(2), False)[0]
        assert torch.equal(a, b), name
        c = run(torch.Generator().manual_seed(1), True)[0]
        d = run(torch.Generator().manual_seed(2), True)[0]
        assert not torch.allclose(c, d), name


@pytest.mark.parametrize("sde_name", list(SDES))
def test_noise_free_limits_converge_at_their_order(sde_name):
    """Without noise (eta = 0, s_churn = 0) the samplers solve the probability-flow ODE; for Gaussian data N(m,
    s^2) its flow is x_hat(eps) = m + sqrt((s^2 + sigma_hat_eps^2) / (s^2 + sigma_hat_T^2)) (x_hat_T - m). The
    max error ratio between 32 and 64 steps must show the order: DDIM (Euler ancestral, eta = 0) ~2, EDM Heun
    and DPM-Solver++(2M) ~4, DPM-Solver++(3M) >= 8 (it is ~15 here)."""
    sde, eps = SDES[sde_name]
    weights, means, stds = torch.ones(1, dtype=F64), torch.tensor([[0.3]], dtype=F64), torch.tensor([0.2], dtype=F64)
    fn = mixture_denoiser(sde, weights, means, stds)
    ends = torch.tensor([1.0, eps], dtype=F64)
    a = sde.alpha(ends).tolist()
    sh = (sde.marginal_std(ends) / sde.alpha(ends)).tolist()
    x = torch.linspace(-2.0, 2.0, 9, dtype=F64).reshape(-1, 1) * a[0] * sh[0]
    exact = a[1] * (0.3 + math.sqrt((0.04 + sh[1] ** 2) / (0.04 + sh[0] ** 2)) * (x / a[0] - 0.3))
    runs = {
        "ddim": (lambda ts: st.euler_ancestral_sample(sde, fn, x, ts, eta=0.0, denoise=False), (1.6, 2.5)),
        "heun": (lambda ts: st.edm_stochastic_sample(sde, fn, x, ts, s_churn=0.0, denoise=False), (3.0, 5.0)),
        "dpm2": (lambda ts: st.dpm_solver_sde_sample(sde, fn, x, ts, order=2, eta=0.0), (3.0, 5.0)),
        "dpm3": (lambda ts: st.dpm_solver_sde_sample(sde, fn, x, ts, order=3, eta=0.0), (7.0, 40.0)),
    }
    for name, (run, (low, high)) in runs.items():
        errors = [float((run(logsnr_grid(sde, n + 1, eps))[0] - exact).abs().max()) for n in (32, 64)]
        ratio = errors[0] / errors[1]
        assert low < ratio < high, (name, errors, ratio)


def test_edm_churn_gamma():
    """gamma_i = min(s_churn / N, sqrt(2) - 1) inside [s_tmin, s_tmax], 0 outside."""
    assert st.edm_churn_gamma(1.0, 10, 2.0, 0.05, 50.0) == pytest.approx(0.2)
    assert st.edm_churn_gamma(1.0, 10, 40.0, 0.05, 50.0) == pytest.approx(math.sqrt(2) - 1)
    assert st.edm_churn_gamma(0.01, 10, 40.0, 0.05, 50.0) == 0.0
    assert st.edm_churn_gamma(80.0, 10, 40.0, 0.05, 50.0) == 0.0


def test_ancestral_levels_preserve_the_variance():
    """sigma_down^2 + sigma_up^2 = sigma_next^2; eta = 1: sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) /
    sigma^2 (DDPM's posterior variance in the VE variables)."""
    down, up = st.ancestral_levels(2.0, 1.0, 1.0)
    assert down**2 + up**2 == pytest.approx(1.0)
    assert up**2 == pytest.approx(1.0 * (4.0 - 1.0) / 4.0)
    assert st.ancestral_levels(2.0, 1.0, 0.0) == (1.0, 0.0)


def test_invalid_arguments_name_the_config_field():
    """Clear errors that name config.sampling.<field>."""
    sde, eps = SDES["vp"]
    fn = mixture_denoiser(sde, W_1D, M_1D, S_1D)
    x = torch.zeros(4, 1, dtype=F64)
    ts = logsnr_grid(sde, 5, eps)
    with pytest.raises(ValueError, match="config.sampling.s_churn"):
        st.edm_stochastic_sample(sde, fn, x, ts, s_churn=-1.0)
    with pytest.raises(ValueError, match="config.sampling.s_tmin"):
        st.edm_stochastic_sample(sde, fn, x, ts, s_tmin=-0.1)
    with pytest.raises(ValueError, match="config.sampling.s_tmax"):
        st.edm_stochastic_sample(sde, fn, x, ts, s_tmin=1.0, s_tmax=0.5)
    with pytest.raises(ValueError, match="config.sampling.s_noise"):
        st.edm_stochastic_sample(sde, fn, x, ts, s_noise=0.0)
    with pytest.raises(ValueError, match="config.sampling.sde_eta"):
        st.euler_ancestral_sample(sde, fn, x, ts, eta=-0.5)
    with pytest.raises(ValueError, match="config.sampling.sde_eta"):
        st.dpm_solver_sde_sample(sde, fn, x, ts, eta=float("nan"))
    with pytest.raises(ValueError, match="config.sampling.dpm_solver_order"):
        st.dpm_solver_sde_sample(sde, fn, x, ts, order=4)
    with pytest.raises(ValueError, match="strictly decreasing"):
        st.euler_ancestral_sample(sde, fn, x, torch.flip(ts, [0]))
    with pytest.raises(ValueError, match="truncation_time"):
        st.euler_ancestral_sample(sde, fn, x, torch.tensor([1.0, 0.0], dtype=F64))
    with pytest.raises(ValueError, match="at least 2"):
        st.dpm_solver_sde_sample(sde, fn, x, ts[:1])
    for helper, too_small in (
        (st.edm_stochastic_num_points, 2),
        (st.dpm_solver_sde_num_points, 0),
        (st.euler_ancestral_num_points, 1),
    ):
        with pytest.raises(ValueError, match="config.sampling.nfe"):
            helper(too_small)
