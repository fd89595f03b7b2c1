"""The parametrisation layer: how a network's input labels and output become a score and a denoiser.

One object per (network, corruption, config), in the spirit of EDM's preconditioning classes and k-diffusion's
Denoiser. Losses, samplers and likelihoods call only `score(x, t)` and `denoise(x, t)`; networks see only
(x, labels). Network labels (checkpoint compatibility with score_sde and the Soft Truncation repository,
papers.md section 1):

- VP / sub-VP, continuous: label 999 t (positional embedding), or the UDDPM++ label (training.unbounded_
  parametrization, papers.md section 3); the network predicts the noise: score = -out / sigma(t). With the Soft
  Truncation repository's training.ddpm_score = False the output is the score itself.
- VP, discrete: label t (N - 1); sigma from the DDPM table sqrt(1 - alpha_bar).
- VE continuous / RVE: label sigma(t) (the network embeds log sigma, or UNCSN++'s u(sigma)); the output is the
  score (NCSN++ divides by sigma itself with model.scale_by_sigma).
- VE, discrete: label round((T - t)(N - 1)), an index into the network's `sigmas` buffer; the output is the score.
- Blur + noise corruption (Soft Diffusion, papers.md section 5): label 999 t; the network predicts the residual
  x0 - x_t: denoise = x + out, score = -(x - C_t denoise) / s_t^2.

Gaussian corruptions share Tweedie's denoise(x, t) = (x + sigma^2 score) / alpha.
"""

from __future__ import annotations

import abc
import functools
import math
from collections.abc import Callable

import torch

import sde_lib
from sde_lib import broadcast_to  # noqa: F401  (also public here)

Tensor = torch.Tensor

VP_LABEL_SCALE = 999.0  # continuous VP / sub-VP labels span [0, 999]
UNCSN_SIGMA_SWITCH = 0.01  # u(sigma) = log sigma above this noise level
UNCSN_SIGMA_OFFSET = 1e-4  # u(sigma) = -c1 / (sigma + offset) + c2 below it


# ----------------------------------------------------------------------------------------------------------------
# Label transforms (pure functions)


def vp_integrated_beta(t: Tensor, beta_min: float, beta_max: float) -> Tensor:
    """B(t) = beta_min t + (beta_max - beta_min) t^2 / 2 (VP / subVP)."""
    return beta_min * t + 0.5 * (beta_max - beta_min) * t**2


def uddpm_log_snr_antiderivative(b: Tensor, c: float) -> Tensor:
    """A_c = log(1 - exp(-B) + c) + B, a stabilised -log SNR of VP (UDDPM++)."""
    return torch.log(-torch.expm1(-b) + c) + b


def uddpm_label(t: Tensor, beta_min: float, beta_max: float, eps: float, c: float = 1e-3, T: float = 1.0) -> Tensor:
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
    sigma: Tensor, sigma_switch: float = UNCSN_SIGMA_SWITCH, offset: float = UNCSN_SIGMA_OFFSET
) -> Tensor:
    """UNCSN++ u(sigma) = log sigma for sigma >= 0.01, -c1 / (sigma + 1e-4) + c2 below (C^1, bounded)."""
    c1, c2 = uncsn_constants(sigma_switch, offset)
    log_part = torch.log(torch.clamp(sigma, min=sigma_switch))
    small_part = -c1 / (torch.clamp(sigma, min=0.0) + offset) + c2
    return torch.where(sigma >= sigma_switch, log_part, small_part)


def vp_betas(sde) -> tuple[float, float]:
    """(beta_min, beta_max) of a VP / subVP SDE (score_sde names them beta_0, beta_1)."""
    for lo, hi in (("beta_0", "beta_1"), ("beta_min", "beta_max")):
        if hasattr(sde, lo) and hasattr(sde, hi):
            return float(getattr(sde, lo)), float(getattr(sde, hi))
    raise AttributeError(f"{type(sde).__name__} has no beta_0/beta_1 (or beta_min/beta_max) attributes")


def tweedie_denoise(corruption, score_fn: Callable, x: Tensor, t: Tensor | float) -> Tensor:
    """Tweedie's x0_hat = (x + sigma^2 score(x, t)) / alpha. A scalar t (float or 0-dim tensor) has alpha and sigma
    computed in float64 and applied as Python floats; a [B] tensor t per sample."""
    if isinstance(t, Tensor) and t.ndim > 0:
        alpha, std = corruption.alpha(t), corruption.marginal_std(t)
        return (x + broadcast_to(std**2, x) * score_fn(x, t)) / broadcast_to(alpha, x)
    tt = torch.as_tensor(t, dtype=torch.float64).reshape(1)
    alpha, std = float(corruption.alpha(tt)[0]), float(corruption.marginal_std(tt)[0])
    vec_t = torch.full((x.shape[0],), float(tt[0]), device=x.device, dtype=x.dtype)
    return (x + std**2 * score_fn(x, vec_t)) / alpha


