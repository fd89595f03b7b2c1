"""Pipeline checks of the experiments/ scripts in their --quick mode (seconds): a run writes valid JSON with the
expected keys and a figure. They do not check the papers' effects; the full runs (about 30-45 min each on a
2-core CPU) and what they measured are in the README's Evidence section."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from experiments import soft_truncation, stable_target_field
from experiments.common import dct_fd, mean_std

pytestmark = pytest.mark.usefixtures("single_thread")


def check_stat(stat: dict, n: int) -> None:
    """A {'mean', 'std', 'values'} summary of n finite per-seed values, consistent with them."""
    assert set(stat) == {"mean", "std", "values"}
    assert len(stat["values"]) == n and all(math.isfinite(v) for v in stat["values"])
    assert stat["mean"] == pytest.approx(float(np.mean(stat["values"])))


def check_png(path: str) -> None:
    """A readable PNG of a sensible size."""
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 100


def test_soft_truncation_quick(tmp_path):
    """--quick writes soft_truncation.json (three variants, bpd and DCT-FD summaries) and the figure."""
    out = tmp_path / "out"
    payload = soft_truncation.main(["--quick", "--out", str(out), "--workdir", str(tmp_path / "runs")])
    with open(out / "soft_truncation.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(payload))
    assert saved["experiment"] == "soft_truncation" and saved["complete"] and saved["protocol"]["quick"]
    assert set(saved["variants"]) == {"lw_is", "lw_is_st", "variance"}
    assert saved["variants"]["lw_is_st"]["training"]["st"] is True
    for v in saved["variants"].values():
        check_stat(v["bpd"], 1)
        check_stat(v["dct_fd"], 1)
        row = v["per_seed"][0]
        assert {"seed", "bpd", "dct_fd", "train_seconds", "eval_seconds", "sampler_nfe"} <= set(row)
        assert row["sampler_nfe"] == saved["protocol"]["sampler_steps"]
        assert 0.0 < row["bpd"] < 30.0 and row["dct_fd"] > 0.0
    assert saved["floor_dct_fd"] > 0.0
    check_png(out / "soft_truncation.png")


def test_stable_target_field_quick(tmp_path):
    """--quick writes stable_target_field.json (DSM and STF, loss variances, DCT-FD, loss curves) and the figure."""
    out = tmp_path / "out"
    stable_target_field.main(["--quick", "--out", str(out), "--workdir", str(tmp_path / "runs")])
    with open(out / "stable_target_field.json") as f:
        saved = json.load(f)
    assert saved["experiment"] == "stable_target_field" and saved["complete"]
    assert set(saved["variants"]) == {"dsm", "stf"}
    assert saved["variants"]["stf"]["training"]["stf"] is True
    assert saved["variants"]["stf"]["training"]["stf_ref_batch_size"] == saved["protocol"]["stf_ref_batch_size"]
    for v in saved["variants"].values():
        for key in ("dct_fd", "loss_var_second_half", "loss_var_detrended", "loss_mean_second_half"):
            check_stat(v[key], 1)
        losses = v["per_seed"][0]["losses"]
        assert len(losses) == saved["protocol"]["n_iters"] and all(x > 0 for x in losses)
    check_stat(saved["stf_over_dsm_detrended_loss_variance"], 1)
    check_png(out / "stable_target_field.png")


def test_detrended_variance_and_summaries():
    """The loss-variance statistic removes a trend (a ramp has zero detrended variance; white noise keeps
    1 - 1/w of its variance, the moving average containing the sample itself), mean_std uses ddof = 1, and
    DCT-FD is 0 between a set and itself and ||shift||^2 for a constant shift (orthonormal DCT: a shift of c
    moves each channel's DC coefficient by c H = 0.5 * 16, so FD = 3 * 8^2 = 192)."""
    ramp = np.linspace(10.0, 1.0, 200)
    assert stable_target_field.detrended_variance(ramp, 25) == pytest.approx(0.0, abs=1e-20)
    noise = np.random.default_rng(0).normal(size=20000)
    assert stable_target_field.detrended_variance(noise, 25) == pytest.approx(1.0 - 1.0 / 25, rel=0.03)
    s = mean_std([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == pytest.approx(1.0)
    import torch

    x = torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert dct_fd(x, x) == pytest.approx(0.0, abs=1e-8)
    assert dct_fd(x, x + 0.5) == pytest.approx(192.0, rel=1e-6)
