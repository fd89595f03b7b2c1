"""Samplers for score-based models: score_sde_pytorch's predictor-corrector and probability-flow ODE samplers,
plus fast deterministic samplers with a fixed number of network evaluations (EDM's Heun method, DPM-Solver++).

Public API kept from score_sde_pytorch: register_predictor / register_corrector, get_predictor /
get_corrector, Predictor / Corrector and their registered subclasses, get_pc_sampler, get_ode_sampler,
get_sampling_fn. Every sampler returned by a get_*_sampler function is called as sampler(model, z=None) -> (x,
nfe), where x is inverse-scaled and nfe counts the score-network evaluations actually made.

Every sampler also has a score-function level entry point (pc_sample, solve_probability_flow, heun_sample,
dpm_solver_sample) that takes score_fn(x, t) directly; the model-level samplers build score_fn with
models.utils.get_score_fn.

Conventions: x_t = alpha(t) x0 + sigma(t) z with sigma(t) = sde.marginal_std(t); Tweedie's denoiser x0_hat(x,
t) = (x + sigma^2 score(x, t)) / alpha; the half log-SNR lambda(t) = log(alpha / sigma) used by DPM-Solver
(sde_lib's log_snr(t) is log(alpha^2 / sigma^2) = 2 lambda).

RVE note: sde_lib.RVESDE is VE re-timed so that log sigma is linear in 1/t. Its sigma is close to sigma_max
for all t well above its eps (sigma(1e-3) is about 45 for eps = 1e-5, sigma_max = 50), so RVE must be sampled
down to t = sde.eps (what sde_lib.get_sde returns for it). The PC sampler uses a time grid uniform in 1/t for
RVE (uniform in log sigma: VE's geometric grid), and its predictors step along that grid: reverse diffusion
and ancestral sampling in the SMLD form with consecutive marginal stds (the last step to sigma = 0, as VE),
Euler-Maruyama with the grid's time steps; Langevin / ALD use alpha = 1. The RVE's discrete_sigmas (uniform
in t) are not used.

Time grids of the fast samplers (benchmarks/fast_samplers.py, 1-D Gaussian mixture, RMSE to the adaptive
solution): DPM-Solver++ defaults to the grid uniform in lambda for every SDE (at 10 to 50 evaluations its
error is 1.15 to 4.6 times lower than with the rho = 7 grid for 2M and 1.02 to 7.3 times lower for 3M); Heun
defaults to EDM's rho = 7 grid for every SDE (within about 20% of the uniform-lambda grid at 20 to 50
evaluations: better for subVP and RVE, slightly worse for VP and VE; 2 to 50 times better at 4 of them)."""

from __future__ import annotations

import abc
import math
from collections.abc import Callable

import torch

import sde_lib

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_PREDICTORS: dict[str, type] = {}
_CORRECTORS: dict[str, type] = {}
_SAMPLING_METHODS: dict[str, Callable] = {}

# Methods registered by soft_diffusion.py (imported lazily by get_sampling_fn).
_SOFT_DIFFUSION_METHODS = ("naive_blur", "momentum")

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
# Registries
# --------------------------------------------------------------------------------------------------


def register_predictor(cls=None, *, name=None):
    """A decorator for registering predictor classes."""

    def _register(cls):
        local_name = cls.__name__ if name is None else name
        if local_name in _PREDICTORS:
            raise ValueError(f"Already registered predictor with name: {local_name}")
        _PREDICTORS[local_name] = cls
        return cls

    return _register if cls is None else _register(cls)


def register_corrector(cls=None, *, name=None):
    """A decorator for registering corrector classes."""

    def _register(cls):
        local_name = cls.__name__ if name is None else name
        if local_name in _CORRECTORS:
            raise ValueError(f"Already registered corrector with name: {local_name}")
        _CORRECTORS[local_name] = cls
        return cls

    return _register if cls is None else _register(cls)


def get_predictor(name: str) -> type:
    """Predictor class registered under `name` (config.sampling.predictor)."""
    if name not in _PREDICTORS:
        raise ValueError(f"Unknown predictor {name!r} (config.sampling.predictor); valid names: {sorted(_PREDICTORS)}")
    return _PREDICTORS[name]


def get_corrector(name: str) -> type:
    """Corrector class registered under `name` (config.sampling.corrector)."""
    if name not in _CORRECTORS:
        raise ValueError(f"Unknown corrector {name!r} (config.sampling.corrector); valid names: {sorted(_CORRECTORS)}")
    return _CORRECTORS[name]


def register_sampling_method(name: str):
    """Decorator registering builder(config, sde, shape, inverse_scaler, eps) -> sampler under
    config.sampling.method."""

    def _register(builder):
        if name in _SAMPLING_METHODS:
            raise ValueError(f"Already registered sampling method with name: {name}")
        _SAMPLING_METHODS[name] = builder
        return builder

    return _register


