"""synthetic.py -- ClusTR's controlled 2-D experiment (Alfarra, Perez et al., BMVC 2021, Sec. 4.1,
Fig. 3): does the warm start give larger certified radii than the Magnet loss from random
initialisation, at about equal accuracy?

Paper: "Rethinking Clustering for Robustness", Sec. 4.1 and Fig. 3; Eq. (3) (Magnet loss),
Prop. 1 (robustness radius of a nearest-cluster classifier), Sec. 3.3 (warm start).

Per dataset and per seed:
  data      two 2-D binary datasets generated here with the seed: two interleaved half-moons, two
            concentric circles (Fig. 3 (a), (c) are pictures, not in the paper's text: our choice).
  network   the feature map f: 2 -> 20 -> 20 -> d with ReLU (Sec. 4.1: "a 3-layered neural network
            with 20 hidden units"); d = 2 (--feat-dim).  K = 1 cluster per class (Sec. 4.1).
  run (1)   random_init: the Magnet loss, Eq. (3), from random weights.
  run (2)   warm_start (ClusTR, Sec. 3.3): cross-entropy through a linear head d -> 2, then the head
            is removed and f is fine-tuned with the Magnet loss.
            Both runs start from the same random weights and take the same number of full-batch
            Adam steps (--steps); the warm start spends --warm-steps of them on cross-entropy.
  classify  nearest class centre (K = 1, D = 1: the setting of Prop. 1); centre = class mean of the
            training features.
  certify   the exact L2 Lipschitz constant L of f, from an enumeration of its linear regions in the
            plane; Prop. 1: R(x) = (||f(x)-mu_2||^2 - ||f(x)-mu_1||^2) / (2 L ||mu_2-mu_1||);
            certified accuracy at r = share of test points classified correctly with R(x) > r.
Every seed is run and reported (mean, std, and each seed's own figures); none is picked.

Measured (2026-11-25, `python synthetic.py`, torch 2.14.1 CPU, one thread of a 2-core AMD EPYC
VM shared with other jobs, load ~5): 31.6 s wall, 20.4 s CPU.  Test accuracy 98.6-99.2% for both
runs (means over 5 seeds).  The warm start had the larger mean certified radius in 4/5 seeds on
moons (+0.044 +- 0.063 input units) and 5/5 on circles (+0.036 +- 0.030); with seeds 5-14: 7/10
and 10/10; with --ft-lr 1e-2: 3/5 and 4/5.  So here the paper's claim holds on average and in most
seeds, not in every one, and depends on the fine-tuning rate.

Usage (copy-paste):
    python synthetic.py                          # 5 seeds x 2 datasets -> synthetic.json, .png
    python synthetic.py --seeds 10 --seed 100    # other seeds
    python synthetic.py --steps 2000             # longer training (both runs)
    python synthetic.py --alpha 12.5 --ft-lr 1e-2   # another Magnet margin / fine-tuning rate
    python synthetic.py --plot none              # no figure

Reads nothing (no download).  Writes --out (JSON, README "Result files"), <out>.log.jsonl (one object
per run) and --plot (PNG, 2x2 like Fig. 3; needs matplotlib, skipped with a note without it).
Runs on the CPU in one thread (the networks are tiny: threads and GPUs only add overhead).
Needs torch and numpy; imports no other file of this repository: copy it freely.  Blocks between
"# --- shared: NAME ---" markers are identical copies of the same blocks in the other stages.

Lineage: Magnet loss (Rippel et al. 2016); Adam (Kingma & Ba 2014); the two toy datasets as made
popular by scikit-learn's make_moons / make_circles (re-written here with numpy).
"""

import argparse
import contextlib
import copy
import fcntl
import json
import math
import os
import random
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

RUNS = ("random_init", "warm_start")


def parse_args(argv=None):
    """The command line -> checked args (bad input: one line, exit code 2)."""
    p = argparse.ArgumentParser(
        prog="synthetic.py",
        description="ClusTR's controlled experiment (Sec. 4.1, Fig. 3): Magnet loss (Eq. (3)) from "
                    "random weights vs. ClusTR's warm start, on two 2-D datasets; exact Lipschitz "
                    "constant and Prop. 1 certified accuracy vs. radius, over several seeds.",
        formatter_class=HelpFormatter)
    add_args(p)
    args = p.parse_args(argv)
    if args.warm_steps is None:
        args.warm_steps = args.steps // 2
    if args.seeds < 1 or args.steps < 1:
        fail("--seeds and --steps must be at least 1")
    if not 0 <= args.seed <= 2 ** 32 - args.seeds:                  # numpy seeds: [0, 2^32)
        fail(f"--seed must be in [0, 2^32 - --seeds], not {args.seed}")
    if not 0 <= args.warm_steps <= args.steps:
        fail(f"--warm-steps must be in [0, --steps = {args.steps}], not {args.warm_steps}")
    if args.n < 4:
        fail(f"--n {args.n}: each class needs at least 2 points (sigma^2 of Eq. (3) divides by N-1)")
    if min(args.noise_moons, args.noise_circles, args.alpha) < 0:
        fail("--noise-moons, --noise-circles and --alpha must not be negative")
    if min(args.lr, args.ft_lr) <= 0 or args.hidden < 1 or args.feat_dim < 1 or args.radii < 2:
        fail("--lr and --ft-lr must be > 0, --hidden and --feat-dim >= 1, --radii >= 2")
    return args


