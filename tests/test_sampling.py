"""Tests of sampling.py on Gaussian data x0 ~ N(mu, diag(s^2)), whose score and probability-flow map are known
in closed form: x_t ~ N(alpha mu, v_t) with v_t = alpha^2 s^2 + sigma^2, score = -(x - alpha mu) / v_t, and
the probability-flow ODE keeps the standardised value (x_t - alpha_t mu) / sqrt(v_t) fixed along each path.

Monte Carlo tolerances: with n samples per dimension the standard error of the sample mean is sqrt(v/n) and of
the sample variance v sqrt(2/(n-1)); the moment tests allow 4.5 standard errors (false-failure rate about 1e-5
per check) plus the stated discretisation allowance of the sampler.
"""

import functools
import math

import ml_collections
import pytest
import torch
from conftest import SDE_NAMES, ExactScore, make_sde, use_exact_score

import sampling
import sde_lib

MU = torch.tensor([0.5, -0.3], dtype=torch.float64)
S = torch.tensor([0.2, 0.6], dtype=torch.float64)
SHAPE = (4000, 1, 1, 2)  # [B, C, H, W]; the last axis holds the two data dimensions


pytestmark = pytest.mark.usefixtures("single_thread")


SDES = list(SDE_NAMES)


def marginal(sde, t: float):
    """(mean, variance) of x_t per data dimension, float64."""
    tt = torch.tensor([t], dtype=torch.float64)
    a = float(sde.alpha(tt)[0])
    sd = float(sde.marginal_std(tt)[0])
    return a * MU, a**2 * S**2 + sd**2


def gaussian_score_fn(sde):
    """Exact score of the diffused Gaussian data, computed independently of the samplers."""

    def score_fn(x, t):
        t64 = t.to(torch.float64)
        a = sde.alpha(t64).reshape(-1, 1, 1, 1)
        sd = sde.marginal_std(t64).reshape(-1, 1, 1, 1)
        v = a**2 * S.to(x.device) ** 2 + sd**2
        return (-(x.to(torch.float64) - a * MU.to(x.device)) / v).to(x.dtype)

    return score_fn


def exact_flow(sde, z: torch.Tensor, t0: float, t1: float) -> torch.Tensor:
    """Closed-form probability-flow map from time t0 to t1."""
    m0, v0 = marginal(sde, t0)
    m1, v1 = marginal(sde, t1)
    return m1 + torch.sqrt(v1 / v0) * (z.to(torch.float64) - m0)


def check_moments(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, var_allowance: float = 0.0):
    """Sample mean / variance per dimension within 4.5 Monte Carlo standard errors (+ an allowance on var)."""
    flat = x.reshape(x.shape[0], -1).to(torch.float64)
    n = flat.shape[0]
    assert torch.isfinite(flat).all()
    se_mean = torch.sqrt(var / n)
    se_var = var * math.sqrt(2.0 / (n - 1))
    err_mean = (flat.mean(0) - mean).abs()
    err_var = (flat.var(0) - var).abs()
    assert (err_mean <= 4.5 * se_mean).all(), (flat.mean(0), mean, se_mean)
    assert (err_var <= 4.5 * se_var + var_allowance * var).all(), (flat.var(0), var, se_var)


def prior_latent(sde, seed: int, shape=SHAPE) -> torch.Tensor:
    torch.manual_seed(seed)
    return sde.prior_sampling(shape).to(torch.float32)


# ------------------------------------------------------------------------------------------------------------
# Probability-flow ODE (adaptive)
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SDES)
def test_ode_matches_closed_form_flow_and_moments(name):
    sde, eps = make_sde(name)
    z = prior_latent(sde, 0)
    x, nfe = sampling.solve_probability_flow(sde, gaussian_score_fn(sde), z, sde.T, eps)
    ref = exact_flow(sde, z, sde.T, eps)
    # rtol = atol = 1e-5 on a float32 state: global error a few 1e-4 relative to the data scale
    assert (x.to(torch.float64) - ref).abs().max() < 2e-3
    assert nfe > 10
    mean, var = marginal(sde, eps)
    check_moments(x, mean, var)


