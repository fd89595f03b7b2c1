"""Make the repository root importable (the project is a set of top-level modules, like score_sde)."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Reference data produced from the original code, kept in the repository (tests/data/README.md says what each file is).
DATA_DIR = os.path.join(ROOT, "tests", "data")
VECTORS_DIR = os.path.join(DATA_DIR, "vectors")

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# No test reaches the internet: datasets / Inception weights are never downloaded (datasets.downloads_enabled);
# tests/test_downloads.py lifts this for its own 127.0.0.1 server. Inherited by the subprocesses tests start.
os.environ["SCORE_SDE_OFFLINE"] = "1"


@pytest.fixture(scope="module")
def single_thread():
    """Small tensors: one intra-op thread avoids spin-wait contention on the shared CPU (restored afterwards).
    A module opts in with pytestmark = pytest.mark.usefixtures("single_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------------------------
# Shared builders: the four SDEs and a tiny training config (imported by the test modules: `from conftest import ...`)

SDE_NAMES = ("vp", "subvp", "ve", "rve")


def make_sde(name: str, N: int = 1000, sigma_max: float = 50.0):
    """(sde, sampling eps) of the four SDEs with score_sde's parameters (VE sigma_min 0.01; RVE sigma_min 1e-3 and
    eps 1e-5, sampled down to its eps); sigma_max for VE / RVE."""
    import sde_lib

    if name == "vp":
        return sde_lib.VPSDE(beta_min=0.1, beta_max=20.0, N=N), 1e-3
    if name == "subvp":
        return sde_lib.subVPSDE(beta_min=0.1, beta_max=20.0, N=N), 1e-3
    if name == "ve":
        return sde_lib.VESDE(sigma_min=0.01, sigma_max=sigma_max, N=N), 1e-5
    if name == "rve":
        return sde_lib.RVESDE(sigma_min=1e-3, sigma_max=sigma_max, N=N, eps=1e-5), 1e-5
    raise ValueError(f"unknown SDE {name!r}; valid: {SDE_NAMES}")


def tiny_config(**training):
    """A DDPM++ with Soft Truncation and importance sampling on 8x8 SHAPES, 4 steps: run_lib in seconds."""
    from configs.default_cifar10_configs import get_default_configs
    from configs.presets import set_ddpmpp

    config = set_ddpmpp(get_default_configs())
    config.device = torch.device("cpu")
    config.data.dataset = "SHAPES"
    config.data.image_size = 8
    config.data.num_train = 64
    config.data.num_eval = 16
    model = config.model
    model.nf = 8
    model.ch_mult = (1, 2)
    model.num_res_blocks = 1
    model.attn_resolutions = (4,)
    model.dropout = 0.0
    config.training.batch_size = 8
    config.eval.batch_size = 8
    config.training.n_iters = 4
    config.training.log_freq = 1
    config.training.eval_freq = 2
    config.training.snapshot_freq = 2
    config.training.snapshot_freq_for_preemption = 1
    config.training.snapshot_sampling = False
    config.training.st = True
    config.training.k = 1.0
    config.training.importance_sampling = True
    config.optim.warmup = 2
    config.optim.lr = 1e-3
    for key, value in training.items():
        config.training[key] = value
    return config


class ExactScore:
    """A stand-in parametrisation around a known score function: score = score_fn, denoise by Tweedie."""

    def __init__(self, corruption, score_fn):
        self.corruption = corruption
        self.score = score_fn

    def denoise(self, x, t):
        from parametrization import tweedie_denoise

        return tweedie_denoise(self.corruption, self.score, x, t)

    def __call__(self, x, t):
        return self.score(x, t)


def use_exact_score(monkeypatch, score_fn=None):
    """Samplers, losses and likelihoods called with any model see score_fn as the network's score (score_fn None:
    the model's own .score method)."""
    import parametrization

    def make(corruption, model):
        return ExactScore(corruption, score_fn if score_fn is not None else model.score)

    monkeypatch.setattr(
        parametrization, "get_parametrization", lambda corruption, model, *a, **k: make(corruption, model)
    )
    monkeypatch.setattr(
        parametrization,
        "get_parametrization_factory",
        lambda corruption, *a, **k: lambda model, train=False: make(corruption, model),
    )
