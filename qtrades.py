"""qtrades.py -- ClusTR+QTRADES and QTRADES alone (Alfarra, Perez et al., BMVC 2021).

Paper: "Rethinking Clustering for Robustness", Sec. 4.2 (Eq. (6) and the quick adversary),
Table 1 (rows "QTRADES" and "ClusTR + QTRADES"), Table 2 (CIFAR100, D = 20), Appendix A
("QTRADES", "Magnet Loss", "Optimization").

ClusTR+QTRADES (--loss magnet, the paper's best rows) fine-tunes the features f(x) with the Magnet
loss of magnet.py (ClusTR Eq. (3), neighbourhood batches, k-means++ after every epoch) plus a
TRADES-like consistency term, Eq. (6):

    L = L_Magnet + lam * CE(p(f(x_adv)), p(f(x))),   CE(q, p) = -sum_c p_c log q_c,

p of Eq. (4) with the current centres and sigma^2.  x_adv is a *quick* adversary (Sec. 4.2):
x' = clip_[0,1](x + U[-eps, eps]), then ONE signed-gradient step of size eta on the same
cross-entropy, projected to the eps-ball around x and to [0, 1].  QTRADES alone (--loss ce, the
"QTRADES" row of Table 1) keeps the linear head: cross-entropy with the labels plus lam times the
same consistency term on the head's softmax; it takes no clusters.  --consistency kl replaces the
cross-entropy by TRADES's KL(p || q) (an ablation; CE(q, p) = H(p) + KL(p || q), so the two differ
by the entropy of the clean prediction, which also carries a gradient since p is not detached).

Usage (copy-paste):
    python qtrades.py --data cifar10 --init ckpt.pt                   # ClusTR+QTRADES -> qtrades.pt
    python qtrades.py --data cifar100 --init c100.pt --out c100_q.pt  # lam 2, alpha 8.5, D = 20
    python qtrades.py --data cifar10 --init magnet.pt                 # from a ClusTR checkpoint
    python qtrades.py --data cifar10 --init ckpt.pt --loss ce --out qtrades_ce.pt   # QTRADES alone
    python nominal.py --data cifar10 --width 16 --limit 512 --epochs 3 && \
    python qtrades.py --data cifar10 --width 16 --limit 512 --epochs 3 --init ckpt.pt  # quick CPU run
    python qtrades.py --data cifar10 --init ckpt.pt --stop-after 10   # ... interrupted after epoch 10
    python qtrades.py --data cifar10 --init ckpt.pt --resume          # ... continues from qtrades.pt
    python attack.py --ckpt qtrades.pt                                # then evaluate it

Reads: --init (a nominal or, for --loss magnet, a magnet checkpoint; weights_only) and the
dataset.  Writes: --out (format "clustr/1", stage "qtrades-magnet" with the `clusters` entry, or
"qtrades-ce" with head.* and no clusters; rewritten atomically after every epoch, epoch 0 = the
starting point) and <out>.log.jsonl.  Needs torch, torchvision, numpy; imports no other file of
this repository: copy it freely.  Blocks between "# --- shared: NAME ---" markers are identical
copies of the same blocks in the other stages (test_all.py checks this).

Lineage: TRADES (Zhang et al., ICML 2019) for the consistency term; Magnet loss and
neighbourhood sampling (Rippel, Paluri, Dollar, Bourdev, ICLR 2016); k-means++ (Arthur &
Vassilvitskii 2007); PGD (Madry et al. 2018) for the signed-gradient step; ResNet18 (He et al.
2016); Adam (Kingma & Ba 2014).
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
#   lam, alpha: App. A "QTRADES" / "Magnet Loss": lam 8 CIFAR10, 9.7 SVHN, 2 CIFAR100; alpha 12.5
#     CIFAR10, 10 SVHN, 8.5 CIFAR100 (the ClusTR+QTRADES values).  folder: CIFAR10's values.
#   D: Sec. 4.2 uses the D = 20 nearest of the 200 CIFAR100 centres; all centres elsewhere.
#   lr 1e-4, epochs 30 CIFAR10/SVHN, 60 CIFAR100: as magnet.py (App. A "Optimization"; the paper
#     gives no separate schedule for QTRADES; SVHN: Sec. 4.2 says 30, App. A says 60).
#   crop/flip: as nominal.py (App. A crops for CIFAR; flips from the authors' code; none for SVHN).
PAPER_DEFAULTS = {
    "cifar10": dict(epochs=30, lr=1e-4, alpha=12.5, lam=8.0, D="all", crop=4, flip=True),
    "cifar100": dict(epochs=60, lr=1e-4, alpha=8.5, lam=2.0, D=20, crop=4, flip=True),
    "svhn": dict(epochs=30, lr=1e-4, alpha=10.0, lam=9.7, D="all", crop=0, flip=False),
    "folder": dict(epochs=30, lr=1e-4, alpha=12.5, lam=8.0, D="all", crop=0, flip=False),
    # Not in the paper: CIFAR10's values, no crop or flip.
    "fashion-mnist": dict(epochs=30, lr=1e-4, alpha=12.5, lam=8.0, D="all", crop=0, flip=False),
    "mnist": dict(epochs=30, lr=1e-4, alpha=12.5, lam=8.0, D="all", crop=0, flip=False),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="qtrades.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="ClusTR+QTRADES (--loss magnet): the Magnet loss of Eq. (3) + lam x the consistency of Eq. (6) "
                    "against a one-step quick adversary (Sec. 4.2, App. A 'QTRADES'); QTRADES alone (--loss ce): "
                    "the same on the linear head (Table 1 rows 'QTRADES', 'ClusTR + QTRADES').",
        epilog="--data, --width, --data-dir left unset (None): those of --init (or of the run --resume continues), "
               f"else cifar10, 64, ./data. Per --data (App. A, Sec. 4.2), for the flags left unset: {PAPER_DEFAULTS}")
    add_common_args(p, data=None, width=None, data_dir=None)
    add_qtrades_args(p.add_argument_group("QTRADES (Sec. 4.2, Eq. (6); App. A 'QTRADES', 'Magnet Loss')"))
    args = p.parse_args(argv)
    defaults_from_init(args)
    for key, value in PAPER_DEFAULTS[args.data].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.D = None if args.D == "all" else args.D
    return args


def add_qtrades_args(g):
    """The flags of Sec. 4.2, Eq. (6) and App. A ("QTRADES", "Magnet Loss", "Optimization")."""
    g.add_argument("--loss", choices=["magnet", "ce"], default="magnet", help="magnet: ClusTR+QTRADES, Eq. (6) on "
                   "the clusters; ce: QTRADES alone, on the linear head (Table 1 row 'QTRADES')")
    g.add_argument("--init", metavar="PATH", help="nominal.py's checkpoint (--loss magnet drops its head, Sec. 3.3) "
                   "or, for --loss magnet, magnet.py's; None: random weights")
    g.add_argument("--out", default="qtrades.pt", help="checkpoint path; log goes to <out>.log.jsonl")
    g.add_argument("--lam", type=number(float, 0), help="lambda of Eq. (6); App. A: 8 CIFAR10, 9.7 SVHN, 2 CIFAR100")
    g.add_argument("--consistency", choices=["ce", "kl"], default="ce", help="ce: CE(p(f(x_adv)), p(f(x))) of "
                   "Eq. (6) and the authors' code; kl: TRADES's KL(p(f(x)) || p(f(x_adv))), an ablation")
    g.add_argument("--eps", type=number(float, 0, 1), default="8/255",
                   help="L-inf radius of the quick adversary, [0, 1] pixel units; Sec. 4.2: 8/255")
    g.add_argument("--step", type=number(float, 0, 1), default="10/255",
                   help="eta, the adversary's one signed-gradient step; the paper gives none, the authors' code 10/255")
    g.add_argument("--epochs", type=number(int, 0), help="epochs after the starting point (0: evaluate it alone); "
                   "App. A: 30, CIFAR100 60")
    g.add_argument("--lr", type=number(float, 0, 1, open_low=True), help="Adam learning rate; App. A: 1e-4")
    g.add_argument("-b", "--batch-size", type=number(int, 1), default=500,
                   help="images per forward pass of the feature passes and evaluations (training batches: m x d)")
    g.add_argument("--m", type=number(int, 2), default=12,
                   help="clusters per neighbourhood batch; App. A: 12 (--loss ce: shuffled batches of m x d images)")
    g.add_argument("--d", type=number(int, 2), default=20, help="examples per sampled cluster; App. A: 20")
    g.add_argument("--K", type=number(int, 1), default=2, help="k-means++ clusters per class; App. A: 2")
    g.add_argument("--alpha", type=number(float, 0),
                   help="the margin of Eq. (3); App. A (ClusTR+QTRADES): 12.5 CIFAR10, 10 SVHN, 8.5 CIFAR100")
    g.add_argument("--D", type=lambda text: text if text == "all" else number(int, 1)(text),
                   help="Eq. (4) over the D nearest centres or all, in training and the checkpoint; Sec. 4.2: 20 "
                   "for CIFAR100")
    g.add_argument("--crop", type=number(int, 0), help="random crops from a zero padding of this many pixels; "
                   "App. A: 4 for CIFAR10/100, none for SVHN")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, help="random horizontal flips; on for CIFAR "
                   "as in the authors' code (the paper does not mention flips)")
    add_run_args(g)


# Arguments that do not change the trained weights: a resume may differ in these.
NOT_SHAPING = {"out", "resume", "stop_after", "slim", "device", "amp", "deterministic", "data_dir", "overwrite",
               "compile"}


# ======================================================================================
# 2. The method: QTRADES, the consistency term of Eq. (6) and the quick adversary (Sec. 4.2,
#    App. A), then the ClusTR blocks it builds on (Eq. (4), Eq. (3), k-means++, sampler)
# ======================================================================================

def nearest_mask(features, centers, D):
    """[n, M] bool: the D centres nearest to each row (Sec. 4.2, App. B.3); all True when D is
    None or >= M.  The eq4 block's distances and mask on the same dtype, so the set is the one
    cluster_log_probs(features, ..., D) uses, ties included (a test checks it).  Eq. (6) evaluates
    p(f(x)) and p(f(x_adv)) on the *same* set, cluster_log_probs(..., keep=nearest_mask(f(x), ...))
    for both: with a set of its own, x_adv could drop a class that p(f(x)) holds, and
    -p_c log 0 = +inf would end the run (with D = None both sets are all centres, Eq. (4) itself)."""
    keep = nearest_centers_mask(sq_distances(features.detach(), centers.detach()), D)   # bf16: as float32
    return torch.ones(len(features), len(centers), dtype=torch.bool, device=features.device) if keep is None else keep


def consistency(log_p, log_q, kind="ce"):
    """The consistency term per row, p the clean and q the adversarial distribution, both given as
    log-probabilities [n, classes].  -> [n].
        kind "ce", Eq. (6):  CE(q, p)   = -sum_c p_c log q_c
        kind "kl", TRADES:   KL(p || q) =  sum_c p_c (log p_c - log q_c) = CE(q, p) - H(p)
    Where p_c = 0 (log p_c = -inf: a class absent from the D nearest centres) the term is 0:
    log p_c and log q_c are replaced by 0 *before* the product (masked_fill passes no gradient
    there), since 0 * (-inf) = NaN, and torch.where after the product would still send NaN
    gradients back."""
    zero = torch.isneginf(log_p)                                           # p_c = 0 exactly
    p = log_p.exp()                                                        # [n, classes]
    log_ratio = -log_q.masked_fill(zero, 0.0)                              # -log q_c
    if kind == "kl":
        log_ratio = log_ratio + log_p.masked_fill(zero, 0.0)               # log p_c - log q_c
    return (p * log_ratio).sum(1)


def quick_adversary(log_q_fn, x, log_p, eps, step, generator=None):
    """The quick adversary of Sec. 4.2 / App. A "QTRADES" (one step of Madry et al.'s PGD):

        x'    = clip_[0,1](x + U[-eps, eps])                               (uniform start)
        x_adv = Proj_S(x' + eta sign(grad_x' CE(p(f(x')), p(f(x)))))        S = B_inf(x, eps) n [0,1]^n

    log_q_fn(z) -> log p(f(z)) [n, classes] (called exactly once, with gradients); log_p
    [n, classes] the clean target, a constant here; eps, step (eta) in [0, 1] pixel units;
    the uniform draw comes from `generator` (the run's, so --resume repeats it).  The gradient is
    taken w.r.t. x' alone (torch.autograd.grad), so no parameter .grad is written.  The loss is
    the *sum* over rows: in eval mode rows do not interact, so each row gets its own gradient.
    -> (x_adv, x') both [n, C, H, W] in [0, 1]."""
    noise = torch.rand(x.shape, device=x.device, generator=generator).mul_(2 * eps).sub_(eps)
    x_start = (x + noise).clamp_(0, 1).requires_grad_(True)                # x'
    # p is a constant here, so CE(q, p) and KL(p || q) = CE(q, p) - H(p) have the same gradient
    # in x': the adversary is the same under --consistency ce and kl.
    loss = consistency(log_p.detach(), log_q_fn(x_start)).sum()
    grad, = torch.autograd.grad(loss, [x_start])
    with torch.no_grad():
        x_adv = x_start + step * grad.sign()                               # one signed step, eta
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp_(0, 1)   # Proj_S
    return x_adv, x_start.detach()


def craft(model, x, clusters, args, generator):
    """x_adv for a training batch x [B, C, H, W].  Mode: EVAL.  The adversary is crafted against
    the function that inference and attack.py evaluate (running batch-norm statistics), rows do
    not interact through batch statistics, and the crafting forwards leave every batch-norm buffer
    as it was; the training forwards that follow (clean, then adversarial, in train mode) update
    the running statistics once each.  The authors' code crafts in train mode, so each
    adversarial batch moved the statistics twice (once while crafting, once in training).
    clusters: (centers, center_classes, sigma^2, D) for --loss magnet (Eq. (4)), None for --loss ce
    (log-softmax of the head).  The clean target p(f(x)) is the eval-mode one, held constant."""
    model.eval()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.amp):
        with torch.no_grad():
            clean = model(x).float()                        # [B, 8w] f(x) (headless) or [B, classes] logits
        keep = None if clusters is None else nearest_mask(clean, clusters[0], clusters[3])   # the clean D nearest

        def log_probs(z):                   # [B, classes]: the head's softmax, or Eq. (4) on the clean D nearest
            return F.log_softmax(z.float(), 1) if clusters is None else cluster_log_probs(z, *clusters[:3], keep=keep)
        x_adv, _ = quick_adversary(lambda z: log_probs(model(z)), x, log_probs(clean), args.eps, args.step, generator)
    model.train()
    return x_adv


def qtrades_magnet_loss(f, f_adv, cluster_ids, class_ids, alpha, centers, center_classes,
                        sigma2, D, lam, kind="ce"):
    """ClusTR+QTRADES, Eq. (6):  L = L_Magnet(f) + lam * mean_n CE(p(f(x_adv_n)), p(f(x_n)))
    with L_Magnet the batch Magnet loss of Eq. (3) and p of Eq. (4) over the current centres and
    sigma^2 (those of the last k-means, constants here) on the D nearest centres of f(x).
    The clean p(f(x)) is NOT detached: Eq. (6) writes the term as a function of theta through
    both arguments, and the authors' training code passes gradients through the clean
    probabilities; only the adversary's crafting holds it constant.  TRADES (Zhang et al. 2019)
    also keeps p attached, but its term is KL(p || q) = CE(q, p) - H(p): with p attached, Eq. (6)'s
    cross-entropy adds the gradient of the clean entropy H(p), which pushes p towards confident
    (one-hot) predictions.  kind="kl" (--consistency kl) is TRADES's term, an ablation.
    -> (loss, per-example Magnet losses [B] for the sampler, consistency [B])."""
    magnet, per_example, _ = magnet_loss(f, cluster_ids, class_ids, alpha)   # Eq. (3)
    keep = nearest_mask(f, centers, D)                                     # [B, M]
    log_p = cluster_log_probs(f, centers, center_classes, sigma2, keep=keep)      # clean, [B, classes]
    log_q = cluster_log_probs(f_adv, centers, center_classes, sigma2, keep=keep)  # adversarial
    cons = consistency(log_p, log_q, kind)                                 # [B]
    return magnet + lam * cons.mean(), per_example, cons


def qtrades_ce_loss(logits, logits_adv, labels, lam, kind="ce"):
    """QTRADES alone (Table 1 row "QTRADES"; Sec. 4.2: TRADES with the Magnet loss replaced by
    the cross-entropy on the linear head):  L = CE(softmax(z(x)), y) + lam * mean_n
    CE(softmax(z(x_adv)), softmax(z(x))), the clean softmax not detached (as above).
    -> (loss, consistency [B])."""
    log_p, log_q = F.log_softmax(logits.float(), 1), F.log_softmax(logits_adv.float(), 1)
    cons = consistency(log_p, log_q, kind)
    return F.cross_entropy(logits.float(), labels) + lam * cons.mean(), cons


def train_one_epoch(model, opt, train, sampler, clusters, args, generator, device):
    """One epoch of Adam steps on Eq. (6), batches of m x d (App. A).  --loss magnet: ceil(N / (m d))
    neighbourhood batches of `sampler` over `clusters` (the checkpoint's entry of the last k-means update);
    --loss ce (sampler None): a fresh permutation of the training split.  Each batch: the quick adversary
    (eval mode), the clean and the adversarial forward (train mode), one step.  A NaN loss runs on to the
    epoch's end: the cluster update and save_epoch stop the run, --out at its last good epoch.
    -> (mean per-example loss, mean consistency, clean train accuracy (ce; magnet: None), images)."""
    images, labels = train
    model.train()
    if sampler is None:
        perm, B = torch.randperm(len(labels), device=device, generator=generator), args.m * args.d
        batches, eq4 = [(perm[start:start + B], None) for start in range(0, len(labels), B)], None
    else:           # drawn one at a time: each seed cluster follows the losses recorded before it
        batches = (sampler.sample() for _ in range(sampler.batches_per_epoch()))   # CPU: [B], [B]
        eq4 = (clusters["centers"].to(device), clusters["center_classes"].to(device), clusters["variance"], args.D)
    loss_sum, cons_sum, correct, seen = 0.0, 0.0, 0, 0
    for idx, cluster_ids in batches:
        x = to_float(augment(images[idx.to(device)], args.crop, args.flip, generator))   # [B, C, H, W]
        x_adv = craft(model, x, eq4, args, generator)                   # Sec. 4.2, eval mode
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            out, out_adv = model(x), model(x_adv)           # [B, 8w] f(x), r_n of Eq. (3); ce: [B, classes]
        if sampler is None:
            loss, cons = qtrades_ce_loss(out, out_adv, labels[idx], args.lam, args.consistency)
        else:
            cluster_ids = cluster_ids.to(device)
            loss, per_example, cons = qtrades_magnet_loss(out, out_adv, cluster_ids, eq4[1][cluster_ids], args.alpha,
                                                          *eq4, args.lam, args.consistency)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sampler is None:
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((out.argmax(1) == labels[idx]).sum())
        else:
            sampler.record(idx, per_example)        # Rippel et al.: the sampler ranks Magnet losses
            total = per_example.detach().float().cpu() + args.lam * cons.detach().float().cpu()   # Eq. (6) per row
            loss_sum += float(total.sum())
        cons_sum += float(cons.detach().sum())
        seen += len(idx)
    return loss_sum / seen, cons_sum / seen, correct / seen if sampler is None else None, seen


# The ClusTR method blocks QTRADES builds on, as in magnet.py: Eq. (4) inference, Eq. (3) Magnet
# loss, k-means++, neighbourhood sampler, the cluster update; then the linear head's accuracy.

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

# --- shared: head-eval ---
@torch.no_grad()
def evaluate(model, split, batch_size, amp, device):
    """Accuracy of the linear head in eval mode.  Batch-norm buffers are left untouched: README
    "Where this differs from the paper and the authors' code", "Consistent clusters"."""
    images, labels = split
    was_training = model.training
    model.eval()
    correct = torch.zeros((), device=device, dtype=torch.long)
    for start in range(0, len(labels), batch_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            correct += (model(to_float(images[start:start + batch_size])).argmax(1)
                        == labels[start:start + batch_size]).sum()
    model.train(was_training)
    return correct.item() / max(1, len(labels))
# --- end shared: head-eval ---


# ======================================================================================
# 3. The run: --init, data, the model, the starting point (epoch 0) or --resume, the epochs of
#    App. A, each saved and logged, the summary.  The two variants differ only where `magnet` is
#    tested: --loss magnet (ClusTR+QTRADES: clusters, Eq. (6) on Eq. (4)) and --loss ce (QTRADES
#    alone: the linear head).  Checkpoint and report: README "Where results and checkpoints go"
# ======================================================================================

def main(argv=None):
    """QTRADES (Sec. 4.2, Eq. (6)) as a run (README "Bad input and safety" for what it refuses)."""
    args = parse_args(argv)
    magnet, device = args.loss == "magnet", setup_runtime(args, training=True)
    with claimed(args, outputs=[("--out", args.out)], inputs=[args.init]):
        train, test, info = device_data(args, device)
        info, init = read_init(args, info, stages=("nominal", "magnet") if magnet else ("nominal",))
        # magnet: without the last linear layer (Sec. 3.3; a nominal head dropped); ce: with the head
        model, opt, generator = build_training(args, info, 0 if magnet else info["num_classes"], device, init and {
            k: v for k, v in init.items() if not magnet or not k.startswith("head.")})
        # the sampler draws with its own CPU generator: a stream apart from the device one
        sampler = NeighbourhoodSampler(len(train[1]), args.m, args.d, torch.Generator().manual_seed(
            args.seed + 7919)) if magnet else None
        state = {"optimizer": opt, "generator": generator, **({"sampler": sampler} if magnet else {})}
        log, clusters, saved, t_run = [], None, None, time.time()
        if args.resume is not None:
            ckpt = read_checkpoint(args.resume or args.out, stages=("qtrades-" + args.loss,))
            info, saved = resume(ckpt, args, NOT_SHAPING, info, model, opt, generator)
            clusters, log = ckpt.get("clusters"), ckpt["log"]
            if magnet:
                sampler.load_state_dict(ckpt["resume"]["sampler"])
        check_forward(model.eval(), train[0], args.init if args.resume is None else args.resume or args.out)
        print(f"qtrades.py --loss {args.loss} | data {args.data} ({len(train[1])} train, {len(test[1])} test, "
              f"{info['num_classes']} classes, {info['image_size']}) | ResNet18 w={args.width} | device {device} amp "
              f"{args.amp} | torch {torch.__version__}\nconfig: {json.dumps(vars(args))}\n{'epoch':>9} {'loss':>8} "
              f"{'consist':>8} {'train':>7} {'test':>7} {'sigma2':>9} {'img/s':>8} {'elapsed':>9} {'ETA':>9}",
              flush=True)
        try:    # epoch 0 (not when resuming): no training, the starting point (magnet: its clusters)
            for epoch in range(len(log) and log[-1]["epoch"] + 1, min(args.epochs, args.stop_after or math.inf) + 1):
                clusters, record = run_epoch(model, opt, train, test, info, sampler, clusters, args, generator, device,
                                             epoch)
                log.append(record)
                if epoch or args.epochs == 0 or not os.path.exists(args.out):  # --overwrite: old ones stay to epoch 1
                    saved = save_epoch("qtrades-" + args.loss, args, info, model, log, state, clusters=clusters)
                print_row(args, record, t_run)
        except KeyboardInterrupt:
            raise stopped(args.out, saved) from None
        return report(args, log, t_run)


def run_epoch(model, opt, train, test, info, sampler, clusters, args, generator, device, epoch):
    """Training epoch `epoch` (none for 0, the starting point) and its log record (README "Where results and
    checkpoints go"): --loss magnet, then the k-means++ update (App. A), sigma^2 (Eq. (3)) and Eq. (4)
    accuracies; --loss ce, the head's (the train one after training is the epoch's own).
    -> (the clusters entry or None, the record)."""
    t0 = time.time()
    loss, cons, train_acc, seen = train_one_epoch(model, opt, train, sampler, clusters, args, generator,
                                                  device) if epoch else (None,) * 4
    seconds = time.time() - t0
    if sampler is None:
        clusters, metrics = None, {"epoch": epoch, "train_accuracy": train_acc if epoch else evaluate(
            model, train, args.batch_size, args.amp, device), "test_accuracy": evaluate(
            model, test, args.batch_size, args.amp, device)}
    else:
        clusters, metrics = cluster_and_evaluate(model, train, test, info, sampler, args, generator, epoch)
    return clusters, {**metrics, "train_loss": loss, "consistency": cons, "lr": args.lr, **({} if not epoch else {
        "seconds": time.time() - t0, "images_per_second": seen / seconds,
        **({"batches": sampler.batches_per_epoch()} if sampler else {})})}


def print_row(args, r, t_run):
    """One row of the epoch table (its header ends the title main prints); ETA: this epoch's time per epoch."""
    loss, cons = ("-" if r[k] is None else f"{r[k]:.4f}" for k in ("train_loss", "consistency"))
    print(f"{r['epoch']:>4}/{args.epochs:<4} {loss:>8} {cons:>8} {r['train_accuracy']:7.2%} "
          f"{r['test_accuracy']:7.2%} {r['variance'] if 'variance' in r else '-':>9.3} "
          f"{r.get('images_per_second', 0):8.0f} {fmt_time(time.time() - t_run):>9} "
          f"{fmt_time(r.get('seconds', 0) * (args.epochs - r['epoch'])):>9}", flush=True)


def report(args, log, t_run):
    """The summary beside the paper's accuracies (Table 1, w = 64), and the attack to run next (attack.py
    takes --data, --width and the data folder from the checkpoint; --limit is passed on)."""
    metrics, done = log[-1], log[-1]["epoch"]
    status = "finished" if done >= args.epochs else f"stopped after epoch {done} (--resume continues)"
    print(f"\nsummary: {status}\n  test accuracy   {metrics['test_accuracy']:.2%} by " + (
        f"Eq. (4), K={args.K}, D={args.D or 'all'}, sigma^2 {metrics['variance']:.4g} (paper: ClusTR+QTRADES 91.03 "
        "CIFAR10, 95.06 SVHN, 69.25 CIFAR100)" if args.loss == "magnet" else "the linear head (paper: QTRADES "
        f"81.07 CIFAR10, 86.36 SVHN)") + f"\n  consistency     {metrics['consistency']} (--consistency "
        f"{args.consistency}, lam = {args.lam})\n  checkpoint      {args.out}   log {args.out}.log.jsonl\n  next"
        f"            python attack.py --ckpt {args.out}{f' --limit {args.limit}' if args.limit else ''}", flush=True)
    return {"stage": "qtrades-" + args.loss, "out": args.out, "data": args.data, "init": args.init, "loss": args.loss,
            "status": status, "epochs_done": done, "epochs": args.epochs, **metrics,
            "seconds_this_run": time.time() - t_run}


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
