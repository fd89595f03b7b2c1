"""Model package: checkpoint compatibility with score_sde / Soft Truncation, score-function conventions,
unbounded parametrisations, Soft Truncation network options (models/utils.py, ncsnpp.py, ddpm.py)."""

import json
import math
import os

import ml_collections
import numpy as np
import pytest
import torch

import models
import sde_lib
from models import ema as ema_lib
from models import layers, layerspp, ncsnpp
from models import utils as mutils


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1.3e-6, atol: float = 1e-5) -> None:
    """Elementwise |a - e| <= atol + rtol |e| (NumPy; avoids torch.testing's slow first import)."""
    np.testing.assert_allclose(actual.detach().cpu().numpy(), expected.detach().cpu().numpy(), rtol=rtol, atol=atol)


pytestmark = pytest.mark.usefixtures("single_thread")


from conftest import DATA_DIR, VECTORS_DIR  # noqa: E402

VECTORS = VECTORS_DIR

# score_sde's default model fields plus the Soft Truncation switches (filled in where a config lacks them).
DEFAULT_MODEL = dict(
    sigma_min=0.01,
    sigma_max=50,
    num_scales=1000,
    beta_min=0.1,
    beta_max=20.0,
    dropout=0.1,
    embedding_type="fourier",
    name="ncsnpp",
    scale_by_sigma=False,
    normalization="GroupNorm",
    nonlinearity="swish",
    nf=128,
    ch_mult=(1, 2, 2, 2),
    num_res_blocks=4,
    attn_resolutions=(16,),
    resamp_with_conv=True,
    conditional=True,
    fir=False,
    fir_kernel=[1, 3, 3, 1],
    skip_rescale=True,
    resblock_type="biggan",
    progressive="none",
    progressive_input="none",
    progressive_combine="sum",
    init_scale=0.0,
    fourier_scale=16,
    conv_size=3,
)
DEFAULT_DATA = dict(dataset="CIFAR10", image_size=32, num_channels=3, centered=False, random_flip=True)
DEFAULT_TRAINING = dict(
    sde="vpsde",
    continuous=True,
    reduce_mean=False,
    truncation_time=1e-5,
    unbounded_parametrization=False,
    stabilizing_constant=1e-3,
)


def make_config(sections: dict) -> ml_collections.ConfigDict:
    """ConfigDict from nested dicts (data / model / training ...), missing fields from score_sde defaults."""
    cfg = ml_collections.ConfigDict()
    for name, defaults in (("data", DEFAULT_DATA), ("model", DEFAULT_MODEL), ("training", DEFAULT_TRAINING)):
        merged = dict(defaults)
        merged.update(sections.get(name, {}))
        cfg[name] = ml_collections.ConfigDict(merged)
    for name, value in sections.items():
        if name not in cfg:
            cfg[name] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
    cfg.device = torch.device("cpu")
    return cfg


