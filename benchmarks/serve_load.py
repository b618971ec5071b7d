"""Load on ``serve``: throughput and latency with batching on and off, next to offline prediction.

    python benchmarks/serve_load.py --ckpt_path CKPT --images DIR [--clients 1 16 64]

Starts ``python -m transfer_lightning serve`` on a free loopback port (127.0.0.1 only), once with
``--max_batch_size 16`` and once with 1, and sends the image files of ``DIR`` (one per request, real
files, round robin) from N concurrent client threads: ``--requests_per_client`` requests each, at most
``--max_seconds`` per level. Prints requests/s, p50 / p95 / p99 latency and failed requests per level,
and, measured in this same run and process, the offline images/s of the same model and images: the
decode of ``predict`` (:func:`~transfer_lightning.data.store.decode_image`) and the network in batches
of 100, as ``predict`` runs them, without HTTP.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from tests.servers import Server  # noqa: E402  (the tests' loopback server: subprocess, SIGTERM)
from transfer_lightning.data.listing import list_images  # noqa: E402
from transfer_lightning.serving.requests import load_model  # noqa: E402


def offline_images_per_second(ckpt_path: str, files: list[bytes], batch_size: int = 100) -> float:
    model = load_model(ckpt_path, None, "cpu")  # the network as predict runs it (channels-last when trained so)
    model.run(torch.stack([model.prepare(files[0])] * 2))  # warm-up
    start = time.perf_counter()
    for first in range(0, len(files), batch_size):
        model.run(torch.stack([model.prepare(data) for data in files[first : first + batch_size]]))
    return len(files) / (time.perf_counter() - start)


def load(server: Server, files: list[tuple[str, bytes]], clients: int, per_client: int, max_seconds: float) -> dict:
    deadline = time.monotonic() + max_seconds

    def client(index: int) -> list[tuple[float, bool]]:
        results = []
        for step in range(per_client):
            if time.monotonic() > deadline:
                break
            name, data = files[(index * per_client + step) % len(files)]
            start = time.perf_counter()
            try:
                status, _ = server.upload([(name, data)])
                ok = status == 200
            except OSError:
                ok = False
            results.append((time.perf_counter() - start, ok))
        return results

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [result for batch in pool.map(client, range(clients)) for result in batch]
    elapsed = time.perf_counter() - start
    latencies = sorted(seconds for seconds, _ in results)
    quantiles = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {
        "requests": len(results),
        "failed": sum(not ok for _, ok in results),
        "per_second": len(results) / elapsed,
        "p50": quantiles[49],
        "p95": quantiles[94],
        "p99": quantiles[98],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--images", type=Path, required=True, help="a folder of image files (any nesting)")
    parser.add_argument("--count", type=int, default=400, help="image files used")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--requests_per_client", type=int, default=8)
    parser.add_argument("--max_seconds", type=float, default=120, help="per level")
    parser.add_argument("--max_batch_size", type=int, default=16)
    args = parser.parse_args()
    paths = [path for path, _ in list_images(args.images, None)[0]][: args.count]
    files = [(Path(path).name, Path(path).read_bytes()) for path in paths]
    offline = offline_images_per_second(args.ckpt_path, [data for _, data in files])
    print(f"offline (decode + network in batches of 100, one process): {offline:.1f} images/s")
    print("| batching | clients | requests | failed | requests/s | share of offline | p50 | p95 | p99 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for batch_size in (args.max_batch_size, 1):
        server = Server("--ckpt_path", args.ckpt_path, "--max_batch_size", str(batch_size), "--accelerator", "cpu")
        try:
            load(server, files, 2, 2, 30)  # warm-up
            for clients in args.clients:
                r = load(server, files, clients, args.requests_per_client, args.max_seconds)
                label = f"on (max {batch_size})" if batch_size > 1 else "off"
                print(
                    f"| {label} | {clients} | {r['requests']} | {r['failed']} | {r['per_second']:.1f} | "
                    f"{100 * r['per_second'] / offline:.0f}% | {1000 * r['p50']:.0f} ms | {1000 * r['p95']:.0f} ms | "
                    f"{1000 * r['p99']:.0f} ms |",
                    flush=True,
                )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
