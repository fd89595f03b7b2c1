"""Predictor-corrector samplers (score_sde Algorithm 1): the registered predictors and correctors and the PC loop.

Predictors and correctors never branch on the SDE's type: each SDE owns its time grid (time_grid), its reverse
step (discretize, reverse_time_step, ancestral_coefficients) and its Langevin step factor (sde_lib.py).
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch

from models.utils import get_score_fn
from samplers.base import (
    CountingScoreFn,
    ScoreFn,
    broadcast_to,
    check_eps,
    make_sampling_fn,
    register_corrector,
    register_predictor,
)

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
    """x <- x + f_rev dt + g sqrt(-dt) z with dt = sde.reverse_time_step(t) (-T/N; RVE: its 1/t grid)."""

    def update_fn(self, x, t):
        dt = self.sde.reverse_time_step(t)
        if isinstance(dt, torch.Tensor):
            dt = broadcast_to(dt, x)
        z = torch.randn_like(x)
        drift, diffusion = self.rsde.sde(x, t)
        x_mean = x + drift * dt
        if self.probability_flow:
            return x_mean, x_mean
        x = x_mean + broadcast_to(diffusion, x) * torch.sqrt(torch.as_tensor(-dt, dtype=x.dtype, device=x.device)) * z
        return x, x_mean


@register_predictor(name="reverse_diffusion")
class ReverseDiffusionPredictor(Predictor):
    """Reverse of the forward discretisation x_{i+1} = x_i + f_i + G_i z of sde.discretize (score_sde section 4.2):
    DDPM's for VP, SMLD's for VE and RVE (on its 1/t grid), Euler-Maruyama's for sub-VP."""

    def update_fn(self, x, t):
        f, G = self.rsde.discretize(x, t)
        z = torch.randn_like(x)
        x_mean = x - f
        x = x_mean + broadcast_to(G, x) * z
        return x, x_mean


@register_predictor(name="ancestral_sampling")
class AncestralSamplingPredictor(Predictor):
    """Ancestral sampling x_s = (x + v score) / a + sqrt(w) z with (a, v, w) = sde.ancestral_coefficients(t): DDPM's
    form for VP and SMLD's for VE (score_sde), the Gaussian posterior q(x_s | x_t, x0_hat) between consecutive grid
    times for sub-VP and RVE."""

    def __init__(self, sde, score_fn, probability_flow=False):
        super().__init__(sde, score_fn, probability_flow)
        if probability_flow:
            raise NotImplementedError(
                "Probability flow not supported by ancestral sampling: use sampling.predictor = 'reverse_diffusion' "
                "or 'euler_maruyama' with probability_flow, or sampling.method = 'ode'."
            )

    def update_fn(self, x, t):
        a, v, w = self.sde.ancestral_coefficients(t)
        score = self.score_fn(x, t)
        x_mean = (x + broadcast_to(v, x) * score) / broadcast_to(a, x)
        noise = torch.randn_like(x)
        x = x_mean + broadcast_to(torch.sqrt(w), x) * noise
        return x, x_mean


@register_predictor(name="none")
class NonePredictor(Predictor):
    """An empty predictor that does nothing."""

    def __init__(self, sde, score_fn, probability_flow=False):
        pass

    def update_fn(self, x, t):
        return x, x


@register_corrector(name="langevin")
class LangevinCorrector(Corrector):
    """Langevin MCMC with step size 2 alpha (snr ||z|| / ||score||)^2 (score_sde Algorithm 4/5)."""

    def update_fn(self, x, t):
        score_fn = self.score_fn
        n_steps = self.n_steps
        target_snr = self.snr
        alpha = self.sde.langevin_step_factor(t)

        x_mean = x
        for _ in range(n_steps):
            grad = score_fn(x, t)
            noise = torch.randn_like(x)
            grad_norm = torch.norm(grad.reshape(grad.shape[0], -1), dim=-1).mean()
            noise_norm = torch.norm(noise.reshape(noise.shape[0], -1), dim=-1).mean()
            step_size = (target_snr * noise_norm / grad_norm) ** 2 * 2 * alpha
            x_mean = x + broadcast_to(step_size, x) * grad
            x = x_mean + broadcast_to(torch.sqrt(step_size * 2), x) * noise

        return x, x_mean


