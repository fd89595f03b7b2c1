"""End-to-end training checks with a known answer (issue 13): train, then compare what was learned with the truth.

1. Gaussian images x0 ~ N(mu, Sigma), 3 x 4 x 4 (D = 48) in the model's [-1, 1] range, Sigma with a random eigenbasis
   (non-diagonal) and standard deviations 0.1 .. 0.3 along it.
   - Convention check: the exact score, plugged in as a "model" through likelihood.get_likelihood_fn, gives the
     closed form per image: bpd = -log N(x0; alpha_eps mu, alpha_eps^2 Sigma + sigma_eps^2 I) / (D ln 2) + 7 (VP
     and VE; 'plain' treatment of eps). The 7 is the Jacobian of the data scaler: x = (k + u) / 256 in [0, 1] is
     2 x - 1 in the model's range, so with u8 = 256 x the density of the 8-bit-scale variable is p(y) / 128 per
     dimension and -log2 p(u8) = -log2 p(y) + 7; for uncentered data ([0, 1], offset 8) the same 8-bit data
     give the same bits/dim (checked).
   - Training: a purpose-built Gaussian-family network (its family contains the exact score of every Gaussian,
     so the check isolates training from approximation error) trained from about N(0, I / 4) for 3000 steps of
     batch 128 with losses.get_step_fn
     (likelihood weighting + importance sampling; VP, VE, and VP with Soft Truncation k = 1) reaches the data's
     exact entropy in bits/dim within 3 Monte Carlo standard errors + 0.01 bits/dim, and the KL estimate (paired
     per-image difference of model and exact bits/dim) is below 0.01 bits/dim; its ODE samples' mean and
     covariance match (mu, Sigma) within twice the error expected of exact samples of the same size.
     The untrained network fails both checks.
     (With a well-specified family every weighting has the same minimiser, so these checks test the loss,
     target, time labels, step function, optimizer, EMA, likelihood and sampler together, not the weighting's
     optimality.)
2. A 2-D mixture of three Gaussians (weights 0.5 / 0.3 / 0.2) learned by a generic time-conditioned MLP (VP,
   variance weighting): samples of the PC sampler, the adaptive ODE sampler and DPM-Solver++ at 20 NFE put the
   right mass in each mode (within 0.05: 3 binomial standard errors of 2000 samples is <= 0.034) and most of
   it (>= 80 %; measured 90-93 %, untrained 0 %) within 4 component standard deviations of a centre. The
   untrained MLP fails.

Run with -s to see the measured figures. About 2-3 minutes on 2 cores.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_sde

import likelihood
import losses
import sampling
import sde_lib
from configs.default_cifar10_configs import get_default_configs
from models.ema import ExponentialMovingAverage

pytestmark = pytest.mark.usefixtures("single_thread")

LN2 = math.log(2.0)
SHAPE = (3, 4, 4)
D = int(np.prod(SHAPE))
EPS = 1e-5


def inverse_centered(x):
    """datasets' inverse scaler for centered data: [-1, 1] -> [0, 1]."""
    return (x + 1.0) / 2.0


def identity(x):
    """datasets' scaler / inverse scaler for uncentered data."""
    return x


def gaussian_truth(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu [D], Sigma [D, D]) in float64: a smooth mean image, a random eigenbasis, stds 0.1 .. 0.3."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = SHAPE
    yy, xx = torch.meshgrid(
        torch.linspace(-1, 1, h, dtype=torch.float64), torch.linspace(-1, 1, w, dtype=torch.float64), indexing="ij"
    )
    mu = torch.stack([0.3 * torch.sin(2 * xx + k) * torch.cos(yy - k) for k in range(c)]).reshape(-1)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    stds = torch.logspace(math.log10(0.1), math.log10(0.3), D, dtype=torch.float64)
    return mu, (q * stds**2) @ q.T


def gaussian_nll_bits(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, offset: float) -> torch.Tensor:
    """-log N(x; mean, cov) / (D ln 2) + offset per row of x [n, D] (float64)."""
    dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
    return -dist.log_prob(x) / (D * LN2) + offset


