"""score_sde: NCSN (v1) as published on CIFAR-10: 10 noise levels from sigma 1 to 0.01, 100 Langevin steps each."""

from configs.default_cifar10_configs import get_default_configs
from configs.presets import set_ncsn_v1_schedule


def get_config():
    return set_ncsn_v1_schedule(get_default_configs(), ema_rate=0.0)
