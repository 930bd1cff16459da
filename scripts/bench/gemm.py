"""The twin of `ipr bench gemm`: GFLOP/s of f32 n x n matrix products, best of `--iters`, through
PyTorch (its CPU build multiplies with MKL) and NumPy (its wheels with OpenBLAS), one JSON line
per library and size, on `--threads` threads.
    python scripts/bench/gemm.py --n 256,512,1024,1536,2048 --threads 2
"""
import argparse
import json
import os
import time


def best_gflops(matmul, a, b, n, iters):
    matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(iters):
        start = time.perf_counter()
        matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best / 1e9


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", default="256,512,1024,1536,2048")
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
    except ImportError:  # OPENBLAS_NUM_THREADS, set by the caller, then holds
        pass
    try:  # which kernels the BLAS libraries chose (threadpoolctl, where installed)
        from threadpoolctl import threadpool_info

        for pool in threadpool_info():
            print(json.dumps({k: pool.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}))
    except ImportError:
        pass
    rng = np.random.default_rng(0)
    for n in [int(x) for x in args.n.split(",")]:
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        for lib, matmul, x, y in [("torch (MKL)", torch.matmul, ta, tb), ("numpy (OpenBLAS)", np.matmul, a, b)]:
            print(json.dumps({"lib": lib, "n": n, "gflop_per_s": best_gflops(matmul, x, y, n, args.iters), "threads": args.threads}))


if __name__ == "__main__":
    main()
