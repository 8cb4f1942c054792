#!/usr/bin/env python3
"""PyTorch's side of the CPU training-step table in docs/benchmarks.md.

Times, at batch 64 on CPU with `torch.set_num_threads(THREADS)`, the models of
`cargo bench -p weightgrad --bench train_step` built with the same layers:

- the digits MLP `mlp[64-256-10]` on 1x8x8 inputs;
- the CIFAR-10 CNN (conv 5x5x64 same-padded, ReLU, max-pool 3/2, the same again, fc 384,
  fc 192, fc 10) on 3x32x32 inputs;
- the residual CNN `resnet:16` (3x3 stem without bias, group norm, ReLU; three basic blocks
  of 16, 32 and 64 channels, the last two at stride 2 with a 1x1 projection; global average
  pool; fc 10) on 3x32x32 inputs;
- the transformer `transformer:2,64,4,64` (byte embedding and learned positions, two pre-norm
  blocks of causal 4-head attention through `scaled_dot_product_attention` and a tanh-GELU
  MLP 4x wide, final layer norm, head tied to the embedding) on 32 windows of 64 tokens,
  every position predicting its next token;

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


class Block(nn.Module):
    """A residual basic block with group norm, as agent/src/train/resnet.rs builds it."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        groups = max(g for g in range(1, min(8, cout) + 1) if cout % g == 0)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.projection = (
            nn.Conv2d(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x):
        a = torch.relu(self.norm1(self.conv1(x)))
        a = self.norm2(self.conv2(a))
        return torch.relu(a + self.projection(x))


def resnet(width: int = 16, channels: int = 3, classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, 1, 1, bias=False),
        nn.GroupNorm(8, width),
        nn.ReLU(),
        Block(width, width, 1),
        Block(width, 2 * width, 2),
        Block(2 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, classes),
    )


class Transformer(nn.Module):
    """The byte-level decoder of agent/src/train/transformer.rs."""

    def __init__(self, layers=2, dim=64, heads=4, context=64, vocab=256):
        super().__init__()
        self.heads = heads
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Parameter(torch.zeros(context, dim))
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm1": nn.LayerNorm(dim),
                    "qkv": nn.Linear(dim, 3 * dim),
                    "out": nn.Linear(dim, dim),
                    "norm2": nn.LayerNorm(dim),
                    "mlp": nn.Sequential(
                        nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim)
                    ),
                }
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        b, t = x.shape
        h = self.tokens(x) + self.positions[:t]
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["norm1"](h)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + blk["out"](a.transpose(1, 2).reshape(b, t, -1))
            h = h + blk["mlp"](blk["norm2"](h))
        return self.norm(h) @ self.tokens.weight.t()


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
    return timed(name, model, x, y, args)


def measure_transformer(name: str, args) -> dict:
    torch.manual_seed(0)
    x = torch.randint(0, 256, (32, 64))
    y = torch.randint(0, 256, (32 * 64,))
    return timed(name, Transformer(), x, y, args)


def timed(name: str, model: nn.Module, x, y, args) -> dict:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    def forward():
        with torch.no_grad():
            model(x)

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x).reshape(y.shape[0], -1), y).backward()
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
        measure("resnet16-cifar-b64", resnet(), (3, 32, 32), args),
        measure_transformer("transformer-2x64-b32x64", args),
    ]
    print(
        json.dumps(
            {"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}
        )
    )


if __name__ == "__main__":
    main()
