#!/usr/bin/env python3
"""How closely `weightgrad wan-emu --tcp` gives a TCP stream its emulated link.

Sends SIZE bytes to a sink on loopback, first directly (the baseline, measured in the same
run) and then through `weightgrad wan-emu --tcp` at MBPS and DELAY_MS one way, and prints
one JSON line: the seconds each took, the ideal time on the emulated link (serialization
at the bandwidth plus one round trip for the sink's acknowledgement), and the goodput
through the relay as a fraction of the link's bandwidth.

    python3 bench/peers/tcp_link_check.py --weightgrad target/release/weightgrad
"""

import argparse
import json
import socket
import subprocess
import threading
import time


def sink(server: socket.socket) -> None:
    """Reads each connection to its end, then answers one byte."""
    while True:
        conn, _ = server.accept()
        with conn:
            while conn.recv(1 << 20):
                pass
            conn.sendall(b"k")


def transfer(addr, size: int) -> float:
    """Seconds from connecting to the sink's answer after SIZE bytes."""
    chunk = b"\0" * (1 << 20)
    started = time.monotonic()
    with socket.create_connection(addr) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        left = size
        while left > 0:
            n = min(left, len(chunk))
            s.sendall(chunk[:n])
            left -= n
        s.shutdown(socket.SHUT_WR)
        assert s.recv(1) == b"k", "no answer from the sink"
    return time.monotonic() - started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weightgrad", default="weightgrad", help="the binary")
    p.add_argument("--size-mb", type=float, default=20.0)
    p.add_argument("--mbps", type=float, default=100.0)
    p.add_argument("--delay-ms", type=float, default=40.0)
    args = p.parse_args()
    size = int(args.size_mb * 1e6)

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    threading.Thread(target=sink, args=(server,), daemon=True).start()
    upstream = server.getsockname()

    port = free_port()
    relay = subprocess.Popen(
        [args.weightgrad, "wan-emu", "--tcp", "--listen", f"127.0.0.1:{port}",
         "--upstream", f"{upstream[0]}:{upstream[1]}",
         "--mbps", str(args.mbps), "--delay-ms", str(args.delay_ms)],
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("wan-emu --tcp never listened")
                time.sleep(0.05)
        direct = transfer(upstream, size)
        relayed = transfer(("127.0.0.1", port), size)
    finally:
        relay.terminate()
        relay.wait()
    ideal = size * 8 / (args.mbps * 1e6) + 2 * args.delay_ms / 1e3
    print(json.dumps({
        "bytes": size,
        "mbps": args.mbps,
        "delay_ms": args.delay_ms,
        "direct_seconds": round(direct, 4),
        "relayed_seconds": round(relayed, 4),
        "ideal_seconds": round(ideal, 4),
        "relayed_over_ideal": round(relayed / ideal, 4),
        "goodput_of_link": round(size * 8 / relayed / (args.mbps * 1e6), 4),
    }))


if __name__ == "__main__":
    main()
