"""score_sde: DDPM reproduced (discrete VP, the original network), ancestral sampling, on CIFAR-10."""

from configs.default_cifar10_configs import get_default_configs
from configs.model_presets import set_ddpm


def get_config():
    config = set_ddpm(get_default_configs())
    config.training.sde = "vpsde"
    config.training.continuous = False
    config.training.reduce_mean = True
    config.sampling.predictor = "ancestral_sampling"
    config.sampling.corrector = "none"
    return config
