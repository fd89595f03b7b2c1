"""Samplers for score-based models: the public API and the registries (score_sde_pytorch's sampling.py).

Public API kept from score_sde_pytorch: register_predictor / register_corrector, get_predictor / get_corrector,
Predictor / Corrector and their registered subclasses, get_pc_sampler, get_ode_sampler, get_sampling_fn. Every
sampler returned by a get_*_sampler function is called as sampler(model, z=None) -> (x, nfe), where x is
inverse-scaled and nfe counts the network evaluations actually made.

The families live in samplers/: pc.py (predictors, correctors, the PC loop), ode.py (the probability-flow ODE),
fast.py (Heun, DPM-Solver++ and their time grids), stochastic.py (EDM's stochastic sampler, DPM-Solver++
SDE, Euler ancestral); Soft Diffusion's samplers in soft_diffusion.py. Each family
has a score-function level entry point (pc_sample, solve_probability_flow, heun_sample, dpm_solver_sample) and
builds its model-level sampler with samplers.base.make_sampling_fn. This module imports the families and
registers the builders selected by config.sampling.method; a new sampler is one builder registered here with
register_sampling_method.

The PC sampler's step count is config.sampling.num_steps (0: model.num_scales), independent of the network: the
predictor steps on sde.with_num_steps(num_steps) while the score keeps the network's labels.
"""

from __future__ import annotations

import parametrization
import soft_diffusion
from configs.defaults import complete_config
from samplers.base import (  # noqa: F401  (public API)
    _CORRECTORS,
    _PREDICTORS,
    _SAMPLING_METHODS,
    CountingScoreFn,
    ScoreFn,
    get_corrector,
    get_predictor,
    make_sampling_fn,
    register_corrector,
    register_predictor,
    register_sampling_method,
)
from samplers.fast import (  # noqa: F401  (public API)
    dpm_solver_pp_update,
    dpm_solver_sample,
    edm_time_grid,
    fast_time_grid,
    get_dpm_solver_sampler,
    get_heun_sampler,
    half_log_snr,
    heun_num_points,
    heun_sample,
    logsnr_time_grid,
    t_from_half_log_snr,
)
from samplers.ode import (  # noqa: F401  (public API)
    ProbabilityFlowODE,
    adaptive_solver_options,
    denoise_update,
    get_ode_flow,
    get_ode_sampler,
    image_to_latent,
    latent_to_image,
    probability_flow_drift,
    solve_probability_flow,
)
from samplers.pc import (  # noqa: F401  (public API)
    AncestralSamplingPredictor,
    AnnealedLangevinDynamics,
    Corrector,
    EulerMaruyamaPredictor,
    LangevinCorrector,
    NoneCorrector,
    NonePredictor,
    Predictor,
    ReverseDiffusionPredictor,
    get_pc_sampler,
    pc_sample,
    pc_time_grid,
    shared_corrector_update_fn,
    shared_predictor_update_fn,
)
from samplers.stochastic import (  # noqa: F401  (public API)
    STOCHASTIC_SAMPLERS,
    dpm_solver_sde_sample,
    edm_stochastic_sample,
    euler_ancestral_sample,
    get_stochastic_sampler,
)


def get_sampling_fn(config, sde, shape, inverse_scaler, eps):
    """Create a sampling function for config.sampling.method (a name registered with register_sampling_method:
    'pc', 'ode', 'heun', 'dpm_solver', 'edm_stochastic', 'dpm_solver_sde',
    'euler_ancestral', 'naive_blur', 'momentum', ...).

    Returns: A function sampler(model, z=None) -> (samples, number of network evaluations)."""
    config = complete_config(config)
    method = str(config.sampling.method).lower()
    if method not in _SAMPLING_METHODS:
        raise ValueError(
            f"Unknown sampling method {method!r} (config.sampling.method); valid names: {sorted(_SAMPLING_METHODS)}"
        )
    return _SAMPLING_METHODS[method](config, sde, shape, inverse_scaler, eps)


# --------------------------------------------------------------------------------------------------
# Sampling methods selected by config.sampling.method
# --------------------------------------------------------------------------------------------------


def _config_nfe(config, default: int) -> int:
    """config.sampling.nfe, or the method's own default when it is 0."""
    return int(config.sampling.nfe or default)


def _config_num_steps(config) -> int | None:
    """config.sampling.num_steps, None when 0 (model.num_scales: score_sde's behaviour)."""
    return int(config.sampling.num_steps) or None


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
        precision=parametrization.eval_precision(config),
        num_steps=_config_num_steps(config),
    )


@register_sampling_method("ode")
def _build_ode(config, sde, shape, inverse_scaler, eps):
    return get_ode_sampler(
        sde=sde,
        shape=shape,
        inverse_scaler=inverse_scaler,
        denoise=config.sampling.noise_removal,
        rtol=config.sampling.ode_rtol,
        atol=config.sampling.ode_atol,
        method=config.sampling.ode_method,
        eps=eps,
        device=config.device,
        precision=parametrization.eval_precision(config),
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
        precision=parametrization.eval_precision(config),
        denoise=denoise,
        schedule=config.sampling.time_schedule or "edm",
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
        order=int(config.sampling.dpm_solver_order),
        eps=eps,
        device=config.device,
        precision=parametrization.eval_precision(config),
        denoise=denoise,
        schedule=config.sampling.time_schedule or "logsnr",
    )


def _build_stochastic(name: str):
    """Builder of the stochastic sampler `name` from config.sampling (nfe, time_schedule, noise_removal and the
    sampler's own fields: s_churn / s_tmin / s_tmax / s_noise for EDM, sde_eta / s_noise and dpm_solver_sde_order
    for DPM-Solver++ SDE, sde_eta / s_noise for Euler ancestral)."""

    def build(config, sde, shape, inverse_scaler, eps):
        sampling = config.sampling
        kwargs = dict(s_noise=sampling.s_noise)
        if name == "edm_stochastic":
            kwargs.update(s_churn=sampling.s_churn, s_tmin=sampling.s_tmin, s_tmax=sampling.s_tmax)
        else:
            kwargs.update(eta=sampling.sde_eta)
        if name == "dpm_solver_sde":
            kwargs.update(order=int(sampling.dpm_solver_sde_order))
        return get_stochastic_sampler(
            name,
            sde,
            shape,
            inverse_scaler,
            nfe=_config_nfe(config, 50),
            eps=eps,
            device=config.device,
            denoise=bool(sampling.noise_removal),
            schedule=sampling.time_schedule,
            continuous=config.training.continuous,
            precision=parametrization.eval_precision(config),
            **kwargs,
        )

    return build


for _name in STOCHASTIC_SAMPLERS:
    register_sampling_method(_name)(_build_stochastic(_name))

register_sampling_method("naive_blur")(soft_diffusion.build_naive_sampler)
register_sampling_method("momentum")(soft_diffusion.build_momentum_sampler)
