"""attack.py -- ClusTR evaluation: L-inf PGD of Eq. (5) and Square, worst case over several losses.

Paper: "Rethinking Clustering for Robustness" (Alfarra, Perez et al., BMVC 2021), Sec. 4.2
(Eq. (5), "Adaptive Attacks"), Tables 1-3, Appendix B.2 (other eps), B.3 / Fig. 4 (D nearest).

PGD (Madry et al. 2018) as Eq. (5): a uniform random start in the eps-ball (clipped to [0, 1]),
then `--steps` signed-gradient steps of size `--step`, each projected onto the eps-ball and [0, 1].
An example counts as robust only if it is classified correctly and no iterate of any restart of
any loss fools the model (AutoAttack's convention); the first fooling iterate is kept and fooled
examples leave the batch.  The losses run as AutoAttack's cascade: each only on the examples every
earlier one left robust (`--per-loss`: each on every example, for per-loss figures).  Clustering
checkpoints (magnet.py, qtrades.py --loss magnet) predict by Eq. (4) in log space; nominal and
qtrades-ce checkpoints by their linear head.  eps = 0 is the natural accuracy: nothing is attacked.

Why several losses.  The paper attacks cross-entropy on p of Eq. (4) (PGD-CE) and, in Sec. 4.2,
the Magnet loss.  On these models CE saturates: for a confidently clustered point log p_y rounds
to 0 in float32 and its input gradient is exactly zero, so PGD-CE cannot move it.  RobustBench
lists the authors' released ClusTR+QTRADES CIFAR10 model at 91.03% clean, 74.04% reported robust
and 0.00% under AutoAttack.  The default loss set therefore adds the Carlini-Wagner margin on
log-probabilities (untargeted, and targeted at the min(9, classes - 1) most likely wrong classes
like AutoAttack's APGD-T, ranked over all centres even under a D mask), the Magnet loss, a cosine
step schedule, and last, on the survivors, the gradient-free Square attack (Andriushchenko et al.
2020) that AutoAttack uses against masked gradients: saturated Eq. (4) and D masks are exactly
that risk.  The headline is the per-example worst case over all of them.  `--loss ce --schedule
constant --steps 100 --restarts 10` is the paper's protocol exactly.  Where this differs from
AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square with 5000 queries): FAB-T is left out
(benchmarks/README.md "FAB-T on attack.py's survivors" measures what it would add), the margin on
log p replaces APGD-T's DLR loss, the cosine step schedule replaces APGD's momentum and step
halving, and Square gets 1000 queries unless --square-queries says otherwise.

Both sides of every verdict are backed (README "attack.py: losses, cascade, checks, results"):
a fooled example by its fooling image, a survivor by its strongest point (lowest margin over
every loss, restart and target), both classified again; every survivor must have met every loss
at the configured budget, counted per example, or the run stops with exit 1 and writes nothing.

Checks (README "attack.py: losses, cascade, checks, results"), each stored with its numbers and
able to fail: every x_adv in the eps-ball and [0, 1] (every batch); robust <= natural on the raw
masks; the objective rises on most attacked examples; Square fools at most --tolerance of what the
gradient losses left; the attack beats as many random points in the ball; an attack at eps = 0
changes nothing; a large eps leaves at most 5% robust; twice the steps and more restarts, on fresh
random streams, lower the figure by at most --tolerance.  The ones that attack again run on a
tenth of the images (--check-images), at most about half the attack's cost.  A failed check names
the README entry that says what it means and what to try, and the run exits 1 after writing its
results (`--no-strict`: 0).

Usage (copy-paste):
    python attack.py                                    # magnet.pt: default loss set, 8/255, 100 steps
    python attack.py --ckpt qtrades.pt --steps 100 --restarts 10       # ... with the paper's budget
    python attack.py --ckpt qtrades.pt --loss ce --schedule constant --steps 20 --restarts 10
                                                        # Table 1's PGD-20, the paper's protocol
    python attack.py --ckpt qtrades.pt --loss magnet --schedule constant --restarts 10
                                                        # Sec. 4.2's adaptive attack (PGD-100)
    python attack.py --ckpt qtrades.pt --eps 2/255 16/255 25.5/255     # Table 3 (App. B.2)
    python attack.py --ckpt c100.pt --D 1 4 20 60 all                   # Fig. 4 (App. B.3)
    python attack.py --ckpt magnet.pt --limit 500 --steps 20           # a quick CPU run
    python attack.py --ckpt qtrades.pt --loss ce scores-ce             # Eq. (5) vs the authors' code
    python attack.py --ckpt c100.pt --square-queries 5000 --save-adv adv.pt
                                                        # AutoAttack's Square budget, images kept
    python attack.py --ckpt magnet.pt --export clustr.pt2              # one file for torchattacks,
                                                        # AutoAttack, RobustBench (section 6)
    torchrun --nproc_per_node 8 attack.py --ckpt c100.pt -b 250        # 8 GPUs (nccl), or CPU
                                                        # processes (gloo): one process's result

Reads: --ckpt (any clustr/1 checkpoint, loaded with weights_only=True) and the test split of the
checkpoint's own dataset.  Writes: --out (JSON: rows per loss, eps, D; checks; per-example
results under "examples") and <out>.log.jsonl (one object per finished row, so a killed run keeps
its rows); --save-adv PATH the adversarial images; with --export, only that file.  Under
torchrun (README "attack.py under torchrun") the processes share the work, rank 0 alone writes.
From Python: load_classifier(path, device) -> nn.Module, images in [0, 1] -> class log-scores
(section 6).
Needs torch, torchvision, numpy; imports no other file of this repository: copy it freely.
Blocks between "# --- shared: NAME ---" markers are identical copies of the same blocks in the
other stages (test_all.py checks this).

Evidence (`python benchmarks/attack.py --repeats 5`, 2026-11-25, torch 2.14.1 CPU, 1 thread of a
2-core machine shared with other jobs, torchattacks 3.5.1; width-8 ResNet18s on a generated
10-class 16x16 ImageFolder, 300 test images; see that file for the models):
  - PGD-CE 20 steps x 5 restarts vs torchattacks PGD + MultiAttack, same robust accuracy (mean of
    5 seeds): 1.5-1.6x faster where the model mostly resists (97% robust at 2/255), 2.2-2.4x
    where it is mostly fooled (10-13% at 16/255).  Not the 2x of issue 5 in the first case: the
    work per step is the same; channels_last and the batch-norm-folded copy of that version gave
    the 1.5x.  The copy is gone (issue 22: at width 64 it measured 0.8-1.1x, benchmarks/README.md
    "attack.py without the folded copy"); these figures were not re-measured without it.
  - Default set vs APGD-CE + APGD-T (9 targets), 20 iterations, 8/255: worst case 64.3% vs 64.3%
    (nominal), 66.0% vs 66.3% (clustering, confident sigma^2), 59.3% vs 59.3% (trained by
    magnet.py), 2-4x faster; at 100 iterations (--steps-b 100) equal on all three.  On the
    confident model PGD-CE alone reports 99.3%: its input gradients are exactly zero.
  - Default set (with Square, 9 targets, cascade) vs AutoAttack standard: benchmarks/autoattack.py
    and benchmarks/README.md "attack.py against AutoAttack".
  - No GPU was available: no GPU timing has been measured.

Lineage: PGD (Madry et al. 2018); margin loss (Carlini & Wagner 2017); targeted margin over the
top classes, the cascade and worst case over attacks (Croce & Hein 2020, AutoAttack); Square
(Andriushchenko et al. 2020); the sanity checks (Carlini et al. 2019, "On Evaluating Adversarial
Robustness").
"""

import argparse
import contextlib
import datetime
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


LOSSES = ("ce", "margin", "margin-t", "magnet", "scores-ce", "square")
# The default set, in the order the cascade runs it (AutoAttack's: APGD-CE, APGD-T, ..., Square
# last): the gradient losses, then the gradient-free Square attack on whatever they left robust.
# magnet needs centres, so it joins only for clustering checkpoints; scores-ce (the authors'
# code) is never a default.  benchmarks/autoattack.py compares this set with AutoAttack.
DEFAULT_LOSSES = ("ce", "margin", "margin-t", "magnet", "square")

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


def parse_D(text):
    """--D values: a positive integer (the D nearest centres, Sec. 4.2) or 'all'."""
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--D takes positive integers or 'all', not {text!r}")
    return int(text)


def parse_args(argv=None):
    """The command line -> checked args (bad input: one line, exit code 2)."""
    p = argparse.ArgumentParser(
        prog="attack.py", formatter_class=HelpFormatter,
        description="ClusTR evaluation: L-inf PGD of Eq. (5) (Sec. 4.2), per loss and their worst case.",
        epilog="--data, --width: the checkpoint's. The paper's protocol: --loss ce --schedule constant --restarts 10")
    add_common_args(p, data_default=None)
    p.set_defaults(width=None)  # the checkpoint's width; a different --width is an error
    p.set_defaults(data_dir=None)  # the checkpoint's own data folder (data_dir_from_checkpoint)
    g = p.add_argument_group("attack (Sec. 4.2, Eq. (5); App. B)")
    add_attack_args(g)
    add_run_args(g)
    args = parse_with_fractions(p, argv)
    if args.steps < 0 or args.restarts < 1 or (args.targets is not None and args.targets < 1) \
            or args.batch_size < 1 or args.square_queries < 0 or (args.check_images or 1) < 1:
        p.error("--steps and --square-queries must be >= 0; --restarts, --targets, --batch-size "
                "and --check-images >= 1")
    if not (args.dist_timeout > 0 and math.isfinite(args.dist_timeout)):
        p.error(f"--dist-timeout must be a positive number of minutes, not {args.dist_timeout:g}")
    return args


