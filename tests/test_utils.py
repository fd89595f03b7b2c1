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
