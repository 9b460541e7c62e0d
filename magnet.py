"""magnet.py -- ClusTR stage 2: Magnet-loss fine-tuning of the features (Alfarra, Perez et al., BMVC 2021).

Paper: "Rethinking Clustering for Robustness", Sec. 3.2 (Eq. (3) Magnet loss, Eq. (4) inference),
Sec. 3.3 (ClusTR: warm start, head removed), Sec. 4.2 (setup), Appendix A ("Optimization",
"Magnet Loss"), Appendix B.1 (k-means on nominal features, no fine-tuning).

ClusTR takes the nominal network of nominal.py, removes its last linear layer and fine-tunes the
8w-dimensional features f(x) with the Magnet loss of Rippel et al. (ClusTR Eq. (3)), so that each
class gathers around K = 2 cluster centres.  Each batch is a *neighbourhood* (App. A): a seed
cluster drawn in proportion to its recent loss plus its m - 1 = 11 nearest clusters of other
classes, d = 20 examples from each (240 images).  After every epoch k-means++ (per class, on the
eval-mode features of the whole un-augmented training split) recomputes the centres, sigma^2 is
the Eq. (3) variance of the whole split around them, and the test set is classified by the soft
nearest-cluster rule of Eq. (4).  Without --init the same training starts from random weights:
the "Magnet Loss" row of Table 1.  With --epochs 0 it only clusters the --init features and
evaluates Eq. (4): the experiment of App. B.1 (the paper: 21.6% on CIFAR10 against 95.0% nominal).

Usage (copy-paste):
    python magnet.py --data cifar10 --init ckpt.pt                  # ClusTR, the paper's setting -> magnet.pt
    python magnet.py --data svhn --init svhn.pt --out svhn_clustr.pt
    python magnet.py --data cifar10 --out magnet_only.pt            # Magnet loss from random init (Table 1)
    python magnet.py --data cifar10 --init ckpt.pt --epochs 0       # App. B.1: k-means on nominal features
    python nominal.py --data cifar10 --width 16 --limit 512 --epochs 3 && \
    python magnet.py --data cifar10 --width 16 --limit 512 --epochs 3 --init ckpt.pt   # quick CPU run
    python magnet.py --data cifar10 --init ckpt.pt --stop-after 10  # ... interrupted after epoch 10
    python magnet.py --data cifar10 --init ckpt.pt --resume         # ... continues from magnet.pt

Reads: --init (a nominal checkpoint, weights_only) and the dataset.  Writes: --out (format
"clustr/1", stage "magnet", with the `clusters` entry {centers, center_classes, variance, K, alpha,
D}; rewritten atomically after every epoch, epoch 0 = the clusters of the starting features) and
<out>.log.jsonl.  Needs torch, torchvision, numpy; imports no other file of this repository: copy
it freely.  Blocks between "# --- shared: NAME ---" markers are identical copies of the same
blocks in the other stages (test_all.py checks this).

Lineage: Magnet loss and neighbourhood sampling (Rippel, Paluri, Dollar, Bourdev, ICLR 2016);
k-means++ (Arthur & Vassilvitskii 2007) with the greedy local trials of scikit-learn's default;
ResNet18 (He et al. 2016); Adam (Kingma & Ba 2014).
"""

import argparse
import contextlib
import fcntl
import fractions
import gzip
import json
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ======================================================================================
# 1. Arguments
# ======================================================================================

# Paper defaults per dataset, applied only to flags the user left unset.
#   lr 1e-4: App. A "Optimization" (Adam, as in the warm start; no schedule is given).
#   epochs: Sec. 4.2 and App. A: 30 CIFAR10, 60 CIFAR100.  SVHN: Sec. 4.2 says 30, App. A says
#     60; we follow Sec. 4.2 (30) -- pass --epochs 60 for App. A.
#   alpha: App. A: 12.5 CIFAR10, 13 SVHN (ClusTR).  CIFAR100: the paper gives only 8.5 for
#     ClusTR+QTRADES; we use it for ClusTR too.  folder: CIFAR10's values.
#   crop/flip: as nominal.py (App. A crops for CIFAR; flips from the authors' code; none for SVHN).
PAPER_DEFAULTS = {
    "cifar10": dict(epochs=30, lr=1e-4, alpha=12.5, crop=4, flip=True),
    "cifar100": dict(epochs=60, lr=1e-4, alpha=8.5, crop=4, flip=True),
    "svhn": dict(epochs=30, lr=1e-4, alpha=13.0, crop=0, flip=False),
    "folder": dict(epochs=30, lr=1e-4, alpha=12.5, crop=0, flip=False),
    # Not in the paper: CIFAR10's values, no crop or flip.
    "fashion-mnist": dict(epochs=30, lr=1e-4, alpha=12.5, crop=0, flip=False),
    "mnist": dict(epochs=30, lr=1e-4, alpha=12.5, crop=0, flip=False),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="magnet.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter, epilog="None above: --data, --width, "
        f"--data-dir those of --init (or --resume's), else cifar10, 64, ./data; the rest per --data: {PAPER_DEFAULTS}",
        description="ClusTR fine-tuning: Magnet loss (Eq. (3)), k-means++, sampler (Sec. 3.3, 4.2, App. A); Eq. (4)")
    add_common_args(p, data=None, width=None, data_dir=None)
    g = p.add_argument_group("ClusTR fine-tuning (Sec. 3.3, 4.2; App. A 'Optimization', 'Magnet Loss')")
    g.add_argument("--init", metavar="PATH", help="nominal.py checkpoint (Sec. 3.3); None: random weights (Table 1)")
    g.add_argument("--out", default="magnet.pt", help="checkpoint path; log goes to <out>.log.jsonl")
    # --epochs 0: k-means on the --init features and Eq. (4) only, the experiment of App. B.1
    g.add_argument("--epochs", type=number(int, 0), help="Sec. 4.2 (App. A: 60 SVHN); 0: clusters only (B.1)")
    g.add_argument("--lr", type=number(float, 0, 1, open_low=True), help="Adam learning rate; App. A: 1e-4")
    # -b: the forward passes of k-means, sigma^2 and the test set; training batches are m x d (App. A)
    g.add_argument("-b", "--batch-size", type=number(int, 1), default=500, help="images per feature pass")
    # --m: a seed cluster and its m-1 nearest clusters of other classes (impostors)
    g.add_argument("--m", type=number(int, 2), default=12, metavar="m", help="clusters per batch; App. A: 12")
    g.add_argument("--d", type=number(int, 2), default=20, metavar="d", help="examples per sampled cluster; App. A: 20")
    g.add_argument("--K", type=number(int, 1), default=2, help="k-means++ clusters per class; App. A: 2")
    # --alpha: CIFAR100 8.5, the paper's ClusTR+QTRADES value (none is given for ClusTR): PAPER_DEFAULTS
    g.add_argument("--alpha", type=number(float, 0), help="margin of Eq. (3); App. A: 12.5 CIFAR10, 13 SVHN")
    # --D: Sec. 4.2 uses 20 for CIFAR100 with ClusTR+QTRADES (App. B.3); at most --K x classes (refused at use)
    g.add_argument("--D", type=number(int, 1), help="Eq. (4) over the D nearest centres (Sec. 4.2); None: all")
    # --crop: App. A pads 4 for CIFAR10/100, none for SVHN; --flip: the authors' code flips CIFAR (the paper
    # does not mention flips); folder, fashion-mnist and mnist: neither
    g.add_argument("--crop", type=number(int, 0), help="random crops from a padding of this many pixels; App. A")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, help="horizontal flips (the authors' code, CIFAR)")
    add_run_args(g)
    args = p.parse_args(argv)
    defaults_from_init(args)
    for key, value in PAPER_DEFAULTS[args.data].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# Arguments that do not change the trained weights: a resume may differ in these.
