"""The config boundary: every optional field with its default, merged once into any config.

score_sde's and the Soft Truncation repository's own config files lack the fields this project added; code reads
config fields directly after complete_config, and each default lives here only.
"""

from __future__ import annotations

import copy

import ml_collections

VE_FAMILY = ("vesde", "rvesde", "reciprocal_vesde", "rve-sde")


class Unset:
    """A default of 'not set' that keeps its type, so that --config.section.field=value still overrides it."""

    def __init__(self, field_type: type):
        self.field_type = field_type


DEFAULTS = {
    "training": {
        "corruption": "gaussian",  # 'gaussian' (training.sde) or 'blur' (Soft Diffusion)
        "st": False,  # Soft Truncation: tau ~ P_k per step
        "k": 1.0,  # exponent of P_k(tau) ~ tau^-k
        "st_vp_only": False,  # the ST repository drew tau for VP / sub-VP only
        "importance_sampling": False,
        "weighting": "",  # '' follows the flags; 'variance' | 'likelihood' | 'importance' | 'x0'
        "time_sampling": "",  # '' | 'uniform' | 'importance'
        "mixed": False,
        "balanced": False,
        "ddpm_weight": 0.01,
        "stf": False,  # Stable Target Field
        "stf_ref_batch_size": 0,
        "stf_gather": False,
        "loss_convention": "score_sde",  # or 'soft_truncation' (factor 1/2)
        "reconstruction_loss": False,
        "unbounded_parametrization": False,  # UDDPM++ / UNCSN++
        "stabilizing_constant": 1e-3,
        "ddpm_score": True,  # False: a VP network outputs the score itself
        "max_nonfinite_steps": 10,
        "whatever_sampling": False,
        "precision": "fp32",  # 'fp32' | 'bf16' | 'fp16'
        "channels_last": False,
        "grad_checkpoint": False,
        "compile": False,
        "compile_mode": "",  # torch.compile mode ('' = default)
        "compile_backend": "",  # torch.compile backend ('' = inductor; 'aot_eager' to debug a compiled run)
        "tf32": False,
    },
    "optim": {"amsgrad": False, "fused": False, "num_micro_batch": 1},
    "sampling": {
        "ode_rtol": 1e-5,
        "ode_atol": 1e-5,
        "ode_method": "RK45",
        "nfe": 0,  # 0: the method's own default (Heun 35, DPM-Solver++ 20)
        "time_schedule": "",  # '' : the method's default grid
        "dpm_solver_order": 3,
        "num_steps": 0,  # PC / ancestral steps; 0: model.num_scales
        "truncation_time": 0.0,  # sampling eps; 0: score_sde's (1e-3 VP / sub-VP, 1e-5 VE, the RVE's eps)
        # edm_stochastic: EDM's S_churn (0: the deterministic Heun sampler), churn only where s_tmin <= sigma / alpha
        # <= s_tmax; EDM's settings, the best measured on the demo model (README, "Few-step sampling")
        "s_churn": 40.0,
        "s_tmin": 0.05,
        "s_tmax": 50.0,
        "s_noise": 1.0,  # stochastic samplers: scale of the fresh noise
        "sde_eta": 1.0,  # dpm_solver_sde / euler_ancestral (k-diffusion's eta): 1 the reverse SDE, 0 deterministic
        "dpm_solver_sde_order": 2,  # DPM-Solver++ SDE: 2M (2) or 3M (3)
        "sample_more": True,
    },
    "eval": {
        "precision": "",  # '': training.precision
        "sample_ckpt": 0,  # --mode sample: 0 = the latest checkpoint
        "enable_loss": True,
        "enable_bpd": False,
        "nll_iter": Unset(int),  # bits/dim passes (Soft Truncation's name); unset: eval.bpd_num_repeats, else 5
        "bpd_num_repeats": Unset(int),  # this project's older name of nll_iter
        "enable_nelbo": False,
        "nelbo_iter": 0,  # NELBO passes (ST); 0: as many as the NLL passes when enable_nelbo
        "num_test_data": 0,  # images per bits/dim pass; 0: the whole split
        "max_bpd_batches": 0,  # 0: no limit
        "bpd_dataset": "test",
        "bpd_rtol": 1e-5,
        "bpd_atol": 1e-5,
        "hutchinson_type": "Rademacher",
        "lambda_": 0.0,  # 0: the probability-flow ODE
        "probability_flow": Unset(bool),  # unset: follows lambda_ == 0
        "residual": True,  # Soft Truncation's exact treatment of [0, eps]
        "enable_sampling": False,
        "enable_fid": True,
        "inception_path": "",  # '': torch-fidelity's cache (downloaded on first use)
        "stats_path": "",  # '': the training set's Inception statistics
    },
    "data": {
        "num_channels": 3,
        "dequantization": "none",  # 'none' | 'uniform' | 'lossless' (ST); see uniform_dequantization
        "uniform_dequantization": False,  # score_sde's name of dequantization = 'uniform'
        "root": "",  # '': $SCORE_SDE_DATA/<dataset> or ./data/<dataset>
        "eval_root": "",
        "download": True,  # CIFAR-10 / STL-10 / Inception weights on first use ($SCORE_SDE_OFFLINE=1 turns it off)
        "crop": "",  # '': the dataset's own crop
        "resize_filter": "",  # '': the dataset's own filter
        "category": "",  # LSUN category
        "num_train": 4096,  # SHAPES
        "num_eval": 0,  # 0: the dataset's own count (SHAPES 1024, image folders 1000)
        "shapes_seed": 0,
        "num_workers": 0,
    },
    "model": {
        "attention": True,
        "auxiliary_resblock": True,
        "lsgm": False,
        "fourier_feature": False,
        "interpolation": "bilinear",  # NCSNv2 up-sampling
        "num_scales": 1000,
        "embedding_type": "positional",  # NCSN++: fourier or positional
        "ch_mult": Unset(tuple),  # absent from the NCSN configs
        "embedding_dim": Unset(int),  # NCSN++ with lsgm: width of the positional time embedding (ST)
    },
}
TOP_LEVEL = {"seed": 0, "device": None}


