"""Soft Truncation repository (legacy UNCSN file): NCSN++ with the reciprocal VE SDE ('rve-sde') on CelebA-HQ 256,
eta = s_min = 1e-3, s_max = 348, no Soft Truncation."""

from configs.presets import uncsn_legacy, ve_256_base


def get_config():
    config = uncsn_legacy(ve_256_base("CelebAHQ"), eta=1e-3, threshold="initial")
    config.data.tfrecords_path = "/downloaded_data/CelebAHQ_256/celeba_r08.tfrecords"  # never read here (README)
    config.model.sigma_max = 348
    return config