NOT_SHAPING = set("out resume stop_after slim device amp deterministic data_dir overwrite compile".split())


# ======================================================================================
# 2. The method: the App. A epoch; Eq. (4) inference, Eq. (3) Magnet loss, k-means++, sampler
#    (ClusTR has no head: the model is ResNet18(num_classes=0) and f(x) = model.features(x))
# ======================================================================================

def train_one_epoch(model, opt, train, sampler, args, generator, device):
    """App. A: an epoch passes as many images as the training split holds, ceil(N / (m d))
    neighbourhood batches; each batch is one step of Adam on the Magnet loss of Eq. (3).
    -> (mean per-example loss, images seen)."""
    model.train()
    loss_sum, seen = 0.0, 0
    for _ in range(sampler.batches_per_epoch()):
        idx, ids = sampler.sample()                                     # CPU: rows [B], cluster ids [B] (B <= m d)
        x = to_float(augment(train[0][idx.to(device)], args.crop, args.flip, generator))   # [B, C, H, W]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            f = model.features(x)                                       # [B, 8w] r_n of Eq. (3)
        # Eq. (3): cluster means and sigma^2 from this batch; the class of a row is its cluster's
        loss, per, _ = magnet_loss(f, ids.to(device), sampler.center_classes[ids].to(device), args.alpha)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sampler.record(idx, per)                                        # Rippel et al.: loss index; a host sync
        loss_sum, seen = loss_sum + float(sampler.losses[idx].sum()), seen + len(idx)   # the [B] losses just recorded
    return loss_sum / max(1, seen), seen


# --- shared: eq4 ---
def sq_distances(features, centers):
    """||f_i - mu_j||^2 [n, M] of features [n, d] and centres [M, d], by the
    expanded form ||f||^2 - 2 f.mu + ||mu||^2: one matmul instead of an [n, M, d] difference
    tensor (benchmarks/README.md: about a hundred times faster, forward and backward, at CIFAR100's
    size).  Its weak point is cancellation: ||f||^2 and 2 f.mu are large when f and mu lie far
    from the origin (ReLU features do), and their difference loses those digits.  Distances
    do not change when both sides move by the same vector, so both are first shifted by the
    centres' mean: the products then have the size of the spread of features and centres
    around the centre cloud, not of ||f||.  Not clamped at 0: a rounding below 0 (only at
    f ~ mu_j) makes s_j of Eq. (4) a hair above 0, harmless in a logsumexp, while a clamp would
    cut the gradient 2 (f - mu_j) there and leave the other terms' sum unbalanced.  An oracle
    test compares log-probabilities and input gradients with float64 explicit differences."""
    # The matmul must run in float32 (or float64) itself: autocast, which would make it a
    # bfloat16 matmul (8 significant bits, fine for a convolution, not for a difference of two
    # large numbers), is switched off here; TF32 matmuls (torch.backends.cuda.matmul.allow_tf32,
    # torch.set_float32_matmul_precision("high")) would cost the same digits: leave them off.
    if features.dtype not in (torch.float32, torch.float64):
        features = features.float()                                        # bf16 from autocast
    centers = centers.to(features)
    with torch.autocast(features.device.type, enabled=False):
        shift = centers.detach().mean(0)                                   # [d], a constant
        f = features - shift                                               # [n, d]
        mu = centers - shift                                               # [M, d]
        f_sq = f.square().sum(1, keepdim=True)                             # [n, 1]
        return torch.addmm(f_sq + mu.square().sum(1), f, mu.T, alpha=-2)   # [n, M]


def nearest_centers_mask(sq_dist, D):
    """[n, M] bool: the D centres nearest to each row of sq_dist [n, M] (Sec. 4.2, App. B.3), or
    None when D is None or >= M (every centre)."""
    if D is None or D >= sq_dist.shape[1]:
        return None
    nearest = sq_dist.topk(D, dim=1, largest=False).indices                # [n, D]
    return torch.zeros_like(sq_dist, dtype=torch.bool).scatter(             # a tensor source: a
        1, nearest, torch.ones_like(nearest, dtype=torch.bool))             # TorchScript trace needs it


# class_log_scores' per-class logsumexp runs on [n, M], not on an [n, classes, M] masked copy: with
# m_c the largest s_j of class c (a constant shift, so no gradient: the result does not depend on it),
# logsumexp_{j in c} s_j = m_c + log sum_{j in c} exp(s_j - m_c), the sums by one matmul with the
# [M, classes] one-hot matrix of the centres' classes (exact: products by 1 and 0, and deterministic
# on CUDA, where index_add adds atomically in any order); each sum is >= 1 (its largest term is
# exp(0)), so nothing underflows.  A class without a kept centre gets -inf through a where whose other
# branch sees log(1), so that no 0 * inf reaches the gradient.
def class_log_scores(features, centers, center_classes, sigma2, D=None, keep=None, num_classes=None):
    """The class log-scores of ClusTR Eq. (4), the soft nearest-cluster classifier:

        p_c(x) = sum_{j in class c} exp(-||f - mu_j||^2 / (2 sigma^2))
                 / sum_{all j}      exp(-||f - mu_j||^2 / (2 sigma^2))
        z_c = logsumexp_{j in c}(s_j),   s_j = -||f - mu_j||^2 / (2 sigma^2),   p = softmax(z)

    features [n, d], centers [M, d] (M = classes x K), center_classes [M] (int), sigma2 = sigma^2
    (float or 0-d tensor).  D (Sec. 4.2, App. B.3): the sums run over the D nearest centres only;
    a class with no centre among them gets z = -inf (p = 0).  Masks are applied as -inf
    *before* each reduction (never multiplied into an exponent), and masked_fill passes no
    gradient to masked entries, so gradients stay finite even for classes absent from the D
    nearest and for features far from every centre (no exp underflow).  keep [n, M] bool, when
    given, is the set of centres the sums run over instead of the D nearest (qtrades.py: Eq. (6)
    compares two distributions on the same set).  num_classes: a Python int where the classes
    must not be counted from a tensor (torch.export: attack.py's ClassScores).  -> [n, classes]."""
    if features.dtype not in (torch.float32, torch.float64):
        features = features.float()                                        # bf16 under autocast
    centers = centers.to(features)
    sq_dist = sq_distances(features, centers)                              # [n, M]
    s = -sq_dist / (2 * sigma2)                                            # [n, M]
    if keep is None:
        keep = nearest_centers_mask(sq_dist.detach(), D)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    classes = center_classes.to(features.device).long()                    # [M]
    num_classes = int(classes.max()) + 1 if num_classes is None else num_classes
    n, M = s.shape
    peak = s.detach().new_full((n, num_classes), float("-inf")).scatter_reduce_(
        1, classes.expand(n, M), s.detach(), "amax")                       # [n, classes] m_c
    present = peak > float("-inf")                                         # a kept centre in c
    peak = peak.masked_fill(~present, 0.0)
    terms = (s - peak.index_select(1, classes)).exp()                      # [n, M], masked: 0
    one_hot = (classes[:, None] == torch.arange(num_classes, device=s.device)).to(s.dtype)
    with torch.autocast(s.device.type, enabled=False):
        sums = terms @ one_hot                                             # [n, classes]
    per_class = torch.where(present, torch.where(present, sums, 1.0).log() + peak, float("-inf"))
    return per_class                                                       # [n, classes] z_c


