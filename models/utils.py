"""Model registry, model/score function wrappers and network label transforms (score_sde_pytorch's
models/utils.py, plus the Soft Truncation paper's unbounded parametrisations, papers.md section 3).

Network labels (checkpoint compatibility, papers.md section 1):
- VP / subVP, continuous: label 999 t (positional embedding); the network predicts noise: score = -out/std.
  With config.training.unbounded_parametrization (UDDPM++) the label is `uddpm_label(t)` instead. With the Soft
  Truncation repository's config.training.ddpm_score = False the output is the score itself (no -1/std).
- VP discrete: label t (N - 1), std from sqrt_1m_alphas_cumprod.
- VE continuous / RVE: label = marginal std sigma(t) (Gaussian Fourier embedding of log sigma, or of
  `uncsn_embedding_input(sigma)` for UNCSN++, inside NCSN++); with scale_by_sigma the output is the score.
- VE discrete: label = round((T - t)(N - 1)), an index into the model's `sigmas` buffer.
- A corruption object with its own `get_score_fn(model, train=..., continuous=...)` (Soft Diffusion's blur) is
  delegated to.
"""

import math
from collections.abc import Callable

import numpy as np
import torch

_MODELS: dict[str, type] = {}

UNCSN_SIGMA_SWITCH = 0.01  # u(sigma) = log sigma above this noise level
UNCSN_SIGMA_OFFSET = 1e-4  # u(sigma) = -c1 / (sigma + offset) + c2 below it
VP_LABEL_SCALE = 999.0  # continuous VP/subVP labels span [0, 999]


def register_model(cls=None, *, name: str | None = None):
    """Class decorator adding a model to the registry under `name` (default: the class name)."""

    def _register(cls):
        local_name = cls.__name__ if name is None else name
        if local_name in _MODELS:
            raise ValueError(f"Already registered model with name: {local_name}")
        _MODELS[local_name] = cls
        return cls

    return _register if cls is None else _register(cls)


def get_model(name: str) -> type:
    """The registered model class called `name`."""
    if name not in _MODELS:
        raise ValueError(
            f"config.model.name={name!r} is not a registered model; registered: {sorted(_MODELS)}. "
            "Import the module that defines it (e.g. 'import models') before calling create_model."
        )
    return _MODELS[name]


def get_sigmas(config) -> np.ndarray:
    """Geometric noise levels sigma_i = exp(linspace(log sigma_max, log sigma_min, num_scales)), float64."""
    return np.exp(np.linspace(np.log(config.model.sigma_max), np.log(config.model.sigma_min), config.model.num_scales))


def get_ddpm_params(config) -> dict:
    """DDPM's discrete betas linspace(beta_min / N, beta_max / N, 1000) and derived cumulative products."""
    num_diffusion_timesteps = 1000
    beta_start = config.model.beta_min / config.model.num_scales
    beta_end = config.model.beta_max / config.model.num_scales
    betas = np.linspace(beta_start, beta_end, num_diffusion_timesteps, dtype=np.float64)
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    return {
        "betas": betas,
        "alphas": alphas,
        "alphas_cumprod": alphas_cumprod,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_1m_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "beta_min": beta_start * (num_diffusion_timesteps - 1),
        "beta_max": beta_end * (num_diffusion_timesteps - 1),
        "num_diffusion_timesteps": num_diffusion_timesteps,
    }


def create_model(config) -> torch.nn.Module:
    """Build the registered model config.model.name and move it to config.device (no DataParallel wrapper)."""
    model = get_model(config.model.name)(config)
    device = getattr(config, "device", None)
    return model.to(device if device is not None else "cpu")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The network inside a DataParallel / DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(getattr(model, "module", None), torch.nn.Module) else model


def get_model_config(model: torch.nn.Module):
    """The config the network was built with (model.config or model.module.config), or None."""
    return getattr(unwrap_model(model), "config", None)


