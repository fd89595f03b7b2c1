"""Tests of likelihood.py against closed forms for Gaussian data N(mu, Sigma) with its exact score.

For Gaussian data every marginal is Gaussian, p_t = N(alpha mu, V_t), V_t = alpha^2 Sigma + sigma^2 I, and the
probability-flow ODE is the affine map x_T = alpha_T mu + V_T^(1/2) V_eps^(-1/2) (x - alpha_eps mu) (in the
common
eigenbasis). The ODE estimate of -log p is therefore exactly  -log pi(x_T) - log p_eps(x) + log p_T(x_T)
(the last
two terms are log |det dx_T/dx|), computed here independently in NumPy.
"""

import math

import numpy as np
import pytest
import torch
from scipy import integrate

import likelihood
import sde_lib

LN2 = math.log(2.0)
SHAPE = (2, 2, 2)  # D = 8
D = 8
MU, S = 0.3, 0.5


def inverse_scaler(x):
    """[-1, 1] -> [0, 1] (centered data: bpd offset 7)."""
    return (x + 1.0) / 2.0


def make_sdes():
    return {
        "vp": sde_lib.VPSDE(),
        "subvp": sde_lib.subVPSDE(),
        "ve": sde_lib.VESDE(),
        "rve": sde_lib.RVESDE(),
    }


def alpha_std_np(sde, t):
    tt = torch.tensor([t], dtype=torch.float64)
    return float(sde.alpha(tt)[0]), float(sde.marginal_std(tt)[0])


def prior_var(sde):
    return 1.0 if isinstance(sde, (sde_lib.VPSDE, sde_lib.subVPSDE)) else sde.sigma_max**2


def iso_score(sde, mu=MU, s=S):
    """Exact score of the marginals of N(mu, s^2 I) data."""

    def score_fn(x, t):
        a, sd = sde.alpha(t).to(x.dtype), sde.marginal_std(t).to(x.dtype)
        v = (a**2 * s**2 + sd**2).reshape(-1, *([1] * (x.ndim - 1)))
        return -(x - a.reshape(v.shape) * mu) / v

    return score_fn


def gauss_nll_np(x, mean, var):
    """-log N(x; mean, var I) per row (NumPy)."""
    d = x.shape[1]
    return 0.5 * d * np.log(2 * np.pi * var) + ((x - mean) ** 2).sum(1) / (2 * var)


def ode_nll_iso_np(sde, x, eps, mu=MU, s=S):
    """Exact value of the plain ODE estimate for N(mu, s^2 I) data (module docstring). x: [N, D] NumPy."""
    a_e, s_e = alpha_std_np(sde, eps)
    a_T, s_T = alpha_std_np(sde, 1.0)
    v_e, v_T = a_e**2 * s**2 + s_e**2, a_T**2 * s**2 + s_T**2
    x_T = a_T * mu + np.sqrt(v_T / v_e) * (x - a_e * mu)
    c2 = prior_var(sde)
    nll = gauss_nll_np(x_T, 0.0, c2) + gauss_nll_np(x, a_e * mu, v_e) - gauss_nll_np(x_T, a_T * mu, v_T)
    return nll, x_T


def residual_closed_form(sde, x0, eps, mu=MU, s=S):
    """R_eps = -D log a - D/2 + [D (a^2 s^2 / v)^2 + sd^2 a^2 ||x0 - mu||^2 / v^2] / 2 (N(mu, s^2 I))."""
    a, sd = alpha_std_np(sde, eps)
    v = a**2 * s**2 + sd**2
    d = x0.shape[1]
    r2 = ((x0 - mu) ** 2).sum(1)
    return -d * np.log(a) - d / 2 + 0.5 * (d * (a**2 * s**2 / v) ** 2 + sd**2 * a**2 * r2 / v**2)


