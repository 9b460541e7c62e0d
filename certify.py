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
Writes: --out (JSON, README "Result files"), <out>.log.jsonl (one row per chunk), a PNG of certified
accuracy against radius (--plot; needs matplotlib, skipped with a note otherwise).
From Python: load_classifier(path, device) -> nn.Module, images in [0, 1] -> class log-scores of
Eq. (4) (README "Evaluate a ClusTR model with other tools"); CheckpointError on a bad file.
Needs torch, torchvision, numpy; imports no other file of this repository: copy it freely.
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

def lipschitz_arg(text):
    """--lipschitz: 'bound' or a positive, finite number (argparse: exit 2 with one line)."""
    try:
        value = text if text == "bound" else float(text)
    except ValueError:
        value = None
    if value != "bound" and not (isinstance(value, float) and 0 < value < math.inf):
        raise argparse.ArgumentTypeError(f"must be 'bound' or a positive, finite number, not {text!r}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="certify.py",
        description="Certified L2 radii of ClusTR's nearest-centre classifier (Prop. 1, Sec. 3.1, "
                    "App. C) with a sound Lipschitz bound, a lower estimate and an L2 attack.",
        formatter_class=HelpFormatter)
    add_common_args(p, data_default=None)
    p.set_defaults(width=None)  # the checkpoint's width; a different --width is an error
    p.set_defaults(data_dir=None)  # the checkpoint's own data folder (data_dir_from_checkpoint)
    g = p.add_argument_group("certification (Prop. 1, App. C)")
    g.add_argument("--ckpt", default="magnet.pt", help="clustering checkpoint (stage magnet or qtrades-magnet) "
                   "(default: %(default)s); --data and --width default to the checkpoint's own")
    g.add_argument("--out", default="certify.json", help="results JSON (default: %(default)s)")
    g.add_argument("--lipschitz", type=lipschitz_arg, default="bound", metavar="VALUE|bound",
                   help="L of Prop. 1: 'bound' = the sound layer-by-layer upper bound for the ResNet18 in eval "
                        "mode, or a number that is assumed, not certified: its curves are named "
                        "assumed_L_accuracy, and 'sound' is true only if it is >= that bound "
                        "(default: %(default)s)")
    g.add_argument("-b", "--batch-size", type=positive_int, default=256, help="images per chunk (default: %(default)s)")
    g.add_argument("--grid", type=int, default=101, help="radii of the certified-accuracy curve, from 0 to where "
                   "it reaches 0 (Fig. 3 b, d) (default: %(default)s)")
    g.add_argument("--attack-limit", type=int, default=500, help="test images for the L2 attack and the lower "
                   "estimate of L; 0 = all (default: %(default)s, a choice: the paper runs no L2 attack)")
    g.add_argument("--attack-steps", type=positive_int, default=40,
                   help="steps of the minimum-norm PGD-L2 attack, one batched run in which each image's radius "
                        "moves every step (FMN-style; a choice, the paper runs no L2 attack) (default: %(default)s)")
    g.add_argument("--bisect", type=int, default=10, help="bisection rounds on the radius along the smallest "
                   "adversarial perturbation the attack found (forward passes only) (default: %(default)s)")
    g.add_argument("--power-iters", type=positive_int, default=6,
                   help="power iterations per image for the lower estimate of L (products with J^T J), answered "
                        "by the best vector of the iterates' span (default: %(default)s)")
    g.add_argument("--plot", default=None, metavar="PATH",
                   help="PNG of certified accuracy vs radius (default: --out with .png; 'none' skips)")
    args = p.parse_args(argv)
    if args.grid < 2 or args.attack_limit < 0 or args.bisect < 0:
        p.error("--grid >= 2, --attack-limit >= 0, --bisect >= 0")
    if args.plot is None:                                       # checked with the other outputs
        args.plot = os.path.splitext(args.out)[0] + ".png"
    return args


# ======================================================================================
# 2. The model (App. A "Architecture")
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
# 3. The method: Prop. 1 radii, a sound L, a lower estimate of L, an L2 attack; Eq. (4)
# ======================================================================================

