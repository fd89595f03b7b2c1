"""DDPM++ (VP, NLL) + Soft Truncation + Stable Target Field on CIFAR-10: vp/CIFAR10/ddpmpp_nll_st (k = 1,
importance-sampled likelihood weighting) with the STF noise target in place of DSM's. STF changes only the
target, so ST's random truncation and the importance sampling of t are unchanged.

Reference batch: 4096 per rank (the STF code's default; its released checkpoints used 1024 per GPU).
"""

from configs.vp.CIFAR10 import ddpmpp_nll_st


def get_config():
    config = ddpmpp_nll_st.get_config()
    config.training.stf = True
    config.training.stf_ref_batch_size = 4096
    config.training.stf_gather = False
    return config
