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
                                                        # AutoAttack, RobustBench (export_main)
    torchrun --nproc_per_node 8 attack.py --ckpt c100.pt -b 250        # 8 GPUs (nccl), or CPU
                                                        # processes (gloo): one process's result

Reads: --ckpt (any clustr/1 checkpoint, loaded with weights_only=True) and the test split of the
checkpoint's own dataset.  Writes: --out (JSON: rows per loss, eps, D; checks; per-example
results under "examples") and <out>.log.jsonl (one object per finished row: a killed run keeps
this run's rows in <out>.log.jsonl.partial); --save-adv PATH the adversarial images; with
--export, only that file.  An existing output is replaced only with --overwrite (README "Bad
input and safety").  Under torchrun (README "attack.py under torchrun") the processes share the
work, rank 0 alone writes.  From Python: load_classifier(path, device) -> nn.Module, images in
[0, 1] -> class log-scores; a bad file raises BadInput (the "classifier" block).
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

LOSSES = ("ce", "margin", "margin-t", "magnet", "scores-ce", "square")
# The default set, in the order the cascade runs it (AutoAttack's: APGD-CE, APGD-T, ..., Square
# last): the gradient losses, then the gradient-free Square attack on whatever they left robust.
# magnet needs centres, so it joins only for clustering checkpoints; scores-ce (the authors'
# code) is never a default.  benchmarks/autoattack.py compares this set with AutoAttack.
DEFAULT_LOSSES = ("ce", "margin", "margin-t", "magnet", "square")


def parse_D(text):
    """--D values: a positive integer (the D nearest centres, Sec. 4.2) or 'all' (None: every centre)."""
    return None if text == "all" else number(int, 1)(text)


def parse_args(argv=None):
    """The command line -> args; --data, --width and --data-dir None here: the checkpoint's (args_from_checkpoint)."""
    p = argparse.ArgumentParser(prog="attack.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=
                                "ClusTR evaluation: L-inf PGD of Eq. (5) (Sec. 4.2), per loss and their worst case.",
                                epilog="Radii and steps in [0, 1] pixel units (8/255 = 0.0314). The paper's protocol: "
                                "--loss ce --schedule constant --restarts 10. README \"attack.py: losses, cascade, "
                                "checks, results\" explains each flag.")
    add_common_args(p, data=None, width=None, data_dir=None)
    g = p.add_argument_group("attack (Sec. 4.2, Eq. (5); App. B)")
    g.add_argument("--ckpt", default="magnet.pt", help="checkpoint to evaluate (any stage)")
    g.add_argument("--out", default="attack.json", help="results (JSON); its rows in <out>.log.jsonl")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out, --save-adv or --export")
    g.add_argument("--export", metavar="PATH", help="attack nothing: write the classifier as one torch.export file")
    g.add_argument("--eps", type=number(float, 0, 1), nargs="+",
                   help="L-inf radii; None: 8/255 (Sec. 4.2); Table 3: 2/255 16/255 25.5/255; 0: natural accuracy")
    g.add_argument("--step", type=number(float, 0, 1), default="2/255", help="eta of the constant schedule; Sec. 4.2")
    g.add_argument("--steps", type=number(int, 0), default=100, help="PGD iterations per run; the paper: 20 and 100")
    g.add_argument("--restarts", type=number(int, 1), default=1, help="per loss and target; the paper: 10, CE alone")
    g.add_argument("--loss", nargs="+", choices=LOSSES, help="ce = Eq. (5); None: the default set, DEFAULT_LOSSES")
    g.add_argument("--targets", type=number(int, 1), help="margin-t's classes; None: min(9, classes - 1), APGD-T's")
    g.add_argument("--square-queries", type=number(int, 0), default=1000, help="per example; AutoAttack: 5000")
    g.add_argument("--per-loss", action="store_true", help="every loss on every example, not the cascade")
    g.add_argument("--save-adv", metavar="PATH", help="save each example's fooling image or strongest point")
    g.add_argument("--schedule", choices=["constant", "cosine"], default="cosine", help="eta_k: --step (Eq. (5)) "
                   "or eps (1 + cos(pi k / steps))")
    g.add_argument("--D", type=parse_D, nargs="+", help="the D nearest centres (Sec. 4.2), 'all'; None: the ckpt's")
    g.add_argument("-b", "--batch-size", type=number(int, 1), default=500, help="images attacked at once")
    g.add_argument("--checks", action=argparse.BooleanOptionalAction, default=True, help="the sanity checks")
    g.add_argument("--check-images", type=number(int, 1), help="images the checks attack again; None: a tenth")
    g.add_argument("--large-eps", type=number(float, 0, 1), default="64/255", help="check: at most 5%% robust here")
    g.add_argument("--tolerance", type=number(float, 0, 1), default=0.01, help="checks: the share of images more "
                   "steps, restarts, Square or a larger eps may change")
    g.add_argument("--strict", action=argparse.BooleanOptionalAction, default=True, help="exit 1 if a check fails")
    g.add_argument("--dist-timeout", type=number(float, 0, open_low=True), default=30.0, metavar="MIN",
                   help="torchrun: how long a process waits for the others")
    g.add_argument("--compile", nargs="?", const="inductor", choices=["inductor", "aot_eager", "eager", "cudagraphs"],
                   metavar="BACKEND", help="f(x) through torch.compile (inductor when no BACKEND is given)")
    args = p.parse_args(argv)
    args.eps = args.eps or [8 / 255]                                        # Sec. 4.2
    return args


# ======================================================================================
# 2. The method: the losses and L-inf PGD, Eq. (5); Square; Eq. (4)'s class scores
# ======================================================================================

def objective(clf, x, y, loss, target=None):
    """The per-example value an attack maximises, and the classifier's log p (which decides
    'fooled').  x [n, C, H, W] in [0, 1]; y [n]; target [n] for margin-t.
    ce, margin and margin-t need only clf(x) (any function returning log p); magnet and scores-ce
    need the features and the stored centres, so they take a clustering Classifier (its
    .model.features, .centers, .center_classes, .sigma2, .D).  -> (objective [n], log p [n, classes])."""
    if loss in ("magnet", "scores-ce"):                                     # a clustering Classifier
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


# L-inf PGD, ClusTR Eq. (5), with restarts:
#
#     x^0 = clip_[0,1](x + U[-eps, eps]),   x^{k+1} = Proj_S(x^k + eta sign(grad_x loss(x^k, y)))
#     S = {x' in [0, 1]^n : ||x' - x||_inf <= eps}
#
# clf(x) -> log-probabilities [n, classes] (the model in eval mode, parameters frozen).
# An example is fooled as soon as one iterate (x^0 included) of one restart is misclassified;
# that first fooling iterate is kept and the example leaves the batch, so later steps and
# restarts attack only the rest (the same result as attacking everything, less work).  Restarts
# are merged by whether they fooled the model, never by which reached the higher loss.  A
# survivor keeps its strongest point: the iterate of lowest margin log p_y - max_{c != y} log p_c
# over every restart and target (what the recompute classifies again: a survivor's record is
# backed by the point nearest to fooling, not by its clean image).
# margin-t runs `restarts` restarts towards each of the `targets` most likely wrong classes
# (ranked by class_scores, i.e. over all centres).  generator: a torch.Generator (None: torch's
# global one); each run draws the noise of the whole batch, so the stream does not depend on
# which examples were already fooled.
def pgd(clf, x, y, eps, step, steps, restarts=1, loss="ce", generator=None,
        targets=9, schedule="constant", stats=None, record=None):
    """L-inf PGD of Eq. (5) (the comment above).  stats (a dict, optional) accumulates, over the runs of
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


# One run of pgd (a restart, or one target of margin-t) on the examples idx still correct:
# Eq. (5)'s iterates from the random start x^0 = clip(x + (2 noise - 1) eps); writes the first
# fooling iterate into x_adv and clears still_correct where fooled; a survivor's x_adv is its
# iterate of lowest margin so far (margin [n], updated); work [n] counts the iterates.
def pgd_run(clf, x, y, eps, step, steps, loss, schedule, stats, idx, noise, target,
            x_adv, still_correct, margin, work):
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


# L-inf Square attack (Andriushchenko et al. 2020): gradient-free, score-based random search
# at the vertices of the eps-ball, AutoAttack's guard against masked gradients (saturated
# Eq. (4) probabilities, D masks).
#
#     x^0 = clip_[0,1](x + eps v),  v in {-1, +1} per (channel, column): vertical stripes
#     each query: a random s x s window (s by square_side), new values +-eps per channel in it,
#                 x' = clip_[0,1](x + delta'),  kept when the margin falls
#     margin(x) = z_y(x) - max_{c != y} z_c(x),   z = class_scores (over all centres)
#
# The example is fooled when the classifier itself (with its D mask) no longer predicts y at
# a queried point (kept even if its margin is higher); fooled examples leave.  Every point
# stays in the eps-ball and [0, 1].  A survivor's x_adv is its last accepted point.
@torch.no_grad()
def square(clf, x, y, eps, queries, generator=None, p_init=0.8, record=None):
    """L-inf Square (the comment above).  record (a dict, optional) receives per example "work", the
    points queried (a survivor: `queries`), and "margin", log p_y - max_{c != y} log p_c at x_adv.
    -> (x_adv [n, C, H, W], still_correct [n])."""
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
    for i in range(1, queries + 1):
        if fooled.any():
            x_adv[idx[fooled]], still[idx[fooled]], margin[idx[fooled]] = xk[fooled], False, lm_k[fooled]
            x0, y0, xk, m_k, lm_k, idx = (x0[~fooled], y0[~fooled], xk[~fooled], m_k[~fooled], lm_k[~fooled],
                                          idx[~fooled])
        if len(idx) == 0 or i == queries:
            break
        x_new = square_query(x0, xk, eps, square_side(i, queries, min(H, W), p_init), generator)
        m_new, lm_new, fooled = square_margin(clf, x_new, y0)
        work[idx] += 1
        better = (m_new < m_k) | fooled                 # accepted: a lower margin, or fooled
        xk = torch.where(better[:, None, None, None], x_new, xk)
        m_k, lm_k = torch.where(better, m_new, m_k), torch.where(better, lm_new, lm_k)
    x_adv[idx], margin[idx] = xk, lm_k                                      # survivors: last accepted
    return x_adv, still


def square_query(x0, xk, eps, side, generator):
    """Square's next point: a random side x side window of xk [m, C, H, W] takes new values x0 +- eps per
    channel, clipped into S.  As in the original (and AutoAttack), a window whose new values would all equal
    the current ones is drawn again before it is queried: no query is spent on a point already known."""
    m, C, H, W = xk.shape
    rows, cols = torch.arange(H, device=xk.device)[:, None], torch.arange(W, device=xk.device)   # [H, 1], [W]
    r, c = (torch.randint(0, hi, (m, 1, 1, 1), generator=generator, device=xk.device)
            for hi in (H - side + 1, W - side + 1))
    window = (rows >= r) & (rows < r + side) & (cols >= c) & (cols < c + side)   # [m, 1, H, W]
    x_new, same = xk, torch.ones(m, dtype=torch.bool, device=xk.device)   # same: signs to draw
    for _ in range(10):   # AutoAttack redraws until the window changes; bounded for an eps below rounding
        if not same.any():
            break
        sign = torch.randint(0, 2, (int(same.sum()), C, 1, 1), generator=generator, device=xk.device)
        drawn = torch.where(window[same], x0[same] + eps * (sign * 2 - 1).to(xk.dtype), xk[same]).clamp(0, 1)
        x_new = x_new.clone()
        x_new[same] = torch.min(torch.max(drawn, x0[same] - eps), x0[same] + eps)   # clipped: still in S
        same = (x_new == xk).flatten(1).all(1)
    return x_new


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
        correct = clf(x).argmax(1) == y
        x, y = x[correct].detach(), y[correct]
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


# ======================================================================================
# 3. The loop: every (D, eps, loss) over the test split in chunks, then the checks; main()
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


# One (eps, loss) attack over uint8 images in chunks of --batch-size; `budget` may override
# steps, restarts, step, queries, targets. index [N]: the images' positions in the test split
# (default 0..N-1). Each chunk draws from a torch.Generator of its own, seeded by (seed, the loss,
# its first image's index), so a loss's figure does not depend on which losses ran before, nor on
# how many processes share the chunks. tally (a dict): every chunk's x_adv measured against the
# eps-ball and [0, 1] (the check "in_ball"), and with stats the PGD runs' objectives
# (objective_rises). adv [N, C, H, W] float, when given, receives x_adv; record (a dict), pgd's and
# square's per-example "work" and "margin" [N]. Under torchrun process r
# attacks the chunks r, r + W, ...; the robust mask and adv are summed over the processes, so
# every one holds one process's result (tally stays per process: run_checks sums it).
def attack_split(clf, images, labels, args, eps, loss, seed, index=None, adv=None, tally=None, stats=False,
                 progress=None, record=None, **budget):
    """-> robust mask [N] bool, raw (not ANDed with natural accuracy: robust_le_natural compares)."""
    b = {"step": args.step, "steps": args.steps, "restarts": args.restarts, "queries": args.square_queries,
         "targets": args.targets or 9, **budget}                            # None (unresolved): APGD-T's 9
    index = torch.arange(len(labels), device=labels.device) if index is None else index
    robust, work, margin = (torch.zeros(len(labels), dtype=dtype, device=labels.device)
                            for dtype in (torch.bool, torch.long, torch.float))
    (rank, world), mine, t0 = ranks(), torch.zeros_like(robust), time.time()   # mine: this process's chunks
    for start in range(rank * args.batch_size, len(labels), world * args.batch_size):   # torchrun: r, r + W, ...
        # channels_last: measured 1.5x faster convolutions, on the CPU too
        x = to_float(images[start:start + args.batch_size]).contiguous(memory_format=torch.channels_last)
        y = labels[start:start + args.batch_size]
        key = np.random.SeedSequence([seed, int.from_bytes(loss.encode(), "little"), int(index[start])])
        g, rec = torch.Generator(x.device).manual_seed(int(key.generate_state(1)[0])), {}   # (seed, loss, chunk)
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
    if world > 1:                   # torchrun: every process holds the whole row (the others' chunks: 0 here)
        robust, work, margin = all_sum(robust) > 0, all_sum(work), all_sum(margin)
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


# The losses in turn, as AutoAttack's cascade: each attacks only the examples every earlier
# one left robust, so an example counts as robust only if no loss and no restart fooled it
# (the same worst case as every loss on every example, less work); --per-loss: each attacks
# every example (its own row over all images).  adv [N, C, H, W] (the clean images) receives
# each example's first fooling image, a survivor its strongest point over every loss (lowest
# margin).  After each loss its images are classified again (recompute): the row's robust
# accuracy is the recomputed one (the cascade's: robust under it and every earlier loss).
# Before anything is reported, every example counted robust must have met every loss at the
# budget configured (work: restarts x targets x (steps + 1) iterates, or --square-queries
# points), else exit 1 (an attack that skipped it).  emit(row) logs each row as it finishes.
def run_losses(clf, images, labels, args, eps, losses, natural, adv, tally, stats, emit, progress=None):
    """-> (worst [N] raw robust mask, fooled_by [N]: index into losses or -1, {loss: mask} with --per-loss)."""
    n, dev, masks, ran = len(labels), labels.device, {}, {}                 # ran: per loss, work and robust
    # seen: the recomputed verdicts; closest: the margin of each survivor's image in adv
    worst, seen = torch.ones(n, dtype=torch.bool, device=dev), torch.ones(n, dtype=torch.bool, device=dev)
    fooled_by, closest = torch.full((n,), -1, device=dev), torch.full((n,), math.inf, device=dev)
    for i, loss in enumerate(losses):
        idx = torch.arange(n, device=dev) if args.per_loss else worst.nonzero().squeeze(1)
        part, rec, t0 = torch.empty((len(idx), *images.shape[1:]), device=images.device), {}, time.time()
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
    robust, margin, ball = torch.zeros_like(claimed), torch.zeros(len(labels), device=labels.device), {}
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
    differ, excess = robust != claimed, ball.get("max_excess", 0.0)      # no chunk: nothing outside
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
    with contextlib.suppress(FileNotFoundError):
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
    if ranks()[1] > 1:                          # each process tallied its own chunks: sums, the largest excess
        t = {k: type(v)(all_sum(torch.tensor(v, dtype=torch.float64, device=labels.device), "MAX"
                                if k == "max_excess" else "SUM")) for k, v in t.items()}
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
# checks on it.  Rank 0 goes first (it claims --out and may download the data); it alone prints
# and writes the result, log and --save-adv.
# --------------------------------------------------------------------------------------
def join_torchrun(args):
    """Join the processes torchrun started: gloo on the CPU, nccl on CUDA with this process on GPU
    LOCAL_RANK; --dist-timeout bounds every wait for the others.  Ranks other than 0 print nothing."""
    cuda = args.device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))                # "cuda" below: cuda:LOCAL_RANK
    try:
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(
            minutes=args.dist_timeout))
    except Exception as e:                              # no peers in time, a port in use, RANK >= WORLD_SIZE
        raise BadInput(f"torchrun: no rendezvous within --dist-timeout {args.dist_timeout:g} minutes: {e}") from None
    sys.stdout = open(os.devnull, "w") if ranks()[0] else sys.stdout     # rank 0 alone prints


def ranks():
    """(this process's rank, the number of processes): (0, 1) outside torchrun."""
    on = torch.distributed.is_initialized()
    return (torch.distributed.get_rank(), torch.distributed.get_world_size()) if on else (0, 1)


def all_sum(t, op="SUM"):
    """t summed (or op, a ReduceOp name) over the processes, on every process (bool -> int64 counts)."""
    t = t.long() if t.dtype == torch.bool else t.clone()
    torch.distributed.all_reduce(t, op=getattr(torch.distributed.ReduceOp, op))
    return t


def main(argv=None):
    """The evaluation of Sec. 4.2 as a run: every (D, eps) row (evaluate), the checks, then (rank 0) the
    results (config: the resolved arguments), --save-adv and the summary."""
    args = parse_args(argv)
    if args.export is not None:                             # one file for other tools, nothing attacked
        return export_main(args)
    with contextlib.ExitStack() as hold:                    # rank 0 holds --out from prepare on
        if "LOCAL_RANK" in os.environ:                      # started by torchrun
            join_torchrun(args)
            hold.callback(torch.distributed.destroy_process_group)
        rank, world = ranks()
        try:                                                # rank 0 first; when it stops (it says why), the
            if rank:                                        # others stop too, silently
                torch.distributed.barrier()
        except RuntimeError:
            raise SystemExit(2) from None
        clf, ckpt, images, labels, Ds = prepare(args, None if rank else hold)
        if world > 1 and rank == 0:
            torch.distributed.barrier()
        t_run, tally = time.time(), {}
        results, examples, adv_runs, natural, runs = evaluate(clf, images, labels, args, args.loss, Ds, tally)
        t_attack, clf.D = time.time() - t_run, Ds[0] if clf.clusters else None
        checks = run_checks(clf, images, labels, args, args.loss, results, natural[Ds[0]], [r for r in runs if
                            r[0] == Ds[0]], next((e for e in args.eps if e > 0), None), tally) if args.checks else {}
        out = {"meaning": MEANING, **rounded({
            "ckpt": args.ckpt, "data": args.data, "images": len(labels), "natural_accuracy": share(natural[Ds[0]]),
            "results": results, "checks": checks, "examples": examples, "stage": ckpt["stage"], "config": vars(args),
            "device": images.device.type,
            "torch": torch.__version__, "world_size": world, "attack_seconds": t_attack,
            "check_seconds": time.time() - t_run - t_attack, "seconds": time.time() - t_run})}
        if rank == 0:                   # torchrun: the others hold the same figures, write nothing
            save_results(out, args.out)
            if args.save_adv:
                write_file(args.save_adv, lambda tmp: torch.save({"format": "clustr-adv/1", "ckpt": args.ckpt,
                                                                  "labels": labels.cpu(), "runs": adv_runs}, tmp))
            report(out)
    if args.strict and any(c["ok"] is False for c in checks.values()):
        print("attack.py: a check failed (see the results); exit code 1 (--no-strict: 0)", file=sys.stderr)
        raise SystemExit(1)
    return out


def prepare(args, hold):
    """Everything before the attack: the device, the classifier, --out claimed by rank 0 (`hold`, its
    ExitStack; None on the others) before any work, the losses, the D list, the test split on the
    device, the header.  -> (clf, ckpt, images, labels, Ds)."""
    device = setup_runtime(args, training=False)
    clf, ckpt = read_classifier(args.ckpt, device)
    args_from_checkpoint(args, ckpt)
    if hold is not None:
        hold.enter_context(claimed(args, [("--out", args.out), ("--save-adv", args.save_adv)], [args.ckpt]))
    # the loss list: magnet only for clustering checkpoints, square unless --square-queries 0
    default = [l for l in DEFAULT_LOSSES if (clf.clusters or l != "magnet") and (args.square_queries or l != "square")]
    args.loss = list(dict.fromkeys(args.loss or default))
    args.targets = args.targets or min(9, ckpt["data"]["num_classes"] - 1)         # APGD-T's
    Ds, centres = list(dict.fromkeys(args.D or [clf.D if clf.clusters else None])), len(getattr(clf, "centers", []))
    if not clf.clusters and (set(args.loss) & {"magnet", "scores-ce"} or args.D) or max(D or 0 for D in Ds) > centres:
        raise BadInput(f"{args.ckpt} is a '{ckpt['stage']}' checkpoint with {centres} centres: --loss magnet and "
                       f"scores-ce need a clustering checkpoint, --D at most its centres")
    images, labels = read_test_split(args, ckpt, device)
    check_forward(lambda x: clf(x).exp(), images, args.ckpt)   # p: log p is -inf outside the D nearest
    clf = clf.to(memory_format=torch.channels_last)
    if args.compile:                                        # the attacked f(x), compiled on this instance
        clf.model.features = torch.compile(clf.model.features, backend=args.compile)
    if hold is not None:                                    # this run's rows (a killed run's are dropped)
        open(args.out + ".log.jsonl.partial", "w").close()
    print(f"attack.py | {args.ckpt} ({ckpt['stage']}, ResNet18 w={args.width}, {centres} centres) | {args.data} "
          f"test in {args.data_dir}, {len(labels)} images | device {device} amp {args.amp} | {ranks()[1]} process(es) "
          f"| torch {torch.__version__}\nconfig: {json.dumps(vars(args))}")
    return clf, ckpt, images, labels, Ds


def evaluate(clf, images, labels, args, losses, Ds, tally):
    """Every (D, eps): the losses (run_losses), one row per loss and the worst-case row (eps = 0:
    natural accuracy, nothing attacked: the worst-case row alone), per-example results.
    -> (results, per_example, adv_runs, natural {D: mask}, runs [(D, eps, raw robust mask, fooled_by)])."""
    n, progress = len(labels), progress_printer(clf, args, losses, Ds, len(labels))   # rank 0 alone prints
    results, per_example, adv_runs, natural, runs = [], [], [], {}, []
    headline = next((e for e in args.eps if e > 0), None)
    for D in Ds:
        clf.D = D if clf.clusters else None
        natural[D] = natural_mask(clf, images, labels, args.batch_size)
        for eps in args.eps:
            common = {"eps": eps, "D": D, "natural_accuracy": share(natural[D])}

            def emit(row):                                                  # logged as it finishes
                results.append({"loss": row["loss"], **common, **row})
                if ranks()[0] == 0:                                         # torchrun: rank 0 writes
                    append_row(args.out + ".log.jsonl.partial", results[-1])
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
                                "robust": robust.tolist(), "fooled_by": [losses[i] if i >= 0 else None for i in
                                                                         fooled_by.tolist()], **({"robust_by_loss": {
                                    l: (m & natural[D]).tolist() for l, m in masks.items()}} if masks else {})})
            if args.save_adv:
                adv_runs.append({"eps": eps, "D": D, "x_adv": adv.cpu(), "robust": robust.cpu(),
                                 "fooled_by": fooled_by.cpu(), "losses": list(losses)})
    return results, per_example, adv_runs, natural, runs


def progress_printer(clf, args, losses, Ds, n):
    """evaluate's progress: prints the header now and returns progress(loss, eps, seen, count,
    robust, seconds), one line per chunk (rank 0's) with img/s, elapsed time and ETA."""
    runs_per, done, t_run = {l: args.targets if l == "margin-t" else 1 for l in losses}, [0, 0], time.time()
    total = len(Ds) * sum(e > 0 for e in args.eps) * sum(runs_per.values()) * n      # image runs to do
    print(f"{'loss':<10} {'eps':>9} {'D':>4} {'images':>13} {'robust':>7} {'img/s':>8} {'elapsed':>9} {'ETA':>9}")

    def progress(loss, eps, seen, count, robust, seconds):            # one row per chunk (rank 0's)
        done[0] += runs_per[loss] * (seen - done[1])
        done[1] = 0 if seen == count else seen
        elapsed = time.time() - t_run
        print(f"{loss:<10} {fmt_eps(eps):>9} {'-' if not clf.clusters else clf.D or 'all':>4} "
              f"{seen:>6}/{count:<6} {share(robust):7.2%} {seen / max(seconds, 1e-9):8.1f} "
              f"{fmt_time(elapsed):>9} {fmt_time(elapsed / max(done[0], 1) * (total - done[0])):>9}", flush=True)
    return progress


# The results file's "meaning" entry: each field and each check, what a failed one means and what to
# try, are described in the README section it names.
MEANING = "attack.py result: README.md, \"attack.py: losses, cascade, checks, results\", says what it holds"


def report(out):
    """The summary: one row per result, the recompute, one line per check, the next command."""
    cfg, ckpt = out["config"], out["ckpt"]
    cascade = not cfg["per_loss"] and len(cfg["loss"]) > 1
    print(f"\nsummary: {ckpt} on {out['data']} test ({out['images']} images), natural accuracy "
          f"{out['natural_accuracy']:.2%}; attack {fmt_time(out['attack_seconds'])}, checks "
          f"{fmt_time(out['check_seconds'])}\n  {'loss':<10} {'eps':>9} {'D':>4} {'steps x restarts':>16} "
          f"{'natural':>8} {'robust' + (' after' if cascade else ''):>12} {'attacked':>8} {'seconds':>8} {'img/s':>8}")
    for r in out["results"]:
        D = "-" if out["stage"] in ("nominal", "qtrades-ce") else "all" if r["D"] is None else r["D"]
        budget = f"{cfg['square_queries']} queries" if r["loss"] == "square" else f"{cfg['steps']} x {cfg['restarts']}"
        print(f"  {r['loss']:<10} {fmt_eps(r['eps']):>9} {D:>4} {budget:>16} {r['natural_accuracy']:8.2%} "
              f"{r['robust_accuracy']:12.2%} {r.get('attacked', '-'):>8} {r['seconds']:8.1f} "
              f"{r['images_per_second'] or 0:8.1f}")
    differ = sum(r["disagreements"] for r in out["results"] if r["loss"] == "worst-case" or len(cfg["loss"]) == 1)
    print(("  (cascade: each loss attacks only what the earlier ones left robust; 'robust after' = robust under it "
           "and every earlier loss; --per-loss for independent rows)\n" if cascade else "") + f"  recompute: every "
          f"verdict classified again from its saved image; {differ} differed from the record within rounding, each "
          f"counted as not robust")
    for name, c in out["checks"].items():
        numbers = ", ".join(f"{k} {fmt_eps(v) if k == 'eps' else f'{v:.4g}' if isinstance(v, float) else v}"
                            for k, v in c.items() if k != "ok")
        print(f"  check {name:<24} {({True: 'ok', False: 'FAILED', None: 'skipped'})[c['ok']]:<7} {numbers}"
              + (f"\n        -> what it means, what to try: README.md \"attack.py: losses, cascade, checks, results\", "
                 f"{name}" if c["ok"] is False else ""))
    headline = any(r["loss"] == "worst-case" for r in out["results"])
    limit = cfg["limit"] and f" --limit {cfg['limit']}"
    print(f"  results {cfg['out']}" + ("  (headline: the worst-case rows)" if headline else "") + "\n  next     " + (
        f"python certify.py --ckpt {ckpt}{limit or ''}  (Prop. 1's certified radii, L2)" if out["stage"] in ("magnet",
        "qtrades-magnet") else f"python magnet.py --init {ckpt}   (ClusTR from this warm start)" if out["stage"] ==
        "nominal" else f"python attack.py --ckpt {ckpt} --loss ce --schedule constant --steps 20 --restarts 10   "
        f"(the paper's protocol, to compare)"), flush=True)


# --------------------------------------------------------------------------------------
# --export: a ClusTR model for torchattacks, AutoAttack, RobustBench
# (README "Evaluate a ClusTR model with other tools").  From Python: load_classifier(path, device)
# (section 4, "classifier") -> nn.Module, images in [0, 1] -> class scores (z_c of Eq. (4), or the
# head's logits); BadInput on a bad file.  From the command line: python attack.py --ckpt magnet.pt --export clustr.pt2
# writes one file that holds the normalisation, the network, the centres mu, sigma^2 and D,
# loadable with torch alone:
#     model = torch.export.load("clustr.pt2").module()        # model(x): [n, C, H, W] -> [n, classes]
# --------------------------------------------------------------------------------------
EXPORT_NOTE = ("images in [0, 1], float32 [n, C, H, W] -> class scores [n, classes]; clustering "
               "checkpoints: z_c = logsumexp over class c's centres of -||f - mu||^2 / (2 sigma^2), "
               "softmax(z) = Eq. (4) of ClusTR (BMVC 2021); a class outside the D nearest centres "
               "gets -8.5e37 (finite, so the DLR loss has no NaN); head checkpoints: the logits")


def export_classifier(path, out_path, D="stored"):
    """Write the class scores of checkpoint `path` (load_classifier's module) to out_path as a torch.export
    program (.pt2, any batch size), with a JSON note (meaning, classes, input shape) as the extra file
    "clustr.json".  The file is reloaded and checked against the in-memory module on batches
    of 1, 2 and 5 random images (max |difference| <= 1e-5).  -> max |difference|."""
    scores, ckpt = read_classifier(path, "cpu", D, scores=True)
    shape, g = [ckpt["arch"]["in_channels"], *ckpt["data"]["image_size"]], torch.Generator().manual_seed(0)  # [C, H, W]
    note = json.dumps({"meaning": EXPORT_NOTE, "input_shape": ["n", *shape], "classes": ckpt["data"]["classes"],
                       "dataset": ckpt["data"]["name"], "stage": ckpt["stage"], "torch": torch.__version__,
                       "D": scores.D if scores.clusters else None, "checkpoint": os.path.basename(path)})
    program = torch.export.export(scores, (torch.rand(2, *shape, generator=g),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1 << 16)},))
    write_file(out_path, lambda tmp: torch.export.save(program, tmp, extra_files={"clustr.json": note}))
    reloaded = torch.export.load(out_path).module()
    with torch.no_grad():
        worst = max((reloaded(x) - scores(x)).abs().max().item()
                    for x in (torch.rand(n, *shape, generator=g) for n in (1, 2, 5)))
    if not worst <= 1e-5:
        raise RuntimeError(f"the exported {out_path} differs from the classifier by {worst:.3g}")
    return worst


