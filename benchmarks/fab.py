"""benchmarks/fab.py -- what FAB-T would add to attack.py's default cascade (issue 31, item 4).

OPTIONAL DEPENDENCY, benchmark only: torchattacks (`pip install --no-deps torchattacks==3.5.1`).
attack.py and the tests never import it.

attack.py's default loss set (ce, margin, margin-t with min(9, C - 1) targets, magnet for
clustering checkpoints, then Square; AutoAttack's cascade order) leaves out one part of AutoAttack
"standard": FAB-T, the targeted minimum-norm attack.  This measures what it would add.  For each
model and eps:
  1. attack.py runs as a user runs it, in a subprocess: `python attack.py --ckpt M --data-dir D
     --eps E --limit N --device cpu --out R.json --no-checks`; its survivors are the examples its
     JSON counts robust (`examples[0]["robust"]`).
  2. FAB-T runs on the clean images of those survivors only (as the next part of a cascade would):
     torchattacks' FAB exactly as benchmarks/autoattack.py builds it for AutoAttack standard (the
     object is taken from its `autoattack_standard(...)`: norm Linf, multi_targeted, min(9, C - 1)
     target classes, `steps` iterations, 1 restart, seed 0), fed log p of Eq. (4) (or a nominal
     model's log-softmax) with the -inf of classes outside the D nearest centres replaced by -1e4
     (autoattack.py's `Finite`: the same argmax).
  3. Each returned image is judged by attack.py's own classifier (`attack.read_classifier`); a
     survivor counts as fooled by FAB-T only if that classifier misclassifies it and the image lies
     in [0, 1] and within eps of the clean image in L-inf (1e-6 of float slack, as autoattack.py).
Printed (and written to --out): per model and eps, the images, attack.py's robust accuracy, the
survivors FAB-T fooled, and that as points of robust accuracy (100 x fooled / images).  Issue 31's
threshold for adding a targeted minimum-norm step to the cascade: more than 0.5 points anywhere.
--control also runs FAB-T alone on every correctly classified image, to show that the harness
does fool (a broken one would report 0 everywhere): its robust accuracy beside attack.py's.

Models:
  --generated NAME ...: the generated many-class models of benchmarks/autoattack.py (nominal-10,
    sharp-10, sharp-40-D20, sharp-100-D20), built with its own `build` and `clustering_from_nominal`
    (nominal.py trains the width-8 ResNet18s: a few minutes each on one thread), cached in --workdir;
  --ckpt PATH ... with --data-dir DIR: any checkpoints, e.g. the Fashion-MNIST models of
    benchmarks/reproduce.py (`--ckpt /work/fm3/seed0/*.pt --data-dir /work/fm3/data`).

    python benchmarks/fab.py                                          # the four generated models, 8/255
    python benchmarks/fab.py --generated --ckpt W/seed0/*.pt --data-dir W/data --eps 8/255 16/255 --control
    python benchmarks/fab.py --generated nominal-10 --images 20 --steps 10 --workdir /tmp/fabtiny  # plumbing

attack.py's JSON and each FAB-T row are cached in --workdir (keyed by model, eps, images, steps):
a second call only computes what is missing (--redo to recompute).
"""

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)                         # before benchmarks/: benchmarks/attack.py is not attack.py
import attack  # noqa: E402

try:
    import torchattacks
except ImportError:
    torchattacks = None

GENERATED = ("nominal-10", "sharp-10", "sharp-40-D20", "sharp-100-D20")


