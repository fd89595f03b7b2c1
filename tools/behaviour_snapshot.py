"""Fingerprint the demo pipeline, to show that a refactor changes no behaviour (bit-identical outputs).

Trains configs/demo.py for a few steps with a fixed seed, evaluates the checkpoint (eval loss, bits/dim, samples)
and samples with the PC and the DPM-Solver samplers, all through main.py as a user would; then writes a manifest
of SHA-256 digests of every produced checkpoint, sample file and result (results.json without its absolute
paths). Run it before and after a change, on the same machine, and compare:

    python tools/behaviour_snapshot.py --out before.json
    ... change the code ...
    python tools/behaviour_snapshot.py --out after.json --compare before.json
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small enough for a couple of CPU minutes; every piece of the pipeline still runs.
TRAIN_FLAGS = [
    "--config.training.n_iters={steps}",
    "--config.training.snapshot_freq={steps}",
    "--config.training.snapshot_freq_for_preemption={steps}",
    "--config.training.snapshot_sampling=False",
    "--config.seed=42",
]
EVAL_FLAGS = [
    "--config.eval.batch_size=16",
    "--config.eval.num_samples=16",
    "--config.eval.max_bpd_batches=1",
    "--config.seed=42",
]
SAMPLERS = {
    "pc": ["--config.sampling.method=pc"],
    "dpm_solver": ["--config.sampling.method=dpm_solver"],
}


def run_main(workdir: str, mode: str, flags: list, eval_folder: str = "eval") -> None:
    """One main.py call on the CPU; fails loudly with its output."""
    cmd = [sys.executable, "main.py", "--config", "configs/demo.py", "--workdir", workdir, "--mode", mode]
    cmd += ["--eval_folder", eval_folder, "--device=cpu", *flags]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")


def sha256(path: str) -> str:
    """Digest of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def results_digest(path: str) -> str:
    """Digest of results.json without its absolute paths (the work directory differs between runs)."""
    with open(path) as f:
        results = json.load(f)
    results = {k: v for k, v in results.items() if not (isinstance(v, str) and os.path.isabs(v))}
    return hashlib.sha256(json.dumps(results, sort_keys=True).encode()).hexdigest()


# Generator states the run never seeds (Python's and NumPy's global generators): saved for exact resume, but they
# differ between two runs of the same command, so they are left out of the meta checkpoint's digest.
UNSEEDED_RNG = ("numpy", "python", "python_pos")


def _feed(digest, value) -> None:
    """Add a checkpoint entry (nested dicts / lists of tensors and numbers) to a digest in a canonical order."""
    import torch

    if isinstance(value, dict):
        for key in sorted(value, key=str):
            digest.update(str(key).encode())
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        for item in value:
            _feed(digest, item)
    elif isinstance(value, torch.Tensor):
        digest.update(str((value.dtype, tuple(value.shape))).encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        digest.update(repr(value).encode())


def meta_checkpoint_digest(path: str) -> str:
    """Digest of the resume checkpoint's contents without the unseeded generator states."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    rng = state.get("rng", {})
    for key in UNSEEDED_RNG:
        rng.pop(key, None)
    digest = hashlib.sha256()
    _feed(digest, state)
    return digest.hexdigest()


def manifest(workdir: str) -> dict:
    """{relative path: digest} of the checkpoints, sample files and results under workdir."""
    out = {}
    for folder, _, files in os.walk(workdir):
        for name in sorted(files):
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, workdir)
            if name == "results.json":
                out[rel] = results_digest(path)
            elif os.path.basename(folder) == "checkpoints-meta":
                out[rel] = meta_checkpoint_digest(path)
            elif name.endswith((".pth", ".npz", ".np", ".png")):
                out[rel] = sha256(path)
    return dict(sorted(out.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where to write the manifest (JSON)")
    parser.add_argument("--compare", default="", help="a manifest of an earlier run: report every difference")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = os.path.join(tmp, "demo")
        run_main(workdir, "train", [f.format(steps=args.steps) for f in TRAIN_FLAGS])
        run_main(workdir, "eval", EVAL_FLAGS)
        for name, flags in SAMPLERS.items():
            run_main(workdir, "sample", EVAL_FLAGS + flags, eval_folder=f"sample_{name}")
        digests = manifest(workdir)
    with open(args.out, "w") as f:
        json.dump(digests, f, indent=1)
    print(f"{len(digests)} files fingerprinted into {args.out}")
    if args.compare:
        with open(args.compare) as f:
            before = json.load(f)
        differing = sorted(k for k in set(before) | set(digests) if before.get(k) != digests.get(k))
        for key in differing:
            print(f"DIFFERS: {key}  before {before.get(key, 'missing')[:12]}  now {digests.get(key, 'missing')[:12]}")
        print("bit-identical" if not differing else f"{len(differing)} of {len(digests)} files differ")
        sys.exit(1 if differing else 0)


if __name__ == "__main__":
    main()
