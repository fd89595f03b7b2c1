"""DDPM++ (VP, FID), baseline without ST on CelebA 64."""

from configs.default_celeba_configs import get_default_configs
from configs.presets import celeba_schedule, vp_base


def get_config():
    config = vp_base(get_default_configs)
    training = config.training
    training.st = False
    training.importance_sampling = False
    config.sampling.method = "pc"
    celeba_schedule(config)
    return config
