"""Baseline without ST: DDPM++ (VP) with likelihood weighting (importance sampled), fixed eps = 1e-5."""

from configs.default_cifar10_configs import get_default_configs
from configs.presets import vp_base


def get_config():
    config = vp_base(get_default_configs)
    config.training.st = False
    config.training.likelihood_weighting = True
    return config