def add_args(p):
    """The one flag shared with the image stages, --seed, then Sec. 4.1's experiment: data,
    network, the two runs' training, the certified-accuracy curve."""
    # The common image flags of README "Flags" (--data, --width, --limit, --device, ...) do not
    # apply: no images, no ResNet, always the CPU.
    p.add_argument_group("common").add_argument(
        "--seed", type=int, default=0, help="first seed; seed s generates the data and the initial weights of its runs")
    g = p.add_argument_group("experiment (Sec. 4.1; the paper gives no hyper-parameters for it)")
    g.add_argument("--seeds", type=int, default=5,
                   help="number of seeds (--seed, --seed+1, ...): results are mean and std over them")
    g.add_argument("--out", default="synthetic.json", help='results JSON (README "Result files")')
    g.add_argument("--plot", default="synthetic.png", help="2x2 PNG like Fig. 3 ('none' to skip; needs matplotlib)")
    g.add_argument("--datasets", nargs="+", choices=["moons", "circles"], default=["moons", "circles"],
                   help="which toy datasets (Fig. 3 (a), (c): two binary 2-D sets)")
    g.add_argument("--n", type=int, default=1000, help="points per split (train and test), balanced")
    g.add_argument("--noise-moons", type=float, default=0.15, help="Gaussian noise std of the moons; chosen so "
                   "that ~99%% test accuracy is the ceiling, the accuracy Sec. 4.1 reports")
    g.add_argument("--noise-circles", type=float, default=0.1,
                   help="Gaussian noise std of the circles (radii 1 and 0.5); ~99%% ceiling as above")
    g.add_argument("--hidden", type=int, default=20, help="hidden units per layer (Sec. 4.1: 20)")
    g.add_argument("--feat-dim", type=int, default=2, help="feature dimension d (not in the paper); 2 separates "
                   "two clusters with room to spare and keeps every region Jacobian a 2x2 matrix")
    g.add_argument("--steps", type=int, default=1000, help="full-batch Adam steps per run, the same for both runs "
                   "(the warm start's cross-entropy steps included)")
    g.add_argument("--warm-steps", type=int, default=None,
                   help="of --steps, the warm start's cross-entropy steps (default: half of --steps)")
    g.add_argument("--lr", type=float, default=1e-2,
                   help="Adam lr from random weights (both runs' first phase); App. A's nominal lr")
    g.add_argument("--ft-lr", type=float, default=1e-3, help="Adam lr of the warm start's Magnet fine-tuning; "
                   "smaller than --lr as in App. A (1e-4 after 1e-2 on CIFAR)")
    g.add_argument("--alpha", type=float, default=1.0,
                   help="Magnet margin alpha of Eq. (3); Sec. 4.1 gives none. With App. A's CIFAR10 value 12.5 the "
                        "Magnet loss from random weights collapsed on 1 of 5 moons seeds (78%% accuracy) in 1000 "
                        "steps, so the runs were not at equal accuracy as Sec. 4.1 has them; with 1 all runs reach "
                        "~99%%")
    g.add_argument("--radii", type=int, default=41,
                   help="points of the certified-accuracy curve, 0 to the largest radius seen")
    g.add_argument("--table-radii", type=float, nargs="+", default=[0.05, 0.1, 0.15, 0.2],
                   help="radii (input units) at which the summary table shows certified accuracy")


# ======================================================================================
# 2. Data and model: two binary 2-D sets made with a seed (no download); the net of Sec. 4.1
# ======================================================================================

def make_moons(n, noise, rng):
    """Two interleaved half-moons: class 0 on the upper unit half-circle (cos t, sin t), class 1 on
    the lower one (1 - cos t, 1/2 - sin t), t ~ U[0, pi]; centred; plus N(0, noise^2 I)."""
    n0 = n // 2
    t = rng.uniform(0.0, math.pi, n)
    upper = np.stack([np.cos(t[:n0]), np.sin(t[:n0])], 1)
    lower = np.stack([1 - np.cos(t[n0:]), 0.5 - np.sin(t[n0:])], 1)
    x = np.concatenate([upper, lower]) - np.array([0.5, 0.25]) + rng.normal(0, noise, (n, 2))
    return x, np.r_[np.zeros(n0), np.ones(n - n0)]


