"""Stochastic few-step samplers: EDM's stochastic sampler, DPM-Solver++(2M/3M) SDE and Euler ancestral.

Every sampler works in the scaled variables x_hat = x / alpha and sigma_hat = sigma / alpha = exp(-lambda), with
lambda = log(alpha / sigma) (x_t = alpha x0 + sigma z). There x_hat = x0 + sigma_hat z is a variance-exploding
process for every SDE (VP, subVP, VE, RVE), so one code path serves all of them; the denoiser is evaluated as
D(x_hat, t) = denoise_fn(alpha(t) x_hat, t), with denoise_fn(x, t_vec) -> x0_hat = E[x0 | x_t] (Tweedie).

Common interface: fn(sde, denoise_fn, x, ts, ..., generator=None) -> (x_final, nfe), with ts a float64 1-D grid
from T down to eps (sampling.fast_time_grid / edm_time_grid / logsnr_time_grid), x ~ p_T at ts[0], and nfe the
number of denoise_fn calls made. Noise is drawn with torch.randn from `generator` (the global RNG when None).
The *_num_points helpers map an NFE budget (config.sampling.nfe) to the grid size; get_stochastic_sampler
builds score_sde's sampler(model, z=None) -> (x, nfe) of any of them (sampling.py registers it as the methods
'edm_stochastic', 'dpm_solver_sde' and 'euler_ancestral').
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from samplers.base import check_eps, make_sampling_fn
from samplers.fast import fast_time_grid

Tensor = torch.Tensor
DenoiseFn = Callable[[Tensor, Tensor], Tensor]

# --------------------------------------------------------------------------------------------------
# Shared pieces: validation, scaled noise levels, counting denoiser, noise
# --------------------------------------------------------------------------------------------------


def check_time_grid(ts: Tensor) -> None:
    """ts must be a 1-D grid of >= 2 strictly decreasing times, all positive (T ... eps)."""
    if not isinstance(ts, Tensor) or ts.ndim != 1 or ts.numel() < 2:
        raise ValueError(
            "ts must be a 1-D tensor of at least 2 times from T down to eps (build it with sampling.fast_time_grid; "
            f"config.sampling.nfe sets its size); got {ts!r}."
        )
    values = ts.detach().to("cpu", torch.float64)
    if not bool(torch.all(values[1:] < values[:-1])):
        raise ValueError(f"ts must be strictly decreasing (from T down to eps); got {values.tolist()}.")
    if not float(values[-1]) > 0.0:
        raise ValueError(
            f"The last time ts[-1] = {float(values[-1])} must be > 0 (config.sampling.truncation_time): the "
            "denoiser is not defined at sigma = 0; use denoise=True for a final step to sigma = 0."
        )


def _check_nonnegative(value: float, name: str) -> float:
    """value as a float, >= 0 and finite, else a ValueError naming config.sampling.<name>."""
    v = float(value)
    if not math.isfinite(v) or v < 0.0:
        raise ValueError(f"{name} must be a finite number >= 0 (config.sampling.{name}); got {value}.")
    return v


def _check_noise_scale(s_noise: float) -> float:
    """s_noise as a float, > 0 and finite."""
    v = float(s_noise)
    if not math.isfinite(v) or v <= 0.0:
        raise ValueError(f"s_noise must be a finite number > 0 (config.sampling.s_noise); got {s_noise}.")
    return v


def scaled_levels(sde, ts: Tensor) -> tuple[list[float], list[float]]:
    """(alpha(t_i), sigma_hat(t_i) = sigma(t_i) / alpha(t_i)) on the grid, computed in float64, as Python floats."""
    t64 = ts.detach().to("cpu", torch.float64)
    alpha = sde.alpha(t64).reshape(-1).to(torch.float64)
    sigma = sde.marginal_std(t64).reshape(-1).to(torch.float64)
    return alpha.tolist(), (sigma / alpha).tolist()


def time_at_level(sde, sigma_hat: float) -> tuple[float, float, float]:
    """(t, alpha(t), sigma_hat(t)) at the time where sigma/alpha = sigma_hat: t = sde.t_from_log_snr(-2 log
    sigma_hat); the returned sigma_hat(t) is recomputed from t (it absorbs the inversion's rounding)."""
    lam2 = torch.tensor([-2.0 * math.log(sigma_hat)], dtype=torch.float64)
    t = sde.t_from_log_snr(lam2).reshape(-1).to(torch.float64)
    alpha = float(sde.alpha(t).reshape(-1)[0])
    sigma = float(sde.marginal_std(t).reshape(-1)[0])
    return float(t[0]), alpha, sigma / alpha


class _ScaledDenoiser:
    """D(x_hat, t) = denoise_fn(alpha(t) x_hat, t) with t broadcast to a [B] vector; counts the calls."""

    def __init__(self, denoise_fn: DenoiseFn):
        self.denoise_fn = denoise_fn
        self.count = 0

    def __call__(self, x_hat: Tensor, t: float, alpha: float) -> Tensor:
        self.count += 1
        t_vec = torch.full((x_hat.shape[0],), float(t), dtype=x_hat.dtype, device=x_hat.device)
        return self.denoise_fn(alpha * x_hat, t_vec)


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """z ~ N(0, I) of x's shape and dtype, drawn from generator (on its device) or from the global RNG."""
    if generator is None:
        return torch.randn_like(x)
    z = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
    return z.to(x.device)


def denoiser_from_score(sde, score_fn: Callable[[Tensor, Tensor], Tensor]) -> DenoiseFn:
    """Tweedie's denoiser x0_hat(x, t) = (x + sigma(t)^2 score(x, t)) / alpha(t) of a score function."""

    def denoise_fn(x: Tensor, t: Tensor) -> Tensor:
        shape = (-1, *([1] * (x.ndim - 1)))
        alpha = sde.alpha(t).to(x.dtype).reshape(shape)
        sigma = sde.marginal_std(t).to(x.dtype).reshape(shape)
        return (x + sigma**2 * score_fn(x, t)) / alpha

    return denoise_fn


# --------------------------------------------------------------------------------------------------
# EDM's stochastic sampler (Karras et al. 2022, Algorithm 2)
# --------------------------------------------------------------------------------------------------


def edm_churn_gamma(sigma_hat: float, num_steps: int, s_churn: float, s_tmin: float, s_tmax: float) -> float:
    """gamma_i = min(s_churn / N, sqrt(2) - 1) if s_tmin <= sigma_hat_i <= s_tmax, else 0 (EDM eq. in Alg. 2)."""
    if s_tmin <= sigma_hat <= s_tmax:
        return min(s_churn / num_steps, math.sqrt(2.0) - 1.0)
    return 0.0


def edm_stochastic_sample(
    sde,
    denoise_fn: DenoiseFn,
    x: Tensor,
    ts: Tensor,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    denoise: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, int]:
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2) in x_hat = x/alpha, sigma_hat = sigma/alpha.

    Per step i (N = number of steps = len(ts) - 1 + denoise): raise the level sigma_hat_i to sigma_b = (1 +
    gamma_i) sigma_hat_i (capped at sigma_hat(ts[0]), where the network was trained), x_b = x_hat + s_noise
    sqrt(sigma_b^2 - sigma_hat_i^2) z, then a Heun step of dx_hat/dsigma_hat = (x_hat - D) / sigma_hat from
    sigma_b to sigma_hat_{i+1}. With denoise, a last step to sigma_hat = 0 (churn, then Euler: returns D), as
    EDM's final step. s_churn = 0 gives EDM's deterministic Heun sampler. nfe = 2 (len(ts) - 1) + denoise.
    s_tmin / s_tmax are on the scaled level sigma_hat (EDM's sigma)."""
    check_time_grid(ts)
    s_churn = _check_nonnegative(s_churn, "s_churn")
    s_tmin = _check_nonnegative(s_tmin, "s_tmin")
    if math.isnan(float(s_tmax)) or float(s_tmax) < s_tmin:
        raise ValueError(
            f"s_tmax must be >= s_tmin (config.sampling.s_tmax, config.sampling.s_tmin); got s_tmax = {s_tmax}, "
            f"s_tmin = {s_tmin}."
        )
    s_tmax = float(s_tmax)
    s_noise = _check_noise_scale(s_noise)
    times = ts.detach().to("cpu", torch.float64).tolist()
    alphas, sigmas = scaled_levels(sde, ts)
    num_steps = len(times) - 1 + int(denoise)
    top = sigmas[0]
    D = _ScaledDenoiser(denoise_fn)
    with torch.no_grad():
        x_hat = x / alphas[0]
        for i in range(num_steps):
            last_to_zero = i == len(times) - 1  # the denoising step sigma_hat(eps) -> 0
            t_cur, a_cur, s_cur = times[i], alphas[i], sigmas[i]
            gamma = edm_churn_gamma(s_cur, num_steps, s_churn, s_tmin, s_tmax)
            if gamma > 0.0 and s_cur < top:
                if s_cur * (1.0 + gamma) >= top:
                    t_b, a_b, s_b = times[0], alphas[0], top
                else:
                    t_b, a_b, s_b = time_at_level(sde, s_cur * (1.0 + gamma))
                x_hat = x_hat + s_noise * math.sqrt(max(s_b**2 - s_cur**2, 0.0)) * _randn_like(x_hat, generator)
                t_cur, a_cur, s_cur = t_b, a_b, s_b
            d_cur = (x_hat - D(x_hat, t_cur, a_cur)) / s_cur
            if last_to_zero:
                x_hat = x_hat - s_cur * d_cur  # Euler to sigma_hat = 0: x_hat = D
                break
            s_next = sigmas[i + 1]
            x_euler = x_hat + (s_next - s_cur) * d_cur
            d_next = (x_euler - D(x_euler, times[i + 1], alphas[i + 1])) / s_next
            x_hat = x_hat + (s_next - s_cur) * 0.5 * (d_cur + d_next)
        out = x_hat if denoise else alphas[-1] * x_hat
    return out, D.count


def edm_stochastic_num_points(nfe: int, denoise: bool = True) -> int:
    """Largest grid size n with 2 (n - 1) + denoise <= nfe (as sampling.heun_num_points)."""
    n = (int(nfe) - int(denoise)) // 2 + 1
    if n < 2:
        raise ValueError(f"EDM's stochastic sampler needs nfe >= {2 + int(denoise)} (config.sampling.nfe), got {nfe}.")
    return n


# --------------------------------------------------------------------------------------------------
# DPM-Solver++ SDE (Lu et al. 2022, "DPM-Solver++", SDE-DPM-Solver++(2M); order 3 by the same expansion)
# --------------------------------------------------------------------------------------------------


def dpm_solver_sde_coefficients(h: float, eta: float) -> tuple[float, float, float, float]:
    """(c_x, c_0, c_1, c_2) of one step with k = 1 + eta, z = k h: x_next = c_x x + c_0 D0 + c_1 h D' - c_2 h^2
    D'' + noise, c_x = exp(-z), c_0 = 1 - exp(-z), c_1 = phi2(z) = expm1(-z)/z + 1, c_2 = phi3(z) = phi2/z - 1/2.

    In the scaled variables the SDE family with Langevin strength eta has the exact solution x_hat_t = e^(-k h)
    x_hat_s + int_0^h k e^(-k (h - u)) D(lambda_s + u) du + sigma_hat_t sqrt(1 - e^(-2 eta h)) z; the
    Taylor terms of D integrate to c_0, h phi2 and -h^2 phi3."""
    z = (1.0 + eta) * h
    c_x = math.exp(-z)
    c_0 = -math.expm1(-z)
    phi2 = math.expm1(-z) / z + 1.0
    phi3 = phi2 / z - 0.5
    return c_x, c_0, phi2, phi3


def dpm_solver_sde_sample(
    sde,
    denoise_fn: DenoiseFn,
    x: Tensor,
    ts: Tensor,
    order: int = 2,
    eta: float = 1.0,
    s_noise: float = 1.0,
    denoise: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, int]:
    """Multistep SDE-DPM-Solver++(order) (Lu et al. 2022) in the scaled variables, one denoiser call per step.

    With h = lambda_{i+1} - lambda_i and k = 1 + eta: x_hat_{i+1} = e^(-k h) x_hat_i + (1 - e^(-k h)) D_i + [order
    2, midpoint: (1 - e^(-k h)) (D_i - D_{i-1}) / (2 r), r = h_{i-1} / h] + s_noise sigma_hat_{i+1} sqrt(1 -
    e^(-2 eta h)) z. Order 3 uses the quadratic through the last three D (h phi2 D' - h^2 phi3 D''). The first
    step is order 1, the second at most 2. eta = 1 is the reverse SDE (k-diffusion's dpmpp_2m_sde), eta = 0 the
    deterministic DPM-Solver++(2M). With denoise, a final D at ts[-1] (+1 call). nfe = len(ts) - 1 + denoise."""
    check_time_grid(ts)
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver++ SDE order must be 1, 2 or 3 (config.sampling.dpm_solver_order); got {order!r}.")
    eta = _check_nonnegative(eta, "sde_eta")
    s_noise = _check_noise_scale(s_noise)
    times = ts.detach().to("cpu", torch.float64).tolist()
    alphas, sigmas = scaled_levels(sde, ts)
    lambdas = [-math.log(s) for s in sigmas]
    D = _ScaledDenoiser(denoise_fn)
    history: list[Tensor] = []  # the last denoised outputs, newest last
    with torch.no_grad():
        x_hat = x / alphas[0]
        for i in range(len(times) - 1):
            history = [*history[-2:], D(x_hat, times[i], alphas[i])]
            h = lambdas[i + 1] - lambdas[i]
            c_x, c_0, phi2, phi3 = dpm_solver_sde_coefficients(h, eta)
            step_order = min(order, len(history))
            d0 = history[-1]
            x_next = c_x * x_hat + c_0 * d0
            if step_order == 2:
                r = (lambdas[i] - lambdas[i - 1]) / h
                x_next = x_next + c_0 / (2.0 * r) * (d0 - history[-2])
            elif step_order == 3:
                h0, h1 = lambdas[i] - lambdas[i - 1], lambdas[i - 1] - lambdas[i - 2]
                slope0 = (d0 - history[-2]) / h0
                slope1 = (history[-2] - history[-3]) / h1
                second = 2.0 * (slope0 - slope1) / (h0 + h1)  # D'' at lambda_i
                first = slope0 + 0.5 * h0 * second  # D' at lambda_i
                x_next = x_next + h * phi2 * first - h**2 * phi3 * second
            noise_std = s_noise * sigmas[i + 1] * math.sqrt(-math.expm1(-2.0 * eta * h))
            if noise_std > 0.0:
                x_next = x_next + noise_std * _randn_like(x_hat, generator)
            x_hat = x_next
        out = D(x_hat, times[-1], alphas[-1]) if denoise else alphas[-1] * x_hat
    return out, D.count


def _one_call_per_step_points(nfe: int, denoise: bool, sampler: str) -> int:
    """Grid size n = nfe - denoise + 1 of a sampler with one network call per step."""
    n = int(nfe) - int(denoise) + 1
    if n < 2:
        raise ValueError(f"{sampler} needs nfe >= {1 + int(denoise)} (config.sampling.nfe), got {nfe}.")
    return n


def dpm_solver_sde_num_points(nfe: int, denoise: bool = False) -> int:
    """Grid size n = nfe - denoise + 1 (one call per step)."""
    return _one_call_per_step_points(nfe, denoise, "DPM-Solver++ SDE")


# --------------------------------------------------------------------------------------------------
# Euler ancestral (DDIM-like step to sigma_down, then fresh noise sigma_up)
# --------------------------------------------------------------------------------------------------


def ancestral_levels(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up): sigma_up = min(sigma_next, eta sigma_next sqrt(1 - sigma_next^2 / sigma^2)),
    sigma_down = sqrt(sigma_next^2 - sigma_up^2) (eta = 1: DDPM's posterior noise)."""
    up = min(sigma_next, eta * sigma_next * math.sqrt(max(1.0 - (sigma_next / sigma) ** 2, 0.0)))
    return math.sqrt(max(sigma_next**2 - up**2, 0.0)), up


def euler_ancestral_sample(
    sde,
    denoise_fn: DenoiseFn,
    x: Tensor,
    ts: Tensor,
    eta: float = 1.0,
    s_noise: float = 1.0,
    denoise: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, int]:
    """Euler ancestral sampler in the scaled variables: per step, the DDIM step x_hat <- D + (sigma_down /
    sigma_hat_i) (x_hat - D) to sigma_down, then x_hat += s_noise sigma_up z (ancestral_levels). eta = 1 is
    ancestral (DDPM-like) sampling, eta = 0 deterministic DDIM. With denoise, a last step to sigma_hat = 0
    (returns D at ts[-1]). nfe = len(ts) - 1 + denoise."""
    check_time_grid(ts)
    eta = _check_nonnegative(eta, "sde_eta")
    s_noise = _check_noise_scale(s_noise)
    times = ts.detach().to("cpu", torch.float64).tolist()
    alphas, sigmas = scaled_levels(sde, ts)
    D = _ScaledDenoiser(denoise_fn)
    with torch.no_grad():
        x_hat = x / alphas[0]
        for i in range(len(times) - 1):
            d0 = D(x_hat, times[i], alphas[i])
            down, up = ancestral_levels(sigmas[i], sigmas[i + 1], eta)
            x_hat = d0 + (down / sigmas[i]) * (x_hat - d0)
            if up > 0.0:
                x_hat = x_hat + s_noise * up * _randn_like(x_hat, generator)
        out = D(x_hat, times[-1], alphas[-1]) if denoise else alphas[-1] * x_hat
    return out, D.count


def euler_ancestral_num_points(nfe: int, denoise: bool = True) -> int:
    """Grid size n = nfe - denoise + 1 (one call per step)."""
    return _one_call_per_step_points(nfe, denoise, "Euler ancestral")


# --------------------------------------------------------------------------------------------------
# Model-level samplers
# --------------------------------------------------------------------------------------------------

STOCHASTIC_SAMPLERS = {
    # name: (sampling loop, NFE budget -> grid size, default grid)
    "edm_stochastic": (edm_stochastic_sample, edm_stochastic_num_points, "edm"),
    "dpm_solver_sde": (dpm_solver_sde_sample, dpm_solver_sde_num_points, "logsnr"),
    "euler_ancestral": (euler_ancestral_sample, euler_ancestral_num_points, "logsnr"),
}


def get_stochastic_sampler(
    name: str,
    sde,
    shape,
    inverse_scaler,
    nfe: int = 50,
    eps: float = 1e-3,
    device="cuda",
    denoise: bool = True,
    schedule: str = "",
    continuous: bool = True,
    precision: str = "fp32",
    **sampler_kwargs,
):
    """The stochastic sampler `name` (STOCHASTIC_SAMPLERS) with at most nfe network evaluations from T to eps on
    the grid `schedule` ('' = the sampler's default: 'edm' for edm_stochastic, 'logsnr' otherwise);
    sampler_kwargs go to the sampling loop (s_churn, s_tmin, s_tmax, s_noise, eta, order). Returns
    sampler(model, z=None) -> (x, nfe)."""
    if name not in STOCHASTIC_SAMPLERS:
        raise ValueError(f"Unknown stochastic sampler {name!r}; valid names: {sorted(STOCHASTIC_SAMPLERS)}")
    check_eps(eps, sde)
    sample, num_points_of, default_schedule = STOCHASTIC_SAMPLERS[name]
    schedule = schedule or default_schedule
    num_points = num_points_of(nfe, denoise)
    fast_time_grid(sde, 2, eps, schedule)  # validates the schedule name before any network call

    def loop(param, x):
        ts = fast_time_grid(sde, num_points, eps, schedule, device=x.device)
        return sample(sde, param.denoise, x, ts, denoise=denoise, **sampler_kwargs)

    return make_sampling_fn(loop, sde, shape, inverse_scaler, device, continuous, precision=precision)
