"""benchmarks/kmeans.py -- magnet.py's kmeans_pp against scikit-learn's KMeans.

Optional dependency, for this benchmark only: scikit-learn (`pip install scikit-learn`).  No stage
file and no test needs it; without it this script says so and exits with code 2.

What it compares (issue 3, issue 15; the k-means++ of App. A "Magnet Loss"): magnet.kmeans_pp
(torch; greedy k-means++ seeding with 2 + ln k candidates per step, Lloyd until the assignment
stops changing or the centres move by less than scikit-learn's tol, cap 100) against
sklearn.cluster.KMeans(init="k-means++", n_init=1) (the same greedy seeding, Lloyd with its
default tol=1e-4, max_iter=300), on the same float32 data and the same number of threads
(torch.set_num_threads and threadpoolctl's limit for scikit-learn's OpenMP and BLAS), at each
--threads count, over several seeds:
  * k2-512d:   5,000 x 512, K = 2   (one CIFAR10 class, App. A's K)
  * k8-512d:   5,000 x 512, K = 8
  * k10-64d:  20,000 x 64,  K = 10
  * update:   50,000 x 512, 10 classes x K = 2 (one whole ClusTR cluster update: fit_clusters
              against a loop of 10 KMeans fits)
Reported: inertia ratio (mean over seeds, ours / scikit-learn; < 1 is better) and wall time of
each (per seed the fastest of --repeats runs, ours and scikit-learn's alternating so that a
shared CPU slows both alike; then the median over seeds).  "goal" is yes when ours is faster and
the inertia ratio is at most 1.01 (issue 15).  The last three columns are ours with rtol=0,
scikit-learn's stopping rule alone (kmeans_pp's relative-inertia stop switched off): what the
rtol rule buys, and what it costs in inertia.
The data are synthetic stand-ins for ReLU features (non-negative; each class a mixture of a few
blobs plus noise), generated with a fixed seed: real features were not used.

    python benchmarks/kmeans.py                      # all cases, at 1 and at 2 threads, 3 seeds
    python benchmarks/kmeans.py --cases k2-512d --threads 1 --seeds 5
    python benchmarks/kmeans.py --device cuda        # the torch side on a GPU (sklearn: CPU)
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import magnet  # noqa: E402  (kmeans_pp and fit_clusters: the code under test)

CASES = {  # name: (rows, dim, classes, K per class)
    "k2-512d": (5000, 512, 1, 2),
    "k8-512d": (5000, 512, 1, 8),
    "k10-64d": (20000, 64, 1, 10),
    "update": (50000, 512, 10, 2),
}


def synthetic_features(n, dim, classes, seed):
    """Non-negative, clustered rows like post-ReLU pooled features: per class 3 blobs."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    blobs = torch.rand(classes, 3, dim, generator=g) * 2
    which = torch.randint(0, 3, (n,), generator=g)
    x = (blobs[labels, which] + 0.7 * torch.randn(n, dim, generator=g)).clamp_min(0)
    return x.float(), labels


def inertia(x, centers, assignment):
    return float((x.double() - centers.double()[assignment]).pow(2).sum())


def run_ours(x, labels, classes, K, seed, device, rtol=None):
    """-> (seconds, inertia) of kmeans_pp (one class) or fit_clusters (several); rtol=None: the
    default of kmeans_pp, else that rtol (0: scikit-learn's stopping rule alone)."""
    xd, ld = x.to(device), labels.to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    default = magnet.kmeans_pp
    if rtol is not None:   # fit_clusters calls magnet.kmeans_pp by name: patched for the run
        magnet.kmeans_pp = lambda *a, **kw: default(*a, **kw, rtol=rtol)
    try:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if classes == 1:
            centers, assignment = magnet.kmeans_pp(xd, K, generator=g)
        else:
            centers, _, assignment, _ = magnet.fit_clusters(xd, ld, classes, K, g)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    finally:
        magnet.kmeans_pp = default
    return seconds, inertia(x, centers.cpu(), assignment.cpu())