@pytest.mark.parametrize("name", SDES)
def test_latent_image_round_trip(name, monkeypatch):
    sde, eps = make_sde(name)
    torch.manual_seed(1)
    x0 = (MU + S * torch.randn(256, 1, 1, 2, dtype=torch.float64)).to(torch.float32)
    score_fn = gaussian_score_fn(sde)
    use_exact_score(monkeypatch, score_fn)
    flow = sampling.get_ode_flow(sde, rtol=1e-5, atol=1e-5, eps=eps)
    z, nfe_enc = flow.image_to_latent(None, x0)
    x1, nfe_dec = flow.latent_to_image(None, z)
    # encoder agrees with the closed-form map, and decoding inverts it within the ODE tolerance
    prior_std = float(marginal(sde, sde.T)[1].sqrt().max())
    assert (z.to(torch.float64) - exact_flow(sde, x0, eps, sde.T)).abs().max() < 1e-3 * prior_std
    assert (x1 - x0).abs().max() < 2e-3
    assert nfe_enc > 0 and nfe_dec > 0


def test_ode_sampler_counts_and_scales(monkeypatch):
    sde, eps = make_sde("vp")
    score_fn = gaussian_score_fn(sde)
    calls = {"n": 0}

    def counting(x, t):
        calls["n"] += 1
        return score_fn(x, t)

    use_exact_score(monkeypatch, counting)
    sampler = sampling.get_ode_sampler(sde, (8, 1, 1, 2), lambda x: 2.0 * x, denoise=True, eps=eps, device="cpu")
    z = prior_latent(sde, 2, (8, 1, 1, 2))
    x, nfe = sampler(None, z=z)
    assert nfe == calls["n"]  # solver evaluations + 1 for the denoising step
    ref = exact_flow(sde, z, sde.T, eps)
    # inverse_scaler applied; denoising moves x by O(sigma(eps)^2 score) only
    assert (x.to(torch.float64) / 2.0 - ref).abs().max() < 5e-3


def test_unknown_ode_method():
    sde, _ = make_sde("vp")
    with pytest.raises(ValueError, match="ode_method"):
        sampling.get_ode_sampler(sde, SHAPE, lambda x: x, method="euler_forever")


# ------------------------------------------------------------------------------------------------------------
# Fast samplers
# ------------------------------------------------------------------------------------------------------------


@functools.cache
def adaptive_reference(name: str):
    """Latents and the adaptive (RK45, rtol = atol = 1e-5) probability-flow solution from them."""
    sde, eps = make_sde(name)
    z = prior_latent(sde, 3)
    ode_x, _ = sampling.solve_probability_flow(sde, gaussian_score_fn(sde), z, sde.T, eps)
    return z, ode_x


@pytest.mark.parametrize("name", SDES)
@pytest.mark.parametrize("sampler_name", ["heun", "dpm2", "dpm3"])
def test_fast_samplers_match_adaptive_ode(name, sampler_name):
    """At <= 50 network evaluations the fast samplers agree with the adaptive solution from the same latents:
    RMSE <= 1e-2 of the data std for DPM-Solver++(3), 2e-2 for (2) and 8e-2 for Heun (edm grid); samples have
    the moments of p_eps within Monte Carlo error."""
    sde, eps = make_sde(name)
    score_fn = gaussian_score_fn(sde)
    z, ode_x = adaptive_reference(name)
    if sampler_name == "heun":
        ts = sampling.fast_time_grid(sde, 25, eps, "edm")
        x, nfe = sampling.heun_sample(sde, score_fn, z, ts, denoise=False)
        assert nfe == 48
        tol = 8e-2
    else:
        order = int(sampler_name[-1])
        ts = sampling.fast_time_grid(sde, 51, eps, "logsnr")
        x, nfe = sampling.dpm_solver_sample(sde, score_fn, z, ts, order=order)
        assert nfe == 50
        tol = 2e-2 if order == 2 else 1e-2
    rmse = ((x - ode_x).to(torch.float64) ** 2).mean(0).sqrt().flatten()
    assert (rmse <= tol * S).all(), rmse / S
    mean, var = marginal(sde, eps)
    check_moments(x, mean, var, var_allowance=2 * tol)