def entropy_bits(cov: torch.Tensor, offset: float) -> float:
    """Differential entropy 0.5 log det(2 pi e Sigma) in bits/dim plus the dequantization offset."""
    logdet = torch.linalg.slogdet(cov)[1]
    return float(0.5 * (D * math.log(2 * math.pi * math.e) + logdet) / (D * LN2) + offset)


def eps_marginal(sde, mu: torch.Tensor, cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha mu, alpha^2 Sigma + sigma^2 I) of p_eps, the law the 'plain' likelihood evaluates at the datum."""
    return marginal_at(sde, EPS, mu, cov)


def marginal_at(sde, t: float, mu: torch.Tensor, cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha(t) mu, alpha(t)^2 Sigma + sigma(t)^2 I): the diffused Gaussian at time t."""
    mean, std = sde.marginal_prob(torch.ones(1, dtype=torch.float64), torch.tensor([t], dtype=torch.float64))
    a, s = float(mean), float(std)
    return a * mu, a**2 * cov + s**2 * torch.eye(D, dtype=torch.float64)


def exact_flow_bits(sde, x: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor, offset: float) -> torch.Tensor:
    """Bits/dim the probability-flow ODE of the exact score gives x [n, D], in closed form.

    For Gaussian data the flow is linear: in the eigenbasis U of Sigma (eigenvalues l) each coordinate of
    x - alpha(t) mu scales by sqrt(v_T / v_eps), v(t) = alpha(t)^2 l + sigma(t)^2. So x_T = alpha_T mu +
    U diag(sqrt(v_T / v_eps)) U^T (x - alpha_eps mu) and -log p(x) = -log prior(x_T) - 0.5 sum log(v_T / v_eps).
    This differs from -log p_eps(x) by how far sde.prior_sampling's N(0, sigma_T^2 I) is from the true p_T
    (1e-3 bits/dim per image for VE with sigma_max = 20: p_T keeps the mean mu).
    """
    lam, vecs = torch.linalg.eigh(cov)
    (a0, s0), (a1, s1) = [
        [
            float(v)
            for v in sde.marginal_prob(torch.ones(1, dtype=torch.float64), torch.tensor([t], dtype=torch.float64))
        ]
        for t in (EPS, sde.T)
    ]
    v0, v1 = a0**2 * lam + s0**2, a1**2 * lam + s1**2
    x_t = a1 * mu + ((x - a0 * mu) @ vecs * torch.sqrt(v1 / v0)) @ vecs.T
    prior = sde.prior_logp(x_t.reshape(-1, *SHAPE)).double()
    return -(prior + 0.5 * torch.log(v1 / v0).sum()) / (D * LN2) + offset


class GaussianFamilyScore(torch.nn.Module):
    """Score network of the Gaussian family N(m, B B^T + 1e-4 I) diffused by `sde` (purpose-built: the exact
    score of the data is in the family, so a training check is not limited by approximation error).

    score(x, t) = -(alpha^2 C + sigma^2 I)^-1 (x - alpha m), by an eigendecomposition of C. Output convention of
    models.utils.get_score_fn: VP labels 999 t and output -sigma * score (noise prediction); VE labels sigma
    and output the score.
    """

    def __init__(self, sde, mean: torch.Tensor, factor: torch.Tensor):
        super().__init__()
        self.sde = sde
        self.mean = torch.nn.Parameter(mean.clone().float())
        self.factor = torch.nn.Parameter(factor.clone().float())

    def covariance(self) -> torch.Tensor:
        """C = B B^T + 1e-4 I."""
        eye = torch.eye(self.factor.shape[0], dtype=self.factor.dtype, device=self.factor.device)
        return self.factor @ self.factor.T + 1e-4 * eye

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if isinstance(self.sde, sde_lib.VESDE):
            alpha, std = torch.ones_like(labels), labels
        else:
            t = labels / 999.0
            alpha, std = self.sde.alpha(t), self.sde.marginal_std(t)
        # eigh in float64: its gradient has 1 / (l_i - l_j) factors (init_factor keeps the l_i apart)
        lam, vecs = [v.to(x.dtype) for v in torch.linalg.eigh(self.covariance().double())]
        alpha, std = alpha.to(x.dtype)[:, None], std.to(x.dtype)[:, None]
        proj = (x.reshape(x.shape[0], -1) - alpha * self.mean.to(x.dtype)) @ vecs
        score = -(proj / (alpha**2 * lam + std**2)) @ vecs.T
        out = score if isinstance(self.sde, sde_lib.VESDE) else -std * score
        return out.reshape(x.shape)