def perturb_(net: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Add seeded noise to every parameter (zero-initialised output layers would hide differences)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return net


def tiny_config(**model_overrides) -> ml_collections.ConfigDict:
    """A 8x8, nf=16 DDPM++ config for quick forward passes."""
    model = dict(
        nf=16,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(4,),
        dropout=0.0,
        embedding_type="positional",
        scale_by_sigma=False,
    )
    training = dict(model_overrides.pop("training", {}))
    model.update(model_overrides)
    return make_config({"data": dict(image_size=8, centered=True), "model": model, "training": training})


# ------------------------------------------------------------------------------------------------------------
# Compatibility with the released checkpoints


with open(os.path.join(DATA_DIR, "state_dict_layouts.json")) as f:
    LAYOUTS = json.load(f)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_state_dict_layout_matches_original(name):
    entry = LAYOUTS[name]
    cfg = make_config(entry["config"])
    with torch.device("meta"):  # no memory / compute: layout only
        net = mutils.get_model(cfg.model.name)(cfg)
    got = [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in net.state_dict().items()]
    assert got == entry["keys"]
    assert sum(p.numel() for p in net.parameters()) == entry["n_params"]


def _load_vector(fname):
    return torch.load(os.path.join(VECTORS, fname), weights_only=True)


@pytest.mark.parametrize("fname", ["vp_ddpmpp_tiny.pt", "ve_ncsnpp_tiny.pt"])
def test_reference_outputs_reproduced(fname):
    ref = _load_vector(fname)
    cfg = make_config(ref["reference_config"])
    net = mutils.create_model(cfg)
    net.load_state_dict(ref["state_dict"], strict=True)
    net.eval()
    with torch.no_grad():
        out = net(ref["x"], ref["labels"])
    rel = (out - ref["output"]).abs().max() / ref["output"].abs().max()
    assert rel < 1e-5


def test_checkpoint_and_ema_reproduced():
    ckpt = torch.load(os.path.join(VECTORS, "checkpoint_vp_ddpmpp_tiny.pth"), weights_only=True)
    expected = torch.load(os.path.join(VECTORS, "checkpoint_vp_ddpmpp_tiny_expected.pt"), weights_only=True)
    cfg = make_config(expected["reference_config"])
    net = mutils.create_model(cfg)
    state = {k[len("module.") :]: v for k, v in ckpt["model"].items()}
    net.load_state_dict(state, strict=True)
    net.eval()
    with torch.no_grad():
        out = net(expected["x"], expected["labels"])
    scale = expected["output_model"].abs().max()
    assert (out - expected["output_model"]).abs().max() / scale < 1e-5

    ema = ema_lib.ExponentialMovingAverage(net.parameters(), decay=0.5)
    ema.load_state_dict(ckpt["ema"])
    assert ema.decay == ckpt["ema"]["decay"] and ema.num_updates == 3
    ema.store(net.parameters())
    ema.copy_to(net.parameters())
    with torch.no_grad():
        out_ema = net(expected["x"], expected["labels"])
    scale = expected["output_ema"].abs().max()
    assert (out_ema - expected["output_ema"]).abs().max() / scale < 1e-5
    assert (out_ema - expected["output_model"]).abs().max() / scale > 1e-4  # EMA weights really differ
    ema.restore(net.parameters())
    with torch.no_grad():
        assert_close(net(expected["x"], expected["labels"]), out)
    # the state written back has the original structure
    sd = ema.state_dict()
    assert set(sd) == {"decay", "num_updates", "shadow_params"}
    assert len(sd["shadow_params"]) == len(ckpt["ema"]["shadow_params"])


def test_strict_load_rejects_other_configuration():
    ref = _load_vector("vp_ddpmpp_tiny.pt")
    sections = json.loads(json.dumps(ref["reference_config"]))
    sections["model"]["num_res_blocks"] = 2
    net = mutils.create_model(make_config(sections))
    with pytest.raises(RuntimeError):
        net.load_state_dict(ref["state_dict"], strict=True)


# ------------------------------------------------------------------------------------------------------------
# Registry, create_model, model_fn


def test_registry_and_create_model():
    assert mutils.get_model("ncsnpp") is ncsnpp.NCSNpp
    assert mutils.get_model("ddpm") is models.ddpm.DDPM
    with pytest.raises(ValueError, match="not a registered model"):
        mutils.get_model("no_such_net")
    with pytest.raises(ValueError, match="Already registered"):
        mutils.register_model(type("X", (), {}), name="ncsnpp")
    net = mutils.create_model(tiny_config())
    assert not isinstance(net, torch.nn.DataParallel)
    assert next(net.parameters()).device.type == "cpu"
    assert net.config.model.nf == 16


def test_get_sigmas_and_ddpm_params_closed_form():
    cfg = make_config({"model": dict(sigma_min=0.01, sigma_max=50, num_scales=5)})
    sig = mutils.get_sigmas(cfg)
    assert sig.dtype == np.float64
    np.testing.assert_allclose(sig, 50 * (0.01 / 50) ** (np.arange(5) / 4), rtol=1e-12)
    cfg = make_config({"model": dict(num_scales=1000)})
    p = mutils.get_ddpm_params(cfg)
    betas = 0.1 / 1000 + np.arange(1000) * (20.0 - 0.1) / 1000 / 999
    np.testing.assert_allclose(p["betas"], betas, rtol=1e-10)
    np.testing.assert_allclose(p["sqrt_1m_alphas_cumprod"] ** 2, 1 - np.cumprod(1 - betas), rtol=1e-10)
    x = torch.randn(2, 3)
    assert_close(mutils.from_flattened_numpy(mutils.to_flattened_numpy(x), (2, 3)), x)


class LabelEcho(torch.nn.Module):
    """Stub network: output[b] = label[b] everywhere; records train/eval mode."""

    def __init__(self, config=None):
        super().__init__()
        self.config = config
        self.w = torch.nn.Parameter(torch.ones(()))
        self.modes = []

    def forward(self, x, labels):
        self.modes.append(self.training)
        return self.w * labels.to(x.dtype)[:, None, None, None].expand_as(x)


def test_model_fn_sets_mode():
    net = LabelEcho()
    x = torch.zeros(2, 1, 2, 2)
    mutils.get_model_fn(net, train=True)(x, torch.ones(2))
    mutils.get_model_fn(net, train=False)(x, torch.ones(2))
    assert net.modes == [True, False]


# ------------------------------------------------------------------------------------------------------------
# get_score_fn conventions (closed forms)


def _vp_B(t, bmin=0.1, bmax=20.0):
    return bmin * t + 0.5 * (bmax - bmin) * t**2


T_GRID = torch.tensor([1e-3, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)


@pytest.mark.parametrize("cls", [sde_lib.VPSDE, sde_lib.subVPSDE])
def test_score_fn_vp_continuous(cls):
    sde = cls(beta_min=0.1, beta_max=20, N=1000)
    x = torch.zeros(len(T_GRID), 1, 2, 2, dtype=torch.float64)
    score = mutils.get_score_fn(sde, LabelEcho().double(), continuous=True)(x, T_GRID)
    B = _vp_B(T_GRID.numpy())
    std = np.sqrt(1 - np.exp(-B)) if cls is sde_lib.VPSDE else 1 - np.exp(-B)
    np.testing.assert_allclose(score[:, 0, 0, 0].detach().numpy(), -999 * T_GRID.numpy() / std, rtol=1e-6)


def test_score_fn_vp_discrete():
    sde = sde_lib.VPSDE(beta_min=0.1, beta_max=20, N=1000)
    t = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    x = torch.zeros(3, 1, 1, 1, dtype=torch.float64)
    score = mutils.get_score_fn(sde, LabelEcho().double(), continuous=False)(x, t)
    betas = np.linspace(0.1 / 1000, 20 / 1000, 1000)
    std = np.sqrt(1 - np.cumprod(1 - betas))
    labels = t.numpy() * 999
    np.testing.assert_allclose(score[:, 0, 0, 0].detach().numpy(), -labels / std[labels.astype(int)], rtol=1e-6)


def test_score_fn_ve_continuous_and_discrete():
    sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=50, N=1000)
    x = torch.zeros(len(T_GRID), 1, 1, 1, dtype=torch.float64)
    cont = mutils.get_score_fn(sde, LabelEcho().double(), continuous=True)(x, T_GRID)
    np.testing.assert_allclose(cont[:, 0, 0, 0].detach().numpy(), 0.01 * 5000 ** T_GRID.numpy(), rtol=1e-6)
    disc = mutils.get_score_fn(sde, LabelEcho().double(), continuous=False)(x, T_GRID)
    np.testing.assert_array_equal(disc[:, 0, 0, 0].detach().numpy(), np.round((1 - T_GRID.numpy()) * 999))


def test_score_fn_rve_uses_marginal_std():
    eps = 1e-5
    sde = sde_lib.RVESDE(sigma_min=1e-3, sigma_max=50, N=1000, eps=eps)
    t = torch.tensor([eps, 1e-3, 0.1, 1.0], dtype=torch.float64)
    x = torch.zeros(len(t), 1, 1, 1, dtype=torch.float64)
    out = mutils.get_score_fn(sde, LabelEcho().double(), continuous=True)(x, t)
    want = 50 * (1e-3 / 50) ** ((1 / t.numpy() - 1) / (1 / eps - 1))
    np.testing.assert_allclose(out[:, 0, 0, 0].detach().numpy(), want, rtol=1e-6)


def test_score_fn_of_an_unknown_corruption_names_the_parametrisation_layer():
    net = LabelEcho()
    with pytest.raises(ValueError, match="parametrization.py"):
        mutils.get_score_fn(object(), net)


# ------------------------------------------------------------------------------------------------------------
# Unbounded parametrisations (papers.md section 3)


def np_uddpm_label(t, eps, c=1e-3):
    A = lambda s: np.log(1 - np.exp(-_vp_B(s)) + c) + _vp_B(s)  # noqa: E731
    return 999 * (A(t) - A(eps)) / (A(1.0) - A(eps))


def test_uddpm_label_range_and_monotone():
    eps = 1e-5
    t = torch.linspace(eps, 1.0, 2001, dtype=torch.float64)
    lab = mutils.uddpm_label(t, 0.1, 20.0, eps=eps, c=1e-3)
    assert abs(lab[0].item()) < 1e-9 and abs(lab[-1].item() - 999) < 1e-9
    assert torch.all(lab[1:] > lab[:-1])
    np.testing.assert_allclose(lab.numpy(), np_uddpm_label(t.numpy(), eps), rtol=1e-10, atol=1e-9)
    # float32 input works and stays close
    lab32 = mutils.uddpm_label(t.float(), 0.1, 20.0, eps=eps)
    assert lab32.dtype == torch.float32
    np.testing.assert_allclose(lab32.numpy(), lab.numpy(), atol=2e-3)


def test_score_fn_uses_uddpm_label_when_unbounded_and_wrapped():
    cfg = tiny_config(training=dict(unbounded_parametrization=True, truncation_time=1e-3, stabilizing_constant=1e-3))
    sde = sde_lib.VPSDE(beta_min=0.1, beta_max=20, N=1000)
    t = torch.tensor([1e-3, 0.3, 1.0], dtype=torch.float64)
    x = torch.zeros(3, 1, 1, 1, dtype=torch.float64)
    wrapped = torch.nn.DataParallel(LabelEcho(cfg).double())  # config read from model.module.config
    score = mutils.get_score_fn(sde, wrapped, continuous=True)(x, t)
    std = np.sqrt(1 - np.exp(-_vp_B(t.numpy())))
    want_labels = np_uddpm_label(t.numpy(), eps=1e-3)
    np.testing.assert_allclose(-score[:, 0, 0, 0].detach().numpy() * std, want_labels, rtol=1e-8, atol=1e-8)
    assert abs(want_labels[0]) < 1e-9 and abs(want_labels[-1] - 999) < 1e-9


def test_uncsn_input_continuity_and_boundedness():
    c1, c2 = mutils.uncsn_constants()
    s0, off = 0.01, 1e-4
    assert math.isclose(-c1 / (s0 + off) + c2, math.log(s0), rel_tol=1e-12)
    assert math.isclose(c1 / (s0 + off) ** 2, 1 / s0, rel_tol=1e-12)
    u = lambda s: mutils.uncsn_embedding_input(torch.tensor([s], dtype=torch.float64)).item()  # noqa: E731
    h = 1e-7  # first-order Taylor expansion of log around s0 holds on both sides (value and slope continuous)
    assert abs(u(s0 - h) - (math.log(s0) - h / s0)) < 1e-9
    assert abs(u(s0 + h) - (math.log(s0) + h / s0)) < 1e-9
    assert abs((u(s0) - u(s0 - h)) / h - 100.0) < 1e-2 and abs((u(s0 + h) - u(s0)) / h - 100.0) < 1e-2
    sig = torch.logspace(-12, 2, 500, dtype=torch.float64)
    vals = mutils.uncsn_embedding_input(torch.cat([torch.zeros(1, dtype=torch.float64), sig]))
    assert torch.isfinite(vals).all()
    assert vals.min() >= -c1 / off + c2 - 1e-9  # bounded below by u(0)
    assert torch.all(vals[1:] > vals[:-1])  # increasing
    big = sig >= s0
    assert_close(vals[1:][big], torch.log(sig[big]))


def test_ncsnpp_uses_uncsn_input_for_ve_when_unbounded():
    torch.manual_seed(0)
    base = dict(embedding_type="fourier", fir=True, progressive_input="residual", scale_by_sigma=False)
    plain = mutils.create_model(tiny_config(**base, training=dict(sde="vesde")))
    unb = mutils.create_model(tiny_config(**base, training=dict(sde="vesde", unbounded_parametrization=True)))
    perturb_(plain)
    unb.load_state_dict(plain.state_dict())
    plain.eval(), unb.eval()
    x = torch.randn(3, 3, 8, 8)
    sigma = torch.tensor([1e-4, 3e-3, 5.0])
    u = mutils.uncsn_embedding_input(sigma)
    with torch.no_grad():
        # the plain network embeds log(sigma'); sigma' = exp(u(sigma)) must reproduce the unbounded network
        assert_close(unb(x, sigma), plain(x, torch.exp(u)), rtol=1e-5, atol=1e-5)
        assert (unb(x, sigma)[:2] - plain(x, sigma)[:2]).abs().max() > 1e-3
        assert_close(unb(x, sigma)[2], plain(x, sigma)[2])
    vp_unb = mutils.create_model(tiny_config(**base, training=dict(sde="vpsde", unbounded_parametrization=True)))
    assert not vp_unb.unbounded_sigma_embedding  # VP's unbounded variant changes the label, not the embedding


# ------------------------------------------------------------------------------------------------------------
# Network variants and Soft Truncation options


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(resblock_type="ddpm"),
        dict(
            embedding_type="fourier",
            fir=True,
            progressive="output_skip",
            progressive_input="input_skip",
            scale_by_sigma=True,
        ),
        dict(fir=True, progressive="residual", progressive_input="residual", progressive_combine="cat"),
        dict(
            fir=True,
            resblock_type="ddpm",
            progressive="residual",
            progressive_input="input_skip",
            progressive_combine="cat",
        ),
        dict(conditional=False),
    ],
)
def test_ncsnpp_variants_forward_and_backward(overrides):
    torch.manual_seed(0)
    net = mutils.create_model(tiny_config(**overrides))
    x = torch.randn(2, 3, 8, 8)
    labels = torch.tensor([0.5, 2.0]) if overrides.get("embedding_type") == "fourier" else torch.tensor([3.0, 800.0])
    out = net(x, labels)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    used = [p for n, p in net.named_parameters() if p.requires_grad and (net.conditional or "Dense_0" not in n)]
    assert all(p.grad is not None for p in used)


