"""Defaults for 256x256 datasets (CelebA-HQ), as score_sde's default_lsun_configs."""

import ml_collections

from configs.default_cifar10_configs import get_default_configs as get_cifar10_defaults


def get_default_configs() -> ml_collections.ConfigDict:
    config = get_cifar10_defaults()
    config.training.batch_size = 64
    config.training.n_iters = 2400001
    config.training.snapshot_freq = 50000
    config.training.snapshot_freq_for_preemption = 5000
    config.sampling.snr = 0.075
    config.sampling.batch_size = 16
    config.eval.batch_size = 512
    config.data.dataset = "CelebAHQ"
    config.data.image_size = 256
    config.data.num_eval = 1000  # CelebAHQ: the last 1000 images (sorted) are the evaluation split
    config.model.sigma_max = 348
    config.model.num_scales = 2000
    return config
