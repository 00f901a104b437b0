"""Time rsft.metrics on random features and compare FID with torchmetrics.

Prints, for N real against N fake features of dimension d, the wall time and the peak
memory of each metric, then the FID time of rsft against torchmetrics'
FrechetInceptionDistance on the same features. It prints figures and checks nothing.
Run it from the repository root:

    .venv/bin/python -m benchmarks.bench_metrics --num-samples 10000 --dim 128
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
import tracemalloc
from collections.abc import Callable

import numpy as np
import threadpoolctl
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from rsft import metrics


class FeaturePassthrough(torch.nn.Module):
    """Feature extractor for torchmetrics that returns its input, which is already features."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--num-samples", type=int, default=10000,
        help="number of real and of fake feature vectors (default: 10000)",
    )
    parser.add_argument(
        "--dim", type=int, default=128, help="feature dimension (default: 128)"
    )
    parser.add_argument(
        "--fid-repeats", type=int, default=5,
        help="FID runs per implementation; the fastest run is reported (default: 5)",
    )
    parser.add_argument(
        "--threads", type=int, default=None,
        help="threads for numpy's BLAS and for torch (default: each library's own default)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random features")
    return parser.parse_args()


def time_call(function: Callable[[], object]) -> float:
    """Run ``function`` once and return its wall time in seconds."""
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def peak_traced_mib(function: Callable[[], object]) -> float:
    """Run ``function`` once under tracemalloc and return its peak traced memory in MiB.

    tracemalloc tracks numpy buffers and Python objects, but not torch tensor storage.
    """
    tracemalloc.start()
    try:
        function()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / 2**20


def torchmetrics_fid(real: np.ndarray, fake: np.ndarray) -> float:
    """Compute FID with torchmetrics, counting the construction of its [d, d] states."""
    fid = FrechetInceptionDistance(feature=FeaturePassthrough(real.shape[1]))
    fid.update(torch.from_numpy(real), real=True)
    fid.update(torch.from_numpy(fake), real=False)
    return float(fid.compute())


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # A multi-threaded BLAS slows down many times over when other processes occupy
    # its cores, so the load average is printed with the figures.
    with threadpoolctl.threadpool_limits(limits=args.threads):
        run_benchmarks(args)


def run_benchmarks(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(args.seed)

    # float32, like the evaluator's output. The fakes are shifted and rescaled so that
    # every metric is away from its extreme values.
    real = rng.normal(size=(args.num_samples, args.dim)).astype(np.float32)
    fake = (1.1 * rng.normal(size=(args.num_samples, args.dim)) + 0.05).astype(np.float32)
    labels = rng.integers(0, 10, size=args.num_samples)

    blas_pools = [pool for pool in threadpoolctl.threadpool_info() if pool["user_api"] == "blas"]
    blas_threads = max((pool["num_threads"] for pool in blas_pools), default=None)
    print(
        f"{args.num_samples} real vs {args.num_samples} fake features, dim {args.dim}; "
        f"numpy {np.__version__} with {blas_threads} BLAS threads, torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads; {os.cpu_count()} CPUs "
        f"({platform.machine()}), load average {os.getloadavg()[0]:.2f} at start"
    )

    benchmarks: dict[str, Callable[[], object]] = {
        "fid": lambda: metrics.features_to_fid(real, fake),
        "kid (100 x 1000)": lambda: metrics.features_to_kid(real, fake),
        "prdc (k=5)": lambda: metrics.features_to_prdc(real, fake),
        "mode coverage": lambda: metrics.labels_to_mode_coverage(labels),
    }

    print(f"\n{'metric':<18} {'time (s)':>9} {'peak traced (MiB)':>18}  value")
    total_seconds = 0.0
    for name, function in benchmarks.items():
        start = time.perf_counter()
        value = function()
        seconds = time.perf_counter() - start
        total_seconds += seconds
        peak_mib = peak_traced_mib(function)
        print(f"{name:<18} {seconds:>9.3f} {peak_mib:>18.1f}  {value}")
    print(f"{'all metrics':<18} {total_seconds:>9.3f}")

    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    max_rss_mib = max_rss / 2**20 if platform.system() == "Darwin" else max_rss / 2**10
    print(f"process peak RSS: {max_rss_mib:.0f} MiB (includes the torch import and the inputs)")

    rsft_seconds = min(
        time_call(lambda: metrics.features_to_fid(real, fake)) for _ in range(args.fid_repeats)
    )
    torchmetrics_seconds = min(
        time_call(lambda: torchmetrics_fid(real, fake)) for _ in range(args.fid_repeats)
    )
    rsft_value = metrics.features_to_fid(real, fake)
    torchmetrics_value = torchmetrics_fid(real, fake)
    print(
        f"\nFID, fastest of {args.fid_repeats}: rsft {rsft_seconds:.3f} s, torchmetrics "
        f"{torchmetrics_seconds:.3f} s, ratio {rsft_seconds / torchmetrics_seconds:.2f}x "
        f"(values {rsft_value:.6f} and {torchmetrics_value:.6f})"
    )


if __name__ == "__main__":
    main()
