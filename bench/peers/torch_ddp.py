#!/usr/bin/env python3
"""PyTorch DDP (gloo, CPU) with the PowerSGD communication hook, across the bench's regions.

What a user would otherwise run across regions, measured the way `weightgrad bench --real`
measures the agents: one process per region trains the bench's MLP on that region's shard,
DistributedDataParallel averages gradients every step (compressed by PowerSGD, or plain
all-reduce with `--hook allreduce`), and every pair of processes talks through its own
`weightgrad wan-emu --tcp`, shaped like the scenario's link between those regions.

`weightgrad bench ... --real weightgrad,full-sync --peer 'torch-ddp-powersgd=PYTHON
bench/peers/torch_ddp.py'` runs it after the agents and adds `--setup DIR --result FILE`:
DIR holds `setup.json` and the shards the bench wrote; FILE gets the result (every
evaluation's wall-clock seconds, the WAN bytes the links had carried by then, and the
lowest top-1 over the regions). Needs torch (CPU is enough) and numpy.

How the pairs are routed: gloo's rendezvous stores each rank's listening address in the
store; of the two ranks of a pair, the one whose address compares higher connects to the
other. The store each rank uses is wrapped, so that when a rank reads the address of a peer
it will connect to, a relay (`wan-emu --tcp`) to that address is started first and the rank
reads the relay's address instead. The relay's port is chosen to compare lower than the
rank's own, so the rank still connects (gloo compares the IP, then the port's bytes in
network order read as a host integer). Every byte between two ranks crosses its relay; the
relays report their byte counters every 50 ms with the system clock, and bytes at an
evaluation are the counters' sum at that moment.
"""

import argparse
import json
import math
import os
import random
import shlex
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from datetime import timedelta

import numpy as np

COUNTER_EVERY_MS = 50
AF_INET = 2
# sizeof(sockaddr_storage) + sizeof(ssize_t): one serialized gloo TCP address.
GLOO_ADDRESS_LEN = 136


# --- data -----------------------------------------------------------------------------------

SAFETENSORS_DTYPES = {"F32": np.float32, "U32": np.uint32}


def load_safetensors(path):
    """The tensors of a safetensors file as numpy arrays (F32 and U32 only)."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{path}: too short for a safetensors file")
    (n,) = struct.unpack_from("<Q", raw, 0)
    if 8 + n > len(raw):
        raise ValueError(f"{path}: header of {n} bytes runs past the file")
    header = json.loads(raw[8 : 8 + n])
    body = memoryview(raw)[8 + n :]
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(meta["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has dtype {meta['dtype']}, not F32 or U32")
        start, end = meta["data_offsets"]
        out[name] = np.frombuffer(body[start:end], dtype=dtype).reshape(meta["shape"])
    return out


# --- routing every pair through its relay ---------------------------------------------------


def parse_rank_blob(blob):
    """gloo's per-rank rendezvous value: (address bytes, their offset), or None when the
    value is not one. Layout: u64 hostname length, hostname, u64 address length (136),
    the address (sockaddr_storage, then an i64 sequence number), one i64 per pair."""
    if len(blob) < 16:
        return None
    (host_len,) = struct.unpack_from("<Q", blob, 0)
    if host_len > 1024 or 16 + host_len > len(blob):
        return None
    (addr_len,) = struct.unpack_from("<Q", blob, 8 + host_len)
    offset = 16 + host_len
    if addr_len != GLOO_ADDRESS_LEN or offset + addr_len > len(blob):
        return None
    if (len(blob) - offset - addr_len) % 8:
        return None
    return bytes(blob[offset : offset + addr_len]), offset


def ipv4_of(address):
    """(ip, port) of a serialized gloo address, or None when it is not IPv4."""
    family, port = struct.unpack_from("<H", address, 0)[0], struct.unpack_from(">H", address, 2)[0]
    if family != AF_INET:
        return None
    return socket.inet_ntoa(address[4:8]), port


def with_ipv4(address, ip, port):
    a = bytearray(address)
    struct.pack_into(">H", a, 2, port)
    a[4:8] = socket.inet_aton(ip)
    return bytes(a)


def connect_order(ip, port):
    """The key gloo orders two addresses by: the IP's bytes, then the port's two bytes in
    network order read as a little-endian integer."""
    return socket.inet_aton(ip), struct.unpack("<H", struct.pack(">H", port))[0]


def listening(port):
    """Whether a socket listens on TCP `port` (read from /proc, so that no probe
    connection reaches the rank behind a relay)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except FileNotFoundError:
            pass
    return False


