"""benchmarks/eq4.py -- forward + backward time of Eq. (4), explicit differences against the expanded form.

No dependency beyond torch.  What it times (issue 15): the log-probabilities of ClusTR Eq. (4)
(soft nearest-cluster classifier, log space) and their gradient with respect to the features,
at CIFAR100's size (100 classes x K = 2 centres, 512-d features of a width-64 ResNet18), for a
batch of --batch rows, all centres (D = None) and the D = 20 nearest (Sec. 4.2, CIFAR100):
  * explicit:  the previous eq4 block, ||f - mu_j||^2 from an [n, M, d] difference tensor and
               the per-class logsumexp over an [n, classes, M] masked copy (reproduced here)
  * expanded:  the expanded form ||f||^2 - 2 f.mu + ||mu||^2 on centre-shifted operands
               (sq_distances), with that same [n, classes, M] logsumexp
  * now:       magnet.cluster_log_probs, the expanded form and the per-class logsumexp on
               [n, M] (per-class peaks, index_add)
Reported: milliseconds per forward + backward (the fastest of --repeats), the speed-up over
"explicit", and each form's largest |log p - log p64| against float64 explicit differences on
the same rows (finite entries).  The features are synthetic ReLU-like rows (a shared non-negative
base plus a class part, norm about 25; sigma^2 from a tight clustering, so that the exponents of
Eq. (4) reach a few hundred), generated with a fixed seed.

    python benchmarks/eq4.py                          # batches 256 and 512, 1 thread
    python benchmarks/eq4.py --batch 512 --threads 2
    python benchmarks/eq4.py --device cuda
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import magnet  # noqa: E402  (the eq4 block: sq_distances, cluster_log_probs)


def explicit_log_probs(features, centers, center_classes, sigma2, D=None):
    """The previous eq4 block: explicit [n, M, d] differences, [n, classes, M] logsumexp."""
    sq = (features[:, None, :] - centers[None, :, :]).pow(2).sum(-1)      # [n, M]
    return _masked_logsumexp(-sq / (2 * sigma2), sq, center_classes, D)


def expanded_log_probs(features, centers, center_classes, sigma2, D=None):
    """The expanded form of the eq4 block with the previous [n, classes, M] logsumexp."""
    sq = magnet.sq_distances(features, centers)
    return _masked_logsumexp(-sq / (2 * sigma2), sq, center_classes, D)


def _masked_logsumexp(s, sq, center_classes, D):
    if D is not None and D < s.shape[1]:
        keep = torch.zeros_like(s, dtype=torch.bool).scatter_(
            1, sq.detach().topk(D, dim=1, largest=False).indices, True)
        s = s.masked_fill(~keep, float("-inf"))
    member = center_classes[None, :] == torch.arange(
        int(center_classes.max()) + 1, device=s.device)[:, None]           # [classes, M]
    per_class = s[:, None, :].masked_fill(~member[None], float("-inf"))    # [n, classes, M]
    return per_class.logsumexp(-1) - s.logsumexp(-1, keepdim=True)


FORMS = {"explicit": explicit_log_probs, "expanded": expanded_log_probs,
         "now": magnet.cluster_log_probs}


def synthetic(n, dim, classes, K, device, seed=0):
    """-> features [n, d], centres [M, d], centre classes [M], labels [n], sigma^2 (Eq. (3))."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(dim, generator=g).abs()                             # shared by all classes
    centers = (base + 0.5 * torch.randn(classes * K, dim, generator=g)).clamp_min(0)
    own = torch.randint(classes * K, (n,), generator=g)
    features = (centers[own] + 0.03 * torch.randn(n, dim, generator=g)).clamp_min(0)
    sigma2 = float((features - centers[own]).pow(2).sum() / (n - 1))
    center_classes = torch.arange(classes).repeat_interleave(K)
    return (features.to(device), centers.to(device), center_classes.to(device),
            center_classes[own].to(device), sigma2)


def forward_backward(form, f, centers, center_classes, labels, sigma2, D):
    f = f.detach().requires_grad_()
    log_p = form(f, centers, center_classes, sigma2, D)
    (-log_p.gather(1, labels[:, None])).sum().backward()                   # cross-entropy on Eq. (4)
    return log_p.detach()


def timed(fn, device, repeats):
    fn()                                                                   # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[256, 512], help="rows n")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--K", type=int, default=2, help="centres per class")
    p.add_argument("--dim", type=int, default=512, help="feature dimension (8 x width)")
    p.add_argument("--D", type=int, nargs="+", default=[0, 20], help="D nearest; 0: all centres")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="the fastest counts")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if min(args.batch) < 2 or args.classes < 2 or args.K < 1 or args.dim < 1 or min(args.D) < 0 \
            or args.threads < 1 or args.repeats < 1:
        print("error: --batch >= 2, --classes >= 2, --K, --dim, --threads, --repeats >= 1, "
              "--D >= 0", file=sys.stderr)
        raise SystemExit(2)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    M = args.classes * args.K
    print(f"torch {torch.__version__} ({args.device}, {torch.get_num_threads()} threads) | "
          f"{args.classes} classes x K = {args.K} = {M} centres, d = {args.dim} | best of {args.repeats}")
    print(f"{'batch':>5} {'D':>4} {'form':<9} {'fwd+bwd ms':>10} {'speed-up':>8} {'max |dlog p|':>13}")
    for n in args.batch:
        f, centers, center_classes, labels, sigma2 = synthetic(
            n, args.dim, args.classes, args.K, device)
        for D in args.D:
            D = D or None
            reference = explicit_log_probs(f.double(), centers.double(), center_classes,
                                           sigma2, D)
            finite = torch.isfinite(reference)
            base = None
            for name, form in FORMS.items():
                log_p = forward_backward(form, f, centers, center_classes, labels, sigma2, D)
                error = float((log_p.double() - reference)[finite].abs().max())
                sec = timed(lambda: forward_backward(form, f, centers, center_classes, labels,
                                                     sigma2, D), device, args.repeats)
                base = base or sec
                print(f"{n:>5} {D or 'all':>4} {name:<9} {sec * 1e3:10.1f} {base / sec:7.1f}x "
                      f"{error:13.1e}", flush=True)


if __name__ == "__main__":
    main()