def nearest_center(features, centers, center_classes):
    """The classifier of Prop. 1 (Eq. (4) with D = 1): -> (index of the nearest centre, its class).
    Squared distances at float64 from explicit differences, not the eq4 block's expanded form:
    this is the classifier a certificate speaks about, and a one-off cost (once per test image,
    no gradient) next to the feature pass.  [n, d], [M, d], [M] -> [n], [n]."""
    sq = (features.double()[:, None, :] - centers.double().to(features.device)[None]).pow(2).sum(-1)
    nearest = sq.argmin(1)                                                 # [n]
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
    L = float(lipschitz)
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
        margin = sq[:, None, :] - sq[:, :, None]
        r = margin / (2 * L * cd[None])
        r = torch.where(cd[None] > 0, r, torch.zeros_like(r))               # coinciding centres: 0
        r = r.masked_fill(~other[:, None, :], float("inf"))                  # j: other classes only
        min_over_j = r.min(2).values                                         # [n, M] per centre i
        radius = min_over_j.gather(1, nearest[:, None]).squeeze(1)           # step 4: i = mu_1
        tight = min_over_j.masked_fill(other, float("-inf")).max(1).values   # step 5: best i in c
        j2 = sq.masked_fill(~other, float("inf")).argmin(1)                  # step 6: mu_2
        two = r[torch.arange(len(f)), nearest, j2]
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


def lipschitz_layers(model, input_shape, fold=True):
    """Per-layer L2 Lipschitz bounds of model.features (the ResNet18 of App. A, eval mode)
    for inputs [C, H, W] = input_shape[-3:].  -> (bound, [(name, factor)]).
    fold=False: the plain per-layer list, each factor alone (normalisation 1 / min std; each conv
    by conv_operator_norm_bound; batch norm max |s|).  fold=True (tighter, equally sound): the
    normalisation and each batch norm are per-channel scalings, so they are multiplied into the
    adjacent convolution's kernel and the composite linear map (bias-free part) is bounded at once:
    ||diag(s) K diag(1/std)|| <= max|s| ||K|| max(1/std).  Everywhere: ReLU 1 (1-Lipschitz);
    a residual block relu(branch(x) + shortcut(x)) at most Lip(branch) + Lip(shortcut), the
    identity shortcut 1; global average pooling over h x w its exact norm 1 / sqrt(h w)."""
    net = model.model if isinstance(model, Classifier) else model
    hw = tuple(input_shape[-2:])
    parts = []

    def conv_bn(conv, bn, hw, in_scale=None):
        if conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
            raise ValueError("lipschitz_layers handles plain zero-padded convolutions only")
        w = conv.weight.detach().double()                                    # [c_out, c_in, k, k]
        # eval-mode batch norm is x -> s * x + b per channel, s = gamma / sqrt(running_var + eps)
        s = 1 / torch.sqrt(bn.running_var.detach().double() + bn.eps)        # [c_out]
        s = s * bn.weight.detach().double() if bn.weight is not None else s
        if fold:
            if in_scale is not None:
                w = w * in_scale[None, :, None, None]
            bound = conv_operator_norm_bound(s[:, None, None, None] * w, hw, conv.padding)
        else:
            bound = conv_operator_norm_bound(w, hw, conv.padding) * float(s.abs().max()) * (1 + SLACK)
        out = tuple((n + 2 * p - k) // st + 1 for n, p, k, st in
                    zip(hw, conv.padding, conv.kernel_size, conv.stride))
        return bound, out

    inv_std = 1 / net.std.detach().double().flatten()                       # [C]
    if not fold:
        parts.append(("normalise 1/min std", float(inv_std.max()) * (1 + SLACK)))
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


