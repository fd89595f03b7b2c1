"""Baseline without ST: DDPM++ deep (VP, NLL), fixed eps = 1e-5."""

from configs.default_cifar10_configs import get_default_configs
from configs.presets import vp_base


def get_config():
    config = vp_base(get_default_configs)
    config.training.st = False
    config.training.likelihood_weighting = True
    config.model.num_res_blocks = 8
    config.sampling.batch_size = 512
    config.eval.batch_size = 100
    return config
