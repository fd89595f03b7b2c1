"""Training loop: resume is exact, checkpoints are atomic, bad input and NaN losses stop with clear errors."""

import glob
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import VECTORS_DIR

import run_lib
import utils
from configs.default_cifar10_configs import get_default_configs
from configs.model_presets import set_ddpmpp

VECTORS = VECTORS_DIR


def tiny_config(**training):
    config = set_ddpmpp(get_default_configs())
    config.device = torch.device("cpu")
    config.data.dataset = "SHAPES"
    config.data.image_size = 8
    config.data.num_train = 64
    config.data.num_eval = 16
    model = config.model
    model.nf = 8
    model.ch_mult = (1, 2)
    model.num_res_blocks = 1
    model.attn_resolutions = (4,)
    model.dropout = 0.0
    config.training.batch_size = 8
    config.eval.batch_size = 8
    config.training.n_iters = 4
    config.training.log_freq = 1
    config.training.eval_freq = 2
    config.training.snapshot_freq = 2
    config.training.snapshot_freq_for_preemption = 1
    config.training.snapshot_sampling = False
    config.training.st = True
    config.training.k = 1.0
    config.training.importance_sampling = True
    config.optim.warmup = 2
    config.optim.lr = 1e-3
    for key, value in training.items():
        config.training[key] = value
    return config


def flat_state(state):
    params = torch.cat([p.detach().flatten() for p in state["model"].parameters()])
    shadow = torch.cat([p.flatten() for p in state["ema"].shadow_params])
    return params, shadow


def test_resume_gives_the_same_parameters(tmp_path):
    straight = run_lib.train(tiny_config(n_iters=4), str(tmp_path / "a"))
    run_lib.train(tiny_config(n_iters=2), str(tmp_path / "b"))
    resumed = run_lib.train(tiny_config(n_iters=4), str(tmp_path / "b"))
    assert straight["step"] == resumed["step"] == 4
    for a, b in zip(flat_state(straight), flat_state(resumed)):
        assert torch.equal(a, b)
    for a, b in zip(
        straight["optimizer"].state_dict()["state"].values(),
        resumed["optimizer"].state_dict()["state"].values(),
    ):
        assert torch.equal(a["exp_avg"], b["exp_avg"])
    # score_sde's layout
    workdir = tmp_path / "a"
    assert (workdir / "checkpoints-meta" / "checkpoint.pth").exists()
    assert sorted(os.listdir(workdir / "checkpoints")) == ["checkpoint_1.pth", "checkpoint_2.pth"]
    assert (workdir / "train.log").read_text().count("training_loss") >= 4
    assert glob.glob(str(workdir / "tensorboard" / "events.*"))