def test_scale_by_sigma_divides_by_sigma():
    torch.manual_seed(0)
    kw = dict(embedding_type="fourier", fir=True, progressive_input="residual")
    a = mutils.create_model(tiny_config(**kw, scale_by_sigma=True)).eval()
    b = mutils.create_model(tiny_config(**kw, scale_by_sigma=False)).eval()
    b.load_state_dict(perturb_(a).state_dict())
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 7.0])
    with torch.no_grad():
        assert_close(a(x, sigma) * sigma[:, None, None, None], b(x, sigma))


def _module_types(net):
    return [type(m).__name__ for m in net.all_modules]


def test_st_lsgm_embedding_dim():
    net = mutils.create_model(tiny_config(nf=32, lsgm=True, embedding_dim=8))
    assert net.all_modules[0].weight.shape == (32, 8)  # embedding_dim -> 4 embedding_dim
    assert net.all_modules[1].weight.shape == (32, 32)
    assert net.all_modules[3].Dense_0.weight.shape == (32, 32)  # temb width 4 embedding_dim, not 4 nf
    out = net(torch.randn(2, 3, 8, 8), torch.tensor([1.0, 500.0]))
    assert out.shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="embedding_dim"):
        mutils.create_model(tiny_config(lsgm=True))


def test_st_attention_switch():
    with_attn = _module_types(mutils.create_model(tiny_config()))
    no_attn = _module_types(mutils.create_model(tiny_config(attention=False)))
    # attn_resolutions=(4,) gives one block in the encoder and one in the decoder, plus the middle one
    assert with_attn.count("AttnBlockpp") == 3 and no_attn.count("AttnBlockpp") == 1
    assert len(with_attn) - len(no_attn) == 2