def make_circles(n, noise, rng, factor=0.5):
    """Two concentric circles: class 0 of radius 1, class 1 of radius `factor`, angle ~ U[0, 2 pi);
    plus N(0, noise^2 I)."""
    n0 = n // 2
    t = rng.uniform(0.0, 2 * math.pi, n)
    radius = np.r_[np.ones(n0), np.full(n - n0, factor)]
    x = radius[:, None] * np.stack([np.cos(t), np.sin(t)], 1) + rng.normal(0, noise, (n, 2))
    return x, np.r_[np.zeros(n0), np.ones(n - n0)]


DATASETS = {"moons": make_moons, "circles": make_circles}


def make_dataset(name, n, noise, seed):
    """-> (x_train, y_train, x_test, y_test) as float32 [n, 2] / int64 [n] tensors; the stream is
    fixed by (seed, dataset), so every dataset and seed has its own sample."""
    rng = np.random.default_rng([seed, list(DATASETS).index(name)])
    x, y = DATASETS[name](n, noise, rng)
    xt, yt = DATASETS[name](n, noise, rng)
    return tuple(torch.tensor(a, dtype=torch.float32 if a.ndim == 2 else torch.long)
                 for a in (x, y, xt, yt))


# ---- the model: f of Sec. 4.1 (and the warm start's linear head) -----------------------

def feature_net(hidden=20, d=2):
    """f: R^2 -> R^d, 2 -> hidden -> hidden -> d with ReLU (Sec. 4.1: 3 layers, 20 hidden units).
    ClusTR classifies by clusters of f(x); the cross-entropy warm start adds a head d -> classes."""
    return nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, d))


# ======================================================================================
# 3. The method: exact Lipschitz constant (Sec. 4.1), Prop. 1 radii, Magnet loss (Eq. (3))
# ======================================================================================

# ---- exact Lipschitz constant of a ReLU network on the plane -------------------------
# f is continuous and piecewise affine: on each linear region (a convex polygon where every ReLU
# keeps one on/off state) f(x) = J x + c.  Its L2 Lipschitz constant is exactly the largest
# spectral norm ||J||_2 over the full-dimensional regions: a segment [a, b] crosses finitely many
# regions, so ||f(b) - f(a)|| <= max ||J|| ||b - a||, and inside the region of the largest ||J||
# a short step along J's top right-singular vector attains it.  Enumeration: the first layer's
# lines a_i.x + b_i = 0 cut the plane into convex cells; in each cell the next layer's
# pre-activations are affine again, and their zero lines cut the cell further; and so on.
# The plane is unbounded, so the cutting happens in a box [-R, R]^2 whose R is grown until
# provably nothing lies outside it (see linear_regions).

def _affine_layers(net):
    """An nn.Sequential of nn.Linear / nn.ReLU on 2-D inputs -> [(W, b) or None for ReLU], float64."""
    layers = []
    for m in net:
        if not isinstance(m, (nn.Linear, nn.ReLU)):
            raise TypeError(f"exact_lipschitz takes nn.Linear and nn.ReLU, not {type(m).__name__}")
        layers.append(None if isinstance(m, nn.ReLU) else (
            m.weight.detach().cpu().double().numpy(),
            np.zeros(m.out_features) if m.bias is None else m.bias.detach().cpu().double().numpy()))
    if not layers or layers[0] is None or layers[0][0].shape[1] != 2:
        raise ValueError("exact_lipschitz needs a network whose first layer is nn.Linear(2, ...)")
    return layers


def _cut(P, a, c, tol=1e-11):
    """Cut the convex polygon P [k, 2] by the line a.x + c = 0 -> (part with a.x + c >= 0, part with
    a.x + c <= 0); None for a side that holds only a vertex or an edge.  Vertices within a relative
    tol of the line count as on it (they go to both parts), so no sliver of rounding error is born."""
    v = P @ a + c                                                           # [k]
    scale = tol * (np.abs(a).sum() * np.abs(P).max() + abs(c) + 1.0)
    s = np.where(v > scale, 1, np.where(v < -scale, -1, 0))
    if (s >= 0).all():
        return P, None
    if (s <= 0).all():
        return None, P
    pos, neg = [], []
    for i in range(len(P)):
        j = (i + 1) % len(P)
        if s[i] >= 0:
            pos.append(P[i])
        if s[i] <= 0:
            neg.append(P[i])
        if s[i] * s[j] < 0:                      # the edge crosses the line: the crossing is in both
            crossing = P[i] + (P[j] - P[i]) * (v[i] / (v[i] - v[j]))
            pos.append(crossing)
            neg.append(crossing)
    return np.array(pos), np.array(neg)


def _area(P):
    x, y = P[:, 0], P[:, 1]
    return 0.5 * abs(x[:-1] @ y[1:] - y[:-1] @ x[1:] + x[-1] * y[0] - y[-1] * x[0])


