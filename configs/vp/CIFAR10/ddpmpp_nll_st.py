"""DDPM++ (VP, NLL) + ST on CIFAR-10: k = 1, importance sampling, eps = 1e-5 (Soft Truncation README)."""

from configs.default_cifar10_configs import get_default_configs
from configs.presets import vp_base


def get_config():
    return vp_base(get_default_configs)
