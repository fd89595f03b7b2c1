"""Controllable generation with an unconditional score model (Song et al. 2021, Appendix I.2): inpainting and
colorization by predictor-corrector sampling with a replacement step.

After every predictor and corrector update the known part of the image is replaced by a fresh draw of the
forward marginal of the observed data at the current time, x_known(t) = alpha(t) y + sigma(t) z, so the sampler
only fills in the unknown part. Colorization does the same in an orthonormal colour basis whose first channel
is the grey level. score_sde's signatures: get_pc_inpainter(...)(model, data, mask) and
get_pc_colorizer(...)(model, gray_scale_img) return images through inverse_scaler.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from models.utils import get_score_fn
from samplers.base import check_eps
from samplers.pc import pc_sample


def colorization_basis(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Orthonormal M [3, 3] whose first column is (1, 1, 1)/sqrt(3): RGB x -> decoupled x M, channel 0 = grey."""
    a, b, c = 1.0 / math.sqrt(3.0), 1.0 / math.sqrt(6.0), 1.0 / math.sqrt(2.0)
    return torch.tensor([[a, -2.0 * b, 0.0], [a, b, c], [a, b, -c]], dtype=dtype)


def decouple(images: torch.Tensor) -> torch.Tensor:
    """RGB [B, 3, H, W] -> the colorization basis (channel 0 = sqrt(3) x grey level)."""
    return torch.einsum("bihw,ij->bjhw", images, colorization_basis(images.dtype).to(images.device))


def couple(latent: torch.Tensor) -> torch.Tensor:
    """Inverse of decouple (M is orthonormal: M^-1 = M^T)."""
    return torch.einsum("bjhw,ij->bihw", latent, colorization_basis(latent.dtype).to(latent.device))


def _replacement(sde, observed: torch.Tensor, mask: torch.Tensor) -> Callable:
    """project(x, x_mean, t): the masked entries (mask = 1) of x become a draw of the forward marginal of
    `observed` at t, those of x_mean its mean; the other entries are kept."""

    def project(x: torch.Tensor, x_mean: torch.Tensor, t: torch.Tensor):
        known_mean, std = sde.marginal_prob(observed, t)
        known = known_mean + torch.randn_like(x) * std.reshape(-1, *([1] * (x.dim() - 1)))
        return x * (1.0 - mask) + known * mask, x_mean * (1.0 - mask) + known_mean * mask

    return project


def get_pc_inpainter(
    sde,
    predictor,
    corrector,
    inverse_scaler: Callable,
    snr: float,
    n_steps: int = 1,
    probability_flow: bool = False,
    continuous: bool = False,
    denoise: bool = True,
    eps: float = 1e-5,
) -> Callable:
    """pc_inpainter(model, data, mask): fill the entries where mask == 0 of data (scaled like the model's
    data, [B, C, H, W]; mask broadcastable, 1 = known) by PC sampling with replacement of the known entries."""
    check_eps(eps, sde)

    def pc_inpainter(model, data: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            mask = mask.to(data.device, data.dtype)
            score_fn = get_score_fn(sde, model, train=False, continuous=continuous)
            x = data * mask + sde.prior_sampling(data.shape).to(data.device, data.dtype) * (1.0 - mask)
            project = _replacement(sde, data, mask)
            x, _ = pc_sample(
                sde, score_fn, x, predictor, corrector, snr, n_steps, probability_flow, denoise, eps, project=project
            )
            return inverse_scaler(x)

    return pc_inpainter


def get_pc_colorizer(
    sde,
    predictor,
    corrector,
    inverse_scaler: Callable,
    snr: float,
    n_steps: int = 1,
    probability_flow: bool = False,
    continuous: bool = False,
    denoise: bool = True,
    eps: float = 1e-5,
) -> Callable:
    """pc_colorizer(model, gray_scale_img): colour images whose grey level is given ([B, 3, H, W], the grey
    level repeated in the three channels, scaled like the model's data): the grey channel of the decoupled
    image is held to the observation, the two colour channels are sampled."""
    check_eps(eps, sde)

    def score_in_basis(score_fn: Callable) -> Callable:
        """The score of the decoupled variable: M is orthonormal, so it is the decoupled score."""
        return lambda latent, t: decouple(score_fn(couple(latent), t))

    def pc_colorizer(model, gray_scale_img: torch.Tensor) -> torch.Tensor:
        if gray_scale_img.dim() != 4 or gray_scale_img.shape[1] != 3:
            raise ValueError(
                f"gray_scale_img must be [B, 3, H, W] (the grey level in all three channels), got "
                f"{tuple(gray_scale_img.shape)}"
            )
        with torch.no_grad():
            observed = decouple(gray_scale_img)
            mask = torch.zeros_like(observed)
            mask[:, :1] = 1.0
            prior = decouple(sde.prior_sampling(gray_scale_img.shape).to(observed.device, observed.dtype))
            latent = observed * mask + prior * (1.0 - mask)
            score_fn = score_in_basis(get_score_fn(sde, model, train=False, continuous=continuous))
            project = _replacement(sde, observed, mask)
            latent, _ = pc_sample(
                sde, score_fn, latent, predictor, corrector, snr, n_steps, probability_flow, denoise, eps, project
            )
            return inverse_scaler(couple(latent))

    return pc_colorizer
