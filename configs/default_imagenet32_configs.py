"""Defaults for downsampled ImageNet 32x32 (1,281,149 train / 49,999 validation images)."""

import ml_collections

from configs.default_cifar10_configs import get_default_configs as get_cifar10_defaults


def get_default_configs() -> ml_collections.ConfigDict:
    config = get_cifar10_defaults()
    config.data.dataset = "IMAGENET32"
    config.data.image_size = 32
    return config
