"""--mode eval and --mode sample under torchrun: the sampling rounds, bits/dim batches and Inception features shared
by 2 gloo processes on CPU give the files and results of one process, and a killed run resumes with another
process count. Also a 2-node rendezvous (2 x 1 processes, c10d, on 127.0.0.1) for a short training and an
evaluation.

Every run here, in-process or spawned, uses one CPU thread, so that the float operations (and thus the uint8
samples) of the processes compared are the same.

Run as a script, this file is the worker that torchrun starts in the 2-node test:
    python tests/test_distributed_eval.py train_eval WORKDIR OUT_DIR
"""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import tiny_config

import distributed
import evaluation
import run_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
STATISTICS = ("fid", "is", "is_std", "kid", "kid_std")  # reductions over features: compared with a tolerance


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _with_eval(config, ckpts=(1, 2), inception_path=None, stats_path=None):
    """Every piece of --mode eval on the tiny model: eval loss, one bits/dim and one NELBO pass of 2 batches (4 and
    2 images), 10 samples in rounds of 4, 4, 2 and, with Inception weights, FID / IS / KID."""
    config.sampling.method = "dpm_solver"
    config.sampling.nfe = 4
    config.sampling.dpm_solver_order = 2
    ev = config.eval
    ev.begin_ckpt, ev.end_ckpt = ckpts
    ev.batch_size = 4
    ev.enable_loss = True
    ev.enable_bpd = True
    ev.nll_iter = ev.bpd_num_repeats = 1
    ev.nelbo_iter = 1
    ev.num_test_data = 6
    ev.max_bpd_batches = 0
    ev.bpd_rtol = ev.bpd_atol = 1e-2
    ev.enable_sampling = True
    ev.num_samples = 10
    ev.enable_fid = inception_path is not None
    ev.inception_path = inception_path or ""
    ev.stats_path = stats_path or ""
    return config


