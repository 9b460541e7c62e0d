"""benchmarks/attack.py -- attack.py's PGD against torchattacks: strength and time.

OPTIONAL DEPENDENCY, benchmark only: torchattacks (`pip install torchattacks`; measured with 3.5.1).
attack.py and the tests never import it.

    python benchmarks/attack.py                      # builds its models in --workdir, ~5 min on 2 cores
    python benchmarks/attack.py --images 200 --repeats 1        # quicker

What it compares, on the same models, inputs and budget (one CPU thread by default: on a 2-core
machine shared with other jobs, two OpenMP threads made timings 10-20x slower and erratic):
  A. `attack.pgd` (Eq. (5), CE, constant 2/255 steps) against torchattacks `PGD`, restarts through
     `MultiAttack` (which also skips examples already fooled), for a model at a radius where it
     mostly resists and at one where it is fooled almost everywhere.  Robust accuracy and median
     wall time over --repeats interleaved runs.  torchattacks is timed as commonly used (weights
     with requires_grad, NCHW tensors) and given attack.py's frozen module in channels_last layout,
     so the gain of each part shows.  "ours" runs main()'s path: attack_split on the classifier in
     channels_last (the batch-norm-folded copy of earlier versions is gone: benchmarks/README.md,
     "attack.py without the folded copy").
  B. attack.py's default loss set (ce, margin, 3-target margin, + magnet for clustering models;
     cosine steps) against AutoAttack's core in torchattacks: APGD (ce) + APGD-T (9 targets),
     the same number of iterations; per-example worst case of each side.

Models (generated data, no download): a 10-class 16x16 ImageFolder (benchmarks/generated.py's make_image_folder,
noise 110), a width-8 nominal ResNet18 trained with nominal.py, and a clustering checkpoint built
from it (K = 2 centres per class: the means of the class halves split at the median of the first
principal direction; sigma^2 as in Eq. (3)), evaluated by Eq. (4).  Its "sharp" variant divides
sigma^2 by 100: the same decisions with confident probabilities, as a trained ClusTR model has
(gaps of hundreds in d^2 / 2 sigma^2), where cross-entropy gradients vanish in float32.
When magnet.py is present, part B also attacks a model it trains from the nominal one (10 epochs,
its defaults otherwise): a real ClusTR model.
"""

import argparse
import copy
import functools
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import attack  # noqa: E402
import nominal  # noqa: E402

try:
    import torchattacks
except ImportError:
    torchattacks = None


def build_models(workdir):
    """-> {name: checkpoint path}; built once in workdir and reused."""
    from generated import make_image_folder
    data = os.path.join(workdir, "data")
    if not os.path.isdir(data):
        make_image_folder(data, classes=10, n_train=100, n_test=50, size=16, noise=110.0)
    nom = os.path.join(workdir, "nominal.pt")
    if not os.path.exists(nom):
        nominal.main(["--data", "folder", "--data-dir", data, "--width", "8", "--epochs", "10",
                      "-b", "64", "--out", nom, "--slim"])
    ck = torch.load(nom, map_location="cpu", weights_only=True)
    model = attack.build_model(ck["arch"], ck["data"], with_head=True)
    model.load_state_dict(ck["model"])
    model.eval()
    (train_x, train_y), _, _ = nominal.load_data("folder", data)
    with torch.no_grad():
        f = torch.cat([model.features(nominal.to_float(train_x[i:i + 256])) for i in range(0, len(train_y), 256)])
    centers, center_classes, own = [], [], []
    for c in range(ck["data"]["num_classes"]):
        fc = f[train_y == c]
        proj = (fc - fc.mean(0)) @ torch.linalg.svd(fc - fc.mean(0), full_matrices=False).Vh[0]
        mu = torch.stack([fc[proj <= proj.median()].mean(0), fc[proj > proj.median()].mean(0)])
        centers.append(mu)
        center_classes += [c, c]
        own.append((fc[:, None] - mu[None]).pow(2).sum(-1).min(1).values)
    own = torch.cat(own)
    sigma2 = float(own.sum() / (len(own) - 1))
    paths = {"nominal": nom}
    for name, v in (("clustering", sigma2), ("clustering-sharp", sigma2 / 100)):
        path = os.path.join(workdir, f"{name}.pt")
        nominal.save_checkpoint(dict(ck, stage="magnet", model={k: t for k, t in ck["model"].items()
                                                                 if not k.startswith("head.")},
                                     clusters={"centers": torch.cat(centers), "center_classes":
                                               torch.tensor(center_classes), "variance": v, "K": 2,
                                               "alpha": 12.5, "D": None}), path)
        paths[name] = path
    # a model trained by magnet.py (ClusTR: Magnet-loss fine-tuning of the nominal one), if present
    trained = os.path.join(workdir, "magnet-trained.pt")
    if os.path.exists(os.path.join(ROOT, "magnet.py")) and not os.path.exists(trained):
        import subprocess
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "magnet.py"), "--init", nom,
                               "--data", "folder", "--data-dir", data, "--width", "8", "--epochs", "10",
                               "--out", trained], capture_output=True, text=True)
        if proc.returncode:
            print(f"note: magnet.py failed ({proc.stderr.strip().splitlines()[-1:]}); skipping its model")
    if os.path.exists(trained):
        paths["magnet-trained"] = trained
    return paths, data


