"""Defaults for STL-10 at 48x48 (the Soft Truncation paper's setting)."""

import ml_collections

from configs.default_cifar10_configs import get_default_configs as get_cifar10_defaults


def get_default_configs() -> ml_collections.ConfigDict:
    config = get_cifar10_defaults()
    config.data.dataset = "STL10"
    config.data.image_size = 48
    return config
