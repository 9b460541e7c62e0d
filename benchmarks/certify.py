"""benchmarks/certify.py -- certify.py's L2 attack and lower estimate of L, against the code they
replaced (issue 15), on the same images in one run: images/s and the answers, image by image.

No optional dependency.  This file imports no test code (it generates its own data).

    python benchmarks/certify.py                          # README's generated folder, 200 images
    python benchmarks/certify.py --images 50 --threads 1
    python benchmarks/certify.py --ckpt fm_clustr.pt --data-dir DIR   # any clustering checkpoint
    git show 5492c17:certify.py > /tmp/certify_5492c17.py
    python benchmarks/certify.py --fold /tmp/certify_5492c17.py --repeats 3   # the folded copy (issue 22)

Default inputs: benchmarks/README.md "A whole pipeline on generated images (plumbing, not a robustness result)":
a generated 10-class ImageFolder (16x16 noisy colour patches, 100 train and 50 test images per
class, noise 110), a width-16 nominal.py model (15 epochs, -b 64) and magnet.py from it (10
epochs); built once in --workdir.

Compared on the first --images test images, in certify.py's chunks (-b), with certify.py's
defaults on each side:
  * before: the functions below under REFERENCE, copied verbatim from certify.py at commit
    816fd0e: l2_attack = PGD-L2 at the box diameter, then --bisect 10 rounds of PGD-L2 (20 steps,
    from delta = 0) at radii chosen by bisection, one round after the other (1 + 10 runs of 21
    passes); jacobian_norm_lower = 20 power iterations, the last iterate's ||J v||.
  * now: certify.l2_attack (one batched minimum-norm run of 40 steps in which every image's radius
    moves every step, then 10 forward-only bisection rounds along the perturbation found) and
    certify.jacobian_norm_lower (6 power iterations, the best vector of the iterates' span), both
    on the network, as certify.main runs them (until issue 22 on a batch-norm-folded channels_last
    copy, the findings confirmed on the network: --fold BEFORE times that against now).
The attack is a different algorithm, so "the same answer" is checked as: every perturbation now
reported changes the prediction, lies in the box and at the distance reported; none lies inside a
certified radius; and per image the ratio now / before of the smallest perturbation found (< 1:
now stronger), its median, worst case, and the share of images where now <= before.  The lower
estimate starts from the same random vector on both sides (the same generator draws); at equal
iterations it is never below the plain power iteration (Rayleigh-Ritz over a space holding the
last iterate: checked here at 20 iterations), and at the defaults the ratio now / before per
image is printed.  Last, the model's forward + backward cost per image at batch sizes 1 to 256:
what batching more rows (radii beside images) could still save on this machine.
"""

import argparse
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import certify  # noqa: E402  (the code under test)
import magnet  # noqa: E402
import nominal  # noqa: E402
from generated import make_image_folder  # noqa: E402  (benchmarks/generated.py)

# ======================================================================================
# REFERENCE: certify.py's nearest_center, jacobian_norm_lower, attack_margin, pgd_l2 and l2_attack
# as they were at commit 816fd0e (before issue 15), copied verbatim.  Do not edit: they are the
# baseline the figures in benchmarks/README.md compare against.
# ======================================================================================

def nearest_center(features, centers, center_classes):
    """The classifier of Prop. 1 (Eq. (4) with D = 1): -> (index of the nearest centre, its class).
    Squared distances at float64 from explicit differences.  [n, d], [M, d], [M] -> [n], [n]."""
    sq = (features.double()[:, None, :] - centers.double().to(features.device)[None]).pow(2).sum(-1)
    nearest = sq.argmin(1)                                                 # [n]
    return nearest, center_classes.to(features.device)[nearest]


