"""DDPM++ (VP, NLL) + ST on ImageNet 32x32 (dropout 0)."""

from configs.default_imagenet32_configs import get_default_configs
from configs.presets import vp_base


def get_config():
    config = vp_base(get_default_configs)
    config.model.dropout = 0.0
    config.training.st = True
    config.training.importance_sampling = True
    return config
