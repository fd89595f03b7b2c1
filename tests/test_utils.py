"""Checkpoint loading: weights_only with score_sde's NumPy scalars (NumPy 1 and 2 names), refusal of code."""

import io
import pickle

import numpy as np
import pytest
import torch
from torch import _weights_only_unpickler

import utils


@pytest.mark.parametrize("module", [b"numpy._core.multiarray", b"numpy.core.multiarray"])
def test_numpy_scalars_of_released_checkpoints_are_accepted(module):
    """score_sde stores np.float64 learning rates in the optimizer state; files from NumPy 1 name the scalar
    constructor numpy.core.multiarray.scalar, NumPy 2 numpy._core.multiarray.scalar."""
    data = pickle.dumps({"lr": np.float64(2e-4)}, protocol=2)
    data = data.replace(b"numpy._core.multiarray", module)
    with torch.serialization.safe_globals(utils._numpy_scalar_globals()):
        loaded = _weights_only_unpickler.Unpickler(io.BytesIO(data), encoding="utf-8").load()
    assert loaded["lr"] == np.float64(2e-4)


class Evil:
    def __reduce__(self):
        return (print, ("this would run",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": Evil()}, path)
    with pytest.raises(RuntimeError, match="Refusing to load"):
        utils.load_checkpoint_file(str(path))


def test_checkpoint_with_numpy_learning_rate_round_trips(tmp_path):
    path = tmp_path / "ckpt.pth"
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters())
    opt.param_groups[0]["lr"] = np.float64(1e-3)  # what score_sde's optimize_fn leaves behind
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 3}, path)
    loaded = utils.load_checkpoint_file(str(path))
    assert loaded["step"] == 3 and float(loaded["optimizer"]["param_groups"][0]["lr"]) == 1e-3


def _adam_run(fused_phases: list, tmp_path) -> list:
    """Train a tiny net for len(fused_phases) phases of 3 Adam steps, saving and restoring a checkpoint between
    phases; phase i builds its optimizer with optim.fused = fused_phases[i]. Returns the final parameters."""
    import ml_collections

    import losses
    from models.ema import ExponentialMovingAverage

    config = ml_collections.ConfigDict(
        dict(optim=dict(optimizer="Adam", lr=1e-2, beta1=0.9, eps=1e-8, weight_decay=0.0, amsgrad=False))
    )
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    data = torch.randn(32, 4)
    path = str(tmp_path / "ckpt.pth")
    for phase, fused in enumerate(fused_phases):
        config.optim.fused = fused
        optimizer = losses.get_optimizer(config, net.parameters())
        state = dict(model=net, optimizer=optimizer, ema=ExponentialMovingAverage(net.parameters(), 0.9), step=0)
        if phase:
            utils.restore_checkpoint(path, state, "cpu")
        assert bool(optimizer.param_groups[0].get("fused")) == fused  # the config's choice, not the checkpoint's
        for _ in range(3):
            optimizer.zero_grad()
            net(data).square().mean().backward()
            optimizer.step()
            state["step"] += 1
        utils.save_checkpoint(path, state)
    return [p.detach().clone() for p in net.parameters()]


def test_fused_adam_matches_the_default_and_checkpoints_cross_over(tmp_path):
    """optim.fused gives the default Adam's parameters to float rounding, and a fused run resumes unfused (and
    vice versa) on the same trajectory: the checkpoint format does not depend on the option."""
    reference = _adam_run([False, False, False], tmp_path / "a")
    for phases in ([True, True, True], [True, False, True], [False, True, False]):
        (tmp_path / str(phases)).mkdir()
        result = _adam_run(phases, tmp_path / str(phases))
        for p, r in zip(result, reference):
            np.testing.assert_allclose(p.numpy(), r.numpy(), rtol=1e-5, atol=1e-6)
        assert not all(torch.equal(p, q) for p, q in zip(result, _initial_params()))


def _initial_params() -> list:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    return [p.detach().clone() for p in net.parameters()]
