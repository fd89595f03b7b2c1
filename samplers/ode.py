"""The probability-flow ODE (Song et al. 2021, eq. 13) with an adaptive solver, in both directions: the ODE
sampler, the data <-> latent encoder / decoder, and the drift shared with likelihood.py."""

from __future__ import annotations

from collections.abc import Callable

import torch

from models.utils import get_score_fn
from samplers.base import CountingScoreFn, ScoreFn, broadcast_to, check_eps, make_sampling_fn

# torchdiffeq method names accepted by the ODE solvers, with scipy's names as aliases.
_ODE_METHODS = {
    "rk45": "dopri5",
    "dopri5": "dopri5",
    "rk23": "bosh3",
    "bosh3": "bosh3",
    "dop853": "dopri8",
    "dopri8": "dopri8",
    "adaptive_heun": "adaptive_heun",
    "fehlberg2": "fehlberg2",
}
# Adaptive Runge-Kutta solvers of torchdiffeq that accept the step_t option.
_STEP_T_METHODS = ("dopri5", "bosh3", "dopri8", "adaptive_heun", "fehlberg2")

# --------------------------------------------------------------------------------------------------
# Probability-flow ODE (adaptive solver, both directions)
# --------------------------------------------------------------------------------------------------


def _torchdiffeq_method(method: str) -> str:
    key = str(method).lower()
    if key not in _ODE_METHODS:
        raise ValueError(
            f"Unknown ODE method {method!r} (config.sampling.ode_method); valid names: "
            f"{sorted({'RK45', 'RK23', 'DOP853', *_ODE_METHODS})}"
        )
    return _ODE_METHODS[key]


def probability_flow_drift(sde, score_fn: ScoreFn, lambda_: float = 0.0) -> Callable:
    """drift_fn(x, t) of the probability-flow ODE f(x, t) - g(t)^2 s(x, t) / 2 (Song et al. 2021, eq. 13).

    lambda_ != 0 gives the drift f - (1 + lambda_^2) g^2 s / 2 of the reverse SDE with diffusion lambda_ g (the
    Soft Truncation repository's eval.lambda_, with eval.probability_flow=False); integrating its divergence is
    then no longer a likelihood (it is the original's experimental option)."""
    weight = 0.5 * (1.0 + float(lambda_) ** 2)

    def drift_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        drift, diffusion = sde.sde(x, t)
        return drift - weight * broadcast_to(diffusion, x) ** 2 * score_fn(x, t)

    return drift_fn


def solve_probability_flow(
    sde,
    score_fn: ScoreFn,
    x: torch.Tensor,
    t_start: float,
    t_end: float,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "RK45",
) -> tuple[torch.Tensor, int]:
    """Integrate the probability-flow ODE from t_start to t_end (either direction) with an adaptive solver on
    x's device (torchdiffeq; 'RK45' = Dormand-Prince 'dopri5'); returns (x(t_end), number of score
    evaluations)."""
    from torchdiffeq import odeint

    counter = CountingScoreFn(score_fn)
    solver = _torchdiffeq_method(method)
    drift_fn = probability_flow_drift(sde, counter)

    def ode_func(t, y):
        vec_t = torch.full((y.shape[0],), float(t), device=y.device, dtype=y.dtype)
        return drift_fn(y, vec_t)

    times = torch.tensor([float(t_start), float(t_end)], dtype=torch.float64, device=x.device)
    with torch.no_grad():
        options = adaptive_solver_options(solver, times)
        solution = odeint(ode_func, x, times, rtol=rtol, atol=atol, method=solver, options=options)
    return solution[-1], counter.count


def adaptive_solver_options(solver: str, times: torch.Tensor) -> dict | None:
    """torchdiffeq options that keep an adaptive solve between times[0] and times[-1].

    step_t lands on the end time instead of stepping past it (and evaluating the SDE outside [eps, T], where
    VE's sigma(t) overflows). Forward in time (encoding, likelihood) the first step is 1 % of the start time:
    sigma(t) can grow very fast just above eps (RVE: log sigma is linear in 1/t), and the solver's own first-step
    guess, 1 % of |x| / |drift|, jumps far past T when the drift at eps is small.
    """
    if solver not in _STEP_T_METHODS:
        return None
    options = {"step_t": times[1:]}
    if float(times[-1]) > float(times[0]):
        options["first_step"] = 1e-2 * float(times[0])
    return options


