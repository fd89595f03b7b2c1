"""Samplers of Soft Diffusion (Daras et al. 2023; papers.md section 5) for corruptions x_t = C_t x0 + s_t eta.

Both samplers run on the time grid t_0 = T > t_1 > ... > t_(N-1) = eps (N = num_steps points, uniform in t),
start from x_T ~ corruption.prior_sampling, evaluate the network once per grid point (N evaluations in
all), and return the clean-image prediction h(x_eps, eps) of the last grid point (through inverse_scaler).

Naive sampler, one step t -> t' = t - dt:  x0_hat = h(x_t, t);  x_t' = C_t' x0_hat + s_t' eta.
Momentum Sampler, one step:  x0_hat = h(x_t, t);  y_t = C_t x0_hat;  e = y_t - x_t;
    z = x_t - (s_t'^2 / s_t^2 - 1) e + sqrt(s_t^2 - s_t'^2) eta;
    y_t' = C_t' x0_hat;  x_t' = z + (y_t' - y_t).
noise=False drops the eta terms: with a constant s_t the Momentum Sampler is then Cold Diffusion's improved
sampler x_t' = x_t - C_t x0_hat + C_t' x0_hat, and the naive sampler is Cold Diffusion's naive one.

sampling.py registers build_naive_sampler and build_momentum_sampler as the sampling methods 'naive_blur' and
'momentum' (config.sampling.method); they read config.blur.num_steps (N) and config.blur.sampler_noise. The
clean-image prediction h is the blur parametrisation's denoise (parametrization.BlurResidual).
"""

from collections.abc import Callable

import ml_collections
import torch

from samplers.base import make_sampling_fn


def time_grid(num_steps: int, T: float, eps: float, device: torch.device | str | None = None) -> torch.Tensor:
    """t_i = T + i (eps - T) / (N - 1), i = 0..N-1 (the single point T when N = 1), in float64."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1 (got {num_steps})")
    if num_steps == 1:
        return torch.tensor([T], device=device, dtype=torch.float64)
    return torch.linspace(T, eps, num_steps, device=device, dtype=torch.float64)


def naive_update(
    corruption, x0_hat: torch.Tensor, t_next: torch.Tensor, noise: bool = True, generator=None
) -> torch.Tensor:
    """x_t' = C_t' x0_hat + s_t' eta (eta omitted when noise is False)."""
    x = corruption.blur_at(x0_hat, t_next)
    if noise:
        s_next = corruption.noise_std(t_next).reshape(-1, 1, 1, 1)
        eta = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        x = x + s_next * eta
    return x


def momentum_update(
    corruption,
    x_t: torch.Tensor,
    x0_hat: torch.Tensor,
    t: torch.Tensor,
    t_next: torch.Tensor,
    noise: bool = True,
    generator=None,
) -> torch.Tensor:
    """Momentum step: z = x_t - (s'^2/s^2 - 1)(C_t x0_hat - x_t) + sqrt(s^2 - s'^2) eta,
    x_t' = z + C_t' x0_hat - C_t x0_hat."""
    s = corruption.noise_std(t).reshape(-1, 1, 1, 1)
    s_next = corruption.noise_std(t_next).reshape(-1, 1, 1, 1)
    y_t = corruption.blur_at(x0_hat, t)
    e = y_t - x_t
    z = x_t - (s_next**2 / s**2 - 1) * e
    if noise:
        eta = torch.randn(x_t.shape, device=x_t.device, dtype=x_t.dtype, generator=generator)
        z = z + (s**2 - s_next**2).clamp_min(0).sqrt() * eta
    y_next = corruption.blur_at(x0_hat, t_next)
    return z + (y_next - y_t)