def init_factor(seed: int = 0) -> torch.Tensor:
    """Initial B: N(0, about I / 4) with distinct eigenvalues (a random symmetric perturbation of I / 2)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(D, D, generator=g, dtype=torch.float64)
    return 0.5 * torch.eye(D, dtype=torch.float64) + 0.05 * (a + a.T) / math.sqrt(2 * D)


def exact_model(sde, mu: torch.Tensor, cov: torch.Tensor) -> GaussianFamilyScore:
    """The Gaussian-family network set to the true (mu, Sigma): the exact score as a model."""
    factor = torch.linalg.cholesky(cov - 1e-4 * torch.eye(D, dtype=torch.float64))
    return GaussianFamilyScore(sde, mu, factor)


def bpd_of(sde, model, x: torch.Tensor, inverse_scaler=inverse_centered, tol: float = 1e-5) -> torch.Tensor:
    """likelihood.get_likelihood_fn(...)(model, x) bits/dim with the exact divergence, float64 data."""
    fn = likelihood.get_likelihood_fn(sde, inverse_scaler, hutchinson_type="exact", rtol=tol, atol=tol, eps=EPS)
    with torch.no_grad():
        model = model.double()
    bpd, _, _ = fn(model, x.reshape(-1, *SHAPE).double())
    model.float()
    return bpd.double()


SDES = {name: (lambda name=name: make_sde(name, sigma_max=20.0)[0]) for name in ("vp", "ve")}


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_exact_score_likelihood_matches_closed_form(name):
    """The exact score through get_likelihood_fn gives the closed-form bits/dim per image (offset 7), and the
    same 8-bit data in [0, 1] (offset 8, covariance / 4) give the same bits/dim."""
    sde = SDES[name]()
    mu, cov = gaussian_truth()
    x = gaussian_draw(mu, cov)(6, torch.Generator().manual_seed(3)).double().reshape(6, D)
    bpd = bpd_of(sde, exact_model(sde, mu, cov), x)
    closed = exact_flow_bits(sde, x, mu, cov, offset=7.0)
    print(f"\n[{name}] exact score: bpd {bpd.numpy().round(4)} closed form {closed.numpy().round(4)}")
    assert torch.allclose(bpd, closed, atol=2e-4), (bpd, closed)
    # and -log p_eps(x) itself, up to the prior mismatch (mean 1e-4, per image about 1e-3 bits/dim for VE)
    p_eps = gaussian_nll_bits(x, *eps_marginal(sde, mu, cov), offset=7.0)
    assert abs(float((bpd - p_eps).mean())) < 2e-3
    # the same data scaled to [0, 1]: y = (x + 1) / 2 ~ N((mu + 1) / 2, Sigma / 4), inverse scaler identity
    mu01, cov01 = (mu + 1.0) / 2.0, cov / 4.0
    if name == "vp":
        bpd01 = bpd_of(sde, exact_model(sde, mu01, cov01), (x + 1.0) / 2.0, inverse_scaler=identity)
        closed01 = exact_flow_bits(sde, (x + 1.0) / 2.0, mu01, cov01, offset=8.0)
        assert torch.allclose(bpd01, closed01, atol=2e-4)
        assert torch.allclose(bpd01, bpd, atol=2e-3)  # VP's eps-noise differs by a 1e-6 relative amount


def train_config(lr: float):
    """score_sde's default optimizer section (Adam, grad clip 1) with lr and a short warmup."""
    config = get_default_configs()
    config.optim.lr = lr
    config.optim.warmup = 50
    config.optim.grad_clip = 1.0
    return config


