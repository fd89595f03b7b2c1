"""Data-parallel training (torchrun / DistributedDataParallel), checked with 2 gloo processes on CPU."""

import copy
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_config
from test_run_lib import flat_state

import datasets
import distributed
import losses
import run_lib
import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    """The environment torchrun gives each process."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)


def _leave() -> None:
    distributed.shutdown()
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        os.environ.pop(name, None)


# --- single-process pieces ---------------------------------------------------------------------------------
def test_without_torchrun_everything_is_single_process():
    assert not distributed.launched_by_torchrun()
    assert distributed.init_from_env(torch.device("cpu")) == torch.device("cpu")
    assert (distributed.get_rank(), distributed.get_world_size()) == (0, 1)
    x = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_mean(x) is x
    assert distributed.broadcast_float(0.25, torch.device("cpu")) == 0.25
    assert distributed.gather_objects("a") == ["a"]


def test_rank_slices_concatenate_to_the_single_process_batch():
    """Rank r gets the r-th contiguous slice of the global batch, random flips included, at every position."""
    config = tiny_config()
    train_set = datasets.get_train_dataset(config)
    single = run_lib.TrainStream(train_set, 8, seed=3, random_flip=True, position=5)
    ranks = [run_lib.TrainStream(train_set, 8, 3, True, position=5, rank=r, world_size=2) for r in range(2)]
    flipped_somewhere = False
    for _ in range(10):  # crosses an epoch boundary (64 images, 8 batches per epoch)
        whole = next(single)
        parts = [next(stream) for stream in ranks]
        assert parts[0].shape[0] == parts[1].shape[0] == 4
        assert torch.equal(torch.cat(parts), whole)
    unflipped = run_lib.TrainStream(train_set, 8, seed=3, random_flip=False, position=5)
    for _ in range(10):
        flipped_somewhere |= not torch.equal(next(unflipped), next(run_lib.TrainStream(train_set, 8, 3, True, 5)))
    assert flipped_somewhere


def test_global_batch_must_divide_among_processes():
    assert run_lib.rank_slice(12, 2, 3) == (8, 12)
    with pytest.raises(ValueError, match="not divisible by the 2 data-parallel processes"):
        run_lib.rank_slice(7, 0, 2)


# --- one optimisation step under DDP ---------------------------------------------------------------------
EPS = 1e-3


def _step_worker(rank, world, port, out_dir):
    _join(rank, world, port)
    dist.init_process_group("gloo")
    try:
        config = tiny_config()
        torch.manual_seed(0)  # same initial weights on both ranks
        state = run_lib.build_state(config, torch.device("cpu"))
        sde, _ = run_lib.get_corruption(config)
        network = state["model"]
        reference_net = copy.deepcopy(network)
        state["model"] = torch.nn.parallel.DistributedDataParallel(network)
        options = dict(likelihood_weighting=True, eps=EPS, importance_sampling=True)
        step_fn = losses.get_step_fn(
            sde,
            train=True,
            optimize_fn=lambda *a, **k: None,
            reduce_mean=True,
            st=True,
            k=1.0,
            num_micro_batch=2,
            **options,
        )
        whole = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(123)) * 2 - 1
        local = whole[rank * 4 : (rank + 1) * 4]
        torch.manual_seed(100 + rank)  # the ranks draw different noise and different candidate taus
        rng = torch.get_rng_state()
        loss = step_fn(state, local)
        ddp_grads = torch.cat([p.grad.flatten() for p in network.parameters()])

        # Independent computation: each rank's gradient of its own loss at rank 0's tau, then the mean.
        torch.set_rng_state(rng)
        own_tau = losses.sample_tau(True, 1.0, EPS)
        tau = distributed.gather_objects(own_tau)[0]
        loss_fn = losses.get_per_sample_loss_fn(sde, train=True, reduce_mean=True, continuous=True, **options)
        local_total = 0.0
        for chunk in torch.tensor_split(local, 2):
            chunk_loss = torch.mean(loss_fn(reference_net, chunk, tau=tau))
            (chunk_loss * chunk.shape[0] / local.shape[0]).backward()
            local_total += float(chunk_loss) * chunk.shape[0] / local.shape[0]
        own_grads = torch.cat([p.grad.flatten() for p in reference_net.parameters()])
        expected = torch.stack(distributed.gather_objects(own_grads)).mean(0)
        torch.save(
            dict(
                ddp=ddp_grads,
                expected=expected,
                own=own_grads,
                own_tau=own_tau,
                loss=float(loss),
                losses=distributed.gather_objects(local_total),
            ),
            os.path.join(out_dir, f"step_{rank}.pt"),
        )
    finally:
        _leave()


def test_ddp_step_averages_the_ranks_gradients_at_one_shared_tau(tmp_path):
    """The synced gradient equals the mean of the per-rank gradients (micro-batches included) computed at rank
    0's tau; the reported loss is the mean over ranks, identical on every rank."""
    mp.spawn(_step_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"step_{r}.pt", weights_only=True) for r in range(2)]
    assert results[0]["own_tau"] != results[1]["own_tau"]  # without the broadcast, rank 1 would use its own tau
    assert not torch.allclose(results[0]["own"], results[1]["own"])
    for result in results:
        torch.testing.assert_close(result["ddp"], result["expected"], rtol=1e-5, atol=1e-7)
        assert result["loss"] == pytest.approx(sum(result["losses"]) / 2, rel=1e-6)
    assert results[0]["loss"] == results[1]["loss"]