# --- spawned workers -------------------------------------------------------------------------------------------
def _join(rank: int, world: int, port: int) -> None:
    """The environment torchrun gives each process."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)


def _leave() -> None:
    distributed.shutdown()
    for name in TORCHRUN_ENV:
        os.environ.pop(name, None)


def _record_work(log_path: str, die_at_call: int = 0) -> None:
    """Log every sampling round (its seed) and bits/dim batch this process computes to log_path; with die_at_call,
    raise at that sampling round (a killed process)."""
    write, batch = evaluation.write_samples_in_batches, run_lib._bpd_batch
    calls = []

    def logged_write(sampling_fn, model, sample_dir, num_samples, batch_size, seed=None, grid_path=None):
        calls.append(seed)
        if len(calls) == die_at_call:
            raise RuntimeError("killed during sampling")
        with open(log_path, "a") as f:
            f.write(f"round {seed}\n")
        return write(sampling_fn, model, sample_dir, num_samples, batch_size, seed=seed, grid_path=grid_path)

    def logged_batch(dataset, job, *args):
        with open(log_path, "a") as f:
            f.write(f"bpd {job[0]} {job[1]}\n")
        return batch(dataset, job, *args)

    evaluation.write_samples_in_batches = logged_write
    run_lib._bpd_batch = logged_batch


def _eval_worker(rank, world, port, workdir, folder, inception_path, stats_path, log_dir, die_rank, die_at_call):
    _join(rank, world, port)
    try:
        _record_work(os.path.join(log_dir, f"rank{rank}.log"), die_at_call if rank == die_rank else 0)
        config = _with_eval(tiny_config(n_iters=4), inception_path=inception_path, stats_path=stats_path)
        run_lib.evaluate(config, workdir, folder)
    finally:
        _leave()


def _sample_worker(rank, world, port, workdir, folder, log_dir):
    _join(rank, world, port)
    try:
        _record_work(os.path.join(log_dir, f"rank{rank}.log"))
        run_lib.sample(_sample_config(), workdir, folder)
    finally:
        _leave()


def _spawn(fn, world: int, *args) -> None:
    mp.spawn(fn, args=(world, _free_port(), *args), nprocs=world, join=True)


def _work(log_dir) -> list[list[str]]:
    """Per rank, the lines its process logged (sampling rounds and bits/dim batches)."""
    names = sorted(n for n in os.listdir(log_dir) if n.endswith(".log"))
    return [open(os.path.join(log_dir, n)).read().split("\n")[:-1] for n in names]


# --- comparisons -------------------------------------------------------------------------------------------------
def _arrays(path) -> dict:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _assert_same_eval(a, b, ckpts) -> None:
    """Two eval folders hold the same files: samples_r.npz and the bits/dim batches equal, Inception features and
    results.json equal (FID / IS / KID to 1e-6)."""
    for ckpt in ckpts:
        fa, fb = a / f"ckpt_{ckpt}", b / f"ckpt_{ckpt}"
        names = sorted(os.listdir(fa / "samples"))
        assert names == sorted(os.listdir(fb / "samples"))  # no temporary folder left either
        assert [n for n in names if n.startswith("samples_")] == ["samples_0.npz", "samples_1.npz", "samples_2.npz"]
        for name in names:
            left, right = _arrays(fa / "samples" / name), _arrays(fb / "samples" / name)
            assert sorted(left) == sorted(right)
            for key in left:
                if name.startswith("samples_"):
                    assert left[key].dtype == np.uint8 and np.array_equal(left[key], right[key]), (ckpt, name)
                else:
                    np.testing.assert_allclose(left[key], right[key], rtol=1e-6, atol=1e-6)
        chunks = sorted(p.name for p in fa.glob("*.npy"))
        assert chunks == sorted(p.name for p in fb.glob("*.npy")) and len(chunks) == 4
        for name in chunks:
            assert np.array_equal(np.load(fa / name), np.load(fb / name)), (ckpt, name)
        ra = json.loads((fa / "results.json").read_text())
        rb = json.loads((fb / "results.json").read_text())
        assert sorted(ra) == sorted(rb)
        for key, value in ra.items():
            if key in STATISTICS:
                assert rb[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
            else:
                assert rb[key] == value, key


# --- evaluation ----------------------------------------------------------------------------------------------
from test_evaluation import inception_weights  # noqa: E402,F401  (fixture: random Inception weights file)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A work directory with checkpoint_1.pth and checkpoint_2.pth of the tiny model, and reference statistics."""
    workdir = tmp_path_factory.mktemp("trained")
    with _one_thread():
        run_lib.train(tiny_config(n_iters=4), str(workdir))
    rng = np.random.default_rng(0)
    np.savez(workdir / "stats.npz", pool_3=rng.normal(size=(20, 2048)).astype(np.float32))
    return workdir


def test_two_processes_evaluate_like_one_and_a_killed_run_resumes_with_one(
    trained,
    tmp_path,
    inception_weights,  # noqa: F811
):
    workdir, stats = str(trained), str(trained / "stats.npz")
    config = _with_eval(tiny_config(n_iters=4), inception_path=inception_weights, stats_path=stats)
    with _one_thread():
        one = run_lib.evaluate(config, workdir, "one")
    assert sorted(one) == [1, 2] and all(np.isfinite(one[c]["fid"]) and one[c]["bpd_num_images"] == 6 for c in one)

    # 2 processes; rank 1 dies at its 2nd sampling round (checkpoint 2, round 1): checkpoint 1 is complete, the
    # bits/dim of checkpoint 2 as well, its samples in part
    logs = tmp_path / "logs"
    logs.mkdir()
    with pytest.raises(Exception):  # noqa: B017  (rank 1's error, or rank 0's lost connection, whichever is first)
        _spawn(_eval_worker, 2, workdir, "two", inception_weights, stats, str(logs), 1, 2)
    rank0, rank1 = _work(logs)
    seed = tiny_config().seed
    assert [line for line in rank0 if line.startswith("round")][:2] == [f"round {seed + 1000003 + r}" for r in (0, 2)]
    assert [line for line in rank1 if line.startswith("round")] == [f"round {seed + 1000003 + 1}"]
    bpd0, bpd1 = ([line for line in work if line.startswith("bpd")] for work in (rank0, rank1))
    # per checkpoint 2 bits/dim + 2 NELBO batches, one of each per rank (the NELBO reuses the (pass, batch) seeds)
    assert bpd0 == ["bpd 0 0"] * 4 and bpd1 == ["bpd 0 1"] * 4
    folder = trained / "two" / "ckpt_2"
    assert (trained / "two" / "ckpt_1" / "results.json").exists() and not (folder / "results.json").exists()
    assert len(list(folder.glob("*.npy"))) == 4
    left = sorted(n for n in os.listdir(folder / "samples") if n.startswith("samples_"))
    assert "samples_1.npz" not in left

    # resumed by ONE process: only the missing rounds are sampled, and every file equals the one-process run's
    shutil.rmtree(logs)
    logs.mkdir()
    with _one_thread(), _recorder(str(logs / "rank0.log")):
        two = run_lib.evaluate(config, workdir, "two")
    resumed = _work(logs)[0]
    assert sorted(line for line in resumed if line.startswith("round")) == sorted(
        f"round {seed + 2 * 1000003 + r}" for r in range(3) if f"samples_{r}.npz" not in left
    )
    assert not [line for line in resumed if line.startswith("bpd")]
    _assert_same_eval(trained / "one", trained / "two", (1, 2))
    assert two[2]["eval_loss"] == one[2]["eval_loss"]

    # the eval loss of a checkpoint does not depend on the checkpoints evaluated before it
    config.eval.begin_ckpt = 2
    config.eval.enable_bpd = config.eval.enable_sampling = False
    with _one_thread():
        alone = run_lib.evaluate(config, workdir, "alone")[2]
    assert alone["eval_loss"] == one[2]["eval_loss"]


