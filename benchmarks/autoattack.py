"""benchmarks/autoattack.py -- attack.py's default worst case against AutoAttack, example by example.

OPTIONAL DEPENDENCY, benchmark only: torchattacks (`pip install torchattacks==3.5.1`). attack.py and
the tests never import it; this file imports no test code (it generates its own data).

    python benchmarks/autoattack.py                          # both parts, ~40 min on one CPU thread
    python benchmarks/autoattack.py --parts A --images 100   # quicker
    python benchmarks/autoattack.py --parts B                # the checks' cost only (~2 min)

A. Strength.  On models trained by this repository's own nominal.py (width-8 ResNet18s on generated
   16x16 ImageFolders: noisy colour patches, class c with a bright quadrant c mod 4, noise 110):
     - nominal-10:   the 10-class nominal model (its linear head);
     - sharp-10:     a clustering checkpoint made from it, K = 2 centres per class (the means of the
                     class halves split at the median of the first principal direction), sigma^2 of
                     Eq. (3) over the training split divided by 100: confident Eq. (4) probabilities,
                     as a trained ClusTR model has, where cross-entropy gradients vanish in float32;
     - sharp-40-D20: the same construction on a 40-class folder (80 centres), predicting from the
                     D = 20 nearest centres (Sec. 4.2: CIFAR100 uses D = 20);
     - sharp-100-D20: the same on a 100-class folder (200 centres, D = 20): CIFAR100's setting.
   attack.py runs its default (`python attack.py --ckpt M --no-checks`: ce, margin, margin-t with
   min(9, C - 1) targets, magnet for clustering models, square with --square-queries; 100 steps,
   AutoAttack's cascade).  AutoAttack "standard" is built from torchattacks' parts as in Croce &
   Hein 2020: APGD-CE, APGD-T with 9 targets, FAB-T with 9 targets, each 100 iterations, and Square
   with 5000 queries, through MultiAttack (each later attack on the examples still robust).  Both
   are judged by attack.py's own classifier at the returned images (inside the eps-ball, checked).
   AutoAttack sees log p of Eq. (4) as its logits, with the -inf of classes outside the D nearest
   replaced by -1e4 (torchattacks' DLR losses are NaN on -inf); no decision changes.
B. Cost of the checks: the test suite's case (3 classes, 60 train and 30 test images each, width 8,
   3 nominal epochs, the clustering checkpoint built as above with the stored sigma^2), attack.py's
   default run with its default checks: check seconds / attack seconds.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import attack  # noqa: E402
import nominal  # noqa: E402
from generated import make_image_folder  # noqa: E402  (benchmarks/generated.py)

try:
    import torchattacks
except ImportError:
    torchattacks = None


def clustering_from_nominal(nom, data, out, sigma2_scale=1.0, D=None):
    """A clustr/1 'magnet' checkpoint from a nominal one: K = 2 centres per class (median split of
    the first principal direction), sigma^2 = Eq. (3)'s over the training split x sigma2_scale."""
    ck = torch.load(nom, map_location="cpu", weights_only=True)
    model = attack.build_model(ck["arch"], ck["data"], with_head=True)
    model.load_state_dict(ck["model"])
    model.eval()
    (train_x, train_y), _, _ = nominal.load_data("folder", data)
    with torch.no_grad():
        f = torch.cat([model.features(nominal.to_float(train_x[i:i + 256]))
                       for i in range(0, len(train_y), 256)])
    centers, center_classes, own = [], [], []
    for c in range(ck["data"]["num_classes"]):
        fc = f[train_y == c]
        proj = (fc - fc.mean(0)) @ torch.linalg.svd(fc - fc.mean(0), full_matrices=False).Vh[0]
        mu = torch.stack([fc[proj <= proj.median()].mean(0), fc[proj > proj.median()].mean(0)])
        centers.append(mu)
        center_classes += [c, c]
        own.append((fc[:, None] - mu[None]).pow(2).sum(-1).min(1).values)
    own = torch.cat(own)
    sigma2 = float(own.sum() / (len(own) - 1)) * sigma2_scale
    ckpt = dict(ck, stage="magnet", model={k: v for k, v in ck["model"].items() if not k.startswith("head.")},
                clusters={"centers": torch.cat(centers), "center_classes": torch.tensor(center_classes),
                          "variance": sigma2, "K": 2, "alpha": 12.5, "D": D})
    ckpt.pop("resume", None)
    nominal.save_checkpoint(ckpt, out)
    return out


def build(workdir, classes, n_train, n_test, epochs, noise=110.0):
    data = os.path.join(workdir, f"data{classes}")
    if not os.path.isdir(data):
        make_image_folder(data, classes, n_train, n_test, noise=noise)
    nom = os.path.join(workdir, f"nominal{classes}.pt")
    if not os.path.exists(nom):
        nominal.main(["--data", "folder", "--data-dir", data, "--width", "8", "--epochs", str(epochs),
                      "-b", "64", "--out", nom, "--slim"])
    return data, nom


class Finite(torch.nn.Module):
    """log p with -inf (classes outside the D nearest) replaced by -1e4: the same argmax."""

    def __init__(self, clf):
        super().__init__()
        self.clf = clf

    def forward(self, x):
        return torch.nan_to_num(self.clf(x), neginf=-1e4)


def autoattack_standard(model, eps, C, steps, queries, seed=0):
    parts = [torchattacks.APGD(model, eps=eps, steps=steps, loss="ce", n_restarts=1, seed=seed),
             torchattacks.APGDT(model, eps=eps, steps=steps, n_restarts=1, seed=seed, n_classes=C),
             torchattacks.FAB(model, eps=eps, steps=steps, multi_targeted=True, n_classes=C,
                              n_restarts=1, seed=seed),
             torchattacks.Square(model, eps=eps, n_queries=queries, n_restarts=1, seed=seed)]
    for p in parts[1:3]:
        p.n_target_classes = min(9, C - 1)                   # AutoAttack standard: 9 targets
    return torchattacks.MultiAttack(parts)


