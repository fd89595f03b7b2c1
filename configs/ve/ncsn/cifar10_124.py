"""score_sde: NCSN on CIFAR-10 with NCSNv2's techniques 1, 2, 4 (sigma_max 50, 232 noise levels, 5 steps each)."""

from configs.default_cifar10_configs import get_default_configs
from configs.presets import set_ncsn


def get_config():
    config = set_ncsn(get_default_configs())
    config.sampling.n_steps_each = 5
    config.sampling.snr = 0.176
    config.model.num_scales = 232
    config.model.ema_rate = 0.0
    return config
