"""Score networks (score_sde_pytorch's model package): importing it registers 'ncsnpp' and 'ddpm'."""

from . import ddpm, ema, layers, layerspp, ncsnpp, normalization, up_or_down_sampling, utils

__all__ = ["ddpm", "ema", "layers", "layerspp", "ncsnpp", "normalization", "up_or_down_sampling", "utils"]
