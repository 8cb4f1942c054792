#!/usr/bin/env python3
"""PyTorch's side of the CPU training-step table in docs/benchmarks.md.

Times, at batch 64 on CPU with `torch.set_num_threads(THREADS)`, the models of
`cargo bench -p weightgrad --bench train_step` built with the same layers:

- the digits MLP `mlp[64-256-10]` on 1x8x8 inputs;
- the CIFAR-10 CNN (conv 5x5x64 same-padded, ReLU, max-pool 3/2, the same again, fc 384,
  fc 192, fc 10) on 3x32x32 inputs;

each as a forward pass and as a training step (forward, cross-entropy, backward, Adam at
1e-3). Prints one JSON object: per model and step, the median milliseconds over the timed
iterations (after warm-up), and the torch version and thread count.

    python3 bench/peers/train_step_torch.py            # torch from PyPI, CPU
    python3 bench/peers/train_step_compare.py           # both sides in one run, with ratios
"""

import argparse
import json
import statistics
import time

import torch
from torch import nn

BATCH = 64


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(3, 2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 384),
        nn.ReLU(),
        nn.Linear(384, 192),
        nn.ReLU(),
        nn.Linear(192, 10),
    )


def median_ms(fn, warmup: int, iters: int, min_seconds: float) -> float:
    """Median wall-clock milliseconds of `fn` over at least ITERS calls and MIN_SECONDS."""
    for _ in range(warmup):
        fn()
    samples = []
    started = time.perf_counter()
    while len(samples) < iters or time.perf_counter() - started < min_seconds:
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples)


def measure(name: str, model: nn.Module, sample, args) -> dict:
    torch.manual_seed(0)
    x = torch.rand(BATCH, *sample)
    y = torch.arange(BATCH) % 10
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    def forward():
        with torch.no_grad():
            model(x)

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return {
        "model": name,
        "forward_ms": median_ms(forward, args.warmup, args.iters, args.seconds),
        "train_step_ms": median_ms(train_step, args.warmup, args.iters, args.seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [
        measure("mlp-digits-b64", mlp(), (1, 8, 8), args),
        measure("cnn-cifar-b64", cnn(), (3, 32, 32), args),
    ]
    print(
        json.dumps(
            {"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}
        )
    )


if __name__ == "__main__":
    main()