# --- the training loop under DDP -----------------------------------------------------------------------------
def _ddp_config(n_iters: int):
    config = tiny_config(n_iters=n_iters, stf=True, stf_ref_batch_size=12, stf_gather=True)
    config.optim.num_micro_batch = 2
    return config


def _train_worker(rank, world, port, workdir, n_iters, out_dir):
    _join(rank, world, port)
    try:
        state = run_lib.train(_ddp_config(n_iters), workdir)
        params, shadow = flat_state(state)
        torch.save(dict(params=params, shadow=shadow, step=state["step"]), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        _leave()


def _train_ddp(workdir, n_iters, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    mp.spawn(_train_worker, args=(2, _free_port(), str(workdir), n_iters, str(out_dir)), nprocs=2, join=True)
    return [torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=True) for r in range(2)]


@pytest.mark.slow
def test_ddp_training_keeps_ranks_in_step_writes_once_and_resumes_exactly(tmp_path):
    straight = _train_ddp(tmp_path / "a", 4, tmp_path / "out_a")
    for key in ("params", "shadow"):
        assert torch.equal(straight[0][key], straight[1][key])  # the ranks hold one model
    assert straight[0]["step"] == 4

    # rank 0 alone wrote score_sde's layout; the file holds the ranks' model and their RNG streams
    workdir = tmp_path / "a"
    assert sorted(os.listdir(workdir / "checkpoints")) == ["checkpoint_1.pth", "checkpoint_2.pth"]
    saved = utils.load_checkpoint_file(str(workdir / "checkpoints-meta" / "checkpoint.pth"))
    restored = run_lib.build_state(_ddp_config(4), torch.device("cpu"))["model"]
    utils.load_model_state_strict(restored, saved["model"], "meta checkpoint")
    assert torch.equal(torch.cat([p.detach().flatten() for p in restored.parameters()]), straight[0]["params"])
    assert len(saved["rng"]["rank_states"]) == 2
    assert (workdir / "train.log").read_text().count("training_loss") >= 4

    # killed after 2 steps and relaunched: the same parameters as the uninterrupted run
    _train_ddp(tmp_path / "b", 2, tmp_path / "out_b1")
    resumed = _train_ddp(tmp_path / "b", 4, tmp_path / "out_b2")
    for key in ("params", "shadow"):
        assert torch.equal(resumed[0][key], straight[0][key])


@pytest.mark.slow
def test_torchrun_command_of_the_readme(tmp_path):
    """`torchrun --nproc_per_node=2 main.py ... --mode train` (gloo on CPU): one set of files, one log; then
    `--mode eval` under the same launcher writes one results.json and the samples of both ranks' rounds."""
    workdir = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}"]
    args = [
        "main.py",
        "--config=configs/demo_stf.py",
        f"--workdir={workdir}",
        "--mode=train",
        "--config.training.n_iters=2",
        "--config.training.snapshot_freq=2",
        "--config.training.batch_size=8",
        "--config.training.stf_gather=True",
        "--config.training.snapshot_sampling=False",
        "--device=cpu",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run(launcher + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (workdir / "train.log").read_text()
    assert "Starting training loop at step 0 of 2. (2 data-parallel processes)" in log
    assert log.count("Training finished at step 2") == 1  # rank 0 alone writes the log
    assert sorted(os.listdir(workdir / "checkpoints")) == ["checkpoint_1.pth"]
    saved = utils.load_checkpoint_file(str(workdir / "checkpoints-meta" / "checkpoint.pth"))
    assert saved["step"] == 2 and len(saved["rng"]["rank_states"]) == 2

    args[3] = "--mode=eval"
    args += [
        "--config.eval.begin_ckpt=1",
        "--config.eval.end_ckpt=1",
        "--config.eval.enable_bpd=False",
        "--config.eval.enable_loss=False",
        "--config.eval.enable_sampling=True",
        "--config.eval.enable_fid=False",
        "--config.eval.num_samples=8",
        "--config.eval.batch_size=4",
        "--config.sampling.num_steps=4",
    ]
    proc = subprocess.run(launcher + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt_dir = workdir / "eval" / "ckpt_1"
    assert (ckpt_dir / "results.json").exists()
    rounds = sorted(name for name in os.listdir(ckpt_dir / "samples") if name.startswith("samples_"))
    assert rounds == ["samples_0.npz", "samples_1.npz"], rounds
