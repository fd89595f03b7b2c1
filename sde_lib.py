"""Abstract SDE classes, reverse SDE, and the VP, subVP, VE and reciprocal-VE SDEs.

Interface of score_sde_pytorch's sde_lib (Song et al. 2021) plus the closed-form helpers used by this
project: mean coefficient alpha(t), marginal std sigma(t), g^2(t), log-SNR and its inverse, importance
sampling of t for likelihood weighting (papers.md section 2) and the Soft Truncation distribution P_k(tau)
(papers.md section 3).
Notation: x_t = alpha(t) x_0 + sigma(t) z, dx = f(t) x dt + g(t) dw. `t` is a tensor of shape [B].
"""

from __future__ import annotations

import abc
import copy
import math
from collections.abc import Callable

import numpy as np
import torch

from configs.defaults import complete_config

Tensor = torch.Tensor
ScoreFn = Callable[[Tensor, Tensor], Tensor]

# ----------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------


def broadcast_to(v: Tensor, x: Tensor) -> Tensor:
    """A per-sample tensor v [B] reshaped to broadcast against x [B, ...] (a 0-dim v as it is); the one helper
    of the project for this."""
    if v.ndim == 0:
        return v
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def _wide_dtype(device: torch.device | str | None) -> torch.dtype:
    """float64 wherever the device supports it (MPS does not)."""
    return torch.float32 if torch.device(device or "cpu").type == "mps" else torch.float64


def _float_tensor(t: Tensor) -> Tensor:
    """Return t as a floating tensor (integers are promoted to the default float dtype)."""
    return t if torch.is_floating_point(t) else t.to(torch.get_default_dtype())


def _uniform(size: tuple[int, ...], device: torch.device | str | None, generator: torch.Generator | None) -> Tensor:
    """U(0, 1) draws of the given size, in float64 where possible, placed on `device`."""
    gen_device = generator.device if generator is not None else torch.device(device or "cpu")
    u = torch.rand(size, generator=generator, device=gen_device, dtype=_wide_dtype(gen_device))
    return u.to(device=device or gen_device, dtype=_wide_dtype(device or gen_device))