# ----------------------------------------------------------------------------------------------------------------
# The parametrisations


class Parametrization(abc.ABC):
    """A network seen through its corruption: labels(t), score(x, t), denoise(x, t).

    The network runs in train() or eval() mode as `train` says (score_sde's get_model_fn). Calling the object is
    score(x, t), so it can be passed wherever score_sde expects a score_fn."""

    def __init__(self, model: torch.nn.Module, corruption, train: bool = False, precision: str = "fp32"):
        self.model = model
        self.corruption = corruption
        self.train = train
        self.autocast_dtype = autocast_dtype(precision)

    @abc.abstractmethod
    def labels(self, t: Tensor) -> Tensor:
        """The network's conditioning input for times t [B]."""

    def run_network(self, x: Tensor, labels: Tensor) -> Tensor:
        """model(x, labels) in train() / eval() mode under the precision's autocast (run_network)."""
        return run_network(self.model, x, labels, self.train, self.autocast_dtype)

    def network(self, x: Tensor, t: Tensor) -> Tensor:
        """The raw network output at (x, labels(t))."""
        return self.run_network(x, self.labels(t))

    @abc.abstractmethod
    def score(self, x: Tensor, t: Tensor) -> Tensor:
        """The model's score s_theta(x, t) [B, ...]."""

    def denoise(self, x: Tensor, t: Tensor | float) -> Tensor:
        """x0_hat(x, t): Tweedie's formula for a Gaussian corruption (tweedie_denoise)."""
        return tweedie_denoise(self.corruption, self.score, x, t)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        return self.score(x, t)


class NoisePrediction(Parametrization):
    """VP / sub-VP: the network predicts the noise z of x_t = alpha x0 + sigma z; score = -out / sigma."""

    def __init__(
        self, model, corruption, train=False, precision="fp32", label_fn: Callable | None = None, discrete=False
    ):
        super().__init__(model, corruption, train, precision)
        self.label_fn = label_fn if label_fn is not None else vp_labels
        self.discrete = discrete

    def labels(self, t: Tensor) -> Tensor:
        if self.discrete:
            return t * (self.corruption.N - 1)
        return self.label_fn(t)

    def noise_std(self, t: Tensor, labels: Tensor) -> Tensor:
        """sigma(t): the closed form, or DDPM's table for discrete models."""
        if self.discrete:
            return torch.as_tensor(self.corruption.sqrt_1m_alphas_cumprod).to(t.device)[labels.long()]
        return self.corruption.marginal_std(t)

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        labels = self.labels(t)
        std = self.noise_std(t, labels)
        out = self.run_network(x, labels)
        return -out / std.to(out.dtype)[:, None, None, None]


class ScoreOutput(Parametrization):
    """The network's output is the score (VE, RVE, and VP networks trained with training.ddpm_score = False)."""

    def __init__(self, model, corruption, train=False, precision="fp32", label_fn: Callable | None = None):
        super().__init__(model, corruption, train, precision)
        self.label_fn = label_fn

    def labels(self, t: Tensor) -> Tensor:
        return self.label_fn(t)

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        return self.network(x, t)


class BlurResidual(Parametrization):
    """Soft Diffusion's blur corruption: the network predicts x0 - x_t with label 999 t (papers.md section 5)."""

    def labels(self, t: Tensor) -> Tensor:
        return VP_LABEL_SCALE * t

    def denoise(self, x: Tensor, t: Tensor | float) -> Tensor:
        """h(x, t) = x + network(x, 999 t)."""
        t = _as_batch(t, x)
        return x + self.network(x, t)

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        """score = -(x - C_t h(x, t)) / s_t^2."""
        t = _as_batch(t, x)
        s = self.corruption.noise_std(t).reshape(-1, 1, 1, 1)
        return -(x - self.corruption.blur_at(self.denoise(x, t), t)) / s**2


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of training.precision / eval.precision ('fp32': None, no autocast)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} (training.precision / eval.precision); valid: {list(PRECISIONS)}.")
    return PRECISIONS[precision]


def run_network(
    model: torch.nn.Module, x: Tensor, labels: Tensor, train: bool, dtype: torch.dtype | None = None
) -> Tensor:
    """model(x, labels) in train() / eval() mode; under bf16 / fp16 autocast when dtype (autocast_dtype) is set,
    the output cast back to x's dtype (so that everything after the network runs in x's precision)."""
    model.train(train)
    if dtype is None:
        return model(x, labels)
    with torch.autocast(x.device.type, dtype=dtype):
        out = model(x, labels)
    return out.to(x.dtype)