def run_sklearn(x, labels, classes, K, seed):
    from sklearn.cluster import KMeans
    xn, ln = x.numpy(), labels.numpy()
    total, t0 = 0.0, time.perf_counter()
    for c in range(classes):
        rows = xn[ln == c]
        km = KMeans(n_clusters=K, init="k-means++", n_init=1, random_state=seed).fit(rows)
        total += float(km.inertia_)
    return time.perf_counter() - t0, total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="thread counts, each used for both torch and sklearn")
    p.add_argument("--seeds", type=int, default=3, help="runs per case (different seedings)")
    p.add_argument("--repeats", type=int, default=5,
                   help="runs per seed, ours and sklearn alternating; the fastest counts")
    p.add_argument("--device", default="cpu", help="device for the torch side")
    args = p.parse_args(argv)
    if min(args.threads) < 1 or args.seeds < 1 or args.repeats < 1:
        print("error: --threads, --seeds and --repeats must be at least 1", file=sys.stderr)
        raise SystemExit(2)
    try:
        import sklearn
        from threadpoolctl import threadpool_limits
    except ImportError:
        print("error: this benchmark needs scikit-learn (pip install scikit-learn); magnet.py "
              "itself does not", file=sys.stderr)
        raise SystemExit(2)
    device = torch.device(args.device)
    print(f"torch {torch.__version__} ({args.device}) | scikit-learn {sklearn.__version__} | "
          f"{os.cpu_count()} CPUs | {args.seeds} seeds x best of {args.repeats}")
    print(f"{'threads':>7} {'case':<9} {'rows x dim':>12} {'C x K':>7} {'inertia ours/sk':>16} "
          f"{'ours s':>8} {'sklearn s':>9} {'speed-up':>8} {'goal':>5} | rtol=0: {'inertia':>8} "
          f"{'s':>7} {'speed-up':>8}")
    data = {name: synthetic_features(*CASES[name][:3], seed=0) for name in args.cases}
    for threads in args.threads:
        torch.set_num_threads(threads)
        with threadpool_limits(limits=threads):
            for name in args.cases:
                n, dim, classes, K = CASES[name]
                x, labels = data[name]
                run_ours(x, labels, classes, K, 123, device)              # warm-up (allocations)
                run_sklearn(x, labels, classes, K, 123)
                runs = {"ours": [], "sklearn": [], "rtol0": []}           # per seed: (s, inertia)
                for seed in range(args.seeds):  # per seed: the best of --repeats, alternating
                    times = {key: [] for key in runs}
                    for _ in range(args.repeats):
                        times["ours"].append(run_ours(x, labels, classes, K, seed, device))
                        times["sklearn"].append(run_sklearn(x, labels, classes, K, seed))
                        times["rtol0"].append(run_ours(x, labels, classes, K, seed, device, rtol=0))
                    for key, t in times.items():
                        runs[key].append((min(r[0] for r in t), t[0][1]))
                sec = {key: statistics.median(r[0] for r in v) for key, v in runs.items()}
                mean_inertia = {key: statistics.mean(r[1] for r in v) for key, v in runs.items()}
                ratio = mean_inertia["ours"] / mean_inertia["sklearn"]
                ratio0 = mean_inertia["rtol0"] / mean_inertia["sklearn"]
                goal = "yes" if sec["ours"] < sec["sklearn"] and ratio <= 1.01 else "no"
                print(f"{threads:>7} {name:<9} {f'{n} x {dim}':>12} {f'{classes} x {K}':>7} "
                      f"{ratio:16.5f} {sec['ours']:8.4f} {sec['sklearn']:9.4f} "
                      f"{sec['sklearn'] / sec['ours']:7.2f}x {goal:>5} | {'':>7} {ratio0:8.5f} "
                      f"{sec['rtol0']:7.4f} {sec['sklearn'] / sec['rtol0']:7.2f}x", flush=True)

if __name__ == "__main__":
    main()