def jacobian_norm_lower(feature_fn, x, iters=6, generator=None):
    """Lower estimate of L: per image, ||J v|| / ||v|| for the best v the power iteration on
    A = J(x)^T J(x) reaches in `iters` products [B] float64, each <= ||J(x)||_2 <= L.

    Power iteration from a random v_0 (the same draw as a plain power iteration) visits v_0, A v_0,
    ..., A^iters v_0; the plain method answers with the last of them.  Here the answer is the best
    vector of their span K (Rayleigh-Ritz: the top eigenvector s of the Gram matrix (J Q)^T (J Q)
    of an orthonormal basis Q of K, as in Lanczos), so it is never below the plain answer for the
    same products and the same v_0 (K holds the last iterate), in exact arithmetic; it converges
    far faster: on three checkpoints 6 products gave the maximum over 200 images (main's
    lower_estimate) of 20 plain iterations to 6 digits, and each image's within 6e-4
    (benchmarks/certify.py, benchmarks/README.md).  The basis is built by
    orthogonalising each product against the earlier ones (twice, float64), so nearly parallel
    iterates lose no precision; a product with nothing new (below 1e-6 of its norm, float32
    noise: K is already A-invariant) adds a zero column.
    J^T w is one backward pass; J q is the derivative of u -> J^T u (linear in u) in the direction
    q, a second backward through the first (no forward-mode AD, whose first use in torch costs
    seconds of TorchScript compilation).  Per product: the cost of one plain power iteration.
    Eval-mode batch norm keeps the images independent, so a batch holds B separate problems."""
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
        w = w.flatten(1).double()
        q = w
        for _ in range(2):                                                   # Gram-Schmidt, twice
            for b in basis:
                q = q - (q * b).sum(1, keepdim=True) / (b * b).sum(1, keepdim=True).clamp_min(1e-300) * b
        size = q.norm(dim=1, keepdim=True)
        q = torch.where(size > 1e-6 * w.norm(dim=1, keepdim=True), q / size.clamp_min(1e-300),
                        torch.zeros_like(q))
    Q, JQ = torch.stack(basis, 2), torch.stack(images, 2)                   # [B, CHW, k], [B, d, k]
    _, vecs = torch.linalg.eigh(JQ.transpose(1, 2) @ JQ)                     # [B, k, k] Gram of J Q
    s = vecs[:, :, -1:]                                                      # top eigenvector [B, k, 1]
    # ||J v|| / ||v|| for the explicit v = Q s (J is linear: J v = (J Q) s), with ||v|| measured,
    # not assumed 1: the float32 copies of q_t fed to J are orthonormal only to ~1e-7
    return (JQ @ s).squeeze(2).norm(dim=1) / (Q @ s).squeeze(2).norm(dim=1).clamp_min(1e-300)


def attack_margin(features, centers, center_classes, y):
    """min_{i in class y} ||f - mu_i||^2 - min_{j not in y} ||f - mu_j||^2: > 0 once a centre of
    another class is the nearest (the nearest-centre prediction changed).  [B], in the features'
    dtype (float32 in certify.py's runs)."""
    sq = (features[:, None, :] - centers.to(features)[None]).pow(2).sum(-1)  # [B, M]
    same = center_classes[None, :] == y[:, None]                           # [B, M]
    inf = torch.tensor(float("inf"), device=sq.device, dtype=sq.dtype)
    return torch.where(same, sq, inf).min(1).values - torch.where(same, inf, sq).min(1).values


# The minimum-norm L2 attack's schedule (FMN, Pintor et al. 2021, with relative steps): the radius
# moves by a factor 1 -/+ gamma_t per step, the step is alpha_t eps; both decay from their first
# value to their last on a cosine.  A run with no adversarial iterate yet grows eps by at least
# GROW per step.  Chosen on generated 16x16 and Fashion-MNIST checkpoints against the earlier
# bisection of fixed-radius PGD runs (benchmarks/certify.py, benchmarks/README.md).
GAMMA, GAMMA_END, ALPHA, ALPHA_END, GROW = 0.1, 0.001, 0.25, 0.01, 0.2


