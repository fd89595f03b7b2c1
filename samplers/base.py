"""What every sampler family shares: the registries, the network-evaluation counter, the starting state, and
make_sampling_fn, which turns a sampling loop into score_sde's sampling_fn(model, z=None) -> (samples, nfe).

Imports nothing from sampling.py (the public API and registry imports the families, not the other way round).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import parametrization
from sde_lib import broadcast_to  # noqa: F401  (the samplers' per-sample broadcast)

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SamplingLoop = Callable[[parametrization.Parametrization, torch.Tensor], tuple[torch.Tensor, int]]

_PREDICTORS: dict[str, type] = {}
_CORRECTORS: dict[str, type] = {}
_SAMPLING_METHODS: dict[str, Callable] = {}

# --------------------------------------------------------------------------------------------------
# Registries (config.sampling.predictor / corrector / method)
# --------------------------------------------------------------------------------------------------


def _add_to(registry: dict, kind: str, cls: type, name: str | None) -> type:
    """registry[name or cls.__name__] = cls, refusing a name already taken."""
    local_name = cls.__name__ if name is None else name
    if local_name in registry:
        raise ValueError(f"Already registered {kind} with name: {local_name}")
    registry[local_name] = cls
    return cls


def register_predictor(cls=None, *, name=None):
    """A decorator for registering predictor classes."""

    def _register(cls):
        return _add_to(_PREDICTORS, "predictor", cls, name)

    return _register if cls is None else _register(cls)


def register_corrector(cls=None, *, name=None):
    """A decorator for registering corrector classes."""

    def _register(cls):
        return _add_to(_CORRECTORS, "corrector", cls, name)

    return _register if cls is None else _register(cls)


def get_predictor(name: str) -> type:
    """Predictor class registered under `name` (config.sampling.predictor)."""
    if name not in _PREDICTORS:
        raise ValueError(f"Unknown predictor {name!r} (config.sampling.predictor); valid names: {sorted(_PREDICTORS)}")
    return _PREDICTORS[name]


def get_corrector(name: str) -> type:
    """Corrector class registered under `name` (config.sampling.corrector)."""
    if name not in _CORRECTORS:
        raise ValueError(f"Unknown corrector {name!r} (config.sampling.corrector); valid names: {sorted(_CORRECTORS)}")
    return _CORRECTORS[name]


def register_sampling_method(name: str):
    """Decorator registering builder(config, sde, shape, inverse_scaler, eps) -> sampler under
    config.sampling.method."""

    def _register(builder):
        if name in _SAMPLING_METHODS:
            raise ValueError(f"Already registered sampling method with name: {name}")
        _SAMPLING_METHODS[name] = builder
        return builder

    return _register


# --------------------------------------------------------------------------------------------------
# Shared pieces of the sampling loops
# --------------------------------------------------------------------------------------------------


def check_eps(eps: float, sde) -> None:
    """The sampling truncation time must lie in (0, T)."""
    T = float(getattr(sde, "T", 1.0))
    if not 0.0 < float(eps) < T:
        raise ValueError(
            f"Sampling eps (the smallest time: sde_lib.get_sde or config.sampling.truncation_time) must lie "
            f"in (0, {T}); got {eps}. At eps = 0 sigma(0) = 0 and the score diverges: set a positive "
            "config.sampling.truncation_time, or leave it unset for score_sde's default."
        )


class CountingScoreFn:
    """Wraps score_fn and counts its calls (the number of network evaluations)."""

    def __init__(self, score_fn: ScoreFn):
        self.score_fn = score_fn
        self.count = 0

    def __call__(self, x, t):
        self.count += 1
        return self.score_fn(x, t)


def initial_state(corruption, shape, z: torch.Tensor | None, device, generator=None) -> torch.Tensor:
    """The latent x_T: given z, or a draw from the prior (drawn where the prior lives, then moved: score_sde)."""
    if z is not None:
        return z.to(device)
    if generator is None:
        return corruption.prior_sampling(shape).to(device)
    return corruption.prior_sampling(shape, generator=generator).to(device)


def make_sampling_fn(
    loop: SamplingLoop,
    corruption,
    shape,
    inverse_scaler: Callable,
    device,
    continuous: bool = True,
    generator: torch.Generator | None = None,
    precision: str = "fp32",
) -> Callable:
    """score_sde's sampling_fn(model, z=None) -> (inverse_scaler(x), nfe) around loop(parametrization, x_T) ->
    (x, nfe): without gradients, the network in eval mode through parametrization.get_parametrization
    (precision 'bf16' / 'fp16': the network under autocast, the sampler's state in float32)."""

    def sampling_fn(model: torch.nn.Module, z: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        with torch.no_grad():
            param = parametrization.get_parametrization(
                corruption, model, train=False, continuous=continuous, precision=precision
            )
            x = initial_state(corruption, shape, z, device, generator)
            x, nfe = loop(param, x)
            return inverse_scaler(x), nfe

    return sampling_fn