def export_main(args):
    """attack.py --export PATH: write the file (the output rule of `claimed`), print how to load it."""
    if len(args.D or []) > 1:
        raise BadInput(f"--export writes one model: give one --D, not {len(args.D)}")
    with claimed(args, [("--export", args.export)], [args.ckpt]):
        worst = export_classifier(args.ckpt, args.export, "stored" if args.D is None else args.D[0])
    print(f"exported {args.ckpt} -> {args.export} (torch.export, {os.path.getsize(args.export) / 1e6:.1f} MB; "
          f"reloaded: max |difference| {worst:.1e}).\nLoad it with torch alone: "
          f"torch.export.load(PATH).module(); {EXPORT_NOTE}")
    return {"export": args.export, "format": "torch.export", "max_abs_difference": worst}


# ======================================================================================
# 4. Copied plumbing (model, command line, files, data, checkpoints; the evaluated classifier and
#    the library entry point load_classifier; the results): each block identical in every stage
#    that carries it; checked by test_all.py
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


# --- shared: classifier ---
# The evaluated classifier, read from any clustr/1 checkpoint (attack.py, certify.py), and the library
# entry point load_classifier (README "Evaluate a ClusTR model with other tools").
class Classifier(nn.Module):
    """images in [0, 1] -> log-probabilities [n, classes], the form the attacks and certificates here
    work on; with scores=True, class scores, the input other robustness tools expect (torchattacks,
    AutoAttack, RobustBench treat a model's output as logits).  Head checkpoints (nominal,
    qtrades-ce): the linear head's logits.  Clustering checkpoints (magnet, qtrades-magnet): the
    class log-scores of Eq. (4) over the stored centres and sigma^2 (optionally the D nearest),

        z_c = logsumexp_{j in class c} s_j,   s_j = -||f - mu_j||^2 / (2 sigma^2)       # [n, classes]

    so softmax(z) is Eq. (4) exactly and z_a - z_b = log p_a - log p_b: margins and the DLR loss
    mean what they should.  The probabilities p of Eq. (4) are not logits: softmax(p) squeezes
    every p in [0, 1] into a near-uniform distribution, whose cross-entropy gradient is tiny, so an
    attack given p overstates robustness.
    With D (the D nearest centres, Sec. 4.2) a class with no centre among them has z = -inf in
    Eq. (4); as scores it gets LOW, a large finite negative: softmax gives it 0 all the same, and
    APGD's DLR loss, (z_y - max_{i != y} z_i) / (z_pi1 - z_pi3), which is inf/inf = NaN with
    -inf scores, stays finite."""

    LOW = torch.finfo(torch.float32).min / 4          # -8.5e37: a difference of two stays finite

    def __init__(self, model, clusters=None, D=None, scores=False):
        super().__init__()
        self.model, self.clusters, self.scores = model, clusters is not None, scores
        if self.clusters:
            self.register_buffer("centers", torch.as_tensor(clusters["centers"]).float())             # mu [M, d]
            self.register_buffer("center_classes", torch.as_tensor(clusters["center_classes"]).long())  # [M]
            self.num_classes = int(self.center_classes.max()) + 1            # a Python int: torch.export
            self.sigma2, self.D = float(clusters["variance"]), D             # sigma^2, D

    def forward(self, x):                                                    # x [n, C, H, W] in [0, 1]
        if not self.clusters:
            z = self.model(x).float()                                        # logits [n, classes]
            return z if self.scores else F.log_softmax(z, dim=1)
        f = self.model.features(x)                                           # [n, 8w]
        if not self.scores:                                                  # log of Eq. (4) [n, classes]
            return cluster_log_probs(f, self.centers, self.center_classes, self.sigma2, self.D)
        z = class_log_scores(f, self.centers, self.center_classes, self.sigma2, self.D, num_classes=self.num_classes)
        return z.masked_fill(z == float("-inf"), self.LOW)