def _line_points(G, h):
    """For the lines G_i.x + h_i = 0 [m]: every crossing of two of them, and each line's foot (its
    point nearest the origin) -> [P, 2]."""
    if len(h) == 0:
        return np.zeros((0, 2))
    i, j = np.triu_indices(len(h), 1)
    det = G[i, 0] * G[j, 1] - G[i, 1] * G[j, 0]
    ok = np.abs(det) > 1e-12 * np.linalg.norm(G[i], axis=1) * np.linalg.norm(G[j], axis=1)
    i, j, det = i[ok], j[ok], det[ok]
    crossings = np.stack([(h[j] * G[i, 1] - h[i] * G[j, 1]) / det,
                          (h[i] * G[j, 0] - h[j] * G[i, 0]) / det], 1)      # G_i.x = -h_i, G_j.x = -h_j
    feet = -G * (h / (G ** 2).sum(1))[:, None]
    return np.concatenate([crossings, feet])


def _in_cell(points, G, h):
    """The points that lie in the closed cell {x: G x + h >= 0} (up to rounding)."""
    slack = points @ G.T + h                                                # [P, m]
    return points[(slack >= -1e-9 * (np.abs(points) @ np.abs(G).T + np.abs(h) + 1.0)).all(1)]


def _regions_in_box(layers, R):
    """All linear regions of the network cut to the box [-R, R]^2 -> (cells, 0.0), each cell
    (polygon, A, c, G, h, pattern): on it the current output is A x + c; G x + h >= 0 are the
    half-planes that define the (unbounded) region; pattern = per ReLU layer, which units are on.
    Or (None, reach) as soon as a region corner may lie beyond R/2 (see linear_regions)."""
    box = np.array([[-R, -R], [R, -R], [R, R], [-R, R]])
    cells = [(box, np.eye(2), np.zeros(2), np.zeros((0, 2)), np.zeros(0), ())]
    min_area = 1e-24 * (2 * R) ** 2
    for layer in layers:
        if layer is not None:                                               # Linear: compose
            W, b = layer
            cells = [(P, W @ A, W @ c + b, G, h, pat) for P, A, c, G, h, pat in cells]
            continue
        reach = 0.0                                                         # ReLU: is the box enough?
        for P, A, c, G, h, pat in cells:
            if np.abs(P).max() >= R * (1 - 1e-9):                           # a cell the box cuts
                live = np.abs(A).max(1) > 0
                corners = _in_cell(_line_points(np.concatenate([G, A[live]]),
                                                np.concatenate([h, c[live]])), G, h)
                reach = max(reach, float(np.abs(corners).max(initial=0.0)))
        if reach >= R / 2:
            return None, reach
        new = []                                                            # ReLU: cut and mask
        for P, A, c, G, h, pat in cells:
            V = P @ A.T + c                                                 # [k, units] at the corners
            pieces = [(P, ())]
            for j in range(len(c)):
                if V[:, j].min() > 0 or V[:, j].max() < 0 or not np.abs(A[j]).max() > 0:
                    on = bool(V[0, j] > 0)                                  # one state on the whole cell
                    pieces = [(Q, sg + (on,)) for Q, sg in pieces]
                    continue
                cut = []
                for Q, sg in pieces:
                    pos, neg = _cut(Q, A[j], c[j])
                    for part, on in ((pos, True), (neg, False)):
                        if part is not None and (part is Q or len(part) >= 3 and _area(part) > min_area):
                            cut.append((part, sg + (on,)))                  # keep parts with an area
                pieces = cut
            live = np.abs(A).max(1) > 0                                     # units that draw a line
            for Q, sg in pieces:
                on = np.array(sg, dtype=np.float64)                         # ReLU'(z) per unit: 1 or 0
                sign = 2 * on - 1
                new.append((Q, on[:, None] * A, on * c,
                            np.concatenate([G, (sign[:, None] * A)[live]]),
                            np.concatenate([h, (sign * c)[live]]), pat + (sg,)))
        cells = new
    return cells, 0.0


def linear_regions(net):
    """The linear regions of a 2-D ReLU network (nn.Sequential of nn.Linear / nn.ReLU), all of them,
    in float64 -> list of (polygon [k, 2] cut to the box, Jacobian [out, 2], pattern).

    Completeness: a region missing from the box [-R, R]^2 would need a corner (a vertex of the
    arrangement), or a whole boundary line, outside the box next to a region inside it (follow a
    boundary line from inside the box to the missing region: the region it passes last before
    leaving has a corner out there, or the line is its whole edge, whose foot is out there).  Every
    corner of a final region is the crossing of two of its lines, met at the ReLU layer that drew
    the later of them, inside the cell being cut there; so before cutting each layer, every cell
    the box cuts is checked: all crossings and feet of its lines and the new layer's lines that
    lie in it must be inside [-R/2, R/2]^2; else R grows past them and the enumeration restarts.
    (A cell the box does not cut lies inside the box with everything cut from it.)"""
    layers = _affine_layers(net)
    R = 1.0
    for _ in range(20):
        cells, reach = _regions_in_box(layers, R)
        if cells is not None:
            return [(P, A, pat) for P, A, c, G, h, pat in cells]
        R = 2 * reach + 1.0
    raise RuntimeError(f"linear_regions: region corners keep growing (R = {R:.3g})")


