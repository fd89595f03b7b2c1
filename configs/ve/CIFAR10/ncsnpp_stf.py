"""NCSN++ (VE, continuous) + Stable Target Field on CIFAR-10: score_sde's cifar10_ncsnpp_continuous with the
STF noise target (Xu et al. 2023; the official STF code silently ignores STF for VE, here it is applied).

Reference batch: 4096 per rank (the STF code's default; its released checkpoints used 1024 per GPU).
"""

from configs.ve import cifar10_ncsnpp_continuous


def get_config():
    config = cifar10_ncsnpp_continuous.get_config()
    config.training.stf = True
    config.training.stf_ref_batch_size = 4096
    config.training.stf_gather = False
    return config
