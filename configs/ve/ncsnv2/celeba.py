"""score_sde: NCSNv2 on CelebA 64 (sigma 90 -> 0.01 over 500 levels, output divided by sigma, Adam 1e-4)."""

from configs.default_celeba_configs import get_default_configs
from configs.presets import set_ncsn


def get_config():
    config = set_ncsn(get_default_configs())
    config.sampling.n_steps_each = 5
    config.sampling.snr = 0.128
    config.model.name = "ncsnv2_64"
    config.model.scale_by_sigma = True
    config.model.num_scales = 500
    config.model.ema_rate = 0.999
    config.optim.lr = 1e-4
    return config
