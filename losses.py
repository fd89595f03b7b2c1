"""Optimisation and the training objective.

One loss composes four independent choices (papers.md sections 2-5):
- time sampling: t ~ U[tau, T] or, for likelihood weighting, importance sampling t ~ g^2/sigma^2 on [tau, T];
  tau = eps, or tau ~ P_k (Soft Truncation, one tau per optimisation step shared by its micro-batches);
- weighting lambda(t): 'variance' (sigma^2), 'likelihood' (g^2), 'importance' (g^2 through the IS estimator,
  factor Z_tau) or 'x0' (sigma^4: the error of the predicted corrupted mean, Soft Diffusion's plain weighting);
- target: denoising score matching (noise target z) or Stable Target Field (reference-batch target, stf.py);
- corruption: any object with marginal_prob(x0, t) -> (mean, std): the SDEs of sde_lib (Gaussian) or the blur of
  corruption.py (Soft Diffusion); the score comes from models.utils.get_score_fn for either.

Per sample, with x_t = mean + std * z and eps_target = (x_t - target mean) / std,
  loss = factor * w(t) * reduce(|| std * s_theta(x_t, t) + eps_target ||^2),
where reduce is score_sde's (mean over dimensions, or 0.5 * sum), w = lambda / std^2 and factor is 1 (score_sde
convention) or 1/2 (Soft Truncation repository convention, training.loss_convention).

training.reconstruction_loss (Soft Truncation repository) adds, per sample, the truncation decoder's term at
t = tau (the step's truncation time), with x_tau = alpha x0 + sigma z' and the decoder N(q_mean, q_std^2 I),
q_mean = (x_tau + sigma^2 s_theta(x_tau, tau)) / alpha, q_std = sigma / alpha:
  'gaussian': -log N(x0; q_mean, q_std^2 I) - H(p_0tau(. | x0)) (the residual R_tau of likelihood.py);
  'lossless' (data.dequantization = 'lossless'): -log Q(x0 | x_tau), Q the decoder discretized to 8 bits;
divided by D when reduce_mean; added as factor * 2 * term (so that in the Soft Truncation convention it is
added as the original does, and the ratio to the score term is the same in both conventions).
"""

import contextlib
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.optim as optim

import distributed
import parametrization
import sde_lib
from configs.defaults import complete_config
from sde_lib import broadcast_to

WEIGHTINGS = ("variance", "likelihood", "importance", "x0")
LOSS_CONVENTIONS = {"score_sde": 1.0, "soft_truncation": 0.5}


def get_optimizer(config, params) -> torch.optim.Optimizer:
    """Adam (score_sde) or AdamW, from config.optim."""
    config = complete_config(config)
    amsgrad = bool(config.optim.amsgrad)
    # optim.fused: one fused kernel per step (CUDA, CPU); None keeps torch's default (foreach on CUDA)
    fused = True if config.optim.fused else None
    if config.optim.optimizer == "Adam":
        return optim.Adam(
            params,
            lr=config.optim.lr,
            betas=(config.optim.beta1, 0.999),
            eps=config.optim.eps,
            weight_decay=config.optim.weight_decay,
            amsgrad=amsgrad,
            fused=fused,
        )
    if config.optim.optimizer == "AdamW":
        return optim.AdamW(
            params,
            lr=config.optim.lr,
            betas=(config.optim.beta1, 0.999),
            eps=config.optim.eps,
            weight_decay=config.optim.weight_decay,
            amsgrad=amsgrad,
            fused=fused,
        )
    raise ValueError(f"config.optim.optimizer={config.optim.optimizer!r} is not supported; use 'Adam' or 'AdamW'.")


def optimization_manager(config) -> Callable:
    """optimize_fn(optimizer, params, step, lr, warmup, grad_clip): linear warmup, gradient-norm clipping, step."""

    def optimize_fn(
        optimizer,
        params,
        step,
        lr=config.optim.lr,
        warmup=config.optim.warmup,
        grad_clip=config.optim.grad_clip,
    ):
        """Optimizes with warmup and gradient clipping (disabled if negative)."""
        if warmup > 0:
            for g in optimizer.param_groups:
                g["lr"] = float(lr * np.minimum(step / warmup, 1.0))
        if grad_clip >= 0:
            torch.nn.utils.clip_grad_norm_(params, max_norm=grad_clip)
        optimizer.step()

    return optimize_fn


