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
import io
import json
import math
import os
import random
import re
import shlex
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

# --- shared: eps ---
def parse_fraction(text):
    """argparse type for eps and step sizes in [0, 1] pixel units: '8/255' or '0.0314'.
    A value > 1 is almost always a forgotten '/255' (README "Bad input and safety"): an error
    that says so."""
    try:
        if "/" in text:
            num, den = text.split("/")
            value = float(num) / float(den)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a fraction like 8/255")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number; give a size in [0, 1] "
                                         f"pixel units such as 8/255")
    if value > 1:
        raise argparse.ArgumentTypeError(
            f"{text} > 1, but images are in [0, 1]: did you mean {text}/255 (= {value / 255:.5f})?")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative; sizes in [0, 1] pixel units are >= 0 "
                                         f"(e.g. 8/255)")
    return value


def parse_with_fractions(parser, argv):
    """parser.parse_args(argv), where a negative value after a parse_fraction flag ('--eps -8/255',
    which argparse takes for an option) is passed as '--eps=-8/255' so parse_fraction refuses it
    with its message instead of argparse's 'expected at least one argument'."""
    flags = {s for a in parser._actions if a.type is parse_fraction for s in a.option_strings}
    argv, merged = [str(a) for a in (sys.argv[1:] if argv is None else argv)], []
    for a in argv:
        if merged and merged[-1] in flags and a.startswith("-") and a not in parser._option_string_actions:
            merged[-1] = f"{merged[-1]}={a}"
        else:
            merged.append(a)
    return parser.parse_args(merged)
# --- end shared: eps ---


def parse_D(text):
    """--D: a positive integer (the D nearest centres, Sec. 4.2) or 'all'."""
    if text == "all":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--D takes a positive integer or 'all', not {text!r}")
    return int(text)


def parse_args(argv=None):
    """The command line: the shared data/device flags, then QTRADES's flags; unset ones take
    --init's data and width and the paper's per-dataset defaults, then are range-checked."""
    formatter, table = defaults_table(PAPER_DEFAULTS, "Defaults per --data (Sec. 4.2, App. A; a flag you set wins):")
    p = argparse.ArgumentParser(
        prog="qtrades.py",
        description="ClusTR+QTRADES (--loss magnet): Magnet loss (Eq. (3)) + lam x the consistency "
                    "CE(p(f(x_adv)), p(f(x))) of Eq. (6) with p of Eq. (4) and a one-step quick "
                    "adversary (Sec. 4.2, App. A 'QTRADES'); QTRADES alone (--loss ce): cross-"
                    "entropy on the linear head + the same term on its softmax (Table 1 row "
                    "'QTRADES').",
        epilog="--data, --width and --data-dir default to those of --init (or of the checkpoint --resume "
               "continues), else cifar10, 64 and ./data.\n\n" + table,
        formatter_class=formatter)
    add_common_args(p, data_default=None)
    p.set_defaults(width=None)  # None: --init's (or --resume's) width, else 64 (defaults_from_init)
    p.set_defaults(data_dir=None)  # None: the folder --init's run read, else ./data (defaults_from_init)
    add_qtrades_args(p)
    args = parse_with_fractions(p, argv)
    defaults_from_init(args)
    for key, value in PAPER_DEFAULTS[args.data].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.D == "all":
        args.D = None
    check_args(args)
    return args


def add_qtrades_args(p):
    """The flags of Sec. 4.2, Eq. (6) and App. A ("QTRADES", "Magnet Loss", "Optimization"), in
    --help's order."""
    g = p.add_argument_group("QTRADES (Sec. 4.2, Eq. (6); App. A 'QTRADES', 'Magnet Loss', 'Optimization')")
    g.add_argument("--loss", choices=["magnet", "ce"], default="magnet",
                   help="magnet = ClusTR+QTRADES (Eq. (6), clusters, stage qtrades-magnet); ce = "
                        "QTRADES alone on the linear head (Table 1 row 'QTRADES', stage qtrades-ce)")
    g.add_argument("--init", default=None, metavar="PATH",
                   help="checkpoint to start from: nominal.py (--loss magnet drops its head, Sec. "
                        "3.3; --loss ce keeps it) or, for --loss magnet, magnet.py (its weights; "
                        "clusters are recomputed). Without it: random initialisation")
    g.add_argument("--out", default="qtrades.pt", help="checkpoint path; log goes to <out>.log.jsonl")
    g.add_argument("--lam", type=float, default=None,
                   help="lambda of Eq. (6); App. A: 8 CIFAR10, 9.7 SVHN, 2 CIFAR100; folder 8")
    g.add_argument("--consistency", choices=["ce", "kl"], default="ce",
                   help="the consistency term: ce = CE(p(f(x_adv)), p(f(x))) of Eq. (6) and the "
                        "authors' code; kl = KL(p(f(x)) || p(f(x_adv))) of TRADES (Zhang et al. "
                        "2019), i.e. ce minus the entropy H(p(f(x))): an ablation (default: %(default)s)")
    g.add_argument("--eps", type=parse_fraction, default="8/255",
                   help="L-inf radius of the quick adversary in [0,1] pixel units (8/255 accepted); "
                        "Sec. 4.2: 8/255")
    g.add_argument("--step", type=parse_fraction, default="10/255",
                   help="eta, the size of the adversary's one signed-gradient step; the paper gives "
                        "none, the authors' code uses 10/255")
    g.add_argument("--epochs", type=int, default=None,
                   help="epochs; as magnet.py (App. A): 30 CIFAR10 and SVHN, 60 CIFAR100; folder 30")
    g.add_argument("--lr", type=parse_lr, default=None, help="Adam learning rate, in (0, 1]; App. A: 1e-4")
    g.add_argument("-b", "--batch-size", type=int, default=500,
                   help="images per forward pass for the feature passes (k-means, sigma^2) and the "
                        "test set; training batches are m x d (App. A) for both losses")
    g.add_argument("--m", type=int, default=12, metavar="m",
                   help="clusters per neighbourhood batch; App. A: 12 (--loss ce: batches of m x d "
                        "shuffled images)")
    g.add_argument("--d", type=int, default=20, metavar="d", help="examples per sampled cluster; App. A: 20")
    g.add_argument("--K", type=int, default=2, metavar="K", help="k-means++ clusters per class; App. A: 2")
    g.add_argument("--alpha", type=float, default=None,
                   help="Magnet-loss margin alpha of Eq. (3); App. A (ClusTR+QTRADES): 12.5 CIFAR10, "
                        "10 SVHN, 8.5 CIFAR100; folder 12.5")
    g.add_argument("--D", type=parse_D, default=None, metavar="D",
                   help="Eq. (4) over the D nearest centres only, in training and in the checkpoint "
                        "(Sec. 4.2: D = 20 for CIFAR100, Table 2); 'all' elsewhere")
    g.add_argument("--crop", type=int, default=None,
                   help="random crops from a zero padding of this many pixels; App. A: 4 for "
                        "CIFAR10/100, 0 (none) for SVHN; 0 for folder, fashion-mnist, mnist")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips; on for CIFAR as in the authors' code (the paper "
                        "does not mention flips), off for SVHN, folder, fashion-mnist, mnist")
    add_run_args(g)


def check_args(args):
    """Bad values -> one line and exit code 2, before any work."""
    for flag, value, low in (("--m", args.m, 2), ("--d", args.d, 2), ("--K", args.K, 1),
                             ("--epochs", args.epochs, 0), ("--batch-size", args.batch_size, 1),
                             ("--stop-after", 0 if args.stop_after is None else args.stop_after, 0)):
        if value < low:  # m >= 2: a batch needs other-class clusters; d >= 2: sigma^2 > 0
            fail(f"{flag} must be at least {low} (got {value})")
    if not args.alpha >= 0:
        fail(f"--alpha must be >= 0 (Eq. (3)), got {args.alpha}")
    if not args.lam >= 0:
        fail(f"--lam must be >= 0 (Eq. (6)), got {args.lam}")


# Arguments that do not change the trained weights: a resume may differ in these.
NOT_SHAPING = {"out", "resume", "stop_after", "slim", "device", "amp", "deterministic", "data_dir",
               "overwrite", "compile"}
STAGE = {"magnet": "qtrades-magnet", "ce": "qtrades-ce"}                 # checkpoint stage names


# ======================================================================================
# 2. Model (App. A "Architecture"): CIFAR ResNet18, normalisation inside.
#    ClusTR has no head: the model is ResNet18(num_classes=0) and f(x) = model.features(x).
# ======================================================================================

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


# ======================================================================================
# 3. The method: QTRADES, the consistency term of Eq. (6) and the quick adversary (Sec. 4.2,
#    App. A), then the ClusTR blocks it builds on (Eq. (4), Eq. (3), k-means++, sampler)
# ======================================================================================