@pytest.mark.parametrize("name", ["vp", "ve", "rve"])
def test_dpm_solver_convergence_order(name):
    """Global error against the closed-form flow shrinks like h^order when the number of steps doubles."""
    sde, eps = make_sde(name)
    score_fn = gaussian_score_fn(sde)
    z = prior_latent(sde, 4, (64, 1, 1, 2)).to(torch.float64)
    ref = exact_flow(sde, z, sde.T, eps)
    for order in (1, 2, 3):
        errs = []
        for steps in (20, 40):
            ts = sampling.fast_time_grid(sde, steps + 1, eps, "logsnr")
            x, _ = sampling.dpm_solver_sample(sde, score_fn, z, ts, order=order, lower_order_final=False)
            errs.append(float((x - ref).abs().max()))
        observed = math.log2(errs[0] / errs[1])
        assert observed > order - 0.35, (order, errs, observed)


@pytest.mark.parametrize("name", ["vp", "rve"])
def test_heun_second_order_and_denoise(name):
    sde, eps = make_sde(name)
    score_fn = gaussian_score_fn(sde)
    z = prior_latent(sde, 5, (64, 1, 1, 2)).to(torch.float64)
    ref = exact_flow(sde, z, sde.T, eps)
    errs = []
    for points in (21, 41):
        x, nfe = sampling.heun_sample(sde, score_fn, z, sampling.fast_time_grid(sde, points, eps, "edm"), False)
        assert nfe == 2 * (points - 1)
        errs.append(float((x - ref).abs().max()))
    assert math.log2(errs[0] / errs[1]) > 1.65, errs
    # denoise: EDM's final Euler step to sigma = 0 returns Tweedie's mean E[x0 | x_eps] (one more evaluation)
    ts = sampling.fast_time_grid(sde, 41, eps, "edm")
    x_d, nfe = sampling.heun_sample(sde, score_fn, z, ts, denoise=True)
    assert nfe == 81
    m, v = marginal(sde, eps)
    a = float(sde.alpha(torch.tensor([eps], dtype=torch.float64))[0])
    tweedie = MU + a * S**2 / v * (ref - m)
    assert (x_d - tweedie).abs().max() < 5 * errs[1] + 1e-6


def test_time_grids():
    for name in SDES:
        sde, eps = make_sde(name)
        ts = sampling.fast_time_grid(sde, 11, eps, "logsnr")
        assert ts[0] == sde.T and abs(float(ts[-1]) - eps) < 1e-12
        a, sd = sde.alpha(ts), sde.marginal_std(ts)
        lam = torch.log(a / sd)
        assert torch.allclose(lam.diff(), lam.diff()[:1].expand(10), rtol=1e-5)
        ts = sampling.fast_time_grid(sde, 11, eps, "edm")
        sig = sde.marginal_std(ts) / sde.alpha(ts)
        root = sig ** (1 / 7)
        assert torch.allclose(root.diff(), root.diff()[:1].expand(10), rtol=1e-5)
        assert (ts.diff() < 0).all()
    with pytest.raises(ValueError, match="time_schedule"):
        sampling.fast_time_grid(sde, 11, eps, "cosine")


def test_fast_samplers_through_model(monkeypatch):
    sde, eps = make_sde("ve")
    score_fn = gaussian_score_fn(sde)
    use_exact_score(monkeypatch, score_fn)
    shape = (16, 1, 1, 2)
    heun = sampling.get_heun_sampler(sde, shape, lambda x: x + 1.0, num_steps=18, eps=eps, device="cpu")
    dpm = sampling.get_dpm_solver_sampler(sde, shape, lambda x: x + 1.0, num_steps=20, eps=eps, device="cpu")
    z = prior_latent(sde, 6, shape)
    xh, nfe_h = heun(None, z=z)
    xd, nfe_d = dpm(None, z=z)
    assert nfe_h == 35 and nfe_d == 20
    ref = exact_flow(sde, z, sde.T, eps)
    assert ((xd - 1.0).to(torch.float64) - ref).abs().max() < 0.05
    # Heun's default denoise returns the posterior mean of x0, which differs from x_eps by O(sigma(eps)^2)
    assert ((xh - 1.0).to(torch.float64) - ref).abs().max() < 0.05
    x_prior, _ = dpm(None)
    assert x_prior.shape == shape
    with pytest.raises(ValueError, match="dpm_solver_order"):
        sampling.get_dpm_solver_sampler(sde, shape, lambda x: x, order=4)


