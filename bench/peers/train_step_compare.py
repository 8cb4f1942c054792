#!/usr/bin/env python3
"""CPU training steps of this project against PyTorch's, both measured in one run.

Runs `cargo bench -p weightgrad --bench train_step` for the digits MLP, the CIFAR-10 CNN, the
residual CNN and the transformer (criterion's median of each, read from target/criterion),
then the same models, batch and
thread count in PyTorch (`train_step_torch.py`, imported), and prints a markdown table of
milliseconds and the ratio candle / PyTorch for the forward pass and the training step.

Run it with the Python that has torch (from PyPI, CPU), from the repository root:

    python -m venv ~/.cache/weightgrad-torch-peer && ~/.cache/weightgrad-torch-peer/bin/pip install torch
    ~/.cache/weightgrad-torch-peer/bin/python bench/peers/train_step_compare.py

`--skip-cargo` reads the criterion results already on disk instead of running the bench.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step_torch  # noqa: E402

GROUPS = {
    "mlp-digits-b64": "digits MLP 64-256-10",
    "cnn-cifar-b64": "CIFAR-10 CNN",
    "resnet16-cifar-b64": "residual CNN resnet:16 (CIFAR-10 shape)",
    "transformer-2x64-b32x64": "transformer 2x64, 32 windows of 64 bytes",
}
STEPS = {"forward (baseline)": "forward_ms", "train step": "train_step_ms"}


def criterion_ms(root: pathlib.Path, group: str, function: str) -> float:
    """Criterion's median for GROUP/FUNCTION, in milliseconds."""
    path = root / "criterion" / group / function / "new" / "estimates.json"
    try:
        estimates = json.loads(path.read_text())
    except OSError as err:
        sys.exit(f"no criterion result at {path} ({err}); run without --skip-cargo")
    return estimates["median"]["point_estimate"] / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-cargo", action="store_true")
    parser.add_argument("--target-dir", default=os.environ.get("CARGO_TARGET_DIR", "target"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not args.skip_cargo:
        pattern = "^(" + "|".join(GROUPS) + ")/"
        subprocess.run(
            ["cargo", "bench", "-p", "weightgrad", "--bench", "train_step", "--", pattern],
            check=True,
        )
    torch_args = argparse.Namespace(threads=args.threads, warmup=5, iters=20, seconds=5.0)
    train_step_torch.torch.set_num_threads(args.threads)
    torch_rows = {
        "mlp-digits-b64": train_step_torch.measure(
            "mlp-digits-b64", train_step_torch.mlp(), (1, 8, 8), torch_args
        ),
        "cnn-cifar-b64": train_step_torch.measure(
            "cnn-cifar-b64", train_step_torch.cnn(), (3, 32, 32), torch_args
        ),
        "resnet16-cifar-b64": train_step_torch.measure(
            "resnet16-cifar-b64", train_step_torch.resnet(), (3, 32, 32), torch_args
        ),
        "transformer-2x64-b32x64": train_step_torch.measure_transformer(
            "transformer-2x64-b32x64", torch_args
        ),
    }
    root = pathlib.Path(args.target_dir)
    print(f"\ntorch {train_step_torch.torch.__version__}, {args.threads} threads\n")
    print("| model | step | candle (this project) | PyTorch | candle / PyTorch |")
    print("| --- | --- | ---: | ---: | ---: |")
    for group, label in GROUPS.items():
        for function, key in STEPS.items():
            ours = criterion_ms(root, group, function)
            theirs = torch_rows[group][key]
            step = function.replace(" (baseline)", "")
            print(f"| {label} | {step} | {ours:.3f} ms | {theirs:.3f} ms | {ours / theirs:.2f}x |")


if __name__ == "__main__":
    main()
