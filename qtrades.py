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
import fcntl
import json
import math
import os
import random
import re
import shlex
import signal
import sys
import time
import types

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

# --- shared: args ---
def add_common_args(p, data_default):
    """Flags every stage shares, in the same order everywhere (README "Flags")."""
    g = p.add_argument_group("common")
    g.add_argument("--data", choices=["cifar10", "cifar100", "svhn", "fashion-mnist", "mnist", "folder"], default=data_default,
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
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, not {text}")
    return value


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
    (defaults_table); that table's blocks keep their layout, the other text is wrapped."""
    per_data = ()

    def _get_help_string(self, action):
        if action.default is None:                                  # set at run time: say by what
            text = action.help.replace(" (default: %(default)s)", "")
            return f"{text} (default: per --data, table below)" if action.dest in self.per_data else text
        return super()._get_help_string(action)

    def _expand_help(self, action):
        """Defaults that are k/255 shown as a user writes them: 8/255, not 0.03137254901960784."""
        def shown(v):
            k = v * 255 if isinstance(v, float) else None
            return f"{k:g}/255" if k is not None and len(repr(v)) > 8 and abs(k - round(k, 1)) < 1e-9 else v
        if isinstance(action.default, (float, list)):
            value = action.default
            action = argparse.Action(action.option_strings, action.dest, help=action.help,
                                     default=" ".join(str(shown(v)) for v in value) if isinstance(value, list)
                                     else shown(value))
        return super()._expand_help(action)

    def _fill_text(self, text, width, indent):
        return "\n\n".join(block if block.startswith("  ") else super(HelpFormatter, self)._fill_text(block, width, indent)
                           for block in text.split("\n\n"))
# --- end shared: help ---

# --- shared: train-args ---
def parse_lr(text):
    """argparse type of --lr: a finite number in (0, 1].  Adam moves every weight by about lr per
    step; App. A's rates are 1e-2 and 1e-4, and above 1 the weights only overflow."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], not {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= 1):
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (App. A: 1e-2 nominal, 1e-4 "
                                         f"fine-tuning), not {text}")
    return value


def add_overwrite_arg(g):
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out checkpoint and its log; both stay as they are "
                        "until this run saves its first epoch. Without it an existing --out is "
                        "refused (continue it with --resume)")


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
        epilog="--data and --width default to those of --init (or of the checkpoint --resume "
               "continues), else cifar10 and 64.\n\n" + table,
        formatter_class=formatter)
    add_common_args(p, data_default=None)
    p.set_defaults(width=None)  # None: --init's (or --resume's) width, else 64 (defaults_from_init)
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
    g.add_argument("--eps", type=parse_fraction, default=8 / 255,
                   help="L-inf radius of the quick adversary in [0,1] pixel units (8/255 accepted); "
                        "Sec. 4.2: 8/255")
    g.add_argument("--step", type=parse_fraction, default=10 / 255,
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
    g.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue an interrupted run from PATH (default: --out); refused when the "
                        "arguments that shape the run differ")
    add_overwrite_arg(g)
    g.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop cleanly after epoch N, as if interrupted (for --resume)")
    g.add_argument("--slim", action="store_true",
                   help="drop optimizer/sampler/RNG state from the final checkpoint (no resume)")
    add_compile_arg(g)


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
# 4. The loop: load -> build -> resume or evaluate the start -> epochs -> report; the two
#    variants (--loss magnet, --loss ce) differ only in the three steps `variant_steps` picks
#    (checkpoint and report: README "Where results and checkpoints go")
# ======================================================================================

SAMPLER_SEED_OFFSET = 7919  # the sampler's CPU generator: seed + this (a stream apart from the device one)


def main(argv=None):
    """QTRADES (Sec. 4.2, Eq. (6)) as a run: arguments, --init, data, the model, the starting point
    (epoch 0), the epochs of App. A, the summary.  Wrapped by `guarded` below (Ctrl-C / SIGTERM:
    one line, exit 130; the lock released)."""
    args = parse_args(argv)
    preflight(args, training=True)      # folder, lock, no clobber: before any work
    device = setup_runtime(args, training=True)
    init = init_state = None
    if args.init is not None and args.resume is None:
        init, init_state = load_init(args.init, args)              # checked before any data load
    train, test, info = load_device_data(args, init, device)
    run = build_training(args, train, test, info, init_state, device)
    print_header(run)
    if args.resume is not None:
        start_epoch, metrics = resume_training(run)
    else:
        start_epoch, metrics = evaluate_the_start(run)
    metrics = train_epochs(run, start_epoch, metrics)
    return report(run, metrics)


def load_device_data(args, init, device):
    """Step 1: both splits of --data (README "Data"), checked against --init's classes, each moved
    whole onto the device."""
    try:
        train, test, info = load_data(args.data, args.data_dir, args.limit)
    except DataError as e:
        fail(str(e))
    check_against_data(args, info)
    if info["num_classes"] < 2:
        fail(f"QTRADES needs at least 2 classes; {args.data} has {info['num_classes']}")
    if init is not None:
        check_init_classes(init, info, train[0].shape[1], args.init)
        # the model keeps the starting run's App. A normalisation buffers; record those
        info = dict(info, mean=init["data"]["mean"], std=init["data"]["std"])
    train = tuple(t.to(device) for t in train)                      # whole split on the device
    test = tuple(t.to(device) for t in test)
    return train, test, info


def build_training(args, train, test, info, init_state, device):
    """Step 2: the ResNet18 (headless for --loss magnet, Sec. 3.3; with its head for --loss ce),
    Adam of App. A, the seeded device generator, the neighbourhood sampler (magnet) and the
    variant's steps.  -> the run's state, one namespace the steps share."""
    magnet = args.loss == "magnet"
    num_classes = info["num_classes"]
    # magnet: Sec. 3.3, the network without its last linear layer; ce: the nominal network
    model = ResNet18(0 if magnet else num_classes, args.width, train[0].shape[1], info["mean"], info["std"])
    if init_state is not None:
        model.load_state_dict(init_state, strict=True)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    compile_features(model, args.compile)                           # --compile: f(x) compiled in place
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)          # App. A: Adam, lr 1e-4
    generator = torch.Generator(device=device)                      # augmentation, k-means++, x'
    generator.manual_seed(args.seed)
    sampler = NeighbourhoodSampler(len(train[1]), args.m, args.d,
                                   torch.Generator().manual_seed(args.seed + SAMPLER_SEED_OFFSET)
                                   ) if magnet else None
    start, train_epoch, evaluate_epoch = variant_steps(args.loss)
    return types.SimpleNamespace(
        args=args, device=device, train=train, test=test, info=info, num_classes=num_classes,
        log_path=args.out + ".log.jsonl", model=model, opt=opt, generator=generator,
        sampler=sampler, clusters=None, t_run=time.time(), start=start, train_epoch=train_epoch,
        evaluate_epoch=evaluate_epoch,
        header=(f"{'epoch':>9} {'loss':>8} {'consist':>8} {'train':>7} {'test':>7} {'sigma2':>9} "
                f"{'img/s':>8} {'elapsed':>9} {'ETA':>9}"))


def variant_steps(loss):
    """The three steps in which the variants differ: (the starting point's metrics, one training
    epoch, the metrics after an epoch)."""
    if loss == "magnet":
        return start_magnet, train_epoch_magnet, evaluate_epoch_magnet
    return start_ce, train_epoch_ce, evaluate_epoch_ce


def cluster_and_evaluate(run, epoch):
    """--loss magnet: k-means++ update (App. A), sigma^2 (Eq. (3)), Eq. (4) accuracies."""
    args = run.args
    t0 = time.time()
    centers, center_classes, assignment, sigma2, train_acc = update_clusters(
        run.model, run.train, run.num_classes, args, run.generator)
    test_features = features_of(run.model, run.test[0], args.batch_size, args.amp)
    test_acc = eq4_accuracy(test_features, run.test[1], centers, center_classes, sigma2, args.D)
    run.sampler.set_clusters(assignment, centers, center_classes)
    clusters = clusters_entry(centers, center_classes, sigma2, args)
    return clusters, {"epoch": epoch, "train_accuracy": train_acc, "test_accuracy": test_acc,
                      "variance": float(sigma2), "cluster_seconds": time.time() - t0}


def start_magnet(run):
    """--loss magnet, epoch 0: the clusters of the starting features and their Eq. (4) accuracies."""
    run.clusters, metrics = cluster_and_evaluate(run, 0)
    return metrics


def train_epoch_magnet(run):
    """--loss magnet: one epoch of Eq. (6) on neighbourhood batches.  -> (loss, consistency,
    images, None: the train accuracy comes from the cluster update)."""
    train_loss, cons, seen = train_one_epoch(run.model, run.opt, run.train, run.sampler, run.clusters,
                                             run.args, run.generator, run.device)
    return train_loss, cons, seen, None


def evaluate_epoch_magnet(run, epoch, train_acc):
    """--loss magnet, after an epoch: the k-means++ update and Eq. (4) accuracies."""
    run.clusters, metrics = cluster_and_evaluate(run, epoch)
    metrics["batches"] = run.sampler.batches_per_epoch()
    return metrics


def start_ce(run):
    """--loss ce, epoch 0: the linear head's accuracies on both splits."""
    args = run.args
    return {"epoch": 0, "train_accuracy": evaluate(run.model, run.train, args.batch_size, args.amp, run.device),
            "test_accuracy": evaluate(run.model, run.test, args.batch_size, args.amp, run.device)}


def train_epoch_ce(run):
    """--loss ce: one epoch of cross-entropy plus the consistency term on the head's softmax.
    -> (loss, consistency, images, train accuracy)."""
    train_loss, cons, train_acc, seen = train_one_epoch_ce(run.model, run.opt, run.train, run.args,
                                                           run.generator, run.device)
    return train_loss, cons, seen, train_acc


def evaluate_epoch_ce(run, epoch, train_acc):
    """--loss ce, after an epoch: the head's test accuracy (the train one is the epoch's own)."""
    args = run.args
    return {"epoch": epoch, "train_accuracy": train_acc,
            "test_accuracy": evaluate(run.model, run.test, args.batch_size, args.amp, run.device)}


def print_header(run):
    """Step 3: what runs (variant, data, model, --init, Eq. (6)'s lam, eps, step, device, torch)
    and the resolved config."""
    args = run.args
    print(f"qtrades.py | {'ClusTR+QTRADES' if args.loss == 'magnet' else 'QTRADES alone'} (--loss {args.loss}) | "
          f"data {args.data} ({len(run.train[1])} train, {len(run.test[1])} test, {run.num_classes} classes, "
          f"{run.info['image_size']}) | ResNet18 w={args.width} | init {args.init or 'random'} | "
          f"lam {args.lam} eps {args.eps:.5f} step {args.step:.5f} | device {run.device} amp {args.amp} "
          f"| torch {torch.__version__}")
    print("config: " + json.dumps(vars(args)))


def report_epoch(run, record, elapsed, eta):
    """One row of the epoch table."""
    loss, cons = record["train_loss"], record.get("consistency")
    print(f"{record['epoch']:>4}/{run.args.epochs:<4} {'-' if loss is None else f'{loss:.4f}':>8} "
          f"{'-' if cons is None else f'{cons:.4f}':>8} "
          f"{record['train_accuracy']:7.2%} {record['test_accuracy']:7.2%} "
          f"{record['variance'] if 'variance' in record else '-':>9.3} "
          f"{record.get('images_per_second', 0):8.0f} "
          f"{fmt_time(elapsed):>9} {fmt_time(eta):>9}", flush=True)


def resume_training(run):
    """Step 4a (--resume): weights, optimizer, RNG state and (magnet) the sampler's state and the
    clusters from the checkpoint.  -> (the epoch it holds, its metrics)."""
    args = run.args
    path = args.resume or args.out
    ckpt = load_checkpoint(path, stages=(STAGE[args.loss],))
    ckpt["args"].setdefault("consistency", "ce")             # runs saved before the flag
    check_resume_args(ckpt, args, NOT_SHAPING)
    if "resume" not in ckpt:
        fail(f"{path} was saved with --slim and holds no optimizer/sampler state to resume from")
    run.model.load_state_dict(ckpt["model"], strict=True)
    run.opt.load_state_dict(ckpt["resume"]["optimizer"])
    set_rng_state(ckpt["resume"]["rng"], run.generator)
    if run.sampler is not None:                              # --loss magnet
        run.sampler.load_state_dict(ckpt["resume"]["sampler"])
        run.clusters = ckpt["clusters"]
    start_epoch, metrics = ckpt["epoch"], ckpt["metrics"]
    run.info = dict(run.info, mean=ckpt["data"]["mean"], std=ckpt["data"]["std"])  # the model's buffers
    kept = [r for r in read_jsonl(run.log_path) if r.get("epoch", 0) <= start_epoch]
    with open(run.log_path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    print(f"resumed {path} at epoch {start_epoch}/{args.epochs}")
    print(run.header, flush=True)
    return start_epoch, metrics


def evaluate_the_start(run):
    """Step 4b (a fresh run): epoch 0, the starting point (magnet: the clusters of the starting
    features), saved and logged.  -> (0, its metrics)."""
    args = run.args
    print(run.header, flush=True)
    metrics = run.start(run)
    metrics = {**metrics, "train_loss": None, "consistency": None, "lr": args.lr, **compile_seconds()}
    if args.epochs == 0 or not RUN["replacing"]:   # --overwrite: old files stay until epoch 1
        save_checkpoint(make_checkpoint(run.model, run.opt, run.generator, run.sampler, run.clusters,
                                        args, run.info, 0, metrics,
                                        slim=args.slim and args.epochs == 0), args.out)
    append_jsonl(run.log_path, metrics)
    report_epoch(run, metrics, time.time() - run.t_run, 0)
    return 0, metrics


def train_epochs(run, start_epoch, metrics):
    """Step 5: the epochs of App. A: one epoch of the variant's loss, then its evaluation; each
    saved to --out and logged before the next.  -> the last epoch's metrics."""
    args = run.args
    t_loop = time.time()
    last_epoch = min(args.epochs, args.stop_after) if args.stop_after is not None else args.epochs
    for epoch in range(start_epoch, last_epoch):
        t0 = time.time()
        train_loss, cons, seen, train_acc = run.train_epoch(run)
        train_seconds = time.time() - t0
        if not math.isfinite(train_loss):
            fail(f"the training loss (Eq. (6)) became {train_loss} in epoch {epoch + 1}; stopped "
                 f"without writing it, {kept_epoch(args, epoch)}. Try a "
                 f"smaller --lr (now {args.lr}), --lam (now {args.lam})"
                 + (f" or --alpha (now {args.alpha})." if args.loss == "magnet" else "."))
        metrics = run.evaluate_epoch(run, epoch + 1, train_acc)
        metrics.update(train_loss=train_loss, consistency=cons, lr=args.lr,
                       seconds=time.time() - t0, images_per_second=seen / train_seconds,
                       **compile_seconds())
        final = epoch + 1 == args.epochs
        save_checkpoint(make_checkpoint(run.model, run.opt, run.generator, run.sampler, run.clusters,
                                        args, run.info, epoch + 1, metrics, slim=args.slim and final),
                        args.out)
        append_jsonl(run.log_path, metrics)
        elapsed = time.time() - t_loop
        report_epoch(run, metrics, time.time() - run.t_run,
                     elapsed / (epoch + 1 - start_epoch) * (args.epochs - epoch - 1))
    return metrics


def report(run, metrics):
    """Step 6: the summary beside the paper's accuracies (Table 1), and the attack to run next."""
    args = run.args
    magnet = args.loss == "magnet"
    done = metrics.get("epoch", 0)
    status = "finished" if done >= args.epochs else f"stopped after epoch {done} (--resume continues)"
    results = {"stage": STAGE[args.loss], "out": args.out, "data": args.data, "init": args.init,
               "loss": args.loss, "status": status, "epochs_done": done, "epochs": args.epochs,
               **metrics, "seconds_this_run": time.time() - run.t_run}
    rule = (f"Eq. (4) with K={args.K}, D={args.D or 'all'}  (paper, w=64: ClusTR+QTRADES 91.03 "
            f"CIFAR10, 95.06 SVHN, 69.25 CIFAR100)") if magnet else \
        "linear head  (paper, w=64: QTRADES 81.07 CIFAR10, 86.36 SVHN)"
    print(f"\nsummary: {status}\n"
          f"  test accuracy   {metrics['test_accuracy']:.2%} by {rule}\n"
          + (f"  sigma^2         {metrics['variance']:.4g} (Eq. (3), whole training split)\n"
             if magnet else "")
          + f"  consistency     {'-' if metrics.get('consistency') is None else format(metrics['consistency'], '.4f')}"
          f" (mean {'CE(p(f(x_adv)), p(f(x)))' if args.consistency == 'ce' else 'KL(p(f(x)) || p(f(x_adv)))'} of the last epoch, lam = {args.lam})\n"
          f"  checkpoint      {args.out}   log {run.log_path}\n"
          f"  next            {next_command(args)}", flush=True)
    return results


def load_init(path, args):
    """--init (width and dataset must match the run, else exit 2).  --loss magnet: a nominal checkpoint
    (head dropped, Sec. 3.3) or a magnet checkpoint (its weights; the clusters are recomputed at
    epoch 0); --loss ce: a nominal checkpoint, head kept.  -> (ckpt, state_dict for the model)."""
    ckpt = load_checkpoint(path, stages=("nominal", "magnet") if args.loss == "magnet" else ("nominal",))
    width, data = ckpt["arch"].get("width"), ckpt["data"].get("name")
    if width != args.width:
        fail(f"--init {path} holds a ResNet18 of width {width}, but this run has --width "
             f"{args.width}; pass --width {width}")
    if data != args.data:
        fail(f"--init {path} was trained on --data {data}, but this run has --data {args.data}; "
             f"pass --data {data}")
    keep_head = args.loss == "ce"
    return ckpt, {k: v for k, v in ckpt["model"].items() if keep_head or not k.startswith("head.")}


def make_checkpoint(model, opt, generator, sampler, clusters, args, info, epoch, metrics, slim=False):
    """Stage "qtrades-magnet" (no head.*, the `clusters` entry Eq. (4) needs) or
    "qtrades-ce" (head.*, no clusters).  ckpt["resume"]: optimizer, RNG and (magnet) the
    sampler's state, so --resume draws the same batches and adversaries."""
    ckpt = {"format": FORMAT, "stage": STAGE[args.loss],
            "arch": arch_entry(args.width, model.mean.shape[1]), "data": info,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "args": dict(vars(args)), "epoch": epoch, "metrics": metrics}
    if clusters is not None:
        ckpt["clusters"] = clusters
    if not slim:
        ckpt["resume"] = {"optimizer": opt.state_dict(), "rng": rng_state(generator)}
        if sampler is not None:
            ckpt["resume"]["sampler"] = sampler.state_dict()
    return ckpt


# ======================================================================================
# 5. Copied plumbing (compile, runtime, setup, run-files, data, checkpoints, resume, init,
#    next command): each block identical in every stage that carries it; checked by test_all.py
# ======================================================================================

# --- shared: compile ---
# --compile (README "Flags"): the network f(x) through torch.compile on every hot path that calls
# it (training steps, feature passes, evaluation, attack.py's forward and input gradients).
COMPILED = {}  # kind of call ("train, gradients", ...) -> seconds of its first call (it compiled)


def add_compile_arg(g):
    g.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND", type=backend,
                   help="run the network f(x) through torch.compile (BACKEND: inductor when none "
                        "is given; aot_eager: the same graphs, no generated code); the same results "
                        "as eager up to float rounding. Each kind of call (train or eval mode, with "
                        "or without gradients) compiles at its first call and first backward: their "
                        "times are printed and logged as compile_seconds. Default: eager")


def backend(name):
    """argparse type of --compile: a backend of torch.compile that needs no other package."""
    known = ("inductor", "aot_eager", "eager", "cudagraphs")          # need no other package
    if name not in known:
        raise argparse.ArgumentTypeError(f"backend {name!r} is not one of {', '.join(known)}")
    return name


def compile_features(model, backend):
    """--compile BACKEND: model.features (f(x); forward calls it too, so the head's logits go
    through it) replaced on this instance by its torch.compile form, so that the module, its
    state_dict keys and the checkpoint stay those of eager.  The batch dimension of the first
    call is marked dynamic (torch._dynamo.mark_dynamic, torch's documented switch for one
    dimension), so a smaller last batch and attack batches that shrink as examples are fooled
    reuse the graph: each kind of call (train or eval mode, with or without gradients) compiles
    once (with torch's default, a second batch size compiles again, mid-epoch; with dynamic=True
    every dimension is symbolic and tracing took 3x longer here).  Its first call and the first
    backward through it (the backward graph compiles when it first runs) are timed (synchronised
    on CUDA), printed and kept in COMPILED.  backend None: eager, nothing changes."""
    COMPILED.clear()
    if not backend:
        return model
    compiled = torch.compile(model.features, backend=backend)

    def timed(kind, t0, tensor):
        if tensor.is_cuda:
            torch.cuda.synchronize()
        COMPILED[kind] = time.time() - t0
        print(f"          compile: f(x) {kind}: first call {COMPILED[kind]:.1f} s (torch.compile, "
              f"backend {backend})", flush=True)

    def features(x):                                                # x: [B, C, H, W] in [0, 1]
        kind = ("train" if model.training else "eval") + (", gradients" if torch.is_grad_enabled() else "")
        if kind in COMPILED:
            return compiled(x)
        if x.shape[0] > 1:                                         # a batch of 1 stays specialised
            torch._dynamo.mark_dynamic(x, 0)
        t0 = time.time()
        out = compiled(x)                                           # [B, 8w]
        timed(kind, t0, out)
        if out.requires_grad:   # and the first backward: from f(x)'s gradient to its input's
            leaf = x if x.requires_grad else next(p for p in model.parameters() if p.requires_grad)
            start = []

            def begin(grad):
                start.append(time.time())

            def end(grad):
                if start and kind + ", backward" not in COMPILED:
                    timed(kind + ", backward", start[0], grad)
            out.register_hook(begin)
            leaf.register_hook(end)
        return out
    model.features = features
    return model


def compile_seconds():
    """The log and results entry of --compile: the first calls' seconds so far ({} without it)."""
    return {"compile_seconds": round(sum(COMPILED.values()), 3)} if COMPILED else {}
# --- end shared: compile ---


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


def append_jsonl(path, record):
    path = RUN.get("staged", {}).get(path, path)    # a fresh run's log waits beside the old one
    line = json.dumps(json.loads(json.dumps(record), parse_constant=lambda c: None))  # NaN, inf: null
    with open(path, "a") as f:
        f.write(line + "\n")
# --- end shared: runtime ---

# --- shared: setup ---
def pick_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for but torch sees no CUDA device "
             f"(torch {torch.__version__}); use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


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
# One run owns its --out (README "Bad input and safety"): a lock file beside it, checked before
# any work; a fresh log that waits beside the old one until the run has written --out; and a
# clean stop on Ctrl-C or SIGTERM that says what the files hold and how to continue.
RUN = {}  # this process's run: out, lock, staged log, argv, epochs held per checkpoint path


# The files a run writes, by flag, with the suffixes their writer takes (None: any), and the
# files it reads: check_outputs sees them all before any work.
OUTPUTS = {"out": None, "save_adv": None, "export": None,
           "plot": (".png", ".pdf", ".svg", ".svgz", ".eps", ".ps", ".jpg", ".jpeg", ".tif", ".tiff",
                    ".webp", ".gif", ".pgf", ".raw", ".rgba")}
INPUTS = ("ckpt", "init", "resume")


def check_outputs(args, training, keys=tuple(OUTPUTS)):
    """Every file the run will write (--out with its log, staged log and lock; --save-adv,
    --export, --plot), before any work: named, not a folder, not a file this run reads (results
    written over the checkpoint they came from), a suffix its writer takes; then its folder
    created and writable.  One line and exit 2 for the first that is not."""
    reads = {os.path.realpath(p) for p in (getattr(args, k, None) for k in INPUTS) if p}
    if training and args.resume is not None:
        reads.discard(os.path.realpath(args.out))                   # a resumed run continues --out
    paths = []
    for key in keys:
        given = getattr(args, key, None)
        if given is None or (key == "plot" and given.lower() in ("", "none")):
            continue
        flag = "--" + key.replace("_", "-")
        if not given.strip() or given.endswith((os.sep, "/")):
            fail(f"{flag} {given!r} names no file; give a file name")
        if OUTPUTS[key] and not given.lower().endswith(OUTPUTS[key]):
            fail(f"{flag} {given}: the plot is written as one of {' '.join(OUTPUTS[key])}; give one")
        for path in [given] + ([given + s for s in (".log.jsonl", ".log.jsonl.partial", ".lock")]
                               if key == "out" else []):
            if os.path.realpath(path) in reads:
                fail(f"{flag} {given} is also a file this run reads; writing it would destroy it: "
                     f"choose another {flag}")
            if os.path.isdir(path):
                fail(f"{flag} {given}: {path} is a folder; give a file name, e.g. {flag} "
                     f"{os.path.join(given, 'run.pt' if training else 'results.json')}")
            twin = next((f for f, q in paths if os.path.realpath(q) == os.path.realpath(path)), None)
            if twin:
                fail(f"{flag} {given} is also written as {twin}: one would replace the other; give two names")
            paths.append((flag, path))
    for flag, path in paths:
        folder = os.path.dirname(os.path.abspath(path))
        missing = folder
        while not os.path.exists(missing):                  # removed again if the run writes nothing
            RUN.setdefault("made", []).append(missing)
            missing = os.path.dirname(missing)
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            fail(f"cannot create the folder {folder} of {flag} ({e.strerror or e}); choose another {flag}")
        if not os.access(folder, os.W_OK):
            fail(f"cannot write in the folder {folder} of {flag}; make it writable or choose another {flag}")


def preflight(args, training):
    """Before any work (data, model): check every output (check_outputs), take <out>.lock, and
    for a training stage refuse an existing checkpoint unless --resume or --overwrite.  A fresh
    run writes its log to <out>.log.jsonl.partial; the first checkpoint (training) or the result
    file (evaluation) moves it over <out>.log.jsonl, so a run stopped before that leaves the
    previous run's files as they were."""
    out = args.out
    check_outputs(args, training)
    resume = training and args.resume is not None
    if training and not resume and os.path.exists(out) and not args.overwrite:
        fail(f"--out {out} exists (an earlier run's checkpoint); continue that run with --resume, "
             f"or replace it with --overwrite (its files stay until the new run saves its first epoch)")
    if resume and args.resume and os.path.exists(out) and not args.overwrite \
            and os.path.realpath(args.resume) != os.path.realpath(out):
        fail(f"--out {out} exists and is not the run --resume {args.resume} continues; choose another "
             f"--out, or replace it with --overwrite")
    RUN.update(out=out, training=training, resume=resume and (args.resume or out),
               replacing=training and not resume and os.path.exists(out))   # with --overwrite
    take_lock(out + ".lock")
    if not resume:
        log = out + ".log.jsonl"
        RUN["staged"] = {log: log + ".partial"}
        if os.path.exists(log + ".partial"):                        # rows of an earlier killed run
            os.remove(log + ".partial")


def take_lock(path):
    """<out>.lock, held with fcntl.flock for the life of the process: a second run on the same
    --out exits 2, and the kernel releases the lock when the process ends, however it ends (a
    killed run leaves at most the file, which the next run takes).  It holds the pid, for a person."""
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as e:
            fail(f"cannot write in the folder {os.path.dirname(os.path.abspath(path))} of --out "
                 f"({e.strerror or e}); make it writable or choose another --out")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            fail(f"another run (process {owner}) is writing {path[:-5]} now ({path}); wait for it "
                 f"to end or choose another --out")
        try:                                # the file its last holder removed meanwhile: again
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    RUN["lock"] = (path, fd)


def release_lock():
    path, fd = RUN.pop("lock", (None, None))
    if fd is not None:
        os.remove(path)                     # while held: a run that opened it meanwhile retries
        os.close(fd)
    for folder in RUN.pop("made", []):      # the folders check_outputs made, where still empty
        try:
            os.rmdir(folder)
        except OSError:
            pass


def commit_log():
    """The run has written --out: its staged log replaces the previous run's (or that one goes)."""
    for log, staged in RUN.pop("staged", {}).items():
        if os.path.exists(staged):
            os.replace(staged, log)
        elif os.path.exists(log):
            os.remove(log)


def interrupted():
    """The line printed on Ctrl-C or SIGTERM: where the run stood and the command that continues."""
    argv, out = [str(a) for a in RUN.get("argv", [])], RUN.get("out")
    script = sys.argv[0] if os.path.basename(sys.argv[0]) == os.path.basename(__file__) \
        else os.path.basename(__file__)
    again = " ".join(shlex.quote(a) for a in ["python", script, *argv])
    if out is None:
        return "interrupted before the run started; nothing was written"
    if not RUN["training"]:
        staged = next(iter(RUN.get("staged", {}).values()), None)
        return (f"interrupted; {out} and its log are as the previous run left them"
                + (f"; this run's rows so far are in {staged}" if staged and os.path.exists(staged) else "")
                + f"; run it again with: {again}")
    epochs = RUN.get("epochs", {})
    epoch = epochs.get(os.path.abspath(out), epochs.get(os.path.abspath(RUN["resume"] or out)))
    if epoch is None:
        return (f"interrupted before the first epoch was saved; nothing was written ({out} and "
                f"its log are as before); run it again with: {again}")
    argv = [a for a in argv if a != "--overwrite"]
    if not any(a == "--resume" or a.startswith("--resume=") for a in argv):
        argv.append("--resume")
    return (f"interrupted in epoch {epoch + 1}; the checkpoint holds epoch {epoch} ({out}); "
            f"continue with: " + " ".join(shlex.quote(a) for a in ["python", script, *argv]))


def guarded(main):
    """main(argv) with SIGTERM treated as Ctrl-C, an interrupt turned into one line and exit code
    130 (128 + SIGINT, the shell's convention), and the lock of --out released however it ends."""
    def run(argv=None):
        RUN.clear()
        RUN["argv"] = list(sys.argv[1:] if argv is None else argv)

        def on_sigterm(signum, frame):
            raise KeyboardInterrupt
        try:
            previous = signal.signal(signal.SIGTERM, on_sigterm)
        except ValueError:                                          # not the main thread
            previous = None
        try:
            return main(argv)
        except KeyboardInterrupt:
            print(f"\n{interrupted()}", file=sys.stderr, flush=True)
            raise SystemExit(130) from None
        except OSError as e:            # stdout on a full device (files: one line where written)
            try:                                    # the buffered rest goes nowhere at exit
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError):
                pass
            print(f"error: {e.strerror or e}{f' ({e.filename})' if e.filename else ''}; what was "
                  f"saved before it stays (--resume continues a training run)", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        finally:
            release_lock()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    run.__doc__, run.__name__ = main.__doc__, main.__name__
    return run
# --- end shared: run-files ---


# Data (README "Data"): each split is one uint8 tensor [N, C, H, W] held on the device;
# batches are indexed from it and augmented there (no DataLoader in the hot path).

# --- shared: data ---
# What torchvision looks for under --data-dir (named in the error when it is missing).
TORCHVISION_FILES = {
    "cifar10": "cifar-10-batches-py/ (data_batch_1..5, test_batch), or cifar-10-python.tar.gz",
    "cifar100": "cifar-100-python/ (train, test, meta), or cifar-100-python.tar.gz",
    "svhn": "train_32x32.mat and test_32x32.mat (loading them needs scipy)",
    "fashion-mnist": "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
                     "t10k-labels-idx1-ubyte.gz (directly, or under FashionMNIST/raw/); on Debian "
                     "`apt-get install dataset-fashion-mnist` puts them in /usr/share/datasets/fashion-mnist",
    "mnist": "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
             "t10k-labels-idx1-ubyte.gz (directly, or under MNIST/raw/)",
}


# torchvision's class and folder names of the two 28x28 grey datasets.
IDX_DATASETS = {"fashion-mnist": ("FashionMNIST", "FashionMNIST"), "mnist": ("MNIST", "MNIST")}


class DataError(Exception):
    """A dataset that cannot be found or read; main() turns it into exit code 2."""


def _read_idx(path):
    """One IDX file (LeCun's MNIST format, optionally gzipped) -> uint8 tensor: a 4-byte magic
    (0, 0, type 0x08 = uint8, number of dimensions n), n big-endian int32 sizes, the data."""
    import gzip
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:                                # not gzip, cut short, unreadable
        raise DataError(f"cannot read {path} ({type(e).__name__}: {' '.join(str(e).split())})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of uint8 (MNIST format)")
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(raw[3])]
    count = int(np.prod(dims))
    if len(raw) < 4 + 4 * len(dims) + count:
        raise DataError(f"{path} is truncated: its header promises {dims}")
    data = np.frombuffer(raw, dtype=np.uint8, count=count, offset=4 + 4 * len(dims))
    return torch.from_numpy(data.copy()).reshape(dims)


