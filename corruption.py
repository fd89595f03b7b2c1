"""Corruptions: the Gaussian SDEs of sde_lib and the blur + noise corruption of Soft Diffusion (Daras et al.).

A "corruption" is any object with marginal_prob(x0, t) -> (mean, std [B]), prior_sampling(shape) and T.
The blur corruption (papers.md section 5) is

    x_t = C_t x0 + s_t eta,  eta ~ N(0, I),
    C_t = IDCT diag(exp(-lambda_nm sigma_B(t)^2 / 2)) DCT,  lambda_nm = pi^2 (n^2 / H^2 + m^2 / W^2),

the heat equation with reflective (Neumann) boundary in the orthonormal 2-D DCT-II basis, applied per channel;
sigma_B(t) is the blur std in pixels and s_t the std of the small additive noise.

Config section `config.blur` (see default_blur_config for every field and its default) and
`config.training.corruption` ('gaussian' (default): the SDE of config.training.sde; 'blur': BlurCorruption).
The Soft Score Matching weighting is losses.py's config.training.weighting: 'variance' (lambda = s_t^2,
the 'ssm' weighting below) or 'x0' (lambda = s_t^4, the 'plain' weighting below).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping

import ml_collections
import torch

import parametrization
from configs.defaults import complete_config, default_blur_config  # noqa: F401  (default_blur_config: public)

CORRUPTIONS = ("gaussian", "blur")
BLUR_SCHEDULES = ("log", "linear", "file")
NOISE_SCHEDULES = ("constant", "linear", "geometric")
SSM_WEIGHTINGS = ("ssm", "plain")


# ------------------------------------------------------------------------------------------------------------
# DCT-II (orthonormal) and the heat-equation blur
# ------------------------------------------------------------------------------------------------------------

_DCT_CACHE: dict[tuple, torch.Tensor] = {}


def dct_matrix(n: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Orthonormal DCT-II matrix D[k, i] = c_k cos(pi (i + 1/2) k / n), c_0 = sqrt(1/n), c_k = sqrt(2/n)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    key = (n, device, dtype)
    if key not in _DCT_CACHE:
        k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
        i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
        mat = torch.cos(math.pi * (i + 0.5) * k / n) * math.sqrt(2.0 / n)
        mat[0] = mat[0] / math.sqrt(2.0)
        _DCT_CACHE[key] = mat.to(device=device, dtype=dtype)
    return _DCT_CACHE[key]


def dct_2d(x: torch.Tensor) -> torch.Tensor:
    """2-D orthonormal DCT-II over the last two dims: X = D_H x D_W^T (batched, any channel count)."""
    d_h = dct_matrix(x.shape[-2], x.device, x.dtype)
    d_w = dct_matrix(x.shape[-1], x.device, x.dtype)
    return d_h @ x @ d_w.T


def idct_2d(coeffs: torch.Tensor) -> torch.Tensor:
    """Inverse of dct_2d: x = D_H^T X D_W."""
    d_h = dct_matrix(coeffs.shape[-2], coeffs.device, coeffs.dtype)
    d_w = dct_matrix(coeffs.shape[-1], coeffs.device, coeffs.dtype)
    return d_h.T @ coeffs @ d_w


def heat_eigenvalues(
    height: int, width: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """lambda_nm = pi^2 (n^2 / H^2 + m^2 / W^2), shape [H, W] (Neumann Laplacian eigenvalues, pixel units)."""
    n = torch.arange(height, dtype=torch.float64).unsqueeze(1)
    m = torch.arange(width, dtype=torch.float64).unsqueeze(0)
    lam = math.pi**2 * (n**2 / height**2 + m**2 / width**2)
    return lam.to(device=device, dtype=dtype)


def _as_batch(value: torch.Tensor | float, ref: torch.Tensor) -> torch.Tensor:
    """A per-sample value as a tensor [B] on ref's device and dtype (floats are broadcast over the batch)."""
    value = torch.as_tensor(value, device=ref.device, dtype=ref.dtype)
    if value.dim() == 0:
        value = value.expand(ref.shape[0])
    return value