def cluster_log_probs(features, centers, center_classes, sigma2, D=None, keep=None):
    """log of ClusTR Eq. (4) in log space, log p_c = z_c - logsumexp_c z_c (class_log_scores'
    arguments): the denominator logsumexp_j s_j taken over the class scores (the same number:
    logsumexp_c of logsumexp_{j in c}), a log_softmax, so that their rounding cancels: when one
    class holds all the probability, its log p is exactly 0 and so is its gradient, even where
    float32 cannot resolve s_j (|s_j| ~ 1e6).  -> [n, classes]."""
    return torch.log_softmax(class_log_scores(features, centers, center_classes, sigma2, D, keep), dim=1)
# --- end shared: eq4 ---


# --- shared: magnet-loss ---
def magnet_loss(features, cluster_ids, class_ids, alpha):
    """ClusTR Eq. (3), the Magnet loss (Rippel et al. 2016, Eq. (5)), in its stochastic batch form
    (App. A "Magnet Loss"): the cluster means are the batch means of the sampled clusters.

        L = 1/N sum_n { alpha + ||r_n - mu(r_n)||^2 / (2 sigma^2)
                        + log sum_{mu: class(mu) != c_n} exp(-||r_n - mu||^2 / (2 sigma^2)) }_+
        sigma^2 = 1/(N - 1) sum_n ||r_n - mu(r_n)||^2          (over the batch)

    features r [N, d]; cluster_ids [N] (any integer ids; the rows of one id form one cluster);
    class_ids [N].  The denominator runs over clusters of *other classes only*: same-class
    clusters are masked with -inf before the logsumexp (no exp(0) = 1 terms sneak in), and the
    logsumexp keeps far-away clusters from underflowing.  sigma^2 is a function of the batch, so
    gradients flow through it as through the rest of Eq. (3).
    -> (mean loss, per-example losses [N], sigma^2 as a 0-d tensor)."""
    if features.dtype not in (torch.float32, torch.float64):
        features = features.float()                                        # bf16 under autocast
    ids, member = torch.unique(cluster_ids, return_inverse=True)           # m clusters; [N] -> 0..m-1
    m = len(ids)
    counts = features.new_zeros(m).index_add_(0, member, features.new_ones(len(member)))  # [m]
    mu = features.new_zeros(m, features.shape[1]).index_add_(
        0, member, features) / counts[:, None]                             # [m, d] batch means
    mu_class = torch.zeros(m, dtype=class_ids.dtype, device=features.device).scatter_(
        0, member, class_ids)                                              # [m] class of each cluster
    sq_dist = (features[:, None, :] - mu[None, :, :]).pow(2).sum(-1)       # [N, m] ||r_n - mu_k||^2
    own = sq_dist.gather(1, member[:, None]).squeeze(1)                    # [N] ||r_n - mu(r_n)||^2
    sigma2 = own.sum() / (len(features) - 1)                               # Eq. (3) sigma^2
    other = mu_class[None, :] != class_ids[:, None]                        # [N, m] other-class clusters
    log_denominator = (-sq_dist / (2 * sigma2)).masked_fill(~other, float("-inf")).logsumexp(1)
    per_example = F.relu(alpha + own / (2 * sigma2) + log_denominator)     # {.}_+ of Eq. (3)
    return per_example.mean(), per_example, sigma2
# --- end shared: magnet-loss ---


# --- shared: kmeans ---
# k-means++ per class on the training features (App. A "Magnet Loss", Sec. 4.2): the centres of the
# clusters the sampler draws from and Eq. (4) classifies by, and the sigma^2 of Eq. (3) around them.
def _scores(c, x):
    """||c_j||^2 - 2 x_i.c_j as [k, n] for centres c [k, d] and rows x [n, d]: the squared
    distance ||x_i - c_j||^2 less ||x_i||^2, by one matmul (the expanded form, as k-means
    libraries do).  Centres along dim 0: reductions over them then run over the outer dimension,
    which torch vectorises along the rows (a transposed copy of x, for another matmul layout,
    costs more than it saves).  In float32 or float64 even under autocast (a bfloat16 matmul
    would lose the digits that tell near centres apart)."""
    with torch.autocast(x.device.type, enabled=False):
        return torch.addmm((c * c).sum(1)[:, None], c, x.T, alpha=-2)


def kmeans_pp(x, k, iters=100, generator=None, tol=1e-4, rtol=1e-4):
    """k-means on the rows of x [n, d] (float, any device), all randomness from `generator`
    (a torch.Generator on x's device).  -> (centers [k, d], assignment [n] in 0..k-1).

    Seeding, k-means++ (Arthur & Vassilvitskii 2007): the first centre is a uniformly drawn row;
    every further centre is drawn with probability proportional to D(x)^2, the squared distance
    to the nearest centre chosen so far.  Greedy variant (scikit-learn's default): draw
    2 + floor(ln k) candidates per step and keep the one that lowers sum_x D(x)^2 the most (plain
    D^2 seeding often misses clusters in 512-d).  When every D^2 is 0 (duplicates) draws are uniform.
    Lloyd (_lloyd): assign each row to its nearest centre, move each centre to the mean of its rows."""
    n, dim = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"kmeans_pp needs 1 <= k <= n rows, got k={k}, n={n}")
    # Distances do not change under a common translation: they are computed from the rows less
    # their mean, so that the expanded form subtracts numbers of the size of the spread, not of
    # ||x|| (ReLU features lie far from the origin), and loses fewer digits.  Centres and sums
    # stay in x's own frame (a centre is the mean of its rows, not that mean shifted and back).
    offset = x.mean(0)                                                     # [d]
    xc = x - offset                                                        # [n, d], a copy
    x_sq = torch.linalg.vector_norm(xc, dim=1).square()                    # [n] ||x - offset||^2
    chosen = torch.randint(n, (1,), device=x.device, generator=generator)  # the first centre's row
    closest = _scores(xc[chosen], xc)[0].add_(x_sq).clamp_min_(0)          # [n] D(x)^2
    for _ in range(1, k):
        weights = torch.where(closest.sum() > 0, closest, torch.ones_like(closest))   # all 0: uniform
        candidates = torch.multinomial(weights, 2 + int(math.log(k)), replacement=True, generator=generator)
        d_cand = torch.minimum(closest, _scores(xc[candidates], xc).add_(x_sq).clamp_min_(0))  # [trials, n]
        best = d_cand.sum(1).argmin()                                      # lowest potential
        closest, chosen = d_cand[best], torch.cat([chosen, candidates[best][None]])   # D^2 with it
    # scikit-learn's scaling: tol x the mean per-feature variance of x (||x - mean||^2 summed)
    return _lloyd(x, xc, x_sq, offset, x[chosen], iters, tol * float(x_sq.sum()) / max(1, n - 1) / dim, rtol)


