"""Tests for tools/stf_variance.py: DSM trace against a quadrature closed form, STF variance reduction
(intermediate regime, ~1/n far from the data, never above DSM), STF conditional unbiasedness (exact
enumeration and Monte Carlo) and the O(1/n) bias of i.i.d. references without the own source."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import integrate

import stf
from tools import stf_variance as sv


@pytest.fixture(scope="module")
def mixture_stats():
    """A small Gaussian mixture (48 points, 4 modes, dim 4): statistics at 4 noise levels, n in {1, 8, 64}."""
    data = sv.make_gaussian_mixture(48, 4, num_modes=4, spread=0.15, seed=1)
    sigmas = [0.03, 0.3, 1.0, 30.0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny products: threads only add overhead on a shared CPU
    try:
        return sv.target_statistics(data, sigmas, [1, 8, 64], num_xt=64, num_mc=64, seed=0)
    finally:
        torch.set_num_threads(threads)


def test_dsm_trace_matches_two_point_closed_form():
    """Data {-a e1, a e1}: tr Cov[z | x_t] / D = E[4 a^2 p (1-p)] / (sigma^2 D), p = sigmoid(2au/sigma^2)."""
    a, dim, num_xt = 1.0, 2, 20000
    data = torch.tensor([[-a, 0.0], [a, 0.0]], dtype=torch.float64)
    for sigma in (0.5, 1.0, 2.0):

        def integrand(u, sigma=sigma):
            p = 1 / (1 + math.exp(-2 * a * u / sigma**2))
            density = math.exp(-((u - a) ** 2) / (2 * sigma**2)) / math.sqrt(2 * math.pi * sigma**2)
            return density * 4 * a**2 * p * (1 - p) / sigma**2 / dim

        expected, _ = integrate.quad(integrand, a - 12 * sigma, a + 12 * sigma)
        got = sv.target_statistics(data, [sigma], [], num_xt=num_xt, num_mc=2, seed=3)["dsm_trace"][0]
        # per-x_t values lie in [0, a^2 / (sigma^2 D)]: standard error <= a^2 / (2 sigma^2 D sqrt(M)); 5 SE
        tol = 5 * a**2 / (2 * sigma**2 * dim * math.sqrt(num_xt))
        assert abs(float(got) - expected) < tol, (sigma, float(got), expected)


def test_single_reference_reproduces_dsm(mixture_stats):
    """n = 1 (own source only): the Monte Carlo STF trace estimates the closed-form DSM trace (15%)."""
    dsm, stf1 = mixture_stats["dsm_trace"], mixture_stats["stf_trace"][0]
    for s in range(1, 4):  # sigma = 0.03 is degenerate (trace ~ 0)
        assert abs(float(stf1[s] / dsm[s]) - 1) < 0.15


def test_stf_reduces_variance(mixture_stats):
    """Intermediate sigma: STF(8) < 0.7 DSM, STF(64) < 0.5 STF(8); STF <= DSM everywhere (Rao-Blackwell)."""
    dsm, tr = mixture_stats["dsm_trace"], mixture_stats["stf_trace"]
    peak = int(torch.argmax(dsm))
    assert mixture_stats["sigma"][peak] in (0.3, 1.0)  # the peak is in the intermediate regime
    for s in (1, 2):
        assert tr[1, s] < 0.7 * dsm[s]
        assert tr[2, s] < 0.5 * tr[1, s]
    assert torch.all(tr <= 1.15 * dsm[None] + 1e-9)


def test_far_from_data_reduction_is_one_over_n(mixture_stats):
    """sigma = 30 >> data spread: the weights are near uniform and STF / DSM ~ 1/n (25%)."""
    dsm, tr = mixture_stats["dsm_trace"][3], mixture_stats["stf_trace"][:, 3]
    for k, n in enumerate((1, 8, 64)):
        assert abs(float(tr[k] / dsm) * n - 1) < 0.25


def test_stf_is_unbiased_and_iid_references_are_not(mixture_stats):
    """STF squared bias = 0 within 4 SE (every sigma, n); without the own source the bias shrinks with n."""
    b2, se = mixture_stats["stf_bias2"], mixture_stats["stf_bias2_se"]
    assert torch.all(b2.abs() < 4 * se + 1e-9)
    iid, iid_se = mixture_stats["iid_bias2"], mixture_stats["iid_bias2_se"]
    for s in (0, 1):  # small and intermediate sigma (n = 1 here is a random reference without the source)
        assert iid[0, s] > iid[1, s] > iid[2, s]
        assert torch.all(iid[:2, s] > 3 * iid_se[:2, s])
    assert iid[2, 0] > 4 * iid_se[2, 0]


def test_stf_conditional_mean_is_exact_by_enumeration():
    """E[xbar_w | x_t] over own ~ posterior and n - 1 uniform references = the posterior mean (enumerated)."""
    rng = np.random.default_rng(0)
    data = rng.normal(size=(4, 3))
    for sigma in (0.3, 1.0):
        x_t = data[1] + sigma * rng.normal(size=3)
        log_p = -((x_t - data) ** 2).sum(1) / (2 * sigma**2)
        post = np.exp(log_p - log_p.max())
        post /= post.sum()
        mu = post @ data
        for n in (2, 3):
            expected = np.zeros(3)
            own = torch.tensor(data, dtype=torch.float32)
            for extras in itertools.product(range(len(data)), repeat=n - 1):
                ref = torch.tensor(data[list(extras)], dtype=torch.float32)
                x = torch.tensor(x_t, dtype=torch.float32).expand(len(data), 3)
                xbar = stf.stf_x0_target(x, 1.0, sigma, ref, own_source=own).double().numpy()  # [own, 3]
                expected += post @ xbar / len(data) ** (n - 1)
            np.testing.assert_allclose(expected, mu, atol=1e-5)


def test_main_writes_table_and_plot(tmp_path, capsys):
    out = tmp_path / "plot.png"
    args = ["--num_data", "32", "--gmm_dim", "4", "--ns", "1", "4", "--num_xt", "8", "--num_mc", "4"]
    stats = sv.main([*args, "--sigmas", "0.1", "1.0", "--out", str(out)])
    assert out.stat().st_size > 1000
    assert stats["stf_trace"].shape == (2, 2)
    text = capsys.readouterr().out
    assert "DSM tr/D" in text and "n=4" in text


def test_main_on_shapes_config(tmp_path, capsys):
    """The SHAPES demo training set through datasets.py (the path used for CIFAR-10 too)."""
    out = tmp_path / "shapes.png"
    args = ["--config", "configs/demo.py", "--num_data", "64", "--ns", "4", "--num_xt", "4", "--num_mc", "3"]
    stats = sv.main([*args, "--sigmas", "1.0", "--out", str(out)])
    assert out.is_file() and stats["dsm_trace"].shape == (1,)
    assert "SHAPES" in capsys.readouterr().out


def test_bad_arguments():
    data = torch.randn(8, 2)
    with pytest.raises(ValueError, match="num_mc"):
        sv.target_statistics(data, [1.0], [2], num_mc=1)
    with pytest.raises(ValueError, match="reference batch sizes"):
        sv.target_statistics(data, [1.0], [0])
    with pytest.raises(FileNotFoundError, match="config file"):
        sv.load_config("configs/does_not_exist.py")