def exact_lipschitz(net, regions=None):
    """The exact L2 Lipschitz constant of the 2-D ReLU network net (nn.Sequential of nn.Linear and
    nn.ReLU): the largest spectral norm of its region Jacobians over all its linear regions
    (`regions`: linear_regions(net), when already at hand)."""
    jacobians = np.stack([J for _, J, _ in (regions or linear_regions(net))])  # [regions, out, 2]
    return float(np.linalg.norm(jacobians, 2, axis=(1, 2)).max())


def lipschitz_upper(net):
    """Product of the layers' spectral norms (ReLU is 1-Lipschitz): a sound upper bound."""
    return float(np.prod([np.linalg.norm(l[0], 2) for l in _affine_layers(net) if l is not None]))


def lipschitz_grid_lower(net, lo, hi, n=201):
    """Largest Jacobian spectral norm at the points of an n x n grid over [lo, hi]^2 (each point's
    Jacobian is its region's, ReLU'(0) = 0 as in torch): a lower bound on L."""
    g = np.linspace(lo, hi, n)
    z = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2).T                   # [2, P] inputs
    J = np.broadcast_to(np.eye(2)[:, None, :], (2, z.shape[1], 2))          # [units, P, 2] dz/dx
    for layer in _affine_layers(net):
        if layer is None:
            on = z > 0
            z, J = z * on, J * on[:, :, None]
        else:
            W, b = layer
            z = W @ z + b[:, None]
            J = (W @ J.reshape(J.shape[0], -1)).reshape(len(W), -1, 2)
    # ||J||_2^2 = the largest eigenvalue of the 2x2 matrix J^T J = [[p, q], [q, r]]
    p, q, r = (J[:, :, 0] ** 2).sum(0), (J[:, :, 0] * J[:, :, 1]).sum(0), (J[:, :, 1] ** 2).sum(0)
    return float(np.sqrt((p + r) / 2 + np.sqrt(((p - r) / 2) ** 2 + q ** 2)).max())


# ---- Prop. 1 ----------------------------------------------------------------------------

@torch.no_grad()
def prop1_radius(features, centres, lipschitz):
    """Prop. 1 with K = 1 (centre k = class k), nearest-centre prediction (D = 1):
        R(x) = min_{j != pred} (||f - mu_j||^2 - ||f - mu_pred||^2) / (2 L ||mu_j - mu_pred||)
    the feature-space distance to the bisector of the two centres over L.  For two classes the
    min has one term (the paper's two-closest form, exact here).  float64, explicit differences.
    -> (pred [n], radius [n])."""
    f, mu = features.double(), centres.double()
    sq = (f[:, None, :] - mu[None, :, :]).pow(2).sum(-1)                    # [n, C] ||f - mu_j||^2
    pred = sq.argmin(1)
    gap = sq - sq.gather(1, pred[:, None])                                  # [n, C] >= 0
    sep = (mu[None, :, :] - mu[pred][:, None, :]).norm(dim=-1)              # [n, C] ||mu_j - mu_pred||
    r = (gap / (2 * lipschitz * sep)).masked_fill(sep == 0, float("inf"))
    return pred, r.scatter(1, pred[:, None], float("inf")).min(1).values


def certified_accuracy(correct, radius, r):
    """Sec. 4.1: share of test points that are classified correctly AND have R(x) > r."""
    return float((correct & (radius > r)).double().mean())


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


# ======================================================================================
# 4. The loop: two runs from the same random weights, same number of steps
# ======================================================================================

def train(net, head, x, y, steps, lr, alpha):
    """`steps` full-batch Adam steps: cross-entropy through `head` when a head is given (the warm
    start, Sec. 3.3), else the Magnet loss of Eq. (3) with K = 1 (cluster id = class id; the batch
    is the whole training split, so its means are exactly the K = 1 centres).  -> last loss."""
    params = list(net.parameters()) + (list(head.parameters()) if head is not None else [])
    opt = torch.optim.Adam(params, lr=lr)
    loss = torch.zeros(())
    for _ in range(steps):
        if head is not None:
            loss = F.cross_entropy(head(net(x)), y)
        else:
            loss = magnet_loss(net(x), y, y, alpha)[0]                      # Eq. (3)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not torch.isfinite(loss):
            fail(f"the training loss became {loss.item()}; try a smaller --lr / --ft-lr or --alpha")
    return loss.item()