def add_attack_args(g):
    """The checkpoint, the files, Eq. (5)'s radius, step and iterations, the losses (Sec. 4.2)."""
    g.add_argument("--ckpt", default="magnet.pt", help="checkpoint to evaluate (any stage)")
    g.add_argument("--export", default=None, metavar="PATH",
                   help="attack nothing: write the checkpoint as one torch.export file (.pt2: images in [0, 1] -> "
                        "class log-scores z_c, softmax(z) = Eq. (4)); load with torch.export.load(PATH).module()")
    g.add_argument("--out", default="attack.json", help="results (JSON; README \"Where results and checkpoints go\")")
    g.add_argument("--eps", type=parse_fraction, nargs="+", default=[8 / 255],
                   help="L-inf radii in [0, 1] pixel units; Sec. 4.2: 8/255; Table 3: 2/255 16/255 25.5/255; 0: "
                        "natural accuracy, nothing attacked (default: 8/255)")
    g.add_argument("--step", type=parse_fraction, default="2/255", help="PGD step eta (constant schedule); Sec. 4.2")
    g.add_argument("--steps", type=int, default=100, help="PGD iterations per run; the paper: 20 and 100")
    g.add_argument("--restarts", type=int, default=1, help="random restarts per loss (and per margin-t target); "
                   "the paper: 10, CE alone")
    g.add_argument("--loss", nargs="+", choices=LOSSES, default=None,
                   help="what is maximised (README \"attack.py: losses, cascade, checks, results\"); ce = Eq. (5). "
                        "Default: ce margin margin-t, magnet for clustering checkpoints, square")
    g.add_argument("--targets", type=int, default=None,
                   help="margin-t: the most likely wrong classes (over all centres) to target; default "
                        "min(9, classes - 1), as APGD-T")
    g.add_argument("--square-queries", type=int, default=1000,
                   help="square: queries per example (AutoAttack: 5000); 0 drops square from the default set")
    g.add_argument("--per-loss", action="store_true", help="every loss on every example (one row each); "
                   "default: each loss only on what the earlier ones left robust (AutoAttack's cascade)")
    g.add_argument("--save-adv", default=None, metavar="PATH", help="save per (eps, D) each example's first "
                   "fooling image, else the strongest point found (torch.save), as AutoAttack's save_dir")
    g.add_argument("--schedule", choices=["constant", "cosine"], default="cosine",
                   help="eta_k: constant = --step (Eq. (5), the paper's); cosine = eps (1 + cos(pi k / steps))")
    g.add_argument("--D", type=parse_D, nargs="+", default=None, help="clustering checkpoints: predict from the "
                   "D nearest centres (Sec. 4.2, Fig. 4); a list, 'all' = every centre; default: the checkpoint's")


def add_run_args(g):
    """How the run is done: the batch, the checks (Carlini et al. 2019), torchrun, --compile."""
    g.add_argument("-b", "--batch-size", type=int, default=500, help="images attacked at once, each chunk with "
                   "its own random generator; under torchrun process r takes the chunks r, r + W, ...")
    g.add_argument("--checks", action=argparse.BooleanOptionalAction, default=True,
                   help="run the sanity checks (Carlini et al. 2019): each states its numbers and can fail")
    g.add_argument("--check-images", type=int, default=None, help="the checks that attack again run on the first "
                   "N images; default a tenth of them (about half the attack's cost at most)")
    g.add_argument("--large-eps", type=parse_fraction, default="64/255",
                   help="check: robust accuracy must be at most 5%% at this eps")
    g.add_argument("--tolerance", type=float, default=0.01, help="checks: what more steps, restarts, Square or "
                   "a larger eps may change, as a share of the images (0.01 = 1 point)")
    g.add_argument("--strict", action=argparse.BooleanOptionalAction, default=True,
                   help="exit 1 when a check fails (after writing the results, the failure in them)")
    g.add_argument("--dist-timeout", type=float, default=30.0, metavar="MINUTES",
                   help="under torchrun: how long a process waits for the others before it stops with an error")
    add_compile_arg(g)


# ======================================================================================
# 2. The model attacked (App. A "Architecture"): ResNet18, and the classifier (Eq. (4) or the head)
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

# --- shared: classifier ---
def build_model(arch, data, with_head):
    """A ResNet18 shaped by a checkpoint's `arch` and `data` entries
    (README "Where results and checkpoints go")."""
    if arch.get("name") != "resnet18":
        raise ValueError(f"unknown architecture {arch.get('name')!r}")
    return ResNet18(data["num_classes"] if with_head else 0, arch["width"], arch["in_channels"],
                    data["mean"], data["std"])


class Classifier(nn.Module):
    """images in [0, 1] -> log-probabilities [n, classes].  Clustering checkpoints (magnet,
    qtrades-magnet): log of Eq. (4) over the stored centres and sigma^2 (optionally the D nearest);
    head checkpoints (nominal, qtrades-ce): log-softmax of the linear head."""

    def __init__(self, model, clusters=None, D=None):
        super().__init__()
        self.model = model
        self.clusters = clusters is not None
        if self.clusters:
            self.register_buffer("centers", torch.as_tensor(clusters["centers"]).float())
            self.register_buffer("center_classes", torch.as_tensor(clusters["center_classes"]).long())
            self.sigma2 = float(clusters["variance"])
            self.D = D

    def forward(self, x):
        if not self.clusters:
            return F.log_softmax(self.model(x).float(), dim=1)
        return cluster_log_probs(self.model.features(x), self.centers, self.center_classes,
                                 self.sigma2, self.D)


def read_classifier(path, device="cpu", D="stored"):
    """-> (module, ckpt): module(x) maps images in [0, 1] to log-probabilities, the form the
    attacks and certificates here work on.  The module is in eval mode with gradients off for its
    parameters, so an attack never updates batch-norm statistics (README "Where this differs
    from the paper and the authors' code").  D="stored" uses the checkpoint's D; None means all
    centres.  A bad file raises CheckpointError (the command line turns it into exit code 2)."""
    ckpt = read_checkpoint(path)
    with_head = ckpt["stage"] in ("nominal", "qtrades-ce")
    clusters = None if with_head else ckpt.get("clusters")
    if not with_head and clusters is None:
        raise CheckpointError(f"{path} is a '{ckpt['stage']}' checkpoint without its 'clusters' entry")
    model = build_model(ckpt["arch"], ckpt["data"], with_head)
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the weights do not fit the stored architecture "
                              f"({str(e).splitlines()[0]})") from None
    if clusters is not None and D == "stored":
        D = clusters.get("D")
    module = Classifier(model, clusters, None if D == "stored" else D).to(device).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module, ckpt


def data_dir_from_checkpoint(args, ckpt):
    """--data-dir left unset: the folder the checkpoint's run read (stored in its args, absolute
    since the stages store it so) when it exists; else ./data.  A relative stored path is not
    used: it counted from a folder that is not known here.  The header prints the folder used."""
    if args.data_dir is None:
        stored = ckpt["args"].get("data_dir")
        usable = isinstance(stored, str) and os.path.isabs(stored) and os.path.isdir(stored)
        args.data_dir = stored if usable else "./data"
    args.data_dir = os.path.abspath(args.data_dir)


def check_test_split(ckpt, path, classes, images, data_dir):
    """The test split must hold the classes (same names, same order) and image shape the
    checkpoint was trained on; the message says which differ."""
    info, arch = ckpt["data"], ckpt["arch"]
    shape = [arch["in_channels"], *info["image_size"]]
    if classes != info["classes"]:
        missing = [c for c in info["classes"] if c not in classes]
        extra = [c for c in classes if c not in info["classes"]]
        what = "; ".join(([f"no class folder for the checkpoint's classes {missing}"] if missing else [])
                         + ([f"the folders {extra} are not classes of the checkpoint"] if extra else [])) \
            or f"the same {len(classes)} class names in another order"
        fail(f"the test split in {data_dir} does not match {path}: {what}. Give the --data-dir "
             f"(class folders) the checkpoint was trained on")
    if list(images.shape[1:]) != shape:
        fail(f"the test split in {data_dir} does not match {path}: its images are "
             f"{list(images.shape[1:])} (channels, height, width), the checkpoint takes {shape}")
# --- end shared: classifier ---


# ======================================================================================
# 3. The method: the losses and L-inf PGD, Eq. (5); Square; Eq. (4)'s class scores
# ======================================================================================

def objective(clf, x, y, loss, target=None):
    """The per-example value an attack maximises, and the classifier's log p (which decides
    'fooled').  x [n, C, H, W] in [0, 1]; y [n]; target [n] for margin-t.
    ce, margin and margin-t need only clf(x) (any function returning log p); magnet and scores-ce
    need the features and the stored centres, so they take a clustering Classifier (its
    .model.features, .centers, .center_classes, .sigma2, .D).  -> (objective [n], log p [n, classes])."""
    if loss in ("magnet", "scores-ce"):
        if not getattr(clf, "clusters", False):
            raise ValueError(f"loss {loss!r} needs a clustering classifier (stored centres)")
        f = clf.model.features(x)                                           # [n, d]
        z = class_log_scores(f, clf.centers, clf.center_classes, clf.sigma2, clf.D)   # Eq. (4), [n, C]
        log_p = torch.log_softmax(z, 1)
        if loss == "scores-ce":
            # The authors' evaluation code: cross-entropy of a softmax over the unnormalised Eq. (4)
            # scores sum_{j in c} exp(s_j) = exp(z_c) (the D nearest), i.e. probabilities used as
            # logits.  Kept to compare that protocol with Eq. (5); exp(z_c) underflows to 0 far
            # from the centres.
            return F.cross_entropy(z.exp(), y, reduction="none"), log_p
        # Sec. 4.2, adaptive attack: Eq. (3) per example against the stored centres and sigma^2,
        #   ||f - mu(f)||^2/(2 sigma^2) + log sum_{mu_j of other classes} exp(-||f - mu_j||^2/(2 sigma^2))
        # with mu(f) the nearest centre of the true class (Eq. (3)'s v*).  alpha is a constant
        # and {.}_+ is dropped: the hinge has zero gradient exactly where the inner value is
        # negative, i.e. on the well-clustered points the attack has to move.  All centres
        # enter (not only the D nearest), so the gradient survives where D masks it.
        s = -sq_distances(f, clf.centers) / (2 * clf.sigma2)               # [n, M] s_j
        own = clf.center_classes[None, :] == y[:, None]                     # [n, M]
        nearest_own = s.masked_fill(~own, float("-inf")).max(1).values      # -||f - mu(f)||^2/(2 sigma^2)
        return s.masked_fill(own, float("-inf")).logsumexp(1) - nearest_own, log_p
    log_p = clf(x)                                                          # [n, classes]
    log_p_y = log_p.gather(1, y[:, None]).squeeze(1)
    if loss == "ce":                                                        # Eq. (5): L_ce(p, y)
        return -log_p_y, log_p
    if loss == "margin":  # Carlini-Wagner on log p: max_{c != y} log p_c - log p_y (= on z_c)
        return log_p.scatter(1, y[:, None], float("-inf")).max(1).values - log_p_y, log_p
    if loss == "margin-t":                                                  # towards class t
        return log_p.gather(1, target[:, None]).squeeze(1) - log_p_y, log_p
    raise ValueError(f"unknown loss {loss!r}; one of {LOSSES}")