def decaying_optimize_fn(config, n_steps: int):
    """losses.optimization_manager's optimize_fn with lr decayed linearly to 5 % (less SGD noise at the end)."""
    base = losses.optimization_manager(config)

    def optimize_fn(optimizer, params, step):
        lr = config.optim.lr * max(0.05, 1.0 - float(step) / n_steps)
        return base(optimizer, params, step=step, lr=lr, warmup=config.optim.warmup)

    return optimize_fn


def train(model, sde, draw, n_steps: int, batch: int, lr: float, ema_rate: float, seed: int, **step_kw):
    """Train `model` with losses.get_step_fn on fresh batches draw(batch, generator); EMA weights copied in."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    config = train_config(lr)
    optimizer = losses.get_optimizer(config, model.parameters())
    ema = ExponentialMovingAverage(model.parameters(), decay=ema_rate)
    state = dict(model=model, optimizer=optimizer, ema=ema, step=0)
    step_fn = losses.get_step_fn(
        sde, train=True, optimize_fn=decaying_optimize_fn(config, n_steps), reduce_mean=True, continuous=True, **step_kw
    )
    values = []
    for _ in range(n_steps):
        values.append(float(step_fn(state, draw(batch, gen))))
    ema.copy_to(model.parameters())
    return np.array(values)


def gaussian_draw(mu: torch.Tensor, cov: torch.Tensor):
    """draw(n, generator) -> n images [n, *SHAPE] float32 from N(mu, Sigma)."""
    chol = torch.linalg.cholesky(cov)

    def draw(n, gen):
        z = torch.randn(n, D, generator=gen, dtype=torch.float64)
        return (mu + z @ chol.T).float().reshape(n, *SHAPE)

    return draw


def gaussian_checks(sde, model, mu, cov, n_test: int = 256, n_samples: int = 2000, seed: int = 5) -> dict:
    """Measured bits/dim (test images), its Monte Carlo SE, the paired KL estimate and ODE-sample moments."""
    gen = torch.Generator().manual_seed(seed)
    x = gaussian_draw(mu, cov)(n_test, gen).double().reshape(n_test, D)
    torch.manual_seed(seed)
    bpd = bpd_of(sde, model, x, tol=1e-5)
    exact = exact_flow_bits(sde, x, mu, cov, offset=7.0)
    diff = bpd - exact
    sampler = sampling.get_ode_sampler(
        sde, (n_samples, *SHAPE), inverse_centered, rtol=1e-5, atol=1e-5, eps=EPS, device="cpu"
    )
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        samples, _ = sampler(model)
    y = (2.0 * samples - 1.0).double().reshape(n_samples, D)  # back to the model's range
    mean_err = float(torch.linalg.norm(y.mean(0) - mu))
    cov_err = float(torch.linalg.norm(torch.cov(y.T) - cov))
    var = torch.diagonal(cov)
    return dict(
        bpd=float(bpd.mean()),
        bpd_se=float(bpd.std() / math.sqrt(n_test)),
        entropy=entropy_bits(cov, 7.0),
        exact_on_test=float(exact.mean()),
        kl=float(diff.mean()),
        kl_se=float(diff.std() / math.sqrt(n_test)),
        mean_err=mean_err,
        mean_err_exact=math.sqrt(float(var.sum()) / n_samples),  # E||mean - mu||^2 = tr Sigma / n
        cov_err=cov_err,
        cov_err_exact=math.sqrt(float((torch.outer(var, var) + cov**2).sum()) / n_samples),
    )


BPD_MARGIN = 0.01  # bits/dim allowed to training (stated), on top of 3 Monte Carlo standard errors


def gaussian_passes(r: dict) -> bool:
    """The stated Gaussian criteria: bits/dim within 3 SE + 0.01 of the entropy, KL < 0.01 bits/dim (+ 3 SE),
    sample mean and covariance errors within twice those of exact samples."""
    return (
        abs(r["bpd"] - r["entropy"]) <= 3 * r["bpd_se"] + BPD_MARGIN
        and r["kl"] <= BPD_MARGIN + 3 * r["kl_se"]
        and r["mean_err"] <= 2 * r["mean_err_exact"]
        and r["cov_err"] <= 2 * r["cov_err_exact"]
    )


def report(tag: str, r: dict) -> str:
    """One line of the measured figures."""
    return (
        f"[{tag}] bits/dim measured {r['bpd']:.4f} +- {r['bpd_se']:.4f} (SE), exact entropy {r['entropy']:.4f}, "
        f"exact on the test images {r['exact_on_test']:.4f}; KL {r['kl']:.4f} +- {r['kl_se']:.4f} bits/dim; "
        f"|mean err| {r['mean_err']:.4f} (exact samples {r['mean_err_exact']:.4f}), "
        f"|cov err|_F {r['cov_err']:.4f} (exact samples {r['cov_err_exact']:.4f})"
    )


GAUSSIAN_CASES = {
    "vp": dict(sde="vp", st=False),
    "ve": dict(sde="ve", st=False),
    "vp_st": dict(sde="vp", st=True),
}


@pytest.mark.parametrize("case", list(GAUSSIAN_CASES))
def test_gaussian_training_reaches_entropy(case):
    """Likelihood weighting + importance sampling (and Soft Truncation k = 1) learns the Gaussian: bits/dim at
    the entropy, samples with the data's moments; the untrained network fails the same criteria."""
    spec = GAUSSIAN_CASES[case]
    sde = SDES[spec["sde"]]()
    mu, cov = gaussian_truth()
    torch.manual_seed(0)
    init = GaussianFamilyScore(sde, torch.zeros(D, dtype=torch.float64), init_factor())
    untrained = gaussian_checks(sde, init, mu, cov, n_test=32, n_samples=500)
    print(f"\n{report(case + ' untrained', untrained)}")
    assert not gaussian_passes(untrained)

    model = GaussianFamilyScore(sde, torch.zeros(D, dtype=torch.float64), init_factor())
    loss = train(
        model,
        sde,
        gaussian_draw(mu, cov),
        n_steps=3000,
        batch=128,
        lr=1e-2,
        ema_rate=0.99,
        seed=1,
        likelihood_weighting=True,
        importance_sampling=True,
        eps=EPS,
        st=spec["st"],
        k=1.0,
    )
    assert np.isfinite(loss).all()
    r = gaussian_checks(sde, model, mu, cov)
    print(report(case, r))
    assert gaussian_passes(r), r