def l2_attack(feature_fn, x, centers, center_classes, steps=40, bisect=10, return_examples=False):
    """Smallest L2 perturbation found that changes the nearest-centre prediction, per image [B]
    float64 (inf where none); with return_examples also the images found [B, C, H, W] (x where
    none).  Every finite value is the float64 distance ||x_adv - x|| of an x_adv in the box [0, 1]
    whose prediction by feature_fn was evaluated and differs from x's: an upper bound on the true
    minimal perturbation.

    One batched minimum-norm PGD-L2 run on feature_fn, each image with its own radius eps that
    moves at every step (the search over radii inside the run, in the manner of FMN, Pintor et al.,
    NeurIPS 2021, instead of 1 + bisect separate PGD runs at fixed radii), with m = attack_margin
    (> 0 once adversarial) and its gradient g at the iterate x + delta:
      adversarial now:               eps <- min(eps (1 - gamma_t), best norm so far)    shrink
      not, but one found before:     eps <- eps (1 + gamma_t)                           grow back
      none found yet:                eps <- max(||delta|| + (-m) / ||g||, (1 + GROW) eps)
                                     (the first-order distance to the boundary m = 0, growing)
      delta <- delta + alpha_t eps g / ||g||, then onto the ball ||delta|| <= eps and the box.
    g drops the components that push a pixel already at 0 or 1 out of the box (they would be
    clipped away and waste the step's norm).  The check of every iterate is nearest_center at
    float64; x's own class is the check of the first iterate (delta = 0).  Eval-mode batch norm
    keeps the images independent: B separate searches.  Then, forward passes only, `bisect`
    rounds of bisection on s in (0, 1] along the smallest adversarial iterate d = x_adv - x (s = 1:
    the finding), keeping the smallest adversarial point (the distance is not monotone in s)."""
    x = x.detach()
    mu = centers.to(x.device, x.dtype)                                       # [M, d]
    cls = center_classes.long().to(x.device)                                 # [M]
    best, x_adv, y = _l2_search(feature_fn, x, mu, cls, steps)
    view = (-1,) + (1,) * (x.dim() - 1)
    hit = torch.isfinite(best).nonzero().squeeze(1)                          # bisection along d
    x0, d, y0 = x[hit], x_adv[hit] - x[hit], y[hit]                          # d: the search's finding
    lo = torch.zeros(len(hit), dtype=torch.float64, device=x.device)        # s not adversarial (x)
    hi = torch.ones(len(hit), dtype=torch.float64, device=x.device)         # s adversarial (finding)
    with torch.no_grad():
        for _ in range(bisect if len(hit) else 0):
            s = (lo + hi) / 2
            z = (x0 + s.to(x.dtype).view(view) * d).clamp(0, 1)
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
    view = (-1,) + (1,) * (x.dim() - 1)
    delta = torch.zeros_like(x)
    eps = torch.zeros(len(x), dtype=torch.float64, device=x.device)          # radius per image
    best = torch.full((len(x),), float("inf"), dtype=torch.float64, device=x.device)
    x_adv = x.clone()
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
        m = attack_margin(f, mu, cls, y)                                     # [B]
        g, = torch.autograd.grad(m.sum(), z)
        with torch.no_grad():
            z = z.detach()
            g = g.masked_fill(((z <= 0) & (g < 0)) | ((z >= 1) & (g > 0)), 0)   # box-feasible
            g_norm = g.flatten(1).norm(dim=1).double().clamp_min(1e-30)
            c = 0.5 * (1 + math.cos(math.pi * t / steps))                    # cosine: 1 -> 0
            gamma, alpha = GAMMA_END + (GAMMA - GAMMA_END) * c, ALPHA_END + (ALPHA - ALPHA_END) * c
            norm = delta.double().flatten(1).norm(dim=1)
            first_order = norm + (-m.double()).clamp_min(0) / g_norm
            eps = torch.where(adv, torch.minimum(eps * (1 - gamma), best),
                              torch.where(torch.isfinite(best), eps * (1 + gamma),
                                          torch.maximum(first_order, eps * (1 + GROW))))
            delta = delta + (alpha * eps / g_norm).to(x.dtype).view(view) * g
            shrink = (eps / delta.double().flatten(1).norm(dim=1).clamp_min(1e-30)).clamp(max=1.0)
            delta = (x + delta * shrink.to(x.dtype).view(view)).clamp(0, 1) - x     # ball, box
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
# 4. The loop: load, bound, radii, attack, report (README "Result files")
# ======================================================================================

def main(argv=None):
    """certify.py: load, bound L, Prop. 1 radii on every test image, the L2 attack and the lower
    estimate on the first --attack-limit, then the results file and the summary.  Ctrl-C / SIGTERM:
    one line, exit 130 (`owned`)."""
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    args = parse_args(argv)
    with owned(args, argv, training=False):        # outputs checked, --out locked, before any work
        return certify(args)


