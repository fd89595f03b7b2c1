"""Tests for sde_lib: closed forms vs an independent NumPy implementation of papers.md section 1, Monte
Carlo simulation of the forward SDEs, finite-difference consistency, importance sampling and Soft Truncation.
"""

import math

import ml_collections
import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import torch

import sde_lib

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------------------------------------
# Independent NumPy reference (papers.md section 1 table)
# ------------------------------------------------------------------------------------------------------------

VP_ARGS = dict(beta_min=0.1, beta_max=20.0)
VE_ARGS = dict(sigma_min=0.01, sigma_max=50.0)
RVE_ARGS = dict(sigma_min=1e-3, sigma_max=50.0, eps=1e-5)


def make(name, N=1000):
    if name == "vp":
        return sde_lib.VPSDE(N=N, **VP_ARGS)
    if name == "subvp":
        return sde_lib.subVPSDE(N=N, **VP_ARGS)
    if name == "ve":
        return sde_lib.VESDE(N=N, **VE_ARGS)
    return sde_lib.RVESDE(N=N, **RVE_ARGS)


def np_coeffs(name, t):
    """Return alpha, sigma, g^2 and the drift coefficient f (drift = f x) from the papers.md table."""
    t = np.asarray(t, dtype=np.float64)
    if name in ("vp", "subvp"):
        b0, b1 = VP_ARGS["beta_min"], VP_ARGS["beta_max"]
        beta = b0 + t * (b1 - b0)
        B = b0 * t + (b1 - b0) * t**2 / 2
        alpha = np.exp(-B / 2)
        if name == "vp":
            return alpha, np.sqrt(1 - np.exp(-B)), beta, -beta / 2
        return alpha, 1 - np.exp(-B), beta * (1 - np.exp(-2 * B)), -beta / 2
    if name == "ve":
        smin, smax = VE_ARGS["sigma_min"], VE_ARGS["sigma_max"]
        sigma = smin * (smax / smin) ** t
        return np.ones_like(t), sigma, 2 * sigma**2 * np.log(smax / smin), np.zeros_like(t)
    smin, smax, eps = RVE_ARGS["sigma_min"], RVE_ARGS["sigma_max"], RVE_ARGS["eps"]
    sigma = smax * (smin / smax) ** ((1 / t - 1) / (1 / eps - 1))
    g2 = sigma**2 * 2 * np.log(smax / smin) / ((1 / eps - 1) * t**2)
    return np.ones_like(t), sigma, g2, np.zeros_like(t)


ALL = ["vp", "subvp", "ve", "rve"]
T_GRID = {
    "vp": [1e-5, 1e-3, 0.05, 0.3, 0.7, 1.0],
    "subvp": [1e-5, 1e-3, 0.05, 0.3, 0.7, 1.0],
    "ve": [1e-5, 1e-3, 0.05, 0.3, 0.7, 1.0],
    "rve": [1e-5, 3e-5, 1e-4, 1e-3, 0.05, 0.7, 1.0],
}