def get_model_fn(model: torch.nn.Module, train: bool = False) -> Callable:
    """model_fn(x, labels): the network output, with the model switched to train() or eval() mode."""

    def model_fn(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        model.train(train)
        return model(x, labels)

    return model_fn


# ----------------------------------------------------------------------------------------------------
# Unbounded parametrisations (Soft Truncation, papers.md section 3)


def vp_integrated_beta(t: torch.Tensor, beta_min: float, beta_max: float) -> torch.Tensor:
    """B(t) = beta_min t + (beta_max - beta_min) t^2 / 2 (VP / subVP)."""
    return beta_min * t + 0.5 * (beta_max - beta_min) * t**2


def uddpm_log_snr_antiderivative(b: torch.Tensor, c: float) -> torch.Tensor:
    """A_c = log(1 - exp(-B) + c) + B, a stabilised -log SNR of VP (UDDPM++)."""
    return torch.log(-torch.expm1(-b) + c) + b


def uddpm_label(
    t: torch.Tensor, beta_min: float, beta_max: float, eps: float, c: float = 1e-3, T: float = 1.0
) -> torch.Tensor:
    """UDDPM++ label 999 (A_c(t) - A_c(eps)) / (A_c(T) - A_c(eps)): 0 at t = eps, 999 at t = T, increasing."""
    ends = torch.tensor([eps, T], dtype=torch.float64)
    a_eps, a_T = uddpm_log_snr_antiderivative(vp_integrated_beta(ends, beta_min, beta_max), c).tolist()
    a_t = uddpm_log_snr_antiderivative(vp_integrated_beta(t, beta_min, beta_max), c)
    return VP_LABEL_SCALE * (a_t - a_eps) / (a_T - a_eps)


def uncsn_constants(
    sigma_switch: float = UNCSN_SIGMA_SWITCH, offset: float = UNCSN_SIGMA_OFFSET
) -> tuple[float, float]:
    """(c1, c2) with -c1 / (s + offset) + c2 = log s and c1 / (s + offset)^2 = 1 / s at s = sigma_switch."""
    c1 = (sigma_switch + offset) ** 2 / sigma_switch
    c2 = math.log(sigma_switch) + c1 / (sigma_switch + offset)
    return c1, c2


def uncsn_embedding_input(
    sigma: torch.Tensor, sigma_switch: float = UNCSN_SIGMA_SWITCH, offset: float = UNCSN_SIGMA_OFFSET
) -> torch.Tensor:
    """UNCSN++ u(sigma) = log sigma for sigma >= 0.01, -c1 / (sigma + 1e-4) + c2 below (C^1, bounded)."""
    c1, c2 = uncsn_constants(sigma_switch, offset)
    log_part = torch.log(torch.clamp(sigma, min=sigma_switch))
    small_part = -c1 / (torch.clamp(sigma, min=0.0) + offset) + c2
    return torch.where(sigma >= sigma_switch, log_part, small_part)


def _cfg(section, name: str, default):
    """config.<section>.<name> if present, else default."""
    return getattr(section, name, default) if section is not None else default


def uses_unbounded_parametrization(config) -> bool:
    """True when config.training.unbounded_parametrization is set (UDDPM++ / UNCSN++)."""
    if config is None:
        return False
    return bool(_cfg(getattr(config, "training", None), "unbounded_parametrization", False))


# ----------------------------------------------------------------------------------------------------


def _vp_betas(sde) -> tuple[float, float]:
    """(beta_min, beta_max) of a VP/subVP SDE (score_sde names them beta_0, beta_1)."""
    for lo, hi in (("beta_0", "beta_1"), ("beta_min", "beta_max")):
        if hasattr(sde, lo) and hasattr(sde, hi):
            return float(getattr(sde, lo)), float(getattr(sde, hi))
    raise AttributeError(f"{type(sde).__name__} has no beta_0/beta_1 (or beta_min/beta_max) attributes")


def _vp_continuous_labels(sde, t: torch.Tensor, config) -> torch.Tensor:
    """Label of a continuous VP/subVP network: 999 t, or the UDDPM++ label when unbounded."""
    if not uses_unbounded_parametrization(config):
        return t * VP_LABEL_SCALE
    training = config.training
    beta_min, beta_max = _vp_betas(sde)
    return uddpm_label(
        t,
        beta_min,
        beta_max,
        eps=float(_cfg(training, "truncation_time", 1e-5)),
        c=float(_cfg(training, "stabilizing_constant", 1e-3)),
        T=float(sde.T),
    )


def get_score_fn(sde, model: torch.nn.Module, train: bool = False, continuous: bool = False) -> Callable:
    """score_fn(x, t) giving the score s_theta(x, t) from the network's output (see the module docstring)."""
    import sde_lib  # imported here so that the model package loads on its own

    if hasattr(sde, "get_score_fn"):
        return sde.get_score_fn(model, train=train, continuous=continuous)

    model_fn = get_model_fn(model, train=train)
    config = get_model_config(model)

    if isinstance(sde, (sde_lib.VPSDE, sde_lib.subVPSDE)):
        ddpm_score = bool(_cfg(getattr(config, "training", None), "ddpm_score", True))

        def score_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if continuous or isinstance(sde, sde_lib.subVPSDE):
                labels = _vp_continuous_labels(sde, t, config)
                std = sde.marginal_prob(torch.zeros_like(x), t)[1]
            else:
                labels = t * (sde.N - 1)
                std = torch.as_tensor(sde.sqrt_1m_alphas_cumprod).to(x.device)[labels.long()]
            out = model_fn(x, labels)
            if not ddpm_score:
                return out
            return -out / std.to(out.dtype)[:, None, None, None]

        return score_fn

    rve_cls = getattr(sde_lib, "RVESDE", None)
    if rve_cls is not None and isinstance(sde, rve_cls):

        def score_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            labels = sde.marginal_prob(torch.zeros_like(x), t)[1]
            return model_fn(x, labels)

        return score_fn

    if isinstance(sde, sde_lib.VESDE):

        def score_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if continuous:
                labels = sde.marginal_prob(torch.zeros_like(x), t)[1]
            else:
                labels = torch.round((sde.T - t) * (sde.N - 1)).long()
            return model_fn(x, labels)

        return score_fn

    raise ValueError(
        f"SDE class {sde.__class__.__name__} is not supported by get_score_fn; use sde_lib.VPSDE, subVPSDE, "
        "VESDE or RVESDE, or give the corruption object a get_score_fn(model, train, continuous) method."
    )


def to_flattened_numpy(x: torch.Tensor) -> np.ndarray:
    """Flatten a torch tensor to a 1-D numpy array (on the CPU)."""
    return x.detach().cpu().numpy().reshape((-1,))


def from_flattened_numpy(x: np.ndarray, shape) -> torch.Tensor:
    """A torch tensor of the given shape from a flat numpy array."""
    return torch.from_numpy(x.reshape(shape))