def certify(args):
    device = setup_runtime(args, training=False)
    if args.amp:
        print("note: --amp ignored: certificates and the attack run in fp32 (margins need it)")
        args.amp = False
    t_run = time.time()
    module, ckpt, mu, mu_class, images, labels = load(args, device)
    net = module.model
    print(f"certify.py | {args.ckpt} ({ckpt['stage']}, ResNet18 w={args.width}, {len(mu)} centres) | data "
          f"{args.data} ({len(labels)} test images in {args.data_dir}) | device {device} | torch {torch.__version__}")
    print("config: " + json.dumps(vars(args)), flush=True)
    if ckpt["clusters"].get("D") != 1:
        print(f"note: the checkpoint classifies by Eq. (4) with D = {ckpt['clusters'].get('D') or 'all'}; "
              f"Prop. 1 certifies the nearest-centre classifier (D = 1), whose accuracy is reported")
    # L: the sound bound (always computed, to compare), layer by layer, or --lipschitz's value
    bound, parts = lipschitz_layers(net, images.shape[1:], fold=True)
    layerwise, _ = lipschitz_layers(net, images.shape[1:], fold=False)
    print("Lipschitz upper bound, layer by layer (float64; conv: Sedghi et al. 2019):")
    for name, v in parts + [("product (batch norm folded into the convolutions)", bound),
                            ("product, every layer alone (nothing folded)", layerwise)]:
        print(f"  {name:<58} {v:12.5g}")
    L = bound if args.lipschitz == "bound" else args.lipschitz
    r, correct = certify_all(net, module, images, labels, mu, mu_class, L, args)
    pert, lower_estimate = attack_first(net, images, mu, mu_class, r, args, device)
    results = results_of(args, len(labels), L, bound, layerwise, r, correct, pert, lower_estimate)
    results["seconds"] = time.time() - t_run
    plot = args.plot if args.plot.lower() not in ("", "none") else None
    note = "plot skipped (--plot none)" if plot is None else \
        plot_curves(results, r["radius"][:len(pert)], pert, lower_estimate, plot)
    results["plot"] = None if plot is None or "skipped" in note else plot
    # rounded; its "meaning" entry points to README "Result files", which says what each key means
    raw, results = results, described(results, "certify.py result: README.md 'Result files' gives each key's "
                                      "meaning; assumed_L_accuracy: the curves of a given --lipschitz, radii that "
                                      "hold only if f is L-Lipschitz (Prop. 1); sound: L >= lipschitz.upper_bound "
                                      "and no image flipped inside its radius")
    save_results(results, args.out)     # atomic; then this run's log replaces the previous one
    print_summary(args, raw, pert, note)   # unrounded figures
    return results


def load(args, device):
    """The checkpoint (read once; exit 2 with one line on a bad file or a mismatch) as the
    classifier module, its stored centres, and the test split on the device."""
    try:
        module, ckpt = read_classifier(args.ckpt, device)
    except CheckpointError as e:                                    # the command line: exit 2
        fail(str(e))
    data_dir_from_checkpoint(args, ckpt)
    if ckpt["stage"] in ("nominal", "qtrades-ce"):
        train = f"python magnet.py --init {shlex.quote(args.ckpt)}" if ckpt["stage"] == "nominal" else \
            "magnet.py or qtrades.py --loss magnet, from a nominal.py checkpoint (--init)"
        fail(f"{args.ckpt} is a '{ckpt['stage']}' checkpoint: it has no clusters (a linear head), "
             f"and Prop. 1 certifies the nearest-cluster classifier; certify a clustering checkpoint "
             f"(train one with {train})")
    info = ckpt["data"]
    args.data = args.data or info["name"]
    if args.data != info["name"]:
        fail(f"--data {args.data} but {args.ckpt} was trained on {info['name']}")
    if args.width is not None and args.width != ckpt["arch"]["width"]:
        fail(f"--width {args.width} but {args.ckpt} holds a width-{ckpt['arch']['width']} ResNet18")
    args.width = ckpt["arch"]["width"]
    # the stored centres as stored (module.centers is their float32 copy, for Eq. (4)); their
    # shapes [M, d] and [M] are checked on reading (damaged()), the two classes here
    mu = ckpt["clusters"]["centers"].to(device)                                     # [M, d]
    mu_class = ckpt["clusters"]["center_classes"].long().to(device)                 # [M]
    if len(mu_class.unique()) < 2:
        fail(f"{args.ckpt}: 'clusters' must hold centres of at least two classes")
    try:
        images, labels, classes = load_split(args.data, args.data_dir, False, args.limit)
    except DataError as e:
        fail(str(e))
    check_test_split(ckpt, args.ckpt, classes, images, args.data_dir)
    return module, ckpt, mu, mu_class, images.to(device), labels.to(device)