def _lloyd(x, xc, x_sq, offset, centers, iters, tol, rtol):
    """kmeans_pp's Lloyd rounds from the seeded centres -> (centers [k, d], assignment [n]).
    Stops when the assignment no longer changes, when the centres moved by at most tol in total
    squared distance (scikit-learn's criterion), when a round lowered the inertia (the sum of
    squared distances to the nearest centres) by at most rtol of it, or after `iters` rounds
    (tol = rtol = 0: only when the assignment no longer changes).  The rtol rule ends the long
    tail of rounds in which a few border rows change centre for a negligible gain
    (benchmarks/README.md: the inertia it leaves against scikit-learn's criterion).  A centre left
    without rows is reseeded with the row farthest from its own centre (that row moves to it).  The
    returned assignment is each row's nearest returned centre (ties to the lower index); each centre
    is the mean of its rows when the assignment stopped changing.  Cost per round: one
    [k, d] x [d, n] matmul and a reduction over the k centres; the centre sums are kept in float64
    and updated by the rows that changed centre only, not summed again.  Two host syncs per round."""
    k, dim = centers.shape
    low, assignment = _scores(centers - offset, xc).min(0)                 # [n], [n]
    inertia, recount = (x_sq + low).sum(dtype=torch.float64), True        # ||x - c(x)||^2 summed
    for _ in range(iters):
        if recount:     # the first round, and a centre without rows: the rows farthest from theirs move to it
            empty = (torch.bincount(assignment, minlength=k) == 0).nonzero().flatten()
            assignment[(x_sq + low).topk(len(empty)).indices] = empty     # D^2 = ||x||^2 + low
            counts = torch.bincount(assignment, minlength=k)               # [k]
            sums = x.new_zeros(k, dim).index_add_(0, assignment, x).double()   # [k, d]
        # a centre still without rows (only with duplicate rows) stays where it was
        moved = torch.where(counts[:, None] > 0, (sums / counts.clamp_min(1)[:, None]).to(x.dtype), centers)
        shift, centers = (moved - centers).pow(2).sum(), moved
        low, new = _scores(centers - offset, xc).min(0)
        switch = (new != assignment).nonzero().flatten()                   # rows changing centre
        x_switch = x[switch].double()
        sums.index_add_(0, new[switch], x_switch).index_add_(0, assignment[switch], x_switch, alpha=-1)
        counts, assignment = torch.bincount(new, minlength=k), new
        last, inertia = inertia, (x_sq + low).sum(dtype=torch.float64)
        far, gain, recount = torch.stack([shift > tol, last - inertia > rtol * inertia, (counts == 0).any()]).tolist()
        if len(switch) == 0 or not far or (rtol > 0 and not gain):         # converged
            break
    return centers, assignment


@torch.no_grad()
def features_of(model, images, batch_size, amp):
    """Eval-mode features f(x) [N, 8w] (float32) of un-augmented uint8 images [N, C, H, W]: what
    k-means, sigma^2 and Eq. (4) see (README "Where this differs from the paper and the authors' code",
    "Consistent clusters").  Batch-norm buffers are left as they were; the model is left in eval mode."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        return torch.cat([model.eval().features(to_float(images[start:start + batch_size])).float()
                          for start in range(0, len(images), batch_size)])


def fit_clusters(features, labels, num_classes, K, generator=None, iters=100):
    """ClusTR App. A / Sec. 4.2: K k-means++ clusters per class on the whole training split's
    features [N, d] (labels [N]); cluster j = c*K + k belongs to class c.  Then the variance of
    Eq. (3) over the whole split around each row's own centre mu(r_n) (its nearest centre of
    its class, v* of Eq. (3)):  sigma^2 = 1/(N-1) sum_n ||r_n - mu(r_n)||^2.
    -> (centers [C*K, d], center_classes [C*K], assignment [N] cluster ids, sigma^2 float)."""
    counts = torch.bincount(labels, minlength=num_classes).tolist()
    if min(counts) < K:
        raise BadInput(f"K={K} clusters per class need K training examples of each; the classes hold {counts}")
    centers, assignment = features.new_zeros(num_classes * K, features.shape[1]), torch.empty_like(labels)
    # own_sq: sum ||r_n - mu(r_n)||^2 in float64, from chunks of ~1 MB of explicit differences
    chunk, own_sq = max(1, 2 ** 18 // features.shape[1]), 0.0
    for c in range(num_classes):
        rows = (labels == c).nonzero().flatten()
        x = features[rows]                                                 # [n_c, d]
        mu, a = kmeans_pp(x, K, iters, generator)
        centers[c * K:(c + 1) * K], assignment[rows] = mu, c * K + a
        for s in range(0, counts[c], chunk):                               # explicit differences
            own_sq += (x[s:s + chunk] - mu[a[s:s + chunk]]).pow_(2).sum().double()
    return (centers, torch.arange(num_classes, device=labels.device).repeat_interleave(K), assignment,
            float(own_sq) / max(1, len(labels) - 1))                     # Eq. (3) sigma^2
# --- end shared: kmeans ---


# --- shared: sampler ---
# The neighbourhood batches of the Magnet loss (Rippel et al. 2016; App. A "Magnet Loss").
class NeighbourhoodSampler:
    """Neighbourhood sampling for the stochastic Magnet loss (Rippel et al. 2016, Sec. 3.2-3.3;
    ClusTR App. A "Magnet Loss"), over the training split's clusters:

      1. a seed cluster I_1, drawn with probability proportional to the mean recent loss of its
         examples (each example keeps the loss it had when last drawn; a cluster none of whose
         examples has been drawn yet counts at the mean of the others; uniform before any loss,
         and when every loss is 0);
      2. the m - 1 clusters of *other classes* whose centres are nearest to I_1's ("impostors");
      3. d examples from each, uniformly without replacement (the whole cluster, with a one-time
         note, when it holds fewer than d).
    App. A: m = 12, d = 20 (240 per batch); an epoch is ceil(N / (m d)) batches.  The index work
    runs on the CPU with its own CPU `generator`, so batches do not depend on the device; its
    state (losses, generator, clusters) goes into the checkpoint for --resume."""

    def __init__(self, num_examples, m=12, d=20, generator=None):
        self.m, self.d, self.noted, self.generator = m, d, False, generator or torch.Generator()
        self.losses = torch.full((num_examples,), float("nan"))          # [N], NaN = never drawn

    def set_clusters(self, assignment, centers, center_classes):
        """After each k-means update: assignment [N] cluster ids, centers [M, d], classes [M]."""
        self.assignment, self.centers = assignment.detach().cpu(), centers.detach().float().cpu()
        self.center_classes = center_classes.detach().cpu()
        self.sizes = torch.bincount(self.assignment, minlength=len(self.center_classes))   # [M]
        # centre distances from explicit differences, float64 (ties and order are exact) [M, M];
        # same-class and empty clusters at inf
        c = self.centers.double()
        dist = (c[:, None] - c[None]).pow(2).sum(-1).masked_fill(
            (self.center_classes[:, None] == self.center_classes[None]) | (self.sizes[None] == 0), float("inf"))
        self.impostors = dist.argsort(dim=1, stable=True)[:, :self.m - 1]     # [M, <= m-1] nearest first
        self.n_impostors = torch.isfinite(dist).sum(1).clamp(max=self.m - 1)   # [M]

    def seed_probabilities(self):
        """p(I_1 = j) proportional to the mean recent loss of cluster j's examples -> [M]."""
        known = ~torch.isnan(self.losses)
        ids, M = self.assignment[known], len(self.sizes)
        count = torch.bincount(ids, minlength=M).double()
        mean = torch.zeros(M, dtype=torch.float64).index_add_(0, ids, self.losses[known].double()) / count.clamp_min(1)
        # a cluster never drawn counts at the others' average; an empty one at 0
        w = torch.where(count > 0, mean, mean[count > 0].mean()).clamp_min(0) * (self.sizes > 0)
        w = torch.where(torch.isfinite(w).all() & (w.sum() > 0), w, (self.sizes > 0).double())   # else uniform
        return w / w.sum()

    def sample(self):
        """One neighbourhood batch -> (row indices [B], cluster ids [B]) on the CPU, B <= m d;
        the seed cluster's rows come first, then the impostors', nearest first."""
        seed = int(torch.multinomial(self.seed_probabilities(), 1, generator=self.generator))
        rows = []
        for j in [seed] + self.impostors[seed, :int(self.n_impostors[seed])].tolist():
            members = (self.assignment == j).nonzero().flatten()          # cluster j's rows, in order
            if len(members) > self.d:                                     # d without replacement
                members = members[torch.randperm(len(members), generator=self.generator)[:self.d]]
            elif not self.noted:
                self.noted = True
                print(f"note: cluster {j} holds {len(members)} <= d={self.d} examples: all enter (shown once)")
            rows.append(members)
        rows = torch.cat(rows)
        return rows, self.assignment[rows]

    def record(self, rows, losses):
        """Remember each drawn example's loss (Rippel et al.: the loss index of the sampler)."""
        self.losses[rows.cpu()] = losses.detach().float().cpu()

    def batches_per_epoch(self):
        """App. A: an epoch passes as many examples as the split holds: ceil(N / (m d))."""
        return math.ceil(len(self.losses) / (self.m * self.d))

    def state_dict(self):
        return {"losses": self.losses.clone(), "generator": self.generator.get_state(), "noted": self.noted,
                **{k: getattr(self, k).clone() for k in ("assignment", "centers", "center_classes")}}

    def load_state_dict(self, state):
        self.losses, self.noted = state["losses"].clone(), bool(state["noted"])
        self.generator.set_state(state["generator"])
        self.set_clusters(state["assignment"], state["centers"], state["center_classes"])