def run_seed(name, seed, args):
    """Both runs of one dataset and seed -> (data, {run: (net in float64 eval mode, last loss,
    seconds)})."""
    noise = args.noise_moons if name == "moons" else args.noise_circles
    x, y, xt, yt = make_dataset(name, args.n, noise, seed)
    torch.manual_seed(seed)
    net0, head0 = feature_net(args.hidden, args.feat_dim), nn.Linear(args.feat_dim, 2)
    runs = {}
    for run in RUNS:
        t0 = time.time()
        net = copy.deepcopy(net0)                                           # same initial weights
        if run == "random_init":                                            # (1) Magnet from scratch
            loss = train(net, None, x, y, args.steps, args.lr, args.alpha)
        else:                                                               # (2) ClusTR
            train(net, copy.deepcopy(head0), x, y, args.warm_steps, args.lr, args.alpha)
            loss = train(net, None, x, y, args.steps - args.warm_steps, args.ft_lr, args.alpha)
            if args.warm_steps == args.steps:                               # no Magnet step taken
                loss = float(magnet_loss(net(x), y, y, args.alpha)[0].detach())
        runs[run] = (net.double().eval(), loss, time.time() - t0)
    return (x, y, xt, yt), runs


def evaluate(net, data, loss):
    """Nearest-centre accuracy, exact L (and its two bounds), Prop. 1 radius of every test point;
    also the net, its centres and its data (for the figure)."""
    x, y, xt, yt = data
    regions = linear_regions(net)
    L = exact_lipschitz(net, regions)
    with torch.no_grad():
        # K = 1 (Sec. 4.1): each class is one cluster, its centre the mean feature of its training
        # points (eval mode, float64)
        f = net(x.double())
        mu = torch.stack([f[y == k].mean(0) for k in range(2)])             # [2, d]
        pred, radius = prop1_radius(net(xt.double()), mu, L)                # Prop. 1, exact L
    correct = pred == yt
    span = float(torch.cat([x, xt]).abs().max()) + 1.0                      # grid: data +- 1
    return {"accuracy": float(correct.double().mean()),
            "lipschitz": {"exact": L, "upper": lipschitz_upper(net),
                          "lower": lipschitz_grid_lower(net, -span, span)},
            "regions": len(regions), "final_loss": loss,
            # the area under the certified-accuracy curve = mean of R(x) over test points, 0 if wrong
            "mean_certified_radius": float(torch.where(correct, radius, 0.0).mean()),
            "correct": correct, "radius": radius, "centres": mu, "net": net, "data": data}


# ======================================================================================
# 5. Report and main: table, JSON (README "Result files"), figure
# ======================================================================================

def mean_std(values):
    """Mean and sample std (ddof 1; 0 for one value) over seeds, along the first axis."""
    a = np.asarray(values, dtype=np.float64)
    return a.mean(0), a.std(0, ddof=1) if len(a) > 1 else np.zeros(a.shape[1:])


def summarise(per_seed, seeds, args):
    """per_seed[name][run] = [evaluate() dict per seed] -> the JSON of README "Result files"."""
    out = {}
    for name, runs in per_seed.items():
        top = max(float(e["radius"][e["correct"]].max()) if e["correct"].any() else 0.0
                  for evals in runs.values() for e in evals)
        grid = np.linspace(0.0, math.ceil(max(top, 1e-6) * 100) / 100, args.radii)
        entry = out[name] = {"radius_grid": [float(r) for r in grid], "runs": {}}
        for run, evals in runs.items():
            curves = np.array([[certified_accuracy(e["correct"], e["radius"], r) for r in grid]
                               for e in evals])                              # [seeds, radii]
            acc, acc_std = mean_std([e["accuracy"] for e in evals])
            mcr, mcr_std = mean_std([e["mean_certified_radius"] for e in evals])
            entry["runs"][run] = {
                "accuracy": float(acc), "accuracy_std": float(acc_std),
                "lipschitz": evals[0]["lipschitz"],                          # the first seed's
                "lipschitz_exact_mean": float(np.mean([e["lipschitz"]["exact"] for e in evals])),
                "mean_certified_radius": float(mcr), "mean_certified_radius_std": float(mcr_std),
                "curve": [{"radius": float(r), "certified_accuracy": float(m), "certified_accuracy_std": float(s)}
                          for r, m, s in zip(grid, *mean_std(curves))],
                "seeds": [{"seed": s, **{k: e[k] for k in ("accuracy", "lipschitz", "regions", "final_loss",
                                                           "mean_certified_radius")},
                           "curve": [{"radius": float(r), "certified_accuracy": float(v)} for r, v in zip(grid, curve)]}
                          for s, e, curve in zip(seeds, evals, curves)]}
        diff = [w["mean_certified_radius"] - r["mean_certified_radius"]
                for w, r in zip(runs["warm_start"], runs["random_init"])]
        acc_diff = [w["accuracy"] - r["accuracy"] for w, r in zip(runs["warm_start"], runs["random_init"])]
        equal = [d for d, a in zip(diff, acc_diff) if abs(a) <= 0.01]      # within 1 point
        entry["comparison"] = {
            "metric": "mean certified radius (area under the certified-accuracy curve), paired by seed",
            "warm_start_larger": int(sum(d > 0 for d in diff)), "seeds": len(diff),
            "difference_mean": float(mean_std(diff)[0]), "difference_std": float(mean_std(diff)[1]),
            "accuracy_difference_mean": float(np.mean(acc_diff)),
            # Sec. 4.1 compares at equal accuracy: the seeds whose two runs are within 1 point
            "equal_accuracy_seeds": len(equal),
            "warm_start_larger_at_equal_accuracy": int(sum(d > 0 for d in equal))}
    return out