# ----------------------------------------------------------------------------------------------------------------
# Pieces of the loss


def get_reduce_op(reduce_mean: bool) -> Callable:
    """score_sde's reduction over data dimensions: mean, or 0.5 * sum."""
    if reduce_mean:
        return torch.mean
    return lambda *args, **kwargs: 0.5 * torch.sum(*args, **kwargs)


def sample_time(
    sde, batch_size: int, tau: float, importance_sampling: bool, device
) -> tuple[torch.Tensor, torch.Tensor | float]:
    """t on [tau, T]: uniform (factor 1) or t ~ g^2/sigma^2 (factor Z_tau, papers.md section 2)."""
    if importance_sampling:
        t = sde.sample_importance_t(batch_size, tau, device=device)
        return t, sde.importance_normalizer(tau)
    return torch.rand(batch_size, device=device) * (sde.T - tau) + tau, 1.0


TIME_SAMPLINGS = ("", "uniform", "importance")


def resolve_time_sampling(weighting: str, time_sampling: str = "") -> bool:
    """True when t is drawn from the importance density g^2/sigma^2 rather than uniformly on [tau, T].

    '' follows the weighting (score_sde: importance sampling iff the 'importance' weighting). 'importance' with
    another weighting draws t from that density and keeps the weighting as it is (no Z factor): the Soft
    Truncation repository's reciprocal VE SDE drew t = 1 / U(1, 1/tau) (its importance density) whatever
    training.importance_sampling said."""
    if time_sampling not in TIME_SAMPLINGS:
        raise ValueError(f"training.time_sampling={time_sampling!r} is not one of {TIME_SAMPLINGS}.")
    if weighting == "importance" and time_sampling == "uniform":
        raise ValueError("The 'importance' weighting needs importance-sampled t; unset training.time_sampling.")
    return weighting == "importance" or time_sampling == "importance"


def resolve_weighting(likelihood_weighting: bool, importance_sampling: bool, weighting: str | None = None) -> str:
    """The weighting name implied by score_sde's / the ST repository's flags (or given explicitly)."""
    if weighting:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"training.weighting={weighting!r} is not one of {WEIGHTINGS}.")
        if importance_sampling and weighting != "importance":
            raise ValueError("training.importance_sampling=True implies the likelihood weighting; unset weighting.")
        return weighting
    if importance_sampling:
        return "importance"
    return "likelihood" if likelihood_weighting else "variance"


def loss_weight(sde, weighting: str, t: torch.Tensor, std: torch.Tensor, is_factor) -> torch.Tensor | float:
    """w(t) = lambda(t) / std^2 for the residual std * score + eps_target."""
    if weighting == "variance":
        return 1.0
    if weighting == "likelihood":
        return sde.sde(torch.zeros(t.shape[0], 1, device=t.device), t)[1] ** 2 / std**2
    if weighting == "importance":
        return is_factor
    if weighting == "x0":
        return std**2
    raise ValueError(f"Unknown weighting {weighting!r}; valid: {WEIGHTINGS}.")


def dsm_noise_target(x_t: torch.Tensor, z: torch.Tensor, alpha, std, reference=None) -> torch.Tensor:
    """Denoising score matching: the noise that made x_t, eps_target = z."""
    return z


def stf_noise_target(x_t: torch.Tensor, z: torch.Tensor, alpha, std, reference) -> torch.Tensor:
    """Stable Target Field: eps_target = (x_t - alpha * xbar_w) / std over the reference batch (papers.md s. 4)."""
    import stf

    if reference is None:
        raise ValueError("training.stf=True needs a reference batch: pass reference= to the loss/step function.")
    return stf.stf_noise_target(x_t, alpha, std, reference)


