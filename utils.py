"""Checkpoint saving and restoring with score_sde_pytorch's file format.

A checkpoint is a dict {'optimizer': optimizer state_dict, 'model': model state_dict with the 'module.' prefix of
score_sde's DataParallel wrapper, 'ema': {'decay', 'num_updates', 'shadow_params'}, 'step': int}, plus optional
extra entries this project adds ('rng': random-number-generator states for exact resume, 'corruption': the fitted
state of a non-Gaussian corruption). Files written by score_sde_pytorch or the Soft Truncation repository load here,
and files written here load there.
"""

import logging
import os
import random
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

MODULE_PREFIX = "module."


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The network inside a DataParallel / DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def to_original_keys(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Model state_dict in score_sde's on-disk form: every key prefixed with 'module.'."""
    return {(k if k.startswith(MODULE_PREFIX) else MODULE_PREFIX + k): v for k, v in state_dict.items()}


def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Model state_dict without the 'module.' prefix (accepts both forms)."""
    return {(k[len(MODULE_PREFIX) :] if k.startswith(MODULE_PREFIX) else k): v for k, v in state_dict.items()}


def load_model_state_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a model state_dict (with or without 'module.' prefixes) strictly; on mismatch, name every bad key."""
    net = _unwrap(model)
    loaded = strip_module_prefix(state_dict)
    expected = net.state_dict()
    missing = [k for k in expected if k not in loaded]
    unexpected = [k for k in loaded if k not in expected]
    wrong_shape = [
        f"{k}: checkpoint {tuple(loaded[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in loaded and tuple(loaded[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong_shape:

        def head(items: list) -> str:
            return ", ".join(items[:10]) + (f" ... (+{len(items) - 10} more)" if len(items) > 10 else "")

        raise RuntimeError(
            f"The checkpoint {source} does not match the model built from this config "
            f"({len(missing)} missing keys, {len(unexpected)} unexpected keys, {len(wrong_shape)} shape mismatches).\n"
            f"  missing: {head(missing)}\n  unexpected: {head(unexpected)}\n  shape: {head(wrong_shape)}\n"
            "It was most likely written for another architecture: use the config file the checkpoint was trained "
            "with (model.name, nf, ch_mult, num_res_blocks, embedding_type, ... must agree)."
        )
    net.load_state_dict(loaded, strict=True)


def get_rng_state() -> dict:
    """States of every random number generator a training step uses (torch CPU/CUDA, NumPy, Python)."""
    state = {"torch": torch.get_rng_state(), "numpy": _numpy_state_to_tensors(np.random.get_state())}
    state["python"] = torch.tensor(list(random.getstate()[1]), dtype=torch.int64)
    state["python_pos"] = torch.tensor(random.getstate()[2] or -1)
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what get_rng_state saved (missing entries are left alone)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    if "numpy" in state:
        np.random.set_state(_numpy_state_from_tensors(state["numpy"]))
    if "python" in state:
        pos = int(state["python_pos"])
        random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None if pos == -1 else pos))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(state["cuda"].cpu().to(torch.uint8)))


def _numpy_state_to_tensors(np_state: tuple) -> dict:
    """NumPy's legacy RNG state as tensors (so the checkpoint loads with weights_only=True)."""
    return {
        "keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "pos": torch.tensor(np_state[2]),
        "has_gauss": torch.tensor(np_state[3]),
        "cached_gaussian": torch.tensor(np_state[4], dtype=torch.float64),
    }


def _numpy_state_from_tensors(t: Mapping[str, torch.Tensor]) -> tuple:
    return (
        "MT19937",
        t["keys"].numpy().astype(np.uint32),
        int(t["pos"]),
        int(t["has_gauss"]),
        float(t["cached_gaussian"]),
    )


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename: a kill never leaves a torn file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=".tmp-", suffix=".pth", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def _numpy_scalar_globals() -> list:
    """NumPy scalar reconstruction (data only, no code): score_sde's optimizer state holds np.float64 learning
    rates, so its released checkpoints need these under weights_only=True. Both module names (NumPy 1 and 2)."""
    scalar = np.core.multiarray.scalar if not hasattr(np, "_core") else np._core.multiarray.scalar
    entries = [
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
    ]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        entries += [
            getattr(dtypes, name) for name in ("Float64DType", "Float32DType", "Int64DType") if hasattr(dtypes, name)
        ]
    return entries