def blur_frequency_response(sigma_b: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Heat-kernel response exp(-lambda_nm sigma_B^2 / 2) in the DCT basis: [B, 1, H, W] for sigma_b [B]."""
    lam = heat_eigenvalues(height, width, sigma_b.device, sigma_b.dtype)
    return torch.exp(-lam * (sigma_b.reshape(-1, 1, 1, 1) ** 2) / 2)


def blur(x: torch.Tensor, sigma_b: torch.Tensor | float) -> torch.Tensor:
    """C x = IDCT(exp(-lambda sigma_B^2 / 2) DCT(x)) per sample, channel; x [B, C, H, W], sigma_b [B] px."""
    sigma_b = _as_batch(sigma_b, x)
    response = blur_frequency_response(sigma_b, x.shape[-2], x.shape[-1])
    return idct_2d(response * dct_2d(x))


# ------------------------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------------------------


def log_schedule(t: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Geometric interpolation low (high / low)^t."""
    return low * (high / low) ** t


def linear_schedule(t: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Linear interpolation low + t (high - low)."""
    return low + t * (high - low)


def interp_log_schedule(t: torch.Tensor, grid_t: torch.Tensor, grid_sigma: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of log sigma in t on the grid (grid_t increasing 0 -> 1), clamped."""
    grid_t = grid_t.to(device=t.device, dtype=t.dtype)
    log_sigma = torch.log(grid_sigma.to(device=t.device, dtype=t.dtype))
    tc = t.clamp(grid_t[0], grid_t[-1])
    idx = torch.searchsorted(grid_t, tc.contiguous(), right=True).clamp(1, grid_t.numel() - 1)
    t0, t1 = grid_t[idx - 1], grid_t[idx]
    w = (tc - t0) / (t1 - t0)
    return torch.exp(log_sigma[idx - 1] + w * (log_sigma[idx] - log_sigma[idx - 1]))


def load_schedule_file(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a schedule file of tools/blur_schedule.py (json {'t': [...], 'sigma': [...]}) -> (t, sigma)."""
    if not path:
        raise ValueError("config.blur.schedule = 'file' needs config.blur.schedule_file (run tools/blur_schedule.py)")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"blur schedule file {path!r} not found: write it with "
            f"`python -m tools.blur_schedule --config ... "
            f"--out {path}` or set config.blur.schedule to 'log' or 'linear'"
        )
    try:
        with open(path) as f:
            data = json.load(f)
        grid_t = torch.tensor(data["t"], dtype=torch.float64)
        grid_sigma = torch.tensor(data["sigma"], dtype=torch.float64)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"blur schedule file {path!r} is not a valid schedule (json with lists 't' and 'sigma'): {err}; "
            "rewrite it with tools/blur_schedule.py"
        ) from err
    validate_schedule(grid_t, grid_sigma, source=path)
    return grid_t, grid_sigma


def validate_schedule(grid_t: torch.Tensor, grid_sigma: torch.Tensor, source: str = "schedule") -> None:
    """Check a schedule grid: same length >= 2, t strictly increasing from 0 to 1, sigma > 0 and finite."""
    if grid_t.dim() != 1 or grid_t.shape != grid_sigma.shape or grid_t.numel() < 2:
        raise ValueError(f"{source}: t and sigma must be 1-D lists of the same length >= 2")
    if not (torch.isfinite(grid_t).all() and torch.isfinite(grid_sigma).all()):
        raise ValueError(f"{source}: t and sigma must be finite")
    if not (torch.diff(grid_t) > 0).all() or abs(grid_t[0].item()) > 1e-9 or abs(grid_t[-1].item() - 1) > 1e-9:
        raise ValueError(f"{source}: t must increase strictly from 0 to 1")
    if not (grid_sigma > 0).all():
        raise ValueError(f"{source}: blur levels sigma must be > 0")


# ------------------------------------------------------------------------------------------------------------
# Soft Score Matching weighting (papers.md section 5)
# ------------------------------------------------------------------------------------------------------------


def ssm_lambda(noise_std: torch.Tensor, weighting: str = "ssm") -> torch.Tensor:
    """lambda(t) of the loss (lambda / s^2) ||s score + z||^2 / 2 = lambda ||C_t(h - x0)||^2 / (2 s_t^4).

    'ssm': lambda = s_t^2, giving ||C_t(h - x0)||^2 / (2 s_t^2) (the DSM-equivalent weighting);
    'plain': lambda = s_t^4, giving ||C_t(h - x0)||^2 / 2 (the unweighted Soft Score Matching objective).
    """
    if weighting == "ssm":
        return noise_std**2
    if weighting == "plain":
        return noise_std**4
    raise ValueError(f"unknown Soft Score Matching weighting {weighting!r}: use one of {SSM_WEIGHTINGS}")


# ------------------------------------------------------------------------------------------------------------
# The blur corruption
# ------------------------------------------------------------------------------------------------------------


class BlurCorruption:
    """x_t = C_t x0 + s_t eta: heat-equation blur C_t (sigma_B(t) px), noise s_t; prior fitted from data."""

    def __init__(
        self,
        sigma_min: float = 0.3,
        sigma_max: float = 20.0,
        schedule: str = "log",
        schedule_file: str = "",
        noise_schedule: str = "geometric",
        noise_min: float = 0.01,
        noise_max: float = 0.1,
        N: int = 100,
    ):
        if schedule not in BLUR_SCHEDULES:
            raise ValueError(f"unknown config.blur.schedule {schedule!r}: use one of {BLUR_SCHEDULES}")
        if noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"unknown config.blur.noise_schedule {noise_schedule!r}: use one of {NOISE_SCHEDULES}")
        if schedule != "file" and not 0 < sigma_min <= sigma_max:
            raise ValueError(
                f"config.blur needs 0 < sigma_min <= sigma_max (got {sigma_min}, {sigma_max}); sigma_B is in pixels"
            )
        if not 0 < noise_min <= noise_max:
            raise ValueError(
                f"config.blur needs 0 < noise_min <= noise_max (got {noise_min}, {noise_max}): "
                "the score of the "
                "corrupted distribution exists only with noise, and the samplers need s_t nondecreasing in t"
            )
        if int(N) < 1:
            raise ValueError(f"config.blur.num_steps must be >= 1 (got {N})")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.schedule = schedule
        self.schedule_file = schedule_file
        self.noise_schedule = noise_schedule
        self.noise_min = float(noise_min)
        self.noise_max = float(noise_max)
        self.N = int(N)
        self.schedule_t: torch.Tensor | None = None
        self.schedule_sigma: torch.Tensor | None = None
        if schedule == "file":
            self.schedule_t, self.schedule_sigma = load_schedule_file(schedule_file)
        self.prior_mean: torch.Tensor | None = None  # [C, H, W], DCT coefficients of x_1
        self.prior_var: torch.Tensor | None = None  # [C, H, W]
        self.num_fit_images = 0

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> BlurCorruption:
        """Build from config.blur (fields of default_blur_config)."""
        if "blur" not in config:
            raise ValueError(
                "config.training.corruption = 'blur' needs a config.blur section: set "
                "config.blur = corruption.default_blur_config() and override its fields"
            )
        b = complete_config(config).blur
        return cls(
            sigma_min=b.sigma_min,
            sigma_max=b.sigma_max,
            schedule=b.schedule,
            schedule_file=b.schedule_file,
            noise_schedule=b.noise_schedule,
            noise_min=b.noise_min,
            noise_max=b.noise_max,
            N=b.num_steps,
        )

    @property
    def T(self) -> float:
        return 1.0

    # schedules ----------------------------------------------------------------------------------------------
    def blur_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma_B(t) in pixels, t [B]."""
        if self.schedule == "log":
            return log_schedule(t, self.sigma_min, self.sigma_max)
        if self.schedule == "linear":
            return linear_schedule(t, self.sigma_min, self.sigma_max)
        return interp_log_schedule(t, self.schedule_t, self.schedule_sigma)

    def noise_std(self, t: torch.Tensor) -> torch.Tensor:
        """s_t, t [B]."""
        if self.noise_schedule == "constant":
            return torch.full_like(t, self.noise_max)
        if self.noise_schedule == "linear":
            return linear_schedule(t, self.noise_min, self.noise_max)
        return log_schedule(t, self.noise_min, self.noise_max)

    def marginal_std(self, t: torch.Tensor) -> torch.Tensor:
        """Std of the additive noise s_t (the 'std' of the corruption interface)."""
        return self.noise_std(t)

    def blur_at(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """C_t x for per-sample times t [B] (or one float)."""
        t = _as_batch(t, x)
        return blur(x, self.blur_sigma(t))

    def marginal_prob(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean C_t x0 and std s_t [B] of p_0t(x_t | x0)."""
        t = _as_batch(t, x0)
        return self.blur_at(x0, t), self.noise_std(t)

    # prior at t = T -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def fit_prior(
        self,
        data: torch.Tensor | Iterable,
        scaler: Callable[[torch.Tensor], torch.Tensor] | None = None,
        max_batches: int | None = None,
    ) -> BlurCorruption:
        """Fit N(mean, diag var) to DCT(x_T), x_T = C_T x0 + s_T eta: var = Var[DCT(C_T x0)] + s_T^2.

        data: a tensor [N, C, H, W] or an iterable of tensors or of dicts with key 'image' (a datasets.py
        loader); scaler maps loader images to model space (datasets.get_data_scaler); at most max_batches
        batches are used.
        """
        batches = [data] if isinstance(data, torch.Tensor) else data
        total, sum1, sum2 = 0, None, None
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            images = batch["image"] if isinstance(batch, Mapping) else batch
            if not isinstance(images, torch.Tensor) or images.dim() != 4:
                raise ValueError('fit_prior expects images as tensors [B, C, H, W] (or dicts with key "image")')
            if scaler is not None:
                images = scaler(images)
            x = images.to(torch.float64)
            coeffs = dct_2d(self.blur_at(x, self.T))
            if sum1 is None:
                sum1 = torch.zeros_like(coeffs[0])
                sum2 = torch.zeros_like(coeffs[0])
            elif coeffs.shape[1:] != sum1.shape:
                raise ValueError(
                    f"fit_prior: image shape changed from {tuple(sum1.shape)} to {tuple(coeffs.shape[1:])}"
                )
            sum1 += coeffs.sum(0)
            sum2 += (coeffs**2).sum(0)
            total += coeffs.shape[0]
        if total < 2:
            raise ValueError("fit_prior needs at least 2 images (check config.blur.prior_fit_batches and the dataset)")
        mean = sum1 / total
        var = (sum2 / total - mean**2).clamp_min(0) * total / (total - 1)
        s_T = self.noise_std(torch.tensor([self.T], dtype=torch.float64))[0]
        self.prior_mean = mean.to(torch.float32)
        self.prior_var = (var + s_T**2).to(torch.float32)
        self.num_fit_images = total
        return self

    def _check_prior(self) -> None:
        if self.prior_mean is None:
            raise RuntimeError(
                "BlurCorruption prior is not fitted: call fit_prior(training images) before training, or "
                "load_state_dict(checkpoint['corruption']) before sampling"
            )

    def prior_sampling(
        self,
        shape: tuple | torch.Size,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """x_T = IDCT(mean + sqrt(var) eta), eta ~ N(0, I): a sample of the fitted Gaussian prior."""
        self._check_prior()
        if tuple(shape[1:]) != tuple(self.prior_mean.shape):
            raise ValueError(
                f"prior_sampling shape {tuple(shape)} does not match the fitted prior "
                f"{tuple(self.prior_mean.shape)} "
                "(C, H, W): refit the prior or fix config.data.image_size / num_channels"
            )
        device = torch.device(device) if device is not None else self.prior_mean.device
        mean = self.prior_mean.to(device)
        std = self.prior_var.to(device).sqrt()
        eta = torch.randn(tuple(shape), device=device, dtype=mean.dtype, generator=generator)
        return idct_2d(mean + std * eta)

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """log N(DCT(z); mean, diag var) summed over dimensions -> [B] (orthonormal DCT: unit Jacobian)."""
        self._check_prior()
        mean = self.prior_mean.to(z.device, z.dtype)
        var = self.prior_var.to(z.device, z.dtype)
        coeffs = dct_2d(z)
        logp = -0.5 * ((coeffs - mean) ** 2 / var + torch.log(2 * math.pi * var))
        return logp.reshape(z.shape[0], -1).sum(dim=1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors needed to sample: the fitted prior and, for schedule 'file', the schedule grid."""
        self._check_prior()
        state = {
            "prior_mean": self.prior_mean.detach().cpu().clone(),
            "prior_var": self.prior_var.detach().cpu().clone(),
            "num_fit_images": torch.tensor(self.num_fit_images, dtype=torch.int64),
        }
        if self.schedule == "file":
            state["schedule_t"] = self.schedule_t.clone()
            state["schedule_sigma"] = self.schedule_sigma.clone()
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore the fitted prior (and a stored 'file' schedule, which then replaces the schedule file)."""
        missing = [k for k in ("prior_mean", "prior_var") if k not in state]
        if missing:
            raise KeyError(f"corruption state is missing {missing}: the checkpoint was not written by a blur run")
        mean, var = state["prior_mean"], state["prior_var"]
        if mean.dim() != 3 or mean.shape != var.shape:
            raise ValueError(f"corruption state: prior_mean {tuple(mean.shape)} / prior_var {tuple(var.shape)} bad")
        if not (var > 0).all():
            raise ValueError("corruption state: prior_var must be positive")
        self.prior_mean = mean.to(torch.float32).clone()
        self.prior_var = var.to(torch.float32).clone()
        self.num_fit_images = int(state.get("num_fit_images", torch.tensor(0)))
        if "schedule_t" in state:
            grid_t = state["schedule_t"].to(torch.float64)
            grid_sigma = state["schedule_sigma"].to(torch.float64)
            validate_schedule(grid_t, grid_sigma, source="corruption state")
            self.schedule, self.schedule_t, self.schedule_sigma = "file", grid_t, grid_sigma

    # networks -----------------------------------------------------------------------------------------------
    def get_denoiser_fn(self, model: torch.nn.Module, train: bool = False) -> Callable:
        """h(x, t) = x + model(x, 999 t): the clean-image prediction (parametrization.BlurResidual.denoise)."""
        return parametrization.BlurResidual(model, self, train=train).denoise

    def get_score_fn(self, model: torch.nn.Module, train: bool = False, continuous: bool = True) -> Callable:
        """score(x, t) = -(x - C_t h(x, t)) / s_t^2 (parametrization.BlurResidual.score; `continuous` is
        ignored: the labels are always 999 t)."""
        return parametrization.BlurResidual(model, self, train=train).score


def get_corruption(config: ml_collections.ConfigDict):
    """config.training.corruption: 'gaussian' -> sde_lib.get_sde(config)[0]; 'blur' -> BlurCorruption."""
    config = complete_config(config)
    name = config.training.corruption
    if name == "gaussian":
        import sde_lib

        return sde_lib.get_sde(config)[0]
    if name == "blur":
        return BlurCorruption.from_config(config)
    raise ValueError(f"unknown config.training.corruption {name!r}: use one of {CORRUPTIONS}")