# --- end shared: sampler ---


# --- shared: cluster-update ---
# After every epoch (App. A, Sec. 4.2): the clusters of the new features, and Eq. (4)'s accuracies.
def cluster_and_evaluate(model, train, test, info, sampler, args, generator, epoch):
    """After `epoch`: K k-means++ clusters per class on the eval-mode features of the whole
    un-augmented training split, sigma^2 of Eq. (3) over the same features (fit_clusters), the
    sampler's new clusters, and the Eq. (4) accuracies on both splits over the --D nearest centres
    (all rows at once: an [N, K x classes] temporary, 40 MB for CIFAR100).
    -> (the checkpoint's `clusters` entry, the epoch's metrics)."""
    t0 = time.time()
    if (args.D or 0) > args.K * info["num_classes"]:
        raise BadInput(f"--D {args.D} exceeds the --K x classes = {args.K * info['num_classes']} centres")
    features, test_features = (features_of(model, x, args.batch_size, args.amp) for x in (train[0], test[0]))
    if not torch.isfinite(features).all():
        raise BadInput(f"the features diverged (NaN or inf): {args.out} keeps its last good epoch; try a smaller --lr")
    centers, classes, assignment, sigma2 = fit_clusters(features, train[1], info["num_classes"], args.K, generator)
    sampler.set_clusters(assignment, centers, classes)
    train_acc, test_acc = (int((cluster_log_probs(f, centers, classes, sigma2, args.D).argmax(1) == y).sum())
                           / len(y) for f, y in ((features, train[1]), (test_features, test[1])))
    return ({"centers": centers.float().cpu(), "center_classes": classes.cpu(), "variance": sigma2, "K": args.K,
             "alpha": args.alpha, "D": args.D}, {"epoch": epoch, "train_accuracy": train_acc, "test_accuracy": test_acc,
                                                 "variance": sigma2, "cluster_seconds": time.time() - t0})
# --- end shared: cluster-update ---


# ======================================================================================
# 3. The run: data, --init's weights without the head, the clusters of the start (epoch 0) or
#    --resume, the epochs of App. A, each saved and logged, the summary
#    (checkpoint and report: README "Where results and checkpoints go")
# ======================================================================================

def main(argv=None):
    """ClusTR's fine-tuning (Sec. 3.3) as a run (README "Bad input and safety" for what it refuses)."""
    args = parse_args(argv)
    device = setup_runtime(args, training=True)
    with claimed(args, outputs=[("--out", args.out)], inputs=[args.init]):
        train, test, info = device_data(args, device)
        info, init = read_init(args, info, stages=("nominal",))
        model, opt, generator = build_training(args, info, 0, device, init and {
            k: v for k, v in init.items() if not k.startswith("head.")})   # Sec. 3.3: without the last linear layer
        # the sampler draws with its own CPU generator: a stream apart from the device one
        sampler = NeighbourhoodSampler(len(train[1]), args.m, args.d, torch.Generator().manual_seed(args.seed + 7919))
        state, log, saved, t_run = {"optimizer": opt, "generator": generator, "sampler": sampler}, [], None, time.time()
        if args.resume is not None:
            ckpt = read_checkpoint(args.resume or args.out, stages=("magnet",))
            info, saved = resume(ckpt, args, NOT_SHAPING, info, model, opt, generator)
            sampler.load_state_dict(ckpt["resume"]["sampler"])
            log = ckpt["log"]
        check_forward(model.eval().features, train[0], args.init if args.resume is None else args.resume or args.out)
        print(f"magnet.py | data {args.data} ({len(train[1])} train, {len(test[1])} test, {info['num_classes']} "
              f"classes, {info['image_size']}) | ResNet18 w={args.width} | init {args.init or 'random'} | device "
              f"{device} amp {args.amp} | torch {torch.__version__}\nconfig: {json.dumps(vars(args))}\n{'epoch':>9} "
              f"{'loss':>8} {'train':>7} {'test':>7} {'sigma2':>9} {'img/s':>8} {'elapsed':>9} {'ETA':>9}", flush=True)
        try:    # epoch 0 (not when resuming): no training, the clusters of the starting features (App. B.1)
            for epoch in range(len(log) and log[-1]["epoch"] + 1, min(args.epochs, args.stop_after or math.inf) + 1):
                t0 = time.time()
                loss, n = train_one_epoch(model, opt, train, sampler, args, generator, device) if epoch else (None, 0)
                train_seconds = time.time() - t0
                clusters, metrics = cluster_and_evaluate(model, train, test, info, sampler, args, generator, epoch)
                log.append({**metrics, "train_loss": loss, "lr": args.lr, **(epoch and {"seconds": time.time() - t0,
                            "images_per_second": n / train_seconds, "batches": sampler.batches_per_epoch()} or {})})
                # epoch 0 is saved unless --overwrite replaces a file: that one stays as it was until epoch 1
                if epoch or args.epochs == 0 or not os.path.exists(args.out):
                    saved = save_epoch("magnet", args, info, model, log, state, clusters=clusters)
                print(f"{epoch:>4}/{args.epochs:<4} {'-' if loss is None else format(loss, '.4f'):>8} "
                      f"{metrics['train_accuracy']:7.2%} {metrics['test_accuracy']:7.2%} {metrics['variance']:9.3g} "
                      f"{log[-1].get('images_per_second', 0):8.0f} {fmt_time(time.time() - t_run):>9} "
                      f"{fmt_time((time.time() - t0) * (args.epochs - epoch)):>9}", flush=True)
        except KeyboardInterrupt:
            raise stopped(args.out, saved) from None
        return report(args, log, t_run)


def report(args, log, t_run):
    """The summary beside the paper's accuracies, and the attack to run next: attack.py takes --data,
    --width and the data folder from the checkpoint; --limit is passed on."""
    metrics, done = log[-1], log[-1]["epoch"]
    status = "finished" if done >= args.epochs else f"stopped after epoch {done} (--resume continues)"
    print(f"\nsummary: {status}\n  test accuracy   {metrics['test_accuracy']:.2%} by Eq. (4) with K={args.K}, D="
          f"{args.D or 'all'}  (paper, w=64: ClusTR 87.34 CIFAR10, 94.28 SVHN; Magnet loss from random init 83.14 "
          f"CIFAR10; k-means on nominal features, App. B.1: 21.6 CIFAR10)\n  sigma^2         {metrics['variance']:.4g} "
          f"(Eq. (3), whole training split)\n  checkpoint      {args.out}   log {args.out}.log.jsonl\n  next          "
          f"  python attack.py --ckpt {args.out}{f' --limit {args.limit}' if args.limit else ''}", flush=True)
    return {"stage": "magnet", "out": args.out, "data": args.data, "init": args.init, "status": status,
            "epochs_done": done, "epochs": args.epochs, **metrics, "seconds_this_run": time.time() - t_run}


