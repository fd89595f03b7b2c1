"""UNCSN++ (RVE) + ST on CelebA 64 as the Soft Truncation repository released it: reciprocal VE SDE with
eta = s_min = 1e-3, s_max = 90; use it to evaluate the released checkpoint.

As trained: the network embeds log sigma (training.unbounded_parametrization = False) and tau was never drawn for
RVE (training.st_vp_only = True). ve/CELEBA/uncsnpp_st_rve.py is the UNCSN++ of the paper.
"""

from configs.default_celeba_configs import get_default_configs
from configs.presets import celeba_schedule, reciprocal_ve, ve_base


def get_config():
    config = reciprocal_ve(ve_base(get_default_configs))
    celeba_schedule(config)
    config.model.sigma_begin = 90  # NCSN's name for sigma_max; never read
    return config
