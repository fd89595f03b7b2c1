"""ExponentialMovingAverage (models/ema.py) against closed forms."""

import numpy as np
import pytest
import torch

from models import ema as ema_module
from models.ema import ExponentialMovingAverage, ema_decay


def make_net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    net[1].bias.requires_grad_(False)  # frozen: not tracked
    return net


def test_decay_schedule():
    assert ema_decay(0.9999, 1) == pytest.approx(2 / 11)
    assert ema_decay(0.9999, 10**7) == 0.9999
    assert ema_decay(0.5, None) == 0.5


def test_update_closed_form_and_frozen_params_not_tracked():
    net = make_net()
    ema = ExponentialMovingAverage(net.parameters(), decay=0.95)
    assert len(ema.shadow_params) == 3  # Linear 0 weight/bias, Linear 1 weight
    init = [p.detach().clone() for p in net.parameters() if p.requires_grad]
    target = [torch.full_like(p, 2.0) for p in init]
    with torch.no_grad():
        for p, t in zip([p for p in net.parameters() if p.requires_grad], target):
            p.copy_(t)
    n = 25
    for _ in range(n):
        ema.update(net.parameters())
    # constant parameters: shadow_n = p + (shadow_0 - p) prod_i d_i, d_i = min(0.95, (1 + i) / (10 + i))
    prod = np.prod([min(0.95, (1 + i) / (10 + i)) for i in range(1, n + 1)])
    for s, p0, t in zip(ema.shadow_params, init, target):
        np.testing.assert_allclose(s.numpy(), (t + (p0 - t) * prod).numpy(), rtol=1e-5, atol=1e-6)
    assert ema.num_updates == n


def test_without_num_updates_uses_fixed_decay():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = ExponentialMovingAverage([p], decay=0.5, use_num_updates=False)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update([p])
    ema.update([p])
    np.testing.assert_allclose(ema.shadow_params[0].numpy(), 0.75)  # 1 - 0.5^2
    assert ema.state_dict()["num_updates"] is None


def test_copy_store_restore_and_state_dict_roundtrip():
    net = make_net()
    ema = ExponentialMovingAverage(net.parameters(), decay=0.9)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net.parameters())
    before = [p.detach().clone() for p in net.parameters()]
    ema.store(net.parameters())
    ema.copy_to(net.parameters())
    trainable = [p for p in net.parameters() if p.requires_grad]
    for s, p in zip(ema.shadow_params, trainable):
        assert torch.equal(s, p.detach())
    assert torch.equal(net[1].bias, before[3])  # frozen parameter untouched
    ema.restore(net.parameters())
    for b, p in zip(before, net.parameters()):
        assert torch.equal(b, p.detach())

    sd = ema.state_dict()
    assert set(sd) == {"decay", "num_updates", "shadow_params"} and isinstance(sd["shadow_params"], list)
    other = ExponentialMovingAverage(make_net().parameters(), decay=0.1)
    other.load_state_dict(sd)
    assert other.decay == 0.9 and other.num_updates == 1
    for a, b in zip(other.shadow_params, ema.shadow_params):
        assert torch.equal(a, b)


def test_shadow_follows_parameter_dtype_and_device():
    net = make_net()
    ema = ExponentialMovingAverage(net.parameters(), decay=0.9)
    sd = ema.state_dict()
    net64 = make_net().double()
    ema64 = ExponentialMovingAverage(net64.parameters(), decay=0.9)
    ema64.load_state_dict(sd)  # float32 shadows, float64 model (same mechanism moves CPU shadows to CUDA)
    ema64.copy_to(net64.parameters())
    assert all(s.dtype == torch.float64 for s in ema64.shadow_params)
    if torch.cuda.is_available():
        net_cuda = make_net().cuda()
        ema_cuda = ExponentialMovingAverage(net_cuda.parameters(), decay=0.9)
        ema_cuda.load_state_dict(sd)
        ema_cuda.update(net_cuda.parameters())
        assert all(s.is_cuda for s in ema_cuda.shadow_params)


def test_mismatched_model_gives_clear_error():
    ema = ExponentialMovingAverage(make_net().parameters(), decay=0.9)
    other = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match="different network configuration"):
        ema.copy_to(other.parameters())
    with pytest.raises(KeyError, match="shadow_params"):
        ema.load_state_dict({"decay": 0.9})
    with pytest.raises(ValueError, match="between 0 and 1"):
        ExponentialMovingAverage(other.parameters(), decay=1.5)


@pytest.mark.parametrize(
    "group_numel, sizes",
    [
        (ema_module.UPDATE_GROUP_NUMEL, [(5, 3), (7,)]),  # one group (the second tensor float64)
        (16, [(4,), (9,), (30,), (2,), (15,), (1,)]),  # many groups, one tensor larger than a group
    ],
)
def test_foreach_update_equals_the_per_parameter_loop_bit_for_bit(monkeypatch, group_numel, sizes):
    """The grouped foreach update does today's per-tensor arithmetic, s -= (1 - d) (s - p), exactly (float32 and
    float64, one group or many)."""
    monkeypatch.setattr(ema_module, "UPDATE_GROUP_NUMEL", group_numel)
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in sizes]
    params[1] = torch.nn.Parameter(params[1].detach().double())
    ema = ExponentialMovingAverage(params, decay=0.999)
    loop_shadow = [p.detach().clone() for p in params]
    for n in range(1, 40):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        ema.update(params)
        one_minus_decay = 1.0 - ema_decay(0.999, n)
        for s, p in zip(loop_shadow, params):
            s.sub_(one_minus_decay * (s - p.detach()))
    for s, ref in zip(ema.shadow_params, loop_shadow):
        assert s.dtype == ref.dtype
        assert torch.equal(s, ref)


def test_update_groups_cover_every_tensor_once_in_order_within_the_budget():
    """group_bounds splits the tensors into consecutive ranges of at most max_numel elements (a larger one alone)."""
    sizes = [3, 5, 2, 40, 1, 1, 7, 9]
    assert ema_module.group_bounds(sizes, max_numel=10) == [(0, 3), (3, 4), (4, 7), (7, 8)]
    assert ema_module.group_bounds(sizes, max_numel=10**9) == [(0, 8)]
    assert ema_module.group_bounds([], max_numel=10) == []