def _load_idx(name, root, train):
    """Fashion-MNIST / MNIST: the four raw IDX files, read where they lie (directly in --data-dir,
    the Debian layout, or under torchvision's <Class>/raw/), else downloaded by torchvision.
    -> uint8 [N, 1, 28, 28] (one grey channel), labels, torchvision's class names."""
    import torchvision
    cls_name, folder = IDX_DATASETS[name]
    cls = getattr(torchvision.datasets, cls_name)
    prefix = "train" if train else "t10k"
    def find(kind):                                                 # kind: "images-idx3", "labels-idx1"
        for where in (root, os.path.join(root, folder, "raw")):
            for ext in (".gz", ""):
                path = os.path.join(where, f"{prefix}-{kind}-ubyte{ext}")
                if os.path.isfile(path):
                    return path
        return None
    if find("images-idx3") is None or find("labels-idx1") is None:
        try:                                                        # torchvision's own layout
            cls(root, train=train, download=True)
        except Exception as e:
            raise DataError(
                f"{name} is not in {os.path.abspath(root)} and could not be downloaded "
                f"({type(e).__name__}: {' '.join(str(e).split())}). Expected there: {TORCHVISION_FILES[name]}. Point "
                f"--data-dir at the folder that holds them, or use --data folder.") from None
    images, labels = _read_idx(find("images-idx3")), _read_idx(find("labels-idx1"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{name} files in {root} disagree: images {list(images.shape)}, "
                        f"labels {list(labels.shape)}")
    return images[:, None], labels.long(), list(cls.classes)       # [N, 1, 28, 28]


def _load_torchvision(name, root, train):
    import torchvision
    if name in IDX_DATASETS:
        return _load_idx(name, root, train)
    existed = os.path.exists(root)
    try:
        if name == "svhn":
            ds = torchvision.datasets.SVHN(root, split="train" if train else "test", download=True)
            return torch.from_numpy(ds.data), torch.as_tensor(ds.labels, dtype=torch.long), \
                [str(c) for c in range(10)]                         # ds.data: [N, 3, 32, 32]
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        ds = cls(root, train=train, download=True)
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2)      # [N, 32, 32, 3] -> [N, 3, 32, 32]
        return images, torch.as_tensor(ds.targets, dtype=torch.long), list(ds.classes)
    except Exception as e:  # no network, a proxy, a corrupt archive, scipy missing: all end here
        if not existed and os.path.isdir(root) and not os.listdir(root):
            os.rmdir(root)                          # the download's empty folder: nothing written
        raise DataError(
            f"{name} is not in {os.path.abspath(root)} and could not be downloaded "
            f"({type(e).__name__}: {' '.join(str(e).split())}). torchvision expects there: {TORCHVISION_FILES[name]}. "
            f"Put the files there (--data-dir PATH), or use your own images with --data folder "
            f"--data-dir DIR, DIR holding train/<class>/*.png and test/<class>/*.png.") from None


