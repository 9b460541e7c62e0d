"""certify.py -- ClusTR Proposition 1: certified L2 radii of the nearest-centre classifier
(Alfarra, Perez et al., "Rethinking Clustering for Robustness", BMVC 2021, Sec. 3.1, App. C).

Prop. 1: if f is L-Lipschitz (L2) and x is classified by its nearest cluster centre mu_1, no
perturbation with ||delta|| < (||f(x) - mu_2||^2 - ||f(x) - mu_1||^2) / (2 L ||mu_2 - mu_1||)
changes the class.  For a clustering checkpoint (magnet.py, qtrades.py --loss magnet) this file
computes, per test image, with the nearest-centre classifier (Eq. (4) with D = 1, the setting of
Prop. 1):
  * the sound multi-class radius: the minimum of that bound over every centre of another class;
  * the paper's two-closest form (mu_2 = the nearest centre of another class), which can
    overstate the radius, even with K = 1 cluster per class: how often it differs is reported;
  * a tighter sound form: the best same-class centre, max_i min_j r_ij;
  * L: --lipschitz VALUE, or a sound upper bound composed layer by layer at float64 (Sedghi et al.
    2019 for the convolutions), beside a lower estimate (Jacobian spectral norms found by power
    iteration at test points, the best vector of its iterates' span), so the reader sees how loose
    the bound is;
  * the smallest L2 perturbation an L2 attack (a minimum-norm PGD-L2 whose per-image radius moves
    every step, then a bisection on the radius) finds that changes the prediction: no such
    perturbation may lie inside a certified radius (checked).
Certified accuracy at radius r = share of test images that are correct and have R(x) > r (Sec. 4.1).

Usage (copy-paste):
    python certify.py --ckpt magnet.pt                         # bound L, dataset from the checkpoint
    python certify.py --ckpt magnet.pt --lipschitz 1.0         # a given L: assumed, not certified
    python certify.py --ckpt magnet.pt --limit 512 --attack-limit 64   # quick CPU run

Reads: --ckpt (a clustering checkpoint, format "clustr/1") and its test split (--data-dir).
Writes: --out (JSON, README "Result files"), <out>.log.jsonl (one row per chunk of the L2 attack, in
<out>.log.jsonl.partial while it runs), a PNG of the accuracy at radius r of every curve (--plot; needs
matplotlib, skipped with a note otherwise).
From Python: load_classifier(path, device) -> nn.Module, images in [0, 1] -> class log-scores of
Eq. (4) (README "Evaluate a ClusTR model with other tools"); BadInput on a bad file.
Needs torch, torchvision, numpy; imports no other file of this repository: copy it freely.
Blocks between "# --- shared: NAME ---" markers are identical copies of the same blocks in the
other stages (test_all.py checks this).
Evidence: not yet measured on CIFAR10/SVHN/CIFAR100 checkpoints (no trained clustering checkpoint
existed when this file was written).

Lineage: Prop. 1 and its proof (App. C) from the paper; the convolution bound from Sedghi, Gupta &
Long, "The singular values of convolutional layers", ICLR 2019; PGD (Madry et al. 2018) in L2, its
radius moved per step as in FMN (Pintor, Roli, Brendel & Biggio, "Fast minimum-norm adversarial
attacks through adaptive norm constraints", NeurIPS 2021); Rayleigh-Ritz over the power iteration's
Krylov space as in Lanczos (1950).
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

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="certify.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Certified L2 radii of ClusTR's nearest-centre classifier (Prop. 1, "
                                "Sec. 3.1, App. C); --data, --width, --data-dir unset (None): the checkpoint's")
    add_common_args(p, data=None, width=None, data_dir=None)
    g = p.add_argument_group("certification (Prop. 1, App. C)")
    g.add_argument("--ckpt", default="magnet.pt", help="clustering checkpoint (stage magnet or qtrades-magnet)")
    g.add_argument("--out", default="certify.json", help="results JSON; rows go to <out>.log.jsonl")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out and --plot")
    g.add_argument("--lipschitz", default="bound", help="L of Prop. 1: 'bound' (sound, layer-wise) or a VALUE "
                   "(assumed, not certified)", type=lambda t: t if t == "bound" else number(float, 0, open_low=True)(t))
    g.add_argument("-b", "--batch-size", type=number(int, 1), default=256, help="images per chunk")
    g.add_argument("--grid", type=number(int, 2), default=101, help="radii of the curves, 0 to where they reach 0")
    g.add_argument("--attack-limit", type=number(int, 0), default=500, help="images for the L2 attack; 0: all")
    g.add_argument("--attack-steps", type=number(int, 1), default=40, help="steps of the minimum-norm PGD-L2 attack")
    g.add_argument("--bisect", type=number(int, 0), default=10, help="bisection rounds along the smallest flip found")
    g.add_argument("--power-iters", type=number(int, 1), default=6, help="power iterations for the lower estimate")
    g.add_argument("--plot", metavar="PATH", help="PNG of the curves; None: --out with .png; 'none': no plot")
    args = p.parse_args(argv)
    args.plot = None if args.plot == "none" else args.plot or os.path.splitext(args.out)[0] + ".png"
    return args


# ======================================================================================
# 2. The method: Prop. 1 radii, a sound L, a lower estimate of L, an L2 attack; Eq. (4)
# ======================================================================================

def nearest_center(features, centers, center_classes):
    """The classifier of Prop. 1 (Eq. (4) with D = 1): -> (index of the nearest centre, its class).
    Squared distances at float64 from explicit differences, not the eq4 block's expanded form:
    this is the classifier a certificate speaks about, and a one-off cost (once per test image,
    no gradient) next to the feature pass.  [n, d], [M, d], [M] -> [n], [n]."""
    nearest = (features.double()[:, None, :] - centers.double().to(features.device)[None]).pow(2).sum(-1).argmin(1)
    return nearest, center_classes.to(features.device)[nearest]


# Prop. 1 generalised to C classes x K clusters, the proof step by step (App. C, Eq. (7)), for any
# centre mu_i and any centre mu_j:
#   1. ||f(x+d) - mu_j||^2 - ||f(x+d) - mu_i||^2, with f(x+d) = f(x) + e, e = f(x+d) - f(x),
#      expands to  ||f(x) - mu_j||^2 - ||f(x) - mu_i||^2 + 2 <e, mu_i - mu_j>
#      (the ||e||^2 terms cancel; this is the first two lines of Eq. (7)).
#   2. Cauchy-Schwarz: <e, mu_i - mu_j> >= -||e|| ||mu_i - mu_j||, and L-Lipschitz: ||e|| <= L ||d||.
#   3. So the difference is >= m_ij - 2 L ||d|| ||mu_i - mu_j||, m_ij = ||f-mu_j||^2 - ||f-mu_i||^2,
#      which is > 0 whenever ||d|| < r_ij = m_ij / (2 L ||mu_i - mu_j||)  (Eq. (1), Prop. 1):
#      f(x+d) stays strictly closer to mu_i than to mu_j.
#   4. Multi-class, multi-cluster (Sec. 3.1 leaves it to the appendix, which treats two centres):
#      the class changes only if some centre of ANOTHER class becomes the nearest.  Take i = the
#      nearest centre mu_1 (class c): for ||d|| < min_{j: class(j) != c} r_1j, mu_1 beats every
#      other-class centre, so the nearest centre of f(x+d) (mu_1 or another centre of class c)
#      has class c.  Same-class centres need no term: moving between them keeps the class.
#      -> the sound radius R(x) = min over other-class j of r_1j.
#   5. Step 4 holds for ANY centre i of class c, not only the nearest one: if ||d|| < min_j r_ij,
#      mu_i beats every other-class centre, and the class stays c.  Hence the tighter sound
#      radius max_{i in c} min_{j not in c} r_ij >= R(x)  (for i != mu_1 some r_ij may be < 0,
#      then that i certifies nothing; i = mu_1 keeps the maximum >= R(x) >= 0).
#   6. The paper's text (Sec. 3.1) uses only the two closest centres, mu_2 = the closest centre
#      of another class here.  r_12 >= R(x) always, and it can be larger, already with K = 1:
#      a farther centre mu_j can have a nearer bisector when ||mu_j - mu_1|| is large (example:
#      f = (-0.5, 0), mu_1 = 0, mu_2 = (1, 0), mu_3 = (-0.5, 1.6): r_12 = 1.0, r_13 = 0.69).
#      Then the two-closest radius exceeds the exact distance to the decision boundary: not
#      a certificate.  It is reported beside R(x), with the count of images where they differ.
# With L = 1 and f an isometry, r_1j is the exact distance from f(x) to the bisector hyperplane
# of mu_1, mu_j, and R(x) the exact distance to the boundary of mu_1's Voronoi cell (tightness,
# Sec. 3.1).

def certified_radii(features, centers, center_classes, lipschitz, chunk=256):
    """Prop. 1 generalised to C classes x K clusters (the proof above).  -> dict of [n] tensors:
    pred, radius (sound, R(x) of step 4), tight (sound, best same-class centre, step 5),
    two_closest (the paper's text; NOT sound, step 6)."""
    mu = centers.double().to(features.device)                              # [M, d]
    cls = center_classes.long().to(features.device)                        # [M]
    cd = (mu[:, None, :] - mu[None, :, :]).pow(2).sum(-1).sqrt()   # [M, M]; 0: coinciding centres
    parts = []
    chunk = max(1, min(chunk, 2 ** 23 // len(mu) ** 2))                   # [chunk, M, M] <= 64 MiB
    for start in range(0, len(features), chunk):
        f = features[start:start + chunk].double()                          # [n, d]
        # explicit float64 differences, not cluster_log_probs' expanded form: the margins m_1j are
        # small differences of these near a decision boundary, where a radius must not come out
        # too large; once per test image, below the cost of the [n, M, M] margins
        sq = (f[:, None, :] - mu[None]).pow(2).sum(-1)                       # [n, M] ||f - mu_j||^2
        nearest = sq.argmin(1)                                               # [n] mu_1
        pred = cls[nearest]                                                  # [n] class c
        other = cls[None, :] != pred[:, None]                                # [n, M] class(j) != c
        # r_ij = (||f-mu_j||^2 - ||f-mu_i||^2) / (2 L ||mu_i - mu_j||), all pairs   [n, M(i), M(j)]
        r = (sq[:, None, :] - sq[:, :, None]) / (2 * float(lipschitz) * cd[None])
        r = torch.where(cd[None] > 0, r, torch.zeros_like(r))               # coinciding centres: 0
        r = r.masked_fill(~other[:, None, :], float("inf"))                  # j: other classes only
        min_over_j = r.min(2).values                                         # [n, M] per centre i
        radius = min_over_j.gather(1, nearest[:, None]).squeeze(1)           # step 4: i = mu_1
        tight = min_over_j.masked_fill(other, float("-inf")).max(1).values   # step 5: best i in c
        two = r[torch.arange(len(f)), nearest, sq.masked_fill(~other, math.inf).argmin(1)]   # step 6: mu_2
        parts.append({"pred": pred, "radius": radius, "tight": tight, "two_closest": two})
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


# A float64 SVD is accurate to a few units of 2^-52 relative; each layer's bound is inflated by
# this much so that rounding cannot push it below the exact operator norm.
SLACK = 1e-12


def conv_operator_norm_bound(weight, input_hw, padding):
    """A proven upper bound on the L2 operator norm of a zero-padded convolution (any stride) with
    kernel `weight` [c_out, c_in, kh, kw] on inputs of spatial size input_hw.

    Why it is an upper bound:
      1. Put the n_h x n_w input at offset (p, p) of an N_h x N_w canvas of zeros, N >= n + 2p:
         an isometric embedding (norm-preserving).
      2. A CIRCULAR cross-correlation with the same kernel on that canvas never wraps around for
         the outputs the padded convolution keeps (their windows end at index n + 2p - 1 <= N - 1),
         so the padded convolution is that circular one followed by keeping some output
         coordinates (cropping; stride s keeps every s-th one).  Keeping coordinates is a
         projection, of norm <= 1; so ||conv|| <= ||circular conv on N x N||.
      3. Sedghi, Gupta & Long (ICLR 2019, "The singular values of convolutional layers", Thm. 6):
         the 2-D DFT, applied per channel, block-diagonalises the circular multi-channel
         convolution; its singular values are those of the c_out x c_in matrices
         P(u, v) = sum_{a,b} K[:, :, a, b] exp(-2 pi i (u a / N_h + v b / N_w)), over all N_h x N_w
         frequencies (cross-correlation gives the conjugate matrices: same singular values).
         So ||circular conv|| = max_{u,v} ||P(u, v)||_2 exactly.  For a real kernel
         P(-u, -v) = conj(P(u, v)), with the same singular values, so the half spectrum of rfft2
         (v = 0 .. N_w / 2) holds every value: half the SVDs.
    test_all.py's test_conv_bound_is_above_the_exact_norm_and_equal_for_circular_padding checks
    the bound against the exact SVD of the unrolled matrix, and the equality for circular padding.
    float64 throughout."""
    c_out, c_in, kh, kw = weight.shape
    n_h = max(input_hw[0] + 2 * padding[0], kh)                              # N >= n + 2p
    n_w = max(input_hw[1] + 2 * padding[1], kw)
    P = torch.fft.rfft2(weight.double(), s=(n_h, n_w))                       # [c_out, c_in, N_h, N_w/2+1]
    sigma = torch.linalg.matrix_norm(P.permute(2, 3, 0, 1), ord=2)          # [N_h, N_w/2+1]
    return float(sigma.max()) * (1 + SLACK)


# The layer-wise Lipschitz bound.  fold=False: the plain per-layer list, each factor alone
# (normalisation 1 / min std; each conv by conv_operator_norm_bound; batch norm max |s|).
# fold=True (tighter, equally sound): the normalisation and each batch norm are per-channel
# scalings, so they are multiplied into the adjacent convolution's kernel and the composite
# linear map (bias-free part) is bounded at once: ||diag(s) K diag(1/std)|| <= max|s| ||K|| max(1/std).
# Everywhere: ReLU 1 (1-Lipschitz); a residual block relu(branch(x) + shortcut(x)) at most
# Lip(branch) + Lip(shortcut), the identity shortcut 1; global average pooling over h x w its
# exact norm 1 / sqrt(h w).
def lipschitz_layers(net, input_shape, fold=True):
    """Per-layer L2 Lipschitz bounds of net.features (the ResNet18 of App. A, eval mode)
    for inputs [C, H, W] = input_shape[-3:].  -> (bound, [(name, factor)]): the comment above."""
    hw, inv_std = tuple(input_shape[-2:]), 1 / net.std.detach().double().flatten()   # [C]

    def conv_bn(conv, bn, hw, in_scale=None):
        # the ResNet18 here: groups 1, dilation 1, zero padding (conv_operator_norm_bound's case)
        w = conv.weight.detach().double()                                    # [c_out, c_in, k, k]
        # eval-mode batch norm is x -> s * x + b per channel, s = gamma / sqrt(running_var + eps)
        s = 1 / torch.sqrt(bn.running_var.detach().double() + bn.eps)        # [c_out]
        s = s * bn.weight.detach().double() if bn.weight is not None else s
        if fold:
            w = w if in_scale is None else w * in_scale[None, :, None, None]
            bound = conv_operator_norm_bound(s[:, None, None, None] * w, hw, conv.padding)
        else:
            bound = conv_operator_norm_bound(w, hw, conv.padding) * float(s.abs().max()) * (1 + SLACK)
        out = tuple((n + 2 * p - k) // st + 1 for n, p, k, st in zip(hw, conv.padding, conv.kernel_size, conv.stride))
        return bound, out

    parts = [] if fold else [("normalise 1/min std", float(inv_std.max()) * (1 + SLACK))]
    stem, hw = conv_bn(net.conv1, net.bn1, hw, inv_std if fold else None)
    parts.append(("stem conv+bn" + (" (x 1/std)" if fold else ""), stem))
    for li, layer in enumerate((net.layer1, net.layer2, net.layer3, net.layer4), 1):
        for bi, block in enumerate(layer):
            b1, mid = conv_bn(block.conv1, block.bn1, hw)
            b2, out = conv_bn(block.conv2, block.bn2, mid)
            short = 1.0 if len(block.shortcut) == 0 else conv_bn(block.shortcut[0], block.shortcut[1], hw)[0]
            parts.append((f"layer{li}.{bi} branch {b1:.3g}*{b2:.3g} + shortcut {short:.3g}",
                          (b1 * b2 + short) * (1 + SLACK)))
            hw = out
    parts.append((f"avg pool {hw[0]}x{hw[1]}", 1 / math.sqrt(hw[0] * hw[1]) * (1 + SLACK)))
    return math.prod(v for _, v in parts), parts


# Power iteration from a random v_0 (the same draw as a plain power iteration) visits v_0, A v_0,
# ..., A^iters v_0; the plain method answers with the last of them.  Here the answer is the best
# vector of their span K (Rayleigh-Ritz: the top eigenvector s of the Gram matrix (J Q)^T (J Q)
# of an orthonormal basis Q of K, as in Lanczos), so it is never below the plain answer for the
# same products and the same v_0 (K holds the last iterate), in exact arithmetic; it converges
# far faster: on three checkpoints 6 products gave the maximum over 200 images (main's
# lower_estimate) of 20 plain iterations to 6 digits, and each image's within 6e-4
# (benchmarks/certify.py, benchmarks/README.md).  The basis is built by
# orthogonalising each product against the earlier ones (twice, float64), so nearly parallel
# iterates lose no precision; a product with nothing new (below 1e-6 of its norm, float32
# noise: K is already A-invariant) adds a zero column.
# J^T w is one backward pass; J q is the derivative of u -> J^T u (linear in u) in the direction
# q, a second backward through the first (no forward-mode AD, whose first use in torch costs
# seconds of TorchScript compilation).  Per product: the cost of one plain power iteration.
# Eval-mode batch norm keeps the images independent, so a batch holds B separate problems.
def jacobian_norm_lower(feature_fn, x, iters=6, generator=None):
    """Lower estimate of L: per image, ||J v|| / ||v|| for the best v the power iteration on
    A = J(x)^T J(x) reaches in `iters` products [B] float64, each <= ||J(x)||_2 <= L (the comment above)."""
    x = x.detach().requires_grad_(True)
    f = feature_fn(x)                                                        # [B, d]
    u = torch.zeros_like(f, requires_grad=True)
    jt_u, = torch.autograd.grad(f, x, u, create_graph=True)                  # J^T u  [B, C, H, W]
    q = torch.randn(x.shape, generator=generator, device=x.device).flatten(1).double()   # v_0
    q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-300)
    basis, images = [], []                                                   # q_t as fed to J, J q_t
    for t in range(iters + 1):
        q_in = q.view(x.shape).to(x.dtype)
        jq, = torch.autograd.grad(jt_u, u, q_in, retain_graph=True)         # J q_t  [B, d]
        basis.append(q_in.flatten(1).double())
        images.append(jq.detach().double())
        if t == iters:
            break
        w, = torch.autograd.grad(f, x, jq, retain_graph=True)               # A q_t = J^T J q_t
        q = w = w.flatten(1).double()
        for _ in range(2):                                                   # Gram-Schmidt, twice
            for b in basis:
                q = q - (q * b).sum(1, keepdim=True) / (b * b).sum(1, keepdim=True).clamp_min(1e-300) * b
        size = q.norm(dim=1, keepdim=True)
        q = torch.where(size > 1e-6 * w.norm(dim=1, keepdim=True), q / size.clamp_min(1e-300), 0.0)
    Q, JQ = torch.stack(basis, 2), torch.stack(images, 2)                   # [B, CHW, k], [B, d, k]
    s = torch.linalg.eigh(JQ.transpose(1, 2) @ JQ)[1][:, :, -1:]   # top eigenvector [B, k, 1] of the Gram of J Q
    # ||J v|| / ||v|| for the explicit v = Q s (J is linear: J v = (J Q) s), with ||v|| measured,
    # not assumed 1: the float32 copies of q_t fed to J are orthonormal only to ~1e-7
    return (JQ @ s).squeeze(2).norm(dim=1) / (Q @ s).squeeze(2).norm(dim=1).clamp_min(1e-300)


# The minimum-norm L2 attack's schedule (FMN, Pintor et al. 2021, with relative steps): the radius
# moves by a factor 1 -/+ gamma_t per step, the step is alpha_t eps; both decay from their first
# value to their last on a cosine.  A run with no adversarial iterate yet grows eps by at least
# GROW per step.  Chosen on generated 16x16 and Fashion-MNIST checkpoints against the earlier
# bisection of fixed-radius PGD runs (benchmarks/certify.py, benchmarks/README.md).
GAMMA, GAMMA_END, ALPHA, ALPHA_END, GROW = 0.1, 0.001, 0.25, 0.01, 0.2


# One batched minimum-norm PGD-L2 run on feature_fn, each image with its own radius eps that
# moves at every step (the search over radii inside the run, in the manner of FMN, Pintor et al.,
# NeurIPS 2021, instead of 1 + bisect separate PGD runs at fixed radii), with m = the margin of
# _l2_search (> 0 once adversarial) and its gradient g at the iterate x + delta:
#   adversarial now:               eps <- min(eps (1 - gamma_t), best norm so far)    shrink
#   not, but one found before:     eps <- eps (1 + gamma_t)                           grow back
#   none found yet:                eps <- max(||delta|| + (-m) / ||g||, (1 + GROW) eps)
#                                  (the first-order distance to the boundary m = 0, growing)
#   delta <- delta + alpha_t eps g / ||g||, then onto the ball ||delta|| <= eps and the box.
# g drops the components that push a pixel already at 0 or 1 out of the box (they would be
# clipped away and waste the step's norm).  The check of every iterate is nearest_center at
# float64; x's own class is the check of the first iterate (delta = 0).  Eval-mode batch norm
# keeps the images independent: B separate searches.  Then, forward passes only, `bisect`
# rounds of bisection on s in (0, 1] along the smallest adversarial iterate d = x_adv - x (s = 1:
# the finding), keeping the smallest adversarial point (the distance is not monotone in s).
def l2_attack(feature_fn, x, centers, center_classes, steps=40, bisect=10, return_examples=False):
    """Smallest L2 perturbation found that changes the nearest-centre prediction, per image [B]
    float64 (inf where none); with return_examples also the images found [B, C, H, W] (x where
    none).  Every finite value is the float64 distance ||x_adv - x|| of an x_adv in the box [0, 1]
    whose prediction by feature_fn was evaluated and differs from x's: an upper bound on the true
    minimal perturbation."""
    x = x.detach()
    mu = centers.to(x.device, x.dtype)                                       # [M, d]
    cls = center_classes.long().to(x.device)                                 # [M]
    best, x_adv, y = _l2_search(feature_fn, x, mu, cls, steps)
    hit = torch.isfinite(best).nonzero().squeeze(1)                          # bisection along d
    x0, d, y0 = x[hit], x_adv[hit] - x[hit], y[hit]                          # d: the search's finding
    lo, hi = best.new_zeros(len(hit)), best.new_ones(len(hit))   # s: not adversarial (x), adversarial (finding)
    with torch.no_grad():
        for _ in range(bisect if len(hit) else 0):
            s = (lo + hi) / 2
            z = (x0 + s.to(x.dtype)[:, None, None, None] * d).clamp(0, 1)
            _, pred = nearest_center(feature_fn(z), mu, cls)
            adv = pred != y0
            dist = (z.double() - x0.double()).flatten(1).norm(dim=1)
            better = adv & (dist < best[hit])                                # not monotone in s
            best[hit] = torch.where(better, dist, best[hit])
            x_adv[hit[better]] = z[better]
            hi, lo = torch.where(adv, s, hi), torch.where(adv, lo, s)
    return (best, x_adv) if return_examples else best


def _l2_search(feature_fn, x, mu, cls, steps):
    """l2_attack's minimum-norm PGD-L2 run (its docstring): -> (best distance [B] float64, inf
    where none; the images found [B, C, H, W], x where none; x's own class [B])."""
    delta, x_adv = torch.zeros_like(x), x.clone()                            # x: [B, C, H, W]
    eps = torch.zeros(len(x), dtype=torch.float64, device=x.device)          # radius per image
    best = torch.full((len(x),), float("inf"), dtype=torch.float64, device=x.device)
    for t in range(steps + 1):
        z = (x + delta).requires_grad_(True)                                 # the iterate [B, C, H, W]
        f = feature_fn(z)                                                    # [B, d]
        with torch.no_grad():
            _, pred = nearest_center(f, mu, cls)
            y = pred if t == 0 else y                                        # x's own class [B]
            adv = pred != y
            dist = (z.detach().double() - x.double()).flatten(1).norm(dim=1)
            better = adv & (dist < best)
            best = torch.where(better, dist, best)
            x_adv[better] = z.detach()[better]
        if t == steps:
            break
        # the attack's margin m = min_{i in class y} ||f - mu_i||^2 - min_{j not in y} ||f - mu_j||^2 [B]:
        # > 0 once a centre of another class is the nearest (the prediction changed); float32 here
        sq, same = (f[:, None, :] - mu[None]).pow(2).sum(-1), cls[None, :] == y[:, None]     # [B, M], [B, M]
        m = sq.masked_fill(~same, math.inf).min(1).values - sq.masked_fill(same, math.inf).min(1).values
        g, = torch.autograd.grad(m.sum(), z)
        with torch.no_grad():
            g = g.masked_fill(((z <= 0) & (g < 0)) | ((z >= 1) & (g > 0)), 0)   # box-feasible
            g_norm = g.flatten(1).norm(dim=1).double().clamp_min(1e-30)
            c = 0.5 * (1 + math.cos(math.pi * t / steps))                    # cosine: 1 -> 0
            gamma, alpha = GAMMA_END + (GAMMA - GAMMA_END) * c, ALPHA_END + (ALPHA - ALPHA_END) * c
            first_order = delta.double().flatten(1).norm(dim=1) + (-m.double()).clamp_min(0) / g_norm
            eps = torch.where(adv, torch.minimum(eps * (1 - gamma), best),
                              torch.where(torch.isfinite(best), eps * (1 + gamma),
                                          torch.maximum(first_order, eps * (1 + GROW))))
            delta = delta + (alpha * eps / g_norm).to(x.dtype)[:, None, None, None] * g
            shrink = (eps / delta.double().flatten(1).norm(dim=1).clamp_min(1e-30)).clamp(max=1.0)
            delta = (x + delta * shrink.to(x.dtype)[:, None, None, None]).clamp(0, 1) - x     # ball, box
    return best, x_adv, y


def accuracy_curve(radius, correct, points, key="certified_accuracy"):
    """Certified accuracy at r = share of images that are correct with radius > r (Sec. 4.1), on
    `points` radii from 0 to the largest finite radius of a correct image (where it reaches 0).
    `key` names the share: only a sound radius gives a "certified_accuracy"; a radius of a given
    --lipschitz gives "assumed_L_accuracy" (sound only if that L is a Lipschitz constant), the L2
    attack's smallest perturbation "attacked_accuracy" (an upper bound on robust accuracy, no
    certificate) and the two-closest radius "two_closest_not_sound"."""
    ok = correct & torch.isfinite(radius)
    top = float(radius[ok].max()) if ok.any() else 0.0
    grid = [top * i / (points - 1) for i in range(points - 1)] + [top] if top > 0 else [0.0]
    return [{"radius": r, key: float((correct & (radius > r)).double().mean())} for r in grid]


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
# 3. The run: load, bound L, radii, attack, report (README "Result files")
# ======================================================================================

def main(argv=None):
    """The checkpoint and its test split; L; Prop. 1 radii on every test image; the L2 attack and the
    lower estimate of L on the first --attack-limit; the results file and the summary."""
    args = parse_args(argv)
    device = setup_runtime(args, training=False)    # --amp is not used: margins and radii need fp32
    clf, ckpt = read_classifier(args.ckpt, device)
    args_from_checkpoint(args, ckpt)
    if not clf.clusters:
        raise BadInput(f"{args.ckpt} ({ckpt['stage']}) has no clusters; Prop. 1 needs a magnet or qtrades-magnet one")
    with claimed(args, outputs=[("--out", args.out), ("--plot", args.plot)], inputs=[args.ckpt]):
        images, labels = read_test_split(args, ckpt, device)
        check_forward(lambda x: clf(x).exp(), images, args.ckpt)   # p of Eq. (4): before the SVDs of a bad model
        open(args.out + ".log.jsonl.partial", "w").close()      # this run's rows (a killed run's are dropped)
        return certify(args, clf.model, ckpt["clusters"], images, labels, device)


def certify(args, net, clusters, images, labels, device):
    t_run = time.time()
    mu, mu_class = clusters["centers"].to(device), clusters["center_classes"].long().to(device)   # [M, d], [M]
    bound, parts = lipschitz_layers(net, images.shape[1:], fold=True)
    layerwise, _ = lipschitz_layers(net, images.shape[1:], fold=False)
    L = bound if args.lipschitz == "bound" else args.lipschitz
    print(f"certify.py | {args.ckpt}, {len(mu)} centres | {args.data}, {len(labels)} images | {device} | torch "
          f"{torch.__version__}\nconfig: {json.dumps(vars(args))}\nLipschitz bound (float64; Sedghi et al. 2019): "
          + " * ".join(f"{v:.4g} ({k})" for k, v in parts) + f" = {bound:.5g}; every layer alone {layerwise:.5g}")
    # f(x) of every test image, in chunks (no gradient: read_classifier froze the parameters)  [n, d]
    f = torch.cat([net.features(to_float(chunk)).double() for chunk in images.split(args.batch_size)])
    r = certified_radii(f, mu, mu_class, L)                         # Prop. 1: pred, radius, tight, two_closest [n]
    pert, lower_estimate = attack_first(net, images, mu, mu_class, r, args, device)
    results = results_of(args, len(labels), L, bound, layerwise, r, r["pred"] == labels, pert, lower_estimate)
    results["seconds"] = time.time() - t_run
    results["plot"] = args.plot and plot_curves(results, args.plot)     # the PNG written, or None
    # rounded; its "meaning" entry points to README "Result files", which says what each key means
    saved = {"meaning": "certify.py result: README.md 'Result files' gives each key's meaning; assumed_L_accuracy: "
             "the curves of a given --lipschitz, radii that hold only if f is L-Lipschitz (Prop. 1); sound: L >= "
             "lipschitz.upper_bound and no image flipped inside its radius", **rounded(results)}
    save_results(saved, args.out)
    share = list(results["curve"][0])[1]                           # results_of's name for the share
    print(f"\nsummary: clean accuracy {results['clean_accuracy']:.2%}, sound {results['sound']}, {share} at r = "
          + ", ".join(f"{p['radius']:.3g}: {p[share]:.2%}" for p in results["curve"][::args.grid // 4 or 1])
          + f"\nresults {args.out}, plot {results['plot']}\nnext: python attack.py --ckpt {args.ckpt}", flush=True)
    return saved


def attack_first(net, images, mu, mu_class, r, args, device):
    """The lower estimate of L and the L2 attack on the first --attack-limit images, on net, the
    network every certificate here is about.  (A copy with batch norm folded into the convolutions,
    its findings confirmed on net, was 1.08x-1.40x faster in three runs, not clearly the 1.3x that
    would pay for a second network: benchmarks/README.md, issue 22.)  -> (smallest perturbation
    found [m], inf where none; the largest Jacobian norm found)."""
    m = min(len(images), args.attack_limit or len(images))
    pert, lower, t0, gen = [], [], time.time(), torch.Generator(device=device).manual_seed(args.seed)
    for x in map(to_float, images[:m].split(args.batch_size)):
        lower.append(jacobian_norm_lower(net.features, x, args.power_iters, gen))
        pert.append(l2_attack(net.features, x, mu, mu_class, args.attack_steps, args.bisect))
        p, el = torch.cat(pert), time.time() - t0
        row = {"images": len(p), "flipped": int(torch.isfinite(p).sum()),
               "flipped_inside_radius": int((p < r["radius"][:len(p)]).sum()), "median_min_perturbation": float(
                   p.median()), "lower_estimate": float(torch.cat(lower).max()), "images_per_second": len(p) / el}
        append_row(args.out + ".log.jsonl.partial", row)
        print(f"L2 attack {len(p)}/{m}: " + ", ".join(f"{key} {v:.4g}" for key, v in row.items())
              + f" | {fmt_time(el)}, ETA {fmt_time(el / len(p) * (m - len(p)))}", flush=True)
    return torch.cat(pert), float(torch.cat(lower).max())


def results_of(args, n, L, bound, layerwise, r, correct, pert, lower_estimate):
    """The results dict (README "Result files" says what each key means)."""
    m, med_p, ok_r = len(pert), float(pert.median()), r["radius"][correct]
    inside, med_r_m = int((pert < r["radius"][:m]).sum()), float(r["radius"][:m].median())
    med_r, max_r = (float(ok_r.median()), float(ok_r.max())) if len(ok_r) else (0.0, 0.0)
    # A Prop. 1 radius is a certificate only if L is a Lipschitz constant: not below a Jacobian norm
    # found, and no image flipped inside its radius; else its curve says "not_sound".
    # A given L is assumed, and its curves are named so.  Prop. 1 holds for an L-Lipschitz f;
    # the checks above can only falsify that.  L >= `bound` (a proven Lipschitz constant,
    # lipschitz_layers) proves it: any number above a Lipschitz constant is one.  Below the
    # bound nothing here proves it, so the radii are no certificate.
    given = args.lipschitz != "bound"
    sound = not inside and L >= lower_estimate and (not given or L >= bound)
    share = "assumed_L_accuracy" if given else "certified_accuracy" if sound else "accuracy_not_sound"
    return {
        "ckpt": args.ckpt, "data": args.data, "images": n, "sound": sound,
        "clean_accuracy": float(correct.double().mean()),
        "lipschitz": {"value": float(L), "kind": "given" if given else "bound", "lower_estimate": lower_estimate,
                      "lower_estimate_images": m, "upper_bound": bound, "upper_bound_layerwise": layerwise},
        "curve": accuracy_curve(r["radius"], correct, args.grid, share),
        "curve_tight": accuracy_curve(r["tight"], correct, args.grid, share),
        "curve_two_closest": accuracy_curve(r["two_closest"], correct, args.grid, "two_closest_not_sound"),
        "two_closest_differs": int((r["two_closest"] > r["radius"]).sum()),
        "tight_exceeds_sound": int((r["tight"] > r["radius"]).sum()),
        "radius": {"median_correct": med_r, "max_correct": max_r, "vacuous": max_r < 1 / 255,
                   "median_correct_tight": float(r["tight"][correct].median()) if len(ok_r) else 0.0,
                   "median_correct_if_L_were_lower_estimate": med_r * L / lower_estimate if lower_estimate else None},
        "l2_attack": {"median_min_perturbation": med_p if math.isfinite(med_p) else None, "images": m,
                      "flipped": int(torch.isfinite(pert).sum()), "flipped_inside_certified_radius": inside,
                      "share_flipped_inside": inside / m, "steps": args.attack_steps, "bisect": args.bisect,
                      "curve": accuracy_curve(pert, correct[:m], args.grid, "attacked_accuracy"),
                      "gap_median_ratio": med_p / med_r_m if med_r_m > 0 and math.isfinite(med_p / med_r_m) else None}}


def plot_curves(results, path):
    """Fig. 3 b, d: accuracy at radius r of every curve of the results, on a log axis so that the
    sound radii and the L2 attack's perturbations (orders of magnitude apart) show side by side, with
    R(x) for L = the lower estimate (the best any Lipschitz bound could give: not sound)."""
    try:
        from matplotlib.figure import Figure                       # no pyplot: no backend, no window
    except ImportError:                                            # no plot: results["plot"] is None
        return print("note: matplotlib is not installed: no plot (pip install matplotlib)")
    lip, ax = results["lipschitz"], Figure(figsize=(8, 5), layout="tight").subplots()
    scale = lip["value"] / (lip["lower_estimate"] or lip["value"])   # R(x) x L / lower: R(x) at L = the lower estimate
    share = list(results["curve"][0])[1]                           # results_of's name for the share
    for curve, times, label, style in (                            # curve: [{radius, share}]
            (results["curve"], 1, f"{share}: R(x)", "-"),
            (results["curve_tight"], 1, f"{share}: best same-class centre", "--"),
            (results["curve_two_closest"], 1, "two closest (the paper's text; not sound)", ":"),
            (results["curve"], scale, "R(x) if L were the lower estimate (not sound)", "-."),
            (results["l2_attack"]["curve"], 1, "L2 attack: not fooled (an upper bound)", "-")):
        ax.step([p["radius"] * times for p in curve], [list(p.values())[1] for p in curve], style, where="post",
                label=label)
    ax.set(xscale="log", xlabel="L2 radius r (pixels in [0, 1]; log)", ylabel="accuracy at radius r",
           title=f"Prop. 1, L = {lip['value']:.3g} ({lip['kind']})")
    ax.legend(fontsize=8)
    ax.figure.savefig(path, dpi=120, format="png")                 # a PNG whatever --plot's suffix
    return path


# ======================================================================================
# 4. Copied plumbing (model, command line, files, data, checkpoints, the classifier, results):
#    each block identical in every stage that carries it; checked by test_all.py
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
