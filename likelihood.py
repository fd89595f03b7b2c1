"""Likelihood (bits/dim) of score-based models: probability-flow ODE and the continuous-time NELBO.

Public API kept from score_sde_pytorch: get_div_fn(fn), get_likelihood_fn(sde, inverse_scaler,
hutchinson_type, rtol, atol, method, eps) -> likelihood_fn(model, data) -> (bpd, z, nfe).
Additions: hutchinson_type 'exact', truncation 'plain' | 'exact' (Soft Truncation's treatment of eps),
get_nelbo_fn, and score-function level entry points (ode_likelihood, nelbo, and .from_score on the returned
functions) that take any score_fn(x, t), so the math is testable with analytic scores.

Conventions (papers.md sections 1, 3, 6). Forward kernel p_0t(x_t | x0) = N(alpha(t) x0, sigma(t)^2 I),
D = number of dimensions, g^2(t) the squared diffusion. `data` is already scaled to the model's range (data
scaler applied). Uniform dequantization x = (k + u) / 256 is done by the caller
(datasets.get_dataset(config, uniform_dequantization=True)), never here.
bpd = nll_nats / (D ln 2) + offset, offset = 7 - inverse_scaler(-1) (7 for data in [-1, 1], 8 for [0, 1]):
the change of variables from 8-bit integers to the model's range.

Truncation treatments of the smallest time eps:
  'plain' (score_sde): treat the datum as a sample at time eps; the ODE gives -log p_eps(x0).
  'exact' (Soft Truncation, Kim et al. 2022): draw x_eps = alpha x0 + sigma z, integrate the ODE from x_eps
    and add R_eps = E[-log q(x0 | x_eps)] - H(p_0eps(. | x0)), q = N((x_eps + sigma^2 s) / alpha,
    (sigma / alpha)^2 I). Closed form (residual_nats), as alpha x0 - x_eps - sigma^2 s = -sigma (z + sigma s),
    -log q = D/2 log(2 pi sigma^2 / alpha^2) + ||z + sigma s||^2 / 2 and H = D/2 log(2 pi e sigma^2), so
    R_eps = -D log alpha + (E||z + sigma s||^2 - D) / 2.
    Variational bound with decoder q: -log p(x0) <= E_{x_eps}[-log p_eps(x_eps)] + R_eps.
  decoder='lossless' (the Soft Truncation repository's data.dequantization = 'lossless'): q is discretized
    over the 256 levels of 8-bit data (Ho et al. 2020's discretized Gaussian, bins of width 2/255 in [-1, 1],
    open-ended edge bins), so the bound is on the discrete -log P(x0) and no dequantization offset is added:
    -log P(x0) <= E_{x_eps}[-log p_eps(x_eps) - log Q(x0 | x_eps)] - H(p_0eps(. | x0)).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

import parametrization
from samplers.ode import adaptive_solver_options, probability_flow_drift
from sde_lib import broadcast_to

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_HUTCHINSON_TYPES = ("Gaussian", "Rademacher", "exact")
_TRUNCATIONS = ("plain", "exact")


# ------------------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------------------


def _sum_except_batch(x: torch.Tensor) -> torch.Tensor:
    """sum_i x[b, i] over every non-batch dimension."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def alpha_and_std(sde, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha(t), sigma(t)) of the kernel N(alpha x0, sigma^2 I) (sde.alpha / sde.marginal_std if present)."""
    if hasattr(sde, "alpha") and hasattr(sde, "marginal_std"):
        return sde.alpha(t), sde.marginal_std(t)
    mean, std = sde.marginal_prob(torch.ones_like(t), t)
    return mean, std


