"""score_sde: NCSN++ (VE, continuous) on CelebA-HQ 1024 (nf 16, 8 resolutions, sigma_max 1348)."""

from configs.default_lsun_configs import get_default_configs
from configs.presets import set_continuous_ve_pc, set_ncsnpp_1024


def get_config():
    config = set_continuous_ve_pc(set_ncsnpp_1024(get_default_configs()))
    config.data.dataset = "CelebAHQ"
    config.data.tfrecords_path = "/atlas/u/yangsong/celeba_hq/-r10.tfrecords"  # never read here (README)
    config.model.sigma_max = 1348
    return config