# ------------------------------------------------------------------------------------------------------------
# Predictor-corrector
# ------------------------------------------------------------------------------------------------------------

PC_CASES = [
    ("vp", "euler_maruyama", "none"),
    ("subvp", "euler_maruyama", "none"),
    ("ve", "reverse_diffusion", "langevin"),
    ("rve", "reverse_diffusion", "langevin"),
    ("vp", "ancestral_sampling", "none"),
    ("subvp", "ancestral_sampling", "ald"),
    ("ve", "ancestral_sampling", "none"),
    ("rve", "ancestral_sampling", "none"),
]


@pytest.mark.parametrize("name,predictor,corrector", PC_CASES)
def test_pc_sampler_moments(name, predictor, corrector, monkeypatch):
    """PC samples (N = 250 steps, denoised) have the mean and variance of p_eps within Monte Carlo error.
    Allowance on the variance for the O(1/N) discretisation bias: 10% (measured with 20000 samples at N = 250:
    at most 8%, VE/RVE reverse diffusion + Langevin on the narrow dimension; it halves at N = 500)."""
    sde, eps = make_sde(name, N=250)
    score_fn = gaussian_score_fn(sde)
    use_exact_score(monkeypatch, score_fn)
    sampler = sampling.get_pc_sampler(
        sde,
        SHAPE,
        sampling.get_predictor(predictor),
        sampling.get_corrector(corrector),
        lambda x: x,
        snr=0.16,
        n_steps=1,
        continuous=True,
        eps=eps,
        device="cpu",
    )
    torch.manual_seed(7)
    x, nfe = sampler(None)
    n_corrector = 0 if corrector == "none" else 1
    assert nfe == sde.N * (1 + n_corrector)
    mean, var = marginal(sde, eps)
    check_moments(x, mean, var, var_allowance=0.1)


def test_pc_probability_flow_predictor_is_deterministic():
    sde, eps = make_sde("vp")
    sde.N = 200
    score_fn = gaussian_score_fn(sde)
    z = prior_latent(sde, 8, (512, 1, 1, 2))
    torch.manual_seed(0)
    x1, nfe = sampling.pc_sample(
        sde, score_fn, z, sampling.EulerMaruyamaPredictor, None, 0.16, probability_flow=True, eps=eps
    )
    torch.manual_seed(1)
    x2, _ = sampling.pc_sample(
        sde, score_fn, z, sampling.EulerMaruyamaPredictor, None, 0.16, probability_flow=True, eps=eps
    )
    assert nfe == 200
    assert torch.equal(x1, x2)
    ref = exact_flow(sde, z, sde.T, eps)
    assert (x1.to(torch.float64) - ref).abs().max() < 0.05  # Euler with 200 steps


def test_rve_pc_grid_is_uniform_in_log_sigma():
    sde, eps = make_sde("rve")
    ts = sde.time_grid(sde.N, eps, "cpu").to(torch.float64)
    log_sigma = torch.log(sde.marginal_std(ts))
    steps = log_sigma.diff()
    assert torch.allclose(steps, steps[:1].expand_as(steps), rtol=1e-3)
    assert abs(float(sde.marginal_std(ts[-1:])[0]) - sde.sigma_min) < 1e-6
    # the predictors' previous time is the next grid time; from the last grid time they step to sigma = 0, as VE
    prev = sde.with_num_steps(sde.N, eps).previous_time(ts)
    assert torch.allclose(prev[:-1], ts[1:], rtol=1e-6)
    assert float(prev[-1]) == 0.0