def reconstruction_term(
    sde,
    score_fn: Callable,
    x0: torch.Tensor,
    tau: float,
    decoder: str = "gaussian",
    inverse_scaler: Callable | None = None,
) -> torch.Tensor:
    """The Soft Truncation repository's reconstruction loss [B] (nats) at t = tau (module docstring):
    gaussian: D/2 log(2 pi q_std^2) + ||x0 - q_mean||^2 / (2 q_std^2) - D/2 (log(2 pi sigma^2) + 1);
    lossless: -sum log Q(x0 | x_tau) with the 8-bit discretized decoder (likelihood.lossless_decoder_nll)."""
    import likelihood

    t = torch.full((x0.shape[0],), float(tau), device=x0.device, dtype=x0.dtype)
    alpha, std = likelihood.alpha_and_std(sde, t)
    x_tau = broadcast_to(alpha, x0) * x0 + broadcast_to(std, x0) * torch.randn_like(
        x0, memory_format=torch.contiguous_format
    )
    q_mean, q_std = likelihood.gaussian_decoder(sde, score_fn, x_tau, t)
    num_dims = x0[0].numel()
    if decoder == "lossless":
        if inverse_scaler is None:
            raise ValueError("The lossless reconstruction loss needs the inverse_scaler (the data range).")
        return likelihood.lossless_decoder_nll(x0, q_mean, q_std, inverse_scaler)
    if decoder != "gaussian":
        raise ValueError(f"decoder {decoder!r} unknown; use 'gaussian' or 'lossless' (data.dequantization).")
    sq = torch.sum(torch.square(x0 - q_mean).reshape(x0.shape[0], -1), dim=-1)
    q_recon = 0.5 * num_dims * torch.log(2.0 * math.pi * q_std**2) + sq / (2.0 * q_std**2)
    return q_recon - likelihood.gaussian_entropy(std, num_dims)


def get_per_sample_loss_fn(
    sde,
    train: bool,
    reduce_mean: bool = True,
    continuous: bool = True,
    likelihood_weighting: bool = False,
    eps: float = 1e-5,
    *,
    importance_sampling: bool = False,
    weighting: str | None = None,
    stf: bool = False,
    loss_factor: float = 1.0,
    reconstruction_loss: bool = False,
    decoder: str = "gaussian",
    inverse_scaler: Callable | None = None,
    time_sampling: str = "",
    parametrization_factory: Callable | None = None,
    precision: str = "fp32",
) -> Callable:
    """loss_fn(model, batch, tau=None, reference=None) -> per-sample losses [B] (see the module docstring).
    precision 'bf16' / 'fp16' runs the network under autocast; the loss is computed in the batch's dtype.

    parametrization_factory(model, train) -> Parametrization (parametrization.get_parametrization_factory, built
    once from the run's config); None: built from model.config at each call."""
    reduce_op = get_reduce_op(reduce_mean)
    weighting = resolve_weighting(likelihood_weighting, importance_sampling, weighting)
    importance_t = resolve_time_sampling(weighting, time_sampling)
    target_fn = stf_noise_target if stf else dsm_noise_target
    if decoder not in ("gaussian", "lossless"):
        raise ValueError(f"decoder {decoder!r} unknown; use 'gaussian' or 'lossless' (data.dequantization).")

    def loss_fn(model, batch: torch.Tensor, tau: float | None = None, reference: torch.Tensor | None = None):
        tau_ = eps if tau is None else float(tau)
        if parametrization_factory is None:
            score_fn = parametrization.get_parametrization(
                sde, model, train=train, continuous=continuous, precision=precision
            ).score
        else:
            score_fn = parametrization_factory(model, train=train).score
        t, is_factor = sample_time(sde, batch.shape[0], tau_, importance_t, batch.device)
        z = torch.randn_like(batch, memory_format=torch.contiguous_format)  # the same noise in any memory format
        mean, std = sde.marginal_prob(batch, t)
        x_t = mean + broadcast_to(std, batch) * z
        alpha = _mean_coefficient(sde, t)
        eps_target = target_fn(x_t, z, alpha, std, reference)
        score = score_fn(x_t, t)
        residual = torch.square(score * broadcast_to(std, batch) + eps_target)
        losses = loss_weight(sde, weighting, t, std, is_factor) * reduce_op(
            residual.reshape(residual.shape[0], -1), dim=-1
        )
        if reconstruction_loss:
            recon = reconstruction_term(sde, score_fn, batch, tau_, decoder, inverse_scaler)
            losses = losses + 2.0 * (recon / batch[0].numel() if reduce_mean else recon)
        return loss_factor * losses

    return loss_fn


