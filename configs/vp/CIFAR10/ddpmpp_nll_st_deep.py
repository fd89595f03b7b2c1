"""DDPM++ deep (VP, NLL) + ST on CIFAR-10: 8 residual blocks per resolution."""

from configs.default_cifar10_configs import get_default_configs
from configs.presets import vp_base


def get_config():
    config = vp_base(get_default_configs)
    config.model.num_res_blocks = 8
    return config