# ------------------------------------------------------------------------------------------------------------
# Registries and get_sampling_fn
# ------------------------------------------------------------------------------------------------------------


def make_config(method: str, sde_name: str = "vpsde", **sampling_fields) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.training = ml_collections.ConfigDict({"sde": sde_name, "continuous": True})
    config.sampling = ml_collections.ConfigDict(
        {
            "method": method,
            "predictor": "euler_maruyama",
            "corrector": "none",
            "snr": 0.16,
            "n_steps_each": 1,
            "noise_removal": False,
            "probability_flow": False,
        }
    )
    for key, value in sampling_fields.items():
        config.sampling[key] = value
    config.device = torch.device("cpu")
    return config


def test_get_sampling_fn_dispatch(monkeypatch):
    sde, eps = make_sde("vp")
    sde.N = 50
    score_fn = gaussian_score_fn(sde)
    use_exact_score(monkeypatch, score_fn)
    shape = (8, 1, 1, 2)
    z = prior_latent(sde, 9, shape)
    expected = {"pc": 50, "heun": 2 * (sampling.heun_num_points(35, False) - 1), "dpm_solver": 35}
    for method, nfe_expected in expected.items():
        fn = sampling.get_sampling_fn(make_config(method, nfe=35), sde, shape, lambda x: x, eps)
        x, nfe = fn(None, z=z) if method != "pc" else fn(None)
        assert nfe == nfe_expected and x.shape == shape
    fn = sampling.get_sampling_fn(make_config("ode", ode_rtol=1e-3, ode_atol=1e-3), sde, shape, lambda x: x, eps)
    x, nfe = fn(None, z=z)
    assert (x.to(torch.float64) - exact_flow(sde, z, sde.T, eps)).abs().max() < 0.05
    cfg = make_config("dpm_solver", nfe=12, dpm_solver_order=2, noise_removal=True)
    _, nfe = sampling.get_sampling_fn(cfg, sde, shape, lambda x: x, eps)(None, z=z)
    assert nfe == 12


@pytest.mark.parametrize("name", SDES)
@pytest.mark.parametrize(
    "method, fields, direct",
    [
        ("edm_stochastic", {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}, "edm"),
        ("dpm_solver_sde", {"sde_eta": 0.5, "dpm_solver_sde_order": 3, "time_schedule": "edm"}, "dpm"),
        ("euler_ancestral", {"sde_eta": 0.7, "s_noise": 0.9}, "ancestral"),
    ],
)
def test_stochastic_methods_through_get_sampling_fn(name, method, fields, direct, monkeypatch):
    """config.sampling.method and the sampler's config fields reach samplers/stochastic.py: the same seed gives
    the same samples as the direct call with those arguments, on the method's default grid (nfe 20)."""
    from samplers import stochastic

    sde, eps = make_sde(name)
    score_fn = gaussian_score_fn(sde)
    use_exact_score(monkeypatch, score_fn)
    shape = (64, 1, 1, 2)
    config = make_config(method, nfe=20, noise_removal=True, **fields)
    torch.manual_seed(3)
    x, nfe = sampling.get_sampling_fn(config, sde, shape, lambda v: v, eps)(None)
    torch.manual_seed(3)
    z = sde.prior_sampling(shape)
    denoise_fn = ExactScore(sde, score_fn).denoise
    schedule = fields.get("time_schedule", "edm" if direct == "edm" else "logsnr")
    if direct == "edm":
        grid = sampling.fast_time_grid(sde, stochastic.edm_stochastic_num_points(20, True), eps, schedule)
        keys = ("s_churn", "s_tmin", "s_tmax", "s_noise")
        ref, ref_nfe = stochastic.edm_stochastic_sample(sde, denoise_fn, z, grid, **{k: fields[k] for k in keys})
    elif direct == "dpm":
        grid = sampling.fast_time_grid(sde, stochastic.dpm_solver_sde_num_points(20, True), eps, schedule)
        ref, ref_nfe = stochastic.dpm_solver_sde_sample(sde, denoise_fn, z, grid, order=3, eta=0.5, denoise=True)
    else:
        grid = sampling.fast_time_grid(sde, stochastic.euler_ancestral_num_points(20, True), eps, schedule)
        ref, ref_nfe = stochastic.euler_ancestral_sample(sde, denoise_fn, z, grid, eta=0.7, s_noise=0.9)
    assert nfe == ref_nfe and nfe <= 20
    torch.testing.assert_close(x, ref, rtol=0, atol=0)