def class_scores(clf, x, D=None):
    """Class scores that rank the targets of margin-t and guide Square: z of Eq. (4) over *all*
    centres (D = None), also when the classifier predicts from the D nearest.  Under a D mask the
    classes outside the D nearest all have log p = -inf: ranked by it they tie, and the tie
    broke as classes 0, 1, 2 for every example (with D = 1 or 2 an example then "targeted" its
    own class).  Head classifiers and plain functions: their own log p.  -> [n, classes]."""
    if getattr(clf, "clusters", False):
        return class_log_scores(clf.model.features(x), clf.centers, clf.center_classes, clf.sigma2, D)
    return clf(x)


def rank_targets(scores, y):
    """The wrong classes, most likely first: the true class removed by its index (never by
    setting its score to -inf, which ties with masked classes).  -> [n, classes - 1]."""
    order = scores.sort(dim=1, descending=True, stable=True).indices         # [n, C]
    return order[order != y[:, None]].view(len(y), scores.shape[1] - 1)       # also for n = 0


def pgd(clf, x, y, eps, step, steps, restarts=1, loss="ce", generator=None,
        targets=9, schedule="constant", stats=None, record=None):
    """L-inf PGD, ClusTR Eq. (5), with restarts:

        x^0 = clip_[0,1](x + U[-eps, eps]),   x^{k+1} = Proj_S(x^k + eta sign(grad_x loss(x^k, y)))
        S = {x' in [0, 1]^n : ||x' - x||_inf <= eps}

    clf(x) -> log-probabilities [n, classes] (the model in eval mode, parameters frozen).
    An example is fooled as soon as one iterate (x^0 included) of one restart is misclassified;
    that first fooling iterate is kept and the example leaves the batch, so later steps and
    restarts attack only the rest (the same result as attacking everything, less work).  Restarts
    are merged by whether they fooled the model, never by which reached the higher loss.  A
    survivor keeps its strongest point: the iterate of lowest margin log p_y - max_{c != y} log p_c
    over every restart and target (what the recompute classifies again: a survivor's record is
    backed by the point nearest to fooling, not by its clean image).
    margin-t runs `restarts` restarts towards each of the `targets` most likely wrong classes
    (ranked by class_scores, i.e. over all centres).  generator: a torch.Generator (None: torch's
    global one); each run draws the noise of the whole batch, so the stream does not depend on
    which examples were already fooled.  stats (a dict, optional) accumulates, over the runs of
    examples that took at least one step, "runs", "rose" (objective higher at the end, the fooling
    iterate or the last one, than at x^0) and "not_finite" (an infinite objective: D masks): the
    check "objective_rises".  record (a dict, optional) receives per example "work", the iterates
    evaluated on it (a survivor: restarts x targets x (steps + 1)), and "margin", that of x_adv.
    -> (x_adv [n, C, H, W], still_correct [n] bool: correct on x and on every iterate)."""
    x, y = x.detach(), y.detach()
    with torch.no_grad():
        log_p = clf(x)
    still_correct = log_p.argmax(1) == y                                    # robust => clean-correct
    x_adv = x.clone()
    margin = torch.full((len(y),), math.inf, device=x.device)             # of x_adv; inf: none yet
    work = torch.zeros(len(y), dtype=torch.long, device=x.device)         # iterates evaluated
    if loss == "margin-t":  # the most likely wrong classes at the clean input, best first
        with torch.no_grad():
            ranked = rank_targets(class_scores(clf, x), y)                  # [n, C - 1]
        runs = [ranked[:, t] for t in range(min(targets, log_p.shape[1] - 1)) for _ in range(restarts)]
    else:
        runs = [None] * restarts
    for target in runs:
        idx = still_correct.nonzero().squeeze(1)                            # [m] still to attack
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)[idx]  # drawn even when m = 0
        if len(idx) == 0:
            continue
        pgd_run(clf, x, y, eps, step, steps, loss, schedule, stats, idx, noise, target,
                x_adv, still_correct, margin, work)
    if record is not None:
        record.update(margin=margin, work=work)
    return x_adv, still_correct


def pgd_run(clf, x, y, eps, step, steps, loss, schedule, stats, idx, noise, target,
            x_adv, still_correct, margin, work):
    """One run of pgd (a restart, or one target of margin-t) on the examples idx still correct:
    Eq. (5)'s iterates from the random start x^0 = clip(x + (2 noise - 1) eps); writes the first
    fooling iterate into x_adv and clears still_correct where fooled; a survivor's x_adv is its
    iterate of lowest margin so far (margin [n], updated); work [n] counts the iterates."""
    x0, y0 = x[idx], y[idx]
    t0 = None if target is None else target[idx]
    xk = (x0 + (2 * noise - 1) * eps).clamp(0, 1)                           # random start in S
    live = torch.ones(len(idx), dtype=torch.bool, device=x.device)          # not fooled yet
    for k in range(steps + 1):
        xk.requires_grad_(True)
        with torch.enable_grad():
            obj, lp = objective(clf, xk, y0, loss, t0)
        if k == 0:
            start = obj.detach()                                            # the objective at x^0
        work[idx] += 1
        lp = lp.detach().float()
        m = lp.gather(1, y0[:, None]).squeeze(1) - lp.scatter(1, y0[:, None], -math.inf).amax(1)
        new = live & (lp.argmax(1) != y0)                                   # fooled at x^k
        closer = live & ~new & (m < margin[idx])                            # a survivor's strongest point
        x_adv[idx[closer]], margin[idx[closer]] = xk.detach()[closer], m[closer]
        if new.any():
            x_adv[idx[new]], margin[idx[new]] = xk.detach()[new], m[new]    # first fooling iterate
            still_correct[idx[new]] = False
            if k > 0:
                tally_rises(stats, obj.detach()[new], start[new])
            live &= ~new
        if k == steps or not live.any():
            if k > 0:
                tally_rises(stats, obj.detach()[live], start[live])
            break
        grad, = torch.autograd.grad(obj.sum(), xk)                          # rows are independent
        xk = xk.detach()
        if not live.all():                                                  # drop the fooled rows
            t0 = None if t0 is None else t0[live]
            xk, x0, y0, idx, grad, start, live = (xk[live], x0[live], y0[live], idx[live],
                                                  grad[live], start[live], live[live])
        # eta_k for k = 0..steps-1: constant (Eq. (5), Sec. 4.2: 2/255), or cosine from 2 eps (the first
        # step of Croce & Hein's APGD) down to 0: long moves first, then refinement
        eta = step if schedule == "constant" else eps * (1 + math.cos(math.pi * k / steps))
        xk = torch.min(torch.max(xk + eta * grad.sign(), x0 - eps), x0 + eps).clamp(0, 1)


def tally_rises(stats, end, start):
    """Objective at the end of a run against its value at x^0 (the objective_rises check)."""
    if stats is None or not len(end):
        return
    finite = torch.isfinite(end) & torch.isfinite(start)
    stats["runs"] = stats.get("runs", 0) + int(finite.sum())
    stats["rose"] = stats.get("rose", 0) + int((end > start)[finite].sum())
    stats["not_finite"] = stats.get("not_finite", 0) + int((~finite).sum())


def square_side(i, queries, size, p_init=0.8):
    """Andriushchenko et al. 2020, L-inf Square: the share p of the image a square covers
    starts at p_init = 0.8 and halves at queries 10, 50, 200, 500, 1000, 2000, 4000, 6000 and
    8000 of a 10000-query run (their schedule, rescaled to `queries`); side = round(sqrt(p) *
    size), at least 1, at most size - 1."""
    at = int(i / max(queries, 1) * 10000)
    halvings = sum(at > t for t in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))
    return int(min(max(round(math.sqrt(p_init / 2 ** halvings) * size), 1), max(size - 1, 1)))