@contextlib.contextmanager
def _recorder(log_path: str):
    """_record_work in this process, undone afterwards."""
    saved = evaluation.write_samples_in_batches, run_lib._bpd_batch
    _record_work(log_path)
    try:
        yield
    finally:
        evaluation.write_samples_in_batches, run_lib._bpd_batch = saved


# --- sample mode -------------------------------------------------------------------------------------------------
def _sample_config():
    config = tiny_config(n_iters=4)
    config.sampling.method = "dpm_solver"
    config.sampling.nfe = 4
    config.eval.batch_size = 4
    config.eval.num_samples = 18  # rounds of 4, 4, 4, 4, 2
    config.eval.sample_ckpt = 2
    return config


def test_sample_mode_killed_in_one_process_resumes_with_two(trained, tmp_path):
    workdir = str(trained)
    with _one_thread():
        one = run_lib.sample(_sample_config(), workdir, "one")
    names = sorted(os.listdir(one))
    assert names == sorted([f"samples_{r}.{ext}" for r in range(5) for ext in ("npz", "png")] + ["train.log"])

    # one process killed after 2 rounds
    calls = {"n": 0}
    write = evaluation.write_samples_in_batches

    def dying_write(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed during sampling")
        return write(*args, **kwargs)

    evaluation.write_samples_in_batches = dying_write
    try:
        with _one_thread(), pytest.raises(KeyboardInterrupt):
            run_lib.sample(_sample_config(), workdir, "mixed")
    finally:
        evaluation.write_samples_in_batches = write
    mixed = os.path.join(workdir, "mixed", "samples_ckpt_2_dpm_solver")
    assert sorted(n for n in os.listdir(mixed) if n != "train.log") == [
        "samples_0.npz",
        "samples_0.png",
        "samples_1.npz",
        "samples_1.png",
    ]

    # resumed by 2 processes: rounds 2, 3, 4 shared (2 and 4 on rank 0, 3 on rank 1); the files equal one process's
    logs = tmp_path / "logs"
    logs.mkdir()
    _spawn(_sample_worker, 2, workdir, "mixed", str(logs))
    seed = tiny_config().seed
    assert _work(logs) == [[f"round {seed + 2}", f"round {seed + 4}"], [f"round {seed + 3}"]]
    assert sorted(os.listdir(mixed)) == names
    for name in names:
        if name.endswith(".npz"):
            a, b = _arrays(os.path.join(one, name))["samples"], _arrays(os.path.join(mixed, name))["samples"]
            assert a.dtype == np.uint8 and a.shape == ((4 if name != "samples_4.npz" else 2), 8, 8, 3)
            assert np.array_equal(a, b), name
        elif name.endswith(".png"):
            with open(os.path.join(one, name), "rb") as f, open(os.path.join(mixed, name), "rb") as g:
                assert f.read() == g.read(), name
    assert not np.array_equal(
        _arrays(os.path.join(one, "samples_0.npz"))["samples"], _arrays(os.path.join(one, "samples_1.npz"))["samples"]
    )


# --- two nodes ---------------------------------------------------------------------------------------------------
def _torchrun_two_nodes(*args: str) -> list[str]:
    """This file as the worker of `torchrun --nnodes=2 --nproc_per_node=1 --rdzv-backend=c10d` on 127.0.0.1, one
    launcher per node as on two machines; returns their outputs."""
    port = _free_port()
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        f"--rdzv-id=eval-{port}",
        "--local-addr=127.0.0.1",
        "--max-restarts=0",
    ]
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    nodes = [
        subprocess.Popen(
            [*launcher, f"--node_rank={node}", os.path.abspath(__file__), *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in range(2)
    ]
    outputs = []
    for node in nodes:
        try:
            outputs.append(node.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for other in nodes:
                other.kill()
            raise
    for node, out in zip(nodes, outputs):
        assert node.returncode == 0, out[-4000:]
    return outputs


def _train_eval_main(workdir: str, out_dir: str) -> None:
    """The torchrun worker: train the tiny model 2 steps data-parallel, then evaluate checkpoint 1 (no FID)."""
    from test_distributed import _ddp_config
    from test_run_lib import flat_state

    torch.set_num_threads(1)
    try:
        state = run_lib.train(_ddp_config(2), workdir)
        params, shadow = flat_state(state)
        rank = distributed.get_rank()
        torch.save(dict(params=params, shadow=shadow, world=distributed.get_world_size()), f"{out_dir}/{rank}.pt")
        run_lib.evaluate(_with_eval(tiny_config(n_iters=2), ckpts=(1, 1)), workdir, "nodes")
    finally:
        distributed.shutdown()


def test_two_nodes_train_and_evaluate_like_one_machine(tmp_path):
    from test_distributed import _train_ddp

    workdir, out = tmp_path / "nodes", tmp_path / "out"
    out.mkdir()
    _torchrun_two_nodes("train_eval", str(workdir), str(out))
    nodes = [torch.load(out / f"{r}.pt", weights_only=True) for r in range(2)]
    assert nodes[0]["world"] == nodes[1]["world"] == 2
    # training: the ranks hold one model, which is that of 2 processes on one machine (same ranks, same slices)
    one_machine = _train_ddp(tmp_path / "machine", 2, tmp_path / "out_machine")
    for key in ("params", "shadow"):
        assert torch.equal(nodes[0][key], nodes[1][key])
        assert torch.equal(nodes[0][key], one_machine[0][key])
    assert sorted(os.listdir(workdir / "checkpoints")) == ["checkpoint_1.pth"]
    # evaluation: the files of one process
    with _one_thread():
        run_lib.evaluate(_with_eval(tiny_config(n_iters=2), ckpts=(1, 1)), str(workdir), "one")
    folder = workdir / "nodes" / "ckpt_1"
    for name in ["results.json", *(p.name for p in folder.glob("*.npy"))]:
        assert (folder / name).exists() and (workdir / "one" / "ckpt_1" / name).exists()
    for name in os.listdir(folder / "samples"):
        a, b = _arrays(folder / "samples" / name), _arrays(workdir / "one" / "ckpt_1" / "samples" / name)
        assert np.array_equal(a["samples"], b["samples"])
    for name in (p.name for p in folder.glob("*.npy")):
        assert np.array_equal(np.load(folder / name), np.load(workdir / "one" / "ckpt_1" / name))
    ra = json.loads((folder / "results.json").read_text())
    rb = json.loads((workdir / "one" / "ckpt_1" / "results.json").read_text())
    assert {k: v for k, v in ra.items() if k != "checkpoint"} == {k: v for k, v in rb.items() if k != "checkpoint"}


if __name__ == "__main__":
    if sys.argv[1] == "train_eval":
        _train_eval_main(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown worker {sys.argv[1]!r}")
