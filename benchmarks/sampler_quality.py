"""Sample quality against network evaluations for every sampler on a trained checkpoint (default: the demo).

Samplers (each at the NFE budgets --nfes, the nearest feasible budget at or below, the same seed for all), all
through sampling.get_sampling_fn with config.sampling.method = NAME and the given config.sampling fields:
  pc              reverse-diffusion predictor, no corrector, sampling.num_steps = NFE (the network is unchanged)
  dpm_solver      deterministic DPM-Solver++ (dpm_solver_order, grid 'logsnr')
  heun            EDM's deterministic Heun sampler (grid 'edm', rho = 7)
  edm_stochastic  EDM's stochastic sampler (s_churn, s_tmin, s_tmax, s_noise, time_schedule)
  dpm_solver_sde  DPM-Solver++(2M/3M) SDE (dpm_solver_sde_order, sde_eta, s_noise, time_schedule)
  euler_ancestral Euler ancestral (sde_eta, s_noise, time_schedule)
A sampler is given as NAME or NAME:field=value,field=value (e.g. edm_stochastic:s_churn=40,s_tmin=0.05); the
final denoising step follows config.sampling.noise_removal for every sampler (PC's costs no evaluation; the fast
samplers' one is counted in their NFE).

Distance: experiments.common.dct_fd, the Frechet distance between Gaussian fits of the lowest --block x --block
DCT coefficients per channel (6 x 6: 108 features) of the samples and of --num-real held-out images; for scale,
the same distance between disjoint sets of training images and the held-out set. FID as well when the Inception
weights are present (evaluation.resolve_inception_path without download), skipped with a message otherwise.

Outputs: <results-dir>/sampler_quality.json (written after every run, so a partial run keeps its results) and
sampler_quality.png (distance vs NFE, log x), a markdown table and a recommendation on stdout.

Run: python benchmarks/sampler_quality.py [--workdir /tmp/demo_run] [--config configs/demo.py] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import datasets  # noqa: E402
import evaluation  # noqa: E402
import run_lib  # noqa: E402
import utils  # noqa: E402
from configs.defaults import complete_config  # noqa: E402
from experiments.common import dct_fd, draw_samples, eval_images, write_json  # noqa: E402

NFES = (10, 20, 35, 50, 100, 200)
# The default line-up: the existing samplers and the stochastic ones with the settings that did best on the demo
# model (benchmarks/results/sampler_quality.json).
DEFAULT_SAMPLERS = (
    "pc",
    "dpm_solver",
    "heun",
    "edm_stochastic:s_churn=40,s_tmin=0.05,s_tmax=50",
    "dpm_solver_sde",
    "euler_ancestral",
)
# config.sampling fields a spec may set, per method (text fields stay strings, the others become numbers).
METHOD_FIELDS = {
    "pc": (),
    "dpm_solver": ("dpm_solver_order", "time_schedule"),
    "heun": ("time_schedule",),
    "edm_stochastic": ("s_churn", "s_tmin", "s_tmax", "s_noise", "time_schedule"),
    "dpm_solver_sde": ("dpm_solver_sde_order", "sde_eta", "s_noise", "time_schedule"),
    "euler_ancestral": ("sde_eta", "s_noise", "time_schedule"),
}
INTEGER_FIELDS = ("dpm_solver_order", "dpm_solver_sde_order")


def parse_spec(spec: str) -> tuple[str, dict]:
    """'NAME:field=value,...' -> (NAME, {config.sampling field: value})."""
    name, _, rest = spec.partition(":")
    if name not in METHOD_FIELDS:
        raise ValueError(f"Unknown sampler {name!r} in {spec!r}; valid: {sorted(METHOD_FIELDS)}.")
    options = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in METHOD_FIELDS[name]:
            raise ValueError(f"Bad option {item!r} in {spec!r}; {name} takes {list(METHOD_FIELDS[name])}.")
        options[key] = value if key == "time_schedule" else int(value) if key in INTEGER_FIELDS else float(value)
    return name, options


def load_config(path: str):
    """get_config() of a config file (configs/demo.py by default), completed with the defaults."""
    spec = importlib.util.spec_from_file_location("benchmark_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return complete_config(module.get_config())


def load_model(config, workdir: str, device: torch.device) -> torch.nn.Module:
    """The network of <workdir>/checkpoints/checkpoint_1.pth with its EMA weights, in eval mode."""
    path = os.path.join(workdir, "checkpoints", "checkpoint_1.pth")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: train first (python main.py --mode train).")
    state = utils.restore_checkpoint(path, run_lib.build_state(config, device), device)
    state["ema"].copy_to(state["model"].parameters())
    return state["model"].eval()


def draw(config, model, name: str, options: dict, nfe: int, num: int, seed: int, batch: int):
    """Samples [num, C, H, W] in [0, 1] of method `name` at budget nfe, and the evaluations it made."""
    cfg = copy.deepcopy(config)
    cfg.sampling.method = name
    cfg.sampling.nfe = nfe
    if name == "pc":
        cfg.sampling.predictor = "reverse_diffusion"
        cfg.sampling.corrector = "none"
        cfg.sampling.num_steps = nfe  # model.num_scales (the network's buffers) stays the checkpoint's
    for key, value in options.items():
        cfg.sampling[key] = value
    return draw_samples(cfg, model, num, seed, batch=batch)


def fid_setup(real: torch.Tensor, device):
    """(inception model, real features) when the Inception weights are present, else (None, None) + a message."""
    try:
        path = evaluation.resolve_inception_path(None, download=False)
        net = evaluation.get_inception_model(weights_path=path, device=device, download=False)
    except (FileNotFoundError, ImportError, ValueError) as err:
        print(f"FID skipped: {err}")
        return None, None
    return net, inception_pool(net, real, device)


def inception_pool(net, images: torch.Tensor, device) -> np.ndarray:
    """pool_3 features [N, 2048] of images in [0, 1]."""
    feats = []
    for chunk in torch.split(images, 64):
        pool, _ = net(evaluation.to_uint8_nchw(chunk).to(device))
        feats.append(pool.cpu().numpy())
    return np.concatenate(feats).astype(np.float64)


def markdown_table(rows: list[dict], labels: list[str], nfes) -> str:
    """One row per sampler, one column per NFE budget: 'distance (nfe)'."""
    head = "| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |"
    lines = [head, "|" + "---|" * (len(nfes) + 1)]
    for label in labels:
        cells = []
        for n in nfes:
            hit = [r for r in rows if r["sampler"] == label and r["budget"] == n]
            if not hit:
                cells.append("-")
            elif hit[0]["diverged"]:
                cells.append(f"diverged ({hit[0]['nfe']})")
            else:
                cells.append(f"{hit[0]['dct_fd']:.2f} ({hit[0]['nfe']})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def recommendation(rows: list[dict], reference: float | None) -> str:
    """The cheapest run within 1.2 x the 200-step PC distance, and the best run at <= 50 NFE."""
    rows = [r for r in rows if not r["diverged"]]
    if not rows:
        return "No results."
    small = [r for r in rows if r["nfe"] <= 50]
    best_small = min(small, key=lambda r: r["dct_fd"]) if small else None
    text = []
    if reference is not None:
        ok = sorted((r for r in rows if r["dct_fd"] <= 1.2 * reference), key=lambda r: (r["nfe"], r["dct_fd"]))
        if ok:
            r = ok[0]
            text.append(
                f"Recommended: {r['sampler']} at {r['nfe']} NFE (DCT-FD {r['dct_fd']:.2f} <= 1.2 x the 200-step "
                f"PC's {reference:.2f})."
            )
        else:
            text.append(f"No run reaches 1.2 x the 200-step PC distance {reference:.2f}.")
    if best_small is not None:
        text.append(
            f"Best at <= 50 NFE: {best_small['sampler']} at {best_small['nfe']} NFE: {best_small['dct_fd']:.2f}."
        )
    return " ".join(text)


def plot(rows: list[dict], labels: list[str], reference: float | None, real: list[float], path: str) -> None:
    """Distance vs NFE, one line per sampler, log x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for label in labels:
        pts = sorted((r["nfe"], r["dct_fd"]) for r in rows if r["sampler"] == label and not r["diverged"])
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    if reference is not None:
        ax.axhline(reference, color="k", ls="--", lw=1, label=f"PC 200 steps ({reference:.2f})")
        ax.axhline(1.2 * reference, color="k", ls=":", lw=1, label="1.2 x PC 200")
    for i, value in enumerate(real):
        ax.axhline(value, color="g", ls="-.", lw=1, label="real vs held-out" if i == 0 else None)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel("DCT-FD to held-out images (6x6 per channel)")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/demo_run", help="training workdir with checkpoints/checkpoint_1.pth")
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.py"), help="config file (get_config)")
    parser.add_argument("--samplers", nargs="+", default=list(DEFAULT_SAMPLERS), help="NAME[:key=value,...]")
    parser.add_argument("--nfes", type=int, nargs="+", default=list(NFES), help="NFE budgets")
    parser.add_argument(
        "--deterministic-nfes",
        type=int,
        nargs="*",
        default=None,
        help="budgets for dpm_solver / heun only (default: --nfes); their ODE has converged by ~50 NFE",
    )
    parser.add_argument("--num-samples", type=int, default=512)
    parser.add_argument("--num-real", type=int, default=1024)
    parser.add_argument("--block", type=int, default=6, help="DCT block per channel")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--name", default="sampler_quality", help="file name stem of the json / png")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-fid", action="store_true", help="skip FID even when the Inception weights exist")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = load_config(args.config)
    config.device = device
    model = load_model(config, args.workdir, device)
    real = eval_images(config, args.num_real)
    train = datasets.get_train_dataset(config)
    real_floor = [
        dct_fd(
            train.get_batch(np.arange(k * args.num_samples, (k + 1) * args.num_samples), augment=False),
            real,
            args.block,
        )
        for k in range(2)
    ]
    print(f"real (2 disjoint training sets of {args.num_samples}) vs {args.num_real} held-out: {real_floor}")
    fid_net, fid_real = (None, None) if args.no_fid else fid_setup(real, device)

    specs = [(spec, *parse_spec(spec)) for spec in args.samplers]
    rows: list[dict] = []
    out_json = os.path.join(args.results_dir, f"{args.name}.json")
    start_all = time.perf_counter()
    for label, name, options in specs:
        nfes = args.nfes
        if name in ("dpm_solver", "heun") and args.deterministic_nfes is not None:
            nfes = args.deterministic_nfes
        for budget in nfes:
            start = time.perf_counter()
            images, used = draw(config, model, name, options, budget, args.num_samples, args.seed, args.batch)
            finite = bool(torch.isfinite(images).all())  # e.g. PC with N <= beta_max steps (DDPM betas > 1)
            row = {
                "sampler": label,
                "family": name,
                "options": options,
                "budget": budget,
                "nfe": used,
                "dct_fd": dct_fd(images, real, args.block) if finite else float("nan"),
                "diverged": not finite,
                "seconds": time.perf_counter() - start,
            }
            if fid_net is not None and finite:
                row["fid"] = float(evaluation.fid_from_features(inception_pool(fid_net, images, device), fid_real))
            rows.append(row)
            print(f"{label:55s} NFE {used:4d}  DCT-FD {row['dct_fd']:7.3f}  ({row['seconds']:.0f} s)", flush=True)
            reference = next((r["dct_fd"] for r in rows if r["family"] == "pc" and r["nfe"] == 200), None)
            payload = {
                "workdir": args.workdir,
                "config": args.config,
                "num_samples": args.num_samples,
                "num_real": args.num_real,
                "dct_block": args.block,
                "seed": args.seed,
                "real_vs_heldout": real_floor,
                "pc_200_reference": reference,
                "rows": rows,
                "seconds_total": time.perf_counter() - start_all,
            }
            write_json(out_json, payload)
    labels = [label for label, _, _ in specs]
    reference = next((r["dct_fd"] for r in rows if r["family"] == "pc" and r["nfe"] == 200), None)
    table = markdown_table(rows, labels, sorted({n for r in rows for n in [r["budget"]]}))
    advice = recommendation(rows, reference)
    payload["recommendation"] = advice
    payload["table"] = table
    write_json(out_json, payload)
    plot(rows, labels, reference, real_floor, os.path.join(args.results_dir, f"{args.name}.png"))
    print()
    print(
        f"DCT-FD ({args.block}x{args.block} per channel) of {args.num_samples} samples vs {args.num_real} held-out "
        f"images; cell: distance (NFE). Real sets: {', '.join(f'{v:.2f}' for v in real_floor)}."
    )
    print(table)
    print()
    print(advice)
    if reference is not None and not math.isnan(reference):
        print(f"Total {time.perf_counter() - start_all:.0f} s.")


if __name__ == "__main__":
    main()