def free_port_below(limit_key, ip="127.0.0.1"):
    """A free port whose connect order on `ip` is below `limit_key`."""
    ports = [p for p in range(20000, 32768) if connect_order(ip, p) < limit_key]
    random.shuffle(ports)
    for p in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((ip, p))
                return p
            except OSError:
                continue
    raise RuntimeError(f"no free relay port orders below {limit_key}")


def die_with_parent():
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def make_relay_store(dist):
    class RelayStore(dist.Store):
        """A store that hands a rank, for each peer it will connect to, the address of a
        relay shaped like their link instead of the peer's own."""

        def __init__(self, inner, rank, setup, run_dir):
            super().__init__()
            self.inner, self.rank, self.setup, self.run_dir = inner, rank, setup, run_dir
            self.lock = threading.Lock()
            self.relays = {}
            self.procs = []

        def set(self, key, value):
            self.inner.set(key, value)

        def add(self, key, value):
            return self.inner.add(key, value)

        def compare_set(self, key, expected, desired):
            return self.inner.compare_set(key, expected, desired)

        def delete_key(self, key):
            return self.inner.delete_key(key)

        def num_keys(self):
            return self.inner.num_keys()

        def set_timeout(self, timeout):
            self.inner.set_timeout(timeout)

        def check(self, keys):
            return self.inner.check(keys)

        def wait(self, keys, timeout=None):
            if timeout is None:
                self.inner.wait(keys)
            else:
                self.inner.wait(keys, timeout)

        def get(self, key):
            value = self.inner.get(key)
            prefix, _, last = key.rpartition("/")
            if not last.isdigit() or int(last) == self.rank:
                return value
            parsed = parse_rank_blob(value)
            if parsed is None:
                return value
            return self.rewrite(prefix, int(last), value, parsed)

        def rewrite(self, prefix, peer, value, parsed):
            address, offset = parsed
            theirs = ipv4_of(address)
            own = parse_rank_blob(self.inner.get(f"{prefix}/{self.rank}"))
            ours = own and ipv4_of(own[0])
            if theirs is None or ours is None:
                raise RuntimeError(
                    f"rank {self.rank}: gloo address of rank {peer} is not IPv4; "
                    "it could not be routed through its relay"
                )
            if connect_order(*ours) < connect_order(*theirs):
                return value  # the peer connects to us, through its own relay
            with self.lock:
                if (prefix, peer) not in self.relays:
                    self.relays[(prefix, peer)] = self.start_relay(peer, ours, theirs)
            port = self.relays[(prefix, peer)]
            return value[:offset] + with_ipv4(address, "127.0.0.1", port) + value[offset + len(address) :]

        def start_relay(self, peer, ours, theirs):
            """Starts `wan-emu --tcp` from this rank to `peer` and waits until it listens."""
            link = {(l["from"], l["to"]): l for l in self.setup["links"]}
            up, down = link[(self.rank, peer)], link[(peer, self.rank)]
            counters = os.path.join(self.run_dir, f"relay-{self.rank}-{peer}-{len(self.procs)}.jsonl")
            for attempt in range(5):
                port = free_port_below(connect_order(*ours))
                cmd = [
                    self.setup["weightgrad"], "wan-emu", "--tcp",
                    "--listen", f"127.0.0.1:{port}",
                    "--upstream", f"{theirs[0]}:{theirs[1]}",
                    "--mbps", str(up["mbps"]), "--down-mbps", str(down["mbps"]),
                    "--delay-ms", str(up["delay_ms"]), "--jitter-ms", str(up["jitter_ms"]),
                    "--json-every-ms", str(COUNTER_EVERY_MS),
                ]  # fmt: skip
                out = open(counters, "w")
                p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)
                deadline = time.time() + 20
                while not listening(port) and p.poll() is None and time.time() < deadline:
                    time.sleep(0.02)
                if p.poll() is None and listening(port):
                    self.procs.append((p, out))
                    return port
                p.kill()
                p.wait()
                out.close()
                print(f"rank {self.rank}: relay to rank {peer} did not start (try {attempt})", file=sys.stderr)
            raise RuntimeError(f"rank {self.rank}: could not start the relay to rank {peer}")

        def stop_relays(self):
            for p, _ in self.procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p, out in self.procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                out.close()

    return RelayStore


