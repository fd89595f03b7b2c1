"""Soft Truncation repository (legacy UNCSN file): the deep NCSN++ (8 blocks per resolution) with the reciprocal
VE SDE ('rve-sde') on CIFAR-10, eta = s_min = 1e-5, likelihood weighting by importance sampling, no Soft
Truncation."""

from configs.presets import uncsn_cifar10


def get_config():
    return uncsn_cifar10(eta=1e-5, threshold="middle", num_res_blocks=8)