def progress(args, phase, k, chunks, t0, row, cells):
    """One chunk done: a row of <out>.log.jsonl ({phase, chunk, **row, images_per_second}) and a
    printed line (chunk, images, the phase's cells, images/s, elapsed, ETA)."""
    el = time.time() - t0
    append_jsonl(args.out + ".log.jsonl.partial", {"phase": phase, "chunk": k + 1, **row,
                                           "images_per_second": row["images"] / el})
    print(f"{k + 1:>5}/{chunks:<5} {row['images']:>7} {cells} {row['images'] / el:8.1f} {fmt_time(el):>9} "
          f"{fmt_time(el / (k + 1) * (chunks - k - 1)):>9}", flush=True)


def certify_all(net, module, images, labels, mu, mu_class, L, args):
    """Prop. 1 on every test image, in chunks (progress rows, log rows).  -> (radii dict of
    certified_radii, correct [n] by the nearest centre)."""
    n, parts, ties, t0 = len(labels), [], 0, time.time()
    print(f"{'chunk':>11} {'images':>7} {'acc':>7} {'med R':>10} {'img/s':>8} {'elapsed':>9} {'ETA':>9}")
    with torch.no_grad():
        for k, start in enumerate(range(0, n, args.batch_size)):
            f = net.features(to_float(images[start:start + args.batch_size])).double()   # [b, d]
            parts.append(certified_radii(f, mu, mu_class, L))     # chunk's radii
            # cross-check with Eq. (4) at D = 1 (the shared classifier): the same predictions
            eq4 = cluster_log_probs(f, mu.double(), mu_class, module.sigma2, D=1).argmax(1)
            ties += int((eq4 != parts[-1]["pred"]).sum())
            r = {key: torch.cat([c[key] for c in parts]) for key in parts[0]}
            done = len(r["pred"])
            row = {"images": done, "accuracy": float((r["pred"] == labels[:done]).double().mean()),
                   "median_radius": float(r["radius"].median())}
            progress(args, "certify", k, math.ceil(n / args.batch_size), t0, row,
                     f"{row['accuracy']:7.2%} {row['median_radius']:10.3g}")
    if ties:
        print(f"note: Eq. (4) with D = 1 predicts another class for {ties} images: ties between "
              f"centres of different classes, which Prop. 1 gives radius 0")
    return r, r["pred"] == labels


def attack_first(net, images, mu, mu_class, r, args, device):
    """The lower estimate of L and the L2 attack on the first --attack-limit images, on net, the
    network every certificate here is about.  (A copy with batch norm folded into the convolutions,
    its findings confirmed on net, was 1.08x-1.40x faster in three runs, not clearly the 1.3x that
    would pay for a second network: benchmarks/README.md, issue 22.)  -> (smallest perturbation
    found [m], inf where none; the lower estimate or None)."""
    m = len(images) if args.attack_limit == 0 else min(len(images), args.attack_limit)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    print(f"\nL2 attack and power iteration on {m} images ({args.attack_steps} PGD-L2 steps, "
          f"{args.bisect} bisection rounds; {args.power_iters} power iterations)")
    print(f"{'chunk':>11} {'images':>7} {'flipped':>8} {'med pert':>10} {'inside R':>9} "
          f"{'max |J|':>10} {'img/s':>8} {'elapsed':>9} {'ETA':>9}")
    pert, lower, t0 = [], [], time.time()
    for k, start in enumerate(range(0, m, args.batch_size)):
        x = to_float(images[start:min(m, start + args.batch_size)])
        lower.append(jacobian_norm_lower(net.features, x, args.power_iters, gen))
        pert.append(l2_attack(net.features, x, mu, mu_class, args.attack_steps, args.bisect))
        p = torch.cat(pert)
        inside = int((p < r["radius"][:len(p)]).sum())
        row = {"images": len(p), "flipped": int(torch.isfinite(p).sum()),
               "median_min_perturbation": finite(float(p.median())), "flipped_inside_radius": inside,
               "lower_estimate": float(torch.cat(lower).max())}
        progress(args, "attack", k, math.ceil(m / args.batch_size), t0, row,
                 f"{row['flipped']:>8} {float(p.median()):10.4g} {inside:>9} {row['lower_estimate']:10.4g}")
    pert = torch.cat(pert) if m else torch.zeros(0, dtype=torch.float64)
    return pert, (float(torch.cat(lower).max()) if m else None)