def test_unknown_names_raise():
    sde, eps = make_sde("vp")
    with pytest.raises(ValueError, match="valid names.*dpm_solver"):
        sampling.get_sampling_fn(make_config("magic"), sde, SHAPE, lambda x: x, eps)
    with pytest.raises(ValueError, match="reverse_diffusion"):
        sampling.get_predictor("forward_diffusion")
    with pytest.raises(ValueError, match="langevin"):
        sampling.get_corrector("hamiltonian")
    with pytest.raises(ValueError, match="nfe"):
        sampling.get_sampling_fn(make_config("heun", nfe=1), sde, SHAPE, lambda x: x, eps)


def test_register_sampling_method(monkeypatch):
    import samplers.base

    registry = dict(sampling._SAMPLING_METHODS)  # the registration is undone after the test
    monkeypatch.setattr(samplers.base, "_SAMPLING_METHODS", registry)
    monkeypatch.setattr(sampling, "_SAMPLING_METHODS", registry)
    seen = {}

    @sampling.register_sampling_method("my_method")
    def build(config, sde, shape, inverse_scaler, eps):
        seen["args"] = (sde, shape, eps)
        return "sampler"

    sde, eps = make_sde("ve")
    assert sampling.get_sampling_fn(make_config("MY_METHOD"), sde, SHAPE, lambda x: x, eps) == "sampler"
    assert seen["args"] == (sde, SHAPE, eps)
    with pytest.raises(ValueError, match="Already registered"):
        sampling.register_sampling_method("my_method")(build)


class GaussianNet(torch.nn.Module):
    """A fake score network, exact for the Gaussian data, with score_sde's label conventions: VP/subVP
    receive 999 t and output the noise -sigma * score; VE/RVE receive sigma(t) and output the score."""

    def __init__(self, sde):
        super().__init__()
        self.sde = sde
        self.is_vp = isinstance(sde, (sde_lib.VPSDE, sde_lib.subVPSDE))

    def forward(self, x, labels):
        x64 = x.to(torch.float64)
        if self.is_vp:
            t = labels.to(torch.float64) / 999.0
            a = self.sde.alpha(t).reshape(-1, 1, 1, 1)
            sd = self.sde.marginal_std(t).reshape(-1, 1, 1, 1)
        else:
            a = torch.ones_like(labels, dtype=torch.float64).reshape(-1, 1, 1, 1)
            sd = labels.to(torch.float64).reshape(-1, 1, 1, 1)
        score = -(x64 - a * MU) / (a**2 * S**2 + sd**2)
        return (-sd * score if self.is_vp else score).to(x.dtype)


@pytest.mark.parametrize("name", SDES)
def test_samplers_through_models_utils(name):
    """End to end through models.utils.get_score_fn (labels and output scaling) for each SDE."""
    sde, eps = make_sde(name)
    net = GaussianNet(sde)
    shape = (64, 1, 1, 2)
    z = prior_latent(sde, 11, shape)
    ref = exact_flow(sde, z, sde.T, eps)
    dpm = sampling.get_dpm_solver_sampler(sde, shape, lambda x: x, num_steps=30, eps=eps, device="cpu")
    x, nfe = dpm(net, z=z)
    assert nfe == 30
    assert (x.to(torch.float64) - ref).abs().max() < 0.02
    flow = sampling.get_ode_flow(sde, rtol=1e-5, atol=1e-5, eps=eps)
    back, _ = flow.latent_to_image(net, flow.image_to_latent(net, x)[0])
    assert (back - x).abs().max() < 3e-3