def test_st_auxiliary_resblock_switch():
    cfg = tiny_config(auxiliary_resblock=False, attn_resolutions=(8,))
    net = mutils.create_model(cfg)
    with_aux = mutils.create_model(tiny_config(attn_resolutions=(8,)))
    n_res = lambda n: sum(isinstance(m, layerspp.ResnetBlockBigGANpp) for m in n.all_modules)  # noqa: E731
    # 2 levels, 1 block. With aux: encoder 2 + down 1 + middle 2 + decoder 2*2 + up 1 = 10; without: 2 + 2 + 2
    assert n_res(with_aux) == 10 and n_res(net) == 6
    assert not any(m.up or m.down for m in net.all_modules if isinstance(m, layerspp.ResnetBlockBigGANpp))
    x = torch.randn(2, 3, 8, 8)
    out = net(x, torch.tensor([1.0, 900.0]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="auxiliary_resblock"):
        mutils.create_model(tiny_config(auxiliary_resblock=False, progressive_input="residual"))


def test_st_fourier_feature_input():
    net = mutils.create_model(tiny_config(fourier_feature=True))
    assert isinstance(net.all_modules[2], layerspp.FixedFourierProjection)
    assert net.all_modules[3].weight.shape[1] == 15  # 3 channels x (1 + 4 features)
    assert net(torch.randn(2, 3, 8, 8), torch.tensor([1.0, 2.0])).shape == (2, 3, 8, 8)


def test_bad_config_values_give_clear_errors():
    with pytest.raises(ValueError, match="progressive"):
        mutils.create_model(tiny_config(progressive="bogus"))
    with pytest.raises(ValueError, match="nonlinearity"):
        mutils.create_model(tiny_config(nonlinearity="tanh"))
    import run_lib  # the Fourier / discrete-time contradiction is a config check, before any network is built
    from configs.ve import cifar10_ncsnpp_continuous

    discrete_fourier = cifar10_ncsnpp_continuous.get_config()
    discrete_fourier.training.continuous = False
    with pytest.raises(ValueError, match="continuous"):
        run_lib.validate_config(discrete_fourier)


def test_ddpm_model_forward_and_scale_by_sigma():
    torch.manual_seed(0)
    model = dict(
        name="ddpm",
        nf=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(4,),
        dropout=0.0,
        sigma_min=0.01,
        sigma_max=50,
        num_scales=10,
    )
    a = mutils.create_model(make_config({"data": dict(image_size=8), "model": dict(model, scale_by_sigma=True)}))
    b = mutils.create_model(make_config({"data": dict(image_size=8), "model": dict(model, scale_by_sigma=False)}))
    b.load_state_dict(perturb_(a).state_dict())
    a.eval(), b.eval()
    x, labels = torch.rand(2, 3, 8, 8), torch.tensor([0, 7])
    sig = 50 * (0.01 / 50) ** (labels.numpy() / 9)
    with torch.no_grad():
        ya, yb = a(x, labels), b(x, labels)
    assert ya.shape == x.shape
    np.testing.assert_allclose(
        (ya * torch.tensor(sig, dtype=torch.float32)[:, None, None, None]).numpy(),
        yb.numpy(),
        rtol=1e-5,
        atol=1e-6,
    )


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 3.0, 250.5])
    emb = layers.get_timestep_embedding(t, 8)
    freqs = np.exp(-np.log(10000) / 3 * np.arange(4))
    want = np.concatenate([np.sin(t.numpy()[:, None] * freqs), np.cos(t.numpy()[:, None] * freqs)], axis=1)
    np.testing.assert_allclose(emb.numpy(), want, rtol=1e-5, atol=1e-5)
    assert layers.get_timestep_embedding(t, 9).shape == (3, 9)


def test_attention_matches_naive_softmax():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 3, 3, dtype=torch.float64) for _ in range(3))
    out = layers.spatial_self_attention(q, k, v)
    qf, kf, vf = (a.reshape(2, 4, 9).numpy() for a in (q, k, v))
    logits = np.einsum("bcp,bcq->bpq", qf, kf) / 2.0
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    np.testing.assert_allclose(out.reshape(2, 4, 9).numpy(), np.einsum("bpq,bcq->bcp", w, vf), rtol=1e-10)


def test_default_init_variance():
    torch.manual_seed(0)
    w = torch.empty(256, 128, 3, 3)
    layers.init_weight_(w, scale=2.0)
    fan_avg = (128 * 9 + 256 * 9) / 2
    assert abs(w.var().item() / (2.0 / fan_avg) - 1) < 0.02  # uniform variance = scale / fan_avg
    assert w.abs().max().item() <= math.sqrt(3 * 2.0 / fan_avg) + 1e-7