def load_checkpoint_file(path: str, device: torch.device | str = "cpu") -> dict:
    """torch.load with weights_only=True (a checkpoint never runs code); clear errors for bad files."""
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            loaded = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        if "Unsupported global" in str(err):
            raise RuntimeError(
                f"Refusing to load {path}: it contains Python objects beyond tensors and numbers, which "
                f"torch.load(weights_only=True) will not execute ({str(err).splitlines()[-2:]}). Re-save it with "
                "tensors only, or check where the file came from."
            ) from err
        raise RuntimeError(
            f"Cannot read the checkpoint {path}: {type(err).__name__}: {err}. The file is corrupt, truncated, or not "
            "a PyTorch checkpoint made of tensors; restore it from a copy or delete it to start from the previous "
            "checkpoint."
        ) from err
    if not isinstance(loaded, dict) or "model" not in loaded:
        raise RuntimeError(
            f"{path} is not a score_sde checkpoint: expected a dict with keys optimizer / model / ema / step."
        )
    return loaded


# Param-group entries that choose how the optimizer computes (kernels), not what it computes: they follow the
# optimizer built from the current config, not the checkpoint (a fused run resumes unfused and vice versa).
IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]) -> None:
    """optimizer.load_state_dict(saved), keeping the current optimizer's implementation choices."""
    chosen = [{k: g[k] for k in IMPLEMENTATION_KEYS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, keys in zip(optimizer.param_groups, chosen):
        for key in IMPLEMENTATION_KEYS:
            if key in keys:
                group[key] = keys[key]
            else:
                group.pop(key, None)


def restore_checkpoint(ckpt_dir: str, state: dict, device: torch.device | str) -> dict:
    """Load the checkpoint file `ckpt_dir` into `state` (score_sde's signature; the argument is a file path).

    A missing file leaves `state` unchanged (with a warning), which starts training from scratch. The model is
    loaded strictly: any missing, unexpected or mis-shaped key raises with the list of keys.
    """
    if not os.path.exists(ckpt_dir):
        os.makedirs(os.path.dirname(os.path.abspath(ckpt_dir)), exist_ok=True)
        logging.warning("No checkpoint found at %s. Returned the same state as input", ckpt_dir)
        return state
    loaded = load_checkpoint_file(ckpt_dir, device)
    load_model_state_strict(state["model"], loaded["model"], ckpt_dir)
    if state.get("ema") is not None and "ema" in loaded:
        state["ema"].load_state_dict(loaded["ema"])
    if state.get("optimizer") is not None and "optimizer" in loaded:
        load_optimizer_state(state["optimizer"], loaded["optimizer"])
    state["step"] = int(loaded["step"])
    for key in ("rng", "corruption"):
        if key in loaded:
            state[key] = loaded[key]
    if state.get("grad_scaler") is not None and loaded.get("grad_scaler"):
        state["grad_scaler"].load_state_dict(loaded["grad_scaler"])
        state["amp_skipped_steps"] = int(loaded.get("amp_skipped_steps", 0))
    return state


def save_checkpoint(ckpt_dir: str, state: dict) -> None:
    """Write `state` to the file `ckpt_dir` atomically in score_sde's format (extra keys kept if present)."""
    saved_state = {
        "optimizer": state["optimizer"].state_dict(),
        "model": to_original_keys(_unwrap(state["model"]).state_dict()),
        "ema": state["ema"].state_dict(),
        "step": int(state["step"]),
    }
    for key in ("rng", "corruption"):
        if state.get(key) is not None:
            saved_state[key] = state[key]
    if state.get("grad_scaler") is not None:  # training.precision = 'fp16': the dynamic loss scale (numbers only)
        saved_state["grad_scaler"] = state["grad_scaler"].state_dict()
        saved_state["amp_skipped_steps"] = int(state.get("amp_skipped_steps", 0))
    atomic_torch_save(saved_state, ckpt_dir)
