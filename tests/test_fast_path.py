"""The fast-path options (training.precision, channels_last, grad_checkpoint, compile, optim.fused, eval.precision)
against the fp32 eager path on a small model, with stated tolerances; checkpoints across options."""

import copy
import os

import pytest
import torch

import losses
import run_lib
import sampling
from configs import demo
from configs.defaults import complete_config
from models import utils as mutils
from utils import restore_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")


def small_config(sde: str = "vpsde", **training):
    """The demo's DDPM++ at 8x8, nf 16, dropout on (so that activation checkpointing must replay it)."""
    config = demo.get_config()
    config.device = torch.device("cpu")
    config.data.image_size = 8
    config.model.nf = 16
    config.model.ch_mult = (1, 2)
    config.model.attn_resolutions = (4,)
    config.model.dropout = 0.1
    config.model.num_scales = 20
    config.training.sde = sde
    config.training.batch_size = 8
    config.sampling.batch_size = 4
    if sde != "vpsde":
        config.model.embedding_type = "fourier"
        config.model.scale_by_sigma = True
    for key, value in training.items():
        setattr(config.training, key, value)
    return complete_config(config)


def one_step(config, seed: int = 0, state=None):
    """(loss, gradients, parameters after one step, state) of one training step from seed-identical weights."""
    torch.manual_seed(seed)
    state = run_lib.build_state(config, torch.device("cpu")) if state is None else state
    sde, _ = run_lib.get_corruption(config)
    objective = losses.get_objective(config, sde)
    grads = {}

    def optimize_fn(optimizer, params, step):
        params = list(params)
        for (name, _), p in zip(state["model"].named_parameters(), params):
            grads[name] = p.grad.detach().clone()
        losses.optimization_manager(config)(optimizer, params, step)

    step_fn = objective.step_fn(train=True, optimize_fn=optimize_fn)
    batch = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    if config.training.channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(seed + 1)
    loss = float(step_fn(state, batch))
    params = {k: v.detach().clone() for k, v in state["model"].named_parameters()}
    return loss, grads, params, state