# --- one region -----------------------------------------------------------------------------


def worker(args):
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    with open(os.path.join(args.setup, "setup.json")) as f:
        setup = json.load(f)
    rank, world = args.rank, len(setup["regions"])
    torch.set_num_threads(args.threads)
    torch.manual_seed(setup["seed"])
    shard = load_safetensors(os.path.join(args.setup, setup["shards"][rank]))
    test = load_safetensors(os.path.join(args.setup, setup["test"]))
    x, y = torch.from_numpy(shard["images"].copy()), torch.from_numpy(shard["labels"].astype(np.int64))
    tx, ty = torch.from_numpy(test["images"].copy()), torch.from_numpy(test["labels"].astype(np.int64))

    inner = dist.TCPStore("127.0.0.1", args.store_port, world, is_master=False, timeout=timedelta(seconds=300))
    store = make_relay_store(dist)(inner, rank, setup, args.run_dir)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=600))

    widths = setup["layers"]
    layers = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    # One bucket: every gradient goes through one hook call per step, so each step costs
    # the fewest round trips. With several buckets in flight, PowerSGD over gloo hung here
    # after its plain all-reduce steps (every process idle, no bytes moving).
    model = DDP(nn.Sequential(*layers), bucket_cap_mb=args.bucket_cap_mb)
    hook = "allreduce"
    if args.hook == "powersgd":
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

        state = psgd.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=args.powersgd_rank,
            start_powerSGD_iter=args.start_iter,
        )
        model.register_comm_hook(state, psgd.powerSGD_hook)
        hook = f"powersgd rank {args.powersgd_rank} from step {args.start_iter}"
    per_epoch, epochs, batch = setup["rounds_per_epoch"], setup["epochs"], setup["batch_per_region"]
    total = per_epoch * epochs
    evaluate_every = setup.get("evaluate_every_rounds", per_epoch)
    opt = torch.optim.Adam(model.parameters(), lr=setup["lr"])
    cosine = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(setup["seed"] * 1000 + rank)

    log = open(os.path.join(args.run_dir, f"rank-{rank}.jsonl"), "w")

    def record(**kv):
        log.write(json.dumps(kv) + "\n")
        log.flush()

    def evaluate():
        model.eval()
        with torch.no_grad():
            acc = (model.module(tx).argmax(1) == ty).float().mean().item()
        model.train()
        return acc

    dist.barrier()
    record(start_unix=time.time(), hook=hook, threads=args.threads, torch=torch.__version__)
    order = torch.randperm(len(x), generator=gen)
    at = 0
    for step in range(1, total + 1):
        if at + batch > len(order):
            order, at = torch.randperm(len(x), generator=gen), 0
        idx = order[at : at + batch]
        at += batch
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
        cosine.step()
        if step % evaluate_every == 0 or step == total:
            record(round=step, accuracy=evaluate(), unix_s=time.time())
        if step % per_epoch == 0:
            order, at = torch.randperm(len(x), generator=gen), 0
    dist.barrier()
    record(end_unix=time.time())
    # No rank tears its relays down before every rank is past the barrier: a rank can leave
    # it while the barrier's last messages to another are still crossing its relays (seen
    # on 3.6 Mbit/s links). The launcher's store is reached directly, not through a relay.
    inner.add("finished", 1)
    deadline = time.monotonic() + 300
    while inner.add("finished", 0) < world and time.monotonic() < deadline:
        time.sleep(0.05)
    dist.destroy_process_group()
    store.stop_relays()
    log.close()


