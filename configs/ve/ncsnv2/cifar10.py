"""score_sde: NCSNv2 on CIFAR-10 (sigma 50 -> 0.01 over 232 levels, output divided by sigma, Adam 1e-4)."""

from configs.default_cifar10_configs import get_default_configs
from configs.presets import set_ncsn


def get_config():
    config = set_ncsn(get_default_configs())
    config.sampling.n_steps_each = 5
    config.sampling.snr = 0.176
    config.model.name = "ncsnv2_64"
    config.model.scale_by_sigma = True
    config.model.num_scales = 232
    config.model.ema_rate = 0.999
    config.optim.lr = 1e-4
    return config
