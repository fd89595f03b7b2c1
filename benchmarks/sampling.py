"""Sampling speed: images per second of each sampler at a fixed number of network evaluations, in fp32 and with
eval.precision = 'bf16', side by side in one run (ratios to the PC sampler in fp32).

The network is the config's, freshly initialised (speed does not depend on the weights); every sampler makes the
same number of network evaluations (--nfe), so the ratios show each sampler's own overhead and the precision's
gain. One untimed call per variant first (allocations, autocast caches), then the median of --repeats calls.

    python benchmarks/sampling.py --config configs/demo.py --batch 64 --nfe 20
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import datasets  # noqa: E402
import run_lib  # noqa: E402
import sampling  # noqa: E402
import sde_lib  # noqa: E402
from benchmarks.train_step import cpu_name  # noqa: E402
from configs.defaults import complete_config  # noqa: E402

METHODS = ("pc", "dpm_solver", "heun", "edm_stochastic", "dpm_solver_sde", "euler_ancestral")


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("benchmark_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return complete_config(module.get_config())


def time_sampler(config, model, method: str, precision: str, nfe: int, batch: int, repeats: int) -> tuple[float, int]:
    """(median seconds per call, network evaluations per call) of one sampler."""
    config = complete_config(config)
    with config.unlocked():
        config.sampling.method = method
        config.sampling.nfe = nfe
        config.sampling.num_steps = nfe  # the PC chain: nfe steps, one evaluation each
        config.sampling.predictor = "reverse_diffusion"
        config.sampling.corrector = "none"
        config.eval.precision = precision
    sde, eps = sde_lib.get_sde(config)
    shape = (batch, config.data.num_channels, config.data.image_size, config.data.image_size)
    fn = sampling.get_sampling_fn(config, sde, shape, datasets.get_data_inverse_scaler(config), eps)
    _, used = fn(model)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(model)
        times.append(time.perf_counter() - start)
    return statistics.median(times), int(used)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.py"))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--nfe", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "sampling.json"))
    args = parser.parse_args()

    device = torch.device(args.device)
    config = load_config(args.config)
    config.device = device
    torch.manual_seed(0)
    model = run_lib.build_state(config, device)["model"].eval()
    rows = []
    for precision in args.precisions.split(","):
        for method in args.methods.split(","):
            seconds, used = time_sampler(config, model, method, precision, args.nfe, args.batch, args.repeats)
            rows.append({"method": method, "precision": precision, "nfe": used, "seconds": seconds})
    base = next(
        r["seconds"] for r in rows if r["method"] == rows[0]["method"] and r["precision"] == rows[0]["precision"]
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"device {device} ({name}); {args.config}, batch {args.batch}, {args.nfe} network evaluations")
    for r in rows:
        r["images_per_s"] = args.batch / r["seconds"]
        r["speed_vs_first"] = base / r["seconds"]
        print(
            f"{r['method']:16s} {r['precision']:5s} NFE {r['nfe']:3d}  {r['seconds']:7.2f} s  "
            f"{r['images_per_s']:7.1f} images/s  {r['speed_vs_first']:5.2f}x"
        )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        payload = {"device": f"{device} ({name})", "config": args.config, "batch": args.batch, "rows": rows}
        json.dump(payload, f, indent=1)


if __name__ == "__main__":
    main()
