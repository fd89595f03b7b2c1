"""Defaults for CelebA 64x64 (center crop 140, resize 64), as score_sde's default_celeba_configs: the CIFAR-10
defaults with CelebA's data section, sigma_max 90, snr 0.17, and checkpoints 1-26 evaluated with sampling."""

import ml_collections

from configs.default_cifar10_configs import get_default_configs as get_cifar10_defaults


def get_default_configs() -> ml_collections.ConfigDict:
    config = get_cifar10_defaults()
    config.data.dataset = "CELEBA"
    config.data.image_size = 64
    config.model.sigma_max = 90
    config.sampling.snr = 0.17
    config.eval.begin_ckpt = 1
    config.eval.enable_sampling = True
    return config
