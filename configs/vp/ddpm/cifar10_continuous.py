"""score_sde: the original DDPM network (Ho et al. 2020) trained with the continuous VP SDE on CIFAR-10."""

from configs.default_cifar10_configs import get_default_configs
from configs.presets import set_ddpm


def get_config():
    config = set_ddpm(get_default_configs())
    config.training.sde = "vpsde"
    config.training.continuous = True
    config.training.reduce_mean = True
    return config
