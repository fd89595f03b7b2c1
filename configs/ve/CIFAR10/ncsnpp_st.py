"""NCSN++ (VE) + ST on CIFAR-10 as the Soft Truncation repository released it: s_min = 1e-3, PC sampler.

The repository's code never drew tau for VE (training.st_vp_only = True reproduces that: the run trained on the
fixed [eps, 1]); ve/CIFAR10/ncsnpp_st_k2.py applies Soft Truncation with k = 2.
"""

from configs.default_cifar10_configs import get_default_configs
from configs.presets import ve_base


def get_config():
    config = ve_base(get_default_configs)
    config.model.sigma_min = 0.001
    config.training.eta = 0.001  # read by the original for its reciprocal VE SDE only
    return config