def default_blur_config() -> ml_collections.ConfigDict:
    """The config.blur section with its defaults (Soft Diffusion, papers.md section 5); a config with a blur
    section gets every missing field from here."""
    blur = ml_collections.ConfigDict()
    # blur std sigma_B in pixels at t = 0 and at t = 1
    blur.sigma_min = 0.3
    blur.sigma_max = 20.0
    # sigma_B(t): 'log' (geometric: sigma_min (sigma_max / sigma_min)^t), 'linear', or 'file' (schedule_file)
    blur.schedule = "log"
    # json file written by tools/blur_schedule.py ({'t': [...], 'sigma': [...]}); used when schedule == 'file'
    blur.schedule_file = ""
    # s_t: 'constant' (= noise_max), 'linear' or 'geometric' between noise_min (t = 0) and noise_max (t = 1)
    blur.noise_schedule = "geometric"
    blur.noise_min = 0.01
    blur.noise_max = 0.1
    # training images used to fit the Gaussian prior at t = 1 before training (stored in the checkpoint)
    blur.prior_fit_images = 2048
    # sampling: number of network evaluations N of the naive / momentum sampler, and whether to inject noise
    blur.num_steps = 100
    blur.sampler_noise = True
    return blur


def _truncation_time_default(config) -> float:
    """1e-3 for the blur corruption (Soft Diffusion's grid end), 1e-5 otherwise (score_sde)."""
    training = config.get("training", None)
    return 1e-3 if training is not None and training.get("corruption", "gaussian") == "blur" else 1e-5


def _fresh(value):
    """A new default value for one config (an Unset becomes a typed empty FieldReference)."""
    if isinstance(value, Unset):
        return ml_collections.FieldReference(None, field_type=value.field_type)
    return copy.deepcopy(value)


def add_default_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Fill, in place, every missing field of DEFAULTS, TOP_LEVEL and (when there is a blur section)
    default_blur_config(); get_default_configs calls it so that the command line can override any of them. The fields
    derived from others are left to complete_config."""
    with config.unlocked():
        for section, fields in DEFAULTS.items():
            if section not in config:
                config[section] = ml_collections.ConfigDict()
            target = config[section]
            for name, value in fields.items():
                if name not in target:
                    target[name] = _fresh(value)
        for name, value in TOP_LEVEL.items():
            if name not in config:
                config[name] = _fresh(value)
        if "blur" in config:
            for name, value in default_blur_config().items():
                if name not in config.blur:
                    config.blur[name] = value
    return config


def complete_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A deep copy of config with every missing section and field filled from DEFAULTS (present fields kept),
    and the derived fields (training.truncation_time, model.sigma_embedding, model.num_classes) set."""
    out = add_default_fields(copy.deepcopy(config))
    with out.unlocked():
        if "num_classes" not in out.model and "num_scales" in out.model:
            out.model.num_classes = out.model.num_scales  # the conditional normalisation's classes (NCSN)
        if "truncation_time" not in out.training:
            out.training.truncation_time = _truncation_time_default(out)
        if "sigma_embedding" not in out.model:
            sde = str(out.training.get("sde", "")).lower()
            unbounded = bool(out.training.unbounded_parametrization) and sde in VE_FAMILY
            out.model.sigma_embedding = "uncsn" if unbounded else "log"
    return out