def results_of(args, n, L, bound, layerwise, r, correct, pert, lower_estimate):
    """The results dict (README "Result files" says what each key means)."""
    m = len(pert)
    inside = int((pert < r["radius"][:m]).sum())
    ok_r = r["radius"][correct]
    med_r = float(ok_r.median()) if len(ok_r) else 0.0
    max_r = float(ok_r.max()) if len(ok_r) else 0.0
    med_p = float(pert.median()) if m else float("nan")
    # A Prop. 1 radius is a certificate only if L is a Lipschitz constant: not below a Jacobian norm
    # found, and no image flipped inside its radius; else its curve says "not_sound".
    sound = not inside and (not lower_estimate or L >= lower_estimate)
    share = "certified_accuracy" if sound else "accuracy_not_sound"
    if args.lipschitz != "bound":
        # A given L is assumed, and its curves are named so.  Prop. 1 holds for an L-Lipschitz f;
        # the checks above can only falsify that.  L >= `bound` (a proven Lipschitz constant,
        # lipschitz_layers) proves it: any number above a Lipschitz constant is one.  Below the
        # bound nothing here proves it, so the radii are no certificate.
        sound, share = sound and L >= bound, "assumed_L_accuracy"
    return {
        "ckpt": args.ckpt, "data": args.data, "images": n, "sound": sound,
        "clean_accuracy": float(correct.double().mean()),
        "lipschitz": {"value": float(L), "kind": "bound" if args.lipschitz == "bound" else "given",
                      "lower_estimate": lower_estimate, "lower_estimate_images": m,
                      "upper_bound": bound, "upper_bound_layerwise": layerwise},
        "curve": accuracy_curve(r["radius"], correct, args.grid, share),
        "curve_tight": accuracy_curve(r["tight"], correct, args.grid, share),
        "curve_two_closest": accuracy_curve(r["two_closest"], correct, args.grid, "two_closest_not_sound"),
        "two_closest_differs": int((r["two_closest"] > r["radius"]).sum()),
        "tight_exceeds_sound": int((r["tight"] > r["radius"]).sum()),
        "radius": {"median_correct": med_r, "max_correct": max_r, "vacuous": max_r < 1 / 255,
                   "median_correct_tight": float(r["tight"][correct].median()) if len(ok_r) else 0.0,
                   "median_correct_if_L_were_lower_estimate": med_r * L / lower_estimate
                   if lower_estimate else None},
        "l2_attack": {"median_min_perturbation": finite(med_p), "images": m,
                      "flipped": int(torch.isfinite(pert).sum()), "flipped_inside_certified_radius": inside,
                      "share_flipped_inside": inside / m if m else None,
                      "steps": args.attack_steps, "bisect": args.bisect,
                      "curve": accuracy_curve(pert, correct[:m], args.grid, "attacked_accuracy") if m else [],
                      "gap_median_ratio": finite(med_p / float(r["radius"][:m].median()))
                      if m and float(r["radius"][:m].median()) > 0 else None},
    }