@torch.no_grad()
def square(clf, x, y, eps, queries, generator=None, p_init=0.8, record=None):
    """L-inf Square attack (Andriushchenko et al. 2020): gradient-free, score-based random search
    at the vertices of the eps-ball, AutoAttack's guard against masked gradients (saturated
    Eq. (4) probabilities, D masks).

        x^0 = clip_[0,1](x + eps v),  v in {-1, +1} per (channel, column): vertical stripes
        each query: a random s x s window (s by square_side), new values +-eps per channel in it,
                    x' = clip_[0,1](x + delta'),  kept when the margin falls
        margin(x) = z_y(x) - max_{c != y} z_c(x),   z = class_scores (over all centres)

    The example is fooled when the classifier itself (with its D mask) no longer predicts y at
    a queried point (kept even if its margin is higher); fooled examples leave.  Every point
    stays in the eps-ball and [0, 1].  As in the original (and AutoAttack), a window whose new
    values would all equal the current ones is drawn again before it is queried: no query is
    spent on a point already known.  A survivor's x_adv is its last accepted point.  record (a
    dict, optional) receives per example "work", the points queried (a survivor: `queries`), and
    "margin", log p_y - max_{c != y} log p_c at x_adv.  -> (x_adv [n, C, H, W], still_correct [n])."""
    x, y = x.detach(), y.detach()
    still = clf(x).argmax(1) == y                                           # robust => clean-correct
    x_adv, idx = x.clone(), still.nonzero().squeeze(1)
    margin, work = torch.full((len(y),), math.inf, device=x.device), torch.zeros_like(y, dtype=torch.long)
    record = {} if record is None else record
    record.update(margin=margin, work=work)                                 # filled in place below
    if eps == 0 or queries == 0 or len(idx) == 0:
        return x_adv, still
    n, C, H, W = x.shape
    x0, y0 = x[idx], y[idx]
    stripes = (torch.randint(0, 2, (len(idx), C, 1, W), generator=generator, device=x.device) * 2 - 1).to(x.dtype)
    xk = (x0 + eps * stripes).clamp(0, 1)                                   # [m, C, H, W]
    m_k, lm_k, fooled = square_margin(clf, xk, y0)
    work[idx] += 1
    rows, cols = torch.arange(H, device=x.device)[:, None], torch.arange(W, device=x.device)   # [H, 1], [W]
    for i in range(1, queries + 1):
        if fooled.any():
            x_adv[idx[fooled]], still[idx[fooled]], margin[idx[fooled]] = xk[fooled], False, lm_k[fooled]
            x0, y0, xk, m_k, lm_k, idx = (x0[~fooled], y0[~fooled], xk[~fooled], m_k[~fooled], lm_k[~fooled],
                                          idx[~fooled])
        if len(idx) == 0 or i == queries:
            break
        side = square_side(i, queries, min(H, W), p_init)
        r, c = (torch.randint(0, hi, (len(idx), 1, 1, 1), generator=generator, device=x.device)
                for hi in (H - side + 1, W - side + 1))
        window = (rows >= r) & (rows < r + side) & (cols >= c) & (cols < c + side)   # [m, 1, H, W]
        x_new, same = xk, torch.ones(len(idx), dtype=torch.bool, device=x.device)   # same: signs to draw
        for _ in range(10):   # AutoAttack redraws until the window changes; bounded for an eps below rounding
            if not same.any():
                break
            sign = torch.randint(0, 2, (int(same.sum()), C, 1, 1), generator=generator, device=x.device)
            drawn = torch.where(window[same], x0[same] + eps * (sign * 2 - 1).to(x.dtype), xk[same]).clamp(0, 1)
            x_new = x_new.clone()
            x_new[same] = torch.min(torch.max(drawn, x0[same] - eps), x0[same] + eps)   # clipped: still in S
            same = (x_new == xk).flatten(1).all(1)
        m_new, lm_new, fooled = square_margin(clf, x_new, y0)
        work[idx] += 1
        better = (m_new < m_k) | fooled                 # accepted: a lower margin, or fooled
        xk = torch.where(better[:, None, None, None], x_new, xk)
        m_k, lm_k = torch.where(better, m_new, m_k), torch.where(better, lm_new, lm_k)
    x_adv[idx], margin[idx] = xk, lm_k                                      # survivors: last accepted
    return x_adv, still


def square_margin(clf, v, yv):
    """Square's objective: margin z_y - max_{c != y} z_c over the class scores of all centres,
    the classifier's own margin on log p (with its D mask) and whether it is fooled at v.
    -> (margin [n], classifier's margin [n], fooled [n])."""
    if getattr(clf, "clusters", False) and clf.D is not None:               # one f(x), two masks
        f = clf.model.features(v)
        z, lp = (class_log_scores(f, clf.centers, clf.center_classes, clf.sigma2, D) for D in (None, clf.D))
    else:
        z = lp = class_scores(clf, v)
    z, lp = z.float(), lp.float()
    margin = [s.gather(1, yv[:, None]).squeeze(1) - s.scatter(1, yv[:, None], -math.inf).amax(1)  # y out by index
              for s in (z, lp)]
    return margin[0], margin[1], lp.argmax(1) != yv


def zero_gradient_counts(clf, x, y, losses):
    """Masked-gradient check (Carlini et al. 2019): among correctly classified examples, how many have
    an input gradient that is exactly zero at the clean input, per loss and under every loss.
    -> ({loss: count}, count under every loss, correct count)."""
    with torch.no_grad():
        log_p = clf(x)
    correct = log_p.argmax(1) == y
    x, y = x[correct].detach(), y[correct]
    with torch.no_grad():
        target = rank_targets(class_scores(clf, x), y)[:, 0]                # top wrong class
    counts, every = {}, torch.ones(len(y), dtype=torch.bool, device=x.device)
    for loss in losses:
        xg = x.clone().requires_grad_(True)
        with torch.enable_grad():
            obj, _ = objective(clf, xg, y, loss, target)
            grad, = torch.autograd.grad(obj.sum(), xg)
        zero = (grad.flatten(1) == 0).all(1)
        counts[loss] = int(zero.sum())
        every &= zero
    return counts, int(every.sum()), int(correct.sum())


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


# ======================================================================================
# 4. The loop: every (D, eps, loss) over the test split in chunks, then the checks
# ======================================================================================

def fmt_eps(eps):
    """8/255 for multiples of 1/510, else the decimal."""
    return f"{eps * 255:g}/255" if abs(eps * 510 - round(eps * 510)) < 1e-6 else f"{eps:.4g}"


def share(mask):
    """The share of True in mask, in float64: k of n images at a threshold of k / n is at it."""
    return mask.double().mean().item() if len(mask) else float("nan")


@torch.no_grad()
def natural_mask(clf, images, labels, batch_size):
    return torch.cat([clf(to_float(images[i:i + batch_size])).argmax(1) == labels[i:i + batch_size]
                      for i in range(0, len(labels), batch_size)])


def attack_split(clf, images, labels, args, eps, loss, seed, index=None, adv=None, tally=None, stats=False,
                 progress=None, record=None, **budget):
    """One (eps, loss) attack over uint8 images in chunks of --batch-size; `budget` may override
    steps, restarts, step, queries, targets. index [N]: the images' positions in the test split
    (default 0..N-1). Each chunk draws from a torch.Generator of its own, seeded by (seed, the loss,
    its first image's index), so a loss's figure does not depend on which losses ran before, nor on
    how many processes share the chunks. tally (a dict): every chunk's x_adv measured against the
    eps-ball and [0, 1] (the check "in_ball"), and with stats the PGD runs' objectives
    (objective_rises). adv [N, C, H, W] float, when given, receives x_adv; record (a dict), pgd's and
    square's per-example "work" and "margin" [N]. Under torchrun process r
    attacks the chunks r, r + W, ...; the robust mask and adv are summed over the processes, so
    every one holds one process's result (tally stays per process: run_checks sums it). -> robust
    mask [N] bool, raw (not ANDed with natural accuracy: robust_le_natural compares)."""
    b = {"step": args.step, "steps": args.steps, "restarts": args.restarts, "queries": args.square_queries,
         "targets": args.targets or 9, **budget}                            # None (unresolved): APGD-T's 9
    index = torch.arange(len(labels), device=labels.device) if index is None else index
    robust = torch.zeros(len(labels), dtype=torch.bool, device=labels.device)
    mine, t0 = torch.zeros_like(robust), time.time()                        # this process's chunks
    work = torch.zeros(len(labels), dtype=torch.long, device=labels.device)
    margin = torch.zeros(len(labels), device=labels.device)
    for chunk, start in enumerate(range(0, len(labels), args.batch_size)):
        if chunk % DIST["world"] != DIST["rank"]:                          # torchrun: chunks r, r + W, ...
            continue
        x = to_float(images[start:start + args.batch_size]).contiguous(
            memory_format=torch.channels_last)  # measured 1.5x faster convolutions on CPU too
        y = labels[start:start + args.batch_size]
        key = np.random.SeedSequence([seed, int.from_bytes(loss.encode(), "little"), int(index[start])])
        g = torch.Generator(x.device).manual_seed(int(key.generate_state(1)[0]))   # (seed, loss, chunk)
        rec = {}
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bool(args.amp)):
            if loss == "square":
                x_adv, still = square(clf, x, y, eps, b["queries"], g, record=rec)
            else:                                                           # PGD, Eq. (5)
                x_adv, still = pgd(clf, x, y, eps, b["step"], b["steps"], b["restarts"], loss, g, b["targets"],
                                   args.schedule, tally if stats else None, rec)
        work[start:start + len(y)], margin[start:start + len(y)] = rec["work"], rec["margin"]
        if tally is not None:
            measure_ball(tally, x_adv, x, eps)
        robust[start:start + len(y)], mine[start:start + len(y)] = still, True
        if adv is not None:
            adv[start:start + len(y)] = x_adv.float()
        if progress:                                # this process's chunks; seen: the chunk's end
            progress(loss, eps, start + len(y), len(labels), robust[mine], time.time() - t0)
    if DIST["world"] > 1:                           # torchrun: every process holds the whole row
        robust = all_sum(robust).to(robust.device) > 0
        work, margin = (all_sum(t.masked_fill(~mine, 0)).to(t.device) for t in (work, margin))
        if adv is not None:
            adv.copy_(all_sum(adv.masked_fill(~mine[:, None, None, None], 0)))
    if record is not None:
        record.update(work=work, margin=margin)
    return robust


def measure_ball(ball, x_adv, x, eps):
    """The eps-ball and the box, on every batch: ||x_adv - x||_inf <= eps, 0 <= x_adv <= 1 (the
    check "in_ball"); ball["max_excess"] keeps the largest excess over all batches."""
    # the chunks of attack_split and recompute are never empty
    excess = max(float((x_adv - x).abs().amax()) - eps, -float(x_adv.min()), float(x_adv.max()) - 1)
    ball["batches"] = ball.get("batches", 0) + 1
    ball["max_excess"] = max(ball.get("max_excess", 0.0), excess)