def print_table(datasets, per_seed, args):
    head = (f"{'dataset':<8} {'run':<11} {'accuracy':>15} {'L exact':>8} {'mean R':>15} "
            + " ".join(f"{'cert@' + format(r, 'g'):>14}" for r in args.table_radii))
    print("\n" + head + "\n" + "-" * len(head))
    for name, entry in datasets.items():
        for run, res in entry["runs"].items():
            cells = [mean_std([certified_accuracy(e["correct"], e["radius"], r) for e in per_seed[name][run]])
                     for r in args.table_radii]
            print(f"{name:<8} {run:<11} {res['accuracy']:6.2%} +-{res['accuracy_std']:5.2%} "
                  f"{res['lipschitz_exact_mean']:8.3g} {res['mean_certified_radius']:6.4f} +-"
                  f"{res['mean_certified_radius_std']:6.4f} " + " ".join(f"{f'{m:6.1%} +-{s:5.1%}':>14}"
                                                                          for m, s in cells))
    print("\nmean R = mean Prop. 1 radius over test points, 0 when misclassified (= area under the "
          "curve); +- = std over seeds; L exact = mean over seeds.")
    for name, entry in datasets.items():
        c = entry["comparison"]
        k, n = c["warm_start_larger"], c["seeds"]
        print(f"{name}: warm start gives the larger mean certified radius: "
              f"{'yes' if k == n else 'no' if k == 0 else 'mixed'} ({k}/{n} seeds); "
              f"difference warm - random {c['difference_mean']:+.4f} +- {c['difference_std']:.4f}; "
              f"accuracy difference {c['accuracy_difference_mean']:+.2%}; runs within 1 point of "
              f"accuracy in {c['equal_accuracy_seeds']}/{c['seeds']} seeds, warm start larger in "
              f"{c['warm_start_larger_at_equal_accuracy']} of them")


