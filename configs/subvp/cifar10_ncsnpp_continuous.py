"""score_sde: NCSN++ with the continuous sub-VP SDE on CIFAR-10."""

from configs.vp.cifar10_ncsnpp_continuous import get_config as get_vp_config


def get_config():
    config = get_vp_config()
    config.training.sde = "subvpsde"
    return config
