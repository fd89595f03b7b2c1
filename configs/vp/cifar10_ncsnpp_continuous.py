"""score_sde: NCSN++ with the continuous VP SDE on CIFAR-10 (positional time embedding, no sigma scaling)."""

from configs.default_cifar10_configs import get_default_configs
from configs.presets import set_ncsnpp


def get_config():
    config = set_ncsnpp(get_default_configs())
    config.training.sde = "vpsde"
    config.training.continuous = True
    config.training.reduce_mean = True
    model = config.model
    model.scale_by_sigma = False
    model.ema_rate = 0.9999
    model.embedding_type = "positional"
    config.data.centered = True
    return config