def jacobian_norm_lower(feature_fn, x, iters=20, generator=None):
    """Lower estimate of L: per image, power iteration on J(x)^T J(x); returns ||J v|| / ||v|| [B],
    each <= ||J(x)||_2 <= L.  J^T w is one backward pass; J v is the derivative of u -> J^T u
    (linear in u) in the direction v, a second backward through the first (no forward-mode AD,
    whose first use in torch costs seconds of TorchScript compilation).  Eval-mode batch norm keeps
    the images independent, so a batch holds B separate problems."""
    view = (-1,) + (1,) * (x.dim() - 1)
    x = x.detach().requires_grad_(True)
    f = feature_fn(x)                                                        # [B, d]
    u = torch.zeros_like(f, requires_grad=True)
    jt_u, = torch.autograd.grad(f, x, u, create_graph=True)                  # J^T u  [B, C, H, W]
    v = torch.randn(x.shape, generator=generator, device=x.device)
    for t in range(iters + 1):
        v = v / v.flatten(1).norm(dim=1).clamp_min(1e-30).view(view)
        jv, = torch.autograd.grad(jt_u, u, v, retain_graph=True)             # J v    [B, d]
        if t == iters:
            return jv.detach().double().norm(dim=1)
        v, = torch.autograd.grad(f, x, jv, retain_graph=True)                # J^T J v


def attack_margin(features, centers, center_classes, y):
    """min_{i in class y} ||f - mu_i||^2 - min_{j not in y} ||f - mu_j||^2: > 0 once a centre of
    another class is the nearest (the nearest-centre prediction changed).  [B]."""
    sq = (features.float()[:, None, :] - centers[None]).pow(2).sum(-1)     # [B, M]
    same = center_classes[None, :] == y[:, None]                           # [B, M]
    inf = torch.tensor(float("inf"), device=sq.device)
    return torch.where(same, sq, inf).min(1).values - torch.where(same, inf, sq).min(1).values


def pgd_l2(feature_fn, x, y, centers, center_classes, r, steps):
    """PGD in L2 (Madry et al.) on the nearest-centre margin, radius r [B] per image: steps of
    2.5 r / steps along the normalised gradient, projection onto the ball ||delta|| <= r and the box
    [0, 1].  Every iterate is checked; -> norm [B] of the smallest iterate that changed the
    prediction (inf if none)."""
    delta = torch.zeros_like(x)
    best = torch.full((len(x),), float("inf"), dtype=torch.float64, device=x.device)
    view = (-1,) + (1,) * (x.dim() - 1)
    alpha = (2.5 * r / steps).view(view).to(x)
    for t in range(steps + 1):
        delta.requires_grad_(True)
        f = feature_fn(x + delta)                                            # [B, d]
        with torch.no_grad():
            _, pred = nearest_center(f, centers, center_classes)
            norm = delta.detach().double().flatten(1).norm(dim=1)
            best = torch.where((pred != y) & (norm < best), norm, best)
        if t == steps:
            break
        g, = torch.autograd.grad(attack_margin(f, centers, center_classes, y).sum(), delta)
        with torch.no_grad():
            delta = delta + alpha * g / g.flatten(1).norm(dim=1).clamp_min(1e-30).view(view)
            n = delta.flatten(1).norm(dim=1).view(view)
            delta = delta * torch.clamp(r.view(view).to(x) / n.clamp_min(1e-30), max=1.0)  # ball
            delta = (x + delta).clamp(0, 1) - x                                # box; norm only shrinks
    return best


