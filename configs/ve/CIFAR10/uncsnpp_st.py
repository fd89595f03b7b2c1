"""UNCSN++ (RVE) + ST on CIFAR-10 as the Soft Truncation repository released it: reciprocal VE SDE with
eta = s_min = 1e-3, PC sampler; use it to evaluate the released checkpoint.

As trained: the network embeds log sigma (the bounded embedding was dead code, so
training.unbounded_parametrization = False) and tau was never drawn for RVE (training.st_vp_only = True).
ve/CIFAR10/uncsnpp_st_rve.py is the UNCSN++ of the paper (bounded embedding, ST with k = 2).
"""

from configs.default_cifar10_configs import get_default_configs
from configs.presets import reciprocal_ve, ve_base


def get_config():
    return reciprocal_ve(ve_base(get_default_configs))