def _to_wide(tau: float | Tensor, device: torch.device | str | None = None) -> Tensor:
    """A float or 0-dim tensor as a 0-dim float64 tensor (float32 on MPS)."""
    if isinstance(tau, Tensor):
        device = tau.device if device is None else device
        return tau.to(device=device, dtype=_wide_dtype(device))
    return torch.tensor(float(tau), device=device, dtype=_wide_dtype(device))


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(-x)) for x > 0, accurate for small and large x."""
    return torch.where(x < math.log(2.0), torch.log(-torch.expm1(-x)), torch.log1p(-torch.exp(-x)))


def _gaussian_prior_logp(z: Tensor, std: float) -> Tensor:
    """log N(z; 0, std^2 I) summed over all non-batch dimensions -> [B]."""
    d = int(np.prod(z.shape[1:]))
    sq = torch.sum(z.reshape(z.shape[0], -1) ** 2, dim=1)
    return -d / 2.0 * math.log(2 * math.pi * std**2) - sq / (2.0 * std**2)


# ----------------------------------------------------------------------------------------------------
# Abstract SDE
# ----------------------------------------------------------------------------------------------------


class SDE(abc.ABC):
    """SDE abstract class. Functions are designed for a mini-batch of inputs."""

    def __init__(self, N: int):
        """Construct an SDE with N discretisation time steps."""
        super().__init__()
        self.N = N

    @property
    @abc.abstractmethod
    def T(self) -> float:
        """End time of the SDE."""

    @abc.abstractmethod
    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Drift f(x, t) [B, ...] and diffusion g(t) [B] of dx = f dt + g dw."""

    @abc.abstractmethod
    def marginal_prob(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean [B, ...] and std [B] of the perturbation kernel p_0t(x_t | x_0 = x)."""

    @abc.abstractmethod
    def prior_sampling(self, shape, device=None, generator=None) -> Tensor:
        """Draw samples from the prior p_T."""

    @abc.abstractmethod
    def prior_logp(self, z: Tensor) -> Tensor:
        """Log-density of the prior p_T at z, summed over non-batch dimensions -> [B]."""

    # --- closed-form coefficients (defaults derived from sde / marginal_prob; subclasses override) ---

    def alpha(self, t: Tensor) -> Tensor:
        """Mean coefficient alpha(t): E[x_t | x_0] = alpha(t) x_0 -> [B]."""
        t = _float_tensor(t)
        mean, _ = self.marginal_prob(torch.ones_like(t), t)
        return mean

    def marginal_std(self, t: Tensor) -> Tensor:
        """Marginal std sigma(t) of p_0t -> [B]."""
        t = _float_tensor(t)
        _, std = self.marginal_prob(torch.ones_like(t), t)
        return std

    def diffusion_sq(self, t: Tensor) -> Tensor:
        """Squared diffusion coefficient g^2(t) -> [B]."""
        t = _float_tensor(t)
        _, g = self.sde(torch.zeros_like(t), t)
        return g**2

    def log_snr(self, t: Tensor) -> Tensor:
        """Log signal-to-noise ratio lambda(t) = log(alpha^2 / sigma^2) -> [B]."""
        return 2.0 * (torch.log(self.alpha(t)) - torch.log(self.marginal_std(t)))

    def t_from_log_snr(self, lam: Tensor, iters: int = 100) -> Tensor:
        """Inverse of log_snr by vectorised bisection on [0, T] (log_snr is decreasing in t)."""
        lam = _float_tensor(lam)
        wide = _wide_dtype(lam.device)
        target = lam.to(wide)
        lo = torch.zeros_like(target)
        hi = torch.full_like(target, float(self.T))
        with torch.no_grad():
            for _ in range(iters):
                mid = 0.5 * (lo + hi)
                above = self.log_snr(mid) > target  # still too early in time: move right
                lo = torch.where(above, mid, lo)
                hi = torch.where(above, hi, mid)
        return (0.5 * (lo + hi)).to(lam.dtype)

    def likelihood_weight_ratio(self, t: Tensor) -> Tensor:
        """g^2(t) / sigma^2(t), the density (up to Z) of importance-sampled t (papers.md section 2)."""
        return self.diffusion_sq(t) / self.marginal_std(t) ** 2

    # --- importance sampling of t for likelihood weighting (papers.md section 2) ---

    def iw_antiderivative(self, t: Tensor) -> Tensor:
        """A(t), an antiderivative of g^2/sigma^2 (closed form per SDE)."""
        raise NotImplementedError(self._needs_for_importance("iw_antiderivative, the closed form A(t)"))

    def iw_antiderivative_inverse(self, a: Tensor) -> Tensor:
        """t = A^-1(a), the inverse of iw_antiderivative."""
        raise NotImplementedError(self._needs_for_importance("iw_antiderivative_inverse, t = A^-1(a)"))

    def _needs_for_importance(self, what: str) -> str:
        """The error of an SDE without the closed forms that importance sampling of t needs."""
        return (
            f"{type(self).__name__} does not define {what}, which importance sampling of t needs: define it for "
            "this SDE, or sample t uniformly (training.importance_sampling = False, training.time_sampling = "
            "'uniform')."
        )

    def importance_normalizer(self, tau: float | Tensor) -> float | Tensor:
        """Z_tau = A(T) - A(tau) = int_tau^T g^2/sigma^2 dt (a float for a float tau, else a 0-dim tensor)."""
        tau_w = _to_wide(tau)
        z = self.iw_antiderivative(torch.full_like(tau_w, float(self.T))) - self.iw_antiderivative(tau_w)
        if isinstance(tau, Tensor):
            return z.to(tau.dtype if torch.is_floating_point(tau) else torch.get_default_dtype())
        return float(z)

    def importance_cdf(self, t: Tensor, tau: float | Tensor) -> Tensor:
        """CDF of p_iw on [tau, T]: (A(t) - A(tau)) / (A(T) - A(tau)), clamped to [0, 1]."""
        t = _float_tensor(t)
        wide = _wide_dtype(t.device)
        tau_w = _to_wide(tau, t.device).to(wide)
        t_w = t.to(wide).clamp(min=float(tau_w), max=float(self.T))
        a_tau = self.iw_antiderivative(tau_w)
        z = self.iw_antiderivative(torch.full_like(tau_w, float(self.T))) - a_tau
        cdf = (self.iw_antiderivative(t_w) - a_tau) / z
        return cdf.clamp(0.0, 1.0).to(t.dtype)

    def sample_importance_t(
        self,
        batch_size: int,
        tau: float | Tensor,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Draw t ~ p_iw(t) ~ g^2/sigma^2 on [tau, T]: t = A^-1(A(tau) + U Z_tau), computed in float64."""
        tau_f = float(tau)
        if not 0.0 < tau_f < float(self.T):
            raise ValueError(f"tau must lie in (0, T={self.T}); got {tau_f}. Check training.truncation_time.")
        u = _uniform((batch_size,), device, generator)
        tau_w = torch.full_like(u[:1], tau_f)
        a_tau = self.iw_antiderivative(tau_w)
        z = self.iw_antiderivative(torch.full_like(tau_w, float(self.T))) - a_tau
        t = self.iw_antiderivative_inverse(a_tau + u * z)
        # Guard rounding: the inverse is ill-conditioned next to tau and at T; keep t inside [tau, T].
        t = torch.nan_to_num(t, nan=tau_f).clamp(min=tau_f, max=float(self.T))
        return t.to(dtype)

    # --- discretisation and reverse SDE ---

    def discretize(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Euler-Maruyama step x_{i+1} = x_i + f_i + G_i z_i: f_i = f dt, G_i = g sqrt(dt), dt = 1/N."""
        dt = 1.0 / self.N
        drift, diffusion = self.sde(x, t)
        return drift * dt, diffusion * math.sqrt(dt)

    # --- the reverse-time grid and its steps (samplers call these; subclasses override, samplers never branch) ---

    def with_num_steps(self, num_steps: int, eps: float | None = None) -> SDE:
        """A copy of this SDE discretised with num_steps steps down to eps (the sampler's grid; the continuous
        SDE is unchanged). eps matters only for SDEs whose grid depends on it (RVE)."""
        if int(num_steps) < 1:
            raise ValueError(f"num_steps must be >= 1 (config.sampling.num_steps); got {num_steps}.")
        other = copy.copy(self)
        other._discretize(int(num_steps))
        return other

    def _discretize(self, N: int) -> None:
        """Set N and the tables of the N-step discretisation (none for the base class)."""
        self.N = N

    def time_grid(self, num_steps: int, eps: float, device=None) -> Tensor:
        """The reverse-time grid of the PC sampler: linspace(T, eps, num_steps) (score_sde)."""
        return torch.linspace(self.T, eps, num_steps, device=device)

    def previous_time(self, t: Tensor) -> Tensor:
        """The grid time one step before t in reverse time: t - T/N (may be <= 0 after the last step)."""
        return t - self.T / self.N

    def reverse_time_step(self, t: Tensor) -> Tensor | float:
        """dt < 0 of one Euler-Maruyama step of the reverse SDE at t: -T/N."""
        return -1.0 / self.N

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha(t), sigma(t)), with the data limits alpha = 1, sigma = 0 at t <= 0."""
        positive = t > 0
        safe_t = torch.where(positive, t, torch.full_like(t, 0.5))
        alpha = torch.where(positive, self.alpha(safe_t), torch.ones_like(t))
        std = torch.where(positive, self.marginal_std(safe_t), torch.zeros_like(t))
        return alpha, std

    def ancestral_coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(a, v, w) of one ancestral step t -> s = previous_time(t): x_s = (x + v score) / a + sqrt(w) z.

        The Gaussian posterior q(x_s | x_t, x0_hat): a = alpha_t / alpha_s, v = sigma_t^2 - a^2 sigma_s^2,
        w = v sigma_s^2 / sigma_t^2."""
        alpha_t, std_t = self.alpha(t), self.marginal_std(t)
        alpha_s, std_s = self.coefficients(self.previous_time(t))
        a = alpha_t / alpha_s
        v = std_t**2 - a**2 * std_s**2
        return a, v, (v * std_s**2 / std_t**2).clamp(min=0)

    def langevin_step_factor(self, t: Tensor) -> Tensor:
        """The factor alpha_i of the Langevin correctors' step size (1; DDPM's 1 - beta_i for VP / sub-VP)."""
        return torch.ones_like(t)

    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> SDE:
        """Reverse-time SDE dx = [f - g^2 s] dt + g dw (or probability-flow ODE dx = [f - g^2 s / 2] dt)."""
        N = self.N
        T = self.T
        sde_fn = self.sde
        discretize_fn = self.discretize
        forward_state = dict(self.__dict__)

        class RSDE(self.__class__):
            def __init__(self):
                self.__dict__.update(forward_state)
                self.N = N
                self.probability_flow = probability_flow

            @property
            def T(self):
                return T

            def sde(self, x, t):
                """Drift and diffusion of the reverse SDE / probability-flow ODE."""
                drift, diffusion = sde_fn(x, t)
                score = score_fn(x, t)
                coef = 0.5 if self.probability_flow else 1.0
                drift = drift - broadcast_to(diffusion, x) ** 2 * score * coef
                diffusion = torch.zeros_like(diffusion) if self.probability_flow else diffusion
                return drift, diffusion

            def discretize(self, x, t):
                """Reverse step: rev_f = f - G^2 s (times 1/2 for the ODE), rev_G = G (0 for the ODE)."""
                f, G = discretize_fn(x, t)
                coef = 0.5 if self.probability_flow else 1.0
                rev_f = f - broadcast_to(G, x) ** 2 * score_fn(x, t) * coef
                rev_G = torch.zeros_like(G) if self.probability_flow else G
                return rev_f, rev_G

        return RSDE()


# ----------------------------------------------------------------------------------------------------
# VP and sub-VP
# ----------------------------------------------------------------------------------------------------


class VPSDE(SDE):
    """Variance-preserving SDE dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw (DDPM in continuous time)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20, N: int = 1000):
        """Construct a VP SDE with beta(t) = beta_min + t (beta_max - beta_min) and N discrete steps."""
        super().__init__(N)
        self.beta_0 = beta_min
        self.beta_1 = beta_max
        self._discretize(N)

    def _discretize(self, N: int) -> None:
        """DDPM's N discrete betas linspace(beta_min / N, beta_max / N, N) and their cumulative products."""
        self.N = N
        self.discrete_betas = torch.linspace(self.beta_0 / N, self.beta_1 / N, N)
        self.alphas = 1.0 - self.discrete_betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.sqrt_alphas_cumprod = torch.sqrt(self.alphas_cumprod)
        self.sqrt_1m_alphas_cumprod = torch.sqrt(1.0 - self.alphas_cumprod)

    def langevin_step_factor(self, t: Tensor) -> Tensor:
        """DDPM's alpha_i = 1 - beta_i at the grid index of t."""
        timestep = (t * (self.N - 1) / self.T).long()
        return self.alphas.to(t.device)[timestep]

    @property
    def T(self) -> float:
        return 1

    # --- schedule ---
    def beta(self, t: Tensor) -> Tensor:
        """beta(t) = b_min + t (b_max - b_min)."""
        return self.beta_0 + t * (self.beta_1 - self.beta_0)

    def integrated_beta(self, t: Tensor) -> Tensor:
        """B(t) = int_0^t beta = b_min t + (b_max - b_min) t^2 / 2."""
        return self.beta_0 * t + 0.5 * (self.beta_1 - self.beta_0) * t**2

    def t_from_integrated_beta(self, b: Tensor) -> Tensor:
        """Inverse of B: t = 2B / (b_min + sqrt(b_min^2 + 2 (b_max - b_min) B)) (cancellation-free root)."""
        return 2.0 * b / (self.beta_0 + torch.sqrt(self.beta_0**2 + 2.0 * (self.beta_1 - self.beta_0) * b))

    # --- SDE interface ---
    def alpha(self, t: Tensor) -> Tensor:
        """alpha(t) = exp(-B(t) / 2)."""
        t = _float_tensor(t)
        return torch.exp(-0.5 * self.integrated_beta(t))

    def marginal_std(self, t: Tensor) -> Tensor:
        """sigma(t) = sqrt(1 - exp(-B(t)))."""
        t = _float_tensor(t)
        return torch.sqrt(-torch.expm1(-self.integrated_beta(t)))

    def diffusion_sq(self, t: Tensor) -> Tensor:
        """g^2(t) = beta(t)."""
        return self.beta(_float_tensor(t))

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """f = -beta(t) x / 2, g = sqrt(beta(t))."""
        beta_t = self.beta(t)
        return -0.5 * broadcast_to(beta_t, x) * x, torch.sqrt(beta_t)

    def marginal_prob(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """mean = exp(-B/2) x, std = sqrt(1 - exp(-B))."""
        return broadcast_to(self.alpha(t), x) * x, self.marginal_std(t)

    def prior_sampling(self, shape, device=None, generator=None) -> Tensor:
        """z ~ N(0, I)."""
        return torch.randn(*shape, device=device, generator=generator)

    def prior_logp(self, z: Tensor) -> Tensor:
        """log N(z; 0, I)."""
        return _gaussian_prior_logp(z, 1.0)

    def ancestral_coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """DDPM's ancestral step (score_sde): a = sqrt(1 - beta_i), v = w = beta_i."""
        timestep = (t * (self.N - 1) / self.T).long()
        beta = self.discrete_betas.to(t.device)[timestep]
        return torch.sqrt(1.0 - beta), beta, beta

    def discretize(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """DDPM discretisation: x_{i+1} = sqrt(1 - beta_i) x_i + sqrt(beta_i) z_i."""
        timestep = (t * (self.N - 1) / self.T).long()
        beta = self.discrete_betas.to(x.device)[timestep]
        alpha = self.alphas.to(x.device)[timestep]
        f = broadcast_to(torch.sqrt(alpha), x) * x - x
        G = torch.sqrt(beta)
        return f, G

    # --- log-SNR ---
    def log_snr(self, t: Tensor) -> Tensor:
        """lambda(t) = -log(exp(B) - 1)."""
        b = self.integrated_beta(_float_tensor(t))
        return -(b + _log1mexp(b))

    def t_from_log_snr(self, lam: Tensor, iters: int = 100) -> Tensor:
        """t = B^-1(log(1 + exp(-lambda)))."""
        return self.t_from_integrated_beta(torch.nn.functional.softplus(-_float_tensor(lam)))

    # --- importance sampling ---
    def likelihood_weight_ratio(self, t: Tensor) -> Tensor:
        """g^2 / sigma^2 = beta / (1 - exp(-B))."""
        t = _float_tensor(t)
        return self.beta(t) / -torch.expm1(-self.integrated_beta(t))

    def iw_antiderivative(self, t: Tensor) -> Tensor:
        """A(t) = log(exp(B(t)) - 1)."""
        b = self.integrated_beta(_float_tensor(t))
        return b + _log1mexp(b)

    def iw_antiderivative_inverse(self, a: Tensor) -> Tensor:
        """B = log(1 + exp(A)), then t = B^-1."""
        return self.t_from_integrated_beta(torch.nn.functional.softplus(a))


class subVPSDE(SDE):
    """Sub-VP SDE dx = -beta x / 2 dt + sqrt(beta (1 - exp(-2B))) dw."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20, N: int = 1000):
        """Construct a sub-VP SDE with the VP beta schedule and N discrete steps."""
        super().__init__(N)
        self.beta_0 = beta_min
        self.beta_1 = beta_max
        self._discretize(N)

    def _discretize(self, N: int) -> None:
        """DDPM's N discrete betas linspace(beta_min / N, beta_max / N, N) and their cumulative products."""
        self.N = N
        self.discrete_betas = torch.linspace(self.beta_0 / N, self.beta_1 / N, N)
        self.alphas = 1.0 - self.discrete_betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.sqrt_alphas_cumprod = torch.sqrt(self.alphas_cumprod)
        self.sqrt_1m_alphas_cumprod = torch.sqrt(1.0 - self.alphas_cumprod)

    def langevin_step_factor(self, t: Tensor) -> Tensor:
        """DDPM's alpha_i = 1 - beta_i at the grid index of t."""
        timestep = (t * (self.N - 1) / self.T).long()
        return self.alphas.to(t.device)[timestep]

    @property
    def T(self) -> float:
        return 1

    def beta(self, t: Tensor) -> Tensor:
        """beta(t) = b_min + t (b_max - b_min)."""
        return self.beta_0 + t * (self.beta_1 - self.beta_0)

    def integrated_beta(self, t: Tensor) -> Tensor:
        """B(t) = b_min t + (b_max - b_min) t^2 / 2."""
        return self.beta_0 * t + 0.5 * (self.beta_1 - self.beta_0) * t**2

    def t_from_integrated_beta(self, b: Tensor) -> Tensor:
        """Inverse of B: t = 2B / (b_min + sqrt(b_min^2 + 2 (b_max - b_min) B))."""
        return 2.0 * b / (self.beta_0 + torch.sqrt(self.beta_0**2 + 2.0 * (self.beta_1 - self.beta_0) * b))

    def alpha(self, t: Tensor) -> Tensor:
        """alpha(t) = exp(-B(t) / 2)."""
        return torch.exp(-0.5 * self.integrated_beta(_float_tensor(t)))

    def marginal_std(self, t: Tensor) -> Tensor:
        """sigma(t) = 1 - exp(-B(t))."""
        return -torch.expm1(-self.integrated_beta(_float_tensor(t)))

    def diffusion_sq(self, t: Tensor) -> Tensor:
        """g^2(t) = beta(t) (1 - exp(-2 B(t)))."""
        t = _float_tensor(t)
        return self.beta(t) * -torch.expm1(-2.0 * self.integrated_beta(t))

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """f = -beta x / 2, g = sqrt(beta (1 - exp(-2B)))."""
        beta_t = self.beta(t)
        return -0.5 * broadcast_to(beta_t, x) * x, torch.sqrt(self.diffusion_sq(t))

    def marginal_prob(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """mean = exp(-B/2) x, std = 1 - exp(-B)."""
        return broadcast_to(self.alpha(t), x) * x, self.marginal_std(t)

    def prior_sampling(self, shape, device=None, generator=None) -> Tensor:
        """z ~ N(0, I)."""
        return torch.randn(*shape, device=device, generator=generator)

    def prior_logp(self, z: Tensor) -> Tensor:
        """log N(z; 0, I)."""
        return _gaussian_prior_logp(z, 1.0)

    def log_snr(self, t: Tensor) -> Tensor:
        """lambda(t) = -(B + 2 log(1 - exp(-B)))."""
        b = self.integrated_beta(_float_tensor(t))
        return -(b + 2.0 * _log1mexp(b))

    def t_from_log_snr(self, lam: Tensor, iters: int = 100) -> Tensor:
        """lambda = -A(t), so t = A^-1(-lambda)."""
        return self.iw_antiderivative_inverse(-_float_tensor(lam))

    def likelihood_weight_ratio(self, t: Tensor) -> Tensor:
        """g^2 / sigma^2 = beta (1 + exp(-B)) / (1 - exp(-B))."""
        t = _float_tensor(t)
        b = self.integrated_beta(t)
        return self.beta(t) * (1.0 + torch.exp(-b)) / -torch.expm1(-b)

    def iw_antiderivative(self, t: Tensor) -> Tensor:
        """A(t) = 2 log(exp(B) - 1) - B = B + 2 log(1 - exp(-B))."""
        b = self.integrated_beta(_float_tensor(t))
        return b + 2.0 * _log1mexp(b)

    def iw_antiderivative_inverse(self, a: Tensor) -> Tensor:
        """exp(A) = 4 sinh^2(B/2), so B = 2 asinh(exp(A/2) / 2), then t = B^-1."""
        b = 2.0 * torch.asinh(0.5 * torch.exp(0.5 * a))
        return self.t_from_integrated_beta(b)


# ----------------------------------------------------------------------------------------------------
# VE and reciprocal VE
# ----------------------------------------------------------------------------------------------------


class VESDE(SDE):
    """Variance-exploding SDE dx = sqrt(d sigma^2/dt) dw with sigma(t) = s_min (s_max/s_min)^t (SMLD)."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50, N: int = 1000):
        """Construct a VE SDE, geometric noise levels from sigma_min to sigma_max, N discrete steps."""
        super().__init__(N)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self._discretize(N)

    def _discretize(self, N: int) -> None:
        """N geometric noise levels discrete_sigmas from sigma_min to sigma_max (SMLD)."""
        self.N = N
        self.discrete_sigmas = torch.exp(torch.linspace(np.log(self.sigma_min), np.log(self.sigma_max), N))

    def ancestral_coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """SMLD's ancestral step (score_sde) on discrete_sigmas: a = 1, v = sigma_i^2 - sigma_(i-1)^2,
        w = sigma_(i-1)^2 v / sigma_i^2."""
        timestep = (t * (self.N - 1) / self.T).long()
        sigmas = self.discrete_sigmas.to(t.device)
        sigma = sigmas[timestep]
        adjacent_sigma = torch.where(timestep == 0, torch.zeros_like(t), sigmas[(timestep - 1).clamp(min=0)])
        v = sigma**2 - adjacent_sigma**2
        return torch.ones_like(sigma), v, (adjacent_sigma**2 * v) / (sigma**2)

    @property
    def T(self) -> float:
        return 1

    def _log_ratio(self) -> float:
        """log(s_max / s_min)."""
        return math.log(self.sigma_max / self.sigma_min)

    def log_sigma(self, t: Tensor) -> Tensor:
        """log sigma(t) = log s_min + t log(s_max / s_min)."""
        return math.log(self.sigma_min) + _float_tensor(t) * self._log_ratio()

    def t_from_log_sigma(self, log_sigma: Tensor) -> Tensor:
        """Inverse of log_sigma."""
        return (log_sigma - math.log(self.sigma_min)) / self._log_ratio()

    def alpha(self, t: Tensor) -> Tensor:
        """alpha(t) = 1."""
        return torch.ones_like(_float_tensor(t))

    def marginal_std(self, t: Tensor) -> Tensor:
        """sigma(t) = s_min (s_max/s_min)^t (the usual approximation without the -s_min^2 term)."""
        return torch.exp(self.log_sigma(t))

    def diffusion_sq(self, t: Tensor) -> Tensor:
        """g^2(t) = d sigma^2/dt = 2 sigma^2 log(s_max/s_min)."""
        return self.marginal_std(t) ** 2 * (2.0 * self._log_ratio())

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """f = 0, g = sigma(t) sqrt(2 log(s_max/s_min))."""
        return torch.zeros_like(x), torch.sqrt(self.diffusion_sq(t))

    def marginal_prob(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """mean = x, std = sigma(t)."""
        return x, self.marginal_std(t)

    def prior_sampling(self, shape, device=None, generator=None) -> Tensor:
        """z ~ N(0, s_max^2 I)."""
        return torch.randn(*shape, device=device, generator=generator) * self.sigma_max

    def prior_logp(self, z: Tensor) -> Tensor:
        """log N(z; 0, s_max^2 I)."""
        return _gaussian_prior_logp(z, self.sigma_max)

    def discretize(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """SMLD discretisation: x_{i+1} = x_i + sqrt(sigma_{i+1}^2 - sigma_i^2) z_i on discrete_sigmas."""
        timestep = (t * (self.N - 1) / self.T).long()
        sigmas = self.discrete_sigmas.to(t.device)
        sigma = sigmas[timestep]
        adjacent_sigma = torch.where(timestep == 0, torch.zeros_like(sigma), sigmas[(timestep - 1).clamp(min=0)])
        f = torch.zeros_like(x)
        G = torch.sqrt(sigma**2 - adjacent_sigma**2)
        return f, G

    def log_snr(self, t: Tensor) -> Tensor:
        """lambda(t) = -2 log sigma(t)."""
        return -2.0 * self.log_sigma(t)

    def t_from_log_snr(self, lam: Tensor, iters: int = 100) -> Tensor:
        """t = (-lambda/2 - log s_min) / log(s_max/s_min)."""
        return self.t_from_log_sigma(-0.5 * _float_tensor(lam))

    def likelihood_weight_ratio(self, t: Tensor) -> Tensor:
        """g^2 / sigma^2 = 2 log(s_max/s_min), constant."""
        return torch.full_like(_float_tensor(t), 2.0 * self._log_ratio())

    def iw_antiderivative(self, t: Tensor) -> Tensor:
        """A(t) = 2 log(s_max/s_min) t."""
        return 2.0 * self._log_ratio() * _float_tensor(t)

    def iw_antiderivative_inverse(self, a: Tensor) -> Tensor:
        """t = A / (2 log(s_max/s_min))."""
        return a / (2.0 * self._log_ratio())


class RVESDE(VESDE):
    """Reciprocal VE SDE: VE re-timed, log sigma linear in 1/t; sigma(eps) = s_min, sigma(1) = s_max.

    sigma(t) = s_max (s_min/s_max)^((1/t - 1)/(1/eps - 1)) (papers.md section 1). It subclasses VESDE (alpha = 1,
    sigma labels, Langevin step factor 1). Its sampler grid is uniform in 1/t from T to grid_eps (uniform in log
    sigma; sigma(1e-3) is still about 45 for eps = 1e-5, so a grid uniform in t would waste its steps): time_grid,
    previous_time, reverse_time_step, discretize (SMLD form) and ancestral_coefficients (Gaussian posterior) all
    follow it. discrete_sigmas[i] = sigma(max(i / (N - 1), eps)) are the levels of discrete SMLD training.
    """

    def __init__(self, sigma_min: float = 1e-3, sigma_max: float = 50, N: int = 1000, eps: float = 1e-5):
        """Construct an RVE SDE; eps is the time where sigma reaches sigma_min (training.truncation_time)."""
        if not 0.0 < eps < 1.0:
            raise ValueError(f"RVESDE eps must lie in (0, 1); got {eps}. Set training.truncation_time in (0, 1).")
        if not 0.0 < sigma_min < sigma_max:
            raise ValueError(
                f"RVESDE needs 0 < sigma_min < sigma_max; got {sigma_min}, {sigma_max}. "
                "Check model.sigma_min / model.sigma_max."
            )
        self.eps = eps
        self.grid_eps = eps  # the last time of the sampler's 1/t grid (with_num_steps sets the sampler's eps)
        super().__init__(sigma_min=sigma_min, sigma_max=sigma_max, N=N)

    # --- the reverse-time grid: uniform in 1/t (uniform in log sigma, VE's geometric grid) ---

    def _discretize(self, N: int) -> None:
        """N steps; discrete_sigmas[i] = sigma(max(i / (N - 1), eps)) (the levels of discrete SMLD training)."""
        self.N = N
        grid = torch.linspace(0.0, 1.0, N, dtype=torch.float64).clamp(min=self.eps)
        self.discrete_sigmas = torch.exp(self.log_sigma(grid)).to(torch.float32)

    def with_num_steps(self, num_steps: int, eps: float | None = None) -> RVESDE:
        """A copy with num_steps grid times uniform in 1/t from T down to eps (default: the RVE's own eps)."""
        other = super().with_num_steps(num_steps)
        other.grid_eps = self.grid_eps if eps is None else float(eps)
        return other

    def time_grid(self, num_steps: int, eps: float, device=None) -> Tensor:
        """num_steps times uniform in 1/t from T to eps (uniform in log sigma)."""
        return 1.0 / torch.linspace(1.0 / self.T, 1.0 / eps, num_steps, device=device)

    def _inverse_time_step(self) -> float:
        """The step of the grid in 1/t: (1/grid_eps - 1/T) / (N - 1)."""
        return (1.0 / self.grid_eps - 1.0 / self.T) / (self.N - 1)

    def previous_time(self, t: Tensor) -> Tensor:
        """The next grid time in reverse time, 1/t_prev = 1/t + step; from the last grid time: t = 0 (sigma = 0,
        like VE's last SMLD step)."""
        step = self._inverse_time_step()
        inv_prev = 1.0 / t + step
        last = inv_prev > 1.0 / self.T + (self.N - 0.5) * step
        return torch.where(last, torch.zeros_like(t), 1.0 / inv_prev)

    def reverse_time_step(self, t: Tensor) -> Tensor:
        """dt = t_prev - t on the 1/t grid (the last step stays on the grid's continuation, not at 0)."""
        return 1.0 / (1.0 / t + self._inverse_time_step()) - t

    def discretize(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """SMLD step on the 1/t grid: f = 0, G = sqrt(sigma(t)^2 - sigma(t_prev)^2), sigma(0) = 0.

        Computed in float64 where possible: near T the RVE levels are nearly equal and float32 would lose most
        digits of the difference."""
        wide = _wide_dtype(t.device)
        t_w = t.to(wide)
        t_prev = self.previous_time(t_w)
        var_prev = self.coefficients(t_prev)[1] ** 2
        G = torch.sqrt(self.marginal_std(t_w) ** 2 - var_prev).to(t.dtype if torch.is_floating_point(t) else x.dtype)
        return torch.zeros_like(x), G

    def ancestral_coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The Gaussian posterior step between consecutive 1/t grid times (SDE.ancestral_coefficients)."""
        return SDE.ancestral_coefficients(self, t)

    def _rate(self) -> float:
        """c = 2 log(s_max/s_min) / (1/eps - 1), so that g^2/sigma^2 = c / t^2."""
        return 2.0 * self._log_ratio() / (1.0 / self.eps - 1.0)

    def log_sigma(self, t: Tensor) -> Tensor:
        """log sigma(t) = log s_max - log(s_max/s_min) (1/t - 1)/(1/eps - 1)."""
        t = _float_tensor(t)
        return math.log(self.sigma_max) - self._log_ratio() * (1.0 / t - 1.0) / (1.0 / self.eps - 1.0)

    def t_from_log_sigma(self, log_sigma: Tensor) -> Tensor:
        """Inverse of log_sigma: 1/t = 1 + (1/eps - 1)(log s_max - log sigma) / log(s_max/s_min)."""
        inv_t = 1.0 + (1.0 / self.eps - 1.0) * (math.log(self.sigma_max) - log_sigma) / self._log_ratio()
        return 1.0 / inv_t

    def diffusion_sq(self, t: Tensor) -> Tensor:
        """g^2(t) = d sigma^2/dt = sigma^2 2 log(s_max/s_min) / ((1/eps - 1) t^2)."""
        t = _float_tensor(t)
        return self.marginal_std(t) ** 2 * self._rate() / t**2

    def likelihood_weight_ratio(self, t: Tensor) -> Tensor:
        """g^2 / sigma^2 = c / t^2."""
        t = _float_tensor(t)
        return self._rate() / t**2

    def iw_antiderivative(self, t: Tensor) -> Tensor:
        """A(t) = -c / t."""
        return -self._rate() / _float_tensor(t)

    def iw_antiderivative_inverse(self, a: Tensor) -> Tensor:
        """t = -c / A (so importance-sampled t = 1 / U(1/T, 1/tau))."""
        return -self._rate() / a


# ----------------------------------------------------------------------------------------------------
# Soft Truncation: P_k(tau) proportional to tau^-k on [eps, T] (papers.md section 3)
# ----------------------------------------------------------------------------------------------------


def _check_truncation_args(k: float, eps: float, T: float) -> float:
    """Validate (k, eps, T) of P_k and return k as a float."""
    if k is None:
        raise ValueError("Soft Truncation needs training.k (the exponent of P_k(tau) ~ tau^-k); it is None.")
    k = float(k)
    if math.isnan(k) or k < 0:
        raise ValueError(f"training.k must be >= 0 (P_k(tau) ~ tau^-k; use inf for a fixed eps); got {k}.")
    if not (0.0 < float(eps) < float(T)):
        raise ValueError(f"training.truncation_time (eps) must lie in (0, T={T}); got {eps}.")
    return k


def sample_truncation_time(
    k: float,
    eps: float,
    T: float = 1.0,
    size: tuple[int, ...] | int = (),
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """tau ~ P_k(tau) ~ tau^-k on [eps, T] by inverse CDF, U ~ U(0, 1), computed in float64.

    k = 1: tau = eps (T/eps)^U; k != 1: tau = (eps^(1-k) - U (eps^(1-k) - T^(1-k)))^(1/(1-k)); k = inf: eps.
    """
    k = _check_truncation_args(k, eps, T)
    size = (size,) if isinstance(size, int) else tuple(size)
    eps, T = float(eps), float(T)
    u = _uniform(size, device, generator)
    if math.isinf(k):
        tau = torch.full_like(u, eps)
    elif k == 1.0:
        tau = eps * torch.exp(u * math.log(T / eps))
    else:
        # Same formula with m = k - 1: tau = eps [1 - U (1 - (eps/T)^m)]^(-1/m), free of overflow and
        # cancellation for any m != 0 (large k, k near 1).
        m = k - 1.0
        q = -math.expm1(m * math.log(eps / T))
        tau = eps * torch.exp(-torch.log1p(-u * q) / m)
    return tau.clamp(min=eps, max=T).to(dtype)


def truncation_cdf(tau: Tensor | float, k: float, eps: float, T: float = 1.0) -> Tensor:
    """F_k(tau) = int_eps^tau s^-k ds / int_eps^T s^-k ds (k = 1: log(tau/eps) / log(T/eps))."""
    k = _check_truncation_args(k, eps, T)
    eps, T = float(eps), float(T)
    tau = torch.as_tensor(tau)
    tau = _float_tensor(tau)
    x = tau.clamp(min=eps, max=T)
    if math.isinf(k):
        return torch.where(tau >= eps, torch.ones_like(x), torch.zeros_like(x))
    if k == 1.0:
        return torch.log(x / eps) / math.log(T / eps)
    m = k - 1.0
    # ((eps/tau)^m - 1) / ((eps/T)^m - 1)
    return torch.expm1(m * torch.log(eps / x)) / math.expm1(m * math.log(eps / T))


def truncation_pdf(tau: Tensor | float, k: float, eps: float, T: float = 1.0) -> Tensor:
    """p_k(tau) = tau^-k / int_eps^T s^-k ds on [eps, T], 0 outside."""
    k = _check_truncation_args(k, eps, T)
    eps, T = float(eps), float(T)
    tau = _float_tensor(torch.as_tensor(tau))
    if math.isinf(k):
        raise ValueError("truncation_pdf: k = inf is a point mass at eps and has no density.")
    if k == 1.0:
        norm = math.log(T / eps)
    else:
        norm = (T ** (1.0 - k) - eps ** (1.0 - k)) / (1.0 - k)
    inside = (tau >= eps) & (tau <= T)
    return torch.where(inside, tau.clamp(min=eps) ** (-k) / norm, torch.zeros_like(tau))


# ----------------------------------------------------------------------------------------------------
# Construction from a config
# ----------------------------------------------------------------------------------------------------

# The reciprocal VE SDE answers to this project's name, the ST repository's and its legacy UNCSN configs' one.
RVE_NAMES = ("rvesde", "reciprocal_vesde", "rve-sde")
_SDE_NAMES = ("vpsde", "subvpsde", "vesde", *RVE_NAMES)


def get_sde(config) -> tuple[SDE, float]:
    """Build (sde, sampling_eps) from config.training.sde and config.model.{beta_*, sigma_*, num_scales}.

    sampling_eps follows score_sde (1e-3 for VP / subVP, 1e-5 for VE) and the RVE's own eps for RVE, unless
    config.sampling.truncation_time is set.
    """
    config = complete_config(config)
    name = str(config.training.sde).lower()
    model = config.model
    n = int(model.num_scales)
    if name == "vpsde":
        sde = VPSDE(beta_min=model.beta_min, beta_max=model.beta_max, N=n)
        sampling_eps = 1e-3
    elif name == "subvpsde":
        sde = subVPSDE(beta_min=model.beta_min, beta_max=model.beta_max, N=n)
        sampling_eps = 1e-3
    elif name == "vesde":
        sde = VESDE(sigma_min=model.sigma_min, sigma_max=model.sigma_max, N=n)
        sampling_eps = 1e-5
    elif name in RVE_NAMES:
        eps = float(config.training.truncation_time)
        sde = RVESDE(sigma_min=model.sigma_min, sigma_max=model.sigma_max, N=n, eps=eps)
        sampling_eps = eps
    else:
        raise ValueError(
            f"Unknown config.training.sde = {config.training.sde!r}; valid names: {', '.join(_SDE_NAMES)} "
            f"({', '.join(RVE_NAMES)} all name the reciprocal VE SDE)."
        )
    override = config.sampling.truncation_time
    if override is not None and float(override) > 0:  # 0 or None: keep the default above
        sampling_eps = float(override)
    return sde, sampling_eps
