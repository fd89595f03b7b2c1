"""Tests for tools/plot_loss_integrand.py.

Closed form used below (derived here, independent of the tool): data x0 ~ N(mu, s^2 I),
x_t = alpha x0 + sigma z, so p_t = N(alpha mu, V I) with V = alpha^2 s^2 + sigma^2 and exact score
s(x) = -(x - alpha mu) / V. Writing x0 = mu + s w,
sigma s(x_t) + z = -(alpha s sigma / V) w + (alpha^2 s^2 / V) z, whose per-dimension second moment is
alpha^2 s^2 sigma^2 / V^2 + alpha^4 s^4 / V^2 = r := alpha^2 s^2 / V. Hence
    E ||s + z/sigma||^2 / D = alpha^2 s^2 / (sigma^2 V) = 1/sigma^2 - 1/(alpha^2 s^2 + sigma^2),
    integrand(t) = (g^2 / 2) (1/sigma^2 - 1/(alpha^2 s^2 + sigma^2)),
and ||sigma s + z||^2 / D is r chi^2_D / D (relative std sqrt(2/D)). For a mis-scaled score c s,
sigma c s + z = c (sigma s + z) + (1 - c) z with E[(sigma s + z) . z] / D = 1 - sigma^2 / V = r, so
E ||sigma c s + z||^2 / D = r (2c - c^2) + (1 - c)^2.
"""

import math
import os

import numpy as np
import pytest
import torch

import sde_lib
from tools import plot_loss_integrand as pli

F64 = torch.float64
MU, S = 0.5, 0.4


pytestmark = pytest.mark.usefixtures("single_thread")


def np_coeffs(name, t):
    """alpha, sigma, g^2 from papers.md section 1 (NumPy)."""
    t = np.asarray(t, dtype=np.float64)
    if name == "vp":
        b0, b1 = 0.1, 20.0
        B = b0 * t + (b1 - b0) * t**2 / 2
        return np.exp(-B / 2), np.sqrt(1 - np.exp(-B)), b0 + t * (b1 - b0)
    if name == "ve":
        smin, smax = 0.01, 50.0
        sigma = smin * (smax / smin) ** t
        return np.ones_like(t), sigma, 2 * sigma**2 * np.log(smax / smin)
    raise ValueError(name)


def exact_gaussian_score(sde):
    def score_fn(x, t):
        a = sde.alpha(t).reshape(-1, 1, 1, 1)
        std = sde.marginal_std(t).reshape(-1, 1, 1, 1)
        return -(x - a * MU) / (a**2 * S**2 + std**2)

    return score_fn


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_gaussian_integrand_matches_closed_form(name):
    """2000 samples x 2 noise draws, D = 4: estimate within 5 standard errors (5.6%) of the closed form."""
    sde = sde_lib.VPSDE() if name == "vp" else sde_lib.VESDE()
    gen = torch.Generator().manual_seed(0)
    x0 = MU + S * torch.randn(2000, 1, 2, 2, generator=gen, dtype=F64)
    ts = torch.tensor([1e-4, 1e-2, 0.1, 0.4, 0.9], dtype=F64)
    est, sem = pli.loss_integrand(exact_gaussian_score(sde), sde, x0, ts, n_noise=2, generator=gen, return_sem=True)
    alpha, sigma, g2 = np_coeffs(name, ts.numpy())
    expected = g2 / 2 * (1 / sigma**2 - 1 / (alpha**2 * S**2 + sigma**2))
    # The analytic standard error: expected * sqrt(2 / D) / sqrt(n) with n = 4000 residuals, D = 4.
    se = expected * math.sqrt(2 / 4) / math.sqrt(4000)
    np.testing.assert_allclose(sem.numpy(), se, rtol=0.15)
    assert np.all(np.abs(est.numpy() - expected) < 5 * se), (est.numpy(), expected)
    # The integrand spans orders of magnitude over t (the imbalance the tool is meant to show).
    assert expected[0] / expected[-1] > 100


def test_mis_scaled_score_closed_form():
    """Score 0.8 s: the estimate matches r (2c - c^2) + (1 - c)^2 (times g^2 / (2 sigma^2)) within 5 standard
    errors and is far (> 10 standard errors) from the exact-score value."""
    sde = sde_lib.VPSDE()
    gen = torch.Generator().manual_seed(1)
    x0 = MU + S * torch.randn(2000, 1, 2, 2, generator=gen, dtype=F64)
    ts = torch.tensor([0.3, 0.6], dtype=F64)
    good = exact_gaussian_score(sde)
    c = 0.8
    est, sem = pli.loss_integrand(lambda x, t: c * good(x, t), sde, x0, ts, n_noise=2, generator=gen, return_sem=True)
    alpha, sigma, g2 = np_coeffs("vp", ts.numpy())
    r = alpha**2 * S**2 / (alpha**2 * S**2 + sigma**2)
    expected = g2 / (2 * sigma**2) * (r * (2 * c - c**2) + (1 - c) ** 2)
    exact = g2 / (2 * sigma**2) * r
    assert np.all(np.abs(est.numpy() - expected) < 5 * sem.numpy()), (est, expected)
    assert np.all(np.abs(est.numpy() - exact) > 10 * sem.numpy())


