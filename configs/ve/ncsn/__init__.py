"""score_sde's NCSN (v1) configs, and the settings its NCSN / NCSNv2 configs share (`set_ncsn`)."""

import ml_collections


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