def test_killed_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    straight = run_lib.train(tiny_config(n_iters=4), str(tmp_path / "a"))
    original_next = run_lib.TrainStream.__next__

    def dying_next(self):
        if self.position == 3:
            raise KeyboardInterrupt("killed")
        return original_next(self)

    monkeypatch.setattr(run_lib.TrainStream, "__next__", dying_next)
    with pytest.raises(KeyboardInterrupt):
        run_lib.train(tiny_config(n_iters=4), str(tmp_path / "b"))
    monkeypatch.setattr(run_lib.TrainStream, "__next__", original_next)
    resumed = run_lib.train(tiny_config(n_iters=4), str(tmp_path / "b"))
    for a, b in zip(flat_state(straight), flat_state(resumed)):
        assert torch.equal(a, b)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth")
    utils.atomic_torch_save({"model": {"w": torch.ones(3)}, "step": 1}, path)
    real_save = torch.save

    def torn_save(obj, f, *args, **kwargs):
        f.write(b"partial garbage")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        utils.atomic_torch_save({"model": {"w": torch.zeros(3)}, "step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    loaded = utils.load_checkpoint_file(path)
    assert loaded["step"] == 1 and torch.equal(loaded["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


def test_corrupt_checkpoint_is_reported(tmp_path):
    path = tmp_path / "checkpoint.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="corrupt"):
        utils.load_checkpoint_file(str(path))


def test_nan_losses_skip_then_stop(tmp_path, monkeypatch):
    def nan_score(sde, model, train=False, continuous=False):
        return lambda x, t: model(x, t * 999) * float("nan")

    monkeypatch.setattr(run_lib.losses.mutils, "get_score_fn", nan_score)
    config = tiny_config(n_iters=4, max_nonfinite_steps=3)
    with pytest.raises(RuntimeError, match="3 consecutive"):
        run_lib.train(config, str(tmp_path))
    assert "step skipped" in (tmp_path / "train.log").read_text()


@pytest.mark.parametrize(
    "section,field,value,match",
    [
        ("training", "sde", "bogus", "vpsde"),
        ("model", "name", "unet9000", "registered"),
        ("training", "k", -1.0, "training.k"),
        ("training", "truncation_time", 1.5, "truncation_time"),
        ("training", "truncation_time", 0.0, "truncation_time"),
        ("data", "image_size", 9, "divisible"),
        ("training", "corruption", "salt", "corruption"),
        ("model", "num_scales", 10, "num_scales=10 is too small"),
    ],
)
def test_invalid_config_is_rejected_before_training(tmp_path, section, field, value, match):
    config = tiny_config()
    config[section][field] = value
    with pytest.raises(ValueError, match=match):
        run_lib.train(config, str(tmp_path / "w"))
    assert not (tmp_path / "w" / "checkpoints").exists()


def assert_rel_close(got, want, rel=1e-5):
    """Agreement to 1e-5 relative to the output's scale (float32 convolutions differ in summation order)."""
    assert float((got - want).norm() / want.norm()) < rel
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * float(want.abs().max()))


def reference_config():
    expected = torch.load(os.path.join(VECTORS, "checkpoint_vp_ddpmpp_tiny_expected.pt"), weights_only=True)
    config = set_ddpmpp(get_default_configs())
    for section, values in expected["reference_config"].items():
        if isinstance(values, dict):
            for key, value in values.items():
                config[section][key] = tuple(value) if isinstance(value, list) else value
    config.device = torch.device("cpu")
    return config, expected


def test_original_checkpoint_restores_and_resumes(tmp_path):
    config, expected = reference_config()
    state = run_lib.build_state(config, config.device)
    state = utils.restore_checkpoint(os.path.join(VECTORS, "checkpoint_vp_ddpmpp_tiny.pth"), state, config.device)
    assert state["step"] == 3
    model = state["model"].eval()
    with torch.no_grad():
        assert_rel_close(model(expected["x"], expected["labels"]), expected["output_model"])
        state["ema"].copy_to(model.parameters())
        assert_rel_close(model(expected["x"], expected["labels"]), expected["output_ema"])

    # training resumes from the original file (data: the demo set at the checkpoint's resolution)
    workdir = tmp_path / "run"
    (workdir / "checkpoints-meta").mkdir(parents=True)
    shutil.copy(
        os.path.join(VECTORS, "checkpoint_vp_ddpmpp_tiny.pth"),
        workdir / "checkpoints-meta" / "checkpoint.pth",
    )
    config.data.dataset = "SHAPES"
    config.data.num_train = 16
    config.data.num_eval = 8
    config.training.batch_size = 4
    config.eval.batch_size = 4
    config.training.n_iters = 5
    config.training.snapshot_sampling = False
    resumed = run_lib.train(config, str(workdir))
    assert resumed["step"] == 5
    assert resumed["ema"].num_updates == 5
    saved = utils.load_checkpoint_file(str(workdir / "checkpoints-meta" / "checkpoint.pth"))
    assert saved["step"] == 5 and all(k.startswith("module.") for k in saved["model"])
    assert set(saved) >= {"optimizer", "model", "ema", "step"}


def test_checkpoint_of_another_architecture_fails_loudly():
    config, _ = reference_config()
    config.model.nf = 32
    state = run_lib.build_state(config, config.device)
    with pytest.raises(RuntimeError, match="shape mismatches"):
        utils.restore_checkpoint(os.path.join(VECTORS, "checkpoint_vp_ddpmpp_tiny.pth"), state, config.device)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation and sampling modes

from test_evaluation import inception_weights  # noqa: E402,F401  (fixture: random Inception weights file)


def eval_config(workdir, tmp_path, inception_path):
    config = tiny_config(n_iters=2)
    run_lib.train(config, str(workdir))
    config.sampling.method = "dpm_solver"
    config.sampling.nfe = 6
    config.sampling.dpm_solver_order = 2
    ev = config.eval
    ev.begin_ckpt = ev.end_ckpt = 1
    ev.batch_size = 4
    ev.enable_loss = True
    ev.enable_bpd = True
    ev.enable_nelbo = True
    ev.bpd_num_repeats = 2
    ev.max_bpd_batches = 1
    ev.enable_sampling = True
    ev.num_samples = 10
    ev.enable_fid = True
    ev.inception_path = inception_path
    ev.stats_path = str(tmp_path / "stats.npz")
    return config


def test_evaluate_writes_all_metrics_and_resumes(tmp_path, inception_weights, monkeypatch):  # noqa: F811
    import json

    import evaluation

    workdir = tmp_path / "run"
    config = eval_config(workdir, tmp_path, inception_weights)
    calls = {"n": 0}
    original = evaluation.write_samples_in_batches

    def counting_writer(sampling_fn, *args, **kwargs):
        def counted(model):
            calls["n"] += 1
            if calls.get("die") and calls["n"] == 2:
                raise KeyboardInterrupt("killed during sampling")
            return sampling_fn(model)

        return original(counted, *args, **kwargs)

    monkeypatch.setattr(evaluation, "write_samples_in_batches", counting_writer)
    calls["die"] = True
    with pytest.raises(KeyboardInterrupt):
        run_lib.evaluate(config, str(workdir), "eval")
    folder = workdir / "eval" / "ckpt_1"
    assert sorted(os.listdir(folder / "samples")) == ["samples_0.npz"]
    assert len(list(folder.glob("bpd_*.npy"))) == 2  # both repeats done before sampling started
    calls.update(n=0, die=False)
    results = run_lib.evaluate(config, str(workdir), "eval")[1]
    assert calls["n"] == 2  # batches 1 and 2 of 3 (10 samples in batches of 4); batch 0 was kept
    saved = json.loads((folder / "results.json").read_text())
    for key in ("eval_loss", "bpd", "nelbo_bpd", "fid", "is", "kid"):
        assert key in saved and saved[key] == pytest.approx(results[key])
    assert 0 < saved["bpd"] < 30 and saved["bpd_num_images"] == 8
    assert saved["fid"] >= 0
    assert (folder / "sample_grid.png").exists()
    with np.load(folder / "samples" / "samples_2.npz") as data:
        assert data["samples"].shape == (2, 8, 8, 3) and data["samples"].dtype == np.uint8


def test_sample_mode_writes_png_and_npz(tmp_path):
    workdir = tmp_path / "run"
    config = tiny_config(n_iters=2)
    run_lib.train(config, str(workdir))
    config.sampling.method = "ode"
    config.eval.batch_size = 4
    config.eval.num_samples = 4
    out = run_lib.sample(config, str(workdir), "eval")
    assert sorted(os.listdir(out)) == ["samples_0.npz", "samples_0.png", "train.log"]


def test_evaluate_missing_checkpoint_names_the_file(tmp_path):
    config = tiny_config()
    config.eval.begin_ckpt = config.eval.end_ckpt = 7
    with pytest.raises(FileNotFoundError, match="checkpoint_7.pth"):
        run_lib.evaluate(config, str(tmp_path), "eval")


def test_stf_training_resumes_exactly(tmp_path):
    def config(n_iters):
        c = tiny_config(n_iters=n_iters, stf=True, stf_ref_batch_size=32)
        return c

    straight = run_lib.train(config(3), str(tmp_path / "a"))
    run_lib.train(config(1), str(tmp_path / "b"))
    resumed = run_lib.train(config(3), str(tmp_path / "b"))
    for a, b in zip(flat_state(straight), flat_state(resumed)):
        assert torch.equal(a, b)


def test_blur_corruption_trains_and_samples_from_the_checkpoint_alone(tmp_path):
    from corruption import default_blur_config

    config = tiny_config(n_iters=2, corruption="blur", st=False, importance_sampling=False, truncation_time=1e-3)
    config.blur = default_blur_config()
    config.blur.sigma_max = 4.0
    config.blur.num_steps = 4
    config.blur.prior_fit_images = 32
    config.sampling.method = "momentum"
    workdir = tmp_path / "run"
    run_lib.train(config, str(workdir))
    saved = utils.load_checkpoint_file(str(workdir / "checkpoints" / "checkpoint_1.pth"))
    assert "corruption" in saved and all(isinstance(v, torch.Tensor) for v in saved["corruption"].values())

    # sampling restores the fitted prior from the checkpoint: no data access
    config.data.dataset = "CIFAR10"
    config.data.root = str(tmp_path / "no-data-here")
    config.eval.batch_size = 4
    config.eval.num_samples = 4
    out = run_lib.sample(config, str(workdir), "eval")
    with np.load(os.path.join(out, "samples_0.npz")) as data:
        assert data["samples"].shape == (4, 8, 8, 3)
