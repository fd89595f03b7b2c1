"""Soft Truncation repository (legacy UNCSN file): NCSN++ with the reciprocal VE SDE ('rve-sde') on LSUN
church_outdoor 256, eta = s_min = 1e-3, s_max = 380, no Soft Truncation."""

from configs.presets import uncsn_legacy, ve_256_base


def get_config():
    config = uncsn_legacy(ve_256_base("LSUN"), eta=1e-3, threshold="initial")
    config.data.category = "church_outdoor"
    config.model.sigma_max = 380
    return config
