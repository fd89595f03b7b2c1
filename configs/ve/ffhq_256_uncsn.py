"""Soft Truncation repository (legacy UNCSN file): NCSN++ with the reciprocal VE SDE ('rve-sde') on FFHQ 256,
eta = s_min = 1e-3, s_max = 348, no Soft Truncation."""

from configs.presets import uncsn_legacy, ve_256_base


def get_config():
    config = uncsn_legacy(ve_256_base("FFHQ"), eta=1e-3, threshold="initial")
    config.data.tfrecords_path = "/downloaded_data/FFHQ_256/ffhq-r08.tfrecords"  # never read here (README)
    config.model.sigma_max = 348
    return config
