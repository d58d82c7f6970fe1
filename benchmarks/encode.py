"""Tower throughput in process: images/s and text-query latency (prints a table; not a test).

    .venv/bin/python benchmarks/encode.py [--data ../shared/data/fashion] [--batches 32,256]
        [--precisions auto,bf16] [--threads 0,4] [--images 512] [--device cuda]

Real product pictures (decoded once, up front: the encoder service decodes in its own threads)
go through the towers with their titles: preprocessing (resize, pad, normalise), the image
tower, the text tower and the fusion. Two paths per device, precision, preprocessing-pool size
and batch size, in images/s: "batch" hands the whole batch to `DualEncoder.encode_products`;
"per event" is the encoder service's path, each picture prepared on its own in a thread (so a
bad one fails alone) and the batch then encoded by `encode_prepared_products`. Then single text
queries as the router encodes them: p50/p99 ms. The default model spec is the
services' (VITRINE_MODEL_ARCH / VITRINE_MODEL_WEIGHTS). On a GPU, "auto" is fp16.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from vitrine.model import DualEncoder, load_dual_encoder
from vitrine.settings import CommonSettings, Precision
from vitrine.training.data import load_products
from vitrine.training.features import load_images


def product_pictures(data: Path, count: int) -> tuple[list[Image.Image], list[str]]:
    """The first `count` products' pictures, decoded to RGB, and their titles."""
    products = load_products(data, limit=count)
    return load_images([p.image for p in products]), [p.title for p in products]


def images_per_second(
    encoder: DualEncoder, images: list[Image.Image], titles: list[str], batch: int
) -> float:
    encoder.encode_products(images[:batch], titles[:batch])  # warm-up: kernels, allocator
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for start in range(0, len(images), batch):
        encoder.encode_products(images[start : start + batch], titles[start : start + batch])
    return len(images) / (time.perf_counter() - started)


def images_per_second_per_event(
    encoder: DualEncoder, images: list[Image.Image], titles: list[str], batch: int
) -> float:
    """As services/encoder/pipeline.py does it: one preprocessing task per picture."""
    workers = min(32, (os.cpu_count() or 1) + 4)  # asyncio.to_thread's default executor
    with ThreadPoolExecutor(workers) as pool:

        def run(start: int) -> None:
            pixels = list(pool.map(encoder.preprocess_image, images[start : start + batch]))
            encoder.encode_prepared_products(pixels, titles[start : start + batch])

        run(0)  # warm-up
        if encoder.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for start in range(0, len(images), batch):
            run(start)
    return len(images) / (time.perf_counter() - started)


def text_latency_ms(encoder: DualEncoder, rounds: int = 200) -> tuple[float, float]:
    encoder.encode_texts(["warm up"])
    samples = []
    for i in range(rounds):
        started = time.perf_counter()
        encoder.encode_texts([f"red leather ankle boots size {i}"])  # distinct: no cache here
        samples.append((time.perf_counter() - started) * 1000)
    return float(np.percentile(samples, 50)), float(np.percentile(samples, 99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/fashion"))
    parser.add_argument("--images", type=int, default=512, help="pictures per measurement")
    parser.add_argument("--batches", default="32,256")
    parser.add_argument("--precisions", default="auto,bf16")
    parser.add_argument("--threads", default="0,4", help="preprocessing pool sizes")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    args = parser.parse_args()

    spec = CommonSettings().model_spec()
    images, titles = product_pictures(args.data, args.images)
    rows: list[tuple[str, str, int, int | str, float | tuple[float, float]]] = []
    for precision in args.precisions.split(","):
        for threads in (int(t) for t in args.threads.split(",")):
            encoder = load_dual_encoder(spec, args.device, precision_of(precision), threads)
            for batch in (int(b) for b in args.batches.split(",")):
                for path, measure in PATHS.items():
                    rate = measure(encoder, images, titles, batch)
                    rows.append((str(encoder.device), encoder.precision, threads,
                                 f"{batch} {path}", rate))
                    tqdm.write(f"{rows[-1]}")
            p50, p99 = text_latency_ms(encoder)
            rows.append((str(encoder.device), encoder.precision, threads, "text 1", (p50, p99)))
            encoder.close()

    print(f"\nmodel {spec.model_id}, {len(images)} pictures, torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'device':<7} {'precision':<9} {'pool':>4} {'batch':>15} {'figure':>24}")
    print("-" * 63)
    for device, precision, pool, size, value in rows:
        figure = (f"{value:,.0f} images/s" if isinstance(value, float)
                  else f"p50 {value[0]:.2f} / p99 {value[1]:.2f} ms")
        print(f"{device:<7} {precision:<9} {pool:>4} {size!s:>15} {figure:>24}")


PATHS = {"batch": images_per_second, "per event": images_per_second_per_event}


def precision_of(name: str) -> Precision:
    if name not in ("auto", "fp32", "fp16", "bf16"):
        raise SystemExit(f"unknown precision {name!r}")
    return name  # type: ignore[return-value]


if __name__ == "__main__":
    main()