def nearest_mask(features, centers, D):
    """[n, M] bool: the D centres nearest to each row (Sec. 4.2, App. B.3); all True when D is
    None or >= M.  The eq4 block's distances and mask on the same dtype, so the set is the one
    cluster_log_probs(features, ..., D) uses, ties included (a test checks it).  Eq. (6) evaluates
    p(f(x)) and p(f(x_adv)) on the *same* set, cluster_log_probs(..., keep=nearest_mask(f(x), ...))
    for both: with a set of its own, x_adv could drop a class that p(f(x)) holds, and
    -p_c log 0 = +inf would end the run (with D = None both sets are all centres, Eq. (4) itself)."""
    features = features.detach()
    if features.dtype not in (torch.float32, torch.float64):
        features = features.float()                                        # bf16 under autocast
    keep = nearest_centers_mask(sq_distances(features, centers.detach().to(features)), D)
    if keep is None:
        keep = torch.ones(features.shape[0], centers.shape[0], dtype=torch.bool, device=features.device)
    return keep


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
    device = x.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
        if clusters is not None:
            centers, center_classes, sigma2, D = clusters
            with torch.no_grad():
                f = model.features(x).float()                              # [B, 8w]
            keep = nearest_mask(f, centers, D)                             # the clean D nearest
            log_p = cluster_log_probs(f, centers, center_classes, sigma2, keep=keep)

            def log_q_fn(z):
                return cluster_log_probs(model.features(z), centers, center_classes, sigma2, keep=keep)
        else:
            with torch.no_grad():
                log_p = F.log_softmax(model(x).float(), 1)                 # [B, classes]

            def log_q_fn(z):
                return F.log_softmax(model(z).float(), 1)
        x_adv, _ = quick_adversary(log_q_fn, x, log_p, args.eps, args.step, generator)
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
    """--loss magnet.  App. A: ceil(N / (m d)) neighbourhood batches; each is one Adam step on
    Eq. (6).  clusters: the checkpoint's `clusters` entry of the last k-means update.
    -> (mean per-example loss, mean consistency, images seen)."""
    images, _ = train
    centers = clusters["centers"].to(device)
    center_classes = clusters["center_classes"].to(device)
    eq4 = (centers, center_classes, clusters["variance"], args.D)
    model.train()
    loss_sum, cons_sum, seen = 0.0, 0.0, 0
    for _ in range(sampler.batches_per_epoch()):
        idx, cluster_ids = sampler.sample()                             # CPU: [B], [B] (B <= m d)
        idx_dev, cluster_ids = idx.to(device), cluster_ids.to(device)
        x = to_float(augment(images[idx_dev], args.crop, args.flip, generator))   # [B, C, H, W]
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        x_adv = craft(model, x, eq4, args, generator)                   # Sec. 4.2, eval mode
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            f = model.features(x)                                       # [B, 8w] r_n of Eq. (3)
            f_adv = model.features(x_adv)                               # [B, 8w]
        loss, per_example, cons = qtrades_magnet_loss(
            f, f_adv, cluster_ids, center_classes[cluster_ids], args.alpha, *eq4, args.lam,
            args.consistency)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        per_example = per_example.detach().float().cpu()
        total = per_example + args.lam * cons.detach().float().cpu()   # per-example Eq. (6)
        if not torch.isfinite(total).all():                             # NaN/inf guard
            return float("nan"), float("nan"), seen
        sampler.record(idx, per_example)            # Rippel et al.: the sampler ranks Magnet losses
        loss_sum += float(total.sum())
        cons_sum += float(cons.detach().sum())
        seen += len(idx)
    return loss_sum / max(1, seen), cons_sum / max(1, seen), seen