def test_cumulative_share_closed_forms():
    eps, T = 1e-5, 1.0
    ts = pli.log_time_grid(eps, T, 50)
    assert ts[0].item() == pytest.approx(eps) and ts[-1].item() == pytest.approx(T)
    # integrand 1/t: int_eps^t ds/s = log(t/eps), trapezoid in log t is exact.
    share = pli.cumulative_share(ts, 1 / ts)
    np.testing.assert_allclose(share.numpy(), np.log(ts.numpy() / eps) / np.log(T / eps), atol=1e-12)
    # constant integrand: share (t - eps) / (T - eps); trapezoid error on 50 log-spaced points below 1e-2.
    share = pli.cumulative_share(ts, torch.ones_like(ts))
    np.testing.assert_allclose(share.numpy(), (ts.numpy() - eps) / (T - eps), atol=1e-2)
    assert pli.share_quantile(ts, share, 0.5) == pytest.approx(0.5, rel=0.3)


def test_st_weighting_is_expected_truncated_loss():
    """Soft Truncation theorem: E_tau int_tau^T v dt = int_eps^T v F_k dt; for v = 1/t and k = 1 both are
    log(T/eps) / 2 (log tau uniform). Checks st_weighted and a Monte Carlo over tau draws."""
    eps, T = 1e-5, 1.0
    ts = pli.log_time_grid(eps, T, 400)
    v = 1 / ts
    weighted = pli.st_weighted(ts, v, 1.0, eps, T)
    f = weighted * ts
    integral = float((0.5 * (f[1:] + f[:-1]) * torch.diff(torch.log(ts))).sum())
    assert integral == pytest.approx(math.log(T / eps) / 2, rel=1e-4)
    tau = sde_lib.sample_truncation_time(1.0, eps, size=(20000,), generator=torch.Generator().manual_seed(0))
    mc = torch.log(T / tau.double()).mean().item()  # int_tau^T dt / t
    assert mc == pytest.approx(math.log(T / eps) / 2, rel=0.02)  # MC s.e. about 0.4%
    with pytest.raises(ValueError):
        pli.log_time_grid(0.0, 1.0, 10)


def test_table_and_plot(tmp_path):
    sde = sde_lib.VPSDE()
    x0 = MU + S * torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    res = pli.analyse(exact_gaussian_score(sde), sde, x0, 1e-4, 6, 1, [1.0, 2.0], torch.Generator().manual_seed(1))
    table = pli.format_table(res["ts"], res["sigmas"], res["values"], res["sems"], res["shares"])
    assert len(table.splitlines()) == 2 + 6 and "k=2" in table
    assert "50% of the loss" in pli.summary(res)
    out = tmp_path / "sub" / "integrand.png"
    pli.plot(res["ts"], res["values"], res["curves"], res["shares"], str(out), "test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_find_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        pli.find_checkpoint(str(tmp_path))
    (tmp_path / "checkpoints-meta").mkdir()
    (tmp_path / "checkpoints-meta" / "checkpoint.pth").write_bytes(b"x")
    assert pli.find_checkpoint(str(tmp_path)).endswith(os.path.join("checkpoints-meta", "checkpoint.pth"))
    (tmp_path / "checkpoints").mkdir()
    for n in (2, 10, 3):
        (tmp_path / "checkpoints" / f"checkpoint_{n}.pth").write_bytes(b"x")
    assert pli.find_checkpoint(str(tmp_path)).endswith("checkpoint_10.pth")


def test_main_end_to_end(tmp_path):
    """Tiny demo-config model saved as a checkpoint, then the full CLI (config + checkpoint + SHAPES data)."""
    import utils
    from models import utils as mutils
    from models.ema import ExponentialMovingAverage

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config_path = os.path.join(root, "configs", "demo.py")
    config = pli.load_config(config_path)
    config.device = torch.device("cpu")
    torch.manual_seed(0)
    model = mutils.create_model(config)
    ema = ExponentialMovingAverage(model.parameters(), decay=config.model.ema_rate)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    ckpt = tmp_path / "ckpt.pth"
    utils.save_checkpoint(str(ckpt), dict(optimizer=opt, model=model, ema=ema, step=7))
    out = tmp_path / "integrand.png"
    argv = ["--config", config_path, "--checkpoint", str(ckpt), "--out", str(out), "--num_t", "3"]
    argv += ["--batch", "2", "--n_noise", "1", "--device", "cpu", "--ks", "1"]
    res = pli.main(argv)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["values"].shape == (3,) and torch.isfinite(res["values"]).all() and (res["values"] > 0).all()
    with pytest.raises(FileNotFoundError, match="--checkpoint"):
        pli.main(["--config", config_path, "--checkpoint", str(tmp_path / "missing.pth"), "--device", "cpu"])