def _get_sampler(
    update: str,
    corruption,
    shape: tuple,
    inverse_scaler: Callable[[torch.Tensor], torch.Tensor],
    num_steps: int | None,
    eps: float,
    device: torch.device | str | None,
    noise: bool,
    generator: torch.Generator | None,
    precision: str = "fp32",
) -> Callable:
    """Shared loop of the naive and the momentum sampler."""
    num_steps = int(num_steps if num_steps is not None else corruption.N)
    if not 0 <= eps < corruption.T:
        raise ValueError(f"sampling eps must lie in [0, T) (got {eps})")
    device = torch.device(device) if device is not None else torch.device("cpu")

    def loop(param, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """N clean-image predictions h(x_t, t) on the grid; returns h(x_eps, eps)."""
        ts = time_grid(num_steps, corruption.T, eps, device=device)
        x0_hat = x
        for i in range(num_steps):
            t = ts[i].expand(x.shape[0]).to(x.dtype)
            x0_hat = param.denoise(x, t)
            if i == num_steps - 1:
                break
            t_next = ts[i + 1].expand(x.shape[0]).to(x.dtype)
            if update == "naive":
                x = naive_update(corruption, x0_hat, t_next, noise=noise, generator=generator)
            else:
                x = momentum_update(corruption, x, x0_hat, t, t_next, noise=noise, generator=generator)
        return x0_hat, num_steps

    return make_sampling_fn(loop, corruption, shape, inverse_scaler, device, generator=generator, precision=precision)


def get_naive_sampler(
    corruption,
    shape: tuple,
    inverse_scaler: Callable[[torch.Tensor], torch.Tensor],
    num_steps: int | None = None,
    eps: float = 1e-3,
    device: torch.device | str | None = None,
    noise: bool = True,
    generator: torch.Generator | None = None,
    precision: str = "fp32",
) -> Callable:
    """Naive sampler x_t' = C_t' h(x_t, t) + s_t' eta on N = num_steps grid points (default corruption.N)."""
    return _get_sampler("naive", corruption, shape, inverse_scaler, num_steps, eps, device, noise, generator, precision)


def get_momentum_sampler(
    corruption,
    shape: tuple,
    inverse_scaler: Callable[[torch.Tensor], torch.Tensor],
    num_steps: int | None = None,
    eps: float = 1e-3,
    device: torch.device | str | None = None,
    noise: bool = True,
    generator: torch.Generator | None = None,
    precision: str = "fp32",
) -> Callable:
    """Momentum Sampler of Soft Diffusion on N = num_steps grid points (default corruption.N)."""
    return _get_sampler(
        "momentum", corruption, shape, inverse_scaler, num_steps, eps, device, noise, generator, precision
    )


def _config_options(config: ml_collections.ConfigDict, corruption) -> tuple[int, bool]:
    """(num_steps, noise) from config.blur."""
    if not hasattr(corruption, "blur_at"):
        raise ValueError(
            "sampling methods 'naive_blur' and 'momentum' need config.training.corruption = 'blur' "
            "(got a Gaussian SDE: use sampling.method = 'pc' or 'ode')"
        )
    return int(config.blur.num_steps), bool(config.blur.sampler_noise)


def build_naive_sampler(config: ml_collections.ConfigDict, sde, shape, inverse_scaler, eps: float) -> Callable:
    """Builder for config.sampling.method = 'naive_blur' (sde is the BlurCorruption)."""
    num_steps, noise = _config_options(config, sde)
    precision = config.eval.precision or config.training.precision
    return get_naive_sampler(sde, shape, inverse_scaler, num_steps, eps, config.device, noise, precision=precision)


def build_momentum_sampler(config: ml_collections.ConfigDict, sde, shape, inverse_scaler, eps: float) -> Callable:
    """Builder for config.sampling.method = 'momentum' (sde is the BlurCorruption)."""
    num_steps, noise = _config_options(config, sde)
    precision = config.eval.precision or config.training.precision
    return get_momentum_sampler(sde, shape, inverse_scaler, num_steps, eps, config.device, noise, precision=precision)
