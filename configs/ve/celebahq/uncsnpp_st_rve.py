"""UNCSN++ (RVE) + Soft Truncation on CelebA-HQ 256 as the paper describes it: ve/celebahq/uncsnpp_st with the
reciprocal VE SDE its name promises (s_min kept at the file's 0.01), the bounded noise embedding u(sigma) in use and
tau ~ P_k, k = 2, really drawn (train it anew: the released run is ve/celebahq/uncsnpp_st)."""

from configs.presets import uncsnpp_rve
from configs.ve.celebahq import uncsnpp_st


def get_config():
    return uncsnpp_rve(uncsnpp_st.get_config())
