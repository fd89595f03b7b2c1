"""score_sde: NCSN on CelebA 64 with NCSNv2's technique 5 only (EMA of the weights)."""

from configs.default_celeba_configs import get_default_configs
from configs.ve.ncsn import set_ncsn


def get_config():
    config = set_ncsn(get_default_configs())
    config.sampling.n_steps_each = 100
    config.sampling.snr = 0.316
    config.model.sigma_max = 1
    config.model.num_scales = 10
    config.model.ema_rate = 0.999
    return config
