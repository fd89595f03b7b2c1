"""NCSN++ (VE) + Soft Truncation on CIFAR-10 as the paper describes it: ve/CIFAR10/ncsnpp_st with tau ~ P_k,
k = 2, really drawn for the VE SDE (the released run trained on the fixed [eps, 1])."""

from configs.presets import st_for_ve
from configs.ve.CIFAR10 import ncsnpp_st


def get_config():
    return st_for_ve(ncsnpp_st.get_config())
