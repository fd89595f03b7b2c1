"""score_sde: NCSN on CelebA 64 with NCSNv2's technique 5 only (EMA of the weights)."""

from configs.default_celeba_configs import get_default_configs
from configs.presets import set_ncsn_v1_schedule


def get_config():
    return set_ncsn_v1_schedule(get_default_configs(), ema_rate=0.999)