def autoattack_bench():
    """benchmarks/autoattack.py as a module (its name would clash with the autoattack package)."""
    if HERE not in sys.path:
        sys.path.append(HERE)                    # its `from generated import ...`
    spec = importlib.util.spec_from_file_location("aa_bench", os.path.join(HERE, "autoattack.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def generated_models(bench, workdir, names):
    """-> [(name, ckpt, data dir)]: autoattack.py's part A models, built with its functions and the
    arguments its part_a passes (the same file names, so its --workdir cache is shared)."""
    out = []
    if {"nominal-10", "sharp-10"} & set(names):
        data10, nom10 = bench.build(workdir, 10, 100, 50, 10)
        if "nominal-10" in names:
            out.append(("nominal-10", nom10, data10))
        if "sharp-10" in names:
            out.append(("sharp-10", bench.clustering_from_nominal(
                nom10, data10, os.path.join(workdir, "sharp10.pt"), 0.01), data10))
    if "sharp-40-D20" in names:
        data40, nom40 = bench.build(workdir, 40, 100, 25, 10)
        out.append(("sharp-40-D20", bench.clustering_from_nominal(
            nom40, data40, os.path.join(workdir, "sharp40.pt"), 0.01, D=20), data40))
    if "sharp-100-D20" in names:
        data100, nom100 = bench.build(workdir, 100, 100, 10, 10)
        out.append(("sharp-100-D20", bench.clustering_from_nominal(
            nom100, data100, os.path.join(workdir, "sharp100.pt"), 0.01, D=20), data100))
    return out


def run_attack_py(ckpt, data_dir, eps, images, out):
    """attack.py's default run, as a user runs it -> (its result, wall seconds, the command)."""
    cmd = [sys.executable, os.path.join(ROOT, "attack.py"), "--ckpt", ckpt, "--data-dir", data_dir,
           "--eps", eps, "--limit", str(images), "--device", "cpu", "--out", out, "--no-checks"]
    t0 = time.time()
    with open(out + ".out.txt", "w") as log:
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT,
                       env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
    return json.load(open(out)), time.time() - t0, " ".join(cmd)


def fab_on_survivors(bench, clf, x, y, eps, C, steps):
    """FAB-T as autoattack.py's AutoAttack standard holds it, on (x, y) -> (adv, seconds)."""
    model = bench.Finite(clf).eval()
    fab = bench.autoattack_standard(model, eps, C, steps, queries=1).attacks[2]
    assert isinstance(fab, torchattacks.FAB) and fab.multi_targeted and fab.norm == "Linf"
    assert fab.n_target_classes == min(9, C - 1) and fab.steps == steps and fab.n_restarts == 1
    t0 = time.time()
    adv = fab(x, y) if len(y) else x.clone()
    seconds = time.time() - t0
    if clf.training or model.training:
        raise SystemExit("FAB left the classifier in train mode: its figures would be wrong")
    return adv, seconds


def measure(bench, name, ckpt, data_dir, eps_text, args):
    eps = attack.parse_fraction(eps_text)
    tag = f"{name}_eps{eps_text.replace('/', '-')}_n{args.images}"
    row_path = os.path.join(args.workdir, f"fab_{tag}_s{args.steps}{'_control' if args.control else ''}.json")
    if os.path.exists(row_path) and not args.redo:
        return json.load(open(row_path))
    res_path = os.path.join(args.workdir, f"attack_{tag}.json")
    if os.path.exists(res_path) and os.path.exists(res_path + ".cmd") and not args.redo:
        res = json.load(open(res_path))
        wall, cmd = json.load(open(res_path + ".cmd"))
    else:
        res, wall, cmd = run_attack_py(ckpt, data_dir, eps_text, args.images, res_path)
        json.dump([wall, cmd], open(res_path + ".cmd", "w"))
    ex = res["examples"][0]
    worst = next(r for r in res["results"] if r["loss"] == "worst-case")
    correct, robust = torch.tensor(ex["correct"]), torch.tensor(ex["robust"])

    clf, ck = attack.read_classifier(ckpt, "cpu")
    if ck.get("clusters") is not None:
        assert clf.D == ex["D"], (clf.D, ex["D"])            # the D attack.py attacked
    images, labels, _ = attack.load_split(ck["data"]["name"], data_dir, False, args.images)
    x = attack.to_float(images)
    with torch.no_grad():
        natural = torch.cat([clf(x[i:i + 500]).argmax(1) for i in range(0, len(labels), 500)]) == labels
    assert torch.equal(natural, correct), "attack.py's natural verdicts differ from read_classifier's here"
    idx = robust.nonzero().flatten()
    C = ck["data"]["num_classes"]
    adv, fab_s = fab_on_survivors(bench, clf, x[idx], labels[idx], eps, C, args.steps)
    with torch.no_grad():
        pred = clf(adv).argmax(1) if len(idx) else labels[idx]
    linf = (adv - x[idx]).abs().flatten(1).amax(1) if len(idx) else torch.zeros(0)
    inside = (linf <= eps + 1e-6) & (adv.flatten(1).amin(1) >= 0) & (adv.flatten(1).amax(1) <= 1)
    wrong = pred != labels[idx]
    fooled = wrong & inside
    n = len(labels)
    control = {}
    if args.control:                         # the harness can fool: FAB-T on every correct image
        ci = correct.nonzero().flatten()
        cadv, cs = fab_on_survivors(bench, clf, x[ci], labels[ci], eps, C, args.steps)
        with torch.no_grad():
            cwrong = clf(cadv).argmax(1) != labels[ci] if len(ci) else torch.zeros(0, dtype=torch.bool)
        clinf = (cadv - x[ci]).abs().flatten(1).amax(1) if len(ci) else torch.zeros(0)
        cfooled = cwrong & (clinf <= eps + 1e-6) & (cadv.flatten(1).amin(1) >= 0) & (cadv.flatten(1).amax(1) <= 1)
        control = {"control_fab_robust_accuracy": float((correct.sum() - cfooled.sum()) / n),
                   "control_fab_fooled": int(cfooled.sum()),
                   "control_fab_fooled_robust_by_attack_py": int((cfooled & robust[ci]).sum()),
                   "control_fab_seconds": cs}
    row = {"model": name, "ckpt": os.path.abspath(ckpt), "data_dir": os.path.abspath(data_dir),
           "stage": ck["stage"], "classes": C, "D": ex["D"], "eps": eps, "eps_text": eps_text, "images": n,
           "natural_accuracy": float(correct.double().mean()),
           "attack_py_robust_accuracy": worst["robust_accuracy"], "survivors": len(idx),
           "fab_targets": min(9, C - 1), "fab_steps": args.steps,
           "fab_fooled": int(fooled.sum()), "fab_points": 100.0 * int(fooled.sum()) / n,
           "fab_fooled_index": idx[fooled].tolist(),
           "fab_misclassified_outside_ball_or_box": int((wrong & ~inside).sum()),
           "fab_max_linf_of_fooled": float(linf[fooled].max()) if fooled.any() else None,
           "attack_py_command": cmd, "attack_py_wall_seconds": wall,
           "attack_py_attack_seconds": res["attack_seconds"], "fab_seconds": fab_s,
           "cascade_fooled": {r["loss"]: r.get("fooled") for r in res["results"] if r["loss"] != "worst-case"},
           **control}
    with open(row_path, "w") as f:
        json.dump(row, f, indent=1)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workdir", default="/tmp/clustr_bench_fab",
                   help="models, attack.py results and FAB rows are cached here")
    p.add_argument("--generated", nargs="*", default=list(GENERATED), choices=GENERATED,
                   help="benchmarks/autoattack.py's generated models; give none to skip them")
    p.add_argument("--ckpt", nargs="*", default=[], help="other checkpoints (named by file name)")
    p.add_argument("--data-dir", default=None, help="the data of --ckpt (attack.py's --data-dir)")
    p.add_argument("--eps", nargs="+", default=["8/255"], help="L-inf radii, as attack.py's --eps")
    p.add_argument("--images", type=int, default=200, help="the first N test images")
    p.add_argument("--steps", type=int, default=100, help="FAB-T iterations (AutoAttack standard: 100)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--control", action="store_true",
                   help="also FAB-T alone on every correctly classified image: shows the harness fools")
    p.add_argument("--redo", action="store_true", help="recompute cached attack.py results and rows")
    p.add_argument("--out", default="fab.json", help="the rows (JSON)")
    args = p.parse_args()
    if torchattacks is None:
        print("fab.py needs torchattacks, a benchmark-only dependency: pip install --no-deps torchattacks==3.5.1",
              file=sys.stderr)
        raise SystemExit(2)
    if args.ckpt and not args.data_dir:
        p.error("--ckpt needs --data-dir")
    torch.set_num_threads(args.threads)
    os.makedirs(args.workdir, exist_ok=True)
    bench = autoattack_bench()
    t_start = time.time()
    models = generated_models(bench, args.workdir, args.generated)
    models += [(os.path.splitext(os.path.basename(c))[0], c, args.data_dir) for c in args.ckpt]
    rows = []
    for name, ckpt, data_dir in models:
        for eps_text in args.eps:
            rows.append(measure(bench, name, ckpt, data_dir, eps_text, args))
            r = rows[-1]
            print(f"{name} eps {eps_text}: attack.py {r['attack_py_robust_accuracy']:.1%} "
                  f"({r['survivors']} survivors, {r['attack_py_wall_seconds']:.0f} s); FAB-T fooled "
                  f"{r['fab_fooled']} ({r['fab_points']:.1f} points) in {r['fab_seconds']:.0f} s", flush=True)
    env = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "torchattacks": torchattacks.__version__,
           "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "argv": sys.argv, "minutes": (time.time() - t_start) / 60}
    print(f"\nFAB-T ({args.steps} steps, min(9, C - 1) targets) on attack.py's survivors; first {args.images} "
          f"test images; torch {env['torch']}, torchattacks {env['torchattacks']}, {env['threads']} thread(s), "
          f"{env['date']}")
    print("| model | classes | eps | images | natural | attack.py robust | survivors | FAB-T fooled "
          "| points of robust accuracy | attack.py s | FAB-T s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['classes']}{'' if r['D'] is None else ', D = ' + str(r['D'])} | "
              f"{r['eps_text']} | {r['images']} | {r['natural_accuracy']:.1%} | "
              f"{r['attack_py_robust_accuracy']:.1%} | {r['survivors']} | {r['fab_fooled']} | "
              f"{r['fab_points']:.1f} | {r['attack_py_wall_seconds']:.0f} | {r['fab_seconds']:.0f} |")
    over = [r for r in rows if r["fab_points"] > 0.5]
    print(f"FAB-T fooled more than 0.5 points of robust accuracy in {len(over)} of {len(rows)} rows"
          + (": " + ", ".join(f"{r['model']} at {r['eps_text']}" for r in over) if over else ""))
    if args.control:
        print("control, FAB-T alone on every correct image: "
              + "; ".join(f"{r['model']} {r['eps_text']}: robust {r['control_fab_robust_accuracy']:.1%} "
                          f"(attack.py {r['attack_py_robust_accuracy']:.1%}), of its fooled "
                          f"{r['control_fab_fooled_robust_by_attack_py']} robust under attack.py, "
                          f"{r['control_fab_seconds']:.0f} s" for r in rows))
    outside = sum(r["fab_misclassified_outside_ball_or_box"] for r in rows)
    if outside:
        print(f"({outside} misclassified FAB images lay outside the eps-ball or [0, 1]: not counted)")
    with open(args.out, "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
