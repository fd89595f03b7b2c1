"""score_sde: NCSN++ (VE, continuous) on LSUN church_outdoor 256 (sigma_max 380)."""

from configs.default_lsun_configs import get_default_configs
from configs.presets import set_continuous_ve_pc, set_ncsnpp_256


def get_config():
    config = set_continuous_ve_pc(set_ncsnpp_256(get_default_configs()))
    config.data.category = "church_outdoor"
    config.model.sigma_max = 380
    return config