def get_sampling_fn(config, sde, shape, inverse_scaler, eps):
    """Create a sampling function for config.sampling.method ('pc', 'ode', 'heun', 'dpm_solver', or a method
    registered by another module, e.g. soft_diffusion's 'naive_blur' and 'momentum').

    Returns: A function sampler(model, z=None) -> (samples, number of network evaluations)."""
    method = str(config.sampling.method).lower()
    soft_diffusion_error = None
    if method not in _SAMPLING_METHODS:
        try:
            import soft_diffusion  # noqa: F401  (registers its sampling methods)
        except ModuleNotFoundError as err:
            if err.name != "soft_diffusion":
                raise
            soft_diffusion_error = err
    if method not in _SAMPLING_METHODS:
        valid = sorted(_SAMPLING_METHODS)
        msg = f"Unknown sampling method {method!r} (config.sampling.method); valid names: {valid}"
        if soft_diffusion_error is not None:
            msg += f"; {list(_SOFT_DIFFUSION_METHODS)} need soft_diffusion.py, which could not be imported"
        raise ValueError(msg)
    return _SAMPLING_METHODS[method](config, sde, shape, inverse_scaler, eps)


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def _check_eps(eps: float, sde) -> None:
    """The sampling truncation time must lie in (0, T)."""
    T = float(getattr(sde, "T", 1.0))
    if not 0.0 < float(eps) < T:
        raise ValueError(
            f"Sampling eps (the smallest time: sde_lib.get_sde or config.sampling.truncation_time) must lie "
            f"in (0, {T}); got {eps}. At eps = 0 sigma(0) = 0 and the score diverges: set a positive "
            "config.sampling.truncation_time, or leave it unset for score_sde's default."
        )


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample vector [B] to broadcast against x [B, ...]."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def _is_vp(sde) -> bool:
    return isinstance(sde, sde_lib.VPSDE) and not isinstance(sde, sde_lib.subVPSDE)


def _is_subvp(sde) -> bool:
    return isinstance(sde, sde_lib.subVPSDE)


def _is_rve(sde) -> bool:
    return isinstance(sde, sde_lib.RVESDE)


def _is_ve(sde) -> bool:
    return isinstance(sde, sde_lib.VESDE) and not _is_rve(sde)


class _CountingScoreFn:
    """Wraps score_fn and counts its calls (the number of network evaluations)."""

    def __init__(self, score_fn: ScoreFn):
        self.score_fn = score_fn
        self.count = 0

    def __call__(self, x, t):
        self.count += 1
        return self.score_fn(x, t)


def _score_fn_from_model(sde, model, continuous: bool) -> ScoreFn:
    """score_fn(x, t) of `model` through models.utils.get_score_fn (eval mode)."""
    from models import utils as mutils

    return mutils.get_score_fn(sde, model, train=False, continuous=continuous)


def _initial_state(sde, shape, z, device) -> torch.Tensor:
    """The latent x_T: given z, or a draw from the prior."""
    if z is None:
        return sde.prior_sampling(shape).to(device)
    return z.to(device)


def _previous_time(sde, t: torch.Tensor, inv_t_step: float | None = None, to_zero_at_end: bool = False):
    """The next (smaller) time of the N-step reverse grid: t - T/N; for RVE the next time of its grid uniform
    in 1/t, 1/t_prev = 1/t + inv_t_step (default (1/sde.eps - 1/T)/(N - 1)). With to_zero_at_end, the step
    from the last RVE grid time goes to t = 0 (sigma = 0), like VE's last SMLD step to adjacent_sigma = 0."""
    if not _is_rve(sde):
        return t - sde.T / sde.N
    step = (1.0 / sde.eps - 1.0 / sde.T) / (sde.N - 1) if inv_t_step is None else inv_t_step
    inv_prev = 1.0 / t + step
    t_prev = 1.0 / inv_prev
    if to_zero_at_end:
        last = inv_prev > 1.0 / sde.T + (sde.N - 0.5) * step
        t_prev = torch.where(last, torch.zeros_like(t_prev), t_prev)
    return t_prev