# --- the launcher ---------------------------------------------------------------------------


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def bytes_at(relays, unix_s):
    """WAN bytes every relay had delivered by `unix_s` (its last counter before then)."""
    total = 0
    for lines in relays:
        seen = [l for l in lines if "unix_s" in l and l["unix_s"] <= unix_s]
        if seen:
            total += seen[-1]["up_bytes"] + seen[-1]["down_bytes"]
    return total


def launcher(args):
    import torch.distributed as dist

    with open(os.path.join(args.setup, "setup.json")) as f:
        setup = json.load(f)
    world = len(setup["regions"])
    run_dir = os.path.join(args.setup, "run")
    os.makedirs(run_dir, exist_ok=True)
    for name in os.listdir(run_dir):
        os.remove(os.path.join(run_dir, name))
    master = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=300))
    passthrough = [
        "--hook", args.hook, "--powersgd-rank", str(args.powersgd_rank),
        "--start-iter", str(args.start_iter), "--threads", str(args.threads),
        "--bucket-cap-mb", str(args.bucket_cap_mb),
    ]  # fmt: skip
    ranks = [
        subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--setup", args.setup, "--worker",
             "--rank", str(r), "--store-port", str(master.port), "--run-dir", run_dir] + passthrough
        )  # fmt: skip
        for r in range(world)
    ]
    failed = [r for r, p in enumerate(ranks) if p.wait() != 0]
    if failed:
        sys.exit(f"ranks {failed} failed; see the output above")
    logs = [read_jsonl(os.path.join(run_dir, f"rank-{r}.jsonl")) for r in range(world)]
    names = sorted(n for n in os.listdir(run_dir) if n.startswith("relay-"))
    relays = [read_jsonl(os.path.join(run_dir, n)) for n in names]
    pairs = {frozenset(map(int, n.split("-")[1:3])) for n in names}
    if len(pairs) != world * (world - 1) // 2:
        sys.exit(f"relays for {sorted(map(sorted, pairs))} only: some pair bypassed the emulated links")
    start = min(l[0]["start_unix"] for l in logs)
    end = max(l[-1]["end_unix"] for l in logs)
    evals = [[e for e in l if "round" in e] for l in logs]
    curve = []
    for per_rank in zip(*evals):
        rounds = {e["round"] for e in per_rank}
        if len(rounds) != 1:
            sys.exit(f"ranks evaluated different rounds: {sorted(rounds)}")
        last = max(e["unix_s"] for e in per_rank)
        curve.append(
            {
                "round": per_rank[0]["round"],
                "seconds": last - start,
                "wan_bytes": bytes_at(relays, last),
                "min_accuracy": min(e["accuracy"] for e in per_rank),
            }
        )
    finals = [l[-1] for l in relays if l and l[-1].get("last")]
    if len(finals) != len(relays):
        sys.exit("a relay did not report its final counters")
    result = {
        "wan_bytes": sum(f["up_bytes"] + f["down_bytes"] for f in finals),
        "seconds": end - start,
        "final_accuracy": curve[-1]["min_accuracy"],
        "curve": curve,
        "notes": f"torch {logs[0][0]['torch']}, gloo, {logs[0][0]['hook']}, {args.threads} thread(s) per rank",
    }
    tmp = args.result + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, args.result)
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setup", required=True, help="the directory weightgrad bench wrote")
    p.add_argument("--result", help="where the result JSON goes")
    p.add_argument("--hook", choices=["powersgd", "allreduce"], default="powersgd")
    p.add_argument("--powersgd-rank", type=int, default=4, help="PowerSGD's matrix approximation rank")
    p.add_argument("--start-iter", type=int, default=2, help="steps of plain all-reduce before PowerSGD starts")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--bucket-cap-mb", type=float, default=1024, help="DDP's gradient bucket size (default: one bucket)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--store-port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
    elif not args.result:
        p.error("--result is required")
    else:
        launcher(args)


if __name__ == "__main__":
    main()
