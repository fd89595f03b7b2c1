"""score_sde: NCSN on CelebA 64 with NCSNv2's techniques 1, 2, 4 (sigma_max 90, 500 noise levels, 5 steps each)."""

from configs.default_celeba_configs import get_default_configs
from configs.presets import set_ncsn


def get_config():
    config = set_ncsn(get_default_configs())
    config.sampling.n_steps_each = 5
    config.sampling.snr = 0.128
    config.model.num_scales = 500
    config.model.ema_rate = 0.0
    return config