def build_model(ckpt, path, with_head):
    """The checkpoint's ResNet18 (its `arch` and `data` entries), its weights loaded with strict=True."""
    try:
        model = ResNet18(ckpt["data"]["num_classes"] if with_head else 0, ckpt["arch"]["width"],
                         ckpt["arch"]["in_channels"], ckpt["data"]["mean"], ckpt["data"]["std"])
        model.load_state_dict(ckpt["model"], strict=True)
    except Exception as e:          # a wrong shape, a missing key, a damaged `arch` or `data` entry
        raise BadInput(f"the weights in {path} do not fit its ResNet18: {' '.join(str(e).split())[:300]}") from None
    return model


def read_classifier(path, device="cpu", D="stored", scores=False):
    """-> (Classifier, ckpt), in eval mode with gradients off for its parameters, so an attack never
    updates batch-norm statistics (README "Where this differs from the paper and the authors'
    code").  D="stored" uses the checkpoint's D; None means all centres.  A bad file (one that does
    not compute on a blank batch either) raises BadInput."""
    ckpt = read_checkpoint(path)
    head = ckpt["stage"] in ("nominal", "qtrades-ce")
    model = build_model(ckpt, path, with_head=head)
    try:
        clusters = None if head else ckpt["clusters"]
        if clusters and not (clusters["variance"] > 0 and clusters["center_classes"].unique().tolist()
                             == list(range(ckpt["data"]["num_classes"]))):          # sigma^2 > 0, every class
            raise ValueError("sigma^2 <= 0, or centre classes that are not the data's classes 0..C-1")
        D = (clusters or {}).get("D") if D == "stored" else D
        clf = Classifier(model, clusters, D, scores).to(device).eval().requires_grad_(False)
        clf(torch.zeros(2, ckpt["arch"]["in_channels"], *ckpt["data"]["image_size"], device=device))
    except Exception as e:          # no clusters entry, or centres that do not fit the features
        raise BadInput(f"{path}: its classifier does not compute ({type(e).__name__}: {str(e)[:200]})") from None
    return clf, ckpt


