"""benchmarks/kmeans.py -- magnet.py's kmeans_pp against scikit-learn's KMeans.

Optional dependency, for this benchmark only: scikit-learn (`pip install scikit-learn`).  No stage
file and no test needs it; without it this script says so and exits with code 2.

What it compares (issue 3; the k-means++ of App. A "Magnet Loss"): magnet.kmeans_pp (torch; greedy k-means++
seeding with 2 + ln k candidates per step, Lloyd until the assignment stops changing, cap 100)
against sklearn.cluster.KMeans(init="k-means++", n_init=1) (the same greedy seeding, Lloyd with
its default tol=1e-4, max_iter=300), on the same float32 data and the same number of threads
(torch.set_num_threads and threadpoolctl's limit for scikit-learn's OpenMP), over several seeds:
  * cifar-class: 5,000 x 512, K = 2  (one CIFAR10 class, App. A's K)
  * update:      50,000 x 512, 10 classes x K = 2 (one whole ClusTR cluster update: fit_clusters
                 against a loop of 10 KMeans fits)
  * large-k:     20,000 x 512, K = 20
Reported: inertia ratio (mean over seeds, ours / scikit-learn; < 1 is better) and wall time of
each (per seed the fastest of --repeats identical runs, then the median over seeds).
The data are synthetic stand-ins for ReLU features (non-negative; each class a mixture of a few
blobs plus noise), generated with a fixed seed: real features were not used.

    python benchmarks/kmeans.py                      # all cases, 2 threads, 3 seeds
    python benchmarks/kmeans.py --cases cifar-class --threads 1 --seeds 5
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
    "cifar-class": (5000, 512, 1, 2),
    "update": (50000, 512, 10, 2),
    "large-k": (20000, 512, 1, 20),
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


def run_ours(x, labels, classes, K, seed, device):
    """-> (seconds, inertia) of kmeans_pp (one class) or fit_clusters (several)."""
    xd, ld = x.to(device), labels.to(device)
    g = torch.Generator(device=device).manual_seed(seed)
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
    p.add_argument("--threads", type=int, default=2, help="threads for both torch and sklearn")
    p.add_argument("--seeds", type=int, default=3, help="runs per case (different seedings)")
    p.add_argument("--repeats", type=int, default=3,
                   help="identical runs per seed; the fastest counts (robust to a shared CPU)")
    p.add_argument("--device", default="cpu", help="device for the torch side")
    args = p.parse_args(argv)
    try:
        import sklearn
        from threadpoolctl import threadpool_limits
    except ImportError:
        print("error: this benchmark needs scikit-learn (pip install scikit-learn); magnet.py "
              "itself does not", file=sys.stderr)
        raise SystemExit(2)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__} ({args.device}, {torch.get_num_threads()} threads) | "
          f"scikit-learn {sklearn.__version__} ({args.threads} threads) | {os.cpu_count()} CPUs")
    print(f"{'case':<12} {'rows x dim':>12} {'C x K':>7} {'inertia ours/sk':>16} "
          f"{'ours s':>8} {'sklearn s':>9} {'speed-up':>8}")
    with threadpool_limits(limits=args.threads):
        for name in args.cases:
            n, dim, classes, K = CASES[name]
            x, labels = synthetic_features(n, dim, classes, seed=0)
            run_ours(x, labels, classes, K, 123, device)                  # warm-up (allocations)
            ours, theirs = [], []
            for seed in range(args.seeds):  # per seed: the best of --repeats identical runs
                runs = [run_ours(x, labels, classes, K, seed, device) for _ in range(args.repeats)]
                ours.append((min(r[0] for r in runs), runs[0][1]))
                runs = [run_sklearn(x, labels, classes, K, seed) for _ in range(args.repeats)]
                theirs.append((min(r[0] for r in runs), runs[0][1]))
            ratio = statistics.mean(o[1] for o in ours) / statistics.mean(t[1] for t in theirs)
            t_ours = statistics.median(o[0] for o in ours)
            t_sk = statistics.median(t[0] for t in theirs)
            print(f"{name:<12} {f'{n} x {dim}':>12} {f'{classes} x {K}':>7} {ratio:16.5f} "
                  f"{t_ours:8.3f} {t_sk:9.3f} {t_sk / t_ours:7.1f}x", flush=True)


if __name__ == "__main__":
    main()
