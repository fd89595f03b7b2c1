"""Score networks (score_sde_pytorch's model package): importing it registers 'ncsnpp', 'ddpm', 'ncsn',
'ncsnv2_64', 'ncsnv2_128' and 'ncsnv2_256'."""

from . import ddpm, ema, layers, layerspp, ncsnpp, ncsnv2, normalization, up_or_down_sampling, utils

__all__ = ["ddpm", "ema", "layers", "layerspp", "ncsnpp", "ncsnv2", "normalization", "up_or_down_sampling", "utils"]
