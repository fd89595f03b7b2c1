"""Every preset a config file starts from, in one place (config files import this module, never library code).

- The two network presets of score_sde (Song et al. 2021, Table 3): `set_ddpmpp` (DDPM++, VP / sub-VP) and
  `set_ncsnpp` / `set_ncsnpp_256` (NCSN++, VE / RVE), plus `set_ddpm`; each sets every model field of the released
  configs, and a config file overrides what differs.
- score_sde's VE sampling (`set_continuous_ve_pc`) and its NCSN / NCSNv2 training (`set_ncsn`,
  `set_ncsn_v1_schedule`).
- The Soft Truncation repository's experiment settings (Kim et al. 2022): `vp_base` (its DDPM++ setting) and
  `ve_base` (its NCSN++ VE / RVE setting); the files under configs/vp/<DATA>/ and configs/ve/<DATA>/ start from
  one of them and change only what the original file changes, so each file at an original path holds the
  original's value in every field it defines (tests/test_configs.py). This project's improvements over the
  released runs live in files of their own, built with `st_for_ve` and `uncsnpp_rve` (README, "Configs").

The blur section's defaults are configs.defaults.default_blur_config (the config boundary).
"""

from collections.abc import Callable

import ml_collections

from configs import default_cifar10_configs, default_lsun_configs

# --------------------------------------------------------------------------------------------------------------
# Network presets (score_sde)


def _set_unet(config: ml_collections.ConfigDict, name: str, num_res_blocks: int) -> ml_collections.ConfigDict:
    """The U-Net fields DDPM, DDPM++ and NCSN++ share in score_sde's configs (noise-predicting, EMA 0.9999)."""
    model = config.model
    model.name = name
    model.scale_by_sigma = False
    model.ema_rate = 0.9999
    model.normalization = "GroupNorm"
    model.nonlinearity = "swish"
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = num_res_blocks
    model.attn_resolutions = (16,)
    model.resamp_with_conv = True
    model.conditional = True
    config.data.centered = True
    return config