def eval_precision(config) -> str:
    """The network precision of sampling and evaluation: eval.precision, or training.precision when it is ''."""
    return config.eval.precision or config.training.precision


def _as_batch(t: Tensor | float, x: Tensor) -> Tensor:
    """t as a [B] tensor on x's device and dtype (a scalar is repeated)."""
    t = torch.as_tensor(t, device=x.device, dtype=x.dtype)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


# ----------------------------------------------------------------------------------------------------------------
# Label functions and the factory


def vp_labels(t: Tensor) -> Tensor:
    """Continuous VP / sub-VP label 999 t."""
    return t * VP_LABEL_SCALE


def sigma_labels(sde, t: Tensor) -> Tensor:
    """Continuous VE / RVE label: the marginal std sigma(t)."""
    return sde.marginal_std(t)


def ve_index_labels(sde, t: Tensor) -> Tensor:
    """Discrete VE label round((T - t)(N - 1)), an index into the network's sigmas."""
    return torch.round((sde.T - t) * (sde.N - 1)).long()


def label_options(config) -> dict:
    """The parametrisation's config fields: training.{unbounded_parametrization, truncation_time,
    stabilizing_constant, ddpm_score} (None: score_sde's defaults)."""
    training = _completed(config).training
    return dict(
        unbounded=bool(training.unbounded_parametrization),
        eps=float(training.truncation_time),
        c=float(training.stabilizing_constant),
        ddpm_score=bool(training.ddpm_score),
    )


def _completed(config):
    """config with every default filled in (configs.defaults.complete_config); None: score_sde's defaults."""
    import ml_collections

    from configs.defaults import complete_config

    return complete_config(ml_collections.ConfigDict() if config is None else config)


def get_parametrization_factory(corruption, continuous: bool = True, config=None, precision: str = "fp32") -> Callable:
    """make(model, train=False) -> Parametrization for this corruption and config (resolved once); precision
    'bf16' / 'fp16' runs the network under autocast."""
    autocast_dtype(precision)
    if hasattr(corruption, "blur_at"):
        return functools.partial(BlurResidual, corruption=corruption, precision=precision)
    options = label_options(config)
    if isinstance(corruption, (sde_lib.VPSDE, sde_lib.subVPSDE)):
        label_fn = vp_labels
        if options["unbounded"]:
            beta_min, beta_max = vp_betas(corruption)
            label_fn = functools.partial(
                uddpm_label,
                beta_min=beta_min,
                beta_max=beta_max,
                eps=options["eps"],
                c=options["c"],
                T=float(corruption.T),
            )
        discrete = not continuous and not isinstance(corruption, sde_lib.subVPSDE)
        if not options["ddpm_score"]:
            if discrete:
                label_fn = functools.partial(_discrete_vp_labels, corruption)
            return functools.partial(ScoreOutput, corruption=corruption, precision=precision, label_fn=label_fn)
        return functools.partial(
            NoisePrediction, corruption=corruption, precision=precision, label_fn=label_fn, discrete=discrete
        )
    if isinstance(corruption, sde_lib.VESDE):
        discrete = not continuous and not isinstance(corruption, sde_lib.RVESDE)
        label_fn = ve_index_labels if discrete else sigma_labels
        labels = functools.partial(label_fn, corruption)
        return functools.partial(ScoreOutput, corruption=corruption, precision=precision, label_fn=labels)
    raise ValueError(
        f"{type(corruption).__name__} has no parametrisation: use sde_lib.VPSDE, subVPSDE, VESDE or RVESDE, or "
        "corruption.BlurCorruption (or add a Parametrization subclass in parametrization.py)."
    )


def network_config(model: torch.nn.Module):
    """The config a network was built with (model.config, or model.module.config inside DDP), or None."""
    inner = model.module if isinstance(getattr(model, "module", None), torch.nn.Module) else model
    return getattr(inner, "config", None)


def _discrete_vp_labels(sde, t: Tensor) -> Tensor:
    """Discrete VP label t (N - 1)."""
    return t * (sde.N - 1)


def get_parametrization(
    corruption, model: torch.nn.Module, train: bool = False, continuous: bool = True, config=None, precision="fp32"
) -> Parametrization:
    """The Parametrization of `model` for `corruption` (config: model.config when not given)."""
    if config is None:
        config = network_config(model)
    return get_parametrization_factory(corruption, continuous, config, precision)(model, train=train)