def train_one_epoch_ce(model, opt, train, args, generator, device):
    """--loss ce.  One pass over a fresh permutation of the training split in batches of m x d
    (the magnet variant's batch size); each batch is one Adam step on QTRADES alone.
    -> (mean loss, mean consistency, clean training accuracy, images seen)."""
    images, labels = train
    model.train()
    n, B = len(labels), args.m * args.d
    perm = torch.randperm(n, device=device, generator=generator)
    loss_sum, cons_sum, correct = 0.0, 0.0, 0
    for start in range(0, n, B):
        idx = perm[start:start + B]
        x = to_float(augment(images[idx], args.crop, args.flip, generator))   # [B, C, H, W]
        y = labels[idx]
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        x_adv = craft(model, x, None, args, generator)                  # Sec. 4.2, eval mode
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            logits, logits_adv = model(x), model(x_adv)                 # [B, classes] each
        loss, cons = qtrades_ce_loss(logits, logits_adv, y, args.lam, args.consistency)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss = float(loss.detach())
        if not math.isfinite(loss):                                     # NaN/inf guard
            return float("nan"), float("nan"), 0.0, start
        loss_sum += loss * len(idx)
        cons_sum += float(cons.detach().sum())
        correct += int((logits.argmax(1) == y).sum())
    return loss_sum / n, cons_sum / n, correct / n, n


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
    must not be counted from a tensor (torch.export: attack.py's ClassScores).  -> [n, classes].

    The per-class logsumexp runs on [n, M], not on an [n, classes, M] masked copy: with m_c the
    largest s_j of class c (a constant shift, so no gradient: the result does not depend on it),
    logsumexp_{j in c} s_j = m_c + log sum_{j in c} exp(s_j - m_c), the sums by one matmul with
    the [M, classes] one-hot matrix of the centres' classes (exact: products by 1 and 0, and
    deterministic on CUDA, where index_add adds atomically in any order); each sum is >= 1 (its
    largest term is exp(0)), so nothing underflows.
    A class without a kept centre gets -inf through a where whose other branch sees log(1), so
    that no 0 * inf reaches the gradient."""
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
def _scores(c, x):
    """||c_j||^2 - 2 x_i.c_j as [k, n] for centres c [k, d] and rows x [n, d]: the squared
    distance ||x_i - c_j||^2 less ||x_i||^2, by one matmul (the expanded form, as k-means
    libraries do).  Centres along dim 0: reductions over them then run over the outer dimension,
    which torch vectorises along the rows (a transposed copy of x, for another matmul layout,
    costs more than it saves).  In float32 or float64 even under autocast (a bfloat16 matmul
    would lose the digits that tell near centres apart)."""
    with torch.autocast(x.device.type, enabled=False):
        return torch.addmm((c * c).sum(1)[:, None], c, x.T, alpha=-2)


def _nearest(scores):
    """-> (lowest score [n], index of its centre [n]) of scores [k, n]: scores.min(0), ties to the
    lower index, without torch's CPU argmin over the outer dimension, which runs element by
    element (slower than the matmul itself): the index is the largest weight k - j among the
    entries equal to the minimum (an exact test, sign(s - min) = 0), found by amax.
    Overwrites scores."""
    k = scores.shape[0]
    low = scores.amin(0)                                                   # [n]
    weight = torch.arange(k, 0, -1, dtype=scores.dtype, device=scores.device)[:, None]  # k - j
    hit = scores.sub_(low).sign_().sub_(1).mul_(-weight)                   # k - j at the minimum, else 0
    return low, (k - hit.amax(0)).long()


def kmeans_pp(x, k, iters=100, generator=None, tol=1e-4, rtol=1e-4):
    """k-means on the rows of x [n, d] (float, any device), all randomness from `generator`
    (a torch.Generator on x's device).  -> (centers [k, d], assignment [n] in 0..k-1).

    Seeding, k-means++ (Arthur & Vassilvitskii 2007): the first centre is a uniformly drawn row;
    every further centre is drawn with probability proportional to D(x)^2, the squared distance
    to the nearest centre chosen so far.  Greedy variant (scikit-learn's default): draw
    2 + floor(ln k) candidates per step and keep the one that lowers sum_x D(x)^2 the most (plain
    D^2 seeding often misses clusters in 512-d).  When every D^2 is 0 (duplicates) draws are uniform.
    Lloyd: assign each row to its nearest centre, move each centre to the mean of its rows; stop
    when the assignment no longer changes, when the centres moved by at most tol x the mean
    per-feature variance of x in total squared distance (scikit-learn's criterion), when a round
    lowered the inertia (the sum of squared distances to the nearest centres) by at most rtol of
    it, or after `iters` rounds (tol = rtol = 0: only when the assignment no longer changes).
    The rtol rule ends the long tail of rounds in which a few rows on the borders change centre
    for a negligible gain (benchmarks/README.md: the inertia it leaves against running to
    scikit-learn's criterion).  A centre left without rows is reseeded with the row farthest
    from its own centre (that row moves to it).  The returned assignment is each row's nearest
    returned centre; each centre is the mean of its rows when the assignment stopped changing.
    Cost per round: one [k, d] x [d, n] matmul and a reduction over the k centres; the centre
    sums are kept in float64 and updated by the rows that changed centre only (few after the
    first rounds), not summed again.  Two host syncs per round."""
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
    centers = _seed_pp(x, xc, x_sq, offset, k, generator)                  # [k, d]
    # scikit-learn's scaling: tol x the mean per-feature variance of x (||x - mean||^2 summed)
    tol = tol * float(x_sq.sum()) / max(1, n - 1) / dim
    return _lloyd(x, xc, x_sq, offset, centers, iters, tol, rtol)


def _seed_pp(x, xc, x_sq, offset, k, generator):
    """kmeans_pp's greedy k-means++ seeding (its docstring): -> centers [k, d], rows of x."""
    n = x.shape[0]
    first = torch.randint(n, (1,), device=x.device, generator=generator)
    centers = x.index_select(0, first)                                     # [1, d]
    closest = _scores(centers - offset, xc)[0].add_(x_sq).clamp_min_(0)    # [n] D(x)^2
    trials = 2 + int(math.log(k))
    for _ in range(1, k):
        total = closest.sum()
        weights = torch.where(total > 0, closest, torch.ones_like(closest))   # all 0: uniform
        candidates = torch.multinomial(weights, trials, replacement=True, generator=generator)
        d2 = _scores(x.index_select(0, candidates) - offset, xc).add_(x_sq).clamp_min_(0)
        d_cand = torch.minimum(closest, d2)                                # [trials, n] D^2 with each
        best = d_cand.sum(1).argmin()                                      # lowest potential
        closest = d_cand[best]
        centers = torch.cat([centers, x[candidates[best]][None]])          # [c+1, d]
    return centers


def _lloyd(x, xc, x_sq, offset, centers, iters, tol, rtol):
    """kmeans_pp's Lloyd rounds from the seeded centers (its docstring; tol already scaled):
    -> (centers [k, d], assignment [n])."""
    k, dim = centers.shape
    low, assignment = _nearest(_scores(centers - offset, xc))              # [n], [n]
    inertia = (x_sq + low).sum(dtype=torch.float64)                        # ||x - c(x)||^2 summed
    counts = torch.bincount(assignment, minlength=k)                       # [k]
    sums = x.new_zeros(k, dim).index_add_(0, assignment, x).double()       # [k, d]
    has_empty = bool((counts == 0).any())
    for _ in range(iters):
        if has_empty:  # reseed: the rows farthest from their centres become the empty centres
            empty = (counts == 0).nonzero().flatten()
            assignment = assignment.clone()
            assignment[(x_sq + low).topk(len(empty)).indices] = empty       # D^2 = ||x||^2 + low
            counts = torch.bincount(assignment, minlength=k)
            sums = x.new_zeros(k, dim).index_add_(0, assignment, x).double()
        # a centre still without rows (only with duplicate rows) stays where it was
        moved = torch.where(counts[:, None] > 0, (sums / counts.clamp_min(1)[:, None]).to(x.dtype),
                            centers)
        shift = (moved - centers).pow(2).sum()
        centers = moved
        low, new = _nearest(_scores(centers - offset, xc))
        switch = (new != assignment).nonzero().flatten()                   # rows changing centre
        x_switch = x.index_select(0, switch).double()
        to, fro = new.index_select(0, switch), assignment.index_select(0, switch)
        sums.index_add_(0, to, x_switch).index_add_(0, fro, x_switch, alpha=-1)
        ones = torch.ones_like(to)
        counts.index_add_(0, to, ones).index_add_(0, fro, ones, alpha=-1)
        assignment = new
        last, inertia = inertia, (x_sq + low).sum(dtype=torch.float64)
        far, gain, has_empty = torch.stack(
            [shift > tol, last - inertia > rtol * inertia, (counts == 0).any()]).tolist()
        if len(switch) == 0 or not far or (rtol > 0 and not gain):         # converged
            break
    return centers, assignment


@torch.no_grad()
def features_of(model, images, batch_size, amp):
    """Eval-mode features f(x) [N, 8w] (float32) of un-augmented uint8 images [N, C, H, W]: what
    k-means, sigma^2 and Eq. (4) see (README "Where this differs from the paper and the authors' code",
    "Consistent clusters").  Batch-norm buffers are not touched."""
    was_training = model.training
    model.eval()
    device = images.device
    out = []
    for start in range(0, len(images), batch_size):
        x = to_float(images[start:start + batch_size])
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out.append(model.features(x).float())
    model.train(was_training)
    return torch.cat(out)


def fit_clusters(features, labels, num_classes, K, generator=None, iters=100):
    """ClusTR App. A / Sec. 4.2: K k-means++ clusters per class on the whole training split's
    features [N, d] (labels [N]); cluster j = c*K + k belongs to class c.  Then the variance of
    Eq. (3) over the whole split around each row's own centre mu(r_n) (its nearest centre of
    its class, v* of Eq. (3)):  sigma^2 = 1/(N-1) sum_n ||r_n - mu(r_n)||^2.
    -> (centers [C*K, d], center_classes [C*K], assignment [N] cluster ids, sigma^2 float)."""
    counts = torch.bincount(labels, minlength=num_classes).tolist()
    short = {c: counts[c] for c in range(num_classes) if counts[c] < K}
    if short:
        fail(f"k-means++ needs at least K={K} training examples per class; these classes have "
             f"fewer (class: count): {short}. Lower --K or raise --limit")
    if features.dtype not in (torch.float32, torch.float64):
        features = features.float()
    dim = features.shape[1]
    centers = features.new_zeros(num_classes * K, dim)                    # [C*K, d]
    assignment = torch.empty_like(labels)                                 # [N]
    # one reused buffer for a class's rows, and chunks of ~1 MB for the differences: fresh
    # [n, d] temporaries cost more (page faults on the CPU) than the arithmetic
    rows_buffer = features.new_empty(max(counts), dim)
    chunk = max(1, 2 ** 18 // dim)
    own_sq = torch.zeros((), dtype=torch.float64, device=features.device)  # sum ||r_n - mu(r_n)||^2
    for c in range(num_classes):
        rows = (labels == c).nonzero().flatten()
        x = torch.index_select(features, 0, rows, out=rows_buffer[:counts[c]])   # [n_c, d]
        mu, a = kmeans_pp(x, K, iters, generator)
        centers[c * K:(c + 1) * K] = mu
        assignment[rows] = c * K + a
        for s in range(0, counts[c], chunk):                               # explicit differences
            own_sq += (x[s:s + chunk] - mu[a[s:s + chunk]]).pow_(2).sum().double()
    center_classes = torch.arange(num_classes, device=labels.device).repeat_interleave(K)
    sigma2 = float(own_sq) / max(1, len(labels) - 1)                       # Eq. (3) sigma^2
    return centers, center_classes, assignment, sigma2
# --- end shared: kmeans ---


# --- shared: sampler ---
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
        self.num_examples, self.m, self.d = num_examples, m, d
        self.generator = torch.Generator() if generator is None else generator
        self.losses = torch.full((num_examples,), float("nan"))          # [N], NaN = never drawn
        self.noted = False

    def set_clusters(self, assignment, centers, center_classes):
        """After each k-means update: assignment [N] cluster ids, centers [M, d], classes [M]."""
        self.assignment = assignment.detach().cpu()
        self.centers = centers.detach().float().cpu()
        self.center_classes = center_classes.detach().cpu()
        M = len(self.center_classes)
        self.sizes = torch.bincount(self.assignment, minlength=M)         # [M]
        self.order = torch.argsort(self.assignment, stable=True)          # rows grouped by cluster
        self.starts = torch.cumsum(self.sizes, 0) - self.sizes            # [M]
        # centre distances from explicit differences, float64 (ties and order are exact) [M, M]
        c = self.centers.double()
        dist = (c[:, None, :] - c[None, :, :]).pow(2).sum(-1)
        other = self.center_classes[:, None] != self.center_classes[None, :]
        dist = dist.masked_fill(~other | (self.sizes[None, :] == 0), float("inf"))
        self.impostors = dist.argsort(dim=1, stable=True)[:, :self.m - 1]     # [M, <= m-1] nearest first
        self.n_impostors = torch.isfinite(dist).sum(1).clamp(max=self.m - 1)   # [M]

    def seed_probabilities(self):
        """p(I_1 = j) proportional to the mean recent loss of cluster j's examples -> [M]."""
        M = len(self.sizes)
        known = ~torch.isnan(self.losses)
        ids = self.assignment[known]
        total = torch.zeros(M, dtype=torch.float64).index_add_(0, ids, self.losses[known].double())
        count = torch.zeros(M, dtype=torch.float64).index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64))
        seen = count > 0
        mean = total / count.clamp_min(1)                                 # [M]
        if seen.any():
            mean = torch.where(seen, mean, mean[seen].mean())             # never drawn: average
        nonempty = (self.sizes > 0).double()
        w = mean.clamp_min(0) * nonempty
        if not (torch.isfinite(w).all() and w.sum() > 0):                 # no loss yet, or all 0
            w = nonempty
        return w / w.sum()

    def sample(self):
        """One neighbourhood batch -> (row indices [B], cluster ids [B]) on the CPU, B <= m d;
        the seed cluster's rows come first, then the impostors', nearest first."""
        seed = int(torch.multinomial(self.seed_probabilities(), 1, generator=self.generator))
        clusters = [seed] + self.impostors[seed, :int(self.n_impostors[seed])].tolist()
        rows, ids = [], []
        for j in clusters:
            size, start = int(self.sizes[j]), int(self.starts[j])
            members = self.order[start:start + size]
            if size > self.d:                                             # d without replacement
                members = members[torch.randperm(size, generator=self.generator)[:self.d]]
            elif not self.noted:
                self.noted = True
                print(f"note: cluster {j} holds {size} examples, not more than d={self.d}; the "
                      f"whole cluster enters the batch (shown once)", flush=True)
            rows.append(members)
            ids.append(torch.full((len(members),), j, dtype=torch.long))
        return torch.cat(rows), torch.cat(ids)

    def record(self, rows, losses):
        """Remember each drawn example's loss (Rippel et al.: the loss index of the sampler)."""
        self.losses[rows.cpu()] = losses.detach().float().cpu()

    def batches_per_epoch(self):
        """App. A: an epoch passes as many examples as the split holds: ceil(N / (m d))."""
        return math.ceil(self.num_examples / (self.m * self.d))

    def state_dict(self):
        return {"losses": self.losses.clone(), "generator": self.generator.get_state(),
                "assignment": self.assignment.clone(), "centers": self.centers.clone(),
                "center_classes": self.center_classes.clone(), "noted": self.noted}

    def load_state_dict(self, state):
        self.losses = state["losses"].clone()
        self.generator.set_state(state["generator"])
        self.set_clusters(state["assignment"], state["centers"], state["center_classes"])
        self.noted = bool(state["noted"])
# --- end shared: sampler ---


# --- shared: cluster-update ---
@torch.no_grad()
def eq4_accuracy(features, labels, centers, center_classes, sigma2, D=None):
    """Share of rows whose Eq. (4) prediction argmax_c p_c(f) is the label; chunked so that each
    [rows, centres] temporary inside cluster_log_probs stays under ~64 MB."""
    chunk = max(1, 2 ** 24 // centers.shape[0])
    correct = torch.zeros((), dtype=torch.long, device=features.device)
    for start in range(0, len(labels), chunk):
        log_p = cluster_log_probs(features[start:start + chunk], centers, center_classes, sigma2, D)
        correct += (log_p.argmax(1) == labels[start:start + chunk]).sum()
    return correct.item() / max(1, len(labels))


def update_clusters(model, train, num_classes, args, generator):
    """Sec. 4.2 / App. A: after every epoch, k-means++ per class on the eval-mode features of the
    whole un-augmented training split; sigma^2 of Eq. (3) over the same features.
    -> (centers [C*K, 8w], center_classes [C*K], assignment [N], sigma^2, train Eq. (4) accuracy)."""
    features = features_of(model, train[0], args.batch_size, args.amp)          # [N, 8w]
    if not torch.isfinite(features).all():
        fail(f"the features became non-finite (inf/NaN): the weights diverged. {args.out} keeps "
             f"the last good epoch; try a smaller --lr (now {args.lr}) or --alpha (now {args.alpha})")
    centers, center_classes, assignment, sigma2 = fit_clusters(
        features, train[1], num_classes, args.K, generator)
    accuracy = eq4_accuracy(features, train[1], centers, center_classes, sigma2, args.D)
    return centers, center_classes, assignment, sigma2, accuracy


def clusters_entry(centers, center_classes, sigma2, args):
    """The `clusters` entry of a checkpoint (README "Where results and checkpoints go"): plain
    floats/ints/tensors, weights_only-loadable."""
    return {"centers": centers.detach().float().cpu(), "center_classes": center_classes.cpu(),
            "variance": float(sigma2), "K": int(args.K), "alpha": float(args.alpha),
            "D": None if args.D is None else int(args.D)}


def cluster_and_evaluate(model, train, test, info, sampler, args, generator, epoch):
    """k-means++ update (App. A), sigma^2 (Eq. (3)) and Eq. (4) accuracies, after `epoch`.
    -> (the checkpoint's clusters entry, the centres' classes, the epoch's metrics)."""
    t0 = time.time()
    centers, center_classes, assignment, sigma2, train_acc = update_clusters(
        model, train, info["num_classes"], args, generator)
    test_features = features_of(model, test[0], args.batch_size, args.amp)
    test_acc = eq4_accuracy(test_features, test[1], centers, center_classes, sigma2, args.D)
    sampler.set_clusters(assignment, centers, center_classes)
    return clusters_entry(centers, center_classes, sigma2, args), center_classes, {
        "epoch": epoch, "train_accuracy": train_acc, "test_accuracy": test_acc, "variance": float(sigma2),
        "cluster_seconds": time.time() - t0}
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
        x = to_float(images[start:start + batch_size])
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            correct += (model(x).argmax(1) == labels[start:start + batch_size]).sum()
    model.train(was_training)
    return correct.item() / max(1, len(labels))
# --- end shared: head-eval ---


# ======================================================================================
# 4. The run: --init, data, the model, the starting point (epoch 0) or --resume, the epochs of
#    App. A, each saved and logged, the summary.  The two variants differ only where `magnet` is
#    tested: --loss magnet (ClusTR+QTRADES: clusters, Eq. (6) on Eq. (4)) and --loss ce (QTRADES
#    alone: the linear head).  Checkpoint and report: README "Where results and checkpoints go"
# ======================================================================================

SAMPLER_SEED_OFFSET = 7919  # the sampler's CPU generator: seed + this (a stream apart from the device one)


def main(argv=None):
    """QTRADES (Sec. 4.2, Eq. (6)) as a run.  Ctrl-C / SIGTERM: one line and exit 130 (`owned`)."""
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    args = parse_args(argv)
    magnet = args.loss == "magnet"
    with owned(args, argv, training=True) as run:      # outputs checked, --out locked, before any work
        device = setup_runtime(args, training=True)
        init = read_init(args, stages=("nominal", "magnet") if magnet else ("nominal",))
        train, test, info = device_data(args, device)
        info = check_init_data(init, info, train[0].shape[1], args)
        # magnet: without the last linear layer (Sec. 3.3; a nominal head dropped); ce: with the head
        model, opt, generator = build_training(args, info, 0 if magnet else info["num_classes"], device, init and {
            k: v for k, v in init["model"].items() if not magnet or not k.startswith("head.")})
        sampler = NeighbourhoodSampler(len(train[1]), args.m, args.d, torch.Generator().manual_seed(
            args.seed + SAMPLER_SEED_OFFSET)) if magnet else None
        state = {"optimizer": opt, "generator": generator, "sampler": sampler}
        t_run, ev = time.time(), (model, train, test, info, sampler, args, generator, device)
        print_title(args, train, test, info, device)
        if args.resume is not None:
            path = args.resume or args.out
            ckpt = load_checkpoint(path, stages=(STAGE[args.loss],))
            ckpt["args"].setdefault("consistency", "ce")           # runs saved before the flag
            info = resume(path, ckpt, args, NOT_SHAPING, run, info, model, opt, generator)
            if magnet:
                sampler.load_state_dict(ckpt["resume"]["sampler"])
            clusters, start, log = ckpt.get("clusters"), ckpt["epoch"], ckpt["log"]
        else:   # epoch 0: the starting point (magnet: the clusters of the starting features)
            clusters, metrics = evaluate_epoch(*ev, 0)
            start, log = 0, [{**metrics, "train_loss": None, "consistency": None, "lr": args.lr, **compile_seconds()}]
            if args.epochs == 0 or not os.path.exists(args.out):  # --overwrite: old files stay until epoch 1
                save_epoch(run, STAGE[args.loss], args, info, model, log, state, clusters=clusters)
            print_row(args, log[-1], t_run, 0)
        t_loop = time.time()
        for epoch in range(start, min(args.epochs, args.stop_after or args.epochs)):
            t0 = time.time()
            if magnet:      # the train accuracy comes from the cluster update
                (train_loss, cons, seen), train_acc = train_one_epoch(model, opt, train, sampler, clusters, args,
                                                                      generator, device), None
            else:
                train_loss, cons, train_acc, seen = train_one_epoch_ce(model, opt, train, args, generator, device)
            train_seconds = time.time() - t0
            check_loss(train_loss, epoch, run, f"--lr (now {args.lr}), --lam (now {args.lam})"
                       + (f" or --alpha (now {args.alpha})" if magnet else ""))
            clusters, metrics = evaluate_epoch(*ev, epoch + 1, train_acc)
            log.append({**metrics, "train_loss": train_loss, "consistency": cons, "lr": args.lr,
                        "seconds": time.time() - t0, "images_per_second": seen / train_seconds,
                        **({"batches": sampler.batches_per_epoch()} if magnet else {}), **compile_seconds()})
            save_epoch(run, STAGE[args.loss], args, info, model, log, state, clusters=clusters)
            print_row(args, log[-1], t_run, (time.time() - t_loop) / (epoch + 1 - start) * (args.epochs - epoch - 1))
        return report(args, log, t_run)


def print_title(args, train, test, info, device):
    """What runs: the variant, data, model, --init, Eq. (6)'s lam, eps and step, device, torch; the config;
    the epoch table's header."""
    print(f"qtrades.py | {'ClusTR+QTRADES' if args.loss == 'magnet' else 'QTRADES alone'} (--loss {args.loss}) | "
          f"data {args.data} ({len(train[1])} train, {len(test[1])} test, {info['num_classes']} classes, "
          f"{info['image_size']}) | ResNet18 w={args.width} | init {args.init or 'random'} | lam {args.lam} "
          f"eps {args.eps:.5f} step {args.step:.5f} | device {device} amp {args.amp} | torch {torch.__version__}"
          f"\nconfig: {json.dumps(vars(args))}\n{HEADER}", flush=True)


HEADER = (f"{'epoch':>9} {'loss':>8} {'consist':>8} {'train':>7} {'test':>7} {'sigma2':>9} {'img/s':>8} "
          f"{'elapsed':>9} {'ETA':>9}")


def print_row(args, r, t_run, eta):
    """One row of the epoch table (HEADER)."""
    loss, cons = ("-" if r[k] is None else f"{r[k]:.4f}" for k in ("train_loss", "consistency"))
    print(f"{r['epoch']:>4}/{args.epochs:<4} {loss:>8} {cons:>8} {r['train_accuracy']:7.2%} "
          f"{r['test_accuracy']:7.2%} {r['variance'] if 'variance' in r else '-':>9.3} "
          f"{r.get('images_per_second', 0):8.0f} {fmt_time(time.time() - t_run):>9} {fmt_time(eta):>9}", flush=True)


def evaluate_epoch(model, train, test, info, sampler, args, generator, device, epoch, train_acc=None):
    """After `epoch`: --loss magnet, the k-means++ update (App. A), sigma^2 (Eq. (3)) and Eq. (4)
    accuracies; --loss ce, the head's (the train one is the epoch's own).  -> (clusters or None, metrics)."""
    if args.loss != "magnet":
        train_acc = train_acc if epoch else evaluate(model, train, args.batch_size, args.amp, device)
        return None, {"epoch": epoch, "train_accuracy": train_acc,
                      "test_accuracy": evaluate(model, test, args.batch_size, args.amp, device)}
    clusters, _, metrics = cluster_and_evaluate(model, train, test, info, sampler, args, generator, epoch)
    return clusters, metrics


def report(args, log, t_run):
    """The summary beside the paper's accuracies (Table 1), and the attack to run next."""
    metrics, magnet = log[-1], args.loss == "magnet"
    done = metrics["epoch"]
    status = "finished" if done >= args.epochs else f"stopped after epoch {done} (--resume continues)"
    rule = (f"Eq. (4) with K={args.K}, D={args.D or 'all'}  (paper, w=64: ClusTR+QTRADES 91.03 CIFAR10, 95.06 "
            f"SVHN, 69.25 CIFAR100)") if magnet else "linear head  (paper, w=64: QTRADES 81.07 CIFAR10, 86.36 SVHN)"
    cons = "-" if metrics.get("consistency") is None else format(metrics["consistency"], ".4f")
    term = "CE(p(f(x_adv)), p(f(x)))" if args.consistency == "ce" else "KL(p(f(x)) || p(f(x_adv)))"
    print(f"\nsummary: {status}\n"
          f"  test accuracy   {metrics['test_accuracy']:.2%} by {rule}\n"
          + (f"  sigma^2         {metrics['variance']:.4g} (Eq. (3), whole training split)\n" if magnet else "")
          + f"  consistency     {cons} (mean {term} of the last epoch, lam = {args.lam})\n"
          f"  checkpoint      {args.out}   log {args.out}.log.jsonl\n"
          f"  next            {next_command(args)}", flush=True)
    return {"stage": STAGE[args.loss], "out": args.out, "data": args.data, "init": args.init, "loss": args.loss,
            "status": status, "epochs_done": done, "epochs": args.epochs, **metrics,
            "seconds_this_run": time.time() - t_run}


# ======================================================================================
# 5. Copied plumbing (compile, runtime, setup, run-files, data, checkpoints, resume, init,
#    next command): each block identical in every stage that carries it; checked by test_all.py
# ======================================================================================

# --- shared: compile ---
# --compile (README "Flags"): the network f(x) through torch.compile on every hot path that calls
# it (training steps, feature passes, evaluation, attack.py's forward and input gradients).
COMPILED = {"backend": None}  # --compile's BACKEND of the model compiled last (None: eager)


def add_compile_arg(g):
    g.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND", type=backend,
                   help="f(x) through torch.compile (BACKEND: inductor when none is given; aot_eager: the same "
                        "graphs, no generated code): eager's results up to float rounding. Default: eager")


def backend(name):
    """argparse type of --compile: a backend of torch.compile that needs no other package."""
    if name not in ("inductor", "aot_eager", "eager", "cudagraphs"):
        raise argparse.ArgumentTypeError(f"backend {name!r} is not one of inductor, aot_eager, eager, cudagraphs")
    return name


def compile_features(model, backend):
    """--compile BACKEND: model.features (f(x); forward calls it too, so the head's logits go
    through it) replaced on this instance by its torch.compile form, so that the module, its
    state_dict keys and the checkpoint stay those of eager.  Each kind of call (train or eval
    mode, with or without gradients) compiles at its first call, its backward at the first
    backward, and once more, with a dynamic batch size, at the first other batch size (torch's
    default).  torch._dynamo.reset() first, so that torch's compile timers count this model's
    compiles alone.  backend None: eager, nothing changes."""
    COMPILED["backend"] = backend
    if backend:
        torch._dynamo.reset()                                       # torch's timers: this model's alone
        model.features = torch.compile(model.features, backend=backend)
    return model


def compile_seconds():
    """The log and results entry of --compile ({} without it): the seconds torch's own timers
    recorded for compiling f(x) so far (Dynamo and the backend's forward graphs, and the backward
    graphs, which compile at the first backward)."""
    timers = torch._dynamo.utils.compilation_time_metrics if COMPILED["backend"] else {}  # eager: no Dynamo import
    seconds = sum(sum(timers.get(k, ())) for k in ("_compile.compile_inner", "backward._backward_impl"))
    return {"compile_seconds": round(seconds, 3)} if COMPILED["backend"] else {}
# --- end shared: compile ---


# --- shared: args ---
def add_common_args(p, data_default):
    """Flags every stage shares, in the same order everywhere (README "Flags")."""
    g = p.add_argument_group("common")
    g.add_argument("--data", choices=["cifar10", "cifar100", "svhn", "fashion-mnist", "mnist", "folder"],
                   default=data_default,
                   help="dataset; folder = an ImageFolder with train/<class>/* and test/<class>/*; "
                        "fashion-mnist and mnist are 28x28 grey (1 channel, no crop or flip by "
                        "default) (default: %(default)s)")
    g.add_argument("--data-dir", "--data-path", dest="data_dir", default="./data",
                   help="torchvision root (downloaded there when missing), or the folder root "
                        "(default: %(default)s)")
    g.add_argument("--width", type=positive_int, default=64,
                   help="ResNet18 base width w; features are 8w-dimensional. 64 = the paper's "
                        "(App. A: 512-d features); 16 for quick CPU runs (default: %(default)s)")
    g.add_argument("--seed", type=seed_int, default=0, help="seeds python, numpy, torch (default: %(default)s)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto = cuda when available (default: %(default)s)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (CUDA only); default on for CUDA training, off on CPU")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms on CUDA (slower); CPU runs are always reproducible")
    g.add_argument("--limit", type=positive_int, default=None,
                   help="use only the first N train and N test images (smoke runs, tests)")
    return g


def positive_int(text):
    """argparse type of the counts (--limit, --width, -b, nominal.py's --epochs): an integer >= 1."""
    if not re.fullmatch(r"\s*\+?\d+\s*", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, not {text}")
    return int(text)


def seed_int(text):
    """argparse type of --seed: an integer in [0, 2^32), the seeds numpy takes."""
    value = int(text) if re.fullmatch(r"\s*\d+\s*", text) else -1
    if not 0 <= value < 2 ** 32:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2^32), not {text!r}")
    return value
# --- end shared: args ---


# --- shared: help ---
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with the real defaults.  argparse's "(default: None)" is left out: None here means
    "decided at run time", and the flag's text says by what (the checkpoint, --init, CUDA).  A flag
    whose default depends on --data (per_data) points at the per-dataset table that ends the help
    (defaults_table); that table's blocks keep their layout, the other text is wrapped.  A help text
    that states its default keeps it (8/255 as a user writes it, where argparse would print
    0.03137254901960784); fraction defaults are given as text, "8/255", which argparse parses."""
    per_data = ()

    def _get_help_string(self, action):
        if action.default is None:                                  # set at run time: say by what
            text = action.help.replace(" (default: %(default)s)", "")
            return f"{text} (default: per --data, table below)" if action.dest in self.per_data else text
        return action.help if "(default: " in action.help else super()._get_help_string(action)

    def _fill_text(self, text, width, indent):
        return "\n\n".join(block if block.startswith("  ") else super(HelpFormatter, self)._fill_text(
            block, width, indent)
                           for block in text.split("\n\n"))
# --- end shared: help ---


# --- shared: train-args ---
def parse_lr(text):
    """argparse type of --lr: a finite number in (0, 1].  Adam moves every weight by about lr per
    step; App. A's rates are 1e-2 and 1e-4, and above 1 the weights only overflow."""
    value = float(text)                     # not a number: argparse says "invalid parse_lr value"
    if not 0 < value <= 1:                                          # nan fails too
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (App. A: 1e-2 nominal, 1e-4 fine-tuning), not {text}")
    return value


def add_run_args(g):
    """The flags of a training run's files (README "Bad input and safety") and --compile."""
    g.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue an interrupted run from PATH (default: --out); refused when the "
                        "arguments that shape the run differ")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out checkpoint and its log; both stay as they are "
                        "until this run saves its first epoch. Without it an existing --out is "
                        "refused (continue it with --resume)")
    g.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop cleanly after epoch N, as if interrupted (for --resume)")
    g.add_argument("--slim", action="store_true",
                   help="drop the resume state (optimizer, RNG, sampler) from the final checkpoint (no "
                        "resume; smaller)")
    add_compile_arg(g)


def defaults_table(defaults, title):
    """(formatter class, epilog block) of a stage's per-dataset defaults {data: {dest: value}}:
    the table its --help prints, one row per --data value, from the dict the run itself applies."""
    keys = list(next(iter(defaults.values())))
    shown = {True: "on", False: "off", None: "all"}
    rows = [["--data"] + ["--" + k.replace("_", "-") for k in keys]]
    rows += [[name] + [shown.get(v, v) if isinstance(v, (bool, type(None))) else f"{v:g}"
                       if isinstance(v, float) else str(v) for v in d.values()] for name, d in defaults.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return type("HelpFormatter", (HelpFormatter,), {"per_data": tuple(keys)}), title + "\n\n" + "\n".join(lines)
# --- end shared: train-args ---


# --- shared: runtime ---
def fail(message):
    """Bad input (README "Bad input and safety"): one clear message on stderr, exit code 2, no traceback."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fmt_time(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def json_line(record):
    """One line of a .log.jsonl file; NaN and inf become null (JSON has neither)."""
    return json.dumps(json.loads(json.dumps(record), parse_constant=lambda c: None)) + "\n"



def atomic_write(path, data):
    """bytes to a temporary file beside `path`, flushed to disk, then os.replace: a killed run leaves
    the previous complete file, never half a new one.  OSError (a full disk) leaves no temporary file."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
# --- end shared: runtime ---

# --- shared: setup ---
def pick_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        fail(f"--device cuda was asked for but torch sees no CUDA device (torch {torch.__version__}); use "
             f"--device cpu or auto")
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def setup_runtime(args, training):
    """Seed, pick the device, resolve --amp (bf16 on CUDA for training) and determinism."""
    seed_everything(args.seed)
    for key in ("data_dir", "init"):                        # stored absolute in the checkpoint
        if getattr(args, key, None):
            setattr(args, key, os.path.abspath(getattr(args, key)))
    device = pick_device(args.device)
    if args.amp is None:
        args.amp = device.type == "cuda" and training
    if device.type != "cuda":
        args.amp = False  # bf16 autocast is only used on CUDA; CPU runs are fp32
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device
# --- end shared: setup ---

# --- shared: run-files ---
# One run owns its --out (README "Bad input and safety"): every file it writes is checked before any
# work; <out>.lock is held with fcntl.flock for the life of the run (the kernel releases it however the
# process ends); files are replaced atomically (atomic_write); Ctrl-C or SIGTERM ends in one line that
# says what the files hold and how to continue, exit code 130 (the shell's 128 + SIGINT).
PLOTS = (".png", ".pdf", ".svg", ".svgz", ".eps", ".ps", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".gif",
         ".pgf", ".raw", ".rgba")                                   # the suffixes matplotlib writes


def check_outputs(args, training, made, keys=("out", "save_adv", "export", "plot")):
    """Every file the run writes (--out with its log, rows and lock; --save-adv, --export, --plot):
    named, not a folder, not a file this run reads, not written twice, a suffix its writer takes; then
    its folder created (listed in `made`, removed again if the run writes nothing) and writable."""
    reads = {os.path.realpath(p) for p in (getattr(args, k, None) for k in ("ckpt", "init", "resume")) if p}
    if training and args.resume is not None:
        reads.discard(os.path.realpath(args.out))                   # a resumed run continues --out
    paths = {}
    for key in keys:
        given, flag = getattr(args, key, None), "--" + key.replace("_", "-")
        if given is None or (key == "plot" and given.lower() in ("", "none")):
            continue
        if not given.strip() or given.endswith((os.sep, "/")):
            fail(f"{flag} {given!r} names no file; give a file name")
        if key == "plot" and not given.lower().endswith(PLOTS):
            fail(f"{flag} {given}: the plot is written as one of {' '.join(PLOTS)}; give one")
        for path in [given] + [given + s for s in (".log.jsonl", ".log.jsonl.partial", ".lock") if key == "out"]:
            real = os.path.realpath(path)
            if real in reads:
                fail(f"{flag} {given} is also a file this run reads; writing it would destroy it: choose "
                     f"another {flag}")
            if os.path.isdir(path):
                fail(f"{flag} {given}: {path} is a folder; give a file name, e.g. {flag} "
                     f"{os.path.join(given, 'run.pt' if training else 'results.json')}")
            if real in paths:
                fail(f"{flag} {given} is also written as {paths[real]}: one would replace the other; give two names")
            paths[real] = flag
    for path, flag in paths.items():
        folder = missing = os.path.dirname(path)
        while not os.path.exists(missing):
            made.append(missing)
            missing = os.path.dirname(missing)
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            fail(f"cannot create the folder {folder} of {flag} ({e.strerror or e}); choose another {flag}")
        if not os.access(folder, os.W_OK):
            fail(f"cannot write in the folder {folder} of {flag}; make it writable or choose another {flag}")


def take_lock(path):
    """<out>.lock, held with fcntl.flock (released by the kernel however the process ends); a lock
    file its last holder removed meanwhile is taken again.  -> its descriptor, holding our pid."""
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as e:
            fail(f"cannot write in the folder {os.path.dirname(os.path.abspath(path))} of --out ({e.strerror or e}); "
                 f"make it writable or choose another --out")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            fail(f"another run (process {owner}) is writing {path[:-5]} now ({path}); wait for it to end "
                 f"or choose another --out")
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())          # for a person: who holds it
                return fd
        os.close(fd)


def stopped(args, argv, training, run):
    """The line printed on Ctrl-C or SIGTERM: what the files hold and the command that continues."""
    script = sys.argv[0] if os.path.basename(sys.argv[0]) == os.path.basename(__file__) else os.path.basename(__file__)
    again = list(argv)                      # as given, until --out holds an epoch of this run: then
    if training and run["file"] and os.path.abspath(run["file"]) == os.path.abspath(args.out):
        again = [a for a in argv if a != "--overwrite" and not a.startswith("--resume=")]
        if "--resume" in again:             # --resume [PATH]: --out is what continues now
            i = again.index("--resume")
            del again[i:i + 1 + (i + 1 < len(again) and not again[i + 1].startswith("-"))]
        again.append("--resume")
    again, rows = " ".join(shlex.quote(a) for a in ["python", script, *again]), args.out + ".log.jsonl.partial"
    if not training:
        return (f"interrupted; {args.out} and its log are as the previous run left them"
                + (f"; this run's rows so far are in {rows}" if os.path.exists(rows) else "")
                + f"; run it again with: {again}")
    if run["epoch"] is None:
        return (f"interrupted before the first epoch was saved; nothing was written ({args.out} and its log "
                f"are as before); run it again with: {again}")
    return (f"interrupted in epoch {run['epoch'] + 1}; the checkpoint holds epoch {run['epoch']} ({run['file']}); "
            f"continue with: {again}")


@contextlib.contextmanager
def owned(args, argv, training):
    """The run's hold on its files, around all its work: outputs checked, an existing training --out
    refused unless --resume or --overwrite, <out>.lock taken (a second run on --out exits 2), SIGTERM
    treated as Ctrl-C.  Yields {"epoch", "file"}: the last epoch saved or resumed, and where it is.
    Training stages keep their log inside the checkpoint and rewrite <out>.log.jsonl from it at each
    save, so under --overwrite the old files stay until the first save; evaluation stages append rows
    to <out>.log.jsonl.partial, which moves over the log beside the result."""
    out, made, fd, run = args.out, [], None, {"epoch": None, "file": None}
    resume = training and args.resume is not None
    try:
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    except ValueError:                                              # not the main thread
        previous = None
    try:
        check_outputs(args, training, made)
        if not training and os.path.isfile(out) and open(out, "rb").read(2) == b"PK":   # torch.save's zip
            fail(f"--out {out} is a checkpoint, not a result file; writing results would destroy it: choose "
                 f"another --out")
        if training and not resume and os.path.exists(out) and not args.overwrite:
            fail(f"--out {out} exists (an earlier run's checkpoint); continue that run with --resume, or "
                 f"replace it with --overwrite (its files stay until the new run saves its first epoch)")
        if resume and args.resume and os.path.exists(out) and not args.overwrite \
                and os.path.realpath(args.resume) != os.path.realpath(out):
            fail(f"--out {out} exists and is not the run --resume {args.resume} continues; choose another "
                 f"--out, or replace it with --overwrite")
        fd = take_lock(out + ".lock")
        if not resume and os.path.exists(out + ".log.jsonl.partial"):
            os.remove(out + ".log.jsonl.partial")                   # rows of an earlier killed run
        yield run
    except KeyboardInterrupt:
        print(f"\n{stopped(args, argv, training, run)}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except OSError as e:                # stdout on a full device (files: one line where written)
        with contextlib.suppress(OSError, ValueError):              # the buffered rest goes nowhere
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"error: {e.strerror or e}{f' ({e.filename})' if e.filename else ''}; what was saved before it "
              f"stays (--resume continues a training run)", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    finally:
        if fd is not None:
            with contextlib.suppress(FileNotFoundError):     # while held: one that opened it retries
                os.remove(out + ".lock")
            os.close(fd)
        for folder in made:                 # the folders check_outputs made, where still empty
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
# --- end shared: run-files ---


# Data (README "Data"): each split is one uint8 tensor [N, C, H, W] held on the device;
# batches are indexed from it and augmented there (no DataLoader in the hot path).

# --- shared: data ---
# What torchvision looks for under --data-dir (named in the error when it is missing); the IDX
# datasets' four files may also lie directly in --data-dir, the layout of Debian's package.
IDX_FILES = ", ".join(f"{s}-{k}-ubyte.gz" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1"))
TORCHVISION = {  # --data -> (its torchvision.datasets class, the files that class expects)
    "cifar10": ("CIFAR10", "cifar-10-batches-py/ (data_batch_1..5, test_batch), or cifar-10-python.tar.gz"),
    "cifar100": ("CIFAR100", "cifar-100-python/ (train, test, meta), or cifar-100-python.tar.gz"),
    "svhn": ("SVHN", "train_32x32.mat and test_32x32.mat (loading them needs scipy)"),
    "fashion-mnist": ("FashionMNIST", f"{IDX_FILES} (directly, or under FashionMNIST/raw/); on Debian `apt-get "
                      "install dataset-fashion-mnist` puts them in /usr/share/datasets/fashion-mnist"),
    "mnist": ("MNIST", f"{IDX_FILES} (directly, or under MNIST/raw/)"),
}


class DataError(Exception):
    """A dataset that cannot be found or read; main() turns it into exit code 2."""


def _download(name, root, **split):
    """torchvision's dataset `name` from root, downloaded there when it is missing."""
    import torchvision
    existed = os.path.exists(root)
    try:
        return getattr(torchvision.datasets, TORCHVISION[name][0])(root, download=True, **split)
    except Exception as e:  # no network, a proxy, a corrupt archive, scipy missing: all end here
        if not existed and os.path.isdir(root) and not os.listdir(root):
            os.rmdir(root)                          # the download's empty folder: nothing written
        raise DataError(
            f"{name} is not in {os.path.abspath(root)} and could not be downloaded ({type(e).__name__}: "
            f"{' '.join(str(e).split())}). torchvision expects there: {TORCHVISION[name][1]}. Put the files there "
            f"(--data-dir PATH), or use your own images with --data folder --data-dir DIR, DIR holding "
            f"train/<class>/*.png and test/<class>/*.png.") from None


def _load_torchvision(name, root, train):
    """CIFAR10/100, SVHN -> uint8 [N, 3, 32, 32], labels, torchvision's class names."""
    if name == "svhn":                                              # ds.data: [N, 3, 32, 32], digits
        ds = _download(name, root, split="train" if train else "test")
        return torch.from_numpy(ds.data), torch.from_numpy(ds.labels), [str(c) for c in range(10)]
    ds = _download(name, root, train=train)                          # ds.data: [N, 32, 32, 3]
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2), torch.tensor(ds.targets), ds.classes


def _read_idx(path):
    """One IDX file (LeCun's MNIST format, optionally gzipped) -> uint8 tensor: a 4-byte magic
    (0, 0, type 0x08 = uint8, number of dimensions n), n big-endian int32 sizes, the data."""
    import gzip
    try:                                                            # not gzip, cut short, unreadable
        with open(path, "rb") as f:
            raw = gzip.decompress(f.read()) if path.endswith(".gz") else f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path} ({type(e).__name__}: {' '.join(str(e).split())})") from None
    if len(raw) < 4 or raw[:3] != b"\0\0\x08":
        raise DataError(f"{path} is not an IDX file of uint8 (MNIST format)")
    start = 4 + 4 * raw[3]
    dims = [int.from_bytes(raw[i:i + 4], "big") for i in range(4, start, 4)]
    if len(raw) < start + int(np.prod(dims)):
        raise DataError(f"{path} is truncated: its header promises {dims}")
    return torch.from_numpy(np.frombuffer(raw, np.uint8, int(np.prod(dims)), start).copy()).reshape(dims)


def _load_idx(name, root, train):
    """Fashion-MNIST / MNIST: the split's images and labels IDX files, read where they lie
    (directly in --data-dir, the Debian layout, else under torchvision's <Class>/raw/; gzipped
    first), else downloaded by torchvision.  -> uint8 [N, 1, 28, 28] (one grey channel), labels,
    torchvision's class names."""
    import torchvision
    folder = TORCHVISION[name][0]
    stems = [f"{'train' if train else 't10k'}-{kind}-ubyte" for kind in ("images-idx3", "labels-idx1")]
    paths = [[os.path.join(w, s + e) for w in (root, os.path.join(root, folder, "raw")) for e in (".gz", "")]
             for s in stems]
    if not all(any(map(os.path.isfile, p)) for p in paths):
        _download(name, root, train=train)                          # into torchvision's own layout
    images, labels = (_read_idx(next(filter(os.path.isfile, p))) for p in paths)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{name} files in {root} disagree: images {list(images.shape)}, "
                        f"labels {list(labels.shape)}")
    return images[:, None], labels.long(), list(getattr(torchvision.datasets, folder).classes)