def diffusion_sq(sde, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """g^2(t) [B]; uses sde.diffusion_sq if present, else the diffusion returned by sde.sde."""
    if hasattr(sde, "diffusion_sq"):
        return sde.diffusion_sq(t)
    return sde.sde(x, t)[1] ** 2


def bpd_offset(inverse_scaler: Callable) -> float:
    """Offset 7 - inverse_scaler(-1) of bits/dim (score_sde): 7 for data in [-1, 1], 8 for [0, 1]."""
    return 7.0 - float(inverse_scaler(torch.tensor(-1.0)))


def nats_to_bpd(nll: torch.Tensor, num_dims: int, offset: float) -> torch.Tensor:
    """bpd = nll / (D ln 2) + offset."""
    return nll / (num_dims * math.log(2.0)) + offset


_DECODERS = ("gaussian", "lossless")
_BIN_HALF_WIDTH = 1.0 / 255.0  # 256 levels k / 255 of [0, 1] mapped to [-1, 1]: spacing 2 / 255
_EDGE = 0.999  # values beyond +-0.999 in [-1, 1] are the edge levels 0 and 255


def _check_decoder(decoder: str, truncation: str) -> None:
    """decoder must be known; the lossless decoder belongs to the exact truncation treatment."""
    if decoder not in _DECODERS:
        raise ValueError(f"decoder {decoder!r} unknown; use one of {_DECODERS}.")
    if decoder == "lossless" and truncation != "exact":
        raise ValueError(
            "The lossless (discretized) decoder is the exact truncation's decoder q(x0 | x_eps): use "
            "truncation='exact' (config.eval.residual=True) with data.dequantization='lossless'."
        )


def _log_bin_mass(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """log(Phi(hi) - Phi(lo)) for lo <= hi, in log space on the side of the mean where it does not cancel:
    log Phi(b) + log(1 - exp(log Phi(a) - log Phi(b))) with (a, b) = (lo, hi), or (-hi, -lo) when lo > 0."""
    flip = lo > 0  # Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi)
    log_a = torch.special.log_ndtr(torch.where(flip, -hi, lo))
    log_b = torch.special.log_ndtr(torch.where(flip, -lo, hi))
    return log_b + torch.log(-torch.expm1(torch.clamp(log_a - log_b, max=-1e-30)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log Q(x) per dimension of 8-bit data x in [-1, 1] under N(means, exp(log_scales)^2) discretized to bins
    [x - 1/255, x + 1/255], the edge levels taking the tails (Ho et al. 2020, eq. 13; the bin mass is floored at
    1e-12 as in the Soft Truncation repository, which used a tanh approximation of Phi where this uses Phi).
    Computed in float64 (Phi's tails) and returned in x's dtype."""
    x64, m64 = x.double(), means.double()
    inv_std = torch.exp(-log_scales.double())
    lo = (x64 - m64 - _BIN_HALF_WIDTH) * inv_std
    hi = (x64 - m64 + _BIN_HALF_WIDTH) * inv_std
    log_below = torch.special.log_ndtr(hi)  # level 0: (-inf, x + 1/255]
    log_above = torch.special.log_ndtr(-lo)  # level 255: [x - 1/255, inf)
    log_q = torch.where(x64 < -_EDGE, log_below, torch.where(x64 > _EDGE, log_above, _log_bin_mass(lo, hi)))
    return torch.clamp(log_q, min=math.log(1e-12)).to(x.dtype)


def to_pm1_affine(inverse_scaler: Callable) -> tuple[float, float]:
    """(a, b) with 2 inverse_scaler(x) - 1 = a x + b: the model's data range mapped to [-1, 1] (a = 1, b = 0
    for centered data, a = 2, b = -1 for data in [0, 1])."""
    zero = float(inverse_scaler(torch.tensor(0.0)))
    one = float(inverse_scaler(torch.tensor(1.0)))
    return 2.0 * (one - zero), 2.0 * zero - 1.0


def gaussian_decoder(
    sde, score_fn: ScoreFn, x_eps: torch.Tensor, t_eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The truncation decoder q(x0 | x_eps) = N(mean, std^2 I): mean = (x_eps + sigma^2 s(x_eps, eps)) / alpha,
    std = sigma / alpha [B] (Tweedie's denoiser; the Soft Truncation repository's 'scoreflow' variance)."""
    alpha, std = alpha_and_std(sde, t_eps)
    mean = (x_eps + broadcast_to(std, x_eps) ** 2 * score_fn(x_eps, t_eps)) / broadcast_to(alpha, x_eps)
    return mean, std / alpha


def lossless_decoder_nll(
    x0: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, inverse_scaler: Callable
) -> torch.Tensor:
    """-sum_i log Q(x0_i) [B] of 8-bit data x0 (model range) under the decoder N(mean, std^2) discretized to
    the 256 levels, evaluated in [-1, 1] coordinates (x -> a x + b, std -> a std, a and b of to_pm1_affine)."""
    a, b = to_pm1_affine(inverse_scaler)
    log_scales = torch.log(a * broadcast_to(std, x0)).expand_as(x0)
    log_q = discretized_gaussian_log_likelihood(a * x0 + b, a * mean + b, log_scales)
    return -_sum_except_batch(log_q)


def gaussian_entropy(std: torch.Tensor, num_dims: int) -> torch.Tensor:
    """H(N(m, std^2 I_D)) = D/2 (log(2 pi) + 2 log std + 1) [B]."""
    return 0.5 * num_dims * (math.log(2.0 * math.pi) + 2.0 * torch.log(std) + 1.0)


def lossless_residual_nats(
    sde, score_fn: ScoreFn, x0: torch.Tensor, t_eps: torch.Tensor, z: torch.Tensor, inverse_scaler: Callable
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_eps, R_hat): x_eps = alpha x0 + sigma z and R_hat = -log Q(x0 | x_eps) - H(p_0eps(. | x0)) with the
    discretized decoder Q (lossless_decoder_nll), an unbiased estimate of the lossless residual."""
    alpha, std = alpha_and_std(sde, t_eps)
    x_eps = broadcast_to(alpha, x0) * x0 + broadcast_to(std, x0) * z
    with torch.no_grad():
        mean, q_std = gaussian_decoder(sde, score_fn, x_eps, t_eps)
    nll = lossless_decoder_nll(x0, mean, q_std, inverse_scaler)
    return x_eps, nll - gaussian_entropy(std, x0[0].numel())


def draw_probe(x: torch.Tensor, hutchinson_type: str) -> torch.Tensor | None:
    """Hutchinson probe: Gaussian N(0, I) or Rademacher +-1 (None for the exact divergence)."""
    if hutchinson_type == "Gaussian":
        return torch.randn_like(x)
    if hutchinson_type == "Rademacher":
        return torch.randint_like(x, low=0, high=2) * 2.0 - 1.0
    if hutchinson_type == "exact":
        return None
    raise ValueError(
        f"Hutchinson type {hutchinson_type!r} unknown; use one of {_HUTCHINSON_TYPES} (config.eval.hutchinson_type)."
    )


# ------------------------------------------------------------------------------------------------------------
# divergence
# ------------------------------------------------------------------------------------------------------------


def get_div_fn(fn: Callable) -> Callable:
    """Hutchinson-Skilling estimator div fn(x) ~= eps^T (d fn / dx) eps, E[eps eps^T] = I (score_sde API)."""

    def div_fn(x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            fn_eps = torch.sum(fn(x, t) * eps)
            grad_fn_eps = torch.autograd.grad(fn_eps, x)[0]
        return _sum_except_batch(grad_fn_eps * eps)

    return div_fn


def get_exact_div_fn(fn: Callable) -> Callable:
    """Exact divergence sum_i d fn_i / d x_i by D backward passes (for small D)."""

    def div_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            out = fn(x, t).reshape(x.shape[0], -1)
            div = torch.zeros(x.shape[0], dtype=out.dtype, device=out.device)
            for i in range(out.shape[1]):
                grad_i = torch.autograd.grad(out[:, i].sum(), x, retain_graph=i < out.shape[1] - 1)[0]
                div = div + grad_i.reshape(x.shape[0], -1)[:, i]
        return div

    return div_fn


def _drift_and_div(fn: Callable, x: torch.Tensor, t: torch.Tensor, probe: torch.Tensor | None):
    """(fn(x, t), div fn(x, t)) from one forward pass: Hutchinson with `probe`, exact if probe is None."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = fn(x, t)
        if probe is not None:
            grad = torch.autograd.grad(torch.sum(out * probe), x)[0]
            div = _sum_except_batch(grad * probe)
        else:
            flat = out.reshape(x.shape[0], -1)
            div = torch.zeros(x.shape[0], dtype=out.dtype, device=out.device)
            for i in range(flat.shape[1]):
                grad_i = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)[0]
                div = div + grad_i.reshape(x.shape[0], -1)[:, i]
    return out.detach(), div.detach()


# ------------------------------------------------------------------------------------------------------------
# ODE solver (on the device, no NumPy round trip)
# ------------------------------------------------------------------------------------------------------------


def _odeint(func: Callable, y0: tuple, t0: float, t1: float, rtol: float, atol: float, method: str):
    """y(t1) for dy/dt = func(t, y), y(t0) = y0, by torchdiffeq ('RK45'/'dopri5': adaptive Dormand-Prince)."""
    try:
        from torchdiffeq import odeint
    except ImportError as err:  # pragma: no cover - torchdiffeq is a project dependency
        raise ImportError("likelihood.py needs torchdiffeq: pip install torchdiffeq") from err
    solver = {"RK45": "dopri5", "dopri5": "dopri5", "DOP853": "dopri8", "dopri8": "dopri8"}.get(method, method)
    ts = torch.tensor([t0, t1], dtype=y0[0].dtype, device=y0[0].device)
    out = odeint(func, y0, ts, rtol=rtol, atol=atol, method=solver, options=adaptive_solver_options(solver, ts))
    return tuple(o[-1] for o in out)


def ode_likelihood(
    sde,
    score_fn: ScoreFn,
    data: torch.Tensor,
    hutchinson_type: str = "Rademacher",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "RK45",
    eps: float = 1e-5,
    truncation: str = "plain",
    ode_dtype: torch.dtype | None = torch.float64,
    decoder: str = "gaussian",
    inverse_scaler: Callable | None = None,
    lambda_: float = 0.0,
) -> dict:
    """NLL (nats) from the probability-flow ODE: log p_eps(x_eps) = log p_T(x_T) + int_eps^T div(drift) dt.

    Returns dict(nll [B] nats, prior_logp [B], delta_logp [B], residual [B] (0 for 'plain'), z = x_T, nfe).
    The ODE state (x, int div) is kept in `ode_dtype` (float64 like score_sde's SciPy solver; None: the data
    dtype); the score function is evaluated in the data dtype. One Hutchinson probe per call (score_sde).
    decoder='lossless' (with truncation='exact' and the inverse_scaler giving the data range) uses the
    discretized decoder: nll is then the discrete -log P(x0) bound. lambda_: see probability_flow_drift.
    """
    if truncation not in _TRUNCATIONS:
        raise ValueError(f"truncation {truncation!r} unknown; use one of {_TRUNCATIONS}.")
    _check_decoder(decoder, truncation)
    if decoder == "lossless" and inverse_scaler is None:
        raise ValueError("decoder='lossless' needs the inverse_scaler (the data range of the 256 levels).")
    if hutchinson_type not in _HUTCHINSON_TYPES:
        raise ValueError(f"Hutchinson type {hutchinson_type!r} unknown; use one of {_HUTCHINSON_TYPES}.")
    if not 0.0 < eps < sde.T:
        raise ValueError(f"eps={eps} must lie in (0, T={sde.T}).")
    shape, dtype, device = data.shape, data.dtype, data.device
    batch = shape[0]
    nfe = 0
    residual = torch.zeros(batch, dtype=dtype, device=device)
    x_start = data
    if truncation == "exact":
        t_eps = torch.full((batch,), eps, dtype=dtype, device=device)
        z = torch.randn_like(data)
        if decoder == "lossless":
            x_start, residual = lossless_residual_nats(sde, score_fn, data, t_eps, z, inverse_scaler)
        else:
            x_start, residual = residual_nats(sde, score_fn, data, t_eps, z)
        nfe += 1
    probe = draw_probe(x_start, hutchinson_type)
    drift_fn = probability_flow_drift(sde, score_fn, lambda_)
    state_dtype = dtype if ode_dtype is None else ode_dtype

    def ode_func(t: torch.Tensor, state: tuple) -> tuple:
        nonlocal nfe
        nfe += 1
        x = state[0].to(dtype)
        vec_t = torch.full((batch,), float(t), dtype=dtype, device=device)
        drift, div = _drift_and_div(drift_fn, x, vec_t, probe)
        return drift.to(state_dtype), div.to(state_dtype)

    y0 = (x_start.to(state_dtype), torch.zeros(batch, dtype=state_dtype, device=device))
    with torch.no_grad():
        x_T, delta_logp = _odeint(ode_func, y0, eps, sde.T, rtol, atol, method)
    z_T = x_T.to(dtype)
    prior_logp = sde.prior_logp(z_T).to(state_dtype)
    nll = -(prior_logp + delta_logp) + residual.to(state_dtype)
    return dict(
        nll=nll.to(dtype),
        prior_logp=prior_logp.to(dtype),
        delta_logp=delta_logp.to(dtype),
        residual=residual,
        z=z_T,
        nfe=nfe,
    )


def residual_nats(
    sde, score_fn: ScoreFn, x0: torch.Tensor, t_eps: torch.Tensor, z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_eps, R_hat): x_eps = alpha x0 + sigma z, R_hat unbiased for R_eps = E[-log q(x0|x_eps)] - H(p_0eps).

    R_eps = -D log alpha + (E||z + sigma s||^2 - D) / 2 (module docstring); E||z||^2 = D is used exactly,
    so the estimate is -D log alpha + (sigma^2 ||s||^2 + 2 sigma s.z) / 2 (lower variance, same mean).
    """
    alpha, std = alpha_and_std(sde, t_eps)
    x_eps = broadcast_to(alpha, x0) * x0 + broadcast_to(std, x0) * z
    with torch.no_grad():
        sigma_s = broadcast_to(std, x0) * score_fn(x_eps, t_eps)
    num_dims = x0[0].numel()
    quad = _sum_except_batch(sigma_s**2 + 2.0 * sigma_s * z)
    return x_eps, -num_dims * torch.log(alpha) + 0.5 * quad


def get_likelihood_fn(
    sde,
    inverse_scaler: Callable,
    hutchinson_type: str = "Rademacher",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "RK45",
    eps: float = 1e-5,
    truncation: str = "plain",
    ode_dtype: torch.dtype | None = torch.float64,
    decoder: str = "gaussian",
    lambda_: float = 0.0,
    precision: str = "fp32",
) -> Callable:
    """likelihood_fn(model, data) -> (bpd [B], z = x_T, nfe), data in the model's range (score_sde API).

    The model is called through its parametrisation (parametrization.get_parametrization, eval mode); with
    precision 'bf16' / 'fp16' the network runs under autocast while the ODE state and the divergence integral stay
    in ode_dtype (float64 by default; float32 at least).
    likelihood_fn.from_score(score_fn, data) does the same for any score function score_fn(x, t).
    decoder='lossless' (truncation='exact'): bits/dim of the discrete data under the discretized decoder, no
    dequantization offset. lambda_: the reverse-SDE drift weight of probability_flow_drift (0: the ODE).
    """
    if hutchinson_type not in _HUTCHINSON_TYPES:
        raise ValueError(f"Hutchinson type {hutchinson_type!r} unknown; use one of {_HUTCHINSON_TYPES}.")
    if truncation not in _TRUNCATIONS:
        raise ValueError(f"truncation {truncation!r} unknown; use one of {_TRUNCATIONS}.")
    _check_decoder(decoder, truncation)
    offset = 0.0 if decoder == "lossless" else bpd_offset(inverse_scaler)

    def from_score(score_fn: ScoreFn, data: torch.Tensor):
        out = ode_likelihood(
            sde,
            score_fn,
            data,
            hutchinson_type,
            rtol,
            atol,
            method,
            eps,
            truncation,
            ode_dtype,
            decoder=decoder,
            inverse_scaler=inverse_scaler,
            lambda_=lambda_,
        )
        bpd = nats_to_bpd(out["nll"], data[0].numel(), offset)
        return bpd, out["z"], out["nfe"]

    def likelihood_fn(model: torch.nn.Module, data: torch.Tensor):
        score_fn = parametrization.get_parametrization(
            sde, model, train=False, continuous=True, precision=precision
        ).score
        return from_score(score_fn, data)

    likelihood_fn.from_score = from_score
    return likelihood_fn


# ------------------------------------------------------------------------------------------------------------
# continuous-time NELBO (denoising score matching bound with likelihood weighting)
# ------------------------------------------------------------------------------------------------------------


def _control_weight(alpha: torch.Tensor, std: torch.Tensor, data_std: float) -> torch.Tensor:
    """w(t) = (alpha^2 c^2 / (alpha^2 c^2 + sigma^2))^2, about E||sigma s + z||^2 / D for N(., c^2 I) data."""
    a2c2 = alpha**2 * data_std**2
    return (a2c2 / (a2c2 + std**2)) ** 2


def _importance_table(sde, eps: float, num_grid: int, device: torch.device, data_std: float):
    """Tabulated CDF in s = log t of the proposal for t on [eps, T] (float64): an equal mixture of
    p_1 ~ g^2 / sigma^2 (likelihood-weighting importance sampling) and p_2 ~ (g^2 / sigma^2) (1 - w(t)), the
    second flattening the integrand for smooth data, the first keeping small t covered (defensive mixture)."""
    s = torch.linspace(math.log(eps), math.log(sde.T), num_grid, dtype=torch.float64, device=device)
    t = torch.exp(s)
    alpha, std = alpha_and_std(sde, t)
    dens_is = diffusion_sq(sde, t, t) / std**2 * t  # density in log t
    dens_cv = dens_is * (1.0 - _control_weight(alpha, std, data_std))
    ds = s[1:] - s[:-1]

    def cells(d):
        c = 0.5 * (d[1:] + d[:-1]) * ds
        return c / c.sum()

    cell = 0.5 * (cells(dens_is) + cells(dens_cv))
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64, device=device), torch.cumsum(cell, 0)])
    return s, cdf / cdf[-1]


def _sample_importance(s_grid: torch.Tensor, cdf: torch.Tensor, u: torch.Tensor):
    """Inverse CDF of the tabulated law: t and its exact density p(t) = (dF/ds) / t (unbiased weights)."""
    k = torch.searchsorted(cdf, u.clamp(0.0, 1.0 - 1e-12), right=True).clamp(1, len(cdf) - 1) - 1
    ds = s_grid[k + 1] - s_grid[k]
    dF = cdf[k + 1] - cdf[k]
    s = s_grid[k] + (u - cdf[k]) / dF * ds
    t = torch.exp(s)
    return t, dF / ds / t


def _gaussian_prior_var(sde, x: torch.Tensor) -> float | None:
    """Variance c^2 of an isotropic N(0, c^2 I) prior read off sde.prior_logp in float64 (None if not one)."""
    num_dims = x[0].numel()
    zero = torch.zeros_like(x[:1], dtype=torch.float64)
    probe = torch.linspace(-1.0, 2.0, num_dims, dtype=torch.float64, device=x.device).reshape(zero.shape)
    lp0 = float(sde.prior_logp(zero)[0])
    lp1 = float(sde.prior_logp(torch.ones_like(zero))[0])
    lp2 = float(sde.prior_logp(probe)[0])
    if not lp0 > lp1:
        return None
    c2 = num_dims / (2.0 * (lp0 - lp1))
    ok_quad = abs((lp0 - lp2) - float((probe**2).sum()) / (2.0 * c2)) <= 1e-6 * abs(lp0 - lp2) + 1e-9
    ok_norm = abs(lp0 + 0.5 * num_dims * math.log(2 * math.pi * c2)) <= 1e-6 * abs(lp0) + 1e-9
    return c2 if ok_quad and ok_norm else None


def prior_cross_entropy(sde, x0: torch.Tensor, num_samples: int = 16) -> torch.Tensor:
    """E_{x_T|x0}[-log pi(x_T)] [B] = -log pi(alpha_T x0) + D sigma_T^2 / (2 c^2) for pi = N(0, c^2 I)."""
    batch = x0.shape[0]
    t_T = torch.full((batch,), sde.T, dtype=x0.dtype, device=x0.device)
    alpha_T, std_T = alpha_and_std(sde, t_T)
    mean_T = broadcast_to(alpha_T, x0) * x0
    c2 = _gaussian_prior_var(sde, x0)
    if c2 is not None:
        return -sde.prior_logp(mean_T) + x0[0].numel() * std_T**2 / (2.0 * c2)
    total = torch.zeros(batch, dtype=x0.dtype, device=x0.device)
    for _ in range(num_samples):
        total = total - sde.prior_logp(mean_T + broadcast_to(std_T, x0) * torch.randn_like(x0))
    return total / num_samples


def nelbo(
    sde,
    score_fn: ScoreFn,
    x0: torch.Tensor,
    eps: float = 1e-5,
    num_t: int = 64,
    truncation: str = "exact",
    antithetic: bool = True,
    data_std: float = 0.5,
    num_grid: int = 2048,
    decoder: str = "gaussian",
    inverse_scaler: Callable | None = None,
) -> dict:
    """Continuous-time NELBO (nats) of the SDE model on [eps, T] (Song et al. 2021, Thm 1, x0 kernel):

    E_{x_eps}[-log p_eps(x_eps)] <= E[-log pi(x_T)] - D log(alpha_T / alpha_eps)
                                    + 1/2 int_eps^T (g^2 / sigma^2) (E||sigma s(x_t, t) + z||^2 - D) dt,
    i.e. KL(path | x0 || model path) + H(p_0eps(.|x0)), where H(p_0t(.|x0)) = D/2 log(2 pi e sigma_t^2) is
    folded in with g^2 / sigma^2 = d log sigma^2 / dt - 2 d log alpha / dt. 'exact' adds R_eps (then it bounds
    -log p(x0)); 'plain' does not (it bounds the cross-entropy of p_eps around x0).

    Monte Carlo, unbiased for any data_std: t from the tabulated proposal of _importance_table (half
    p ~ g^2 / sigma^2, half p ~ (g^2 / sigma^2)(1 - w)), stratified (num_t strata, one t per datum each) and
    weighted by its exact density; antithetic noise pairs (z, -z); control variate w(t) (||z||^2 - D) with
    w = (alpha^2 c^2 / (alpha^2 c^2 + sigma^2))^2, c = data_std (0.5 ~ pixel std of images in [-1, 1]).
    For N(mu, c^2 I) data and the exact score the estimate has almost no variance.
    decoder='lossless' (truncation='exact', needs inverse_scaler): R_eps with the discretized decoder, so the
    total bounds the discrete -log P(x0).
    Returns dict(nelbo [B], prior [B], diffusion [B], residual [B]) in nats.
    """
    if truncation not in _TRUNCATIONS:
        raise ValueError(f"truncation {truncation!r} unknown; use one of {_TRUNCATIONS}.")
    _check_decoder(decoder, truncation)
    if decoder == "lossless" and inverse_scaler is None:
        raise ValueError("decoder='lossless' needs the inverse_scaler (the data range of the 256 levels).")
    if not 0.0 < eps < sde.T:
        raise ValueError(f"eps={eps} must lie in (0, T={sde.T}).")
    batch, dtype, device = x0.shape[0], x0.dtype, x0.device
    num_dims = x0[0].numel()
    s_grid, cdf = _importance_table(sde, eps, num_grid, device, data_std)
    t_eps = torch.full((batch,), eps, dtype=torch.float64, device=device)
    t_T = torch.full((batch,), sde.T, dtype=torch.float64, device=device)
    log_alpha_ratio = torch.log(alpha_and_std(sde, t_T)[0]) - torch.log(alpha_and_std(sde, t_eps)[0])
    prior = prior_cross_entropy(sde, x0).double() - num_dims * log_alpha_ratio
    diffusion = torch.zeros(batch, dtype=torch.float64, device=device)
    for i in range(num_t):
        u = (i + torch.rand(batch, dtype=torch.float64, device=device)) / num_t
        t64, p_t = _sample_importance(s_grid, cdf, u)
        alpha64, std64 = alpha_and_std(sde, t64)
        weight = diffusion_sq(sde, t64, t64) / std64**2 / p_t  # (g^2 / sigma^2) / p(t)
        w_cv = _control_weight(alpha64, std64, data_std)
        t, alpha, std = t64.to(dtype), alpha64.to(dtype), std64.to(dtype)
        z = torch.randn_like(x0)
        signs = (1.0, -1.0) if antithetic else (1.0,)
        term = torch.zeros(batch, dtype=torch.float64, device=device)
        for sign in signs:
            zs = sign * z
            x_t = broadcast_to(alpha, x0) * x0 + broadcast_to(std, x0) * zs
            with torch.no_grad():
                sq = _sum_except_batch((broadcast_to(std, x0) * score_fn(x_t, t) + zs) ** 2).double()
            term = term + sq - num_dims - w_cv * (_sum_except_batch(zs**2).double() - num_dims)
        diffusion = diffusion + 0.5 * weight * term / len(signs)
    diffusion = diffusion / num_t
    residual = torch.zeros(batch, dtype=torch.float64, device=device)
    if truncation == "exact" and decoder == "lossless":
        z_eps = torch.randn_like(x0)
        residual = lossless_residual_nats(sde, score_fn, x0, t_eps.to(dtype), z_eps, inverse_scaler)[1].double()
    elif truncation == "exact":
        residual = residual_nats(sde, score_fn, x0, t_eps.to(dtype), torch.randn_like(x0))[1].double()
    total = prior + diffusion + residual
    return dict(
        nelbo=total.to(dtype),
        prior=prior.to(dtype),
        diffusion=diffusion.to(dtype),
        residual=residual.to(dtype),
    )


def get_nelbo_fn(
    sde,
    inverse_scaler: Callable,
    eps: float = 1e-5,
    num_t: int = 64,
    truncation: str = "exact",
    antithetic: bool = True,
    data_std: float = 0.5,
    decoder: str = "gaussian",
    precision: str = "fp32",
) -> Callable:
    """nelbo_fn(model, data) -> NELBO in bits/dim [B]; nelbo_fn.from_score(score_fn, data) likewise.
    decoder='lossless': the discrete-data bound (no dequantization offset). precision: the network's autocast."""
    if truncation not in _TRUNCATIONS:
        raise ValueError(f"truncation {truncation!r} unknown; use one of {_TRUNCATIONS}.")
    _check_decoder(decoder, truncation)
    offset = 0.0 if decoder == "lossless" else bpd_offset(inverse_scaler)

    def from_score(score_fn: ScoreFn, data: torch.Tensor) -> torch.Tensor:
        out = nelbo(
            sde,
            score_fn,
            data,
            eps,
            num_t,
            truncation,
            antithetic,
            data_std,
            decoder=decoder,
            inverse_scaler=inverse_scaler,
        )
        return nats_to_bpd(out["nelbo"], data[0].numel(), offset)

    def nelbo_fn(model: torch.nn.Module, data: torch.Tensor) -> torch.Tensor:
        score_fn = parametrization.get_parametrization(
            sde, model, train=False, continuous=True, precision=precision
        ).score
        return from_score(score_fn, data)

    nelbo_fn.from_score = from_score
    return nelbo_fn