# ------------------------------------------------------------------------------------------------------------
# Coefficients and marginals
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_coefficients_match_numpy_table(name):
    sde = make(name)
    t = torch.tensor(T_GRID[name], dtype=F64)
    alpha, sigma, g2, f = np_coeffs(name, t.numpy())
    np.testing.assert_allclose(sde.alpha(t).numpy(), alpha, rtol=1e-12)
    np.testing.assert_allclose(sde.marginal_std(t).numpy(), sigma, rtol=1e-10)
    np.testing.assert_allclose(sde.diffusion_sq(t).numpy(), g2, rtol=1e-10)
    x = torch.randn(len(t), 3, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    mean, std = sde.marginal_prob(x, t)
    np.testing.assert_allclose(mean.numpy(), alpha[:, None, None, None] * x.numpy(), rtol=1e-12)
    np.testing.assert_allclose(std.numpy(), sigma, rtol=1e-10)
    drift, diffusion = sde.sde(x, t)
    np.testing.assert_allclose(drift.numpy(), f[:, None, None, None] * x.numpy(), rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(diffusion.numpy() ** 2, g2, rtol=1e-10)
    np.testing.assert_allclose(sde.log_snr(t).numpy(), np.log(alpha**2 / sigma**2), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(sde.likelihood_weight_ratio(t).numpy(), g2 / sigma**2, rtol=1e-9)


def _euler_maruyama(sde, grid, x, checkpoints, gen):
    """Simulate dx = f dt + g dw on the given time grid; return x at the requested grid indices."""
    out = {}
    P = x.shape[0]
    for i in range(len(grid) - 1):
        t = torch.full((P,), float(grid[i]), dtype=F64)
        dt = float(grid[i + 1] - grid[i])
        drift, diffusion = sde.sde(x, t)
        x = x + drift * dt + diffusion[:, None] * math.sqrt(dt) * torch.randn(x.shape, generator=gen, dtype=F64)
        if i + 1 in checkpoints:
            out[i + 1] = x.clone()
    return out


@pytest.mark.parametrize("name", ALL)
def test_euler_maruyama_matches_marginal_prob(name):
    """20000 paths (10000 for each of two x0 values): sample mean and std at 4 times match marginal_prob.

    Tolerance: 5 Monte Carlo standard errors plus a 1% allowance for the Euler-Maruyama bias of 1000 steps
    (at most about 0.5% in std: the per-step change of log sigma^2 is below 1.7%).
    VE starts at t=0 from N(x0, s_min^2) (the marginal the VE convention assigns to t=0); RVE starts at eps
    from N(x0, s_min^2) on 1500 steps uniform in log sigma^2(t) + log t, so that every step changes both
    sigma^2 and t by less than 2.3%.
    """
    sde = make(name)
    gen = torch.Generator().manual_seed(1234)
    P, n = 10000, 1000
    x0 = torch.tensor([1.5, -0.7], dtype=F64)
    if name == "rve":
        eps = RVE_ARGS["eps"]
        n = 1500
        t_dense = np.geomspace(eps, 1.0, 200001)
        u_dense = np.log(np_coeffs("rve", t_dense)[1] ** 2) + np.log(t_dense)
        grid = np.interp(np.linspace(u_dense[0], u_dense[-1], n + 1), u_dense, t_dense)
        grid[0], grid[-1] = eps, 1.0
        x = x0 + RVE_ARGS["sigma_min"] * torch.randn(P, 2, generator=gen, dtype=F64)
    else:
        grid = np.linspace(0.0, 1.0, n + 1)
        x = x0.expand(P, 2).clone()
        if name == "ve":
            x = x + VE_ARGS["sigma_min"] * torch.randn(P, 2, generator=gen, dtype=F64)
    checkpoints = [n // 20, n // 4, n // 2, n]
    sims = _euler_maruyama(sde, grid, x, set(checkpoints), gen)
    for j in checkpoints:
        t = torch.full((1,), float(grid[j]), dtype=F64)
        mean, std = sde.marginal_prob(x0[None], t)
        xs = sims[j]
        se_mean = std.item() / math.sqrt(P)
        assert torch.all((xs.mean(0) - mean[0]).abs() < 5 * se_mean + 0.01 * mean[0].abs()), (name, grid[j])
        rel_std = (xs.std(0) / std - 1).abs()
        assert torch.all(rel_std < 5 / math.sqrt(2 * P) + 0.01), (name, grid[j], rel_std)


@pytest.mark.parametrize("name", ALL)
def test_diffusion_sq_equals_dsigma2_minus_2f_sigma2(name):
    """g^2 = d sigma^2/dt - 2 f sigma^2 = sigma^2 (d log sigma^2/dt - 2 f).

    Central finite differences of log sigma^2 (smooth for every SDE) in float64, h = 1e-4 t, rel. tol 1e-6.
    """
    sde = make(name)
    t = torch.tensor(T_GRID[name][1:-1] + [0.999], dtype=F64)
    h = 1e-4 * t
    log_s2 = lambda tt: 2 * torch.log(sde.marginal_std(tt))  # noqa: E731
    dlog_s2 = (log_s2(t + h) - log_s2(t - h)) / (2 * h)
    drift, _ = sde.sde(torch.ones_like(t)[:, None], t)
    f = drift[:, 0]
    expected = sde.marginal_std(t) ** 2 * (dlog_s2 - 2 * f)
    np.testing.assert_allclose(sde.diffusion_sq(t).numpy(), expected.numpy(), rtol=1e-6)
    # The alpha of marginal_prob follows the drift: d log alpha / dt = f.
    dlog_alpha = (torch.log(sde.alpha(t + h)) - torch.log(sde.alpha(t - h))) / (2 * h)
    np.testing.assert_allclose(dlog_alpha.numpy(), f.numpy(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ALL)
def test_log_snr_inverse_round_trip(name):
    sde = make(name)
    t = torch.tensor(T_GRID[name], dtype=F64)
    lam = sde.log_snr(t)
    np.testing.assert_allclose(sde.t_from_log_snr(lam).numpy(), t.numpy(), rtol=1e-7)
    # The generic vectorised bisection of the base class agrees with the closed form.
    t_bisect = sde_lib.SDE.t_from_log_snr(sde, lam)
    np.testing.assert_allclose(t_bisect.numpy(), t.numpy(), rtol=1e-7)
    # log_snr is strictly decreasing.
    assert torch.all(lam[1:] < lam[:-1])


def test_prior_logp_matches_scipy():
    gen = torch.Generator().manual_seed(0)
    for name in ALL:
        sde = make(name)
        z = sde.prior_sampling((3, 2, 4, 4), generator=gen).to(F64)
        scale = 1.0 if name in ("vp", "subvp") else 50.0
        expected = scipy.stats.norm.logpdf(z.numpy(), scale=scale).reshape(3, -1).sum(1)
        np.testing.assert_allclose(sde.prior_logp(z).numpy(), expected, rtol=1e-10)


def test_prior_sampling_scale_and_generator():
    for name in ALL:
        sde = make(name)
        a = sde.prior_sampling((20000,), generator=torch.Generator().manual_seed(3))
        b = sde.prior_sampling((20000,), generator=torch.Generator().manual_seed(3))
        assert torch.equal(a, b)
        scale = 1.0 if name in ("vp", "subvp") else 50.0
        # Std of N(0, s^2) samples: relative standard error 1/sqrt(2n) = 0.5%; tolerance 5 SE.
        assert abs(a.std().item() / scale - 1) < 0.025


# ------------------------------------------------------------------------------------------------------------
# Reverse SDE with the exact score of Gaussian data N(mu, s^2 I)
# ------------------------------------------------------------------------------------------------------------

MU, S0 = 0.8, 0.3


def gaussian_score(sde):
    def score_fn(x, t):
        mean, std = sde.marginal_prob(torch.full_like(x, MU), t)
        a = sde.alpha(t).reshape(-1, *[1] * (x.ndim - 1))
        var = a**2 * S0**2 + std.reshape(-1, *[1] * (x.ndim - 1)) ** 2
        return -(x - mean) / var

    return score_fn


@pytest.mark.parametrize("name", ALL)
def test_reverse_drift_and_diffusion(name):
    sde = make(name)
    t = torch.tensor(T_GRID[name][1:], dtype=F64)
    x = torch.randn(len(t), 1, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(5))
    alpha, sigma, g2, f = np_coeffs(name, t.numpy())
    var = alpha**2 * S0**2 + sigma**2
    score = -(x.numpy() - (alpha * MU)[:, None, None, None]) / var[:, None, None, None]
    fx = f[:, None, None, None] * x.numpy()
    for pf, coef in ((False, 1.0), (True, 0.5)):
        rsde = sde.reverse(gaussian_score(sde), probability_flow=pf)
        assert rsde.T == 1 and rsde.N == sde.N and isinstance(rsde, type(sde))
        drift, diffusion = rsde.sde(x, t)
        np.testing.assert_allclose(drift.numpy(), fx - coef * g2[:, None, None, None] * score, rtol=1e-9)
        np.testing.assert_allclose(diffusion.numpy(), 0.0 if pf else np.sqrt(g2), rtol=1e-10)
        # The reverse object keeps the forward closed forms.
        np.testing.assert_allclose(rsde.marginal_std(t).numpy(), sigma, rtol=1e-10)


@pytest.mark.parametrize(
    "name,t_start,t_end", [("vp", 1.0, 0.01), ("subvp", 1.0, 0.01), ("ve", 1.0, 0.01), ("rve", 1e-3, 5e-5)]
)
def test_probability_flow_transports_gaussian_marginals(name, t_start, t_end):
    """With the exact score, the PF ODE maps p_t to p_t' by the affine map m' + (x - m) S'/S (Gaussian data).

    Integrated with RK4, 400 steps geometric in t, float64; tolerance 1e-5 relative to S'.
    """
    sde = make(name)
    rsde = sde.reverse(gaussian_score(sde), probability_flow=True)
    x = torch.linspace(-3, 3, 7, dtype=F64)[:, None]
    grid = np.geomspace(t_start, t_end, 401)

    def f(xx, tt):
        return rsde.sde(xx, torch.full((xx.shape[0],), tt, dtype=F64))[0]

    y = x.clone()
    for i in range(400):
        t0, h = grid[i], grid[i + 1] - grid[i]
        k1 = f(y, t0)
        k2 = f(y + h / 2 * k1, t0 + h / 2)
        k3 = f(y + h / 2 * k2, t0 + h / 2)
        k4 = f(y + h * k3, t0 + h)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    a0, s0, _, _ = np_coeffs(name, t_start)
    a1, s1, _, _ = np_coeffs(name, t_end)
    S_start, S_end = np.sqrt(a0**2 * S0**2 + s0**2), np.sqrt(a1**2 * S0**2 + s1**2)
    expected = a1 * MU + (x.numpy() - a0 * MU) * S_end / S_start
    np.testing.assert_allclose(y.numpy(), expected, atol=1e-5 * S_end)


# ------------------------------------------------------------------------------------------------------------
# Discretisations and discrete attributes
# ------------------------------------------------------------------------------------------------------------


def test_vp_discrete_attributes_and_ddpm_discretize():
    N = 50
    sde = make("vp", N)
    betas = np.linspace(0.1 / N, 20.0 / N, N)
    np.testing.assert_allclose(sde.discrete_betas.numpy(), betas, rtol=1e-6)
    np.testing.assert_allclose(sde.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-5)
    np.testing.assert_allclose(sde.sqrt_alphas_cumprod.numpy(), np.sqrt(np.cumprod(1 - betas)), rtol=1e-5)
    np.testing.assert_allclose(sde.sqrt_1m_alphas_cumprod.numpy(), np.sqrt(1 - np.cumprod(1 - betas)), rtol=1e-4)
    t = torch.tensor([0.0, 0.33, 0.999, 1.0])
    x = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    f, G = sde.discretize(x, t)
    idx = (t.numpy() * (N - 1)).astype(int)
    np.testing.assert_allclose(
        f.numpy(), (np.sqrt(1 - betas[idx]) - 1)[:, None, None, None] * x.numpy(), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(G.numpy(), np.sqrt(betas[idx]), rtol=1e-5)
    # Reverse discretisation: rev_f = f - G^2 score.
    score_fn = gaussian_score(sde)
    rf, rG = sde.reverse(score_fn).discretize(x, t)
    np.testing.assert_allclose(rf.numpy(), (f - G[:, None, None, None] ** 2 * score_fn(x, t)).numpy(), rtol=1e-6)
    assert torch.equal(rG, G)
    rf_pf, rG_pf = sde.reverse(score_fn, probability_flow=True).discretize(x, t)
    assert torch.all(rG_pf == 0)
    np.testing.assert_allclose(
        rf_pf.numpy(), (f - 0.5 * G[:, None, None, None] ** 2 * score_fn(x, t)).numpy(), rtol=1e-6
    )


def test_ve_and_rve_smld_discretize():
    N = 40
    ve, rve = make("ve", N), make("rve", N)
    sig_ve = np.exp(np.linspace(np.log(0.01), np.log(50.0), N))
    np.testing.assert_allclose(ve.discrete_sigmas.numpy(), sig_ve, rtol=1e-5)
    grid = np.maximum(np.linspace(0, 1, N), RVE_ARGS["eps"])
    sig_rve = np_coeffs("rve", grid)[1]
    np.testing.assert_allclose(rve.discrete_sigmas.numpy(), sig_rve, rtol=1e-5)
    assert rve.discrete_sigmas[0].item() == pytest.approx(1e-3) and rve.discrete_sigmas[-1].item() == 50.0
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    # VE: score_sde's SMLD step on discrete_sigmas, indexed by t (N - 1)
    t = torch.tensor([1e-5, 0.5 / (N - 1), 1.2 / (N - 1), 0.5, 1.0])
    idx = (t.numpy() * (N - 1)).astype(int)
    f, G = ve.discretize(x, t)
    prev = np.where(idx == 0, 0.0, sig_ve[np.maximum(idx - 1, 0)])
    assert torch.all(f == 0)
    np.testing.assert_allclose(G.numpy(), np.sqrt(sig_ve[idx] ** 2 - prev**2), rtol=1e-5)  # float32 sigmas
    # RVE: the SMLD step between consecutive times of its sampler grid, uniform in 1/t, to sigma = 0 at the end
    eps = RVE_ARGS["eps"]
    inv = np.linspace(1.0, 1.0 / eps, N)
    ts = 1.0 / inv
    prev_t = np.append(ts[1:], 0.0)
    sig = np_coeffs("rve", ts)[1]
    sig_prev = np.append(np_coeffs("rve", prev_t[:-1])[1], 0.0)
    f, G = rve.discretize(x[:1].expand(N, 3), torch.tensor(ts, dtype=torch.float64))
    assert torch.all(f == 0)
    np.testing.assert_allclose(G.numpy(), np.sqrt(sig**2 - sig_prev**2), rtol=1e-9)
    np.testing.assert_allclose(rve.time_grid(N, eps).numpy(), ts, rtol=1e-6)


def test_with_num_steps_rediscretises_without_touching_the_sde():
    """with_num_steps(n) is the n-step discretisation (DDPM's betas linspace(b_min/n, b_max/n, n), SMLD's n
    geometric sigmas); the original keeps its N and the continuous coefficients are the same."""
    vp = make("vp", 1000)
    vp50 = vp.with_num_steps(50)
    assert vp.N == 1000 and vp50.N == 50 and vp.discrete_betas.shape == (1000,)
    np.testing.assert_allclose(vp50.discrete_betas.numpy(), np.linspace(0.1 / 50, 20.0 / 50, 50), rtol=1e-6)
    t = torch.tensor([0.3, 0.7], dtype=F64)
    assert torch.equal(vp50.marginal_std(t), vp.marginal_std(t))
    ve10 = make("ve", 1000).with_num_steps(10)
    np.testing.assert_allclose(ve10.discrete_sigmas.numpy(), np.geomspace(0.01, 50.0, 10), rtol=1e-5)
    rve = make("rve", 1000).with_num_steps(20, eps=1e-3)
    assert rve.grid_eps == 1e-3 and float(rve.previous_time(rve.time_grid(20, 1e-3))[-2]) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="num_steps"):
        vp.with_num_steps(0)


def test_subvp_euler_discretize():
    N = 100
    sde = make("subvp", N)
    t = torch.tensor([0.01, 0.5, 1.0], dtype=F64)
    x = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    _, _, g2, fc = np_coeffs("subvp", t.numpy())
    f, G = sde.discretize(x, t)
    np.testing.assert_allclose(f.numpy(), fc[:, None] * x.numpy() / N, rtol=1e-10)
    np.testing.assert_allclose(G.numpy(), np.sqrt(g2 / N), rtol=1e-10)


# ------------------------------------------------------------------------------------------------------------
# Importance sampling of t (papers.md section 2)
# ------------------------------------------------------------------------------------------------------------


def _ratio_np(name, t):
    _, sigma, g2, _ = np_coeffs(name, t)
    return g2 / sigma**2


def _quad_ratio(name, a, b):
    """int_a^b g^2/sigma^2 dt by adaptive quadrature in log t (the integrand is ~1/t or 1/t^2 near 0)."""
    val, _ = scipy.integrate.quad(lambda u: _ratio_np(name, np.exp(u)) * np.exp(u), np.log(a), np.log(b), limit=200)
    return val


@pytest.mark.parametrize("name", ALL)
def test_iw_antiderivative_derivative_and_inverse(name):
    sde = make(name)
    t = torch.tensor(T_GRID[name][1:-1] + [0.999], dtype=F64)
    h = 1e-6 * t
    dA = (sde.iw_antiderivative(t + h) - sde.iw_antiderivative(t - h)) / (2 * h)
    np.testing.assert_allclose(dA.numpy(), _ratio_np(name, t.numpy()), rtol=1e-6)
    t_all = torch.tensor(T_GRID[name], dtype=F64)
    np.testing.assert_allclose(
        sde.iw_antiderivative_inverse(sde.iw_antiderivative(t_all)).numpy(), t_all.numpy(), rtol=1e-9
    )


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("tau", [1e-5, 1e-3, 0.1])
def test_importance_normalizer_and_cdf_match_quadrature(name, tau):
    sde = make(name)
    Z = sde.importance_normalizer(tau)
    assert isinstance(Z, float)
    np.testing.assert_allclose(Z, _quad_ratio(name, tau, 1.0), rtol=1e-7)
    Zt = sde.importance_normalizer(torch.tensor(tau, dtype=F64))
    assert isinstance(Zt, torch.Tensor) and Zt.ndim == 0
    np.testing.assert_allclose(Zt.item(), Z, rtol=1e-12)
    ts = np.geomspace(tau, 1.0, 6)[1:-1]
    cdf = sde.importance_cdf(torch.tensor(ts, dtype=F64), tau).numpy()
    expected = np.array([_quad_ratio(name, tau, s) for s in ts]) / Z
    np.testing.assert_allclose(cdf, expected, rtol=1e-6)
    edges = sde.importance_cdf(torch.tensor([0.0, tau, 1.0], dtype=F64), tau)
    np.testing.assert_allclose(edges.numpy(), [0.0, 0.0, 1.0], atol=1e-12)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("tau", [1e-5, 1e-3, 0.1])
def test_importance_samples_pass_ks(name, tau):
    """Kolmogorov-Smirnov test of 4000 draws against importance_cdf; reject at p < 1e-3 (fixed seed)."""
    sde = make(name)
    t = sde.sample_importance_t(4000, tau, generator=torch.Generator().manual_seed(11), dtype=F64)
    assert t.shape == (4000,) and t.dtype == F64
    assert torch.all(t >= tau) and torch.all(t <= 1.0) and torch.isfinite(t).all()
    res = scipy.stats.kstest(t.numpy(), lambda s: sde.importance_cdf(torch.as_tensor(s, dtype=F64), tau).numpy())
    assert res.pvalue > 1e-3, res
    # A float and a 0-dim tensor tau give the same draws; float32 is the default output dtype.
    t2 = sde.sample_importance_t(4000, torch.tensor(tau), generator=torch.Generator().manual_seed(11))
    assert t2.dtype == torch.float32
    np.testing.assert_allclose(t2.numpy(), t.numpy(), rtol=1e-6)


def test_importance_sampling_is_not_uniform():
    """Sanity check of the KS test's power: VP draws near tau are far more frequent than under U[tau, T]."""
    sde = make("vp")
    t = sde.sample_importance_t(4000, 1e-5, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert scipy.stats.kstest(t.numpy(), scipy.stats.uniform(1e-5, 1 - 1e-5).cdf).pvalue < 1e-10
    # Closed form median check: the median t solves A(t) = (A(tau) + A(T)) / 2.
    med = np.median(t.numpy())
    assert abs(sde.importance_cdf(torch.tensor([med], dtype=F64), 1e-5).item() - 0.5) < 0.03


def test_importance_sampling_rejects_bad_tau():
    sde = make("vp")
    for bad in (0.0, -1e-3, 1.0, 2.0):
        with pytest.raises(ValueError, match="truncation_time"):
            sde.sample_importance_t(4, bad)


# ------------------------------------------------------------------------------------------------------------
# Soft Truncation: P_k(tau) ~ tau^-k on [eps, T]
# ------------------------------------------------------------------------------------------------------------

K_VALUES = [0.0, 0.9, 1.0, 2.0, 5.0]


@pytest.mark.parametrize("k", K_VALUES)
def test_truncation_sampler_ks(k):
    eps = 1e-5
    tau = sde_lib.sample_truncation_time(k, eps, size=(4000,), generator=torch.Generator().manual_seed(7), dtype=F64)
    assert torch.all(tau >= eps) and torch.all(tau <= 1.0)
    res = scipy.stats.kstest(tau.numpy(), lambda s: sde_lib.truncation_cdf(torch.as_tensor(s), k, eps).numpy())
    assert res.pvalue > 1e-3, res
    if k == 0.0:
        assert scipy.stats.kstest(tau.numpy(), scipy.stats.uniform(eps, 1 - eps).cdf).pvalue > 1e-3


@pytest.mark.parametrize("k", K_VALUES)
def test_truncation_cdf_matches_quadrature_and_density(k):
    """F_k from tau^-k quadrature (independent), and dF/dtau proportional to tau^-k (finite differences)."""
    eps, T = 1e-4, 1.0
    norm = scipy.integrate.quad(lambda u: np.exp(u) ** (1 - k), np.log(eps), np.log(T))[0]
    taus = np.geomspace(eps, T, 7)[1:-1]
    expected = [scipy.integrate.quad(lambda u: np.exp(u) ** (1 - k), np.log(eps), np.log(s))[0] / norm for s in taus]
    cdf = sde_lib.truncation_cdf(torch.tensor(taus, dtype=F64), k, eps, T).numpy()
    np.testing.assert_allclose(cdf, expected, rtol=1e-8)
    # Finite differences where F is not saturated (tau within 8 eps), h = 1e-5 tau.
    taus_fd = eps * np.array([1.5, 2.0, 3.0, 5.0, 8.0])
    tt = torch.tensor(taus_fd, dtype=F64)
    h = 1e-5 * tt
    cdf_fn = sde_lib.truncation_cdf
    dens = (cdf_fn(tt + h, k, eps, T) - cdf_fn(tt - h, k, eps, T)).numpy() / (2 * h.numpy())
    ratio = dens * taus_fd**k  # should be constant
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-6)
    np.testing.assert_allclose(sde_lib.truncation_pdf(tt, k, eps, T).numpy(), dens, rtol=1e-6)
    edges = cdf_fn(torch.tensor([0.0, eps, T, 2.0], dtype=F64), k, eps, T).numpy()
    np.testing.assert_allclose(edges, [0, 0, 1, 1], atol=1e-12)


def test_truncation_extreme_k():
    gen = torch.Generator().manual_seed(0)
    eps = 1e-5
    inf = sde_lib.sample_truncation_time(float("inf"), eps, size=(10,), generator=gen, dtype=F64)
    assert torch.all(inf == eps)
    # Huge k must not overflow: the mass concentrates just above eps (P(tau > eps (1 + 1/k)*4) ~ e^-4).
    big = sde_lib.sample_truncation_time(1000.0, eps, size=(1000,), generator=gen, dtype=F64)
    assert torch.isfinite(big).all() and torch.all(big >= eps) and torch.all(big < eps * 1.02)
    # Continuity at k = 1: the same uniforms give nearly the same tau.
    a = sde_lib.sample_truncation_time(1.0, eps, size=(100,), generator=torch.Generator().manual_seed(1), dtype=F64)
    b = sde_lib.sample_truncation_time(
        1.0 + 1e-9, eps, size=(100,), generator=torch.Generator().manual_seed(1), dtype=F64
    )
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)
    # Default: a single 0-dim tau.
    assert sde_lib.sample_truncation_time(1.0, eps).shape == ()


@pytest.mark.parametrize("k,eps", [(-0.5, 1e-5), (float("nan"), 1e-5), (None, 1e-5)])
def test_truncation_invalid_k(k, eps):
    with pytest.raises(ValueError, match="training.k"):
        sde_lib.sample_truncation_time(k, eps)
    with pytest.raises(ValueError, match="training.k"):
        sde_lib.truncation_cdf(torch.tensor([0.5]), k, eps)


@pytest.mark.parametrize("eps", [0.0, -1e-5, 1.0, 1.5])
def test_truncation_invalid_eps(eps):
    with pytest.raises(ValueError, match="training.truncation_time"):
        sde_lib.sample_truncation_time(1.0, eps)
    with pytest.raises(ValueError, match="training.truncation_time"):
        sde_lib.truncation_cdf(torch.tensor([0.5]), 1.0, eps)


# ------------------------------------------------------------------------------------------------------------
# get_sde
# ------------------------------------------------------------------------------------------------------------


def _config(sde_name, **sampling):
    c = ml_collections.ConfigDict()
    c.training = ml_collections.ConfigDict({"sde": sde_name, "truncation_time": 1e-4})
    c.model = ml_collections.ConfigDict(
        {"beta_min": 0.2, "beta_max": 10.0, "sigma_min": 2e-3, "sigma_max": 90.0, "num_scales": 77}
    )
    c.sampling = ml_collections.ConfigDict(sampling)
    return c


def test_get_sde_builds_each_sde():
    expected = {
        "vpsde": (sde_lib.VPSDE, 1e-3),
        "subVPSDE": (sde_lib.subVPSDE, 1e-3),
        "vesde": (sde_lib.VESDE, 1e-5),
        "rvesde": (sde_lib.RVESDE, 1e-4),
        "reciprocal_vesde": (sde_lib.RVESDE, 1e-4),
    }
    for name, (cls, eps) in expected.items():
        sde, sampling_eps = sde_lib.get_sde(_config(name))
        assert type(sde) is cls and sde.N == 77 and sampling_eps == eps
        if cls in (sde_lib.VPSDE, sde_lib.subVPSDE):
            assert (sde.beta_0, sde.beta_1) == (0.2, 10.0)
        else:
            assert (sde.sigma_min, sde.sigma_max) == (2e-3, 90.0)
    rve, _ = sde_lib.get_sde(_config("rvesde"))
    assert rve.eps == 1e-4
    assert rve.marginal_std(torch.tensor([1e-4], dtype=F64)).item() == pytest.approx(2e-3, rel=1e-10)


def test_get_sde_sampling_override_and_defaults():
    _, eps = sde_lib.get_sde(_config("vpsde", truncation_time=1e-5))
    assert eps == 1e-5
    c = _config("rvesde")
    del c.training["truncation_time"]
    del c["sampling"]
    sde, eps = sde_lib.get_sde(c)
    assert sde.eps == 1e-5 and eps == 1e-5


def test_get_sde_unknown_name():
    with pytest.raises(ValueError, match="vpsde.*subvpsde.*vesde.*rvesde"):
        sde_lib.get_sde(_config("cosine"))


def test_get_sde_reciprocal_ve_aliases():
    """The ST repository's 'reciprocal_vesde' and its legacy configs' 'rve-sde' build this project's RVE SDE."""
    reference, _ = sde_lib.get_sde(_config("rvesde"))
    for name in ("reciprocal_vesde", "rve-sde", "RVE-SDE"):
        sde, _ = sde_lib.get_sde(_config(name))
        assert type(sde) is sde_lib.RVESDE
        assert (sde.sigma_min, sde.sigma_max, sde.eps, sde.N) == (
            reference.sigma_min,
            reference.sigma_max,
            reference.eps,
            reference.N,
        )


# ------------------------------------------------------------------------------------------------------------
# Device and dtype handling
# ------------------------------------------------------------------------------------------------------------


def test_float32_inputs_stay_float32():
    for name in ALL:
        sde = make(name)
        t = torch.tensor([0.01, 0.5])
        x = torch.randn(2, 3, 4, 4)
        mean, std = sde.marginal_prob(x, t)
        assert mean.dtype == std.dtype == torch.float32
        drift, diff = sde.sde(x, t)
        assert drift.dtype == diff.dtype == torch.float32 and drift.shape == x.shape and diff.shape == (2,)
        assert sde.log_snr(t).dtype == torch.float32
        assert sde.importance_cdf(t, 1e-3).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda():
    dev = torch.device("cuda")
    for name in ALL:
        sde = make(name)
        t = sde.sample_importance_t(64, 1e-3, device=dev, generator=torch.Generator(dev).manual_seed(0))
        assert t.device.type == "cuda"
        x = sde.prior_sampling((64, 3, 4, 4), device=dev)
        mean, std = sde.marginal_prob(x, t)
        f, G = sde.discretize(x, t)
        rf, rG = sde.reverse(lambda xx, tt: -xx).discretize(x, t)
        assert mean.device == std.device == f.device == G.device == rf.device == dev
        lam = sde.log_snr(t)
        torch.testing.assert_close(sde.t_from_log_snr(lam), t, rtol=1e-3, atol=0)
        tau = sde_lib.sample_truncation_time(1.0, 1e-5, size=(8,), device=dev)
        assert tau.device.type == "cuda"


def test_sde_without_the_importance_closed_forms_names_the_fix():
    """An SDE subclass that lacks A(t) fails importance sampling with a message naming the missing method and the
    uniform-time alternative (every built-in SDE defines both closed forms)."""

    class NoClosedForms(sde_lib.VPSDE):
        iw_antiderivative = sde_lib.SDE.iw_antiderivative
        iw_antiderivative_inverse = sde_lib.SDE.iw_antiderivative_inverse

    sde = NoClosedForms()
    with pytest.raises(NotImplementedError, match="iw_antiderivative.*time_sampling = 'uniform'"):
        sde.sample_importance_t(8, 1e-5)
    with pytest.raises(NotImplementedError, match="iw_antiderivative"):
        sde.importance_normalizer(1e-5)
