"""UNCSN++ (RVE) + Soft Truncation on CelebA 64 as the paper describes it: ve/CELEBA/uncsnpp_st with the bounded
noise embedding u(sigma) in use and tau ~ P_k, k = 2, drawn for the reciprocal VE SDE (train it anew)."""

from configs.presets import uncsnpp_rve
from configs.ve.CELEBA import uncsnpp_st


def get_config():
    return uncsnpp_rve(uncsnpp_st.get_config())