def data(n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (MU + S * torch.randn(n, *SHAPE, generator=g)).to(dtype)


# ------------------------------------------------------------------------------------------------------------
# divergence
# ------------------------------------------------------------------------------------------------------------


def test_divergence_estimators_match_closed_form():
    """fn(x) = tanh(x A): div = sum_j (1 - tanh^2((xA)_j)) A_jj; exact is exact, Hutchinson unbiased."""
    torch.manual_seed(0)
    a = torch.randn(D, D, dtype=torch.float64)
    x1 = torch.randn(1, *SHAPE, dtype=torch.float64)

    def fn(x, t):
        return torch.tanh(x.reshape(x.shape[0], -1) @ a).reshape(x.shape)

    y = (x1.reshape(1, -1) @ a)[0]
    expected = float(((1 - torch.tanh(y) ** 2) * torch.diagonal(a)).sum())
    t = torch.zeros(1, dtype=torch.float64)
    assert float(likelihood.get_exact_div_fn(fn)(x1, t)[0]) == pytest.approx(expected, abs=1e-10)
    n = 20000
    xs = x1.repeat(n, 1, 1, 1)
    ts = torch.zeros(n, dtype=torch.float64)
    div_fn = likelihood.get_div_fn(fn)
    for kind in ("Gaussian", "Rademacher"):
        probe = likelihood.draw_probe(xs, kind)
        if kind == "Rademacher":
            assert set(probe.unique().tolist()) == {-1.0, 1.0}
        est = div_fn(xs, ts, probe)
        stderr = float(est.std()) / math.sqrt(n)
        assert abs(float(est.mean()) - expected) < 4 * stderr + 1e-9, kind
        assert stderr > 0


# ------------------------------------------------------------------------------------------------------------
# bits/dim by the ODE
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vp", "subvp", "ve", "rve"])
def test_bpd_plain_matches_gaussian_closed_form(name):
    sde = make_sdes()[name]
    eps = 1e-5
    x = data(4, seed=1)
    lik = likelihood.get_likelihood_fn(sde, inverse_scaler, eps=eps)
    torch.manual_seed(0)
    bpd, z, nfe = lik.from_score(iso_score(sde), x)
    xn = x.reshape(4, -1).double().numpy()
    nll, x_T = ode_nll_iso_np(sde, xn, eps)
    expected = nll / (D * LN2) + 7.0
    assert np.abs(bpd.numpy() - expected).max() < 2e-3
    # what the exact marginal at eps implies, and (eps small) the data density itself
    a_e, s_e = alpha_std_np(sde, eps)
    marg = gauss_nll_np(xn, a_e * MU, a_e**2 * S**2 + s_e**2) / (D * LN2) + 7.0
    true = gauss_nll_np(xn, MU, S**2) / (D * LN2) + 7.0
    assert np.abs(bpd.numpy() - marg).max() < 0.01
    assert np.abs(bpd.numpy() - true).max() < 0.01
    scale = math.sqrt(prior_var(sde))
    assert np.abs(z.reshape(4, -1).numpy() - x_T).max() < 1e-3 * scale
    assert isinstance(nfe, int) and nfe > 10


def test_bpd_offset_uncentered_and_errors():
    assert likelihood.bpd_offset(lambda x: (x + 1.0) / 2.0) == 7.0
    assert likelihood.bpd_offset(lambda x: x) == 8.0
    sde = sde_lib.VPSDE()
    with pytest.raises(ValueError, match="Hutchinson"):
        likelihood.get_likelihood_fn(sde, inverse_scaler, hutchinson_type="gauss")
    with pytest.raises(ValueError, match="truncation"):
        likelihood.get_likelihood_fn(sde, inverse_scaler, truncation="soft")
    with pytest.raises(ValueError, match="eps"):
        likelihood.ode_likelihood(sde, iso_score(sde), data(1), eps=0.0)


def full_cov_problem():
    rng = np.random.default_rng(3)
    b = rng.normal(size=(4, 4))
    cov = 0.2 * b @ b.T + 0.05 * np.eye(4)
    mu = np.array([0.2, -0.1, 0.4, 0.0])
    return mu, cov


def full_cov_score(sde, mu, cov):
    mu_t = torch.tensor(mu)
    cov_t = torch.tensor(cov)

    def score_fn(x, t):
        a, sd = sde.alpha(t).double(), sde.marginal_std(t).double()
        v = a[:, None, None] ** 2 * cov_t + sd[:, None, None] ** 2 * torch.eye(4, dtype=torch.float64)
        r = x.reshape(x.shape[0], 4).double() - a[:, None] * mu_t
        return -torch.linalg.solve(v, r.unsqueeze(-1)).squeeze(-1).reshape(x.shape).to(x.dtype)

    return score_fn


def full_cov_expected(sde, x, eps, mu, cov):
    """Plain ODE estimate for N(mu, cov) data: affine flow in the eigenbasis of cov."""
    lam, q = np.linalg.eigh(cov)
    a_e, s_e = alpha_std_np(sde, eps)
    a_T, s_T = alpha_std_np(sde, 1.0)
    v_e, v_T = a_e**2 * lam + s_e**2, a_T**2 * lam + s_T**2
    y = (x - a_e * mu) @ q
    y_T = y * np.sqrt(v_T / v_e)
    x_T = a_T * mu + y_T @ q.T

    def nll(yy, v):
        return 0.5 * np.log(2 * np.pi * v).sum() + (yy**2 / (2 * v)).sum(1)

    return gauss_nll_np(x_T, 0.0, 1.0) + nll(y, v_e) - nll(y_T, v_T)


def test_hutchinson_likelihood_unbiased_full_covariance():
    """Non-isotropic data: exact divergence gives the closed form; both probes agree with it on average."""
    sde = sde_lib.VPSDE()
    eps = 1e-3
    mu, cov = full_cov_problem()
    x1 = torch.tensor([[0.5, -0.3, 0.1, 0.7]], dtype=torch.float64).reshape(1, 1, 2, 2)
    expected = full_cov_expected(sde, x1.reshape(1, 4).numpy(), eps, mu, cov)[0]
    score_fn = full_cov_score(sde, mu, cov)
    out = likelihood.ode_likelihood(sde, score_fn, x1, hutchinson_type="exact", eps=eps)
    assert float(out["nll"][0]) == pytest.approx(expected, abs=2e-3)
    n = 200
    torch.manual_seed(0)
    for kind in ("Gaussian", "Rademacher"):
        out = likelihood.ode_likelihood(sde, score_fn, x1.repeat(n, 1, 1, 1), hutchinson_type=kind, eps=eps)
        nll = out["nll"].numpy()
        stderr = nll.std() / math.sqrt(n)
        assert stderr > 1e-3, kind  # the estimator is random for a non-diagonal Jacobian
        assert abs(nll.mean() - expected) < 4 * stderr + 2e-3, kind


# ------------------------------------------------------------------------------------------------------------
# exact truncation (Soft Truncation) residual
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_residual_matches_closed_form(name):
    sde = make_sdes()[name]
    eps = 0.05 if name == "vp" else 0.3  # large enough that R_eps is far from 0
    x0 = data(1, seed=2, dtype=torch.float64)
    n = 40000
    torch.manual_seed(0)
    t = torch.full((n,), eps, dtype=torch.float64)
    _, r = likelihood.residual_nats(sde, iso_score(sde), x0.repeat(n, 1, 1, 1), t, torch.randn(n, *SHAPE).double())
    expected = residual_closed_form(sde, x0.reshape(1, -1).numpy(), eps)[0]
    stderr = float(r.std()) / math.sqrt(n)
    assert abs(expected) > 0.05
    assert abs(float(r.mean()) - expected) < 4 * stderr + 1e-6
    # independent definition: E[-log q(x0|x_eps)] - H(p_0eps), q = N(Tweedie mean, (sigma/alpha)^2 I), by
    # Monte Carlo
    a, sd = alpha_std_np(sde, eps)
    v = a**2 * S**2 + sd**2
    rng = np.random.default_rng(0)
    z = rng.normal(size=(200000, D))
    xn = x0.reshape(1, -1).numpy()
    x_eps = a * xn + sd * z
    tweedie = (x_eps - sd**2 * (x_eps - a * MU) / v) / a
    ent = 0.5 * D * np.log(2 * np.pi * np.e * sd**2)
    mc = gauss_nll_np(np.broadcast_to(xn, tweedie.shape), tweedie, (sd / a) ** 2).mean() - ent
    assert mc == pytest.approx(expected, abs=0.02)


def test_exact_truncation_bpd():
    """Large eps: plain gives -log p_eps(x0) (far from -log p_0); exact gives E[ODE(x_eps)] + R_eps."""
    sde = sde_lib.VPSDE()
    eps = 0.05
    x0 = data(1, seed=4, dtype=torch.float64)
    xn = x0.reshape(1, -1).numpy()
    n = 64
    torch.manual_seed(0)
    out = likelihood.ode_likelihood(sde, iso_score(sde), x0.repeat(n, 1, 1, 1), eps=eps, truncation="exact")
    rng = np.random.default_rng(1)
    a, sd = alpha_std_np(sde, eps)
    x_eps = a * xn + sd * rng.normal(size=(200000, D))
    expected = ode_nll_iso_np(sde, x_eps, eps)[0].mean() + residual_closed_form(sde, xn, eps)[0]
    nll = out["nll"].numpy()
    stderr = nll.std() / math.sqrt(n)
    assert abs(nll.mean() - expected) < 4 * stderr + 0.01
    plain = likelihood.ode_likelihood(sde, iso_score(sde), x0, eps=eps)["nll"].numpy()[0]
    true = gauss_nll_np(xn, MU, S**2)[0]
    assert abs(plain - true) > 0.1  # the plain value is -log p_eps, not -log p_0
    assert nll.mean() > true - 4 * stderr  # the exact treatment is an upper bound on -log p_0
    assert abs(nll.mean() - true) < 0.5 * abs(plain - true)  # and much closer to it here


# ------------------------------------------------------------------------------------------------------------
# NELBO
# ------------------------------------------------------------------------------------------------------------


def nelbo_expected_iso(sde, x0, eps, mu_m, s_m, mu=MU, s=S):
    """Closed form + quadrature of the plain NELBO for the score of N(mu_m, s_m^2 I) at a point x0 [D]."""
    c2 = prior_var(sde)
    a_T, s_T = alpha_std_np(sde, 1.0)
    a_e, _ = alpha_std_np(sde, eps)
    prior = 0.5 * D * np.log(2 * np.pi * c2) + (a_T**2 * (x0**2).sum() + D * s_T**2) / (2 * c2)
    r2 = ((x0 - mu_m) ** 2).sum()

    def integrand(logt):
        t = math.exp(logt)
        a, sd = alpha_std_np(sde, t)
        g2 = float(sde.diffusion_sq(torch.tensor([t], dtype=torch.float64))[0])
        v = a**2 * s_m**2 + sd**2
        e_sq = D * (1 - sd**2 / v) ** 2 + sd**2 * a**2 * r2 / v**2
        return 0.5 * g2 / sd**2 * (e_sq - D) * t

    val, _ = integrate.quad(integrand, math.log(eps), 0.0, limit=400, epsabs=1e-7, epsrel=1e-7)
    return prior - D * math.log(a_T / a_e) + val


@pytest.mark.parametrize("name", ["vp", "rve"])
def test_nelbo_estimator_matches_quadrature(name):
    """Unbiased for a wrong model score N(0, 0.8^2) and a mismatched control variate."""
    sde = make_sdes()[name]
    eps = 1e-5
    x0 = data(1, seed=5, dtype=torch.float64)
    n = 128
    torch.manual_seed(0)
    out = likelihood.nelbo(
        sde,
        iso_score(sde, 0.0, 0.8),
        x0.repeat(n, 1, 1, 1),
        eps=eps,
        num_t=32,
        truncation="plain",
        data_std=0.3,
    )
    est = out["nelbo"].numpy()
    expected = nelbo_expected_iso(sde, x0.reshape(-1).numpy(), eps, 0.0, 0.8)
    stderr = est.std() / math.sqrt(n)
    assert abs(est.mean() - expected) < 4 * stderr + 1e-3


def scaled_var_score(sde, mu_m, s_m, rho):
    """-(x - alpha mu_m) / (alpha^2 s_m^2 + rho sigma^2): for rho != 1 not the marginal score of any data."""

    def score_fn(x, t):
        a, sd = sde.alpha(t).to(x.dtype), sde.marginal_std(t).to(x.dtype)
        v = (a**2 * s_m**2 + rho * sd**2).reshape(-1, *([1] * (x.ndim - 1)))
        return -(x - a.reshape(v.shape) * mu_m) / v

    return score_fn


def sde_model_cross_entropy(sde, x0, eps, mu_m, s_m, rho):
    """E_{x_eps ~ p_0eps(.|x0)}[-log p_eps^model(x_eps)] for the reverse-SDE model with scaled_var_score.

    The model is linear Gaussian: from x_T ~ N(0, c^2 I), mean m and variance P per dimension obey (in t,
    backwards)
    dm/dt = a m + g^2 (m - alpha mu_m) / w,  dP/dt = 2 (a + g^2 / w) P - g^2, with f = a x, w = alpha^2 s_m^2
    + rho sigma^2.
    """
    from scipy.integrate import solve_ivp

    def coeffs(t):
        tt = torch.tensor([t], dtype=torch.float64)
        al, sd = float(sde.alpha(tt)[0]), float(sde.marginal_std(tt)[0])
        g2 = float(sde.diffusion_sq(tt)[0])
        drift = sde.sde(torch.ones(1, 1, dtype=torch.float64), tt)[0]
        return al, sd, g2, float(drift.reshape(-1)[0])

    def rhs(t, y):
        al, sd, g2, a = coeffs(t)
        w = al**2 * s_m**2 + rho * sd**2
        return [a * y[0] + g2 * (y[0] - al * mu_m) / w, 2 * (a + g2 / w) * y[1] - g2]

    sol = solve_ivp(rhs, (1.0, eps), [0.0, prior_var(sde)], method="LSODA", rtol=1e-10, atol=1e-12)
    m, p = sol.y[0, -1], sol.y[1, -1]
    a_e, s_e = alpha_std_np(sde, eps)
    d = x0.size
    return 0.5 * d * np.log(2 * np.pi * p) + (((a_e * x0 - m) ** 2).sum() + d * s_e**2) / (2 * p)


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_nelbo_bounds_nll(name):
    """The NELBO bounds the reverse-SDE model's NLL: equality for a score that is the exact marginal score of
    some data (the exact one, or another Gaussian's), a clear gap for an inconsistent score.
    Exact score: NELBO ~= ODE NLL."""
    sde = make_sdes()[name]
    eps = 1e-5
    x0 = data(1, seed=6, dtype=torch.float64)
    x0n = x0.reshape(-1).numpy()
    n = 64
    xb = x0.repeat(n, 1, 1, 1)
    torch.manual_seed(0)
    for mu_m, s_m, rho in ((MU, S, 1.0), (-0.2, 0.9, 1.0), (MU, S, 3.0)):
        score = scaled_var_score(sde, mu_m, s_m, rho)
        nel = likelihood.nelbo(sde, score, xb, eps=eps, num_t=32, truncation="plain", data_std=S)["nelbo"].numpy()
        ce = sde_model_cross_entropy(sde, x0n, eps, mu_m, s_m, rho)
        stderr = nel.std() / math.sqrt(n)
        gap = nel.mean() - ce
        if rho == 1.0:
            assert abs(gap) < 4 * stderr + 0.02, (mu_m, s_m, rho)
        else:
            assert gap > 4 * stderr + 0.1, (mu_m, s_m, rho)
    # exact score, exact truncation: the NELBO and the ODE likelihood agree, in bits/dim
    nelbo_fn = likelihood.get_nelbo_fn(sde, inverse_scaler, eps=eps, num_t=32, data_std=S)
    lik = likelihood.get_likelihood_fn(sde, inverse_scaler, eps=eps, truncation="exact")
    nel = nelbo_fn.from_score(iso_score(sde), xb).numpy()
    nll = lik.from_score(iso_score(sde), x0.repeat(8, 1, 1, 1))[0].numpy()
    stderr = math.sqrt(nel.var() / n + nll.var() / 8)
    assert abs(nel.mean() - nll.mean()) < 4 * stderr + 0.01
    true = gauss_nll_np(x0.reshape(1, -1).numpy(), MU, S**2)[0] / (D * LN2) + 7.0
    assert abs(nel.mean() - true) < 4 * stderr + 0.01


def test_likelihood_fn_with_model_vp():
    """(model, data) goes through models.utils.get_score_fn (VP: labels 999 t, score -out/std)."""
    sde = sde_lib.VPSDE()

    class NoiseNet(torch.nn.Module):
        def forward(self, x, labels):
            t = labels / 999.0
            a, sd = sde.alpha(t).to(x.dtype), sde.marginal_std(t).to(x.dtype)
            v = (a**2 * S**2 + sd**2).reshape(-1, 1, 1, 1)
            return sd.reshape(-1, 1, 1, 1) * (x - a.reshape(-1, 1, 1, 1) * MU) / v

    x = data(3, seed=7)
    torch.manual_seed(0)
    bpd, _, _ = likelihood.get_likelihood_fn(sde, inverse_scaler)(NoiseNet(), x)
    expected = ode_nll_iso_np(sde, x.reshape(3, -1).double().numpy(), 1e-5)[0] / (D * LN2) + 7.0
    assert np.abs(bpd.numpy() - expected).max() < 2e-3
    nel = likelihood.get_nelbo_fn(sde, inverse_scaler, num_t=8)(NoiseNet(), x)
    assert nel.shape == (3,) and torch.isfinite(nel).all()


# ------------------------------------------------------------------------------------------------------------
# the lossless (discretized) decoder of data.dequantization = 'lossless', and eval.lambda_
# ------------------------------------------------------------------------------------------------------------


def discretized_log_mass_np(x, mean, std):
    """log Q(x) of 8-bit levels x in [-1, 1] under N(mean, std^2): bins of half width 1/255, open edge bins
    (scipy's normal CDF; the mass floored at 1e-12 like the original)."""
    from scipy.stats import norm

    hi = norm.cdf((x + 1 / 255 - mean) / std)
    lo = norm.cdf((x - 1 / 255 - mean) / std)
    mass = np.where(x < -0.999, hi, np.where(x > 0.999, 1.0 - lo, hi - lo))
    return np.log(np.maximum(mass, 1e-12))


def grid_data(n, seed=0, dtype=torch.float64):
    """8-bit data in [-1, 1] around MU (both edge levels included)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.clamp(torch.round((MU + S * torch.randn(n, *SHAPE, generator=g) + 1) * 127.5), 0, 255)
    k.view(n, -1)[0, :2] = torch.tensor([0.0, 255.0])
    return (k / 127.5 - 1.0).to(dtype)


def test_discretized_gaussian_log_likelihood_matches_scipy():
    x = grid_data(6).reshape(-1)
    g = torch.Generator().manual_seed(3)
    means = x + 0.01 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    for std in (1e-3, 4e-3, 0.05, 2.0):
        got = likelihood.discretized_gaussian_log_likelihood(x, means, torch.full_like(x, math.log(std)))
        want = discretized_log_mass_np(x.numpy(), means.numpy(), std)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-9)
    # far from the mean the mass is computed without cancellation (then floored at 1e-12)
    far = likelihood.discretized_gaussian_log_likelihood(
        torch.tensor([0.0]), torch.tensor([0.05]), torch.tensor([math.log(0.01)])
    )
    assert float(far) == pytest.approx(float(discretized_log_mass_np(np.array([0.0]), 0.05, 0.01)[0]), rel=1e-6)


def lossless_nll_closed_form(sde, x0, z, eps, mu=MU, s=S):
    """-log p_eps(x_eps) - log Q(x0 | x_eps) - H(p_0eps) for N(mu, s^2 I) data and its exact score, given z."""
    a, sd = alpha_std_np(sde, eps)
    v = a**2 * s**2 + sd**2
    x_eps = a * x0 + sd * z
    score = -(x_eps - a * mu) / v
    q_mean, q_std = (x_eps + sd**2 * score) / a, sd / a
    d = x0.shape[1]
    decoder = -discretized_log_mass_np(x0, q_mean, q_std).sum(1)
    entropy = 0.5 * d * (np.log(2 * np.pi * sd**2) + 1)
    return gauss_nll_np(x_eps, a * mu, v) + decoder - entropy


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_lossless_decoder_likelihood_of_a_gaussian_matches_closed_form(name):
    """data.dequantization = 'lossless': the discrete NLL bound, no dequantization offset (exact divergence)."""
    sde = make_sdes()[name]
    eps = 1e-3 if name == "vp" else 0.3  # sigma(eps) ~ 1e-2 (VP) and 1.6e-2 (VE): the bins matter
    x0 = grid_data(3, seed=1)
    lik = likelihood.get_likelihood_fn(
        sde, inverse_scaler, eps=eps, truncation="exact", decoder="lossless", hutchinson_type="exact"
    )
    torch.manual_seed(5)
    bpd, _, _ = lik.from_score(iso_score(sde), x0)
    torch.manual_seed(5)
    z = torch.randn_like(x0).reshape(3, -1).numpy()  # the first draw of the likelihood: x_eps's noise
    expected = lossless_nll_closed_form(sde, x0.reshape(3, -1).numpy(), z, eps) / (D * LN2)
    np.testing.assert_allclose(bpd.numpy(), expected, rtol=1e-3, atol=1e-3)
    if name == "ve":  # uncentered data: the decoder maps [0, 1] to [-1, 1] (x -> 2x - 1, std -> 2 std)
        g = torch.Generator().manual_seed(8)
        x01 = (x0 + 1) / 2
        mean01 = x01 + 0.003 * torch.randn(x01.shape, generator=g, dtype=torch.float64)
        std01 = torch.full((3,), 0.004, dtype=torch.float64)
        got = likelihood.lossless_decoder_nll(x01, mean01, std01, lambda x: x)
        want = -discretized_log_mass_np(x0.numpy(), 2 * mean01.numpy() - 1, 0.008).reshape(3, -1).sum(1)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)


def test_lossless_nelbo_and_errors():
    sde = sde_lib.VPSDE()
    x0 = grid_data(2, seed=2)
    nel = likelihood.get_nelbo_fn(sde, inverse_scaler, eps=1e-3, num_t=8, decoder="lossless")
    gauss = likelihood.get_nelbo_fn(sde, inverse_scaler, eps=1e-3, num_t=8)
    torch.manual_seed(0)
    lossless_bpd = nel.from_score(iso_score(sde), x0)
    torch.manual_seed(0)
    gauss_bpd = gauss.from_score(iso_score(sde), x0)
    # no dequantization offset: the lossless bound is already in bits of the discrete data
    torch.manual_seed(0)
    out = likelihood.nelbo(
        sde, iso_score(sde), x0, eps=1e-3, num_t=8, decoder="lossless", inverse_scaler=inverse_scaler
    )
    np.testing.assert_allclose(lossless_bpd.numpy(), out["nelbo"].numpy() / (D * LN2), rtol=1e-6)
    assert torch.isfinite(gauss_bpd).all() and not torch.allclose(lossless_bpd, gauss_bpd)
    with pytest.raises(ValueError, match="exact truncation"):
        likelihood.get_likelihood_fn(sde, inverse_scaler, truncation="plain", decoder="lossless")
    with pytest.raises(ValueError, match="decoder"):
        likelihood.get_nelbo_fn(sde, inverse_scaler, decoder="bogus")


def test_lambda_drift_matches_closed_form():
    """eval.lambda_ = 1 (reverse SDE drift f - g^2 s) on VE Gaussian data: x_T - mu = (x - mu) V_T / V_eps and
    int div = D log(V_T / V_eps), V_t = s^2 + sigma_t^2; lambda_ = 0 is the probability-flow ODE."""
    sde = sde_lib.VESDE()
    eps = 1e-5
    x = data(3, seed=9, dtype=torch.float64)
    lik = likelihood.get_likelihood_fn(sde, inverse_scaler, eps=eps, lambda_=1.0, hutchinson_type="exact")
    bpd, z, _ = lik.from_score(iso_score(sde), x)
    xn = x.reshape(3, -1).numpy()
    _, s_e = alpha_std_np(sde, eps)
    _, s_T = alpha_std_np(sde, 1.0)
    ratio = (S**2 + s_T**2) / (S**2 + s_e**2)
    x_T = MU + (xn - MU) * ratio
    expected = gauss_nll_np(x_T, 0.0, sde.sigma_max**2) - D * np.log(ratio)
    np.testing.assert_allclose(z.reshape(3, -1).numpy(), x_T, rtol=1e-3)
    np.testing.assert_allclose(bpd.numpy(), expected / (D * LN2) + 7.0, rtol=1e-4, atol=1e-3)
    ode = likelihood.get_likelihood_fn(sde, inverse_scaler, eps=eps, lambda_=0.0, hutchinson_type="exact")
    np.testing.assert_allclose(
        ode.from_score(iso_score(sde), x)[0].numpy(), ode_nll_iso_np(sde, xn, eps)[0] / (D * LN2) + 7.0, atol=2e-3
    )