def run_losses(clf, images, labels, args, eps, losses, natural, adv, tally, stats, emit, progress=None):
    """The losses in turn, as AutoAttack's cascade: each attacks only the examples every earlier
    one left robust, so an example counts as robust only if no loss and no restart fooled it
    (the same worst case as every loss on every example, less work); --per-loss: each attacks
    every example (its own row over all images).  adv [N, C, H, W] (the clean images) receives
    each example's first fooling image, a survivor its strongest point over every loss (lowest
    margin).  After each loss its images are classified again (recompute): the row's robust
    accuracy is the recomputed one (the cascade's: robust under it and every earlier loss).
    Before anything is reported, every example counted robust must have met every loss at the
    budget configured (work: restarts x targets x (steps + 1) iterates, or --square-queries
    points), else exit 1 (an attack that skipped it).  emit(row) logs each row as it finishes.
    -> (worst [N] raw robust mask, fooled_by [N]: index into losses or -1, {loss: mask} with --per-loss)."""
    n, dev = len(labels), labels.device
    worst = torch.ones(n, dtype=torch.bool, device=dev)
    fooled_by = torch.full((n,), -1, dtype=torch.long, device=dev)
    seen, masks = worst.clone(), {}                                         # seen: the recomputed verdicts
    closest, ran = torch.full((n,), math.inf, device=dev), {}             # margin of adv; per loss: work, robust
    for i, loss in enumerate(losses):
        idx = torch.arange(n, device=dev) if args.per_loss else worst.nonzero().squeeze(1)
        t0 = time.time()
        part, rec = torch.empty((len(idx), *images.shape[1:]), device=images.device), {}
        robust = attack_split(clf, images[idx], labels[idx], args, eps, loss, args.seed, idx, part, tally,
                              stats and loss != "square", progress, rec)
        ran[loss] = (torch.zeros(n, dtype=torch.long, device=dev).index_put((idx,), rec["work"]),
                     torch.zeros(n, dtype=torch.bool, device=dev).index_put((idx,), robust))
        first = worst[idx] & ~robust                                        # the first loss to fool it
        fooled_by[idx[first & natural[idx]]] = i
        adv[idx[first]] = part[first]
        closer = worst[idx] & robust & (rec["margin"] < closest[idx])        # a survivor's strongest point
        adv[idx[closer]], closest[idx[closer]] = part[closer], rec["margin"][closer]
        worst[idx] &= robust
        seen[idx], disagree = recompute(clf, part, images[idx], labels[idx], eps, robust & natural[idx], args, loss)
        if args.per_loss:
            masks[loss] = seen.clone()
        dt = time.time() - t0
        emit({"loss": loss, "robust_accuracy": share(seen), "attacked": len(idx),
              "fooled": int((~robust & natural[idx]).sum()), "disagreements": disagree, "seconds": dt,
              "images_per_second": len(idx) / max(dt, 1e-9)})
    classes = clf(to_float(images[:1])).shape[1]
    for loss, (work, robust) in ran.items():    # robust under the cascade or this loss => attacked in full
        runs = args.restarts * (min(args.targets or 9, classes - 1) if loss == "margin-t" else 1)
        budget = args.square_queries if loss == "square" else runs * (args.steps + 1)
        short = int(((worst | robust) & natural & (work != budget)).sum())
        if short:
            contradiction(args, f"{short} of {n} examples counted robust at eps {fmt_eps(eps)} were not attacked "
                                f"by {loss} as configured ({budget} iterates or queries each)")
    return worst, fooled_by, masks


