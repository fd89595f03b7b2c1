"""Exponential moving average of model parameters (score_sde_pytorch's models/ema.py semantics).

Only parameters with requires_grad are tracked, in parameters() order; the state_dict is
{'decay', 'num_updates', 'shadow_params': list of tensors}, as in score_sde checkpoints. Shadow tensors follow
the device (and dtype) of the parameters they average, so a state loaded on the CPU works with a CUDA model.
"""

from collections.abc import Iterable, Mapping

import torch

# elements per foreach group of the EMA update (4 MB of float32)
UPDATE_GROUP_NUMEL = 2**20


def group_bounds(numels: list[int], max_numel: int) -> list[tuple[int, int]]:
    """[start, end) index ranges of consecutive tensors with at most max_numel elements in all (a larger tensor
    alone)."""
    bounds, start, total = [], 0, 0
    for i, n in enumerate(numels):
        if i > start and total + n > max_numel:
            bounds.append((start, i))
            start, total = i, 0
        total += n
    if start < len(numels):
        bounds.append((start, len(numels)))
    return bounds


def ema_decay(decay: float, num_updates: int | None) -> float:
    """Effective decay min(decay, (1 + n) / (10 + n)) after n updates (decay itself when n is None)."""
    if num_updates is None:
        return decay
    return min(decay, (1 + num_updates) / (10 + num_updates))


class ExponentialMovingAverage:
    """Maintains shadow = decay * shadow + (1 - decay) * param for every trainable parameter."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float, use_num_updates: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be between 0 and 1, got {decay}")
        self.decay = decay
        self.num_updates = 0 if use_num_updates else None
        self.shadow_params = [p.detach().clone() for p in parameters if p.requires_grad]
        self.collected_params: list[torch.Tensor] = []
        self._bounds: tuple[int, list[tuple[int, int]]] | None = None  # (group size, group_bounds), made once

    def _update_groups(self) -> list[tuple[int, int]]:
        """group_bounds of the shadow tensors for UPDATE_GROUP_NUMEL, computed once (shapes change only on load)."""
        if self._bounds is None or self._bounds[0] != UPDATE_GROUP_NUMEL:
            numels = [s.numel() for s in self.shadow_params]
            self._bounds = (UPDATE_GROUP_NUMEL, group_bounds(numels, UPDATE_GROUP_NUMEL))
        return self._bounds[1]

    def _trainable(self, parameters: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        """The trainable parameters, checked against the number of shadow tensors."""
        params = [p for p in parameters if p.requires_grad]
        if len(params) != len(self.shadow_params):
            raise ValueError(
                f"EMA holds {len(self.shadow_params)} shadow tensors but the model has {len(params)} "
                "trainable parameters: the EMA state was made for a different network configuration."
            )
        for i, (s, p) in enumerate(zip(self.shadow_params, params)):
            if s.shape != p.shape:
                raise ValueError(
                    f"EMA shadow tensor {i} has shape {tuple(s.shape)} but parameter {i} has "
                    f"{tuple(p.shape)}: "
                    "the EMA state was made for a different network configuration."
                )
            if s.device != p.device or s.dtype != p.dtype:
                self.shadow_params[i] = s.to(device=p.device, dtype=p.dtype)
        return params

    def update(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """One EMA step: shadow -= (1 - d) * (shadow - param), d = min(decay, (1 + n) / (10 + n))."""
        params = self._trainable(parameters)
        if self.num_updates is not None:
            self.num_updates += 1
        one_minus_decay = 1.0 - ema_decay(self.decay, self.num_updates)
        with torch.no_grad():
            # Foreach kernels over groups of about UPDATE_GROUP_NUMEL elements, the same arithmetic as the
            # per-tensor loop s.sub_((1 - d) * (s - p)): shadow - param, times (1 - d), subtracted. Grouping keeps
            # the temporary (shadow - param) small and cache-resident: one foreach over the whole model allocates a
            # copy of it, which made the update slower than the loop on CPUs (benchmarks/update_step.py).
            current = [p.detach() for p in params]
            for start, end in self._update_groups():
                shadow = self.shadow_params[start:end]
                steps = torch._foreach_sub(shadow, current[start:end])
                torch._foreach_mul_(steps, one_minus_decay)
                torch._foreach_sub_(shadow, steps)

    def copy_to(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Write the averaged values into the trainable parameters."""
        params = self._trainable(parameters)
        with torch.no_grad():
            for s, p in zip(self.shadow_params, params):
                p.copy_(s)

    def store(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Save a copy of all parameters (to put back with `restore`)."""
        self.collected_params = [p.detach().clone() for p in parameters]

    def restore(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Put back the parameters saved by `store`."""
        params = list(parameters)
        if len(params) != len(self.collected_params):
            raise ValueError(
                f"restore got {len(params)} parameters but store saved {len(self.collected_params)}; "
                "call store() with the same model first."
            )
        with torch.no_grad():
            for c, p in zip(self.collected_params, params):
                p.copy_(c)

    def state_dict(self) -> dict:
        """{'decay', 'num_updates', 'shadow_params'} as written in score_sde checkpoints."""
        return dict(decay=self.decay, num_updates=self.num_updates, shadow_params=list(self.shadow_params))

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Load a state written by `state_dict` (or by score_sde / Soft Truncation)."""
        missing = [k for k in ("decay", "num_updates", "shadow_params") if k not in state_dict]
        if missing:
            raise KeyError(
                f"EMA state is missing {missing}; expected a dict with decay, num_updates and shadow_params "
                "(the 'ema' entry of a score_sde checkpoint)."
            )
        self.decay = state_dict["decay"]
        self.num_updates = state_dict["num_updates"]
        self.shadow_params = [torch.as_tensor(s).detach().clone() for s in state_dict["shadow_params"]]
        self._bounds = None