def _marginal_coefficients(sde, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha(t), sigma(t)), with the data limits alpha = 1, sigma = 0 at t <= 0."""
    positive = t > 0
    safe_t = torch.where(positive, t, torch.full_like(t, 0.5))
    alpha = torch.where(positive, sde.alpha(safe_t), torch.ones_like(t))
    std = torch.where(positive, sde.marginal_std(safe_t), torch.zeros_like(t))
    return alpha, std


def pc_time_grid(sde, num_steps: int, eps: float, device) -> torch.Tensor:
    """Time grid of the PC sampler: linspace(T, eps, N) as score_sde; for RVE uniform in 1/t (uniform in log
    sigma)."""
    if _is_rve(sde):
        return 1.0 / torch.linspace(1.0 / sde.T, 1.0 / eps, num_steps, device=device)
    return torch.linspace(sde.T, eps, num_steps, device=device)


# --------------------------------------------------------------------------------------------------
# Predictors and correctors
# --------------------------------------------------------------------------------------------------


class Predictor(abc.ABC):
    """The abstract class for a predictor algorithm."""

    def __init__(self, sde, score_fn, probability_flow=False):
        super().__init__()
        self.sde = sde
        # Compute the reverse SDE/ODE
        self.rsde = sde.reverse(score_fn, probability_flow)
        self.score_fn = score_fn
        self.probability_flow = probability_flow

    @abc.abstractmethod
    def update_fn(self, x, t):
        """One update of the predictor.

        Args:
          x: A PyTorch tensor representing the current state
          t: A Pytorch tensor representing the current time step.

        Returns:
          x: A PyTorch tensor of the next state.
          x_mean: A PyTorch tensor. The next state without random noise. Useful for denoising.
        """


class Corrector(abc.ABC):
    """The abstract class for a corrector algorithm."""

    def __init__(self, sde, score_fn, snr, n_steps):
        super().__init__()
        self.sde = sde
        self.score_fn = score_fn
        self.snr = snr
        self.n_steps = n_steps

    @abc.abstractmethod
    def update_fn(self, x, t):
        """One update of the corrector.

        Args:
          x: A PyTorch tensor representing the current state
          t: A PyTorch tensor representing the current time step.

        Returns:
          x: A PyTorch tensor of the next state.
          x_mean: A PyTorch tensor. The next state without random noise. Useful for denoising.
        """


@register_predictor(name="euler_maruyama")
class EulerMaruyamaPredictor(Predictor):
    """x <- x - f_rev dt + g sqrt(dt) z, dt = T/N (RVE: the gap to the previous time of its 1/t grid)."""

    def update_fn(self, x, t):
        if _is_rve(self.sde):
            dt = _bcast(_previous_time(self.sde, t, getattr(self, "rve_inv_t_step", None)) - t, x)
        else:
            dt = -1.0 / self.rsde.N
        z = torch.randn_like(x)
        drift, diffusion = self.rsde.sde(x, t)
        x_mean = x + drift * dt
        if self.probability_flow:
            return x_mean, x_mean
        x = x_mean + _bcast(diffusion, x) * torch.sqrt(torch.as_tensor(-dt, dtype=x.dtype, device=x.device)) * z
        return x, x_mean


@register_predictor(name="reverse_diffusion")
class ReverseDiffusionPredictor(Predictor):
    """Reverse of the forward discretisation x_{i+1} = x_i + f_i + G_i z (score_sde section 4.2).

    For RVE this is the SMLD form: f = 0, G^2 = sigma(t)^2 - sigma(t_prev)^2 with t_prev on its 1/t grid."""

    def update_fn(self, x, t):
        if _is_rve(self.sde):
            std = self.sde.marginal_std(t)
            t_prev = _previous_time(self.sde, t, getattr(self, "rve_inv_t_step", None), to_zero_at_end=True)
            std_prev = _marginal_coefficients(self.sde, t_prev)[1]
            g2 = std**2 - std_prev**2
            scale = 0.5 if self.probability_flow else 1.0
            f = -_bcast(g2, x) * self.score_fn(x, t) * scale
            G = torch.zeros_like(g2) if self.probability_flow else torch.sqrt(g2)
        else:
            f, G = self.rsde.discretize(x, t)
        z = torch.randn_like(x)
        x_mean = x - f
        x = x_mean + _bcast(G, x) * z
        return x, x_mean


@register_predictor(name="ancestral_sampling")
class AncestralSamplingPredictor(Predictor):
    """The ancestral sampling predictor: VP (DDPM) and VE (SMLD) forms as score_sde; subVP and RVE use the
    Gaussian posterior q(x_s | x_t, x0_hat) between consecutive grid times s < t (which reduces to the SMLD
    form for alpha = 1)."""

    def __init__(self, sde, score_fn, probability_flow=False):
        super().__init__(sde, score_fn, probability_flow)
        if probability_flow:
            raise NotImplementedError("Probability flow not supported by ancestral sampling")

    def vesde_update_fn(self, x, t):
        sde = self.sde
        timestep = (t * (sde.N - 1) / sde.T).long()
        sigmas = sde.discrete_sigmas.to(t.device)
        sigma = sigmas[timestep]
        adjacent_sigma = torch.where(timestep == 0, torch.zeros_like(t), sigmas[(timestep - 1).clamp(min=0)])
        score = self.score_fn(x, t)
        x_mean = x + score * _bcast(sigma**2 - adjacent_sigma**2, x)
        std = torch.sqrt((adjacent_sigma**2 * (sigma**2 - adjacent_sigma**2)) / (sigma**2))
        noise = torch.randn_like(x)
        x = x_mean + _bcast(std, x) * noise
        return x, x_mean

    def vpsde_update_fn(self, x, t):
        sde = self.sde
        timestep = (t * (sde.N - 1) / sde.T).long()
        beta = sde.discrete_betas.to(t.device)[timestep]
        score = self.score_fn(x, t)
        x_mean = (x + _bcast(beta, x) * score) / _bcast(torch.sqrt(1.0 - beta), x)
        noise = torch.randn_like(x)
        x = x_mean + _bcast(torch.sqrt(beta), x) * noise
        return x, x_mean

    def posterior_update_fn(self, x, t):
        """x_mean = (x + v score) / a, a = alpha_t / alpha_s, v = sigma_t^2 - a^2 sigma_s^2; noise var v
        sigma_s^2 / sigma_t^2."""
        alpha_t, std_t = self.sde.alpha(t), self.sde.marginal_std(t)
        t_prev = _previous_time(self.sde, t, getattr(self, "rve_inv_t_step", None), to_zero_at_end=True)
        alpha_s, std_s = _marginal_coefficients(self.sde, t_prev)
        a = alpha_t / alpha_s
        v = std_t**2 - a**2 * std_s**2
        score = self.score_fn(x, t)
        x_mean = (x + _bcast(v, x) * score) / _bcast(a, x)
        noise_std = torch.sqrt((v * std_s**2 / std_t**2).clamp(min=0))
        x = x_mean + _bcast(noise_std, x) * torch.randn_like(x)
        return x, x_mean

    def update_fn(self, x, t):
        if _is_ve(self.sde):
            return self.vesde_update_fn(x, t)
        if _is_vp(self.sde):
            return self.vpsde_update_fn(x, t)
        return self.posterior_update_fn(x, t)


@register_predictor(name="none")
class NonePredictor(Predictor):
    """An empty predictor that does nothing."""

    def __init__(self, sde, score_fn, probability_flow=False):
        pass

    def update_fn(self, x, t):
        return x, x


def _langevin_alpha(sde, t: torch.Tensor) -> torch.Tensor:
    """Step-size factor of the Langevin correctors: DDPM's alpha_i = 1 - beta_i for VP/subVP, 1 for VE/RVE."""
    if isinstance(sde, (sde_lib.VPSDE, sde_lib.subVPSDE)):
        timestep = (t * (sde.N - 1) / sde.T).long()
        return sde.alphas.to(t.device)[timestep]
    return torch.ones_like(t)