def part_a(args):
    eps = args.eps
    models = []
    data10, nom10 = build(args.workdir, 10, 100, 50, 10)
    models.append(("nominal-10", nom10, data10, 10))
    models.append(("sharp-10", clustering_from_nominal(nom10, data10, os.path.join(args.workdir, "sharp10.pt"),
                                                       0.01), data10, 10))
    data40, nom40 = build(args.workdir, 40, 100, 25, 10)
    models.append(("sharp-40-D20", clustering_from_nominal(nom40, data40, os.path.join(args.workdir, "sharp40.pt"),
                                                           0.01, D=20), data40, 40))
    if not args.only or "sharp-100-D20" in args.only:      # CIFAR100's setting (Table 2): 100 classes, D = 20
        data100, nom100 = build(args.workdir, 100, 100, 10, 10)
        models.append(("sharp-100-D20", clustering_from_nominal(nom100, data100, os.path.join(
            args.workdir, "sharp100.pt"), 0.01, D=20), data100, 100))
    rows = []
    for name, ckpt, data, C in models:
        if args.only and name not in args.only:
            continue
        out = os.path.join(args.workdir, f"{name}.json")
        t0 = time.time()
        res = attack.main(["--ckpt", ckpt, "--data-dir", data, "--limit", str(args.images), "--no-checks",
                           "--eps", str(eps), "--out", out, "-b", str(args.images)])
        t_ours = time.time() - t0
        ex = res["examples"][0]
        ours = torch.tensor(ex["robust"])
        natural = torch.tensor(ex["correct"])
        clf, _ = attack.read_classifier(ckpt)
        images, labels, _ = nominal.load_split("folder", data, False, args.images)
        x = nominal.to_float(images)
        model = Finite(clf).eval()
        t0 = time.time()
        torch.manual_seed(0)
        adv = autoattack_standard(model, eps, C, args.steps, args.queries)(x, labels)
        t_aa = time.time() - t0
        assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
        with torch.no_grad():
            theirs = (clf(adv).argmax(1) == labels) & natural
        rows.append((name, C, natural.float().mean().item(), ours.float().mean().item(),
                     theirs.float().mean().item(), int((ours & ~theirs).sum()), int((theirs & ~ours).sum()),
                     int((ours == theirs).sum()), len(labels), t_ours, t_aa,
                     {r["loss"]: (r["fooled"], round(r["seconds"])) for r in res["results"] if r["loss"] != "worst-case"}))
        print(f"{name}: ours {rows[-1][3]:.2%} in {t_ours:.0f}s, AutoAttack {rows[-1][4]:.2%} in "
              f"{t_aa:.0f}s, fooled by AutoAttack only {rows[-1][5]}, by ours only {rows[-1][6]}", flush=True)
    print(f"\nA. eps {attack.fmt_eps(eps)}, {args.images} test images, torch {torch.__version__}, "
          f"torchattacks {torchattacks.__version__}, {torch.get_num_threads()} thread(s), "
          f"{time.strftime('%Y-%m-%d')}")
    print("| model | classes | natural | attack.py default | AutoAttack standard | AA only | ours only "
          "| same verdict | attack.py s | AutoAttack s | per loss of the cascade: (fooled, seconds) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.2%} | {r[3]:.2%} | {r[4]:.2%} | {r[5]} | {r[6]} | "
              f"{r[7]}/{r[8]} | {r[9]:.0f} | {r[10]:.0f} | {r[11]} |")


def part_b(args):
    data = os.path.join(args.workdir, "data3")
    if not os.path.isdir(data):
        make_image_folder(data, 3, 60, 30, noise=60.0)
    nom = os.path.join(args.workdir, "nominal3.pt")
    if not os.path.exists(nom):
        nominal.main(["--data", "folder", "--data-dir", data, "--width", "8", "--epochs", "3",
                      "-b", "32", "--out", nom])
    clu = clustering_from_nominal(nom, data, os.path.join(args.workdir, "clustering3.pt"))
    print(f"\nB. checks vs attack, the test suite's case (90 test images), default flags, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {time.strftime('%Y-%m-%d')}")
    print("| model | attack s | checks s | ratio | all checks ok |")
    print("| --- | --- | --- | --- | --- |")
    for name, ckpt in (("nominal", nom), ("clustering", clu)):
        res = attack.main(["--ckpt", ckpt, "--data-dir", data, "--out", os.path.join(args.workdir, f"b-{name}.json")])
        failed = [k for k, c in res["checks"].items() if c["ok"] is False]
        print(f"| {name} | {res['attack_seconds']:.1f} | {res['check_seconds']:.1f} | "
              f"{res['check_seconds'] / res['attack_seconds']:.2f} | {failed or 'yes'} |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="/tmp/clustr_bench_autoattack")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eps", type=attack.parse_fraction, default=8 / 255)
    p.add_argument("--steps", type=int, default=100, help="AutoAttack's iterations per part")
    p.add_argument("--queries", type=int, default=5000, help="AutoAttack's Square queries")
    p.add_argument("--parts", default="AB")
    p.add_argument("--only", nargs="*", default=None, help="part A: only these models")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.workdir, exist_ok=True)
    if "A" in args.parts:
        if torchattacks is None:
            print("part A needs torchattacks, a benchmark-only dependency: pip install torchattacks==3.5.1",
                  file=sys.stderr)
            raise SystemExit(2)
        part_a(args)
    if "B" in args.parts:
        part_b(args)


if __name__ == "__main__":
    main()