def l2_attack(feature_fn, x, centers, center_classes, steps=20, bisect=10):
    """Smallest L2 perturbation found that changes the nearest-centre prediction, per image [B]
    (inf where none).  A first PGD at the box diameter sqrt(C H W), then `bisect` rounds on the
    radius: r = hi / 4 until a miss, then the geometric mean of (miss, hit), hi being the smallest
    flipping norm so far.  Every finite value returned is the norm of a perturbation that really
    changed the prediction (an upper bound on the true minimal one)."""
    centers = centers.float().to(x.device)
    center_classes = center_classes.long().to(x.device)
    with torch.no_grad():
        _, y = nearest_center(feature_fn(x), centers, center_classes)
    hi = torch.full((len(x),), math.sqrt(x[0].numel()), dtype=torch.float64, device=x.device)
    best = pgd_l2(feature_fn, x, y, centers, center_classes, hi, steps)
    lo = torch.zeros_like(hi)
    for _ in range(bisect):
        live = torch.isfinite(best)
        if not live.any():
            break
        hi = torch.minimum(hi, best)
        r = torch.where(lo > 0, torch.sqrt(lo * hi), hi / 4)
        idx = live.nonzero().squeeze(1)
        found = pgd_l2(feature_fn, x[idx], y[idx], centers, center_classes, r[idx], steps)
        best[idx] = torch.minimum(best[idx], found)
        lo[idx] = torch.where(torch.isfinite(found), lo[idx], r[idx])
    return best


# ======================================================================================
# end of REFERENCE
# ======================================================================================


def build(workdir):
    """benchmarks/README.md "A whole pipeline on generated images (plumbing, not a robustness result)": the
    folder, nominal.py (15 epochs), magnet.py from it (10)."""
    data = os.path.join(workdir, "toy")
    if not os.path.isdir(data):
        make_image_folder(data, classes=10, n_train=100, n_test=50, noise=110.0)
    nom, clu = os.path.join(workdir, "toy_nominal.pt"), os.path.join(workdir, "toy_clustr.pt")
    if not os.path.exists(nom):
        nominal.main(["--data", "folder", "--data-dir", data, "--width", "16", "--epochs", "15",
                      "-b", "64", "--out", nom])
    if not os.path.exists(clu):
        magnet.main(["--data", "folder", "--data-dir", data, "--width", "16", "--epochs", "10",
                     "--init", nom, "--out", clu])
    return clu, data


class Counted:
    """feature_fn that counts the images it is given (each forward pass of one image = 1)."""

    def __init__(self, fn):
        self.fn, self.images = fn, 0

    def __call__(self, x):
        self.images += len(x)
        return self.fn(x)


def run(label, fn, chunks):
    """fn(chunk, generator) over the chunks, one generator seeded 0 across them as certify.main
    does; -> (its outputs concatenated (each, for a tuple), wall seconds, CPU seconds)."""
    gen = torch.Generator().manual_seed(0)
    t0, c0 = time.perf_counter(), time.process_time()
    out = [fn(x, gen) for x in chunks]
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"  {label:<44} {wall:8.2f} s wall {cpu:8.2f} s CPU", flush=True)
    if isinstance(out[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*out)), wall, cpu
    return torch.cat(out), wall, cpu


