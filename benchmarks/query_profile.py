"""Where one text query's time goes: py-spy on the router and a shard while sequential cold
text queries run through the local stack (prints tables; not a test).

    .venv/bin/python benchmarks/query_profile.py [--vectors 200000] [--queries 1500]
        [--mode dense] [--top 25]

The catalog, queries and shard snapshots are benchmarks/peers.py's (2 shards, the shipped
model's fused vectors replicated with noise). Prints the client p50/p99, the router's stage
means, and per process the functions holding the most samples (inclusive, idle excluded), so
a change to the query path shows where it moved time.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from peers import HERE, build_fleet_in, stack_for, through_router, workload

PY_SPY = Path(sys.executable).parent / "py-spy"


def top_frames(raw: Path, limit: int) -> list[tuple[float, str]]:
    """Inclusive share of samples per function, from py-spy's raw (collapsed) output."""
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        names = {frame.split(" (")[0] for frame in stack.split(";")}
        for name in names:
            inclusive[name] += n
    return [(100 * n / max(1, total), name) for name, n in inclusive.most_common(limit)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared/data/fashion")
    parser.add_argument("--vectors", type=int, default=200_000)
    parser.add_argument("--products", type=int, default=5000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3, help="passes over distinct texts")
    parser.add_argument("--noise", type=float, default=0.4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", default="dense", choices=["dense", "hybrid", "lexical"])
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    work = workload(args)
    texts = [f"{text} {i}" for i in range(args.repeat) for text in work.texts]  # all distinct
    with tempfile.TemporaryDirectory(prefix="vitrine-profile-") as tmp:
        fleet = Path(tmp) / "fleet"
        build_fleet_in(work, fleet, 2)
        stack = stack_for(fleet, 2, args.nprobe)
        stack.start()
        try:
            spies = {
                name: subprocess.Popen(
                    [str(PY_SPY), "record", "--rate", "500", "--format", "raw", "--nonblocking",
                     "--output", str(Path(tmp) / f"{name}.txt"),
                     "--pid", str(stack.children[name].process.pid)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
                for name in ("router", "shard-0")
            }
            got = asyncio.run(through_router(stack, texts, args.mode))
            for spy in spies.values():
                spy.send_signal(2)  # SIGINT: py-spy writes what it sampled
                spy.wait(timeout=60)
        finally:
            stack.stop()
        times = got["single_ms"]
        print(f"# {len(texts)} cold text queries, mode {args.mode}, {args.vectors:,} vectors in "
              f"2 shards: client p50 {np.percentile(times, 50):.2f} ms, p99 "
              f"{np.percentile(times, 99):.2f} ms; router stage means (ms): "
              + ", ".join(f"{k} {v:.2f}" for k, v in got["stages"].items()))
        for name in spies:
            print(f"\n## {name}: share of samples (inclusive)")
            for share, frame in top_frames(Path(tmp) / f"{name}.txt", args.top):
                print(f"{share:5.1f}%  {frame}")


if __name__ == "__main__":
    main()
