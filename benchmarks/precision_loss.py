"""Training loss of the demo in bf16 against fp32: the same seed, data and steps, both curves in one plot.

Trains configs/demo.py twice through main.py (training.precision 'fp32' and 'bf16'; --steps steps, loss logged
every --log-freq steps), unless the work directories already hold a finished run, then reads the two train.log
files and prints, per precision, the mean and standard deviation of the logged losses over the last half of the
run, and the mean difference bf16 - fp32 in units of the fp32 step-to-step standard deviation. Writes
benchmarks/results/precision_loss.{json,png}.

    python benchmarks/precision_loss.py --steps 400 --log-freq 10
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS_LINE = re.compile(r"step: (\d+), training_loss: ([0-9.eE+-]+)")


def train(workdir: str, precision: str, steps: int, log_freq: int, seed: int) -> None:
    """The demo run of this precision (skipped when its last checkpoint exists)."""
    if os.path.exists(os.path.join(workdir, "checkpoints", "checkpoint_1.pth")):
        return
    command = [
        sys.executable,
        "main.py",
        "--config=configs/demo.py",
        f"--workdir={workdir}",
        "--mode=train",
        f"--config.training.n_iters={steps}",
        f"--config.training.log_freq={log_freq}",
        "--config.training.eval_freq=100000000",
        f"--config.training.snapshot_freq={steps}",
        "--config.training.snapshot_sampling=False",
        f"--config.training.precision={precision}",
        f"--config.seed={seed}",
    ]
    subprocess.run(command, cwd=ROOT, check=True)


def logged_losses(workdir: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, training losses) of a run's train.log (the last value of a step if it was logged twice)."""
    by_step = {}
    with open(os.path.join(workdir, "train.log")) as f:
        for line in f:
            match = LOSS_LINE.search(line)
            if match:
                by_step[int(match.group(1))] = float(match.group(2))
    steps = np.array(sorted(by_step))
    return steps, np.array([by_step[s] for s in steps])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--log-freq", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/prec", help="runs go to WORKDIR_fp32 and WORKDIR_bf16")
    parser.add_argument("--results-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()

    curves = {}
    for precision in ("fp32", "bf16"):
        workdir = f"{args.workdir}_{precision}"
        train(workdir, precision, args.steps, args.log_freq, args.seed)
        curves[precision] = logged_losses(workdir)
    summary = {}
    for precision, (steps, loss) in curves.items():
        late = loss[steps > args.steps // 2]
        summary[precision] = {"late_mean": float(late.mean()), "late_std": float(late.std(ddof=1)), "n": len(late)}
    steps32, loss32 = curves["fp32"]
    steps16, loss16 = curves["bf16"]
    common = np.intersect1d(steps32, steps16)
    late = common[common > args.steps // 2]
    diff = loss16[np.isin(steps16, late)] - loss32[np.isin(steps32, late)]
    summary["bf16_minus_fp32"] = {
        "mean": float(diff.mean()),
        "in_fp32_stds": float(diff.mean() / summary["fp32"]["late_std"]),
        "standard_error": float(diff.std(ddof=1) / np.sqrt(len(diff))),
    }
    for precision in ("fp32", "bf16"):
        s = summary[precision]
        print(f"{precision}: logged loss over steps > {args.steps // 2}: {s['late_mean']:.5f} +- {s['late_std']:.5f}")
    d = summary["bf16_minus_fp32"]
    print(
        f"bf16 - fp32: {d['mean']:+.5f} (standard error {d['standard_error']:.5f}; {d['in_fp32_stds']:+.2f} fp32 std)"
    )

    os.makedirs(args.results_dir, exist_ok=True)
    payload = {"steps": args.steps, "log_freq": args.log_freq, "seed": args.seed, "summary": summary}
    payload["curves"] = {p: {"steps": s.tolist(), "loss": v.tolist()} for p, (s, v) in curves.items()}
    with open(os.path.join(args.results_dir, "precision_loss.json"), "w") as f:
        json.dump(payload, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for precision, (steps, loss) in curves.items():
        ax.plot(steps, loss, label=f"training.precision = '{precision}'", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (logged)")
    ax.set_title("demo config, same seed: fp32 vs bf16 autocast")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(args.results_dir, "precision_loss.png"), dpi=120)


if __name__ == "__main__":
    main()