@torch.no_grad()
def recompute(clf, x_adv, images, labels, eps, claimed, args, what):
    """The final check of AutoAttack and RobustBench: the images the verdicts rest on (each
    example's first fooling image, a survivor's strongest point) classified once more by
    the evaluated classifier clf (the user's network with its D mask, eval mode, the attack's
    precision), the reported figure recomputed from them.  Exit 1 with one line, writing nothing,
    when an image leaves the eps-ball or [0, 1] (up to 1e-6, as the check "in_ball"), or when an
    example's recomputed verdict differs from `claimed` (the bookkeeping's robust mask) by more
    than rounding can: its margin |z_y - max_{c != y} z_c| (under a D mask, or the gap between the
    D-th and (D+1)-th nearest squared distances over 2 sigma^2) must be within RECOMPUTE_MARGIN,
    and at most max(2, N / 200) verdicts may differ (a first fooling iterate sits just across
    the boundary, so a wrong record can hide within the margin: rounding flips only a few).
    A survivor's image is its strongest point (the lowest margin any loss found), so the
    recompute backs both sides: the fooled are fooled and the robust still resist there.  Where
    the two disagree within rounding the example counts as not robust: disagreement never
    raises the figure.  -> (robust [N] bool: recomputed and claimed; how many verdicts differ)."""
    robust = torch.zeros_like(claimed)
    margin = torch.zeros(len(labels), device=labels.device)
    ball = {"batches": 0, "max_excess": 0.0}
    for i in range(0, len(labels), args.batch_size):
        xa, x = x_adv[i:i + args.batch_size], to_float(images[i:i + args.batch_size])
        y = labels[i:i + args.batch_size]
        measure_ball(ball, xa, x, eps)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bool(args.amp)):
            z = clf(xa).float()
            m = (z.gather(1, y[:, None]).squeeze(1) - z.scatter(1, y[:, None], -math.inf).amax(1)).abs()
            if getattr(clf, "clusters", False) and clf.D is not None and clf.D < len(clf.centers):
                # under a D mask log p jumps to -inf: how near the D nearest centres are to changing
                sq = sq_distances(clf.model.features(xa).float(), clf.centers).topk(clf.D + 1, largest=False).values
                m = torch.minimum(m, (sq[:, clf.D] - sq[:, clf.D - 1]) / (2 * clf.sigma2))
        robust[i:i + len(y)] = z.argmax(1) == y
        margin[i:i + len(y)] = m
    differ, excess = robust != claimed, ball["max_excess"]
    unexplained = int((differ & ~(margin <= RECOMPUTE_MARGIN[bool(args.amp)])).sum())
    if int(differ.sum()) > max(2, len(labels) // 200):
        unexplained = int(differ.sum())
    if excess > 1e-6 or unexplained:
        contradiction(args, f"the recomputed {what} result at eps {fmt_eps(eps)} has " + (
            f"an image {excess:.3g} outside the eps-ball or [0, 1]" if excess > 1e-6
            else f"{unexplained} of {len(labels)} verdicts that differ beyond rounding"))
    return robust & claimed, int(differ.sum())


def contradiction(args, what):
    """The bookkeeping of the attack is contradicted (recompute, run_losses): exit 1, one line,
    and no result of this run stays (its partial log removed; nothing else was written yet)."""
    if os.path.exists(args.out + ".log.jsonl.partial"):
        os.remove(args.out + ".log.jsonl.partial")
    print(f"attack.py: {what}: this contradicts the attack's bookkeeping, a bug in attack.py; nothing "
          f"written, please report it", file=sys.stderr, flush=True)
    raise SystemExit(1)


# How far from the decision boundary (in class log-score units) a recomputed verdict may differ from
# the attack's own, {fp32: ..., bf16: ...}: the attack judged each image inside a batch of other
# size and content, so its scores differ from the recompute's by rounding.  Measured on the CPU
# (benchmarks/recompute.py, benchmarks/README.md "Recomputed figures"): batching moved margins by
# at most 4.6e-5 in fp32 and bf16; bf16 itself moves a ClusTR model's margins near the boundary by
# up to 0.78 from fp32 (Eq. (4)'s squared distances amplify the features' rounding), the bound on
# what two bf16 kernels can disagree by (a GPU picks kernels per batch size; not measured here).
# fp32 on a GPU convolves in TF32 by default (3 more mantissa bits than bf16): 0.05 allows that.
RECOMPUTE_MARGIN = {False: 0.05, True: 2.0}


def survivors(clf, images, labels, args, eps, losses, seed, tally, index=None, **budget):
    """The checks' cascade: each loss on what every earlier one left robust.  -> robust [N] raw."""
    index = torch.arange(len(labels), device=labels.device) if index is None else index
    alive = torch.ones(len(labels), dtype=torch.bool, device=labels.device)
    for loss in losses:
        idx = alive.nonzero().squeeze(1)
        alive[idx] = attack_split(clf, images[idx], labels[idx], args, eps, loss, seed, index[idx], tally=tally,
                                  **budget)
    return alive


def run_checks(clf, images, labels, args, losses, results, natural, runs, eps, tally):
    """Sanity checks (Carlini et al. 2019; Croce & Hein 2020), each able to fail and stored with its
    numbers; what a failed one means and what to try: README "attack.py: losses, cascade, checks,
    results".  runs: [(D, eps, raw robust mask, fooled_by)] of the first D; natural: its clean-correct
    mask; eps: the first eps > 0 (None: none); tally: attack_split's (the ball, the PGD runs'
    objectives).  The checks that attack again run on the first --check-images images, by default
    a tenth of them: per check image they cost at most about 4.3 headline runs (the large eps: one
    loss run, most are fooled by it; twice the steps: 2, more restarts: 1, on survivors only, and
    the headline attacked each survivor with every loss; random search and eps 0: 1/3), so about
    0.43 x the headline row's attack.  Every process runs them on the same masks; their attacks
    share the chunks as the headline's do, and the tallies are summed over the processes."""
    tol, checks, grad = args.tolerance, {}, [l for l in losses if l != "square"]
    bad = sum(int((m & ~natural).sum()) for D, e, m, _ in runs)             # on the raw masks
    checks["robust_le_natural"] = {"ok": bad == 0, "robust_but_misclassified": bad}
    if "square" in losses and grad:             # Square on the survivors of the gradient losses
        worst_share = max(share(fooled_by == losses.index("square")) for D, e, m, fooled_by in runs)
        checks["square_finds_little"] = {"ok": worst_share <= tol, "share_fooled_by_square_only":
                                         worst_share, "queries": args.square_queries, "tolerance": tol}
    curves = {}                                 # robust accuracy does not rise with eps (up to tol)
    for r in results:
        curves.setdefault((r["loss"], r["D"]), []).append((r["eps"], r["robust_accuracy"]))
    rises = [b[1] - a[1] for c in curves.values() for a, b in zip(sorted(c), sorted(c)[1:])]
    checks["monotone_in_eps"] = {"ok": max(rises) <= tol if rises else None,
                                 "max_rise": max(rises) if rises else None, "tolerance": tol}
    n = args.check_images or max(1, len(labels) // 10)
    checks.update(checks_that_attack(clf, images[:n], labels[:n], args, eps, losses, runs, natural[:n], tally))
    t = {"batches": 0, "max_excess": 0.0, "runs": 0, "rose": 0, "not_finite": 0} | tally
    if DIST["world"] > 1:                       # each process tallied its own chunks: sums, the largest excess
        t = {k: type(v)(all_sum(torch.tensor(v, dtype=torch.float64), "MAX" if k == "max_excess" else "SUM"))
             for k, v in t.items()}
    checks["objective_rises"] = {"ok": t["rose"] / t["runs"] > 0.5 if t["runs"] else None, "runs": t["runs"],
                                 "rose": t["rose"], "share_rose": t["rose"] / t["runs"] if t["runs"] else None,
                                 "not_finite": t["not_finite"], "threshold": 0.5}
    checks["in_ball"] = {"ok": t["max_excess"] <= 1e-6, "batches": t["batches"], "max_excess": t["max_excess"],
                         "tolerance": 1e-6}
    return checks


def checks_that_attack(clf, x, y, args, eps, losses, runs, clean, tally):
    """The checks that attack again, on the check images x, y (clean: their clean-correct mask):
    eps_zero_is_natural (an attack at eps 0 changes nothing, example by example); zero_gradient_share;
    beats_random_search (as many random points per example as one PGD run has iterates, seed
    --seed + 3: ok when the attack's robust accuracy is lower, or it fooled every example the
    points fooled); near_zero_at_large_eps; double_steps and double_restarts: twice the steps,
    then R more restarts, on random streams of their own (seeds + 1 and + 2; the headline uses
    --seed), on the headline's survivors among the check images (R more restarts on the survivors
    give exactly the 2R-restart figure; 2x steps give "K or 2K steps", at least as strong); the
    drop: extra fooled / check images."""
    checks, grad = {}, [l for l in losses if l != "square"]
    if grad:
        at0 = attack_split(clf, x, y, args, 0.0, grad[0], args.seed, tally=tally, steps=1, restarts=1)
        checks["eps_zero_is_natural"] = {"ok": bool(torch.equal(at0, clean)), "images": len(y),
                                         "natural": share(clean), "robust_at_eps_0": share(at0)}
        c, every, k = zero_gradient_counts(clf, to_float(x), y, grad)       # one gradient per loss
        checks["zero_gradient_share"] = {"ok": every == 0, "correct_examples": k, "every_loss": every / max(1, k),
                                         **{l: v / max(1, k) for l, v in c.items()}}
    step = max(args.step, 2.5 * args.large_eps / max(args.steps, 1))   # Madry et al.: 2.5 eps / steps
    large = survivors(clf, x, y, args, args.large_eps, losses, args.seed, tally, step=step, restarts=1) & clean
    checks["near_zero_at_large_eps"] = {"ok": share(large) <= 0.05, "eps": args.large_eps, "images": len(y),
                                        "robust_accuracy": share(large), "threshold": 0.05}
    if eps is None:
        return checks
    robust = next(m for D, e, m, _ in runs if e == eps)[:len(y)]           # the headline's raw mask
    # steps + 1 random points per example: PGD's random starts alone (0 steps, steps + 1 restarts)
    found = attack_split(clf, x, y, args, eps, "ce", args.seed + 3, tally=tally, steps=0, restarts=args.steps + 1)
    a, r, random_only = share(robust & clean), share(found & clean), int((~found & robust & clean).sum())
    checks["beats_random_search"] = {"ok": a < r or random_only == 0, "eps": eps, "images": len(y), "points":
                                     args.steps + 1, "robust_attack": a, "robust_random": r, "random_only": random_only}
    idx = robust.nonzero().squeeze(1)
    for name, seed, budget in (("double_steps", args.seed + 1, {"steps": 2 * args.steps}),
                               ("double_restarts", args.seed + 2, {})) if grad else ():
        extra = int((~survivors(clf, x[idx], y[idx], args, eps, grad, seed, tally, idx, **budget)).sum())
        drop = extra / max(len(y), 1)
        checks[name] = {"ok": drop <= args.tolerance, "eps": eps, "seed": seed, "headline_seed": args.seed,
                        "survivors": len(idx), "extra_fooled": extra, "robust_before": share(robust),
                        "robust_after": share(robust) - drop, "tolerance": args.tolerance}
    return checks


# --------------------------------------------------------------------------------------
# torchrun (README "attack.py under torchrun"): every process holds the whole test split and
# attacks every W-th chunk of each row (attack_split); the masks are summed over the processes
# after each row, so every process then holds the full result and runs the same cascade and
# checks on it.  Rank 0 alone takes the lock, prints, and writes the result, log and --save-adv.
# --------------------------------------------------------------------------------------
DIST = {"rank": 0, "world": 1}          # this process: rank 0 of 1 outside torchrun (set by start_torchrun)


def start_torchrun(args):
    """Join the process group when torchrun started this process (WORLD_SIZE, RANK and LOCAL_RANK
    all set; else a plain run, unchanged): gloo on the CPU, nccl on CUDA with this process on GPU
    LOCAL_RANK.  --dist-timeout bounds every wait for the others.  Ranks other than 0 print nothing."""
    env = [os.environ.get(v) for v in ("WORLD_SIZE", "RANK", "LOCAL_RANK")]
    if None in env:
        return                                          # a plain run, unchanged
    world, rank, local = (int(v) if v.isdigit() else -1 for v in env)
    if not (0 <= rank < world and local >= 0):
        fail("WORLD_SIZE, RANK and LOCAL_RANK must be integers with 0 <= RANK < WORLD_SIZE (as torchrun sets them)")
    cuda = pick_device(args.device).type == "cuda"      # --device cuda without CUDA: exit 2 here
    if cuda:
        torch.cuda.set_device(local)                    # "cuda" below means cuda:LOCAL_RANK
    try:
        torch.distributed.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                                             timeout=datetime.timedelta(minutes=args.dist_timeout))
    except Exception as e:                              # no peers in time, a port in use, ...
        fail(f"torchrun: process {rank} of {world} could not join the others within --dist-timeout "
             f"{args.dist_timeout:g} minutes ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]})")
    DIST.update(rank=rank, world=world)
    sys.stdout = open(os.devnull, "w") if rank else sys.stdout                # rank 0 alone prints


def all_sum(t, op="SUM"):
    """t summed (or op, a ReduceOp name) over the processes, on every process (bool -> int64 counts);
    nccl reduces on the GPU of this process."""
    t = t.to("cuda" if torch.distributed.get_backend() == "nccl" else "cpu", torch.int64 if t.dtype == torch.bool
             else t.dtype, copy=True)
    torch.distributed.all_reduce(t, op=getattr(torch.distributed.ReduceOp, op))
    return t


def rank0_first(fn):
    """fn() on rank 0, then (if it ended well) on the others: rank 0 takes the lock and may
    download the data before anyone reads it.  If rank 0 stops (bad input: exit 2, which it
    explains in one line), every process stops with its exit code, silently."""
    result, code = None, 0
    if DIST["rank"] == 0:
        try:
            result = fn()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) and e.code else 1
    if DIST["world"] > 1:
        code = int(all_sum(torch.tensor(code), "MAX"))   # rank 0's exit code (the others': 0), to all
    if code:
        raise SystemExit(code)
    return result if DIST["rank"] == 0 else fn()


def main(argv=None):
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    args = parse_args(argv)
    try:
        start_torchrun(args)
        if args.export:                 # write one file for other tools, attack nothing (section 6)
            return export_main(args) if DIST["rank"] == 0 else None
        with contextlib.ExitStack() as hold:    # rank 0 holds --out (`owned`) from prepare on
            return attack_main(args, lambda: hold.enter_context(owned(args, argv, training=False)))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        DIST.update(rank=0, world=1)