def load_classifier(path, device="cpu", D="stored"):
    """The library entry point: -> an eval-mode nn.Module mapping images in [0, 1] ([n, C, H, W],
    float) to class scores [n, classes] (Classifier with scores=True), parameters frozen.  Give it
    to torchattacks, AutoAttack or RobustBench as the model.  A bad file raises BadInput, never
    SystemExit.  D as in read_classifier."""
    return read_classifier(path, device, D, scores=True)[0]


def args_from_checkpoint(args, ckpt):
    """--data and --width: the checkpoint's (others are refused); --data-dir left unset: the folder the
    checkpoint's run read (stored absolute by the stages) where it still exists, else ./data.  A relative
    stored path is not used: it counted from a folder that is not known here."""
    info, width, stored = ckpt["data"], ckpt["arch"]["width"], ckpt["args"].get("data_dir")
    if args.data not in (None, info["name"]) or args.width not in (None, width):
        raise BadInput(f"{args.ckpt} holds a width-{width} ResNet18 of --data {info['name']}: drop --data and --width")
    args.data, args.width = info["name"], width
    usable = isinstance(stored, str) and os.path.isabs(stored) and os.path.isdir(stored)
    args.data_dir = os.path.abspath(args.data_dir or (stored if usable else "./data"))


def read_test_split(args, ckpt, device):
    """The test split of --data in --data-dir (its first --limit images), on the device; its class names
    (and their order) and image shape must be the checkpoint's.  -> (images uint8, labels)."""
    try:
        images, labels, classes = load_split(args.data, args.data_dir, False, args.limit)
    except Exception as e:          # missing, not downloadable, unreadable, images of two sizes
        raise BadInput(f"cannot read the test split of --data {args.data} from {args.data_dir}: {type(e).__name__}: "
                       f"{e} (README \"Data\" says where the files go)") from None
    shape = [ckpt["arch"]["in_channels"], *ckpt["data"]["image_size"]]
    if classes != ckpt["data"]["classes"] or list(images.shape[1:]) != shape or labels.max() >= len(classes):
        raise BadInput(f"the test split in {args.data_dir} (classes {classes}, images {list(images.shape[1:])}) is "
                       f"not what {args.ckpt} was trained on (classes {ckpt['data']['classes']}, images {shape})")
    return images.to(device), labels.to(device)
# --- end shared: classifier ---


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
# --- end shared: results-json ---


# --- shared: rows ---
# An evaluation's rows: one JSON object per finished row, appended to <out>.log.jsonl.partial (a
# killed run keeps them there); with the results, they replace the previous run's <out>.log.jsonl.
def append_row(path, record):
    """One row of <out>.log.jsonl.partial; NaN and inf are written as null (JSON has neither)."""
    with open(path, "a") as f:
        f.write(json.dumps(json.loads(json.dumps(record), parse_constant=lambda c: None)) + "\n")


def save_results(obj, path):
    """The results JSON (write_file: tmp + os.replace), then this run's rows over the previous run's log."""
    write_file(path, lambda tmp: open(tmp, "w").write(json.dumps(obj, indent=1)))
    os.replace(path + ".log.jsonl.partial", path + ".log.jsonl")
# --- end shared: rows ---


if __name__ == "__main__":
    guarded(main)()