def plot_figure(path, datasets, per_seed, args):
    """2x2 like Fig. 3: left, test points over the decision regions (first seed; shading and solid
    line = warm start, dashed line = random init); right, certified accuracy vs radius (mean +- std)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no figure (pip install matplotlib)")
        return None
    fig, axes = plt.subplots(len(datasets), 2, figsize=(10, 4.2 * len(datasets)), squeeze=False)
    for (name, entry), (left, right) in zip(datasets.items(), axes):
        x, y, xt, yt = per_seed[name]["warm_start"][0]["data"]             # the first seed's
        lo, hi = xt.min(0).values.numpy() - 0.5, xt.max(0).values.numpy() + 0.5
        gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 300), np.linspace(lo[1], hi[1], 300))
        grid = torch.tensor(np.stack([gx.ravel(), gy.ravel()], 1), dtype=torch.float64)
        for run, style in (("warm_start", "-"), ("random_init", "--")):
            first = per_seed[name][run][0]
            with torch.no_grad():
                pred = prop1_radius(first["net"](grid), first["centres"], 1.0)[0].reshape(gx.shape).numpy()
            if run == "warm_start":
                left.contourf(gx, gy, pred, levels=[-0.5, 0.5, 1.5], colors=["#cfe0f5", "#f8d8c8"])
            left.contour(gx, gy, pred, levels=[0.5], colors="k", linestyles=style, linewidths=1.2)
        left.scatter(*xt.T, s=4, c=np.where(yt.numpy() == 0, "tab:blue", "tab:red"))
        left.set_title(f"{name}: test points; boundary warm start (solid), random init (dashed)", fontsize=9)
        for run, color, label in (("warm_start", "tab:green", "ClusTR (warm start)"),
                                  ("random_init", "tab:gray", "Magnet loss, random init")):
            res = entry["runs"][run]
            r, m, s = (np.array([p[k] for p in res["curve"]])
                       for k in ("radius", "certified_accuracy", "certified_accuracy_std"))
            right.plot(r, m, color=color, label=f"{label}: acc {res['accuracy']:.1%}")
            right.fill_between(r, np.clip(m - s, 0, 1), np.clip(m + s, 0, 1), color=color, alpha=0.2)
        right.set(xlabel="radius r (input units, L2)", ylabel="certified accuracy")
        right.set_title(f"{name}: Prop. 1, exact L, mean +- std over {args.seeds} seeds", fontsize=9)
        right.legend(fontsize=8)
        right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    """Ctrl-C / SIGTERM: one line, exit 130 (`owned`)."""
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    args = parse_args(argv)
    threads = torch.get_num_threads()
    with owned(args, argv, training=False):        # outputs checked, --out locked, before any work
        seed_everything(args.seed)
        torch.set_num_threads(1)                   # tiny matrices: more threads are only overhead
        try:
            return _main(args)
        finally:
            torch.set_num_threads(threads)


def _main(args):
    seeds = list(range(args.seed, args.seed + args.seeds))
    print(f"synthetic.py | datasets {' '.join(args.datasets)} | {len(seeds)} seeds {seeds[0]}.."
          f"{seeds[-1]} | net 2-{args.hidden}-{args.hidden}-{args.feat_dim} | {args.steps} steps per "
          f"run ({args.warm_steps} cross-entropy + {args.steps - args.warm_steps} Magnet for the warm "
          f"start) | torch {torch.__version__}, CPU, 1 thread")
    print("config: " + json.dumps(vars(args)))
    print(f"{'dataset':<8} {'seed':>4} {'run':<11} {'loss':>8} {'acc':>7} {'L exact':>8} "
          f"{'regions':>7} {'mean R':>7} {'steps/s':>8} {'elapsed':>9} {'ETA':>9}", flush=True)
    t_run, done, total = time.time(), 0, len(args.datasets) * len(seeds) * len(RUNS)
    per_seed = {name: {run: [] for run in RUNS} for name in args.datasets}
    for name in args.datasets:
        for seed in seeds:
            data, runs = run_seed(name, seed, args)
            for run, (net, loss, seconds) in runs.items():
                e = evaluate(net, data, loss)
                per_seed[name][run].append(e)
                append_jsonl(args.out + ".log.jsonl.partial", {           # save_results moves it over the log
                    "dataset": name, "seed": seed, "run": run, "final_loss": loss, "test_accuracy": e["accuracy"],
                    "lipschitz": e["lipschitz"], "mean_certified_radius": e["mean_certified_radius"],
                    "seconds": seconds})
                done, elapsed = done + 1, time.time() - t_run
                print(f"{name:<8} {seed:>4} {run:<11} {loss:8.4f} {e['accuracy']:7.2%} "
                      f"{e['lipschitz']['exact']:8.3g} {e['regions']:>7} {e['mean_certified_radius']:7.4f} "
                      f"{args.steps / seconds:8.0f} {fmt_time(elapsed):>9} "
                      f"{fmt_time(elapsed / done * (total - done)):>9}", flush=True)
    datasets = summarise(per_seed, seeds, args)
    print_table(datasets, per_seed, args)
    plot = plot_figure(args.plot, datasets, per_seed, args) if args.plot.lower() not in ("", "none") else None
    results = {"stage": "synthetic", "datasets": datasets, "seeds": seeds, "config": dict(vars(args)),
               "steps_per_run": args.steps, "plot": plot, "seconds": time.time() - t_run,
               "torch": torch.__version__}
    # rounded; its "meaning" entry points to README "Result files", which says what each key means
    results = described(results, "synthetic.py result: README.md 'Result files' gives each key's meaning")
    save_results(results, args.out)     # atomic; then this run's log replaces the previous one
    print(f"\nwrote {args.out}" + (f" and {plot}" if plot else "")
          + f" in {fmt_time(time.time() - t_run)}", flush=True)
    return results


# ======================================================================================
# 6. Plumbing: identical in every stage that carries it; checked by test_all.py
# ======================================================================================

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

# --- shared: save-results ---
def save_results(obj, path):
    """Evaluation results, atomically (atomic_write); then this run's rows (<path>.log.jsonl.partial)
    replace the previous run's log.  A failed write (a full disk) prints the results as JSON."""
    try:
        atomic_write(path, json.dumps(obj, indent=1).encode())
    except OSError as e:
        print(json.dumps(obj, indent=1), flush=True)
        fail(f"cannot write {path} ({e.strerror or e}); the results are printed above as JSON")
    if os.path.exists(path + ".log.jsonl.partial"):
        os.replace(path + ".log.jsonl.partial", path + ".log.jsonl")
    elif os.path.exists(path + ".log.jsonl"):
        os.remove(path + ".log.jsonl")
# --- end shared: save-results ---

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