def _load_folder(root, train):
    """ImageFolder split -> uint8 [N, C, H, W]; samples interleaved round-robin over classes
    (class 0 #0, class 1 #0, ..., class 0 #1, ...) so that --limit N keeps every class."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, pil_loader
    split = os.path.join(root, "train" if train else "test")
    if not os.path.isdir(split):
        raise DataError(f"--data folder needs {os.path.abspath(split)}/<class>/<image> "
                        f"(ImageFolder layout, train/ and test/ with the same class folders)")
    # torchvision's ImageFolder order (classes and files sorted), but links to folders inside a
    # class folder are not followed: a link to its parent turned 60 images into 3,260
    classes = sorted(e.name for e in os.scandir(split) if e.is_dir())
    walks = [(c, sorted(os.walk(os.path.join(split, cls)))) for c, cls in enumerate(classes)]
    samples = [(os.path.join(folder, name), c) for c, walk in walks for folder, _, names in walk
               for name in sorted(names) if name.lower().endswith(IMG_EXTENSIONS)]
    links = [os.path.join(folder, d) for _, walk in walks for folder, dirs, _ in walk for d in dirs
             if os.path.islink(os.path.join(folder, d))]
    if links:
        print(f"note: {len(links)} link(s) to folders inside the class folders not followed: {links[0]}", flush=True)
    empty = sorted(set(classes) - {classes[c] for _, c in samples})
    if not classes or empty:
        raise DataError(f"cannot read the image folder {split}: no class folder, or no image "
                        f"({', '.join(IMG_EXTENSIONS)}) in {empty}")
    rank, seen = [], {}
    for _, label in samples:
        rank.append((seen.get(label, 0), label))
        seen[label] = seen.get(label, 0) + 1
    order = sorted(range(len(samples)), key=lambda i: rank[i])
    images, labels, shape = [], [], None
    for i in order:
        path, label = samples[i]
        try:                                                        # a truncated or foreign file
            array = np.asarray(pil_loader(path), dtype=np.uint8)    # [H, W, 3] (RGB)
        except Exception as e:
            raise DataError(f"cannot read the image {path} ({type(e).__name__}: "
                            f"{(str(e).splitlines() or [''])[0][:100]}); replace or remove it") from None
        if shape is None:
            shape = array.shape
        elif array.shape != shape:
            raise DataError(f"all images must have one size: {path} is {array.shape[:2]}, "
                            f"the first was {shape[:2]}")
        images.append(torch.from_numpy(array.copy()).permute(2, 0, 1))
        labels.append(label)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), classes


def load_split(name, root, train, limit=None):
    """-> (images uint8 [N, C, H, W] on the CPU, labels int64 [N], class names)."""
    if name == "folder":
        images, labels, classes = _load_folder(root, train)
    else:
        images, labels, classes = _load_torchvision(name, root, train)
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(classes):
        raise DataError(f"the {'train' if train else 'test'} labels of {name} in {root} lie in "
                        f"[{int(labels.min())}, {int(labels.max())}], outside the {len(classes)} "
                        f"classes: a damaged file; replace it")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images.contiguous(), labels, classes


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
    info = {"name": name, "num_classes": len(classes), "classes": classes,
            "mean": [float(v) for v in pixels.mean(1)], "std": [float(v) for v in pixels.std(1)],
            "image_size": [int(train_x.shape[2]), int(train_x.shape[3])]}
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
    B, C, H, W = x.shape
    if crop > 0:
        padded = F.pad(x, (crop, crop, crop, crop))                  # [B, C, H+2p, W+2p], zeros
        off = torch.randint(0, 2 * crop + 1, (2, B), device=x.device, generator=generator)
        rows = (off[0, :, None] + torch.arange(H, device=x.device))[:, None, :, None]  # [B,1,H,1]
        cols = (off[1, :, None] + torch.arange(W, device=x.device))[:, None, None, :]  # [B,1,1,W]
        x = padded[torch.arange(B, device=x.device)[:, None, None, None],
                   torch.arange(C, device=x.device)[None, :, None, None], rows, cols]
    if flip:
        mirror = torch.rand(B, device=x.device, generator=generator) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    return x
# --- end shared: train-data ---


# --- shared: checkpoint-load ---
FORMAT = "clustr/1"


STAGES = ("nominal", "magnet", "qtrades-magnet", "qtrades-ce")


REQUIRED_KEYS = ("format", "stage", "arch", "data", "model", "args", "epoch", "metrics")


class CheckpointError(Exception):
    """A checkpoint that cannot be used (missing, empty, truncated, pickled code, another format,
    the wrong stage, a damaged entry); str(e) is one line naming the file and the fix."""


def read_checkpoint(path, stages=STAGES):
    """torch.load with weights_only=True (never unsafe loading) plus a schema check; any problem
    raises CheckpointError with a message naming the file (the form to call from Python)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): a copy or a run that did not "
                              f"finish writing it; copy it again or give another file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refusal (pickled code), truncated or corrupt zip
        text = str(e)
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
        if found:
            kind = f"holds pickled code ({found.group(1)}) that weights_only=True refuses (not " \
                   f"loaded): not a clustr checkpoint, or an untrusted one"
        else:  # the first line of torch's text that is about the file (some errors have none)
            lines = [l.strip() for l in text.splitlines() if l.strip() and not l.startswith(
                ("Weights only load failed", "Please file an issue", "Check the documentation"))]
            first = lines[0][:100] if lines else ""
            kind = f"is truncated or corrupt ({type(e).__name__}{': ' + first if first else ''})"
        raise CheckpointError(f"checkpoint {path} {kind}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint (written by another program or "
                              f"version)")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}")
    if ckpt["stage"] not in stages:
        raise CheckpointError(f"{path} is a '{ckpt['stage']}' checkpoint; this command needs one of "
                              f"{list(stages)}")
    check_schema(ckpt, path)
    bad = nonfinite({"model": ckpt["model"], "clusters": ckpt.get("clusters")})
    if bad:
        raise CheckpointError(f"checkpoint {path}: {bad} holds NaN or inf (a diverged run or a damaged "
                              f"file); use an earlier checkpoint")
    RUN.setdefault("epochs", {})[os.path.abspath(path)] = ckpt["epoch"]
    return ckpt


