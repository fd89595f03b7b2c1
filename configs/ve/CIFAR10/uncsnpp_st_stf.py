"""UNCSN++ (RVE) + Soft Truncation + Stable Target Field on CIFAR-10: ve/CIFAR10/uncsnpp_st_rve (reciprocal VE,
s_min = 1e-3, bounded noise embedding, k = 2) with the STF noise target in place of DSM's.

Reference batch: 4096 per rank (the STF code's default; its released checkpoints used 1024 per GPU).
"""

from configs.ve.CIFAR10 import uncsnpp_st_rve


def get_config():
    config = uncsnpp_st_rve.get_config()
    config.training.stf = True
    config.training.stf_ref_batch_size = 4096
    config.training.stf_gather = False
    return config
