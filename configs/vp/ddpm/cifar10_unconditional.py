"""score_sde: DDPM (discrete VP, the original network) on CIFAR-10 without the time conditioning."""

from configs.vp.ddpm import cifar10


def get_config():
    config = cifar10.get_config()
    config.model.conditional = False
    return config
