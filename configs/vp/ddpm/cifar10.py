"""score_sde: DDPM reproduced (discrete VP, the original network), ancestral sampling, on CIFAR-10."""

from configs.default_cifar10_configs import get_default_configs
from configs.presets import set_ddpm


def set_discrete_vp(config):
    """The discrete DDPM objective (VP, continuous=False, mean over dimensions) with ancestral sampling."""
    config.training.sde = "vpsde"
    config.training.continuous = False
    config.training.reduce_mean = True
    config.sampling.predictor = "ancestral_sampling"
    config.sampling.corrector = "none"
    return config


def get_config():
    return set_discrete_vp(set_ddpm(get_default_configs()))