@register_corrector(name="langevin")
class LangevinCorrector(Corrector):
    """Langevin MCMC with step size 2 alpha (snr ||z|| / ||score||)^2 (score_sde Algorithm 4/5)."""

    def update_fn(self, x, t):
        score_fn = self.score_fn
        n_steps = self.n_steps
        target_snr = self.snr
        alpha = _langevin_alpha(self.sde, t)

        x_mean = x
        for _ in range(n_steps):
            grad = score_fn(x, t)
            noise = torch.randn_like(x)
            grad_norm = torch.norm(grad.reshape(grad.shape[0], -1), dim=-1).mean()
            noise_norm = torch.norm(noise.reshape(noise.shape[0], -1), dim=-1).mean()
            step_size = (target_snr * noise_norm / grad_norm) ** 2 * 2 * alpha
            x_mean = x + _bcast(step_size, x) * grad
            x = x_mean + _bcast(torch.sqrt(step_size * 2), x) * noise

        return x, x_mean


@register_corrector(name="ald")
class AnnealedLangevinDynamics(Corrector):
    """Annealed Langevin dynamics of NCSN: step size 2 alpha (snr sigma(t))^2."""

    def update_fn(self, x, t):
        score_fn = self.score_fn
        n_steps = self.n_steps
        target_snr = self.snr
        alpha = _langevin_alpha(self.sde, t)
        std = self.sde.marginal_prob(x, t)[1]

        x_mean = x
        for _ in range(n_steps):
            grad = score_fn(x, t)
            noise = torch.randn_like(x)
            step_size = (target_snr * std) ** 2 * 2 * alpha
            x_mean = x + _bcast(step_size, x) * grad
            x = x_mean + _bcast(torch.sqrt(step_size * 2), x) * noise

        return x, x_mean


@register_corrector(name="none")
class NoneCorrector(Corrector):
    """An empty corrector that does nothing."""

    def __init__(self, sde, score_fn, snr, n_steps):
        pass

    def update_fn(self, x, t):
        return x, x


# --------------------------------------------------------------------------------------------------
# Predictor-corrector sampler
# --------------------------------------------------------------------------------------------------


def shared_predictor_update_fn(x, t, sde, model, predictor, probability_flow, continuous):
    """A wrapper that configures and returns the update function of predictors."""
    score_fn = _score_fn_from_model(sde, model, continuous)
    predictor_obj = (
        NonePredictor(sde, score_fn, probability_flow)
        if predictor is None
        else predictor(sde, score_fn, probability_flow)
    )
    return predictor_obj.update_fn(x, t)


def shared_corrector_update_fn(x, t, sde, model, corrector, continuous, snr, n_steps):
    """A wrapper that configures and returns the update function of correctors."""
    score_fn = _score_fn_from_model(sde, model, continuous)
    corrector_obj = (
        NoneCorrector(sde, score_fn, snr, n_steps) if corrector is None else corrector(sde, score_fn, snr, n_steps)
    )
    return corrector_obj.update_fn(x, t)


