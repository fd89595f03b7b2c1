"""score_sde: DDPM++ trained with the discrete DDPM objective (VP), ancestral sampling, on CIFAR-10."""

from configs.default_cifar10_configs import get_default_configs
from configs.model_presets import set_ddpmpp


def get_config():
    config = set_ddpmpp(get_default_configs())
    config.training.sde = "vpsde"
    config.training.continuous = False
    config.training.reduce_mean = True
    config.sampling.predictor = "ancestral_sampling"
    config.sampling.corrector = "none"
    return config