class ProbabilityFlowODE:
    """The probability-flow ODE as a deterministic encoder/decoder between data (t = eps) and latents (t = T).

    image_to_latent / latent_to_image take model-space data (scaled, e.g. [-1, 1] when data.centered) and a
    model; the *_from_score_fn variants take score_fn(x, t) directly. All return (result, number of score
    evaluations)."""

    def __init__(self, sde, rtol=1e-5, atol=1e-5, method="RK45", eps=1e-3, continuous=True):
        self.sde = sde
        self.rtol = rtol
        self.atol = atol
        self.method = method
        self.eps = eps
        self.continuous = continuous
        _torchdiffeq_method(method)

    def encode_from_score_fn(self, score_fn: ScoreFn, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Data x at t = eps -> latent z at t = T."""
        return solve_probability_flow(self.sde, score_fn, x, self.eps, self.sde.T, self.rtol, self.atol, self.method)

    def decode_from_score_fn(self, score_fn: ScoreFn, z: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Latent z at t = T -> data x at t = eps."""
        return solve_probability_flow(self.sde, score_fn, z, self.sde.T, self.eps, self.rtol, self.atol, self.method)

    def image_to_latent(self, model, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Encode model-space data x into the latent z = x(T)."""
        return self.encode_from_score_fn(get_score_fn(self.sde, model, train=False, continuous=self.continuous), x)

    def latent_to_image(self, model, z: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Decode the latent z = x(T) into model-space data x(eps)."""
        return self.decode_from_score_fn(get_score_fn(self.sde, model, train=False, continuous=self.continuous), z)


def get_ode_flow(sde, rtol=1e-5, atol=1e-5, method="RK45", eps=1e-3, continuous=True) -> ProbabilityFlowODE:
    """The probability-flow ODE encoder/decoder (methods image_to_latent(model, x), latent_to_image(model,
    z))."""
    return ProbabilityFlowODE(sde, rtol=rtol, atol=atol, method=method, eps=eps, continuous=continuous)


def image_to_latent(sde, model, x, rtol=1e-5, atol=1e-5, method="RK45", eps=1e-3, continuous=True):
    """Encode model-space data x (at t = eps) into the probability-flow latent at t = T; returns (z, nfe)."""
    return get_ode_flow(sde, rtol, atol, method, eps, continuous).image_to_latent(model, x)


def latent_to_image(sde, model, z, rtol=1e-5, atol=1e-5, method="RK45", eps=1e-3, continuous=True):
    """Decode a latent z (at t = T) into model-space data at t = eps; returns (x, nfe)."""
    return get_ode_flow(sde, rtol, atol, method, eps, continuous).latent_to_image(model, z)


def get_ode_sampler(
    sde,
    shape,
    inverse_scaler,
    denoise=False,
    rtol=1e-5,
    atol=1e-5,
    method="RK45",
    eps=1e-3,
    device="cuda",
    continuous=True,
    precision: str = "fp32",
):
    """Probability flow ODE sampler with an adaptive black-box solver (on the device, no NumPy round trip).

    Args:
      sde: An `sde_lib.SDE` object that represents the forward SDE.
      shape: A sequence of integers. The expected shape of a single sample.
      inverse_scaler: The inverse data normalizer.
      denoise: If `True`, add one-step denoising to final samples (reverse-diffusion predictor at eps).
      rtol: A `float` number. The relative tolerance level of the ODE solver.
      atol: A `float` number. The absolute tolerance level of the ODE solver.
      method: A `str`. The black-box ODE solver ('RK45' = 'dopri5', 'RK23', 'DOP853', ...).
      eps: A `float` number. The reverse-time SDE/ODE will be integrated to `eps` for numerical stability.
      device: PyTorch device.
      continuous: Passed to models.utils.get_score_fn (score_sde always uses True here).

    Returns:
      A sampling function ode_sampler(model, z=None) -> (samples, number of score evaluations).
    """
    check_eps(eps, sde)
    flow = ProbabilityFlowODE(sde, rtol=rtol, atol=atol, method=method, eps=eps, continuous=continuous)

    def loop(param, x):
        score_fn = CountingScoreFn(param.score)
        x, _ = flow.decode_from_score_fn(score_fn, x)
        if denoise:
            x = denoise_update(sde, score_fn, x, eps)
        return x, score_fn.count

    return make_sampling_fn(loop, sde, shape, inverse_scaler, device, continuous, precision=precision)


def denoise_update(sde, score_fn: ScoreFn, x: torch.Tensor, eps: float) -> torch.Tensor:
    """score_sde's final denoising: the mean of one reverse-diffusion predictor step at t = eps."""
    from samplers.pc import ReverseDiffusionPredictor

    predictor_obj = ReverseDiffusionPredictor(sde, score_fn, probability_flow=False)
    vec_eps = torch.full((x.shape[0],), eps, device=x.device, dtype=x.dtype)
    _, x = predictor_obj.update_fn(x, vec_eps)
    return x