def timed(fn, repeats):
    """Median wall time over `repeats` runs (the result of the last run)."""
    times = []
    for _ in range(repeats):
        t = time.time()
        out = fn()
        times.append(time.time() - t)
    return out, statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="/tmp/clustr_bench_attack")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing runs (median)")
    p.add_argument("--steps-a", type=int, default=20)
    p.add_argument("--restarts-a", type=int, default=5)
    p.add_argument("--steps-b", type=int, default=20)
    p.add_argument("--eps-b", type=attack.parse_fraction, default=8 / 255)
    p.add_argument("--parts", default="AB", help="which comparisons to run: A, B or AB")
    args = p.parse_args()
    if torchattacks is None:
        print("benchmarks/attack.py needs torchattacks, an optional benchmark-only dependency: "
              "pip install torchattacks", file=sys.stderr)
        raise SystemExit(2)
    torch.set_num_threads(args.threads)
    os.makedirs(args.workdir, exist_ok=True)
    paths, data = build_models(args.workdir)
    images, labels, _ = nominal.load_split("folder", data, False, args.images)
    x, y = nominal.to_float(images), labels
    print(f"\ntorch {torch.__version__}, torchattacks {torchattacks.__version__}, {args.threads} CPU "
          f"thread(s) of {os.cpu_count()} (shared with other jobs), {len(y)} test images 16x16, "
          f"ResNet18 width 8, {time.strftime('%Y-%m-%d')}")

    # ---------------------------------------------------------------- A: PGD vs torchattacks PGD
    S, R = args.steps_a, args.restarts_a
    cases = [("clustering", 2 / 255), ("nominal", 2 / 255), ("clustering", 16 / 255),
             ("nominal", 16 / 255)] if "A" in args.parts else []
    print(f"\nA. PGD-CE, {S} steps of 2/255 x {R} restarts: robust accuracy (mean) and seconds "
          f"(median) over {args.repeats} seeds, interleaved")
    print(f"  {'model':<17} {'eps':>7} {'ours':>14} {'torchattacks':>14} {'ta, channels_last':>16} "
          f"{'speed-up':>9} {'vs same module':>15}")
    for name, eps in cases:
        clf, _ = attack.read_classifier(paths[name])                          # frozen, eval
        plain = copy.deepcopy(clf)
        for q in plain.parameters():
            q.requires_grad_(True)                                             # as users pass models
        same = copy.deepcopy(clf).to(memory_format=torch.channels_last)       # attack.py's layout
        xc = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            natural = clf(x).argmax(1) == y
        run = attack.parse_args(["--steps", str(S), "--restarts", str(R), "--schedule", "constant",
                                 "-b", str(len(y))])

        def ours(seed):  # exactly main()'s path: channels_last, one generator per chunk
            return attack.attack_split(same, images, y, run, eps, "ce", seed)

        def theirs(model, inputs, seed):
            torch.manual_seed(seed)                                            # their random starts
            atk = torchattacks.MultiAttack([torchattacks.PGD(model, eps=eps, alpha=2 / 255, steps=S)
                                            for _ in range(R)])
            adv = atk(inputs, y)
            with torch.no_grad():
                return (clf(adv).argmax(1) == y) & natural
        t = {"ours": [], "ta": [], "ta_same": []}
        for seed in range(args.repeats):                                       # interleaved
            for key, fn in (("ours", lambda: ours(seed)), ("ta", lambda: theirs(plain, x, seed)),
                            ("ta_same", lambda: theirs(same, xc, seed))):
                m, s = timed(fn, 1)
                t[key].append((s, m.float().mean().item()))
        med = {k: statistics.median(s for s, _ in v) for k, v in t.items()}
        acc = {k: statistics.mean(a for _, a in v) for k, v in t.items()}     # mean over seeds
        print(f"  {name:<17} {attack.fmt_eps(eps):>7} {acc['ours']:6.1%} {med['ours']:6.1f}s "
              f"{acc['ta']:6.1%} {med['ta']:6.1f}s {acc['ta_same']:6.1%} {med['ta_same']:8.1f}s "
              f"{med['ta'] / med['ours']:8.2f}x {med['ta_same'] / med['ours']:14.2f}x", flush=True)

    # ------------------------------------------------ B: default loss set vs APGD-CE + APGD-T
    S, eps = args.steps_b, args.eps_b
    print(f"\nB. worst case at eps {attack.fmt_eps(eps)}, {S} iterations per run: attack.py's "
          f"default set vs APGD-CE + APGD-T (9 targets)")
    for name in [m for m in ("nominal", "clustering-sharp", "magnet-trained") if m in paths
                 and "B" in args.parts]:
        clf, _ = attack.read_classifier(paths[name])
        run = attack.parse_args(["--steps", str(S), "-b", str(len(y))])   # main()'s defaults
        net = copy.deepcopy(clf).to(memory_format=torch.channels_last)
        with torch.no_grad():
            log_p = clf(x)
        natural, C = log_p.argmax(1) == y, log_p.shape[1]
        losses = [l for l in attack.DEFAULT_LOSSES if clf.clusters or l != "magnet"]
        ours, t0 = {}, time.time()
        for loss in losses:
            ours[loss] = attack.attack_split(net, images, y, run, eps, loss, 0)
        t_ours = time.time() - t0
        theirs, t0 = {}, time.time()
        for key, atk in (("apgd-ce", torchattacks.APGD(clf, eps=eps, steps=S, loss="ce", seed=0)),
                         ("apgd-t", torchattacks.APGDT(clf, eps=eps, steps=S, seed=0, n_classes=C))):
            adv = atk(x, y)
            with torch.no_grad():
                theirs[key] = (clf(adv).argmax(1) == y) & natural
        t_theirs = time.time() - t0
        worst = functools.reduce(torch.logical_and, ours.values())
        worst_t = functools.reduce(torch.logical_and, theirs.values())
        print(f"  {name} (natural {natural.float().mean():.1%})")
        print("    ours: " + ", ".join(f"{k} {v.float().mean():.1%}" for k, v in ours.items())
              + f" -> worst case {worst.float().mean():.1%} in {t_ours:.1f}s")
        print("    torchattacks: " + ", ".join(f"{k} {v.float().mean():.1%}" for k, v in theirs.items())
              + f" -> worst case {worst_t.float().mean():.1%} in {t_theirs:.1f}s")
        print(f"    fooled by theirs only: {(worst & ~worst_t).sum().item()}, by ours only: "
              f"{(worst_t & ~worst).sum().item()} (of {len(y)})", flush=True)


if __name__ == "__main__":
    main()