def test_soft_diffusion_methods_are_registered():
    """'naive_blur' / 'momentum' are soft_diffusion.py's builders, registered by sampling.py."""
    import soft_diffusion

    assert sampling._SAMPLING_METHODS["naive_blur"] is soft_diffusion.build_naive_sampler
    assert sampling._SAMPLING_METHODS["momentum"] is soft_diffusion.build_momentum_sampler


def test_eps_must_be_positive():
    sde, _ = make_sde("vp")
    for build in (
        lambda: sampling.get_heun_sampler(sde, SHAPE, lambda x: x, eps=0.0),
        lambda: sampling.get_dpm_solver_sampler(sde, SHAPE, lambda x: x, eps=0.0),
        lambda: sampling.get_ode_sampler(sde, SHAPE, lambda x: x, eps=0.0),
        lambda: sampling.get_sampling_fn(make_config("pc"), sde, SHAPE, lambda x: x, 0.0),
    ):
        with pytest.raises(ValueError, match="truncation_time"):
            build()


class RecordingNet(GaussianNet):
    """GaussianNet that records the labels it is called with."""

    def __init__(self, sde):
        super().__init__(sde)
        self.labels = []

    def forward(self, x, labels):
        self.labels.append(labels[0].item())
        return super().forward(x, labels)


@pytest.mark.parametrize("name", SDES)
def test_pc_num_steps_apart_from_the_network(name):
    """sampling.num_steps = 50 on a 1000-scale model: 50 evaluations, the samples of the 50-step sampler (same
    seed), the network's labels those of the 1000-scale SDE at the 50 grid times, and the moments of p_eps
    (4.5 standard errors + 25%: the 50-step reverse-diffusion chain's discretisation error)."""
    sde, eps = make_sde(name, N=1000)
    net = RecordingNet(sde)
    config = make_config("pc", predictor="reverse_diffusion", num_steps=50)
    torch.manual_seed(4)
    x, nfe = sampling.get_sampling_fn(config, sde, SHAPE, lambda v: v, eps)(net)
    assert nfe == 50 and sde.N == 1000
    grid = sde.with_num_steps(50, eps).time_grid(50, eps).to(torch.float64)
    expected = 999.0 * grid if net.is_vp else sde.marginal_std(grid)
    assert torch.allclose(torch.tensor(net.labels, dtype=torch.float64), expected, rtol=1e-5)
    sde50, _ = make_sde(name, N=50)
    torch.manual_seed(4)
    x50, _ = sampling.get_sampling_fn(make_config("pc", predictor="reverse_diffusion"), sde50, SHAPE, lambda v: v, eps)(
        GaussianNet(sde50)
    )
    torch.testing.assert_close(x, x50)
    mean, var = marginal(sde, eps)
    check_moments(x, mean, var, var_allowance=0.25)


def test_register_predictor_and_corrector(monkeypatch):
    """score_sde's decorators, with and without a name; a taken name is refused."""
    import samplers.base

    monkeypatch.setattr(samplers.base, "_PREDICTORS", dict(samplers.base._PREDICTORS))
    monkeypatch.setattr(samplers.base, "_CORRECTORS", dict(samplers.base._CORRECTORS))

    @sampling.register_predictor(name="my_predictor")
    class MyPredictor(sampling.Predictor):
        def update_fn(self, x, t):
            return x, x

    @sampling.register_corrector
    class MyCorrector(sampling.Corrector):
        def update_fn(self, x, t):
            return x, x

    assert sampling.get_predictor("my_predictor") is MyPredictor
    assert sampling.get_corrector("MyCorrector") is MyCorrector
    with pytest.raises(ValueError, match="Already registered predictor with name: my_predictor"):
        sampling.register_predictor(MyPredictor, name="my_predictor")
    with pytest.raises(ValueError, match="Already registered corrector"):
        sampling.register_corrector(MyCorrector)


def test_ancestral_sampling_with_probability_flow_names_the_alternatives():
    """score_sde refuses probability flow for ancestral sampling; the error names the predictors that allow it."""
    with pytest.raises(NotImplementedError, match="reverse_diffusion"):
        sampling.AncestralSamplingPredictor(make_sde("vp")[0], lambda x, t: x, probability_flow=True)