def _load_folder(name, root, train):
    """ImageFolder split -> uint8 [N, C, H, W]; samples interleaved round-robin over classes
    (class 0 #0, class 1 #0, ..., class 0 #1, ...) so that --limit N keeps every class."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, pil_loader
    from torchvision.transforms.functional import pil_to_tensor
    split = os.path.join(root, "train" if train else "test")
    if not os.path.isdir(split):
        raise DataError(f"--data folder needs {os.path.abspath(split)}/<class>/<image> "
                        f"(ImageFolder layout, train/ and test/ with the same class folders)")
    # torchvision's ImageFolder order (classes and files sorted), but links to folders inside a
    # class folder are not followed: a link to its parent turned 60 images into 3,260
    classes = sorted(e.name for e in os.scandir(split) if e.is_dir())
    walks = [sorted(os.walk(os.path.join(split, c))) for c in classes]
    files = [[os.path.join(d, f) for d, _, names in walk for f in sorted(names) if f.lower().endswith(IMG_EXTENSIONS)]
             for walk in walks]
    links = [os.path.join(d, s) for walk in walks for d, subs, _ in walk for s in subs]
    links = [path for path in links if os.path.islink(path)]
    if links:
        print(f"note: {len(links)} link(s) to folders inside the class folders not followed: {links[0]}", flush=True)
    empty = [c for c, paths in zip(classes, files) if not paths]
    if not classes or empty:
        raise DataError(f"cannot read the image folder {split}: no class folder, or no image "
                        f"({', '.join(IMG_EXTENSIONS)}) in {empty}")
    samples = sorted((i, label, path) for label, paths in enumerate(files) for i, path in enumerate(paths))
    images = []
    for _, _, path in samples:
        try:                                                        # a truncated or foreign file
            images.append(pil_to_tensor(pil_loader(path)))          # [3, H, W] (RGB)
        except Exception as e:
            raise DataError(f"cannot read the image {path} ({type(e).__name__}: "
                            f"{(str(e).splitlines() or [''])[0][:100]}); replace or remove it") from None
        if images[-1].shape != images[0].shape:
            raise DataError(f"all images must have one size: {path} is {tuple(images[-1].shape[1:])}, "
                            f"the first was {tuple(images[0].shape[1:])}")
    return torch.stack(images), torch.tensor([label for _, label, _ in samples]), classes


def load_split(name, root, train, limit=None):
    """-> (images uint8 [N, C, H, W] on the CPU, labels int64 [N], class names)."""
    load = {"folder": _load_folder, "fashion-mnist": _load_idx, "mnist": _load_idx}.get(name, _load_torchvision)
    images, labels, classes = load(name, root, train)
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(classes):
        raise DataError(f"the {'train' if train else 'test'} labels of {name} in {root} lie in "
                        f"[{int(labels.min())}, {int(labels.max())}], outside the {len(classes)} "
                        f"classes: a damaged file; replace it")
    return images[:limit].contiguous(), labels[:limit], classes


def to_float(x_uint8):
    """uint8 [0, 255] -> float [0, 1]: the input space of every model and attack here."""
    return x_uint8.float().div_(255)
# --- end shared: data ---

# --- shared: train-data ---
def load_data(name, root, limit=None):
    """Both splits plus the `data` entry of the checkpoint (README "Where results and checkpoints go")."""
    train_x, train_y, classes = load_split(name, root, True, limit)
    test_x, test_y, test_classes = load_split(name, root, False, limit)
    if test_classes != classes:
        raise DataError(f"train/ and test/ hold different classes: {classes} vs {test_classes}")
    # App. A "Pre-processing": channel-wise mean/std of the training split, applied inside the
    # model (its first layer) so that inputs and epsilons stay in [0, 1] pixel units.
    pixels = train_x.double().div_(255).transpose(0, 1).reshape(train_x.shape[1], -1)
    info = {"name": name, "num_classes": len(classes), "classes": classes, "mean": pixels.mean(1).tolist(),
            "std": pixels.std(1).tolist(), "image_size": list(train_x.shape[2:])}
    return (train_x, train_y), (test_x, test_y), info


def check_against_data(args, info):
    """The flags the loaded data bounds, one line and exit 2: --crop by the image side, --D by
    the --K x classes centres the run fits."""
    if not 0 <= args.crop <= min(info["image_size"]):
        fail(f"--crop {args.crop} must be in [0, {min(info['image_size'])}] (the image side); App. A pads 4")
    if getattr(args, "D", None) is not None and args.D > args.K * info["num_classes"]:
        fail(f"--D {args.D} exceeds the --K x classes = {args.K * info['num_classes']} centres this "
             f"run fits; give --D at most that")


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
# --- end shared: train-data ---


# --- shared: checkpoint-load ---
FORMAT = "clustr/1"


STAGES = ("nominal", "magnet", "qtrades-magnet", "qtrades-ce")


# The entries every reader takes (README "Where results and checkpoints go"); test_all.py checks that each
# stage writes them with the types the readers expect.
REQUIRED = {"format": (), "stage": (), "arch": ("name", "width", "feat_dim", "in_channels"),
            "data": ("name", "num_classes", "classes", "mean", "std", "image_size"), "model": (), "args": (),
            "epoch": (), "metrics": ()}


class CheckpointError(Exception):
    """A checkpoint that cannot be used (missing, empty, truncated, pickled code, another format,
    the wrong stage, a missing entry, NaN weights); str(e) is one line naming the file and the fix."""


def read_checkpoint(path, stages=STAGES):
    """torch.load with weights_only=True (never unsafe loading), then the format, the stage, the
    entries every reader takes and finite weights; any problem raises CheckpointError (the form to
    call from Python)."""
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): a copy or a run that did not finish "
                              f"writing it; copy it again or give another file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # weights_only refusal (pickled code), truncated or corrupt zip
        code = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(e))
        first = next((l.strip()[:100] for l in str(e).splitlines() if l.strip() and not l.startswith(
            ("Weights only load failed", "Please file an issue", "Check the documentation"))), "")
        raise CheckpointError(f"checkpoint {path} " + (
            f"holds pickled code ({code.group(1)}) that weights_only=True refuses (not loaded): not a "
            f"clustr checkpoint, or an untrusted one" if code else
            f"is truncated or corrupt ({type(e).__name__}{': ' + first if first else ''})")) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint (written by another program or version)")
    missing = [k for k in REQUIRED if k not in ckpt]
    missing += [f"{k}[{s!r}]" for k, subs in REQUIRED.items() if k in ckpt for s in subs
                if not isinstance(ckpt[k], dict) or s not in ckpt[k]]
    missing += ["clusters"] if ckpt.get("stage") in ("magnet", "qtrades-magnet") and "clusters" not in ckpt else []
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: not a checkpoint of these "
                              f"stages, or a damaged one")
    if ckpt["stage"] not in stages:
        raise CheckpointError(f"{path} is a '{ckpt['stage']}' checkpoint; this command needs one of {list(stages)}")
    bad = nonfinite({"model": ckpt["model"], "clusters": ckpt.get("clusters")})
    if bad:
        raise CheckpointError(f"checkpoint {path}: {bad} holds NaN or inf (a diverged run or a damaged "
                              f"file); use an earlier checkpoint")
    bad = damaged(ckpt)
    if bad:
        raise CheckpointError(f"checkpoint {path}: {bad} is not what the stages write (type, shape or range): "
                              f"a damaged or hand-made file; use another")
    return ckpt


def damaged(ckpt):
    """The first entry a reader would misuse (a wrong type, shape or range), else None: a damaged file
    stops here, not in a traceback deep inside a stage, nor in a figure computed from it."""
    a, d, k = ckpt["arch"], ckpt["data"], ckpt.get("clusters")
    count = lambda v, low=1: type(v) is int and v >= low                        # noqa: E731 (bool is no count)
    entries = {
        "arch['width']": lambda: count(a["width"]) and a["feat_dim"] == 8 * a["width"] and count(a["in_channels"]),
        "data['classes']": lambda: count(d["num_classes"]) and len(d["classes"]) == d["num_classes"],
        "data['mean'], data['std']": lambda: all(len(d[s]) == a["in_channels"] and min(d[s]) > -math.inf
                                                 for s in ("mean", "std")) and min(d["std"]) > 0,
        "data['image_size']": lambda: len(d["image_size"]) == 2 and all(count(v) for v in d["image_size"]),
        "model, args, epoch, log": lambda: all(torch.is_tensor(v) for v in ckpt["model"].values())
        and isinstance(ckpt["args"], dict) and count(ckpt["epoch"], 0)
        and all(isinstance(r, dict) for r in ckpt.get("log", [])),
        "clusters['centers']": lambda: k is None or k["centers"].dim() == 2 and k["centers"].shape[1] == a["feat_dim"],
        "clusters['center_classes']": lambda: k is None or k["center_classes"].dtype == torch.long
        and k["center_classes"].shape == k["centers"].shape[:1]
        and 0 <= int(k["center_classes"].min()) <= int(k["center_classes"].max()) < d["num_classes"],
        "clusters['variance']": lambda: k is None or type(k["variance"]) in (int, float) and k["variance"] > 0,
        "clusters['D']": lambda: k is None or k.get("D") is None or count(k["D"]),
    }
    for key, fine in entries.items():
        try:
            if not fine():
                return key
        except Exception:                   # a wrong type or a missing key is the same damage
            return key
    return None


def nonfinite(obj, key=""):
    """The key (e.g. model['conv1.weight']) of the first tensor or number in obj that holds NaN or
    inf, else None: every model is checked on load and before every save."""
    if isinstance(obj, dict):
        return next(filter(None, (nonfinite(v, f"{key}[{k!r}]" if key else k) for k, v in obj.items())), None)
    if torch.is_tensor(obj) and obj.is_floating_point():
        return None if bool(torch.isfinite(obj).all()) else key
    return key if isinstance(obj, float) and not math.isfinite(obj) else None

# --- end shared: checkpoint-load ---

# --- shared: checkpoint-cli ---
def load_checkpoint(path, stages=STAGES):
    """The command-line form of read_checkpoint: a bad file exits with code 2 and its one-line
    message (README "Bad input and safety")."""
    try:
        return read_checkpoint(path, stages)
    except CheckpointError as e:
        fail(str(e))
# --- end shared: checkpoint-cli ---

# --- shared: checkpoint-save ---
def save_checkpoint(ckpt, path, run=None):
    """Atomic write (atomic_write), so an interrupted run always leaves the last complete checkpoint;
    then, for a training stage, <path>.log.jsonl rewritten from the epochs' records the checkpoint holds
    (README "Where results and checkpoints go") and `run` told the epoch it holds.  A model with NaN or
    inf is not written, nor is anything on a failed write (a full disk): one line, exit 2, the previous
    files as they were.  Ctrl-C and SIGTERM wait until the files and `run` agree, then are raised again
    (a signal mask would not do: torch's threads would take the signal)."""
    bad = nonfinite({k: ckpt[k] for k in ("model", "clusters") if k in ckpt})
    if bad:
        fail(f"{bad} holds NaN or inf: training diverged (try a smaller --lr); stopped without "
             f"writing {path}, which keeps its last good epoch")
    caught = []
    try:
        held = {s: signal.signal(s, lambda signum, frame: caught.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:                                              # not the main thread
        held = {}
    try:
        data = io.BytesIO()
        torch.save(ckpt, data)
        atomic_write(path, data.getvalue())
        if "log" in ckpt:
            atomic_write(path + ".log.jsonl", "".join(json_line(r) for r in ckpt["log"]).encode())
        if run is not None:
            run.update(epoch=ckpt["epoch"], file=path)
    except OSError as e:
        fail(f"cannot write {e.filename or path} ({e.strerror or e}); each file is as it was or whole (free "
             f"space or choose another path, then continue with --resume where it is a checkpoint)")
    finally:
        for s, handler in held.items():
            signal.signal(s, handler)
        for s in caught[:1]:
            signal.raise_signal(s)
# --- end shared: checkpoint-save ---

# --- shared: training ---
def load_weights(model, state, path):
    """model.load_state_dict(state, strict=True); a mismatch is one line naming the file (exit 2)."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        fail(f"the weights in {path} do not fit this ResNet18 ({' '.join(str(e).split())[:200]}); not a "
             f"checkpoint of these stages, or a damaged one")


def device_data(args, device):
    """Both splits of --data (README "Data"), checked against the flags they bound, each moved whole
    onto the device."""
    try:
        train, test, info = load_data(args.data, args.data_dir, args.limit)
    except DataError as e:
        fail(str(e))
    check_against_data(args, info)
    return tuple(t.to(device) for t in train), tuple(t.to(device) for t in test), info


def resume(path, ckpt, args, not_shaping, run, info, model, opt, generator):
    """--resume: refuse a run whose run-shaping arguments differ from the stored run's (listing them),
    then weights, optimizer and RNG state from `ckpt`.  --epochs may grow, also past a finished run (as
    timm's resume allows): the epochs already done stay as they were; fewer than it holds is refused.
    -> `info` with the checkpoint's normalisation (the model's buffers)."""
    old, new = ckpt["args"], vars(args)
    if new["epochs"] < ckpt["epoch"]:
        fail(f"cannot resume: the checkpoint already holds {ckpt['epoch']} epochs, more than "
             f"--epochs {new['epochs']}; pass --epochs {ckpt['epoch']} or more")
    if new["epochs"] == ckpt["epoch"] and os.path.abspath(path) != os.path.abspath(args.out):
        fail(f"nothing to train: {path} holds all {ckpt['epoch']} epochs, so --out {args.out} would "
             f"not be written; raise --epochs to continue the run into it")
    diff = [f"--{k.replace('_', '-')}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if k not in not_shaping and k != "epochs" and old.get(k) != new.get(k)]
    if diff:
        fail("cannot resume: arguments that shape the run differ from the checkpoint's: " + "; ".join(diff))
    if "resume" not in ckpt:
        fail(f"{path} was saved with --slim and holds no optimizer/RNG state to resume from")
    load_weights(model, ckpt["model"], path)
    opt.load_state_dict(ckpt["resume"]["optimizer"])
    torch.set_rng_state(ckpt["resume"]["rng"]["torch"])
    if ckpt["resume"]["rng"]["generator_device"] == str(generator.device):
        generator.set_state(ckpt["resume"]["rng"]["generator"])
    else:  # a CPU generator state cannot seed a CUDA generator: the stream changes from here on
        print(f"note: the run moved from {ckpt['resume']['rng']['generator_device']} to {generator.device}; "
              f"its random stream continues from a fresh seed", flush=True)
    if "log" not in ckpt:   # written before the log moved into the checkpoint: its log file's records
        ckpt["log"] = []
        with contextlib.suppress(OSError), open(path + ".log.jsonl") as f:
            for line in f:
                with contextlib.suppress(ValueError):               # a line cut short
                    ckpt["log"] += [r for r in [json.loads(line)] if isinstance(r, dict) and
                                    r.get("epoch", -1) <= ckpt["epoch"]]
        ckpt["log"] = ckpt["log"] or [ckpt["metrics"]]
    run.update(epoch=ckpt["epoch"], file=path)
    print(f"resumed {path} at epoch {ckpt['epoch']}/{args.epochs}")
    return dict(info, mean=ckpt["data"]["mean"], std=ckpt["data"]["std"])


def check_loss(loss, epoch, run, hint):
    """A training loss that became NaN or inf stops the run before the epoch is written: one line."""
    if not math.isfinite(loss):
        fail(f"the training loss became {loss} in epoch {epoch + 1}; stopped without writing it, "
             + (f"so {run['file']} keeps the last good epoch ({epoch})" if run["file"] else
                "so nothing of this run was saved") + f". Try a smaller {hint}.")


def build_training(args, info, num_classes, device, init_state=None):
    """The ResNet18 of App. A "Architecture" (num_classes 0: headless, Sec. 3.3) with --init's weights,
    --compile's f(x), Adam (App. A "Optimization") and the seeded device generator that draws every
    permutation, crop, flip, k-means++ seed and quick adversary of the run."""
    model = ResNet18(num_classes, args.width, len(info["mean"]), info["mean"], info["std"])
    if init_state is not None:
        load_weights(model, init_state, args.init)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    compile_features(model, args.compile)                           # --compile: f(x) compiled in place
    generator = torch.Generator(device=device)
    generator.manual_seed(args.seed)
    return model, torch.optim.Adam(model.parameters(), lr=args.lr), generator


def save_epoch(run, stage, args, info, model, log, state, **entries):
    """The checkpoint of the epoch log[-1] records (README "Where results and checkpoints go"): the
    weights, the run's arguments, the records of every epoch so far (the log is rewritten from them)
    and `entries` (None ones left out); the resume state of `state` ({"optimizer", "generator", "sampler"}:
    the optimizer's, the RNGs', the sampler's unless None) unless --slim and it is the final epoch."""
    ckpt = {"format": FORMAT, "stage": stage, "arch": arch_entry(args.width, model.mean.shape[1]), "data": info,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "args": dict(vars(args)),
            "epoch": log[-1]["epoch"], "metrics": log[-1], "log": log,
            **{k: v for k, v in entries.items() if v is not None}}
    if not (args.slim and ckpt["epoch"] == args.epochs):
        ckpt["resume"] = {"optimizer": state["optimizer"].state_dict(),
                          "rng": {"torch": torch.get_rng_state(), "generator": state["generator"].get_state(),
                                  "generator_device": str(state["generator"].device)},
                          **{k: v.state_dict() for k, v in state.items() if k not in ("optimizer", "generator")
                             and v is not None}}
    save_checkpoint(ckpt, args.out, run)


def arch_entry(width, in_channels):
    return {"name": "resnet18", "width": width, "feat_dim": 8 * width, "in_channels": in_channels}
# --- end shared: training ---


# --- shared: init-check ---
def read_init(args, stages):
    """--init (None when resuming or without it): a checkpoint of `stages` whose width and dataset are
    the run's, read before any data is loaded."""
    init = load_checkpoint(args.init, stages) if args.init is not None and args.resume is None else None
    for key, have in (("width", init and init["arch"]["width"]), ("data", init and init["data"]["name"])):
        if init and have != getattr(args, key):
            fail(f"--init {args.init} was trained with --{key} {have}, but this run has --{key} "
                 f"{getattr(args, key)}; pass --{key} {have}")
    return init


def check_init_data(init, info, channels, args):
    """At least 2 classes (Eq. (3) and the clusters' classes need them); the --init model must have seen
    the same classes and image channels.  -> info with --init's normalisation (the model's buffers)."""
    if info["num_classes"] < 2:
        fail(f"clusters of different classes (Eq. (3)) need at least 2 classes; {args.data} has {info['num_classes']}")
    if init and init["data"]["classes"] != info["classes"]:
        fail(f"--init {args.init} was trained on the classes {init['data']['classes']}, but this "
             f"run's data has {info['classes']}")
    if init and init["arch"].get("in_channels") != channels:
        fail(f"--init {args.init} takes {init['arch'].get('in_channels')}-channel images, the data has {channels}")
    return dict(info, mean=init["data"]["mean"], std=init["data"]["std"]) if init else info


def defaults_from_init(args):
    """--data, --width and --data-dir left unset take those of the checkpoint the run starts from
    (--init, or the one --resume continues; its data folder when it was stored absolute, exists,
    and --data is the checkpoint's), else cifar10, 64 and ./data: `python magnet.py --init
    ckpt.pt` runs as nominal.py prints it, on the images nominal.py read."""
    source = (args.resume or args.out) if args.resume is not None else args.init
    if source is not None and None in (args.data, args.width, args.data_dir):
        ckpt = load_checkpoint(source)
        stored = ckpt["args"].get("data_dir")
        if args.data in (None, ckpt["data"]["name"]) and isinstance(stored, str) and os.path.isabs(stored) \
                and os.path.isdir(stored):
            args.data_dir = args.data_dir or stored
        args.data = args.data or ckpt["data"]["name"]
        args.width = args.width or ckpt["arch"]["width"]
    args.data, args.width, args.data_dir = args.data or "cifar10", args.width or 64, args.data_dir or "./data"
# --- end shared: init-check ---


# --- shared: next-attack ---
def next_command(args):
    """The evaluation of this checkpoint, runnable as printed: attack.py takes --data, --width
    and the data folder from the checkpoint; --limit is passed on."""
    cmd = ["python", "attack.py", "--ckpt", args.out] + (["--limit", str(args.limit)] if args.limit else [])
    return " ".join(shlex.quote(a) for a in cmd)
# --- end shared: next-attack ---



if __name__ == "__main__":
    main()