def per_image_cost(features, x, sizes=(1, 16, 64, 256)):
    """ms per image of one forward + backward to the input at several batch sizes (the fastest of
    3): how much a larger batch (e.g. radii batched beside the images) could save per image."""
    out = {}
    for b in sizes:
        z = x[:b].repeat((b + len(x) - 1) // len(x), 1, 1, 1)[:b].clone().requires_grad_(True)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            torch.autograd.grad(features(z).sum(), z)
            times.append(time.perf_counter() - t0)
        out[b] = min(times) / b * 1000
    return out


def fold_comparison(ckpt, data_dir, args):
    """--fold BEFORE (issue 22): certify.py's attack phase (jacobian_norm_lower with 6 products,
    then l2_attack with 40 steps and 10 bisection rounds) as certify.main runs it now, on the
    network as loaded, against the same phase in BEFORE, a copy of certify.py from before issue 22
    (`git show 5492c17:certify.py > BEFORE`), as its main ran it: on a batch-norm-folded copy in
    channels_last layout, the attack's findings confirmed and bisected on the network (check_fn).
    The fastest of --repeats alternating timings per side."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("certify_before", args.fold)
    before = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(before)
    module, ck = certify.read_classifier(ckpt, "cpu")
    net = module.model
    fast = before.fold_batchnorm(module).model.to(memory_format=torch.channels_last)
    mu = torch.as_tensor(ck["clusters"]["centers"])
    cls = torch.as_tensor(ck["clusters"]["center_classes"]).long()
    images, _, _ = certify.load_split(ck["data"]["name"], data_dir, False, args.images)
    x = certify.to_float(images)
    chunks = [x[i:i + args.batch_size] for i in range(0, len(x), args.batch_size)]
    chunks_cl = [c.contiguous(memory_format=torch.channels_last) for c in chunks]
    print(f"benchmarks/certify.py --fold | {ckpt} (width {ck['arch']['width']}) | {len(x)} test images "
          f"{tuple(x.shape[1:])} | torch {torch.__version__} | {torch.get_num_threads()} thread(s) | "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)

    sides = [("plain", "now: the network as loaded", chunks,
              lambda c, g: (certify.jacobian_norm_lower(net.features, c, 6, g),
                            certify.l2_attack(net.features, c, mu, cls, 40, 10))),
             ("folded", "before: folded, channels_last, checked on the network", chunks_cl,
              lambda c, g: (before.jacobian_norm_lower(fast.features, c, 6, g),
                            before.l2_attack(fast.features, c, mu, cls, 40, 10, check_fn=net.features)))]
    wall, cpu, out = {k: [] for k, *_ in sides}, {k: [] for k, *_ in sides}, {}
    for rep in range(args.repeats):
        for key, label, data, fn in (sides if rep % 2 == 0 else sides[::-1]):
            out[key], w, c = run(label, fn, data)
            wall[key].append(w)
            cpu[key].append(c)
    (low_p, pert_p), (low_f, pert_f) = out["plain"], out["folded"]
    for clock, t in (("wall", wall), ("CPU", cpu)):
        best = {k: min(v) for k, v in t.items()}
        print(f"attack phase, images/s by {clock} time: now {len(x) / best['plain']:.2f}, before (folded copy) "
              f"{len(x) / best['folded']:.2f}: before / now {best['plain'] / best['folded']:.2f}x")
    print(f"lower estimate, now / before {float(low_p.max()):.7g} / {float(low_f.max()):.7g}; attack median "
          f"{float(pert_p.median()):.4g} / {float(pert_f.median()):.4g}; flipped {int(torch.isfinite(pert_p).sum())} / "
          f"{int(torch.isfinite(pert_f).sum())}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="/tmp/clustr_bench_certify")
    p.add_argument("--ckpt", default=None, help="a clustering checkpoint (default: build README's)")
    p.add_argument("--data-dir", default=None, help="its data folder (with --ckpt)")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("-b", "--batch-size", type=int, default=256, help="certify.py's chunk (default 256)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="timings per side, alternating; the fastest counts")
    p.add_argument("--out", default=None, help="JSON of the figures (default: <workdir>/certify.json)")
    p.add_argument("--fold", default=None, metavar="BEFORE",
                   help="only: certify.py's attack phase now (on the network) against BEFORE's, a copy "
                        "of certify.py at 5492c17 (on a batch-norm-folded channels_last copy) (issue 22)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.workdir, exist_ok=True)
    ckpt, data_dir = (args.ckpt, args.data_dir) if args.ckpt else build(args.workdir)
    if args.fold:
        return fold_comparison(ckpt, data_dir, args)
    module, ck = certify.read_classifier(ckpt, "cpu")
    net = module.model
    mu = torch.as_tensor(ck["clusters"]["centers"])
    cls = torch.as_tensor(ck["clusters"]["center_classes"]).long()
    images, _, _ = certify.load_split(ck["data"]["name"], data_dir, False, args.images)
    x = certify.to_float(images)
    n = len(x)
    chunks = [x[i:i + args.batch_size] for i in range(0, n, args.batch_size)]
    print(f"benchmarks/certify.py | {ckpt} (width {ck['arch']['width']}, {len(mu)} centres) | "
          f"{n} test images {tuple(x.shape[1:])} | torch {torch.__version__} | "
          f"{torch.get_num_threads()} thread(s) | {platform.processor() or platform.machine()} | "
          f"{time.strftime('%Y-%m-%d')}", flush=True)

    counts = {"old_p": Counted(net.features), "new_p": Counted(net.features)}   # forward passes of the attacks
    sides = [
        ("old_low", "before: power iteration (20)", chunks,
         lambda c, g: jacobian_norm_lower(net.features, c, 20, g)),
        ("new_low", "now: jacobian_norm_lower (6)", chunks,
         lambda c, g: certify.jacobian_norm_lower(net.features, c, 6, g)),
        ("old_p", "before: l2_attack (20 steps x 11 radii)", chunks,
         lambda c, g: l2_attack(counts["old_p"], c, mu, cls, 20, 10)),
        ("new_p", "now: l2_attack (40 steps, 10 bisection)", chunks,
         lambda c, g: certify.l2_attack(counts["new_p"], c, mu, cls, 40, 10, return_examples=True))]
    out, wall, cpu = {}, {key: [] for key, *_ in sides}, {key: [] for key, *_ in sides}
    for rep in range(args.repeats):                     # alternating order; the fastest of each
        for key, label, data, fn in (sides if rep % 2 == 0 else sides[::-1]):
            out[key], w, c = run(label, fn, data)
            wall[key].append(w)
            cpu[key].append(c)
    old_low, new_low, old_p, (new_p, x_adv) = (out[k] for k in ("old_low", "new_low", "old_p", "new_p"))
    eq_low, _, _ = run("now at equal iterations (20), untimed",
                       lambda c, g: certify.jacobian_norm_lower(net.features, c, 20, g), chunks)
    cost = per_image_cost(net.features, x)
    passes = {"old_p": counts["old_p"].images / (n * args.repeats),
              "new_p": counts["new_p"].images / (n * args.repeats)}

    # --- the answers -----------------------------------------------------------------------
    with torch.no_grad():
        f = torch.cat([net.features(c) for c in chunks]).double()
        f_adv = torch.cat([net.features(x_adv[i:i + args.batch_size].contiguous())
                           for i in range(0, n, args.batch_size)])
    _, y = certify.nearest_center(f, mu, cls)
    _, y_adv = certify.nearest_center(f_adv, mu, cls)
    fin = torch.isfinite(new_p)
    dist = (x_adv.double() - x.double()).flatten(1).norm(dim=1)
    valid = bool((y_adv[fin] != y[fin]).all() and torch.equal(dist[fin], new_p[fin])
                 and x_adv.min() >= 0 and x_adv.max() <= 1 and torch.equal(x_adv[~fin], x[~fin]))
    L = certify.lipschitz_layers(net, x.shape[1:])[0]
    radius = certify.certified_radii(f, mu, cls, L)["radius"]
    both = fin & torch.isfinite(old_p)
    ratio = new_p[both] / old_p[both]
    low_ratio = new_low / old_low
    res = {
        "ckpt": ckpt, "images": n, "image_shape": list(x.shape[1:]), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "repeats": args.repeats,
        "seconds_wall": wall, "seconds_cpu": cpu, "forward_passes_per_image": passes,
        "forward_backward_ms_per_image_by_batch": cost,
        "l2_attack": {
            "flipped": {"before": int(torch.isfinite(old_p).sum()), "now": int(fin.sum())},
            "median_min_perturbation": {"before": float(old_p.median()), "now": float(new_p.median())},
            "inside_certified_radius": {"before": int((old_p < radius).sum()), "now": int((new_p < radius).sum())},
            "now_examples_valid": valid,
            "ratio_now_over_before": {"median": float(ratio.median()), "min": float(ratio.min()),
                                      "max": float(ratio.max()),
                                      "share_now_at_most_before": float((ratio <= 1).double().mean()),
                                      "images_now_over_1.01x": int((ratio > 1.01).sum())}},
        "lower_estimate": {
            "before": float(old_low.max()), "now": float(new_low.max()),
            "ratio_now_over_before": {"min": float(low_ratio.min()), "median": float(low_ratio.median()),
                                      "max": float(low_ratio.max())},
            "equal_iterations_min_ratio": float((eq_low / old_low).min())},
    }
    for clock, t in (("wall", wall), ("cpu", cpu)):
        best = {k: min(v) for k, v in t.items()}
        ips = {"before": {"power_iteration": n / best["old_low"], "l2_attack": n / best["old_p"],
                          "both": n / (best["old_low"] + best["old_p"])},
               "now": {"power_iteration": n / best["new_low"], "l2_attack": n / best["new_p"],
                       "both": n / (best["new_low"] + best["new_p"])}}
        res[f"images_per_second_{clock}"] = ips
        res[f"speed_up_{clock}"] = {k: ips["now"][k] / ips["before"][k] for k in ips["now"]}
    work = {"power_iteration": "20 / 6 products with J^T J",
            "l2_attack": f"{passes['old_p']:.0f} / {passes['new_p']:.0f} forward passes", "both": ""}
    print(f"\nimages/s, the fastest of {args.repeats} alternating timings (wall clock; CPU time of "
          f"this process in brackets)\n")
    print("| part | before | now | speed-up | work per image, before / now |")
    print("| --- | --- | --- | --- | --- |")
    w, c = res["images_per_second_wall"], res["images_per_second_cpu"]
    for key, name in (("power_iteration", "lower estimate of L"), ("l2_attack", "L2 attack"),
                      ("both", "both (certify.py's attack phase)")):
        print(f"| {name} | {w['before'][key]:.2f} ({c['before'][key]:.2f}) | {w['now'][key]:.2f} "
              f"({c['now'][key]:.2f}) | {res['speed_up_wall'][key]:.2f}x ({res['speed_up_cpu'][key]:.2f}x) "
              f"| {work[key]} |")
    a, lo = res["l2_attack"], res["lower_estimate"]
    r = a["ratio_now_over_before"]
    print(f"\nL2 attack: flipped {a['flipped']['before']}/{n} before, {a['flipped']['now']}/{n} now; "
          f"median smallest perturbation {a['median_min_perturbation']['before']:.4g} before, "
          f"{a['median_min_perturbation']['now']:.4g} now; inside a certified radius "
          f"{a['inside_certified_radius']['before']} / {a['inside_certified_radius']['now']}; every "
          f"perturbation now reported flips, in the box, at its distance: {valid}")
    print(f"  per image now / before: median {r['median']:.4f}, min {r['min']:.4f}, max {r['max']:.4f}; "
          f"now <= before on {r['share_now_at_most_before']:.1%}; now > 1.01x before on "
          f"{r['images_now_over_1.01x']} image(s)")
    print(f"lower estimate of L: {lo['before']:.6g} before, {lo['now']:.6g} now; per image now / before "
          f"min {lo['ratio_now_over_before']['min']:.7f}, median {lo['ratio_now_over_before']['median']:.7f}, "
          f"max {lo['ratio_now_over_before']['max']:.7f}; at equal iterations (20) min ratio "
          f"{lo['equal_iterations_min_ratio']:.7f}")
    print("forward + backward, ms per image by batch size: "
          + ", ".join(f"{b}: {v:.2f}" for b, v in cost.items()))
    out = args.out or os.path.join(args.workdir, "certify.json")
    with open(out, "w") as fh:
        json.dump(res, fh, indent=1)
    print(f"written {out}")


if __name__ == "__main__":
    main()