def pc_sample(
    sde,
    score_fn: ScoreFn,
    x: torch.Tensor,
    predictor: type | None,
    corrector: type | None,
    snr: float,
    n_steps: int = 1,
    probability_flow: bool = False,
    denoise: bool = True,
    eps: float = 1e-3,
    project: Callable | None = None,
) -> tuple[torch.Tensor, int]:
    """Predictor-corrector sampling from x at t = T over sde.N grid times down to eps (score_sde Algorithm 1).

    project(x, x_mean, t) -> (x, x_mean), when given, runs after every corrector and predictor update (the
    constraint step of controllable generation: inpainting, colorization). Returns the final x (x_mean of the
    last step when denoise) in the model's data space and the number of score evaluations."""
    counter = _CountingScoreFn(score_fn)
    predictor_obj = (NonePredictor if predictor is None else predictor)(sde, counter, probability_flow)
    corrector_obj = (NoneCorrector if corrector is None else corrector)(sde, counter, snr, n_steps)
    timesteps = pc_time_grid(sde, sde.N, eps, x.device)
    if _is_rve(sde):  # the predictors step along the same 1/t grid
        predictor_obj.rve_inv_t_step = (1.0 / eps - 1.0 / sde.T) / (sde.N - 1)
    x_mean = x
    with torch.no_grad():
        for i in range(sde.N):
            vec_t = torch.full((x.shape[0],), float(timesteps[i]), device=x.device, dtype=x.dtype)
            x, x_mean = corrector_obj.update_fn(x, vec_t)
            if project is not None:
                x, x_mean = project(x, x_mean, vec_t)
            x, x_mean = predictor_obj.update_fn(x, vec_t)
            if project is not None:
                x, x_mean = project(x, x_mean, vec_t)
    return (x_mean if denoise else x), counter.count


def get_pc_sampler(
    sde,
    shape,
    predictor,
    corrector,
    inverse_scaler,
    snr,
    n_steps=1,
    probability_flow=False,
    continuous=False,
    denoise=True,
    eps=1e-3,
    device="cuda",
):
    """Create a Predictor-Corrector (PC) sampler.

    Args:
      sde: An `sde_lib.SDE` object representing the forward SDE.
      shape: A sequence of integers. The expected shape of a single sample.
      predictor: A subclass of `sampling.Predictor` representing the predictor algorithm.
      corrector: A subclass of `sampling.Corrector` representing the corrector algorithm.
      inverse_scaler: The inverse data normalizer.
      snr: A `float` number. The signal-to-noise ratio for configuring correctors.
      n_steps: An integer. The number of corrector steps per predictor update.
      probability_flow: If `True`, solve the reverse-time probability flow ODE when running the predictor.
      continuous: `True` indicates that the score model was continuously trained.
      denoise: If `True`, add one-step denoising to the final samples.
      eps: A `float` number. The reverse-time SDE and ODE are integrated to `epsilon` (numerical stability).
      device: PyTorch device.

    Returns:
      A sampling function pc_sampler(model, z=None) -> (samples, number of score evaluations actually made).
    """
    _check_eps(eps, sde)

    def pc_sampler(model, z=None):
        with torch.no_grad():
            score_fn = _score_fn_from_model(sde, model, continuous)
            x = _initial_state(sde, shape, z, device)
            x, nfe = pc_sample(sde, score_fn, x, predictor, corrector, snr, n_steps, probability_flow, denoise, eps)
            return inverse_scaler(x), nfe

    return pc_sampler


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