def nonfinite(obj, key=""):
    """The key (e.g. model['conv1.weight']) of the first tensor or number in obj that holds NaN or
    inf, else None: every model is checked on load and before every save."""
    if isinstance(obj, dict):
        return next(filter(None, (nonfinite(v, f"{key}[{k!r}]" if key else k) for k, v in obj.items())), None)
    if torch.is_tensor(obj) and obj.is_floating_point():
        return None if bool(torch.isfinite(obj).all()) else key
    return key if isinstance(obj, float) and not math.isfinite(obj) else None


def check_schema(ckpt, path):
    """The types and keys of the entries the stages read (README "Where results and checkpoints go"), so that a damaged
    or hand-made checkpoint stops here, naming the key, instead of deep inside a stage; raises
    CheckpointError."""
    def need(ok, key, what):
        if not ok:
            found = repr(value(key))
            raise CheckpointError(f"checkpoint {path}: {key} must be {what}, but it is "
                                  f"{found if len(found) < 60 else found[:57] + '...'}; not a "
                                  f"checkpoint of these stages")

    def value(key):                                                 # "arch['width']" -> ckpt["arch"]["width"]
        v = ckpt
        for part in re.findall(r"\w+", key):
            v = v.get(part) if isinstance(v, dict) else None
        return v

    def count(v, low=1):
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    def numbers(v, n):
        return isinstance(v, list) and len(v) == n and all(isinstance(x, (int, float)) for x in v)
    arch, data = ckpt["arch"], ckpt["data"]
    need(isinstance(arch, dict), "arch", "a dict")
    need(arch.get("name") == "resnet18", "arch['name']", "'resnet18'")
    for key in ("width", "in_channels"):
        need(count(arch.get(key)), f"arch['{key}']", "an integer >= 1")
    need(arch.get("feat_dim") == 8 * arch["width"], "arch['feat_dim']", f"8 x width = {8 * arch['width']}")
    need(isinstance(data, dict), "data", "a dict")
    need(isinstance(data.get("name"), str), "data['name']", "a dataset name")
    need(count(data.get("num_classes")), "data['num_classes']", "an integer >= 1")
    need(isinstance(data.get("classes"), list) and len(data["classes"]) == data["num_classes"]
         and all(isinstance(c, str) for c in data["classes"]), "data['classes']",
         f"a list of {data['num_classes']} class names")
    for key in ("mean", "std"):
        need(numbers(data.get(key), arch["in_channels"]), f"data['{key}']",
             f"{arch['in_channels']} numbers (one per channel)")
    need(isinstance(data.get("image_size"), list) and len(data["image_size"]) == 2
         and all(count(v) for v in data["image_size"]), "data['image_size']", "[height, width]")
    need(isinstance(ckpt["model"], dict) and all(torch.is_tensor(v) for v in ckpt["model"].values()),
         "model", "a state_dict (names -> tensors)")
    need(isinstance(ckpt["args"], dict), "args", "a dict")
    need(count(ckpt["epoch"], 0), "epoch", "an integer >= 0")
    if ckpt["stage"] in ("magnet", "qtrades-magnet"):
        c = ckpt.get("clusters")
        need(isinstance(c, dict), "clusters", "a dict (the clustering stages' Eq. (4) entry)")
        need(torch.is_tensor(c.get("centers")) and c["centers"].dim() == 2
             and c["centers"].shape[1] == arch["feat_dim"], "clusters['centers']",
             f"a tensor [M, {arch['feat_dim']}]")
        need(torch.is_tensor(c.get("center_classes")) and c["center_classes"].shape == (len(c["centers"]),)
             and not c["center_classes"].is_floating_point() and bool(((c["center_classes"] >= 0)
             & (c["center_classes"] < data["num_classes"])).all()), "clusters['center_classes']",
             f"{len(c['centers'])} class indices in [0, {data['num_classes']})")
        need(isinstance(c.get("variance"), (int, float)) and math.isfinite(c["variance"])
             and c["variance"] > 0, "clusters['variance']", "a finite sigma^2 > 0")
        need(c.get("D") is None or count(c.get("D")), "clusters['D']", "None or an integer >= 1")
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
def save_checkpoint(ckpt, path):
    """Atomic write: a temporary file in the same folder, flushed to disk, then os.replace, so an
    interrupted run always leaves the last complete checkpoint
    (README "Where results and checkpoints go").  A model with NaN or inf is not written: the run
    stops with one line (exit 2), and so does a failed write (a full disk), leaving no temporary
    file and the previous file as it was."""
    bad = nonfinite({k: ckpt[k] for k in ("model", "clusters") if k in ckpt})
    if bad:
        fail(f"{bad} holds NaN or inf: training diverged (try a smaller --lr); stopped without "
             f"writing {path}, which keeps its last good epoch")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    # Ctrl-C and SIGTERM wait until the file, the log and the epoch the run names (interrupted())
    # agree, then are raised again (a mask would not do: torch's threads would take them).
    caught = []
    try:
        held = {s: signal.signal(s, lambda signum, frame: caught.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:                                              # not the main thread
        held = {}
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        RUN.setdefault("epochs", {})[os.path.abspath(path)] = ckpt.get("epoch")
        if RUN.get("out") is not None and os.path.abspath(path) == os.path.abspath(RUN["out"]):
            commit_log()                    # the first saved epoch replaces the old run's log
    except OSError as e:
        fail(f"cannot write {path} ({e.strerror or e}); it is as it was before this write (free "
             f"space or choose another path, then continue with --resume where it is a checkpoint)")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        for s, handler in held.items():
            signal.signal(s, handler)
        for s in caught[:1]:
            signal.raise_signal(s)
# --- end shared: checkpoint-save ---

# --- shared: resume ---
def check_resume_args(ckpt, args, not_shaping):
    """Refuse a resume whose run-shaping arguments differ from the stored run, listing them.
    --epochs may grow, also past a finished run (as timm's resume allows): the epochs already
    done stay as they were; fewer epochs than the checkpoint holds is refused."""
    old, new = ckpt["args"], vars(args)
    if new.get("epochs") is not None and new["epochs"] < ckpt["epoch"]:
        fail(f"cannot resume: the checkpoint already holds {ckpt['epoch']} epochs, more than "
             f"--epochs {new['epochs']}; pass --epochs {ckpt['epoch']} or more")
    source = args.resume or args.out
    if new.get("epochs") == ckpt["epoch"] and os.path.abspath(source) != os.path.abspath(args.out):
        fail(f"nothing to train: {source} holds all {ckpt['epoch']} epochs, so --out {args.out} would "
             f"not be written; raise --epochs to continue the run into it")
    diff = [f"--{k.replace('_', '-')}: {old.get(k)!r} -> {new.get(k)!r}"
            for k in sorted(set(old) | set(new))
            if k not in not_shaping and k != "epochs" and old.get(k) != new.get(k)]
    if diff:
        fail("cannot resume: arguments that shape the run differ from the checkpoint's: "
             + "; ".join(diff))


def kept_epoch(args, epoch):
    """Where the last good epoch is, for a run that stops: --out once this run has written or read
    it, else the checkpoint --resume read; never a file this run did not write or read."""
    held = RUN.get("epochs", {})
    kept = next((p for p in (args.out, args.resume) if p and os.path.abspath(p) in held), None)
    return f"so {kept} keeps the last good epoch ({epoch})" if kept else "so nothing of this run was saved"


def rng_state(generator):
    return {"torch": torch.get_rng_state(), "generator": generator.get_state(),
            "generator_device": str(generator.device)}


def set_rng_state(state, generator):
    torch.set_rng_state(state["torch"])
    if state["generator_device"] == str(generator.device):
        generator.set_state(state["generator"])
    else:  # a CPU generator state cannot seed a CUDA generator: the stream changes from here on
        print(f"note: the run moved from {state['generator_device']} to {generator.device}; "
              f"its random stream continues from a fresh seed", flush=True)


def read_jsonl(path):
    """The log's records; a last line cut short (a run killed while writing it) is left out."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                fail(f"{path}: line {i + 1} is not JSON (a damaged log); repair or remove it")
    return records


def arch_entry(width, in_channels):
    return {"name": "resnet18", "width": width, "feat_dim": 8 * width, "in_channels": in_channels}
# --- end shared: resume ---


# --- shared: init-check ---
def check_init_classes(init, info, channels, path):
    """The --init model must have seen the same classes and image channels as this run."""
    if init["data"]["classes"] != info["classes"]:
        fail(f"--init {path} was trained on the classes {init['data']['classes']}, but this "
             f"run's data has {info['classes']}")
    if init["arch"].get("in_channels") != channels:
        fail(f"--init {path} takes {init['arch'].get('in_channels')}-channel images, the data "
             f"has {channels}")

def defaults_from_init(args):
    """--data and --width left unset take those of the checkpoint the run starts from (--init, or
    the one --resume continues), else cifar10 and 64: `python magnet.py --init ckpt.pt` runs as
    nominal.py prints it."""
    source = (args.resume or args.out) if args.resume is not None else args.init
    if source is not None and (args.data is None or args.width is None):
        ckpt = load_checkpoint(source)
        args.data = args.data or ckpt["data"]["name"]
        args.width = args.width or ckpt["arch"]["width"]
    args.data, args.width = args.data or "cifar10", args.width or 64
# --- end shared: init-check ---


# --- shared: next-attack ---
def next_command(args):
    """The evaluation of this checkpoint, runnable as printed: attack.py takes --data, --width
    and the data folder from the checkpoint; --limit is passed on."""
    cmd = ["python", "attack.py", "--ckpt", args.out] + (["--limit", str(args.limit)] if args.limit else [])
    return " ".join(shlex.quote(a) for a in cmd)
# --- end shared: next-attack ---


# Ctrl-C / SIGTERM: one line, exit 130; the lock released (run-files' `guarded`, defined above)
main = guarded(main)


if __name__ == "__main__":
    main()
