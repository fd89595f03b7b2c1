"""Training-step speed of the fast-path options, side by side in one run (issue: the fast path).

One full training step (forward, backward, optimizer, EMA) of the full-size DDPM++ of the Soft Truncation config
vp/CIFAR10/ddpmpp_nll_st and the NCSN++ of score_sde's ve/cifar10_ncsnpp_continuous, at batch 16, for fp32 eager
(today's path) and each option of config.training (precision, channels_last, compile, grad_checkpoint) and
config.optim.fused, and the best combination. Every variant runs in its own process (fresh compile caches, its own
peak-memory figure: CUDA max_memory_allocated, or the process's peak resident set on the CPU), warm-up steps
first, then the median of the timed steps. Each variant also times the network alone (forward and backward of
model(x, labels) under the variant's autocast, nothing else) and the update alone (gradient norm, optimizer step
and EMA on fixed gradients), so that the table shows whether the whole step keeps what the network gains: "rest"
= step - network - update is what the step costs beyond the two (loss, time sampling, noise; about zero).
Prints a table with ratios to fp32 eager and writes a JSON file.

    python benchmarks/train_step.py                       # both models, every variant (fp16 on GPUs only)
    python benchmarks/train_step.py --models ddpmpp --steps 3 --variants fp32,bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODELS = {
    "ddpmpp": "configs/vp/CIFAR10/ddpmpp_nll_st.py",
    "ncsnpp": "configs/ve/cifar10_ncsnpp_continuous.py",
}
# variant -> overrides of config.training / config.optim
VARIANTS = {
    "fp32": {},
    "bf16": {"training.precision": "bf16"},
    "fp16": {"training.precision": "fp16"},
    "channels_last": {"training.channels_last": True},
    "fused_adam": {"optim.fused": True},
    "grad_checkpoint": {"training.grad_checkpoint": True},
    "compile": {"training.compile": True},
    "bf16+compile": {"training.precision": "bf16", "training.compile": True},
    "best": {
        "training.precision": "bf16",
        "training.compile": True,
        "training.channels_last": True,
        "optim.fused": True,
    },
}


def cpu_name() -> str:
    """The CPU model (lscpu's 'Model name'), and whether it has bf16 matrix units (amx_bf16)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    flags = next((line for line in out.splitlines() if line.startswith("Flags")), "")
    units = [f for f in ("amx_bf16", "avx512_bf16") if f in flags.split()]
    return f"{name} ({os.cpu_count()} threads; {', '.join(units) or 'no bf16 units'})"


def load_config_file(path: str):
    """get_config() of a config file given relative to the repository root."""
    import importlib

    return importlib.import_module(path[: -len(".py")].replace("/", ".")).get_config()


def time_call(fn, cuda: bool) -> float:
    """Seconds of one call of fn (waiting for the GPU's queue before and after when cuda)."""
    import torch

    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _timed(fn, count: int, warmup: int, cuda: bool) -> tuple[list, float]:
    """(durations of `count` calls of fn after `warmup` calls, duration of the first call)."""
    times, first = [], 0.0
    for i in range(warmup + count):
        seconds = time_call(fn, cuda)
        if i == 0:
            first = seconds
        if i >= warmup:
            times.append(seconds)
    return times, first


def run_variant(model: str, variant: str, batch: int, steps: int, warmup: int, device: str) -> dict:
    """Time `steps` training steps after `warmup` ones, then the network's forward + backward alone, in this
    process."""
    import torch

    import losses
    import parametrization
    import run_lib
    from configs.defaults import complete_config

    config = complete_config(load_config_file(MODELS[model]))
    with config.unlocked():
        config.device = torch.device(device)
        config.training.batch_size = batch
        for key, value in VARIANTS[variant].items():
            section, field = key.split(".")
            setattr(getattr(config, section), field, value)
    torch.manual_seed(0)
    dev = torch.device(device)
    state = run_lib.build_state(config, dev)
    sde, _ = run_lib.get_corruption(config)
    objective = losses.get_objective(config, sde)
    step_fn = objective.step_fn(train=True, optimize_fn=losses.optimization_manager(config))
    shape = (batch, config.data.num_channels, config.data.image_size, config.data.image_size)
    data = torch.rand(shape, device=dev) * 2 - 1
    if config.training.channels_last:
        data = data.contiguous(memory_format=torch.channels_last)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, first = _timed(lambda: step_fn(state, data), steps, warmup, cuda)
    if cuda:
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    # the network alone: forward and backward of model(x, labels) under the variant's autocast
    net = parametrization.get_parametrization(
        sde,
        state["model"],
        train=True,
        continuous=bool(config.training.continuous),
        config=config,
        precision=config.training.precision,
    )
    t = torch.rand(batch, device=dev) * (sde.T - 1e-3) + 1e-3

    def network_pass():
        net.network(data, t).float().square().mean().backward()
        state["model"].zero_grad(set_to_none=True)

    net_times, _ = _timed(network_pass, steps, 1, cuda)

    # the update alone: gradient norm, Adam (with warm-up and clipping as configured) and the EMA, on fixed gradients
    net.network(data, t).float().square().mean().backward()
    optimize_fn = losses.optimization_manager(config)
    params = list(state["model"].parameters())

    def update_pass():
        torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        optimize_fn(state["optimizer"], params, step=state["step"])
        state["ema"].update(params)

    update_times, _ = _timed(update_pass, steps, 1, cuda)
    return {
        "step_s": statistics.median(times),
        "network_s": statistics.median(net_times),
        "update_s": statistics.median(update_times),
        "first_step_s": first,
        "peak_mb": peak_mb,
        "steps": len(times),
    }


def run_child(model: str, variant: str, args) -> dict:
    """One variant in a fresh process: its result, or {'error': ...} (a failure or a timeout)."""
    cmd = [sys.executable, __file__, "--child", model, variant, "--batch", str(args.batch)]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {
            "error": f"not finished after {args.timeout} s ({args.warmup + args.steps} steps, {args.steps + 1} "
            f"network passes)"
        }
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        errors = [ln for ln in lines if ln and not ln.startswith(" ") and ("Error" in ln or "Exception" in ln)]
        return {"error": (errors or lines or ["no output"])[-1][:300]}
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--variants", default="", help="comma-separated; default: all (all but fp16 on the CPU)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed to one variant")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "train_step.json"))
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = run_variant(args.child[0], args.child[1], args.batch, args.steps, args.warmup, args.device)
        print("RESULT " + json.dumps(result))
        return
    variants = args.variants.split(",") if args.variants else list(VARIANTS)
    if not args.variants and args.device == "cpu":
        variants.remove("fp16")  # fp16 autocast on a CPU without fp16 arithmetic is emulated: many times slower
        print("fp16 left out on the CPU (emulated there; ask for it with --variants)")
    machine = cpu_name() if args.device == "cpu" else _gpu_name()
    print(f"device: {args.device}, {machine}; batch {args.batch}, median of {args.steps} steps after {args.warmup}")
    results = {"machine": machine, "device": args.device, "batch": args.batch, "steps": args.steps, "models": {}}
    for model in args.models.split(","):
        rows = {}
        for variant in variants:
            rows[variant] = row = run_child(model, variant, args)
            if "error" in row:
                print(f"{model:8s} {variant:16s} failed: {row['error']}", flush=True)
                continue
            base = rows.get("fp32", {})
            ratio = f"{base['step_s'] / row['step_s']:.2f}x" if "step_s" in base else "-"
            net_ratio = f"{base['network_s'] / row['network_s']:.2f}x" if "network_s" in base else "-"
            print(
                f"{model:8s} {variant:16s} {row['step_s']:8.3f} s/step  {ratio:>6s} vs fp32  "
                f"network alone {row['network_s']:7.3f} s  {net_ratio:>6s}  update alone {row['update_s']:6.3f} s  "
                f"rest {row['step_s'] - row['network_s'] - row['update_s']:+6.3f} s  "
                f"first step {row['first_step_s']:7.1f} s  peak {row['peak_mb']:8.0f} MB",
                flush=True,
            )
        if "step_s" in rows.get("fp32", {}) and len(variants) > 1:
            # the baseline once more at the end: how far the machine's speed drifted during the run
            again = run_child(model, "fp32", args)
            rows["fp32_again"] = again
            if "step_s" in again:
                drift = again["step_s"] / rows["fp32"]["step_s"] - 1
                print(f"{model:8s} fp32 again       {again['step_s']:8.3f} s/step  (drift {drift:+.0%})", flush=True)
        results["models"][model] = rows
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


if __name__ == "__main__":
    main()