def probability_flow_drift(sde, score_fn: ScoreFn, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Drift of the probability-flow ODE: dx/dt = f(x, t) - g(t)^2 score(x, t) / 2."""
    drift, diffusion = sde.sde(x, t)
    return drift - 0.5 * _bcast(diffusion, x) ** 2 * score_fn(x, t)


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

    counter = _CountingScoreFn(score_fn)
    solver = _torchdiffeq_method(method)

    def ode_func(t, y):
        vec_t = torch.full((y.shape[0],), float(t), device=y.device, dtype=y.dtype)
        return probability_flow_drift(sde, counter, y, vec_t)

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
        return self.encode_from_score_fn(_score_fn_from_model(self.sde, model, self.continuous), x)

    def latent_to_image(self, model, z: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Decode the latent z = x(T) into model-space data x(eps)."""
        return self.decode_from_score_fn(_score_fn_from_model(self.sde, model, self.continuous), z)


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
    _check_eps(eps, sde)
    flow = ProbabilityFlowODE(sde, rtol=rtol, atol=atol, method=method, eps=eps, continuous=continuous)

    def ode_sampler(model, z=None):
        with torch.no_grad():
            score_fn = _CountingScoreFn(_score_fn_from_model(sde, model, continuous))
            x = _initial_state(sde, shape, z, device)
            x, _ = flow.decode_from_score_fn(score_fn, x)
            if denoise:
                x = denoise_update(sde, score_fn, x, eps)
            return inverse_scaler(x), score_fn.count

    return ode_sampler


def denoise_update(sde, score_fn: ScoreFn, x: torch.Tensor, eps: float) -> torch.Tensor:
    """score_sde's final denoising: the mean of one reverse-diffusion predictor step at t = eps."""
    predictor_obj = ReverseDiffusionPredictor(sde, score_fn, probability_flow=False)
    vec_eps = torch.full((x.shape[0],), eps, device=x.device, dtype=x.dtype)
    _, x = predictor_obj.update_fn(x, vec_eps)
    return x


# --------------------------------------------------------------------------------------------------
# Fast deterministic samplers: time grids
# --------------------------------------------------------------------------------------------------


def half_log_snr(sde, t: torch.Tensor) -> torch.Tensor:
    """lambda(t) = log(alpha(t) / sigma(t)) (DPM-Solver's log-SNR; sde_lib's log_snr is 2 lambda)."""
    return torch.log(sde.alpha(t)) - torch.log(sde.marginal_std(t))


def t_from_half_log_snr(sde, lam: torch.Tensor) -> torch.Tensor:
    """Inverse of lambda(t) through sde_lib's t_from_log_snr(2 lambda)."""
    return sde.t_from_log_snr(2.0 * lam)


def logsnr_time_grid(sde, num_points: int, eps: float, device=None) -> torch.Tensor:
    """num_points times from T to eps, uniform in lambda = log(alpha/sigma) (DPM-Solver's 'logSNR' grid),
    float64."""
    ends = torch.tensor([float(sde.T), float(eps)], dtype=torch.float64, device=device)
    lam = half_log_snr(sde, ends)
    ts = t_from_half_log_snr(
        sde, torch.linspace(float(lam[0]), float(lam[1]), num_points, dtype=torch.float64, device=device)
    )
    ts[0], ts[-1] = ends[0], ends[1]
    return ts


def edm_time_grid(sde, num_points: int, eps: float, rho: float = 7.0, device=None) -> torch.Tensor:
    """num_points times from T to eps with EDM's schedule (Karras et al. 2022, eq. 5) on the scaled noise
    level sigma_hat = sigma/alpha = exp(-lambda): sigma_hat_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) -
    s_max^(1/rho)))^rho."""
    ends = torch.tensor([float(sde.T), float(eps)], dtype=torch.float64, device=device)
    sig = torch.exp(-half_log_snr(sde, ends))
    ramp = torch.linspace(0.0, 1.0, num_points, dtype=torch.float64, device=device)
    inv = sig[0] ** (1.0 / rho) + ramp * (sig[1] ** (1.0 / rho) - sig[0] ** (1.0 / rho))
    ts = t_from_half_log_snr(sde, -torch.log(inv**rho))
    ts[0], ts[-1] = ends[0], ends[1]
    return ts


_TIME_GRIDS = {"logsnr": logsnr_time_grid, "edm": edm_time_grid}


def fast_time_grid(sde, num_points: int, eps: float, schedule: str, device=None) -> torch.Tensor:
    """Time grid of the fast samplers: schedule 'logsnr' (uniform lambda) or 'edm' (rho = 7)."""
    if schedule not in _TIME_GRIDS:
        raise ValueError(
            f"Unknown time schedule {schedule!r} (config.sampling.time_schedule); valid: {list(_TIME_GRIDS)}"
        )
    return _TIME_GRIDS[schedule](sde, num_points, eps, device=device)


def _scalar_coefficients(sde, t: torch.Tensor) -> tuple[float, float]:
    """(alpha(t), sigma(t)) of a 0-dim float64 time as Python floats."""
    tt = t.reshape(1)
    return float(sde.alpha(tt)[0]), float(sde.marginal_std(tt)[0])


def _denoised(sde, score_fn: ScoreFn, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Tweedie's x0_hat = (x + sigma^2 score(x, t)) / alpha at the scalar time t."""
    alpha, std = _scalar_coefficients(sde, t)
    vec_t = torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)
    return (x + std**2 * score_fn(x, vec_t)) / alpha


# --------------------------------------------------------------------------------------------------
# Heun (EDM)
# --------------------------------------------------------------------------------------------------


def heun_sample(sde, score_fn: ScoreFn, x: torch.Tensor, ts: torch.Tensor, denoise: bool = True):
    """EDM's deterministic Heun sampler (Karras et al. 2022, Algorithm 1) on the probability-flow ODE written
    for x_hat = x/alpha with sigma_hat = sigma/alpha as the independent variable: dx_hat/dsigma_hat = (x_hat -
    D)/sigma_hat, D = x0_hat. Heun steps between the grid times ts (T ... eps); with denoise, EDM's last Euler
    step to sigma_hat = 0, which returns D at eps. Returns (x, nfe) with nfe = 2 (len(ts) - 1) + denoise."""
    counter = _CountingScoreFn(score_fn)
    coeffs = [_scalar_coefficients(sde, t) for t in ts]
    with torch.no_grad():
        x_hat = x / coeffs[0][0]
        for i in range(len(ts) - 1):
            (a_cur, s_cur), (a_next, s_next) = coeffs[i], coeffs[i + 1]
            sig_cur, sig_next = s_cur / a_cur, s_next / a_next
            d_cur = (x_hat - _denoised(sde, counter, a_cur * x_hat, ts[i])) / sig_cur
            x_euler = x_hat + (sig_next - sig_cur) * d_cur
            d_next = (x_euler - _denoised(sde, counter, a_next * x_euler, ts[i + 1])) / sig_next
            x_hat = x_hat + (sig_next - sig_cur) * 0.5 * (d_cur + d_next)
        a_last = coeffs[-1][0]
        out = _denoised(sde, counter, a_last * x_hat, ts[-1]) if denoise else a_last * x_hat
    return out, counter.count


def heun_num_points(nfe: int, denoise: bool) -> int:
    """Largest grid size n with 2 (n - 1) + denoise <= nfe."""
    n = (nfe - int(denoise)) // 2 + 1
    if n < 2:
        raise ValueError(f"Heun needs nfe >= {2 + int(denoise)} (config.sampling.nfe), got {nfe}")
    return n


def get_heun_sampler(
    sde,
    shape,
    inverse_scaler,
    num_steps: int = 18,
    eps: float = 1e-3,
    device="cuda",
    denoise: bool = True,
    schedule: str = "edm",
    continuous: bool = True,
):
    """EDM Heun sampler with num_steps grid times from T to eps ('edm' rho = 7 schedule by default, as EDM,
    for every SDE; 'logsnr' is uniform in lambda). nfe = 2 (num_steps - 1) + denoise (EDM's 18 steps: 35).
    Returns sampler(model, z=None) -> (x, nfe)."""
    _check_eps(eps, sde)
    if num_steps < 2:
        raise ValueError(f"Heun needs num_steps >= 2 grid times, got {num_steps}")
    fast_time_grid(sde, 2, eps, schedule)  # validates the schedule name early

    def heun_sampler(model, z=None):
        score_fn = _score_fn_from_model(sde, model, continuous)
        x = _initial_state(sde, shape, z, device)
        ts = fast_time_grid(sde, num_steps, eps, schedule, device=x.device)
        x, nfe = heun_sample(sde, score_fn, x, ts, denoise=denoise)
        return inverse_scaler(x), nfe

    return heun_sampler


# --------------------------------------------------------------------------------------------------
# DPM-Solver++ (multistep, data prediction)
# --------------------------------------------------------------------------------------------------


def dpm_solver_pp_update(
    x: torch.Tensor,
    x0_preds: list[torch.Tensor],
    lambdas: list[float],
    lam_next: float,
    std_ratio: float,
    alpha_next: float,
    order: int,
) -> torch.Tensor:
    """One multistep DPM-Solver++ step (Lu et al. 2022b) from the newest of `lambdas` to lam_next, order 1-3:
    x_next = (sigma_next/sigma) x + sigma_next int e^lambda x0(lambda) dlambda with x0(lambda) the Taylor
    polynomial built from the last `order` data predictions (newest last). With h = lam_next - lambda_0, phi1
    = expm1(-h), phi2 = phi1/h + 1, phi3 = phi2/h - 1/2: x_next = r x - a phi1 m0 + a h phi2 m0' - a h^2 phi3
    m0''."""
    h = lam_next - lambdas[-1]
    phi1 = math.expm1(-h)
    phi2 = phi1 / h + 1.0
    phi3 = phi2 / h - 0.5
    m0 = x0_preds[-1]
    out = std_ratio * x - alpha_next * phi1 * m0
    if order >= 2:
        h0 = lambdas[-1] - lambdas[-2]
        d1_0 = (m0 - x0_preds[-2]) / h0  # backward difference: m0' at lambda_0 - h0/2
        if order == 2:
            # DPM-Solver++(2M): x_next = r x - a phi1 (m0 + (m0 - m1) / (2 r')), r' = h0/h
            out = out - alpha_next * phi1 * (h / (2.0 * h0)) * (m0 - x0_preds[-2])
        else:
            h1 = lambdas[-2] - lambdas[-3]
            d1_1 = (x0_preds[-2] - x0_preds[-3]) / h1
            second = 2.0 * (d1_0 - d1_1) / (h0 + h1)  # m0''
            first = d1_0 + 0.5 * h0 * second  # m0'
            out = out + alpha_next * h * phi2 * first - alpha_next * h**2 * phi3 * second
    return out


def dpm_solver_sample(
    sde,
    score_fn: ScoreFn,
    x: torch.Tensor,
    ts: torch.Tensor,
    order: int = 3,
    denoise: bool = False,
    lower_order_final: bool = True,
):
    """Multistep DPM-Solver++ (data prediction) over the grid times ts (T ... eps): len(ts) - 1 steps, one
    score evaluation each, the first steps at lower order while the history fills up; with lower_order_final
    and fewer than 15 steps the last steps also drop order (DPM-Solver's choice for stability). With denoise,
    a final Tweedie x0_hat at eps (+1 evaluation). Returns (x, nfe)."""
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3 (config.sampling.dpm_solver_order), got {order}")
    counter = _CountingScoreFn(score_fn)
    num_steps = len(ts) - 1
    coeffs = [_scalar_coefficients(sde, t) for t in ts]
    lambdas_all = [math.log(a) - math.log(s) for a, s in coeffs]
    x0_preds: list[torch.Tensor] = []
    lambdas: list[float] = []
    with torch.no_grad():
        for i in range(num_steps):
            x0_preds.append(_denoised(sde, counter, x, ts[i]))
            lambdas.append(lambdas_all[i])
            x0_preds, lambdas = x0_preds[-3:], lambdas[-3:]
            step_order = min(order, i + 1)
            if lower_order_final and num_steps < 15:
                step_order = min(step_order, num_steps - i)
            alpha_next, std_next = coeffs[i + 1]
            x = dpm_solver_pp_update(
                x, x0_preds, lambdas, lambdas_all[i + 1], std_next / coeffs[i][1], alpha_next, step_order
            )
        if denoise:
            x = _denoised(sde, counter, x, ts[-1])
    return x, counter.count


def get_dpm_solver_sampler(
    sde,
    shape,
    inverse_scaler,
    num_steps: int = 20,
    order: int = 3,
    eps: float = 1e-3,
    device="cuda",
    denoise: bool = False,
    schedule: str = "logsnr",
    lower_order_final: bool = True,
    continuous: bool = True,
):
    """Multistep DPM-Solver++(order) with num_steps steps from T to eps (nfe = num_steps + denoise). Default
    grid uniform in lambda = log(alpha/sigma) for every SDE (DPM-Solver's recommendation for pixel-space
    models; for VE it is the geometric sigma grid, for RVE uniform log sigma); 'edm' gives the rho = 7 grid.
    Returns sampler(model, z=None) -> (x, nfe)."""
    _check_eps(eps, sde)
    if num_steps < 1:
        raise ValueError(f"DPM-Solver++ needs num_steps >= 1 (config.sampling.nfe), got {num_steps}")
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3 (config.sampling.dpm_solver_order), got {order}")
    fast_time_grid(sde, 2, eps, schedule)

    def dpm_solver_sampler(model, z=None):
        score_fn = _score_fn_from_model(sde, model, continuous)
        x = _initial_state(sde, shape, z, device)
        ts = fast_time_grid(sde, num_steps + 1, eps, schedule, device=x.device)
        x, nfe = dpm_solver_sample(sde, score_fn, x, ts, order, denoise, lower_order_final)
        return inverse_scaler(x), nfe

    return dpm_solver_sampler


# --------------------------------------------------------------------------------------------------
# Sampling methods selected by config.sampling.method
# --------------------------------------------------------------------------------------------------


def _config_nfe(config, default: int) -> int:
    """config.sampling.nfe (or num_steps) as an int."""
    sampling = config.sampling
    value = sampling.get("nfe", None)
    if value is None:
        value = sampling.get("num_steps", None)
    return int(default if value is None else value)


@register_sampling_method("pc")
def _build_pc(config, sde, shape, inverse_scaler, eps):
    predictor = get_predictor(config.sampling.predictor.lower())
    corrector = get_corrector(config.sampling.corrector.lower())
    return get_pc_sampler(
        sde=sde,
        shape=shape,
        predictor=predictor,
        corrector=corrector,
        inverse_scaler=inverse_scaler,
        snr=config.sampling.snr,
        n_steps=config.sampling.n_steps_each,
        probability_flow=config.sampling.probability_flow,
        continuous=config.training.continuous,
        denoise=config.sampling.noise_removal,
        eps=eps,
        device=config.device,
    )


@register_sampling_method("ode")
def _build_ode(config, sde, shape, inverse_scaler, eps):
    return get_ode_sampler(
        sde=sde,
        shape=shape,
        inverse_scaler=inverse_scaler,
        denoise=config.sampling.noise_removal,
        rtol=config.sampling.get("ode_rtol", 1e-5),
        atol=config.sampling.get("ode_atol", 1e-5),
        method=config.sampling.get("ode_method", "RK45"),
        eps=eps,
        device=config.device,
    )


@register_sampling_method("heun")
def _build_heun(config, sde, shape, inverse_scaler, eps):
    denoise = bool(config.sampling.noise_removal)
    num_points = heun_num_points(_config_nfe(config, 35), denoise)
    return get_heun_sampler(
        sde,
        shape,
        inverse_scaler,
        num_steps=num_points,
        eps=eps,
        device=config.device,
        denoise=denoise,
        schedule=config.sampling.get("time_schedule", "edm"),
    )


@register_sampling_method("dpm_solver")
def _build_dpm_solver(config, sde, shape, inverse_scaler, eps):
    denoise = bool(config.sampling.noise_removal)
    nfe = _config_nfe(config, 20)
    if nfe - int(denoise) < 1:
        raise ValueError(f"DPM-Solver++ needs nfe >= {1 + int(denoise)} (config.sampling.nfe), got {nfe}")
    return get_dpm_solver_sampler(
        sde,
        shape,
        inverse_scaler,
        num_steps=nfe - int(denoise),
        order=int(config.sampling.get("dpm_solver_order", 3)),
        eps=eps,
        device=config.device,
        denoise=denoise,
        schedule=config.sampling.get("time_schedule", "logsnr"),
    )


__all__ = [
    "AncestralSamplingPredictor",
    "AnnealedLangevinDynamics",
    "Corrector",
    "EulerMaruyamaPredictor",
    "LangevinCorrector",
    "NoneCorrector",
    "NonePredictor",
    "Predictor",
    "ProbabilityFlowODE",
    "ReverseDiffusionPredictor",
    "denoise_update",
    "dpm_solver_pp_update",
    "dpm_solver_sample",
    "edm_time_grid",
    "fast_time_grid",
    "get_corrector",
    "get_dpm_solver_sampler",
    "get_heun_sampler",
    "get_ode_flow",
    "get_ode_sampler",
    "get_pc_sampler",
    "get_predictor",
    "get_sampling_fn",
    "half_log_snr",
    "heun_num_points",
    "heun_sample",
    "image_to_latent",
    "latent_to_image",
    "logsnr_time_grid",
    "pc_sample",
    "pc_time_grid",
    "probability_flow_drift",
    "register_corrector",
    "register_predictor",
    "register_sampling_method",
    "shared_corrector_update_fn",
    "shared_predictor_update_fn",
    "solve_probability_flow",
    "t_from_half_log_snr",
]
