"""Defaults for 256x256 datasets, as score_sde's default_lsun_configs (LSUN, sigma_max 378, 2000 scales); the
CelebA-HQ, FFHQ and LSUN configs start from them and set their dataset."""

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
    config.eval.begin_ckpt = 50
    config.eval.end_ckpt = 96
    config.eval.batch_size = 512
    config.eval.enable_sampling = True
    config.data.dataset = "LSUN"
    config.data.image_size = 256
    config.data.num_eval = 1000  # CelebAHQ / folders without a split: the last 1000 images (sorted) are evaluated
    config.model.sigma_max = 378
    config.model.num_scales = 2000
    config.model.dropout = 0.0
    return config