# ======================================================================================
# 4. Copied plumbing (--init, model, command line, files, data, checkpoints, training runs): each
#    block identical in every stage that carries it; checked by test_all.py
# ======================================================================================

# --- shared: init-check ---
# The warm start of Sec. 3.3: a run starts from --init's weights (or continues the checkpoint that
# --resume names), on the data and at the width that checkpoint was trained on.
def defaults_from_init(args):
    """--data, --width and --data-dir left unset take those of the checkpoint the run starts from
    (--init, or the one --resume continues; its data folder where it still exists), else cifar10,
    64 and ./data: `python magnet.py --init ckpt.pt` runs as nominal.py prints it.  A --data or
    --width given that differs from the checkpoint's is refused here, before any data is read."""
    source = (args.resume or args.out) if args.resume is not None else args.init
    ckpt = read_checkpoint(source) if source else {"data": {"name": "cifar10"}, "arch": {"width": 64}, "args": {}}
    for key, have in (("data", ckpt["data"]["name"]), ("width", ckpt["arch"]["width"])):
        if source and getattr(args, key) not in (None, have):
            raise BadInput(f"{source} was trained with --{key} {have}, not --{key} {getattr(args, key)}")
        setattr(args, key, getattr(args, key) or have)
    # the folder the checkpoint's run read, where it still exists
    args.data_dir = args.data_dir or (ckpt["args"]["data_dir"] if os.path.isdir(ckpt["args"].get("data_dir") or "") else
                                      "./data")


def read_init(args, info, stages):
    """--init, a checkpoint of `stages` (not read when resuming: the checkpoint holds the weights),
    trained on the data's classes, image size and channels -> (info with --init's normalisation,
    its weights or None).  Eq. (3) and the clusters' classes need at least 2 classes."""
    if info["num_classes"] < 2:
        raise BadInput(f"Eq. (3) needs clusters of 2 classes or more; --data {args.data} has {info['num_classes']}")
    if args.init is None or args.resume is not None:
        return info, None
    init = read_checkpoint(args.init, stages)
    have, want = ([d["classes"], d["image_size"], len(d["mean"])] for d in (init["data"], info))
    if have != want:
        raise BadInput(f"--init {args.init} saw other classes, image size or channels: {have}, not {want}")
    return dict(info, mean=init["data"]["mean"], std=init["data"]["std"]), init["model"]
# --- end shared: init-check ---


