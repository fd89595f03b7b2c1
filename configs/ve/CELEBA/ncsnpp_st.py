"""NCSN++ (VE) + ST on CelebA 64 as the Soft Truncation repository released it: s_max = 90, k = 2 in the file.

The repository's code never drew tau for VE (training.st_vp_only = True reproduces that: the run trained on the
fixed [eps, 1]); ve/CELEBA/ncsnpp_st_k2.py applies Soft Truncation with k = 2.
"""

from configs.default_celeba_configs import get_default_configs
from configs.presets import celeba_schedule, ve_base


def get_config():
    config = ve_base(get_default_configs)
    celeba_schedule(config)
    config.training.k = 2.0
    config.model.sigma_begin = 90  # NCSN's name for sigma_max; never read
    return config