def prepare(args, own):
    """Everything before the attack: the lock of --out (rank 0), the device, the checkpoint, the
    test split on the device, the losses.  -> (device, clf, ckpt, images, labels, losses, Ds)."""
    if DIST["rank"] == 0:
        own()                               # outputs checked, --out locked: before any work
    device = setup_runtime(args, training=False)
    if device.type == "cuda":  # the batch shrinks as examples are fooled: no re-tuning per shape
        torch.backends.cudnn.benchmark = False
    try:
        clf, ckpt = read_classifier(args.ckpt, device)
    except CheckpointError as e:                                    # the command line: exit 2
        fail(str(e))
    data_dir_from_checkpoint(args, ckpt)
    info, arch = ckpt["data"], ckpt["arch"]
    if args.data not in (None, info["name"]):
        fail(f"{args.ckpt} was trained on '{info['name']}', not '{args.data}'; drop --data (the checkpoint's is used)")
    if args.width not in (None, arch["width"]):
        fail(f"--width {args.width} differs from the width {arch['width']} of {args.ckpt}; drop --width")
    args.data, args.width = info["name"], arch["width"]
    # the loss list: magnet only for clustering checkpoints, square unless --square-queries 0
    default = [l for l in DEFAULT_LOSSES if (clf.clusters or l != "magnet") and (args.square_queries or l != "square")]
    args.loss = list(dict.fromkeys(args.loss or default))
    args.targets = args.targets or min(9, info["num_classes"] - 1)         # APGD-T's
    if not clf.clusters and (set(args.loss) & {"magnet", "scores-ce"} or args.D):
        fail(f"{args.ckpt} is a '{ckpt['stage']}' one: --loss magnet, scores-ce and --D need a clustering checkpoint")
    Ds = list(dict.fromkeys(args.D)) if args.D else [clf.D if clf.clusters else None]
    if clf.clusters and any(D is not None and D > len(clf.centers) for D in Ds):
        fail(f"--D {max(D for D in Ds if D is not None)} exceeds the {len(clf.centers)} centres of {args.ckpt}")
    try:
        images, labels, classes = load_split(args.data, args.data_dir, False, args.limit)
    except DataError as e:
        fail(str(e))
    check_test_split(ckpt, args.ckpt, classes, images, args.data_dir)
    if len(labels) == 0:
        fail(f"no test images to attack in {args.data_dir} (--limit {args.limit})")
    return device, clf, ckpt, images.to(device), labels.to(device), args.loss, Ds


def attack_main(args, own):
    device, clf, ckpt, images, labels, losses, Ds = rank0_first(lambda: prepare(args, own))
    clf = clf.to(memory_format=torch.channels_last)
    compile_features(clf.model, args.compile)                       # --compile: the attacked f(x)
    n, arch, tally = len(labels), ckpt["arch"], {}
    centres = f", {len(clf.centers)} centres" if clf.clusters else ""
    print(f"attack.py | {args.ckpt} ({ckpt['stage']}, ResNet18 w={arch['width']}{centres}) | {args.data} test "
          f"in {args.data_dir}, {n} images | device {device} amp {args.amp} | torch {torch.__version__}"
          + (f" | torchrun: {DIST['world']} processes ({torch.distributed.get_backend()}), rows: rank 0's chunks"
             if DIST["world"] > 1 else ""))
    print("config: " + json.dumps(vars(args)))
    t_run = time.time()
    results, per_example, adv_runs, natural, runs = evaluate(clf, images, labels, args, losses, Ds, tally)
    t_attack = time.time() - t_run
    clf.D = Ds[0] if clf.clusters else None
    checks, t_checks = {}, 0.0
    if args.checks:
        headline = next((e for e in args.eps if e > 0), None)
        checks = run_checks(clf, images, labels, args, losses, results, natural[Ds[0]],
                            [r for r in runs if r[0] == Ds[0]], headline, tally)
        t_checks = time.time() - t_run - t_attack
        print(f"checks: {fmt_time(t_checks)} ({t_checks / max(t_attack, 1e-9):.2f}x the attack's "
              f"{fmt_time(t_attack)})", flush=True)
    out = described({"ckpt": args.ckpt, "data": args.data, "images": n, "natural_accuracy": share(natural[Ds[0]]),
                     "results": results, "checks": checks, "examples": per_example, "stage": ckpt["stage"],
                     "config": vars(args), "device": str(device), "torch": torch.__version__,
                     "world_size": DIST["world"], "attack_seconds": t_attack, "check_seconds": t_checks,
                     "seconds": time.time() - t_run, **compile_seconds()}, ATTACK_MEANING)
    if DIST["rank"] == 0:               # torchrun: the others hold the same figures, write nothing
        write_json(out, args.out)       # first: a full disk then still prints the summary
        if args.save_adv:
            save_checkpoint({"format": "clustr-adv/1", "ckpt": args.ckpt, "labels": labels.cpu(),
                             "runs": adv_runs}, args.save_adv)
        if os.path.exists(args.out + ".log.jsonl.partial"):     # now this run's log replaces the previous one
            os.replace(args.out + ".log.jsonl.partial", args.out + ".log.jsonl")
        report(out)
    if args.strict and any(c["ok"] is False for c in checks.values()):
        print("attack.py: a check failed (written in the results); exit code 1 (--no-strict: 0)", file=sys.stderr,
              flush=True)
        raise SystemExit(1)
    return out


def evaluate(clf, images, labels, args, losses, Ds, tally):
    """Every (D, eps): the losses (run_losses), one row per loss and the worst-case row (eps = 0:
    natural accuracy, nothing attacked: the worst-case row alone), per-example results.
    -> (results, per_example, adv_runs, natural {D: mask}, runs [(D, eps, raw robust mask, fooled_by)])."""
    n, log_path = len(labels), args.out + ".log.jsonl.partial"  # moved over <out>.log.jsonl beside the result
    progress = progress_printer(clf, args, losses, Ds, n)                   # rank 0 alone prints
    results, per_example, adv_runs, natural, runs = [], [], [], {}, []
    headline = next((e for e in args.eps if e > 0), None)
    for D in Ds:
        clf.D = D if clf.clusters else None
        natural[D] = natural_mask(clf, images, labels, args.batch_size)
        for eps in args.eps:
            common = {"eps": eps, "D": D, "natural_accuracy": share(natural[D])}

            def emit(row):                                                  # logged as it finishes
                results.append({"loss": row["loss"], **common, **row})
                if DIST["rank"] == 0:                                       # torchrun: rank 0 writes
                    append_jsonl(log_path, results[-1])
            adv = to_float(images).clone()                  # each example's worst-case image (run_losses)
            todo = losses if eps > 0 else []
            worst, fooled_by, masks = run_losses(clf, images, labels, args, eps, todo, natural[D], adv, tally,
                                                 D == Ds[0] and eps == headline, emit, progress)
            worst = worst if todo else natural[D].clone()   # the raw mask at eps = 0: the natural one
            # The figure reported: every saved image classified once more (what --save-adv writes)
            robust, disagree = recompute(clf, adv, images, labels, eps, worst & natural[D], args, "worst-case")
            if len(todo) != 1:  # the headline: robust only if no loss and no restart fooled it
                seconds = sum(r["seconds"] for r in results if r["eps"] == eps and r["D"] == D)
                emit({"loss": "worst-case", "robust_accuracy": share(robust), "disagreements": disagree,
                      "seconds": seconds, "images_per_second": n / seconds if seconds else None})
            runs.append((D, eps, worst, fooled_by))
            per_example.append({"eps": eps, "D": D, "index": list(range(n)), "correct": natural[D].tolist(),
                                "robust": robust.tolist(),
                                "fooled_by": [losses[i] if i >= 0 else None for i in fooled_by.tolist()],
                                **({"robust_by_loss": {l: (m & natural[D]).tolist() for l, m in masks.items()}}
                                   if masks else {})})
            if args.save_adv:
                adv_runs.append({"eps": eps, "D": D, "x_adv": adv.cpu(), "robust": robust.cpu(),
                                 "fooled_by": fooled_by.cpu(), "losses": list(losses)})
    return results, per_example, adv_runs, natural, runs


def progress_printer(clf, args, losses, Ds, n):
    """evaluate's progress: prints the header now and returns progress(loss, eps, seen, count,
    robust, seconds), one line per chunk (rank 0's) with img/s, elapsed time and ETA."""
    runs_per = {l: args.targets if l == "margin-t" else 1 for l in losses}
    attacked = sum(e > 0 for e in args.eps)
    total, done, t_run = len(Ds) * attacked * sum(runs_per.values()) * n, [0, 0], time.time()
    print(f"{'loss':<10} {'eps':>9} {'D':>4} {'images':>13} {'robust':>7} {'img/s':>8} "
          f"{'elapsed':>9} {'ETA':>9}", flush=True)

    def progress(loss, eps, seen, count, robust, seconds):            # one row per chunk (rank 0's)
        done[0] += runs_per[loss] * (seen - done[1])
        done[1] = 0 if seen == count else seen
        elapsed = time.time() - t_run
        print(f"{loss:<10} {fmt_eps(eps):>9} {'-' if not clf.clusters else clf.D or 'all':>4} "
              f"{seen:>6}/{count:<6} {share(robust):7.2%} {seen / max(seconds, 1e-9):8.1f} "
              f"{fmt_time(elapsed):>9} {fmt_time(elapsed / max(done[0], 1) * (total - done[0])):>9}",
              flush=True)
    return progress


# ======================================================================================
# 5. Report
# ======================================================================================

# The results file's "meaning" entry: each field and each check, what a failed one means and what to
# try, are described in the README section it names.
ATTACK_MEANING = "attack.py result: README.md, \"attack.py: losses, cascade, checks, results\", says what it holds"


def write_json(obj, path):
    """Atomic, like save_checkpoint: a killed run never leaves half a results file."""
    try:
        atomic_write(path, json.dumps(obj, indent=1).encode())
    except OSError as e:                                    # a full disk: the results are not lost
        report(obj)
        fail(f"cannot write {path} ({e.strerror or e}); the summary above is what this run found, "
             f"its rows are in {path}.log.jsonl.partial (rerun with another --out to keep the per-example results)")