# ------------------------------------------------------------------------------------------------------------
# a mixture of three Gaussians in 2-D: mass per mode
# ------------------------------------------------------------------------------------------------------------

WEIGHTS = torch.tensor([0.5, 0.3, 0.2])
CENTRES = 0.6 * torch.tensor([[1.0, 0.0], [-0.5, math.sqrt(3) / 2], [-0.5, -math.sqrt(3) / 2]])
COMPONENT_STD = 0.08


def mixture_draw(n: int, gen: torch.Generator) -> torch.Tensor:
    """n points [n, 2, 1, 1] of the mixture sum_k w_k N(c_k, 0.08^2 I)."""
    k = torch.multinomial(WEIGHTS, n, replacement=True, generator=gen)
    return (CENTRES[k] + COMPONENT_STD * torch.randn(n, 2, generator=gen)).reshape(n, 2, 1, 1)


class TimeMLP(torch.nn.Module):
    """A generic noise-prediction MLP for 2-D data [B, 2, 1, 1]: x and a sinusoidal embedding of t = label /
    999 (models.utils.get_score_fn's continuous VP labels), three SiLU layers of 128."""

    def __init__(self, width: int = 128, freqs: int = 8):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(freqs, dtype=torch.float32) / 2.0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(2 + 2 * freqs, width),
            torch.nn.SiLU(),
            torch.nn.Linear(width, width),
            torch.nn.SiLU(),
            torch.nn.Linear(width, width),
            torch.nn.SiLU(),
            torch.nn.Linear(width, 2),
        )

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        t = (labels / 999.0).to(x.dtype)[:, None] * self.freqs.to(x.dtype)
        h = torch.cat([x.reshape(x.shape[0], 2), torch.sin(t), torch.cos(t)], dim=1)
        return self.net(h).reshape(x.shape)


