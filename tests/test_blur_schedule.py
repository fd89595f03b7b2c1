"""Tests of tools/blur_schedule.py: DCT Gaussian fits, closed-form W2, level selection, schedule file."""

import itertools
import json
import math

import numpy as np
import pytest
import scipy.fft
import scipy.linalg
import torch

from corruption import BlurCorruption, load_schedule_file
from tools import blur_schedule as bs


def _dct_basis(height: int, width: int) -> np.ndarray:
    """Rows: the orthonormal DCT-II basis images (pixel = basis^T coeff), via scipy."""
    eye = np.eye(height * width).reshape(-1, height, width)
    return scipy.fft.idctn(eye, type=2, norm="ortho", axes=(-2, -1)).reshape(height * width, -1)


def _w2_full(mu1, cov1, mu2, cov2) -> float:
    """General Gaussian W2: ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2) (scipy sqrtm)."""
    r1 = scipy.linalg.sqrtm(cov1)
    cross = scipy.linalg.sqrtm(r1 @ cov2 @ r1)
    d2 = np.sum((mu1 - mu2) ** 2) + np.trace(cov1 + cov2 - 2 * np.real(cross))
    return math.sqrt(max(d2, 0.0))


def test_w2_closed_form_matches_general_formula_in_pixel_space():
    rng = np.random.default_rng(0)
    height, width = 4, 5
    basis = _dct_basis(height, width)
    m1, m2 = rng.standard_normal((2, 1, height, width))
    v1, v2 = rng.uniform(0.05, 2.0, (2, 1, height, width))
    ours = bs.w2_diag(*(torch.from_numpy(a) for a in (m1, v1, m2, v2))).item()
    mu1, mu2 = basis.T @ m1.ravel(), basis.T @ m2.ravel()
    cov1 = basis.T @ np.diag(v1.ravel()) @ basis
    cov2 = basis.T @ np.diag(v2.ravel()) @ basis
    assert math.isclose(ours, _w2_full(mu1, cov1, mu2, cov2), rel_tol=1e-6)


def test_blurred_fit_equals_fit_of_blurred_data():
    rng = np.random.default_rng(1)
    images = rng.standard_normal((300, 2, 8, 8)).cumsum(-1) * 0.3  # correlated, non-stationary rows
    mean, var = bs.gaussian_fit_dct(torch.from_numpy(images))
    sigmas = np.array([0.5, 2.0])
    fm, fv = bs.blurred_fit(mean, var, torch.from_numpy(sigmas), noise_std=0.1)
    n = np.arange(8)[:, None]
    m = np.arange(8)[None, :]
    for i, sg in enumerate(sigmas):
        resp = np.exp(-(np.pi**2) * (n**2 + m**2) / 64 * sg**2 / 2)
        blurred = scipy.fft.idctn(
            resp * scipy.fft.dctn(images, norm="ortho", axes=(-2, -1)), norm="ortho", axes=(-2, -1)
        )
        coeffs = scipy.fft.dctn(blurred, norm="ortho", axes=(-2, -1))
        assert np.allclose(fm[i].numpy(), coeffs.mean(0), atol=1e-10)
        assert np.allclose(fv[i].numpy(), coeffs.var(0, ddof=1) + 0.01, atol=1e-10)


def test_equal_increment_levels():
    mean = torch.zeros(1, 8, 8, dtype=torch.float64)
    mean[0, 0, 1] = 1.0
    n = torch.arange(8, dtype=torch.float64)
    var = (1.0 / (1 + n[:, None] ** 2 + n[None, :] ** 2)).unsqueeze(0)
    sched = bs.make_schedule(mean, var, 0.3, 8.0, num_candidates=256, num_levels=12)
    sig = np.array(sched["sigma"])
    assert len(sig) == 12 and math.isclose(sig[0], 0.3, rel_tol=1e-9) and math.isclose(sig[-1], 8.0, rel_tol=1e-9)
    assert np.all(np.diff(sig) > 0)
    steps = np.array(sched["w2_steps"])
    # direct W2 between chosen neighbours is close to the equal share of the path length (fine candidate grid)
    assert steps.max() / steps.min() < 1.1
    assert np.allclose(sched["t"], np.linspace(0, 1, 12))


def test_shortest_path_under_budget_matches_brute_force():
    rng = np.random.default_rng(2)
    num = 8
    pts = np.sort(rng.uniform(0, 3, num))
    pts[0], pts[-1] = 0.0, 3.0
    w2 = torch.from_numpy(np.abs(pts[:, None] - pts[None, :]) * rng.uniform(0.8, 1.2, (num, num)))
    budget = 1.1
    path = bs.shortest_path_under_budget(w2, budget)
    best = None
    inner = range(1, num - 1)
    for k in range(0, num - 1):
        for mid in itertools.combinations(inner, k):
            cand = [0, *mid, num - 1]
            if all(w2[a, b] <= budget for a, b in zip(cand[:-1], cand[1:])):
                best = cand
                break
        if best is not None:
            break
    assert best is not None and len(path) == len(best)
    assert path[0] == 0 and path[-1] == num - 1
    assert all(w2[a, b] <= budget for a, b in zip(path[:-1], path[1:]))
    with pytest.raises(ValueError, match="budget"):
        bs.shortest_path_under_budget(w2, 1e-3)


def test_budget_schedule_keeps_steps_within_budget():
    mean = torch.zeros(1, 6, 6, dtype=torch.float64)
    var = torch.full((1, 6, 6), 0.5, dtype=torch.float64)
    sched = bs.make_schedule(mean, var, 0.3, 6.0, num_candidates=64, budget=0.5)
    assert sched["mode"] == "budget" and max(sched["w2_steps"]) <= 0.5 + 1e-12
    assert len(sched["sigma"]) >= 3


def test_schedule_file_round_trip(tmp_path):
    mean = torch.zeros(3, 8, 8, dtype=torch.float64)
    var = torch.rand(3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.1
    sched = bs.make_schedule(mean, var, 0.5, 10.0, num_candidates=128, num_levels=9)
    path = tmp_path / "sub" / "schedule.json"
    bs.write_schedule(sched, str(path))
    stored = json.loads(path.read_text())
    assert stored["sigma"] == sched["sigma"] and stored["t"] == sched["t"]
    grid_t, grid_sigma = load_schedule_file(str(path))
    assert np.allclose(grid_sigma.numpy(), sched["sigma"]) and np.allclose(grid_t.numpy(), sched["t"])
    corr = BlurCorruption(schedule="file", schedule_file=str(path), noise_min=0.01, noise_max=0.1)
    t = torch.tensor(sched["t"], dtype=torch.float64)
    assert np.allclose(corr.blur_sigma(t).numpy(), sched["sigma"], rtol=1e-12)
    mid = torch.tensor([(sched["t"][2] + sched["t"][3]) / 2], dtype=torch.float64)
    assert math.isclose(corr.blur_sigma(mid).item(), math.sqrt(sched["sigma"][2] * sched["sigma"][3]), rel_tol=1e-9)


def test_main_writes_a_usable_schedule(tmp_path):
    import datasets  # noqa: F401  (the tool reads the dataset through it)

    out = tmp_path / "demo_schedule.json"
    bs.main(
        [
            "blur_schedule",
            "--config=configs/demo_blur.py",
            f"--out={out}",
            "--num_candidates=64",
            "--num_levels=8",
            "--num_batches=2",
        ]
    )
    grid_t, grid_sigma = load_schedule_file(str(out))
    assert grid_t.numel() == 8 and torch.all(torch.diff(grid_sigma) > 0)
