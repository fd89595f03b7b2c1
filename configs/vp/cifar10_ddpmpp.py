"""score_sde: DDPM++ trained with the discrete DDPM objective (VP), ancestral sampling, on CIFAR-10."""

from configs.default_cifar10_configs import get_default_configs
from configs.presets import set_ddpmpp
from configs.vp.ddpm.cifar10 import set_discrete_vp


def get_config():
    return set_discrete_vp(set_ddpmpp(get_default_configs()))