def rel_err(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over all tensors together (a per-tensor ratio would be dominated by the tensors whose
    gradient is at rounding level at initialisation, ~1e-12 for the first time-embedding layer)."""
    diff = torch.cat([(a[k] - b[k]).flatten().double() for k in b])
    ref = torch.cat([b[k].flatten().double() for k in b])
    return float(diff.norm() / ref.norm())


@pytest.fixture(scope="module")
def fp32_reference():
    return one_step(small_config())


def test_bf16_step_is_close_to_fp32(fp32_reference):
    loss32, grads32, params32, _ = fp32_reference
    loss, grads, params, state = one_step(small_config(precision="bf16"))
    assert all(p.dtype == torch.float32 for p in state["model"].parameters())  # master weights stay fp32
    assert abs(loss - loss32) < 0.02 * abs(loss32)  # bf16: 8 significant bits in the network
    assert rel_err(grads, grads32) < 0.1
    assert rel_err(params, params32) < 1e-3  # one Adam step moves each weight by ~lr


def test_fp16_step_with_a_gradient_scaler(fp32_reference):
    loss32, grads32, _, _ = fp32_reference
    loss, grads, _, state = one_step(small_config(precision="fp16"))
    assert state["step"] == 1 and not state["amp_skipped"]
    assert abs(loss - loss32) < 0.01 * abs(loss32)
    assert rel_err(grads, grads32) < 0.05  # unscaled before clipping and the optimizer


def test_fp16_overflow_is_skipped_and_never_touches_the_ema():
    config = small_config(precision="fp16")
    torch.manual_seed(0)
    state = run_lib.build_state(config, torch.device("cpu"))
    sde, _ = run_lib.get_corruption(config)
    step_fn = losses.get_objective(config, sde).step_fn(train=True, optimize_fn=losses.optimization_manager(config))
    batch = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    step_fn(state, batch)  # creates the scaler
    scaler = next(c for c in step_fn.__closure__ if isinstance(c.cell_contents, dict) and c.cell_contents)
    scaler.cell_contents["cpu"].update(new_scale=2.0**120)  # scaled fp16 gradients now overflow
    ema_before = [p.clone() for p in state["ema"].shadow_params]
    params_before = [p.detach().clone() for p in state["model"].parameters()]
    step_before = state["step"]
    step_fn(state, batch)
    assert state["amp_skipped"] and not state["nonfinite"] and state["amp_skipped_steps"] == 1
    assert state["step"] == step_before
    assert all(torch.equal(a, b) for a, b in zip(state["ema"].shadow_params, ema_before))
    assert all(torch.equal(a, b) for a, b in zip(state["model"].parameters(), params_before))
    assert scaler.cell_contents["cpu"].get_scale() < 2.0**120  # lowered


def test_channels_last_matches_fp32(fp32_reference):
    loss32, grads32, params32, _ = fp32_reference
    loss, grads, params, state = one_step(small_config(channels_last=True))
    conv = next(m for m in state["model"].modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert abs(loss - loss32) < 1e-5 * abs(loss32)
    assert rel_err(grads, grads32) < 1e-4
    assert rel_err(params, params32) < 1e-6


def test_grad_checkpoint_gives_the_same_gradients(fp32_reference):
    loss32, grads32, _, _ = fp32_reference
    config = small_config(grad_checkpoint=True)
    loss, grads, _, state = one_step(config)
    assert mutils.set_grad_checkpointing(state["model"], True) > 0
    assert loss == pytest.approx(loss32, rel=1e-6)  # dropout replayed exactly in the recomputation
    assert rel_err(grads, grads32) < 1e-5


def test_fused_adam_matches_the_default_step(fp32_reference):
    _, _, params32, _ = fp32_reference
    config = small_config()
    with config.unlocked():
        config.optim.fused = True
    _, _, params, _ = one_step(config)
    assert rel_err(params, params32) < 1e-6


def test_every_option_checkpoint_loads_with_all_options_off_and_back(tmp_path):
    options = dict(precision="bf16", channels_last=True, grad_checkpoint=True)
    _, _, _, state = one_step(small_config(**options))
    path = os.path.join(tmp_path, "ckpt.pth")
    save_checkpoint(path, state)
    plain = run_lib.build_state(small_config(), torch.device("cpu"))
    plain = restore_checkpoint(path, plain, torch.device("cpu"))
    for (k, a), b in zip(state["model"].state_dict().items(), plain["model"].state_dict().values()):
        assert torch.equal(a, b), k
    save_checkpoint(path, plain)
    again = restore_checkpoint(path, run_lib.build_state(small_config(**options), torch.device("cpu")), "cpu")
    assert all(torch.equal(a, b) for a, b in zip(again["model"].parameters(), state["model"].parameters()))


@pytest.mark.parametrize("method", ["pc", "dpm_solver"])
def test_eval_precision_bf16_sampling_is_close_to_fp32(method):
    config = small_config()
    torch.manual_seed(0)
    model = run_lib.build_state(config, torch.device("cpu"))["model"]
    sde, eps = run_lib.get_corruption(config)
    out = {}
    for precision in ("fp32", "bf16"):
        cfg = copy.deepcopy(config)
        with cfg.unlocked():
            cfg.sampling.method = method
            cfg.sampling.nfe = 6
            cfg.eval.precision = precision
        sampler = sampling.get_sampling_fn(cfg, sde, (4, 3, 8, 8), lambda x: x, eps)
        z = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
        torch.manual_seed(3)
        out[precision], _ = sampler(model, z=z)
    assert out["bf16"].dtype == torch.float32
    assert (out["bf16"] - out["fp32"]).abs().max() < 0.05 * out["fp32"].abs().max()


def test_compile_matches_eager_keeps_keys_and_does_not_recompile_per_sampler_step(fp32_reference, tmp_path):
    """torch.compile (inductor, on the CPU) of the tiny network: same loss and gradients as eager within float
    reassociation, state_dict keys without '_orig_mod.', and the sampler's network calls reuse the compiled graph:
    after the first call, a whole PC chain runs with torch._dynamo's error_on_recompile set."""
    import torch._dynamo

    loss32, grads32, _, _ = fp32_reference
    config = small_config(compile=True)
    loss, grads, _, state = one_step(config)
    assert abs(loss - loss32) < 1e-4 * abs(loss32)
    assert rel_err(grads, grads32) < 1e-3
    keys = list(state["model"].state_dict())
    assert keys and not any("_orig_mod" in k for k in keys)
    path = os.path.join(tmp_path, "compiled.pth")
    save_checkpoint(path, state)
    eager = restore_checkpoint(path, run_lib.build_state(small_config(), torch.device("cpu")), "cpu")
    assert all(torch.equal(a, b) for a, b in zip(eager["model"].parameters(), state["model"].parameters()))

    sde, eps = run_lib.get_corruption(config)
    sampler = sampling.get_sampling_fn(config, sde, (4, 3, 8, 8), lambda x: x, eps)
    model = state["model"]
    sampler(model)  # compiles the eval-mode graph for this batch size
    with torch._dynamo.config.patch(error_on_recompile=True):
        x, nfe = sampler(model)
    assert nfe == config.model.num_scales and torch.isfinite(x).all()