@register_corrector(name="ald")
class AnnealedLangevinDynamics(Corrector):
    """Annealed Langevin dynamics of NCSN: step size 2 alpha (snr sigma(t))^2."""

    def update_fn(self, x, t):
        score_fn = self.score_fn
        n_steps = self.n_steps
        target_snr = self.snr
        alpha = self.sde.langevin_step_factor(t)
        std = self.sde.marginal_prob(x, t)[1]

        x_mean = x
        for _ in range(n_steps):
            grad = score_fn(x, t)
            noise = torch.randn_like(x)
            step_size = (target_snr * std) ** 2 * 2 * alpha
            x_mean = x + broadcast_to(step_size, x) * grad
            x = x_mean + broadcast_to(torch.sqrt(step_size * 2), x) * noise

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
    score_fn = get_score_fn(sde, model, train=False, continuous=continuous)
    predictor_obj = (
        NonePredictor(sde, score_fn, probability_flow)
        if predictor is None
        else predictor(sde, score_fn, probability_flow)
    )
    return predictor_obj.update_fn(x, t)


def shared_corrector_update_fn(x, t, sde, model, corrector, continuous, snr, n_steps):
    """A wrapper that configures and returns the update function of correctors."""
    score_fn = get_score_fn(sde, model, train=False, continuous=continuous)
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
    num_steps: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Predictor-corrector sampling from x at t = T over num_steps grid times (default sde.N) down to eps (score_sde
    Algorithm 1). The predictor and corrector step on sde.with_num_steps(num_steps, eps): its time_grid and
    discretisation, while score_fn keeps the network's own labels, so the step count is free of the network.

    project(x, x_mean, t) -> (x, x_mean), when given, runs after every corrector and predictor update (the
    constraint step of controllable generation: inpainting, colorization). Returns the final x (x_mean of the
    last step when denoise) in the model's data space and the number of score evaluations."""
    grid_sde = sde.with_num_steps(sde.N if num_steps is None else int(num_steps), eps)
    counter = CountingScoreFn(score_fn)
    predictor_obj = (NonePredictor if predictor is None else predictor)(grid_sde, counter, probability_flow)
    corrector_obj = (NoneCorrector if corrector is None else corrector)(grid_sde, counter, snr, n_steps)
    timesteps = grid_sde.time_grid(grid_sde.N, eps, x.device)
    x_mean = x
    with torch.no_grad():
        for i in range(grid_sde.N):
            vec_t = torch.full((x.shape[0],), float(timesteps[i]), device=x.device, dtype=x.dtype)
            x, x_mean = corrector_obj.update_fn(x, vec_t)
            if project is not None:
                x, x_mean = project(x, x_mean, vec_t)
            x, x_mean = predictor_obj.update_fn(x, vec_t)
            if project is not None:
                x, x_mean = project(x, x_mean, vec_t)
    return (x_mean if denoise else x), counter.count


def pc_time_grid(sde, num_steps: int, eps: float, device) -> torch.Tensor:
    """The PC sampler's time grid: sde.time_grid (linspace(T, eps, N) as score_sde; RVE uniform in 1/t)."""
    return sde.time_grid(num_steps, eps, device)


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
    num_steps: int | None = None,
    precision: str = "fp32",
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
      num_steps: The number of predictor steps (None: sde.N, score_sde's behaviour; config.sampling.num_steps).
      precision: 'fp32', or 'bf16' / 'fp16' to run the network under autocast (eval.precision).

    Returns:
      A sampling function pc_sampler(model, z=None) -> (samples, number of score evaluations actually made).
    """
    check_eps(eps, sde)
    if num_steps is not None and int(num_steps) < 1:
        raise ValueError(f"config.sampling.num_steps must be >= 1 (0: model.num_scales); got {num_steps}.")

    def loop(param, x):
        return pc_sample(
            sde, param.score, x, predictor, corrector, snr, n_steps, probability_flow, denoise, eps, num_steps=num_steps
        )

    return make_sampling_fn(loop, sde, shape, inverse_scaler, device, continuous, precision=precision)