def _mean_coefficient(sde, t: torch.Tensor):
    """alpha(t) for Gaussian corruptions (used by STF); None for corruptions without one."""
    return sde.alpha(t) if hasattr(sde, "alpha") else None


def get_sde_loss_fn(
    sde,
    train: bool,
    reduce_mean: bool = True,
    continuous: bool = True,
    likelihood_weighting: bool = True,
    eps: float = 1e-5,
    **kwargs,
) -> Callable:
    """score_sde's loss_fn(model, batch) -> scalar mean loss; new keywords as in get_per_sample_loss_fn."""
    per_sample = get_per_sample_loss_fn(sde, train, reduce_mean, continuous, likelihood_weighting, eps, **kwargs)

    def loss_fn(model, batch, tau=None, reference=None):
        return torch.mean(per_sample(model, batch, tau=tau, reference=reference))

    return loss_fn


def get_smld_loss_fn(vesde, train: bool, reduce_mean: bool = False, precision: str = "fp32") -> Callable:
    """score_sde's discrete-time NCSN loss (legacy, VE only); precision: the network's autocast."""
    if not isinstance(vesde, sde_lib.VESDE):
        raise ValueError("SMLD (discrete) training only works for the VE SDE.")
    smld_sigma_array = torch.flip(vesde.discrete_sigmas, dims=(0,))
    reduce_op = get_reduce_op(reduce_mean)
    dtype = parametrization.autocast_dtype(precision)

    def loss_fn(model, batch):
        labels = torch.randint(0, vesde.N, (batch.shape[0],), device=batch.device)
        sigmas = smld_sigma_array.to(batch.device)[labels]
        noise = torch.randn_like(batch, memory_format=torch.contiguous_format) * broadcast_to(sigmas, batch)
        score = parametrization.run_network(model, noise + batch, labels, train, dtype)
        target = -noise / broadcast_to(sigmas**2, batch)
        losses = torch.square(score - target)
        losses = reduce_op(losses.reshape(losses.shape[0], -1), dim=-1) * sigmas**2
        return torch.mean(losses)

    return loss_fn


def get_ddpm_loss_fn(vpsde, train: bool, reduce_mean: bool = True, precision: str = "fp32") -> Callable:
    """score_sde's discrete-time DDPM loss (legacy, VP only); precision: the network's autocast."""
    if not isinstance(vpsde, sde_lib.VPSDE):
        raise ValueError("DDPM (discrete) training only works for the VP SDE.")
    reduce_op = get_reduce_op(reduce_mean)
    dtype = parametrization.autocast_dtype(precision)

    def loss_fn(model, batch):
        labels = torch.randint(0, vpsde.N, (batch.shape[0],), device=batch.device)
        sqrt_ac = vpsde.sqrt_alphas_cumprod.to(batch.device)[labels]
        sqrt_1m_ac = vpsde.sqrt_1m_alphas_cumprod.to(batch.device)[labels]
        noise = torch.randn_like(batch, memory_format=torch.contiguous_format)
        perturbed = broadcast_to(sqrt_ac, batch) * batch + broadcast_to(sqrt_1m_ac, batch) * noise
        losses = torch.square(parametrization.run_network(model, perturbed, labels, train, dtype) - noise)
        return torch.mean(reduce_op(losses.reshape(losses.shape[0], -1), dim=-1))

    return loss_fn


# ----------------------------------------------------------------------------------------------------------------
# The step function


def sample_tau(st: bool, k: float, eps: float, T: float = 1.0) -> float:
    """The truncation time of one optimisation step: tau ~ P_k on [eps, T] with Soft Truncation, else eps."""
    if not st:
        return eps
    return float(sde_lib.sample_truncation_time(k, eps, T))


