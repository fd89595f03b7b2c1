"""Training loop: resume is exact, checkpoints are atomic, bad input and NaN losses stop with clear errors."""

import glob
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import VECTORS_DIR, tiny_config

import run_lib
import utils
from configs.default_cifar10_configs import get_default_configs
from configs.presets import set_ddpmpp

VECTORS = VECTORS_DIR


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


def test_fp16_run_resumes_with_its_loss_scale(tmp_path):
    """training.precision = 'fp16': the dynamic loss scale and the count of skipped steps are in the checkpoint,
    so 3 + 3 steps equal 6 (the first steps of a fresh scaler overflow and are skipped: a resumed run that started
    again from the initial scale would skip them again and end elsewhere)."""
    config = tiny_config(n_iters=6, precision="fp16", snapshot_freq=3)
    straight = run_lib.train(config, str(tmp_path / "a"))
    run_lib.train(tiny_config(n_iters=3, precision="fp16", snapshot_freq=3), str(tmp_path / "b"))
    resumed = run_lib.train(config, str(tmp_path / "b"))
    assert straight["grad_scaler"].get_scale() == resumed["grad_scaler"].get_scale()
    assert straight["amp_skipped_steps"] == resumed["amp_skipped_steps"] > 0
    for a, b in zip(flat_state(straight), flat_state(resumed)):
        assert torch.equal(a, b)


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
    import parametrization

    def nan_score(self, x, t):  # the DDPM++'s noise prediction turned NaN (gradients flow through the network)
        return self.network(x, t) * float("nan")

    monkeypatch.setattr(parametrization.NoisePrediction, "score", nan_score)
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
    from configs.defaults import default_blur_config

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


# ----------------------------------------------------------------------------------------------------------------
# The fields of both repositories that select what --mode eval computes; evaluation without data; progress


def test_eval_plan_reads_the_fields_of_both_repositories():
    config = tiny_config()
    ev = config.eval
    ev.enable_bpd = True
    ev.nll_iter, ev.bpd_num_repeats = 3, 5  # the Soft Truncation name wins over the default of the older one
    ev.nelbo_iter, ev.num_test_data, ev.residual = 2, 100, False
    plan = run_lib.eval_plan(config)
    assert (plan.nll_passes, plan.nelbo_passes, plan.num_test_data, plan.truncation) == (3, 2, 100, "plain")
    ev.nll_iter, ev.bpd_num_repeats = 5, 2  # ... and the older name, when only it was changed
    assert run_lib.eval_plan(config).nll_passes == 2
    ev.nll_iter = 4
    with pytest.raises(ValueError, match="nll_iter=4 and eval.bpd_num_repeats=2"):
        run_lib.eval_plan(config)
    ev.nll_iter = ev.bpd_num_repeats = 0  # the ST configs' value: no probability-flow NLL, NELBO only
    assert (run_lib.eval_plan(config).nll_passes, run_lib.eval_plan(config).nelbo_passes) == (0, 2)
    ev.enable_bpd = False  # the Soft Truncation repository computes both only under eval.enable_bpd
    assert (run_lib.eval_plan(config).nll_passes, run_lib.eval_plan(config).nelbo_passes) == (0, 0)
    ev.enable_nelbo, ev.nelbo_iter, ev.nll_iter, ev.bpd_num_repeats = True, 0, 1, 1  # this project's switch
    assert run_lib.eval_plan(config).nelbo_passes == 1
    ev.residual = True
    config.data.dequantization = "lossless"
    assert run_lib.eval_plan(config).decoder == "lossless"
    config.sampling.sample_more = False
    assert run_lib.eval_plan(config).sample_more is False
    ev.lambda_ = 0.5
    with pytest.raises(ValueError, match="probability_flow"):
        run_lib.eval_plan(config)  # eval.probability_flow unset: True by default, which needs lambda_ = 0
    ev.probability_flow = False
    assert run_lib.eval_plan(config).lambda_ == 0.5
    ev.residual = False
    with pytest.raises(ValueError, match="eval.residual=True"):
        run_lib.eval_plan(config)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("dequantization", "bogus", "data.dequantization"),
        ("uniform_dequantization", True, "contradicts"),
    ],
)
def test_bad_dequantization_is_rejected(field, value, match):
    config = tiny_config()
    config.data.dequantization = "lossless"
    config.data[field] = value
    with pytest.raises(ValueError, match=match):
        run_lib.validate_config(config)