def set_ddpmpp(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """DDPM++ (continuous): positional time embedding, noise-predicting output, no FIR, no progressive paths."""
    _set_unet(config, "ncsnpp", num_res_blocks=4)
    model = config.model
    model.fir = False
    model.fir_kernel = [1, 3, 3, 1]
    model.skip_rescale = True
    model.resblock_type = "biggan"
    model.progressive = "none"
    model.progressive_input = "none"
    model.progressive_combine = "sum"
    model.attention_type = "ddpm"
    model.init_scale = 0.0
    model.embedding_type = "positional"
    model.fourier_scale = 16
    model.conv_size = 3
    # Soft Truncation network options (defaults reproduce the score_sde layout)
    model.embedding_dim = 0  # used with lsgm=True: time-embedding width independent of nf
    model.lsgm = False
    model.auxiliary_resblock = True
    model.attention = True
    return config


def set_ncsnpp(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """NCSN++ (continuous): Gaussian Fourier embedding of sigma, output divided by sigma, FIR, residual input path."""
    set_ddpmpp(config)
    model = config.model
    model.scale_by_sigma = True
    model.ema_rate = 0.999
    model.fir = True
    model.progressive_input = "residual"
    model.embedding_type = "fourier"
    config.data.centered = False
    return config


def set_ddpm(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The original DDPM network (Ho et al. 2020) as score_sde configures it for VP / sub-VP: 2 blocks, EMA 0.9999."""
    return _set_unet(config, "ddpm", num_res_blocks=2)


def set_ncsnpp_256(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """NCSN++ as score_sde configures it for 256 px: no dropout, ch_mult (1, 1, 2, 2, 2, 2, 2), 2 blocks per
    resolution, output_skip / input_skip progressive paths."""
    set_ncsnpp(config)
    model = config.model
    model.dropout = 0.0
    model.ch_mult = (1, 1, 2, 2, 2, 2, 2)
    model.num_res_blocks = 2
    model.progressive = "output_skip"
    model.progressive_input = "input_skip"
    return config


def set_ncsnpp_1024(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """NCSN++ as score_sde configures it for 1024 px: nf 16, ch_mult (1, 2, 4, 8, 16, 32, 32, 32), 1 block per
    resolution, EMA 0.9999, batch 8, snr 0.15, checkpoints evaluated from 1 in batches of 1024."""
    set_ncsnpp_256(config)
    model = config.model
    model.nf = 16
    model.ch_mult = (1, 2, 4, 8, 16, 32, 32, 32)
    model.num_res_blocks = 1
    model.ema_rate = 0.9999
    config.data.image_size = 1024
    config.training.batch_size = 8
    config.sampling.snr = 0.15
    config.eval.begin_ckpt = 1
    config.eval.batch_size = 1024
    return config


# --------------------------------------------------------------------------------------------------------------
# score_sde's VE and NCSN settings


def set_continuous_ve_pc(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Continuous VE SDE sampled with PC: reverse diffusion predictor + Langevin corrector (score_sde)."""
    config.training.sde = "vesde"
    config.training.continuous = True
    config.sampling.method = "pc"
    config.sampling.predictor = "reverse_diffusion"
    config.sampling.corrector = "langevin"
    return config


def set_ncsn(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """NCSN as score_sde trains it: discrete VE (SMLD), annealed Langevin sampling, InstanceNorm++, Adam 1e-3."""
    training = config.training
    training.sde = "vesde"
    training.continuous = False
    sampling = config.sampling
    sampling.method = "pc"
    sampling.predictor = "none"
    sampling.corrector = "ald"
    model = config.model
    model.name = "ncsn"
    model.scale_by_sigma = False
    model.normalization = "InstanceNorm++"
    model.nonlinearity = "elu"
    model.nf = 128
    model.interpolation = "bilinear"
    optim = config.optim
    optim.weight_decay = 0
    optim.optimizer = "Adam"
    optim.lr = 1e-3
    optim.beta1 = 0.9
    optim.amsgrad = False
    optim.eps = 1e-8
    optim.warmup = 0
    optim.grad_clip = -1.0  # no clipping
    return config


def set_ncsn_v1_schedule(config: ml_collections.ConfigDict, ema_rate: float) -> ml_collections.ConfigDict:
    """NCSN (v1) as published: 10 noise levels from sigma 1 to 0.01, 100 Langevin steps each at snr 0.316."""
    set_ncsn(config)
    config.sampling.n_steps_each = 100
    config.sampling.snr = 0.316
    config.model.sigma_max = 1
    config.model.num_scales = 10
    config.model.ema_rate = ema_rate
    return config


# --------------------------------------------------------------------------------------------------------------
# The Soft Truncation repository's settings

# (training.num_train_data, eval.num_test_data) of the ST repository's defaults. Its 256 px defaults copy CelebA's
# training-set size (its code checks the number for ImageNet only) and define no test-set size (0 here: all).
ST_DATA_SIZES = {
    "CIFAR10": (50000, 10000),
    "CELEBA": (162770, 19962),
    "IMAGENET32": (1281149, 49999),
    "CelebAHQ": (162770, 0),
    "LSUN": (162770, 0),
    "FFHQ": (162770, 0),
}


def st_repository_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The fields the ST repository's defaults add to score_sde's, with their values (set after data.dataset)."""
    num_train, num_test = ST_DATA_SIZES[config.data.dataset]
    training = config.training
    training.ddpm_score = True
    training.reconstruction_loss = False
    training.num_train_data = num_train
    training.whatever_sampling = False
    training.stabilizing_constant = 1e-3
    config.data.dequantization = "none"
    config.model.fourier_feature = False
    config.optim.amsgrad = False
    config.optim.num_micro_batch = 1
    config.sampling.sample_more = True
    evaluate = config.eval
    evaluate.num_test_data = num_test
    evaluate.nll_iter = 0
    evaluate.nelbo_iter = 0
    evaluate.lambda_ = 0.0
    evaluate.probability_flow = True
    evaluate.residual = True
    return config


def vp_base(get_defaults: Callable[[], ml_collections.ConfigDict]) -> ml_collections.ConfigDict:
    """DDPM++ (VP) with Soft Truncation k = 1, importance-sampled likelihood weighting, ODE sampler."""
    config = get_defaults()
    set_ddpmpp(config)
    st_repository_fields(config)
    training = config.training
    training.sde = "vpsde"
    training.continuous = True
    training.reduce_mean = True
    training.n_iters = 13000001
    training.log_freq = 100
    training.snapshot_freq = 100000
    training.snapshot_sampling = False
    training.st = True
    training.k = 1.0
    training.truncation_time = 1e-5
    training.importance_sampling = True
    training.loss_convention = "soft_truncation"  # 0.5 * Z * reduce(...), as the ST repository
    config.sampling.method = "ode"
    config.sampling.predictor = "euler_maruyama"
    config.sampling.corrector = "none"
    config.sampling.truncation_time = 1e-5
    config.sampling.batch_size = 1024
    config.eval.batch_size = 200
    return config


def ve_base(get_defaults: Callable[[], ml_collections.ConfigDict]) -> ml_collections.ConfigDict:
    """NCSN++ (VE) with the predictor-corrector sampler, as the ST repository's VE / RVE "+ ST" runs trained.

    Their files set training.st = True, but the repository's code draws tau for VP only (papers.md section 3):
    the released VE / RVE runs trained on the fixed [eps, 1], which training.st_vp_only = True reproduces.
    `st_for_ve` gives the Soft Truncation the paper describes.
    """
    config = vp_base(get_defaults)
    set_ncsnpp(config)
    training = config.training
    training.sde = "vesde"
    training.reduce_mean = False
    training.importance_sampling = False
    training.st_vp_only = True
    config.sampling.method = "pc"
    config.sampling.predictor = "reverse_diffusion"
    config.sampling.corrector = "langevin"
    return config


def ve_256_base(dataset: str) -> ml_collections.ConfigDict:
    """The ST repository's 256 px NCSN++ setting (CelebA-HQ, LSUN, FFHQ): score_sde's 256 px network, batch 64,
    24M steps, PC sampling down to t = 1e-3, checkpoints 50-96 evaluated with sampling."""
    config = ve_base(default_lsun_configs.get_default_configs)
    config.data.dataset = dataset
    st_repository_fields(config)
    set_ncsnpp_256(config)
    training = config.training
    training.batch_size = 64
    training.n_iters = 24000001
    training.log_freq = 1000
    training.eval_freq = 500
    training.snapshot_freq = 200000
    training.snapshot_freq_for_preemption = 5000
    config.sampling.snr = 0.075
    config.sampling.batch_size = 16
    config.sampling.truncation_time = 0.001
    evaluate = config.eval
    evaluate.batch_size = 512
    evaluate.begin_ckpt = 50
    evaluate.end_ckpt = 96
    evaluate.enable_sampling = True
    return config


def uncsn_legacy(config: ml_collections.ConfigDict, eta: float, threshold: str) -> ml_collections.ConfigDict:
    """The ST repository's legacy UNCSN files (from its predecessor, "Score Matching Model for Unbounded Data
    Score"): the reciprocal VE SDE under its old name 'rve-sde', which the repository's own code rejects and
    sde_lib accepts as the reciprocal VE SDE, with sigma(eps) = eta = s_min; no Soft Truncation. Their section
    `uncsn` (eta, threshold) is never read: eta is model.sigma_min here."""
    config.training.sde = "rve-sde"
    config.training.st = False
    config.model.sigma_min = eta
    config.uncsn = ml_collections.ConfigDict({"eta": eta, "threshold": threshold})
    return config


def uncsn_cifar10(eta: float, threshold: str, num_res_blocks: int) -> ml_collections.ConfigDict:
    """The legacy UNCSN CIFAR-10 files: NCSN++ on the reciprocal VE SDE, likelihood weighting with
    importance-sampled time, no Soft Truncation."""
    config = uncsn_legacy(ve_base(default_cifar10_configs.get_default_configs), eta=eta, threshold=threshold)
    config.training.importance_sampling = True
    config.training.likelihood_weighting = True
    config.model.num_res_blocks = num_res_blocks
    return config


def reciprocal_ve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The ST repository's UNCSN++ files: reciprocal VE SDE with eta = s_min = 1e-3 (sigma at eps).

    The file name's bounded noise embedding was dead code there (the network took log sigma): the released runs
    have training.unbounded_parametrization = False, as here; `uncsnpp_rve` switches it on. Its reciprocal VE
    SDE drew training times t = 1 / U(1, 1/eps) (the importance density g^2/sigma^2 ~ 1/t^2) with the variance
    weighting and no Z factor, although the files set importance_sampling = False: training.time_sampling =
    'importance' reproduces that.
    """
    config.training.sde = "reciprocal_vesde"
    config.training.time_sampling = "importance"
    config.training.eta = 0.001
    config.training.model_mode = "reciprocal"
    config.model.sigma_min = 0.001
    return config


def st_for_ve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """This project's VE / RVE Soft Truncation: tau ~ P_k really drawn for VE / RVE, with the paper's k = 2."""
    config.training.st = True
    config.training.k = 2.0
    config.training.st_vp_only = False
    return config


def uncsnpp_rve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """UNCSN++ as the paper describes it: the reciprocal VE SDE, the bounded noise embedding u(sigma) in use
    (training.unbounded_parametrization = True) and Soft Truncation applied with k = 2."""
    config.training.sde = "reciprocal_vesde"
    config.training.unbounded_parametrization = True
    return st_for_ve(config)


def celeba_schedule(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The CelebA 64 files' training length, logging, batch sizes and checkpoint range (shared by all of them)."""
    training = config.training
    training.n_iters = 1300001
    training.log_freq = 50
    training.snapshot_freq = 50000
    training.snapshot_sampling = True
    config.sampling.batch_size = 512
    config.eval.batch_size = 1024
    config.eval.begin_ckpt = 1
    config.eval.enable_sampling = False
    return config


def deepest_ddpmpp(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The ST repository's "deepest" DDPM++: nf 512, ch_mult (1, 1, 1), 8 blocks, FIR, dropout 0.2, a 128-wide
    time embedding (lsgm), mixed mode, PC sampler."""
    model = config.model
    model.nf = 512
    model.ch_mult = (1, 1, 1)
    model.num_res_blocks = 8
    model.fir = True
    model.dropout = 0.2
    model.embedding_dim = 128
    model.lsgm = True
    config.training.mixed = True
    config.sampling.method = "pc"
    return config
