"""The embedded demo (configs/demo.py: small DDPM++, VP SDE, Soft Truncation, SHAPES 16x16) with the Stable
Target Field noise target.

Reference batch: 1024 images (the minibatch of 64 plus 960 random training images per step), a quarter of the
SHAPES training set; at 16x16 the weights cost a 64 x 768 x 1024 product, negligible next to the network.
"""

from configs import demo


def get_config():
    config = demo.get_config()
    config.training.stf = True
    config.training.stf_ref_batch_size = 1024
    config.training.stf_gather = False
    return config