def mode_masses(samples: torch.Tensor) -> tuple[np.ndarray, float]:
    """(fraction of samples nearest to each centre, fraction within 4 component stds of a centre)."""
    pts = samples.reshape(-1, 2).double()
    dist = torch.cdist(pts, CENTRES.double())
    nearest = dist.argmin(1)
    masses = np.array([(nearest == k).double().mean().item() for k in range(len(WEIGHTS))])
    in_mode = float((dist.min(1).values < 4 * COMPONENT_STD).double().mean())
    return masses, in_mode


MASS_TOL = 0.05  # absolute, per mode; 3 binomial SEs of 2000 samples are <= 3 sqrt(0.25 / 2000) = 0.034


def mixture_samplers(sde, n: int) -> dict:
    """The three samplers under test (eps 1e-3, score_sde's VP sampling eps)."""
    shape = (n, 2, 1, 1)
    rd, none = sampling.get_predictor("reverse_diffusion"), sampling.get_corrector("none")
    return {
        "pc": sampling.get_pc_sampler(
            sde, shape, rd, none, identity, snr=0.16, continuous=True, eps=1e-3, device="cpu"
        ),
        "ode": sampling.get_ode_sampler(sde, shape, identity, rtol=1e-4, atol=1e-4, eps=1e-3, device="cpu"),
        "dpm_solver_20": sampling.get_dpm_solver_sampler(sde, shape, identity, num_steps=20, eps=1e-3, device="cpu"),
    }


def mixture_results(sde, model, n: int, seed: int) -> dict:
    """{sampler: (masses, in-mode fraction, nfe)}."""
    out = {}
    for i, (name, sampler) in enumerate(mixture_samplers(sde, n).items()):
        torch.manual_seed(seed + i)
        with torch.no_grad():
            x, nfe = sampler(model)
        out[name] = (*mode_masses(x), int(nfe))
    return out


def mixture_passes(masses: np.ndarray, in_mode: float) -> bool:
    """Right mass in each mode (within MASS_TOL) and >= 80 % of the samples in a mode (untrained: 0 %)."""
    return bool(np.abs(masses - WEIGHTS.numpy()).max() <= MASS_TOL and in_mode >= 0.8)


def test_mixture_mode_masses_pc_ode_dpm_solver():
    """A trained MLP's samples put the right mass in each of three modes with PC, ODE and DPM-Solver++ at 20
    NFE; the untrained MLP fails."""
    sde = sde_lib.VPSDE(beta_min=0.1, beta_max=20.0, N=500)
    torch.manual_seed(0)
    untrained = TimeMLP()
    for name, (masses, in_mode, _nfe) in mixture_results(sde, untrained, 500, seed=10).items():
        print(f"\n[mixture untrained, {name}] masses {masses.round(3)}, in a mode {in_mode:.3f}")
        assert not mixture_passes(masses, in_mode)
    model = TimeMLP()
    loss = train(model, sde, mixture_draw, n_steps=3000, batch=256, lr=2e-3, ema_rate=0.995, seed=2)
    assert np.isfinite(loss).all()
    for name, (masses, in_mode, nfe) in mixture_results(sde, model, 2000, seed=20).items():
        print(
            f"[mixture, {name}, {nfe} NFE] masses {masses.round(3)} (true {WEIGHTS.numpy()}), in a mode {in_mode:.3f}"
        )
        assert mixture_passes(masses, in_mode), (name, masses, in_mode)
