"""score_sde: NCSN (v1) as published on CelebA 64: 10 noise levels from sigma 1 to 0.01, 100 Langevin steps each.

The original file writes `training.loss = 'vesde'` (a typo: no such field is read, and its training.sde stays
unset); this config trains the VE SDE that the file's siblings and its name intend (training.sde = 'vesde').
"""

from configs.default_celeba_configs import get_default_configs
from configs.ve.ncsn import set_ncsn_v1_schedule


def get_config():
    return set_ncsn_v1_schedule(get_default_configs(), ema_rate=0.0)