# --- shared: model ---
class BasicBlock(nn.Module):
    """He et al. 2016: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)), 3x3 convolutions."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:  # 1x1 projection where the shape changes
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet18: 3x3 stem (no max-pool), BasicBlocks [2, 2, 2, 2] with widths
    w, 2w, 4w, 8w, global average pooling.  features(x) is the 8w-dimensional penultimate vector
    (512 for w = 64, App. A); `head` = Linear(8w, classes) exists only when num_classes > 0
    (nominal training); ClusTR removes it and classifies by clusters (Sec. 3.3).
    Input: images in [0, 1]; the channel normalisation of App. A is the first layer (buffers)."""

    def __init__(self, num_classes=10, width=64, in_channels=3, mean=None, std=None):
        super().__init__()
        mean = torch.zeros(in_channels) if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        std = torch.ones(in_channels) if std is None else torch.as_tensor(std, dtype=torch.float32)
        self.register_buffer("mean", mean.reshape(1, in_channels, 1, 1).clone())
        self.register_buffer("std", std.reshape(1, in_channels, 1, 1).clone())
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        widths, strides, layers, c_in = [width, 2 * width, 4 * width, 8 * width], [1, 2, 2, 2], [], width
        for c_out, stride in zip(widths, strides):
            layers.append(nn.Sequential(BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.feat_dim = 8 * width
        self.head = nn.Linear(self.feat_dim, num_classes) if num_classes else None

    def features(self, x):                                          # x: [B, C, H, W] in [0, 1]
        x = (x - self.mean) / self.std                              # App. A normalisation
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)              # [B, 8w]

    def forward(self, x):
        f = self.features(x)
        return f if self.head is None else self.head(f)             # [B, classes] logits
# --- end shared: model ---


# --- shared: cli ---
# Bad input (README "Bad input and safety"): one mechanism.  Every expected error -- a flag out of
# range (argparse, through `number`), data or a checkpoint that cannot be used (BadInput), a file
# that cannot be read or written (OSError), no memory -- ends as one line on stderr and exit code 2;
# Ctrl-C and SIGTERM as one line and exit code 130 (the shell's 128 + SIGINT).
class BadInput(Exception):
    """Data, a checkpoint or a combination of flags this run cannot use; str(e) names the file or flag."""


def guarded(main):
    """main(argv) with the contract above: `guarded(main)()` is each stage's entry point."""
    def run(argv=None):
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM ends a run as Ctrl-C does
        try:
            return main(argv)
        except (BadInput, OSError, MemoryError) as e:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        except KeyboardInterrupt as e:
            print(f"\ninterrupted{': ' if e.args else ''}{' '.join(map(str, e.args))}", file=sys.stderr, flush=True)
            raise SystemExit(130) from None
    return run


def number(kind, low=-math.inf, high=math.inf, open_low=False):
    """argparse type: a finite `kind` in [low, high] ((low, high] with open_low); floats may be
    written as fractions, '8/255' (README "Flags")."""
    def parse(text):
        try:
            value = kind(text) if kind is int else float(fractions.Fraction(text))   # 'nan', 'inf': ValueError
        except ZeroDivisionError:
            raise ValueError(text) from None
        if not (low < value if open_low else low <= value) or not value <= high:
            raise argparse.ArgumentTypeError(f"{text} is not in {'(' if open_low else '['}{low}, {high}]")
        return value
    parse.__name__ = kind.__name__                                  # argparse: "invalid int value: 'x'"
    return parse


def fmt_time(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
# --- end shared: cli ---


# --- shared: common-args ---
def add_common_args(p, data, width, data_dir):
    """Flags every stage shares, in the same order everywhere (README "Flags"); None: from the
    checkpoint the run starts from."""
    g = p.add_argument_group("common")
    g.add_argument("--data", choices=["cifar10", "cifar100", "svhn", "fashion-mnist", "mnist", "folder"],
                   default=data, help="dataset; folder: an ImageFolder, DIR/train/<class>/*, DIR/test/<class>/*")
    g.add_argument("--data-dir", "--data-path", dest="data_dir", default=data_dir,
                   help="torchvision root (downloaded there when missing), or the folder root")
    g.add_argument("--width", type=number(int, 1), default=width,
                   help="ResNet18 base width w; features are 8w-dimensional. 64 = the paper's (App. A)")
    g.add_argument("--seed", type=number(int, 0, 2 ** 32 - 1), default=0, help="seeds python, numpy, torch")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto = cuda when available")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, help="bf16 autocast on CUDA; None: training")
    g.add_argument("--deterministic", action="store_true", help="deterministic CUDA kernels (CPU runs always are)")
    g.add_argument("--limit", type=number(int, 1), help="use only the first N train and N test images")
    return g


def setup_runtime(args, training):
    """Seed python, numpy and torch; the device; --amp (bf16 on CUDA for training) and determinism;
    paths stored absolute in the checkpoint."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    vars(args).update({k: os.path.abspath(v) for k, v in vars(args).items() if k in ("data_dir", "init") and v})
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda: torch sees no CUDA device; use --device cpu or auto")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    args.amp = device.type == "cuda" and (training if args.amp is None else args.amp)   # bf16 on CUDA only
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return device
# --- end shared: common-args ---


# --- shared: files ---
# The output rule (README "Bad input and safety"), checked before any work: an existing output is
# replaced only with --overwrite (a training --out also with --resume, which continues it); an output
# that is a file the run reads -- a checkpoint, a data file -- never.  <out>.lock is held with
# fcntl.flock for the life of the process (the kernel frees it however the process ends), so a
# second run on the same --out stops.  Every file is written to <path>.tmp and moved over the old
# one with os.replace: a killed run leaves the previous file whole.
@contextlib.contextmanager
def claimed(args, outputs, inputs):
    """Around a run: its outputs [(flag, path or None)] refused by the rule above or their folders
    made, then the first output's <path>.lock held.  `inputs`: the checkpoints it reads (--resume's is
    added here)."""
    resumed = getattr(args, "resume", None) is not None and os.path.realpath(args.resume or args.out)
    data = [os.path.join(d, f) for d, _, files in os.walk(getattr(args, "data_dir", None) or "") for f in files]
    reads = {os.path.realpath(p) for p in inputs + data + [resumed] if p}
    written = [(flag, path, os.path.realpath(path)) for flag, path in outputs if path is not None]
    for i, (flag, path, real) in enumerate(written):
        if real in reads - {resumed} | {w[2] for w in written[:i]} or os.path.isdir(path) or not os.path.basename(path):
            raise BadInput(f"{flag} {path!r}: not a file name, or one this run reads or writes twice; choose another")
        if os.path.exists(path) and not args.overwrite and real != resumed:
            raise BadInput(f"{flag} {path} exists; --overwrite replaces it (after this run's first save)"
                           + (", --resume continues it" if hasattr(args, "resume") else ""))
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(written[0][1] + ".lock", "a") as lock:                # the first output's; closing frees it
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BadInput(f"another run is writing {written[0][1]} ({written[0][1]}.lock is held)") from None
        yield


def write_file(path, write):
    """write(tmp) to <path>.tmp, then os.replace onto path: the old file stays whole until then."""
    write(path + ".tmp")
    os.replace(path + ".tmp", path)
# --- end shared: files ---


# --- shared: dataset ---
# Data (README "Data"): each split is one uint8 tensor [N, C, H, W] held on the device; batches
# are indexed from it and augmented there (no DataLoader in the hot path).
def read_idx(path):
    """One IDX file (LeCun's MNIST format, gzipped or not) -> uint8 tensor: bytes 0, 0, 0x08 (uint8),
    n; then n big-endian int32 sizes; then the data."""
    raw = (gzip.open if path.endswith(".gz") else open)(path, "rb").read()
    dims = np.frombuffer(raw, ">i4", raw[3], 4)
    return torch.from_numpy(np.frombuffer(raw, np.uint8, int(np.prod(dims)), 4 + 4 * raw[3]).reshape(dims).copy())


def load_split(name, root, train, limit=None):
    """-> (images uint8 [N, C, H, W], labels int64 [N], class names) of one split, the first `limit`."""
    import torchvision
    split = "train" if train else "test"
    if name == "folder":    # ImageFolder's order, dealt round-robin over the classes: --limit keeps every class
        ds = torchvision.datasets.ImageFolder(os.path.join(root, split))
        first = {y: ds.targets.index(y) for y in set(ds.targets)}
        order = sorted(range(len(ds.targets)), key=lambda i: (i - first[ds.targets[i]], ds.targets[i]))[:limit]
        images = torch.stack([torchvision.transforms.functional.pil_to_tensor(ds.loader(ds.samples[i][0]))
                              for i in order])                       # [N, 3, H, W] (RGB)
        return images, torch.tensor([ds.targets[i] for i in order]), ds.classes
    cls = {"fashion-mnist": "FashionMNIST"}.get(name, name.upper())  # torchvision.datasets' class of --data
    stem = "train" if train else "t10k"                             # Debian's layout: the IDX files in root
    idx = [os.path.join(root, f"{stem}-{kind}-ubyte.gz") for kind in ("images-idx3", "labels-idx1")]
    if name in ("fashion-mnist", "mnist") and all(map(os.path.isfile, idx)):
        images, labels = map(read_idx, idx)
        return images[:limit, None], labels[:limit].long(), getattr(torchvision.datasets, cls).classes
    ds = getattr(torchvision.datasets, cls)(root, download=True, **(
        {"split": split} if name == "svhn" else {"train": train}))
    images = torch.as_tensor(ds.data)                               # [N, H, W, 3]; SVHN [N, 3, H, W]; IDX [N, H, W]
    images = images[:, None] if images.ndim == 3 else images if name == "svhn" else images.permute(0, 3, 1, 2)
    labels = torch.as_tensor(ds.labels if name == "svhn" else ds.targets)
    return images[:limit].contiguous(), labels[:limit].long(), getattr(ds, "classes", [str(c) for c in range(10)])


def to_float(x_uint8):
    """uint8 [0, 255] -> float [0, 1]: the input space of every model and attack here."""
    return x_uint8.float().div_(255)
# --- end shared: dataset ---


# --- shared: train-data ---
def load_data(name, root, limit=None):
    """Both splits plus the `data` entry of the checkpoint (README "Where results and checkpoints go")."""
    try:
        (train_x, train_y, classes), (test_x, test_y, test_classes) = (
            load_split(name, root, train, limit) for train in (True, False))
    except Exception as e:      # missing, not downloadable, unreadable, truncated, images of two sizes
        raise BadInput(f"cannot read --data {name} from {os.path.abspath(root)}: {type(e).__name__}: {e} "
                       f"(README \"Data\" says where the files go)") from None
    if test_classes != classes or train_x.shape[1:] != test_x.shape[1:] or len(train_x) != len(train_y) \
            or len(test_x) != len(test_y) or max(train_y.max(), test_y.max()) >= len(classes):
        raise BadInput(f"--data {name} in {root}: train and test differ in classes or image size, images and "
                       f"labels in number, or a label lies outside the {len(classes)} classes")
    # App. A "Pre-processing": channel-wise mean/std of the training split, applied inside the
    # model (its first layer) so that inputs and epsilons stay in [0, 1] pixel units.
    pixels = train_x.double().div_(255).transpose(0, 1).reshape(train_x.shape[1], -1)
    info = {"name": name, "num_classes": len(classes), "classes": classes, "mean": pixels.mean(1).tolist(),
            "std": pixels.std(1).tolist(), "image_size": list(train_x.shape[2:])}
    return (train_x, train_y), (test_x, test_y), info
# --- end shared: train-data ---


# --- shared: checkpoint ---
# One format, "clustr/1" (README "Where results and checkpoints go"): a dict of tensors, numbers and
# strings that torch.load reads with weights_only=True (never unpickling code).
FORMAT = "clustr/1"
STAGES = ("nominal", "magnet", "qtrades-magnet", "qtrades-ce")
REQUIRED = {"format", "stage", "arch", "data", "model", "args", "epoch", "metrics"}


def read_checkpoint(path, stages=STAGES):
    """torch.load(weights_only=True), then the format, the stage, the entries every reader takes and
    finite numbers in every tensor; any problem raises BadInput naming the file."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:          # missing, empty, truncated, or pickled code that weights_only refuses
        raise BadInput(f"cannot load the checkpoint {path}: {type(e).__name__}: {str(e)[:300]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or not REQUIRED <= set(ckpt) \
            or ckpt["stage"] not in stages or not isinstance(ckpt["args"], dict):
        raise BadInput(f"{path} is not a {FORMAT} checkpoint of the stage {' or '.join(stages)}")
    if not finite({"model": ckpt["model"], "clusters": ckpt.get("clusters")}):
        raise BadInput(f"{path} holds NaN or inf (a diverged run or a damaged file); use an earlier checkpoint")
    return ckpt


def finite(obj):
    """No NaN or inf in any tensor or float of a (nested) dict."""
    if isinstance(obj, dict):
        return all(map(finite, obj.values()))
    return not isinstance(obj, (float, torch.Tensor)) or bool(torch.isfinite(torch.as_tensor(obj)).all())


@torch.no_grad()
def check_forward(f, images, path):
    """A loaded model must also compute: finite numbers can still give a non-finite forward (a
    batch-norm variance of -1, a std of 0, centres times 1e30).  f: images in [0, 1] -> outputs."""
    if path and not torch.isfinite(f(to_float(images[:64]))).all():
        raise BadInput(f"{path} computes NaN or inf on the first images (a damaged or hand-made file)")
# --- end shared: checkpoint ---


# --- shared: train-run ---
def add_run_args(g):
    """The flags of a training run's files (README "Bad input and safety") and --compile."""
    g.add_argument("--resume", nargs="?", const="", metavar="PATH", help="continue the run in PATH (none: --out)")
    g.add_argument("--overwrite", action="store_true", help="replace --out (kept until the first epoch is saved)")
    g.add_argument("--stop-after", type=number(int, 1), metavar="N", help="stop after epoch N, as if interrupted")
    g.add_argument("--slim", action="store_true", help="no resume state in the final checkpoint (smaller)")
    g.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   choices=["inductor", "aot_eager", "eager", "cudagraphs"],
                   help="f(x) through torch.compile with BACKEND (inductor when none is given); None: eager")


def device_data(args, device):
    """Both splits of --data (README "Data"), each moved whole onto the device; --crop within the image."""
    train, test, info = load_data(args.data, args.data_dir, args.limit)
    if args.crop > min(info["image_size"]):
        raise BadInput(f"--crop {args.crop} exceeds the image side {min(info['image_size'])}; App. A pads 4")
    return tuple(t.to(device) for t in train), tuple(t.to(device) for t in test), info


def build_training(args, info, num_classes, device, init_state=None):
    """The ResNet18 of App. A "Architecture" (num_classes 0: headless, Sec. 3.3) with --init's weights,
    --compile's f(x), Adam (App. A "Optimization") and the seeded device generator that draws every
    permutation, crop, flip, k-means++ seed and quick adversary of the run."""
    model = ResNet18(num_classes, args.width, len(info["mean"]), info["mean"], info["std"])
    try:
        model.load_state_dict(init_state or model.state_dict(), strict=True)
    except RuntimeError as e:
        raise BadInput(f"the weights in {args.init} do not fit: {' '.join(str(e).split())[:300]}") from None
    model = model.to(device)
    if args.compile:    # f(x) compiled on this instance: the module and its state_dict keys stay eager's
        model.features = torch.compile(model.features, backend=args.compile)
    generator = torch.Generator(device=device)
    generator.manual_seed(args.seed)
    return model, torch.optim.Adam(model.parameters(), lr=args.lr), generator


def resume(ckpt, args, not_shaping, info, model, opt, generator):
    """--resume: refused where an argument that shapes the run differs from the stored run's, or
    --epochs is below the epochs it holds (it may grow); then weights, optimizer and RNG states.
    -> (`info` with the checkpoint's normalisation (the model's buffers), the epoch --out holds or None)."""
    old = ckpt["args"]
    diff = sorted(k for k in set(old) | set(vars(args)) if k not in not_shaping | {"epochs"}
                  and old.get(k) != getattr(args, k, None))
    if diff or args.epochs < ckpt["epoch"] or "resume" not in ckpt or args.epochs == ckpt["epoch"] \
            and os.path.realpath(args.resume or args.out) != os.path.realpath(args.out):   # nothing would be written
        raise BadInput(f"cannot resume {args.resume or args.out} (epoch {ckpt['epoch']}, --slim {'resume' not in ckpt})"
                       f" with --epochs {args.epochs}; it was run with {[(k, old.get(k)) for k in diff]}")
    model.load_state_dict(ckpt["model"], strict=True)
    opt.load_state_dict(ckpt["resume"]["optimizer"])
    torch.set_rng_state(ckpt["resume"]["rng"]["torch"])
    generator.set_state(ckpt["resume"]["rng"]["generator"])
    print(f"resumed {args.resume or args.out} at epoch {ckpt['epoch']}/{args.epochs}")
    saved = ckpt["epoch"] if os.path.realpath(args.resume or args.out) == os.path.realpath(args.out) else None
    return dict(info, mean=ckpt["data"]["mean"], std=ckpt["data"]["std"]), saved   # saved: the epoch --out holds


def save_epoch(stage, args, info, model, log, state, **entries):
    """The checkpoint of the epoch log[-1] records (README "Where results and checkpoints go"): the
    weights, the run's arguments, the records of every epoch so far (<out>.log.jsonl is rewritten from
    them) and `entries` (None ones left out); the resume state of `state` ({"optimizer", "generator",
    "sampler"}) unless --slim and it is the final epoch.  A model with NaN or inf is not written: the
    file keeps its last good epoch.  -> the epoch saved."""
    ckpt = {"format": FORMAT, "stage": stage, "arch": {"name": "resnet18", "width": args.width, "feat_dim":
            8 * args.width, "in_channels": model.mean.shape[1]}, "data": info,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "args": dict(vars(args)),
            "epoch": log[-1]["epoch"], "metrics": log[-1], "log": log,
            **{k: v for k, v in entries.items() if v is not None}}
    if not (args.slim and ckpt["epoch"] == args.epochs):
        ckpt["resume"] = {"optimizer": state["optimizer"].state_dict(),
                          "rng": {"torch": torch.get_rng_state(), "generator": state["generator"].get_state(),
                                  "generator_device": str(state["generator"].device)},
                          **{k: v.state_dict() for k, v in state.items() if k not in ("optimizer", "generator")}}
    if not finite({"model": ckpt["model"], "clusters": ckpt.get("clusters"), "loss": log[-1]["train_loss"] or 0.}):
        raise BadInput(f"training diverged in epoch {ckpt['epoch']} (NaN or inf): {args.out} keeps its last "
                       f"good epoch; try a smaller --lr")
    write_file(args.out, lambda tmp: torch.save(ckpt, tmp))
    write_file(args.out + ".log.jsonl", lambda tmp: open(tmp, "w").write("".join(json.dumps(r) + "\n" for r in log)))
    return ckpt["epoch"]


def stopped(out, saved):
    """The KeyboardInterrupt (Ctrl-C, SIGTERM) a training loop raises again: what --out holds."""
    return KeyboardInterrupt(f"{out} holds epoch {saved}; continue with --resume" if saved is not None else
                             f"no epoch of this run was saved in {out}")


def augment(x, crop, flip, generator):
    """App. A: random HxW crops from a `crop`-pixel zero padding, plus optional horizontal flips,
    for a whole uint8 batch [B, C, H, W] at once, on its device; randomness from `generator`."""
    B, _, H, W = x.shape
    if crop > 0:
        off = torch.randint(0, 2 * crop + 1, (2, B), device=x.device, generator=generator)
        windows = F.pad(x, (crop,) * 4).unfold(2, H, 1).unfold(3, W, 1)    # [B, C, 2p+1, 2p+1, H, W], zeros
        x = windows[torch.arange(B, device=x.device), :, off[0], off[1]]   # [B, C, H, W]
    if flip:
        mirror = torch.rand(B, device=x.device, generator=generator) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    return x
# --- end shared: train-run ---


if __name__ == "__main__":
    guarded(main)()
