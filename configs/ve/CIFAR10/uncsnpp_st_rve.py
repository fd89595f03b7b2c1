"""UNCSN++ (RVE) + Soft Truncation on CIFAR-10 as the paper describes it: ve/CIFAR10/uncsnpp_st with the bounded
noise embedding u(sigma) in use and tau ~ P_k, k = 2, drawn for the reciprocal VE SDE (train it anew: its
network is not the released checkpoint's)."""

from configs.presets import uncsnpp_rve
from configs.ve.CIFAR10 import uncsnpp_st


def get_config():
    return uncsnpp_rve(uncsnpp_st.get_config())
