"""score_sde: NCSN++ (VE, continuous) on CelebA-HQ 256."""

from configs.default_lsun_configs import get_default_configs
from configs.presets import set_continuous_ve_pc, set_ncsnpp_256


def get_config():
    config = set_continuous_ve_pc(set_ncsnpp_256(get_default_configs()))
    config.data.dataset = "CelebAHQ"
    config.data.tfrecords_path = "/home/yangsong/ncsc/celebahq/r08.tfrecords"  # never read here (README)
    config.model.sigma_max = 348
    return config
