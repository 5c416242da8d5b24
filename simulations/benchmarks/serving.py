"""Serving benchmark: latency of POST /recommend (K = 10) over a large catalog, and the retrieval stage against
a plain numpy matrix product + argpartition over the same embeddings, measured side by side in one run.

    python -m fedcvr.simulations.benchmarks.serving [--items 100000] [--requests 500] [--out runs/bench-serving]

1. a synthetic merchant with `--items` items and `--shoppers` shoppers (`fedcvr data synth`'s generator), and an
   (untrained) model folder with the app's default model (the packaged MiniLM unless `--encoder`): latency does
   not depend on the weights' values;
2. the item index is built once (its time is reported) and persisted, so `fedcvr serve` starts from it;
3. retrieval stage: `Recommender.retrieve` (query from the history, allowed-items mask, dot products,
   argpartition, ordering) against the reference `scores = unit @ q; np.argpartition(-scores, C - 1)[:C]`, the
   two alternating request by request over the same shoppers; median and p99 of each and the ratio of medians;
4. in process: `Recommender.recommend` with 1 and with 2 torch threads (why `fedcvr serve` uses 1);
5. end to end: `fedcvr serve` in its own process on 127.0.0.1, `--requests` sequential POST /recommend with k = 10
   for random shoppers, after `--warmup` requests; p50 and p99 in ms.
Prints one table and writes `<out>/serving.json` with the machine's description.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fedcvr.simulations.benchmarks.common import machine, percentiles


def prepare(out: Path, items: int, shoppers: int, events: int, encoder: str) -> tuple[Path, Path]:
    from fedcvr.shared.model.config import ModelConfig
    from fedcvr.shared.model.esmm import initial_model
    from fedcvr.shared.model.folder import save_model_folder
    from fedcvr.simulations.synth import SynthConfig, generate_marketplace

    data = out / f"data-{items}"
    if not (data / "merchant-01" / "items.parquet").is_file():
        generate_marketplace(SynthConfig(merchants=1, items=items, shoppers=shoppers, events=events, seed=7), data)
    model_dir = out / f"model-{items}"
    if not (model_dir / "VERSION").is_file():
        model, backbone = initial_model(ModelConfig.defaults(encoder=encoder), 0)
        save_model_folder(model_dir, model, backbone, {"version": "bench", "examples": {"history_length": 30}})
        (model_dir / "VERSION").write_text("bench\n")
    return data / "merchant-01", model_dir


def retrieval(recommender, shoppers: list[str], candidates: int, rng: np.random.Generator) -> dict[str, object]:
    from fedcvr.client.recommender import Filters

    snap = recommender.snapshot
    ours, reference = [], []
    for user in rng.choice(shoppers, size=len(shoppers)):
        history = recommender.history_of(str(user))
        start = time.perf_counter()
        allowed = recommender._allowed(snap, Filters(), recommender.bought_by(str(user)))
        rows = recommender.retrieve(snap, history, allowed, candidates)
        ours.append(time.perf_counter() - start)
        query = recommender.query(snap, history)
        start = time.perf_counter()
        scores = snap.index.unit @ query
        top = np.argpartition(-scores, candidates - 1)[:candidates]
        reference.append(time.perf_counter() - start)
        assert len(rows) == len(top)
    result = {"ours": percentiles(ours), "reference": percentiles(reference)}
    result["ratio_of_medians"] = result["ours"]["p50_ms"] / result["reference"]["p50_ms"]
    return result


def in_process(recommender, shoppers: list[str], requests: int, rng: np.random.Generator) -> dict[str, object]:
    """`Recommender.recommend` (k = 10) without HTTP, with 1 and with 2 torch threads: why serve uses one."""
    import torch

    before = torch.get_num_threads()
    out: dict[str, object] = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            times = []
            for i, user in enumerate(rng.choice(shoppers, size=requests + 20)):
                start = time.perf_counter()
                recommender.recommend(str(user), k=10)
                if i >= 20:
                    times.append(time.perf_counter() - start)
            out[f"threads={threads}"] = percentiles(times)
    finally:
        torch.set_num_threads(before)
    return out


def start_server(model_dir: Path, data_dir: Path, log: Path, *options: str, timeout: float = 1800
                 ) -> tuple[subprocess.Popen, int]:
    """`fedcvr serve` on 127.0.0.1 and a free port (with `options`) in a session of its own, once GET /health
    answers 200 (the first start builds the item index) -> (the process, its port); stop it with `stop_server`."""
    import httpx

    from fedcvr.simulations.launcher import free_ports

    port = free_ports(1)[0]
    with log.open("wb") as handle:
        server = subprocess.Popen([str(Path(sys.executable).parent / "fedcvr"), "serve", "--model-dir",
                                   str(model_dir), "--data-dir", str(data_dir), "--port", str(port), *options],
                                  stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                                  start_new_session=True)
    started = time.monotonic()
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return server, port
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() - started > timeout:
            stop_server(server)
            raise RuntimeError(f"fedcvr serve did not start; see {log}")
        time.sleep(0.5)


def stop_server(server: subprocess.Popen) -> None:
    """Stop a server from `start_server` by its PID, with every worker it forked."""
    from fedcvr.shared.processes import end_session

    end_session(server, grace=15)


def end_to_end(model_dir: Path, data_dir: Path, shoppers: list[str], requests: int, warmup: int, k: int,
               rng: np.random.Generator, log: Path) -> dict[str, object]:
    import httpx

    started = time.monotonic()
    server, port = start_server(model_dir, data_dir, log, timeout=900)
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        startup = time.monotonic() - started
        times = []
        for i, user in enumerate(rng.choice(shoppers, size=warmup + requests)):
            start = time.perf_counter()
            response = client.post("/recommend", json={"user_id": str(user), "k": k})
            elapsed = time.perf_counter() - start
            if response.status_code != 200 or len(response.json()["items"]) != k:
                raise RuntimeError(f"bad answer: {response.status_code} {response.text[:300]}")
            if i >= warmup:
                times.append(elapsed)
        return {"recommend": percentiles(times), "server_start_s": startup}
    finally:
        stop_server(server)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--shoppers", type=int, default=3_000)
    parser.add_argument("--events", type=int, default=60_000)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--encoder", default="", help="model.encoder (default: the packaged MiniLM)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-serving"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fedcvr.client.recommender import Recommender

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    data_dir, model_dir = prepare(out, args.items, args.shoppers, args.events, args.encoder)
    start = time.perf_counter()
    recommender = Recommender(model_dir, data_dir, candidates=args.candidates)
    load_s = time.perf_counter() - start
    shoppers = sorted(recommender._histories)
    result: dict[str, object] = {
        "command": "python -m fedcvr.simulations.benchmarks.serving " + " ".join(argv or sys.argv[1:]),
        "machine": machine(), "catalog_items": len(recommender.index), "shoppers": len(shoppers),
        "embedding_dim": int(recommender.index.embeddings.shape[1]), "candidates": args.candidates,
        "recommender_load_s": load_s, "index_built": recommender.index_built,
        "retrieval": retrieval(recommender, shoppers[: args.requests], args.candidates, rng),
        "in_process": in_process(recommender, shoppers, args.requests, rng),
    }
    del recommender
    result["http"] = end_to_end(model_dir, data_dir, shoppers, args.requests, args.warmup, 10, rng,
                                out / "serve.log")
    (out / "serving.json").write_text(json.dumps(result, indent=2) + "\n")
    r, h, p = result["retrieval"], result["http"]["recommend"], result["in_process"]
    rows = [
        ("catalog", f"{result['catalog_items']:,} items x {result['embedding_dim']} dims, "
                    f"{args.candidates} candidates"),
        ("recommender load", f"{load_s:.1f} s ({'index built' if result['index_built'] else 'index loaded'})"),
        ("retrieval stage p50 / p99", f"{r['ours']['p50_ms']:.2f} / {r['ours']['p99_ms']:.2f} ms"),
        ("numpy matmul + argpartition p50 / p99",
         f"{r['reference']['p50_ms']:.2f} / {r['reference']['p99_ms']:.2f} ms"),
        ("retrieval ratio (medians; target < 1.5)", f"{r['ratio_of_medians']:.2f}"),
        ("recommend() in process, 1 / 2 threads, p99",
         f"{p['threads=1']['p99_ms']:.1f} / {p['threads=2']['p99_ms']:.1f} ms (p50 {p['threads=1']['p50_ms']:.1f} / "
         f"{p['threads=2']['p50_ms']:.1f} ms)"),
        ("POST /recommend k=10 p50 / p99 (target p99 < 50 ms)", f"{h['p50_ms']:.1f} / {h['p99_ms']:.1f} ms "
                                                               f"({h['n']} requests)"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(f"wrote {out / 'serving.json'}")
    return result


if __name__ == "__main__":
    main()
