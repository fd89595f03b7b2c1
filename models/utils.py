"""Model registry and score_sde_pytorch's model / score function wrappers (models/utils.py).

How a network's labels and output become a score is decided in parametrization.py; get_score_fn is a thin
wrapper over it. The label transforms are re-exported here for older code (uddpm_label, uncsn_embedding_input).
"""

from collections.abc import Callable

import numpy as np
import torch
import torch.utils.checkpoint

import parametrization
from parametrization import (  # noqa: F401  (re-exported label transforms)
    UNCSN_SIGMA_OFFSET,
    UNCSN_SIGMA_SWITCH,
    VP_LABEL_SCALE,
    uddpm_label,
    uddpm_log_snr_antiderivative,
    uncsn_constants,
    uncsn_embedding_input,
    vp_integrated_beta,
)

_MODELS: dict[str, type] = {}


def register_model(cls=None, *, name: str | None = None):
    """Class decorator adding a model to the registry under `name` (default: the class name)."""

    def _register(cls):
        local_name = cls.__name__ if name is None else name
        if local_name in _MODELS:
            raise ValueError(f"Already registered model with name: {local_name}")
        _MODELS[local_name] = cls
        return cls

    return _register if cls is None else _register(cls)


def get_model(name: str) -> type:
    """The registered model class called `name`."""
    if name not in _MODELS:
        raise ValueError(
            f"config.model.name={name!r} is not a registered model; registered: {sorted(_MODELS)}. "
            "Import the module that defines it (e.g. 'import models') before calling create_model."
        )
    return _MODELS[name]


def get_sigmas(config) -> np.ndarray:
    """Geometric noise levels sigma_i = exp(linspace(log sigma_max, log sigma_min, num_scales)), float64."""
    return np.exp(np.linspace(np.log(config.model.sigma_max), np.log(config.model.sigma_min), config.model.num_scales))


def get_ddpm_params(config) -> dict:
    """DDPM's discrete betas linspace(beta_min / N, beta_max / N, 1000) and derived cumulative products."""
    num_diffusion_timesteps = 1000
    beta_start = config.model.beta_min / config.model.num_scales
    beta_end = config.model.beta_max / config.model.num_scales
    betas = np.linspace(beta_start, beta_end, num_diffusion_timesteps, dtype=np.float64)
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    return {
        "betas": betas,
        "alphas": alphas,
        "alphas_cumprod": alphas_cumprod,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_1m_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "beta_min": beta_start * (num_diffusion_timesteps - 1),
        "beta_max": beta_end * (num_diffusion_timesteps - 1),
        "num_diffusion_timesteps": num_diffusion_timesteps,
    }


def create_model(config) -> torch.nn.Module:
    """Build the registered model config.model.name and move it to config.device (no DataParallel wrapper)."""
    model = get_model(config.model.name)(config)
    device = getattr(config, "device", None)
    return model.to(device if device is not None else "cpu")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The network inside a DataParallel / DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(getattr(model, "module", None), torch.nn.Module) else model


def get_model_config(model: torch.nn.Module):
    """The config the network was built with (model.config or model.module.config), or None."""
    return parametrization.network_config(model)


def get_model_fn(model: torch.nn.Module, train: bool = False) -> Callable:
    """model_fn(x, labels): the network output, with the model switched to train() or eval() mode."""

    def model_fn(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        model.train(train)
        return model(x, labels)

    return model_fn


# ----------------------------------------------------------------------------------------------------
# Speed options (training.channels_last / grad_checkpoint / compile): none changes the state_dict


def is_residual_block(module: torch.nn.Module) -> bool:
    """The residual blocks of every registered network (DDPM++/NCSN++, DDPM, NCSN / NCSNv2)."""
    name = type(module).__name__
    return "ResnetBlock" in name or "ResidualBlock" in name


def _checkpointed_forward(module: torch.nn.Module, forward: Callable) -> Callable:
    """forward(*args) recomputed in the backward pass (torch.utils.checkpoint, non-reentrant: dropout replays the
    same random numbers) while gradients are being recorded; the plain forward otherwise."""

    def run(*args, **kwargs):
        if module.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return run


def set_grad_checkpointing(model: torch.nn.Module, enabled: bool = True) -> int:
    """Activation checkpointing of every residual block (training.grad_checkpoint); returns the block count.
    The blocks' own forward is wrapped on the instance, so parameters and state_dict keys are unchanged."""
    count = 0
    for module in unwrap_model(model).modules():
        if is_residual_block(module):
            if "forward" in module.__dict__:
                del module.forward  # back to the class's forward
            if enabled:
                module.forward = _checkpointed_forward(module, module.forward)
            count += 1
    return count


COMPILE_MODES = ("", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile_options(mode: str, backend: str) -> None:
    """training.compile_mode is a torch.compile mode and training.compile_backend a registered backend ('': the
    defaults)."""
    if mode not in COMPILE_MODES:
        raise ValueError(
            f"training.compile_mode={mode!r} is not a torch.compile mode; valid: {COMPILE_MODES} ('': torch's default)."
        )
    if backend:
        import torch._dynamo

        backends = torch._dynamo.list_backends(exclude_tags=())
        if backend not in backends:
            raise ValueError(f"training.compile_backend={backend!r} is not a torch.compile backend; valid: {backends}.")


def apply_speed_options(
    model: torch.nn.Module,
    channels_last: bool = False,
    grad_checkpoint: bool = False,
    compile: bool = False,
    compile_mode: str = "",
    compile_backend: str = "",
) -> torch.nn.Module:
    """channels_last memory format, activation checkpointing and torch.compile (in place: nn.Module.compile, so the
    state_dict keeps the original keys) of the network `model` (run_lib passes training.channels_last,
    grad_checkpoint, compile, compile_mode and compile_backend)."""
    if compile:
        check_compile_options(compile_mode, compile_backend)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if grad_checkpoint:
        set_grad_checkpointing(model, True)
    if compile:
        model.compile(mode=compile_mode or None, backend=compile_backend or "inductor")
    return model


def set_tf32(enabled: bool, device: torch.device) -> bool:
    """training.tf32: TF32 tensor-core matmuls and convolutions on a CUDA device (float32 storage, 10-bit mantissa
    products); no effect elsewhere. Returns whether the flags were set."""
    if not enabled or torch.device(device).type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def get_score_fn(sde, model: torch.nn.Module, train: bool = False, continuous: bool = False) -> Callable:
    """score_fn(x, t) of the network (score_sde's signature): parametrization.get_parametrization(...).score."""
    return parametrization.get_parametrization(sde, model, train=train, continuous=continuous).score


def to_flattened_numpy(x: torch.Tensor) -> np.ndarray:
    """Flatten a torch tensor to a 1-D numpy array (on the CPU)."""
    return x.detach().cpu().numpy().reshape((-1,))


def from_flattened_numpy(x: np.ndarray, shape) -> torch.Tensor:
    """A torch tensor of the given shape from a flat numpy array."""
    return torch.from_numpy(x.reshape(shape))
