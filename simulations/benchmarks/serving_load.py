"""Serving under load: POST /recommend from many parallel clients against `fedcvr serve`, beside the same server's
sequential latency, at 1 and at 2 worker processes.

    python -m fedcvr.simulations.benchmarks.serving_load [--items 10000] [--clients 50] [--seconds 30]
        [--workers 1 2] [--out runs/bench-serving-load]

1. a synthetic merchant with `--items` items (`fedcvr data synth`'s generator) and an untrained model folder with
   the app's default model (the packaged MiniLM unless `--encoder`), as `serving` prepares them; the item index is
   built on the first start and kept in `<out>`;
2. for each `--workers` count: `fedcvr serve --workers W` in its own process on 127.0.0.1, then
   a. sequential: one client, `--sequential` requests one after another (after `--warmup`);
   b. load: `--clients` clients, each sending its next request as soon as its last was answered (a closed loop,
      no think time: the hardest case for the tail), for `--seconds` seconds after a warm-up second;
   every request k = 10 for a random stored shopper, every answer checked (status 200, k items);
3. per run: p50 / p95 / p99 latency, requests per second, and the CPU seconds the load generator itself used (it
   shares the machine's cores with the server).
The clients are a minimal HTTP/1.1 keep-alive client on asyncio in this process (one connection per client), so
that the load generator takes little of the cores it shares with the server. Prints one table and writes
`<out>/serving_load.json` with the machine's description.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedcvr.simulations.benchmarks.common import command, machine, print_table, write_result
from fedcvr.simulations.benchmarks.serving import prepare, start_server, stop_server


class Connection:
    """One keep-alive HTTP/1.1 connection that POSTs JSON and reads the whole answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str):
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, host)

    async def post(self, path: str, payload: dict[str, Any]) -> tuple[int, bytes]:
        body = json.dumps(payload).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if "content-length" not in headers:
            raise RuntimeError(f"answer without Content-Length: {lines[0]}")
        return status, await self.reader.readexactly(int(headers["content-length"]))

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


def _check(status: int, body: bytes, k: int) -> None:
    if status != 200:
        raise RuntimeError(f"POST /recommend answered {status}: {body[:300]!r}")
    items = json.loads(body)["items"]
    if len(items) != k:
        raise RuntimeError(f"POST /recommend answered {len(items)} items, expected {k}")


async def _client(port: int, shoppers: list[str], seed: int, k: int, until: float, record_after: float,
                  times: list[float]) -> None:
    rng = np.random.default_rng(seed)
    connection = await Connection.open("127.0.0.1", port)
    try:
        while (now := time.perf_counter()) < until:
            status, body = await connection.post("/recommend", {"user_id": str(rng.choice(shoppers)), "k": k})
            elapsed = time.perf_counter() - now
            _check(status, body, k)
            if now >= record_after:
                times.append(elapsed)
    finally:
        await connection.close()


async def _load(port: int, shoppers: list[str], clients: int, seconds: float, warmup: float,
                k: int) -> dict[str, Any]:
    times: list[float] = []
    start = time.perf_counter()
    record_after, until = start + warmup, start + warmup + seconds
    await asyncio.gather(*(_client(port, shoppers, seed, k, until, record_after, times) for seed in range(clients)))
    return _summary(times, seconds)


async def _sequential(port: int, shoppers: list[str], requests: int, warmup: int, k: int) -> dict[str, Any]:
    rng = np.random.default_rng(10_000)
    connection = await Connection.open("127.0.0.1", port)
    times: list[float] = []
    try:
        started = 0.0
        for i in range(warmup + requests):
            if i == warmup:
                started = time.perf_counter()
            start = time.perf_counter()
            status, body = await connection.post("/recommend", {"user_id": str(rng.choice(shoppers)), "k": k})
            elapsed = time.perf_counter() - start
            _check(status, body, k)
            if i >= warmup:
                times.append(elapsed)
        return _summary(times, time.perf_counter() - started)
    finally:
        await connection.close()


def _summary(times: list[float], seconds: float) -> dict[str, Any]:
    ms = np.asarray(times, dtype=float) * 1000.0
    return {"requests": len(ms), "seconds": seconds, "requests_per_s": len(ms) / seconds,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max()), "mean_ms": float(ms.mean())}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_workers(model_dir: Path, data_dir: Path, shoppers: list[str], workers: int, args: argparse.Namespace,
                out: Path) -> dict[str, Any]:
    began = time.monotonic()
    server, port = start_server(model_dir, data_dir, out / f"serve-workers-{workers}.log", "--workers", str(workers))
    try:
        startup = time.monotonic() - began
        sequential = asyncio.run(_sequential(port, shoppers, args.sequential, args.warmup, args.k))
        cpu = _cpu_seconds()
        load = asyncio.run(_load(port, shoppers, args.clients, args.seconds, 1.0, args.k))
        load["load_generator_cpu_s"] = _cpu_seconds() - cpu
        return {"workers": workers, "server_start_s": startup, "sequential": sequential, "load": load}
    finally:
        stop_server(server)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--shoppers", type=int, default=3_000)
    parser.add_argument("--events", type=int, default=60_000)
    parser.add_argument("--clients", type=int, default=50, help="parallel clients of the load (closed loop)")
    parser.add_argument("--seconds", type=float, default=30.0, help="measured seconds of load per run")
    parser.add_argument("--sequential", type=int, default=300, help="sequential requests per run")
    parser.add_argument("--warmup", type=int, default=20, help="sequential requests before the measured ones")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--encoder", default="", help="model.encoder (default: the packaged MiniLM)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-serving-load"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.clients < 1 or args.seconds <= 0 or any(w < 1 for w in args.workers):
        parser.error("--clients, --seconds and --workers must be positive")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_dir, model_dir = prepare(out, args.items, args.shoppers, args.events, args.encoder)
    from fedcvr.shared.data.loader import load_merchant

    events = load_merchant(data_dir).events
    shoppers = sorted(events["user_id"].astype(str).unique())
    runs = [run_workers(model_dir, data_dir, shoppers, workers, args, out) for workers in args.workers]
    result = {"benchmark": "serving_load", "command": command("fedcvr.simulations.benchmarks.serving_load", argv),
              "machine": machine(), "catalog_items": args.items, "shoppers": len(shoppers), "clients": args.clients,
              "k": args.k, "runs": runs}
    rows = []
    for run in runs:
        s, load = run["sequential"], run["load"]
        rows.append((f"{run['workers']} worker(s): sequential p50 / p99; requests/s",
                     f"{s['p50_ms']:.1f} / {s['p99_ms']:.1f} ms; {s['requests_per_s']:.0f}/s"))
        rows.append((f"{run['workers']} worker(s): {args.clients} parallel clients p50 / p95 / p99; requests/s",
                     f"{load['p50_ms']:.1f} / {load['p95_ms']:.1f} / {load['p99_ms']:.1f} ms; "
                     f"{load['requests_per_s']:.0f}/s (load generator {load['load_generator_cpu_s']:.1f} CPU s)"))
    print_table(rows)
    write_result(out / "serving_load.json", result)
    print(f"wrote {out / 'serving_load.json'}")
    return result


if __name__ == "__main__":
    main()