def report(out):
    cfg = out["config"]
    cascade = not cfg["per_loss"] and len(cfg["loss"]) > 1
    print(f"\nsummary: {out['ckpt']} on {out['data']} test ({out['images']} images), "
          f"natural accuracy {out['natural_accuracy']:.2%}")
    print(f"  {'loss':<10} {'eps':>9} {'D':>4} {'steps x restarts':>16} {'natural':>8} "
          f"{'robust' + (' after' if cascade else ''):>12} {'attacked':>8} {'seconds':>8} {'img/s':>8}")
    for r in out["results"]:
        D = "-" if out["stage"] in ("nominal", "qtrades-ce") else "all" if r["D"] is None else r["D"]
        budget = f"{cfg['square_queries']} queries" if r["loss"] == "square" else f"{cfg['steps']} x {cfg['restarts']}"
        print(f"  {r['loss']:<10} {fmt_eps(r['eps']):>9} {D:>4} {budget:>16} {r['natural_accuracy']:8.2%} "
              f"{r['robust_accuracy']:12.2%} {r.get('attacked', '-'):>8} {r['seconds']:8.1f} "
              f"{r['images_per_second'] or 0:8.1f}")
    if cascade:
        print("  (cascade: each loss attacks only what the earlier ones left robust; 'robust after' "
              "= robust under it and every earlier loss; --per-loss for independent rows)")
    differ = sum(r["disagreements"] for r in out["results"] if r["loss"] == "worst-case" or len(cfg["loss"]) == 1)
    print(f"  recompute: every verdict classified again from its saved image; {differ} differed from the record "
          f"within rounding, each counted as not robust")
    for name, c in out["checks"].items():
        numbers = ", ".join(f"{k} {fmt_eps(v)}" if k == "eps" else f"{k} {v:.4g}"
                            if isinstance(v, float) else f"{k} {v}" for k, v in c.items() if k != "ok")
        print(f"  check {name:<24} {({True: 'ok', False: 'FAILED', None: 'skipped'})[c['ok']]:<7} {numbers}")
        if c["ok"] is False:
            print(f"        -> what it means, what to try: README.md \"attack.py: losses, cascade, checks, "
                  f"results\", {name}")
    headline = any(r["loss"] == "worst-case" for r in out["results"])
    print(f"  results {cfg['out']}" + ("  (headline: the worst-case rows)" if headline else ""))
    ckpt = shlex.quote(out["ckpt"])
    print("  next     " + (f"python certify.py --ckpt {ckpt}   (Prop. 1's certified radii, L2)"
                           if out["stage"] in ("magnet", "qtrades-magnet") else
                           f"python magnet.py --init {ckpt}   (ClusTR from this warm start)"
                           if out["stage"] == "nominal" else
                           f"python attack.py --ckpt {ckpt} --loss ce --schedule constant --steps 20 "
                           f"--restarts 10   (the paper's protocol, to compare)"), flush=True)


# ======================================================================================
# 6. Export and library use: a ClusTR model for torchattacks, AutoAttack, RobustBench
# ======================================================================================
# From Python: load_classifier(path, device) (section 7) -> nn.Module, images in [0, 1] -> class
# scores (z_c of Eq. (4), or the head's logits); CheckpointError on a bad file.
# From the command line: python attack.py --ckpt magnet.pt --export clustr.pt2 writes one file that
# holds the normalisation, the network, the centres mu, sigma^2 and D, loadable with torch alone:
#     model = torch.export.load("clustr.pt2").module()        # model(x): [n, C, H, W] -> [n, classes]

EXPORT_NOTE = ("images in [0, 1], float32 [n, C, H, W] -> class scores [n, classes]; clustering "
               "checkpoints: z_c = logsumexp over class c's centres of -||f - mu||^2 / (2 sigma^2), "
               "softmax(z) = Eq. (4) of ClusTR (BMVC 2021); a class outside the D nearest centres "
               "gets -8.5e37 (finite, so the DLR loss has no NaN); head checkpoints: the logits")


def export_classifier(path, out_path, D="stored"):
    """Write the ClassScores module of checkpoint `path` to out_path as a torch.export program
    (.pt2, any batch size), with a JSON note (meaning, classes, input shape) as the extra file
    "clustr.json".  The file is reloaded and checked against the in-memory module on batches
    of 1, 2 and 5 random images (max |difference| <= 1e-5).  -> max |difference|."""
    clf, ckpt = read_classifier(path, "cpu", D)
    scores = ClassScores(clf).eval()
    shape = [ckpt["arch"]["in_channels"], *ckpt["data"]["image_size"]]        # [C, H, W]
    g = torch.Generator().manual_seed(0)
    note = json.dumps({"meaning": EXPORT_NOTE, "input_shape": ["n", *shape], "classes":
                       ckpt["data"]["classes"], "dataset": ckpt["data"]["name"], "stage": ckpt["stage"],
                       "D": scores.D if scores.clusters else None, "checkpoint": os.path.basename(path),
                       "torch": torch.__version__})
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    program = torch.export.export(scores, (torch.rand(2, *shape, generator=g),), dynamic_shapes=({0: batch},))
    torch.export.save(program, out_path, extra_files={"clustr.json": note})
    reloaded = torch.export.load(out_path).module()
    with torch.no_grad():
        worst = max((reloaded(x) - scores(x)).abs().max().item()
                    for x in (torch.rand(n, *shape, generator=g) for n in (1, 2, 5)))
    if not worst <= 1e-5:
        raise RuntimeError(f"the exported {out_path} differs from the classifier by {worst:.3g}")
    return worst


def export_main(args):
    """attack.py --export PATH: write the file, print how to load it, attack nothing."""
    if args.D is not None and len(args.D) > 1:
        fail(f"--export writes one model: give one --D, not {len(args.D)}")
    check_outputs(args, False, [], ("export",))
    try:
        worst = export_classifier(args.ckpt, args.export, "stored" if args.D is None else args.D[0])
    except CheckpointError as e:
        fail(str(e))
    print(f"exported {args.ckpt} -> {args.export} (torch.export, {os.path.getsize(args.export) / 1e6:.1f} MB; "
          f"reloaded: max |difference| {worst:.1e}).\nLoad it with torch alone: "
          f"torch.export.load(PATH).module(); {EXPORT_NOTE}")
    return {"export": args.export, "format": "torch.export", "max_abs_difference": worst}


# ======================================================================================
# 7. Plumbing: identical in every stage that carries it; checked by test_all.py
# ======================================================================================

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

# --- shared: rows ---
def append_jsonl(path, record):
    """One row of an evaluation's <out>.log.jsonl.partial (moved over the log beside the result)."""
    with open(path, "a") as f:
        f.write(json_line(record))
# --- end shared: rows ---

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

# Data (README "Data"): only the test split is used; it lives on the device as uint8.
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


# --- shared: library ---
class ClassScores(nn.Module):
    """images in [0, 1] -> class scores [n, classes], the input other robustness tools expect
    (torchattacks, AutoAttack, RobustBench treat a model's output as logits).
    Clustering checkpoints: the class log-scores of Eq. (4),

        z_c = logsumexp_{j in class c} s_j,   s_j = -||f - mu_j||^2 / (2 sigma^2)       # [n, classes]

    so softmax(z) is Eq. (4) exactly and z_a - z_b = log p_a - log p_b: margins and the DLR loss
    mean what they should.  The probabilities p of Eq. (4) are not logits: softmax(p) squeezes
    every p in [0, 1] into a near-uniform distribution, whose cross-entropy gradient is tiny, so an
    attack given p overstates robustness.  Head checkpoints: the head's logits.
    With D (the D nearest centres, Sec. 4.2) a class with no centre among them has z = -inf in
    Eq. (4); here it gets LOW, a large finite negative: softmax gives it 0 all the same, and
    APGD's DLR loss, (z_y - max_{i != y} z_i) / (z_pi1 - z_pi3), which is inf/inf = NaN with
    -inf scores, stays finite."""

    LOW = torch.finfo(torch.float32).min / 4          # -8.5e37: a difference of two stays finite

    def __init__(self, clf):
        super().__init__()
        self.model = clf.model
        self.clusters = clf.clusters
        if self.clusters:
            self.register_buffer("centers", clf.centers.clone())             # mu  [M, d]
            self.register_buffer("center_classes", clf.center_classes.clone())   # [M]
            self.num_classes = int(clf.center_classes.max()) + 1            # a Python int: torch.export
            self.sigma2 = clf.sigma2                                        # sigma^2
            self.D = clf.D

    def forward(self, x):                                                   # x [n, C, H, W] in [0, 1]
        if not self.clusters:
            return self.model(x).float()                                    # logits [n, classes]
        z = class_log_scores(self.model.features(x), self.centers, self.center_classes, self.sigma2, self.D,
                             num_classes=self.num_classes)                  # Eq. (4), [n, classes]
        return z.masked_fill(z == float("-inf"), self.LOW)


def load_classifier(path, device="cpu", D="stored"):
    """The library entry point: -> an eval-mode nn.Module mapping images in [0, 1] ([n, C, H, W],
    float) to class scores [n, classes]: the class log-scores z_c of Eq. (4) for clustering
    checkpoints (see ClassScores), the logits for head checkpoints; parameters frozen.  Give it to
    torchattacks, AutoAttack or RobustBench as the model (README "Evaluate a ClusTR model with
    other tools").  A bad file raises CheckpointError, never SystemExit.  D as in read_classifier."""
    clf, _ = read_classifier(path, device, D)
    return ClassScores(clf).to(device).eval()
# --- end shared: library ---

# Checkpoints
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

# --- shared: results-json ---
# Decimals kept in the result file, by what a key's name says it holds: float32 arithmetic writes
# 0.38 as 0.3799999952316284.  An accuracy or share of n <= 10^6 images is exact at 1e-6.
DECIMALS = (("accuracy", 6), ("share", 6), ("robust", 6), ("natural", 6), ("second", 3))


def rounded(obj, key=""):
    """A copy of a results object for its JSON file: floats under keys naming an accuracy or a
    share (fractions in [0, 1]) to 6 decimals, seconds and images/s to 3; every other number
    (eps, radii, Lipschitz constants) as computed; NaN (no value) as None (JSON null)."""
    if isinstance(obj, dict):
        return {k: rounded(v, k) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, key) for v in obj]
    if isinstance(obj, float) and math.isfinite(obj):
        digits = next((d for word, d in DECIMALS if word in key), None)
        return obj if digits is None else round(obj, digits)
    return None if isinstance(obj, float) and math.isnan(obj) else obj


def described(obj, meaning):
    """{"meaning": what the file's numbers are, in which units, **rounded(obj)}."""
    return {"meaning": meaning, **rounded(obj)}
# --- end shared: results-json ---


if __name__ == "__main__":
    main()
