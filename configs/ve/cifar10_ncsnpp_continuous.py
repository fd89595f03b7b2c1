"""score_sde: NCSN++ (VE, continuous) on CIFAR-10, PC sampler (reverse diffusion + Langevin)."""

from configs.default_cifar10_configs import get_default_configs
from configs.presets import set_continuous_ve_pc, set_ncsnpp


def get_config():
    return set_continuous_ve_pc(set_ncsnpp(get_default_configs()))