def print_summary(args, results, pert, note):
    """The summary table, from the results before rounding (and the perturbations found)."""
    lip, rad, att, n = results["lipschitz"], results["radius"], results["l2_attack"], results["images"]
    L, low, m, inside = lip["value"], lip["lower_estimate"], att["images"], att["flipped_inside_certified_radius"]
    med_p = float(pert.median()) if m else float("nan")
    share, = set(results["curve"][0]) - {"radius"}                 # results_of's name for the share
    head = {"certified_accuracy": "certified acc", "assumed_L_accuracy": "acc, L assumed"}.get(share, "NOT certified")
    lines = [f"\nsummary: {n} test images of {args.data}, {args.ckpt}",
             f"  clean accuracy (nearest centre, D = 1)   {results['clean_accuracy']:.2%}",
             f"  L used ({lip['kind']:<5})                       {L:.4g}",
             f"  L upper bound / lower estimate           {lip['upper_bound']:.4g} / "
             f"{low if low is None else format(low, '.4g')}   (layer-wise product {lip['upper_bound_layerwise']:.4g})",
             f"  radius R(x), correct images: median     {rad['median_correct']:.4g}   max {rad['max_correct']:.4g}   "
             f"(best same-class centre: median {rad['median_correct_tight']:.4g})",
             f"  ... median if L were the lower estimate  "
             f"{rad['median_correct_if_L_were_lower_estimate'] or float('nan'):.4g}   (not sound)",
             f"  L2 attack: median min. perturbation      {med_p:.4g}  ({att['flipped']}/{m} flipped)",
             f"  flipped inside the certified radius      {inside}/{m}"
             + ("   <- the given L is too small: these radii are NOT sound" if inside else "   (must be 0)"),
             f"  two-closest radius > sound radius        {results['two_closest_differs']}/{n}",
             f"  best same-class centre > sound radius    {results['tight_exceeds_sound']}/{n}",
             f"  {'radius':>12} {head:>14}"]
    step = max(1, (len(results["curve"]) - 1) // 10)
    lines += [f"  {p['radius']:12.4g} {p[share]:14.2%}" for p in results["curve"][::step]]
    if low is not None and L < low:
        lines.append(f"  WARNING: L = {L:.4g} is below a Jacobian norm found ({low:.4g}): "
                     f"it is not a Lipschitz constant and the radii are not certificates")
    if lip["kind"] == "given" and L < lip["upper_bound"]:
        lines.append(f"  NOTE: the given L = {L:.4g} is below the sound bound {lip['upper_bound']:.4g}: the radii "
                     f"assume f is L-Lipschitz (Prop. 1); nothing here certifies them")
    if rad["vacuous"]:
        lines.append(f"  VACUOUS: no correct image is certified beyond {rad['max_correct']:.3g} < 1/255 (one "
                     f"grey level on one pixel); the attack needs a median {med_p:.3g}, "
                     f"{att['gap_median_ratio'] or float('nan'):.3g}x the median radius. "
                     f"The layer-wise bound is that loose for a deep network.")
    lines += [f"  {note}", f"  results {args.out}   log {args.out + '.log.jsonl'}",
              f"  next    python attack.py --ckpt {shlex.quote(args.ckpt)}   (L-inf robustness, worst case)"]
    print("\n".join(lines), flush=True)


def finite(v):
    """JSON has no inf/nan: None instead."""
    return v if v is None or math.isfinite(v) else None


def plot_curves(results, radius, pert, lower, path):
    """Certified accuracy vs radius (Fig. 3 b, d), and on a log axis the sound radii beside the
    attack's perturbations (and R(x) with L = the lower estimate: the best any bound could do)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: plot skipped (pip install matplotlib)"
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    main, = set(results["curve"][0]) - {"radius"}                  # results_of's name for the share
    sound, ylabel = {"certified_accuracy": ("sound", "certified accuracy"),
                     "assumed_L_accuracy": ("L assumed", "accuracy, L assumed (not certified)"),
                     "accuracy_not_sound": ("NOT sound", "accuracy (L not sound: no certificate)")}[main]
    for key, label, style in (("curve", f"{sound}: R(x)", "-"),
                              ("curve_tight", f"{sound}: best same-class centre", "--"),
                              ("curve_two_closest", "two closest (paper's text; not sound)", ":")):
        c = results[key]
        share, = set(c[0]) - {"radius"}
        a.step([p["radius"] for p in c], [p[share] for p in c], style, where="post", label=label)
    a.set(xlabel="L2 radius (pixels in [0,1])", ylabel=ylabel,
          title=f"Prop. 1, L = {results['lipschitz']['value']:.3g} ({results['lipschitz']['kind']})")
    a.legend(fontsize=8)
    L = results["lipschitz"]["value"]
    for values, label, style in ((radius, f"{sound}: radius R(x)", "-"), (pert, "L2 attack (min. found)", "-"),
                                 (radius * L / (lower or L), "R(x) if L = lower estimate (not sound)", "--")):
        v = values.double().sort().values                                  # every attacked image
        shown = v[(v > 0) & torch.isfinite(v)]                             # what a log axis can show
        if len(shown):                                                     # share with radius > r
            above = (len(v) - torch.searchsorted(v, shown, right=True)).double() / len(v)
            b.step(shown.tolist(), above.tolist(), style, where="post", label=label)
    b.set(xscale="log", xlabel="L2 radius (log)", ylabel="share of attacked images with radius > r",
          title="gap between the certificate and the attack")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot written to {path}"


# ======================================================================================
# 5. Plumbing: identical in every stage that carries it; checked by test_all.py (shared blocks)
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
