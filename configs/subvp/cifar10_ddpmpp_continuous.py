"""score_sde: DDPM++ (sub-VP, continuous) on CIFAR-10."""

from configs.vp.cifar10_ddpmpp_continuous import get_config as get_ddpmpp_config


def get_config():
    config = get_ddpmpp_config()
    config.training.sde = "subvpsde"
    return config