def get_step_fn(
    sde,
    train: bool,
    optimize_fn: Callable | None = None,
    reduce_mean: bool = False,
    continuous: bool = True,
    likelihood_weighting: bool = False,
    *,
    eps: float = 1e-5,
    importance_sampling: bool = False,
    weighting: str | None = None,
    st: bool = False,
    k: float = 1.0,
    mixed: bool = False,
    balanced: bool = False,
    ddpm_weight: float = 0.01,
    num_micro_batch: int = 1,
    stf: bool = False,
    loss_factor: float = 1.0,
    reconstruction_loss: bool = False,
    decoder: str = "gaussian",
    inverse_scaler: Callable | None = None,
    time_sampling: str = "",
    parametrization_factory: Callable | None = None,
    precision: str = "fp32",
) -> Callable:
    """step_fn(state, batch, reference=None) -> mean loss; one optimisation step when train=True.

    score_sde's signature plus keywords for Soft Truncation (st, k, eps), importance sampling, the ST repository's
    mixed / balanced mode, micro-batches (gradient accumulation: the gradient equals the full-batch gradient),
    STF, the reconstruction loss (reconstruction_loss, decoder, inverse_scaler: see the module docstring) and
    time_sampling (see resolve_time_sampling).
    A non-finite loss or gradient skips the step: parameters, optimizer, EMA and state['step'] are left
    unchanged and state['nonfinite'] is set to True.

    precision (training.precision): 'fp32'; 'bf16' (the network under bf16 autocast; parameters, optimizer state,
    EMA and the loss stay float32); 'fp16' (autocast with the dynamic gradient scaler state['grad_scaler'], which
    the checkpoint keeps: a step whose scaled gradients
    overflow is skipped without touching parameters, optimizer or EMA, state['amp_skipped'] is set and counted in
    state['amp_skipped_steps'], and the scale is lowered).
    """
    if continuous:
        common = dict(
            train=train,
            reduce_mean=reduce_mean,
            continuous=True,
            eps=eps,
            stf=stf,
            loss_factor=loss_factor,
            reconstruction_loss=reconstruction_loss,
            decoder=decoder,
            inverse_scaler=inverse_scaler,
            parametrization_factory=parametrization_factory,
            precision=precision,
        )
        main_loss = get_per_sample_loss_fn(
            sde,
            likelihood_weighting=likelihood_weighting,
            importance_sampling=importance_sampling,
            weighting=weighting,
            time_sampling=time_sampling,
            **common,
        )
        # mixed mode: half of each batch importance-sampled likelihood weighting, half uniform time
        is_loss = get_per_sample_loss_fn(sde, importance_sampling=True, **common) if mixed else None
        uniform_loss = (
            get_per_sample_loss_fn(sde, likelihood_weighting=likelihood_weighting, weighting=weighting, **common)
            if mixed
            else None
        )
    else:
        if likelihood_weighting or importance_sampling or st or mixed or stf or reconstruction_loss or time_sampling:
            raise ValueError("Discrete-time (continuous=False) training supports none of the new options.")
        if isinstance(sde, sde_lib.VESDE):
            discrete = get_smld_loss_fn(sde, train, reduce_mean=reduce_mean, precision=precision)
        elif isinstance(sde, sde_lib.VPSDE):
            discrete = get_ddpm_loss_fn(sde, train, reduce_mean=reduce_mean, precision=precision)
        else:
            raise ValueError(f"Discrete training for {sde.__class__.__name__} is not supported.")

        def main_loss(model, batch, tau=None, reference=None):
            return discrete(model, batch).expand(batch.shape[0])

    if num_micro_batch < 1:
        raise ValueError(f"optim.num_micro_batch must be >= 1, got {num_micro_batch}.")
    parametrization.autocast_dtype(precision)  # validates the name

    def batch_losses(model, batch, tau, reference):
        """Per-sample losses of one (micro-)batch (mixed mode: [B/2] combined losses)."""
        if not mixed:
            return main_loss(model, batch, tau=tau, reference=reference)
        half = batch.shape[0] // 2
        if half == 0 or batch.shape[0] % 2:
            raise ValueError("training.mixed needs an even (micro-)batch size of at least 2.")
        losses_is = is_loss(model, batch[:half], tau=tau, reference=reference)
        losses_u = uniform_loss(model, batch[half:], tau=tau, reference=reference)
        w = ddpm_weight
        if balanced:
            w = ddpm_weight * torch.mean(losses_is / losses_u).detach()
        return losses_is + w * losses_u

    def step_fn(state, batch, reference=None):
        model = state["model"]
        state["nonfinite"] = False
        if not train:
            with torch.no_grad():
                ema = state["ema"]
                ema.store(model.parameters())
                ema.copy_to(model.parameters())
                loss = torch.mean(batch_losses(model, batch, eps, reference))
                ema.restore(model.parameters())
            return loss

        optimizer = state["optimizer"]
        optimizer.zero_grad(set_to_none=True)
        # one tau per optimisation step, shared by the micro-batches and by all data-parallel ranks
        tau = sample_tau(st, k, eps, sde.T)
        if st:
            tau = distributed.broadcast_float(tau, batch.device)
        chunks = torch.tensor_split(batch, num_micro_batch)
        if any(c.shape[0] == 0 for c in chunks):
            raise ValueError(f"Batch of {batch.shape[0]} cannot be split into {num_micro_batch} micro-batches.")
        grad_scaler = None
        if precision == "fp16":  # run_lib.build_state puts the scaler in the state; a hand-made state gets one
            if state.get("grad_scaler") is None:
                state["grad_scaler"] = torch.amp.GradScaler(batch.device.type)
            grad_scaler = state["grad_scaler"]
        state["amp_skipped"] = False
        total = torch.zeros((), device=batch.device)
        for i, chunk in enumerate(chunks):
            # DistributedDataParallel: average the gradients across ranks once, after the last micro-batch
            defer_sync = hasattr(model, "no_sync") and i < len(chunks) - 1
            with model.no_sync() if defer_sync else contextlib.nullcontext():
                loss = torch.mean(batch_losses(model, chunk, tau, reference))
                part = loss * chunk.shape[0] / batch.shape[0]
                (part if grad_scaler is None else grad_scaler.scale(part)).backward()
            total = total + loss.detach() * chunk.shape[0] / batch.shape[0]
        total = distributed.all_reduce_mean(total)  # every rank takes the same skip decision
        if grad_scaler is not None:
            grad_scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        if not bool(torch.isfinite(total) & torch.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            if grad_scaler is not None and bool(torch.isfinite(total)):  # fp16 gradient overflow: lower the scale
                grad_scaler.update()
                state["amp_skipped"] = True
                state["amp_skipped_steps"] = int(state.get("amp_skipped_steps", 0)) + 1
                return total
            state["nonfinite"] = True
            return total
        optimize_fn(optimizer, model.parameters(), step=state["step"])
        if grad_scaler is not None:
            grad_scaler.update()
        state["step"] += 1
        state["ema"].update(model.parameters())
        return total

    return step_fn


def soft_truncation_applies(config, sde) -> bool:
    """training.st, except for VE / RVE SDEs under training.st_vp_only (the Soft Truncation repository drew
    tau for VP / sub-VP only: its VE / RVE get_t_min returned eps unless called with st=True, which it never
    was)."""
    if not config.training.st:
        return False
    return not (config.training.st_vp_only and isinstance(sde, sde_lib.VESDE))


def get_step_fn_from_config(config, sde, train: bool, optimize_fn: Callable | None = None) -> Callable:
    """get_step_fn with every option read from the (completed) config: the objective's step function."""
    return Objective(complete_config(config), sde).step_fn(train, optimize_fn)


# ----------------------------------------------------------------------------------------------------------------
# The objective object


class Objective:
    """The training objective of a run: time sampling x weighting x target (DSM or STF), with the corruption
    (Gaussian SDE or blur), composed by get_step_fn from the config's training and optim sections.

    setup(train_set, state) prepares what the objective needs from the data before the first step: the blur
    corruption's Gaussian prior at t = 1 (fitted on training images, or restored from the checkpoint, and kept in
    state['corruption']) and the Stable Target Field's reference-batch sampler. reference(batch, position) is the
    STF reference batch of a training step (None without STF); it depends only on (seed, position, rank), so a
    resumed run draws the same references."""

    def __init__(self, config, corruption):
        self.config = config
        self.corruption = corruption
        self.stf = bool(config.training.stf)
        self.reference_sampler = None
        self.make_parametrization = parametrization.get_parametrization_factory(
            corruption, continuous=bool(config.training.continuous), config=config, precision=config.training.precision
        )

    # --- before the first step -----------------------------------------------------------------------------------
    def setup(self, train_set, state: dict) -> None:
        """Fit or restore the blur prior; build the STF reference sampler (see the class docstring)."""
        config = self.config
        if hasattr(self.corruption, "fit_prior"):
            if "corruption" in state:
                self.corruption.load_state_dict(state["corruption"])
            else:
                self.corruption.fit_prior(_prior_fit_images(config, train_set))
            state["corruption"] = self.corruption.state_dict()
        if self.stf:
            import stf

            self.reference_sampler = stf.ReferenceBatchSampler(
                train_set, int(config.training.stf_ref_batch_size), random_flip=bool(config.data.random_flip)
            )

    # --- each step -------------------------------------------------------------------------------------------------
    def reference(self, batch: torch.Tensor, position: int | None = None, gather: bool = True) -> torch.Tensor | None:
        """STF reference batch: the step's own sources first, then extra training images scaled like the batch.

        position (the training stream's position) seeds the extra draws with (seed, position, rank); None
        continues the sampler's own stream (evaluation). With training.stf_gather (and gather) the references of
        all data-parallel ranks are concatenated in rank order."""
        if self.reference_sampler is None:
            return None
        import datasets
        import stf

        sampler = self.reference_sampler
        if position is not None:
            rank, world_size = distributed.get_rank(), distributed.get_world_size()
            sampler.generator.manual_seed((self.config.seed * 1000033 + position) * world_size + rank)
        extra = sampler.sample(batch.shape[0])
        scaler = datasets.get_data_scaler(self.config)
        reference = batch if extra.shape[0] == 0 else torch.cat([batch, scaler(extra.to(batch.device))], dim=0)
        if gather and self.config.training.stf_gather:
            reference = stf.gather_reference_batch(reference)
        return reference

    def step_fn(self, train: bool, optimize_fn: Callable | None = None) -> Callable:
        """step_fn(state, batch, reference=None) -> mean loss (get_step_fn with the config's options)."""
        config, sde = self.config, self.corruption
        training = config.training
        if training.loss_convention not in LOSS_CONVENTIONS:
            raise ValueError(f"training.loss_convention={training.loss_convention!r}; valid: {list(LOSS_CONVENTIONS)}.")
        k = float(training.k)
        import datasets

        return get_step_fn(
            sde,
            train=train,
            optimize_fn=optimize_fn,
            reduce_mean=training.reduce_mean,
            continuous=training.continuous,
            likelihood_weighting=training.likelihood_weighting,
            eps=float(training.truncation_time),
            importance_sampling=bool(training.importance_sampling),
            weighting=training.weighting or None,
            st=soft_truncation_applies(config, sde),
            k=k if math.isfinite(k) else math.inf,
            mixed=bool(training.mixed),
            balanced=bool(training.balanced),
            ddpm_weight=float(training.ddpm_weight),
            num_micro_batch=int(config.optim.num_micro_batch),
            stf=self.stf,
            loss_factor=LOSS_CONVENTIONS[training.loss_convention],
            reconstruction_loss=bool(training.reconstruction_loss),
            decoder="lossless" if config.data.dequantization == "lossless" else "gaussian",
            inverse_scaler=datasets.get_data_inverse_scaler(config),
            time_sampling=training.time_sampling,
            parametrization_factory=self.make_parametrization,
            precision=training.precision,
        )


def get_objective(config, corruption) -> Objective:
    """The Objective of a run (config completed with configs.defaults first)."""
    return Objective(complete_config(config), corruption)


def _prior_fit_images(config, train_set) -> torch.Tensor:
    """Scaled training images for fitting the blur corruption's distribution at t = 1."""
    import datasets

    n = min(len(train_set), int(config.blur.prior_fit_images))
    gen = torch.Generator().manual_seed(config.seed)
    idx = torch.randperm(len(train_set), generator=gen)[:n]
    return datasets.get_data_scaler(config)(train_set.get_batch(idx, augment=False))