def test_bits_per_dim_counts_follow_nll_iter_nelbo_iter_num_test_data(tmp_path, capsys, caplog):
    import json
    import logging

    workdir = tmp_path / "run"
    config = tiny_config(n_iters=2)
    run_lib.train(config, str(workdir))
    ev = config.eval
    ev.begin_ckpt, ev.end_ckpt = 0, 3  # only checkpoint_1.pth exists: the others are skipped
    ev.batch_size = 4
    ev.enable_loss = False
    ev.enable_sampling = False
    ev.enable_bpd = True
    ev.nll_iter = ev.bpd_num_repeats = 2
    ev.nelbo_iter = 3
    ev.num_test_data = 6  # 16 eval images in batches of 4: per pass batches of 4 and 2
    ev.max_bpd_batches = 0
    ev.bpd_rtol = ev.bpd_atol = 1e-3
    capsys.readouterr()
    with caplog.at_level(logging.INFO):
        results = run_lib.evaluate(config, str(workdir), "eval")
    assert list(results) == [1]
    folder = workdir / "eval" / "ckpt_1"
    saved = json.loads((folder / "results.json").read_text())
    assert saved["bpd_num_images"] == 2 * 6 and len(saved["bpd_pass_means"]) == 2
    assert saved["nelbo_num_images"] == 3 * 6 and len(saved["nelbo_pass_means"]) == 3
    assert saved["bpd"] == pytest.approx(np.mean(saved["bpd_pass_means"]))
    sizes = [np.load(folder / f"bpd_{i}.npy").size for i in range(4)]
    assert sizes == [4, 2, 4, 2] and not (folder / "bpd_4.npy").exists()
    err = capsys.readouterr().err
    assert "bits/dim ckpt 1" in err and "nfe=" in err and "NELBO ckpt 1" in err  # tqdm bars
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ckpt 1 (")]
    assert len(summary) == 1 and "bpd=" in summary[0] and "nelbo_bpd=" in summary[0]


def test_eval_without_a_dataset_samples_and_says_what_it_skipped(tmp_path, inception_weights, caplog):  # noqa: F811
    import json
    import logging

    workdir = tmp_path / "run"
    config = tiny_config(n_iters=2)
    run_lib.train(config, str(workdir))
    config.data.dataset = "CIFAR10"  # a released checkpoint and no data on this machine
    config.data.root = str(tmp_path / "no-data-here")
    config.data.download = False
    config.sampling.method = "dpm_solver"
    config.sampling.nfe = 3
    ev = config.eval
    ev.begin_ckpt = ev.end_ckpt = 1
    ev.batch_size = 4
    ev.num_samples = 6
    ev.enable_loss = ev.enable_bpd = ev.enable_nelbo = ev.enable_sampling = ev.enable_fid = True
    ev.inception_path = inception_weights
    ev.stats_path = str(tmp_path / "stats.npz")  # not there yet
    with caplog.at_level(logging.INFO):
        run_lib.evaluate(config, str(workdir), "eval")
    folder = workdir / "eval" / "ckpt_1"
    saved = json.loads((folder / "results.json").read_text())
    assert sorted(saved["skipped"]) == ["bpd", "eval_loss", "fid", "nelbo_bpd"]
    assert all("no CIFAR10 data" in reason for reason in saved["skipped"].values())
    assert "no reference statistics" in saved["skipped"]["fid"] and "fid" not in saved and "bpd" not in saved
    assert sorted(os.listdir(folder / "samples")) == ["samples_0.npz", "samples_1.npz"]
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ckpt 1 (")]
    assert "skipped" in summary[0] and "eval_loss: no CIFAR10 data" in summary[0]

    # reference statistics but still no data: FID of the samples already on disk (sampling.sample_more=False)
    rng = np.random.default_rng(0)
    np.savez(ev.stats_path, pool_3=rng.normal(size=(20, 2048)).astype(np.float32))
    config.sampling.sample_more = False

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampling.sample_more=False must not draw samples")

    original = run_lib.get_sampling_fn_from_config
    run_lib.get_sampling_fn_from_config = no_sampling
    try:
        results = run_lib.evaluate(config, str(workdir), "eval")[1]
    finally:
        run_lib.get_sampling_fn_from_config = original
    assert results["fid"] >= 0 and results["num_samples"] == 6 and "fid" not in results["skipped"]
    assert sorted(results["skipped"]) == ["bpd", "eval_loss", "nelbo_bpd"]
    # no samples on disk and sample_more=False: said so
    results = run_lib.evaluate(config, str(workdir), "eval_empty")[1]
    assert "sample_more=False" in results["skipped"]["samples"]


def test_lossless_dequantization_evaluates_the_discrete_likelihood(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    config = tiny_config(n_iters=2)
    run_lib.train(config, str(workdir))
    config.data.dequantization = "lossless"
    ev = config.eval
    ev.begin_ckpt = ev.end_ckpt = 1
    ev.batch_size = 4
    ev.enable_loss = ev.enable_sampling = False
    ev.enable_bpd, ev.nll_iter, ev.bpd_num_repeats, ev.max_bpd_batches = True, 1, 1, 1
    seen = {}
    import likelihood

    original = likelihood.get_likelihood_fn

    def spy(*args, **kwargs):
        seen.update(kwargs)
        fn = original(*args, **kwargs)

        def wrapped(model, data):
            seen["data"] = data
            return fn(model, data)

        return wrapped

    monkeypatch.setattr(likelihood, "get_likelihood_fn", spy)
    results = run_lib.evaluate(config, str(workdir), "eval")[1]
    assert seen["decoder"] == "lossless" and seen["truncation"] == "exact"
    levels = seen["data"].double() * 255.0  # uncentered data: the 8-bit levels themselves, not dequantized
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert np.isfinite(results["bpd"]) and results["bpd_num_images"] == 4


@pytest.mark.parametrize("mode,dequantized", [("none", False), ("uniform", True)])
def test_data_dequantization_drives_training_batches(tmp_path, monkeypatch, mode, dequantized):
    config = tiny_config(n_iters=1)
    config.data.dequantization = mode
    batches = []
    original = run_lib.losses.Objective.step_fn

    def spy(self, train, optimize_fn=None):
        fn = original(self, train, optimize_fn)

        def step(state, batch, reference=None):
            if train:
                batches.append(batch.clone())
            return fn(state, batch, reference=reference)

        return step

    monkeypatch.setattr(run_lib.losses.Objective, "step_fn", spy)
    run_lib.train(config, str(tmp_path))
    levels = batches[0].double() * 255.0
    on_grid = torch.allclose(levels, levels.round(), atol=1e-4)
    assert on_grid is not dequantized


def test_whatever_sampling_samples_at_every_step(tmp_path):
    config = tiny_config(n_iters=2, snapshot_sampling=True, whatever_sampling=True)
    config.sampling.method = "dpm_solver"
    config.sampling.nfe = 2
    config.sampling.batch_size = 2
    run_lib.train(config, str(tmp_path / "a"))
    assert sorted(os.listdir(tmp_path / "a" / "samples")) == ["iter_1", "iter_2"]
    config.training.whatever_sampling = False
    run_lib.train(config, str(tmp_path / "b"))
    assert sorted(os.listdir(tmp_path / "b" / "samples")) == ["iter_2"]
