"""benchmarks/reproduce.py -- the protocol of Table 1 (Sec. 4.2) on three seeds, the paper's claims judged.

One command trains the five rows of Table 1 (plus the KL variant) with this repository's stage
files, called as a user would call them (subprocesses), once per seed, and evaluates every model
with both the authors' protocol and the honest one, side by side:

    pip install --no-deps torchattacks==3.5.1      # AutoAttack's parts, for this benchmark only
    python benchmarks/reproduce.py --data-dir /usr/share/datasets/fashion-mnist --workdir runs/fm3

(defaults: seeds 0 1 2, the first 10,000 training / 1,000 test images of Fashion-MNIST, ResNet18
width 4, nominal 6 epochs, every other stage 5; about 35-40 min per seed on 2 CPU cores).

Rows (Table 1 and Sec. 4.2; each seed trains its own nominal model, and all but "Magnet loss"
start from it, as the stages do):
    nominal              nominal.py (cross-entropy, the warm start)
    magnet_random        magnet.py without --init (the "Magnet Loss" row: no warm start)
    clustr               magnet.py --init nominal.pt (ClusTR)
    qtrades              qtrades.py --loss ce --init nominal.pt (QTRADES alone)
    clustr_qtrades       qtrades.py --loss magnet --init nominal.pt (ClusTR+QTRADES, Eq. (6) with CE)
    clustr_qtrades_kl    the same with --consistency kl (TRADES's KL term; an ablation)
Columns, for each eps (default 8/255, the paper's, 16/255, and 0.1, Fashion-MNIST's usual budget):
    natural              accuracy on the attacked images
    authors              the authors' protocol: attack.py --loss scores-ce (cross-entropy taking the
                         probabilities of Eq. (4) as logits), constant step 2/255, PGD-20 x 10 restarts
    worst                attack.py's default run: the per-example worst case of its default loss set
    pgd20, pgd100        (--protocols) Eq. (5): cross-entropy on log p, step 2/255, 20 / 100 steps x 10
    autoattack           AutoAttack "standard" (Croce & Hein 2020) from torchattacks on the first
                         --aa-images images, given the classifier's log-probabilities (softmax of them
                         is Eq. (4) exactly); both_on_aa_images: robust under it and attack.py alike
    certified            certify.py (Prop. 1 with the sound Lipschitz bound): median and largest
                         certified L2 radius, beside the power-iteration lower estimate of L
Every cell is a mean ± sample std over the seeds, the per-seed values in the JSON.  The claims
(CLAIMS below) are judged on paired per-seed differences: "holds" when the 95% Student-t interval
of their mean lies above 0, "does not hold" when it lies at or below 0, else "cannot tell at n = 3".
Writes <workdir>/reproduce.json, <workdir>/reproduce.md (the tables of benchmarks/README.md),
prints the table and draws <workdir>/robust_vs_eps.png and claims.png (`--figures FILE` draws them
from a saved reproduce.json, e.g. benchmarks/results/reproduce.json: no training).

Every step is cached in --workdir (a finished checkpoint or result file is reused), so a stopped
run continues where it stopped and `--redo worst` re-evaluates one column after a change to
attack.py.  Fashion-MNIST / MNIST subsets are written once as raw IDX files under <workdir>/data
(the first --train training and --test test images), so every stage reads them with --data
fashion-mnist exactly as it reads the full set.

Settings not given in the paper for this dataset are CIFAR10's (alpha 12.5, lambda 8, lr 1e-4 for
the clustering stages; Adam 1e-2 for the warm start), with no crop or flip; --stage-args passes
more flags to every training stage.  Needs torch, torchvision, numpy; matplotlib for the PNG.
"""

import argparse
import gzip
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODELS = {  # name -> (stage file, extra flags, needs the nominal checkpoint, label in the table)
    "nominal": ("nominal.py", [], False, "Nominal (CE)"),
    "magnet_random": ("magnet.py", [], False, "Magnet loss (random init)"),
    "clustr": ("magnet.py", [], True, "ClusTR"),
    "qtrades": ("qtrades.py", ["--loss", "ce"], True, "QTRADES"),
    "clustr_qtrades": ("qtrades.py", ["--loss", "magnet"], True, "ClusTR+QTRADES"),
    "clustr_qtrades_kl": ("qtrades.py", ["--loss", "magnet", "--consistency", "kl"], True,
                          "ClusTR+QTRADES (KL)"),
}
# The accuracy of ClusTR relative to its warm start: magnet.py from the seed's nominal checkpoint,
# one setting changed at a time (--ablation).  Natural accuracy after every epoch, from the log.
ABLATION = {
    "base": [],
    "epochs0": ["--epochs", "0"],                 # App. B.1: k-means on the nominal features only
    "alpha1": ["--alpha", "1"],
    "alpha4": ["--alpha", "4"],
    "lr1e-3": ["--lr", "1e-3"],
    "lr1e-5": ["--lr", "1e-5"],
    "double_epochs": ["double"],                  # 2 x --epochs
    "weak_warm_start": ["weak"],                  # from a nominal run of --epochs-nominal // 4 epochs
}
PROTOCOLS = {  # column -> attack.py flags (all on the same first --attack-images test images); every cell
    # runs attack.py's checks (--no-strict: a failed one is recorded in the cell and marked in the tables)
    "authors": ["--loss", "scores-ce", "--schedule", "constant", "--step", "2/255", "--steps", "20",
                "--restarts", "10"],
    "pgd20": ["--loss", "ce", "--schedule", "constant", "--step", "2/255", "--steps", "20", "--restarts", "10"],
    "pgd100": ["--loss", "ce", "--schedule", "constant", "--step", "2/255", "--steps", "100", "--restarts", "10"],
    "worst": [],                                    # attack.py's default losses
}
IDX = {"fashion-mnist", "mnist"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="fashion-mnist",
                   help="any --data of the stages; fashion-mnist/mnist subsets are written as IDX files")
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--train", type=int, default=10000, help="training images (the first N)")
    p.add_argument("--test", type=int, default=1000, help="test images for per-epoch accuracy")
    p.add_argument("--attack-images", type=int, default=500, help="test images every attack runs on")
    p.add_argument("--aa-images", type=int, default=200,
                   help="test images AutoAttack standard (torchattacks' parts) runs on (0: skip)")
    p.add_argument("--width", type=int, default=4,
                   help="ResNet18's width (64 in the paper): 4 keeps a seed under an hour on 2 CPU cores")
    p.add_argument("--epochs-nominal", type=int, default=6)
    p.add_argument("--epochs", type=int, default=5, help="epochs of every clustering/QTRADES stage")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="each seed trains its own nominal model and every stage after it")
    p.add_argument("--eps", nargs="+", default=["8/255", "16/255", "0.1"])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--protocols", nargs="+", choices=list(PROTOCOLS), default=["authors", "worst"],
                   help="attack.py columns (pgd20, pgd100: Eq. (5) at the authors' budget; they cost "
                        "more than the rest together at 500 images)")
    p.add_argument("--stage-args", default="", help="extra flags for every training stage (one string)")
    p.add_argument("--jobs", type=int, default=2, help="stage processes run at once (1 thread each)")
    p.add_argument("--workdir", default="runs/reproduce")
    p.add_argument("--redo", nargs="*", default=[], help="columns to recompute even when cached")
    p.add_argument("--aa-eps", nargs="*", default=None,
                   help="the eps values AutoAttack runs at (default: every --eps)")
    p.add_argument("--eval-minutes", type=float, default=None,
                   help="start no new evaluation after this many minutes; cells not run are "
                        "reported as '-' (cached results are always used)")
    p.add_argument("--train-only", action="store_true", help="train (or reuse) the models, no evaluation")
    p.add_argument("--figures", default=None, metavar="REPRODUCE_JSON",
                   help="only draw the figures of a finished run's reproduce.json into --workdir (no training)")
    p.add_argument("--ablation", nargs="*", choices=[*ABLATION, "none"], default=["base", "epochs0", "alpha1"],
                   help="magnet.py variants run from every seed's nominal checkpoint, their accuracy "
                        "reported per epoch (no value: all of them; none: no ablation)")
    return p.parse_args(argv)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def dump(obj, path):
    """JSON, written atomically: a stopped run never leaves a half-written cache file behind."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


TIMES = threading.Lock()                              # train_times.json: one writer at a time


def timed(args, key, cmd, logfile):
    """run() and record its seconds under key in <workdir>/train_times.json; -> seconds."""
    seconds = run(cmd, logfile)
    path = os.path.join(args.workdir, "train_times.json")
    with TIMES:
        times = json.load(open(path)) if os.path.exists(path) else {}
        times[key] = seconds
        dump(times, path)
    log(f"  {key} done in {seconds:.0f} s")
    return seconds


def train_time(args, key):
    path = os.path.join(args.workdir, "train_times.json")
    return json.load(open(path)).get(key) if os.path.exists(path) else None


def run(cmd, logfile):
    """One stage as a user runs it; its output goes to logfile; -> wall seconds.  Exit != 0 stops."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t0 = time.time()
    with open(logfile, "w") as f:
        code = subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env=env).returncode
    if code != 0:
        raise SystemExit(f"failed ({code}): python {' '.join(cmd)}\n  see {logfile}")
    return time.time() - t0


# --- data subset ----------------------------------------------------------------------------

def write_idx(path, tensor):
    """uint8 tensor -> IDX file (magic 0 0 8 ndim, big-endian sizes, data), gzipped."""
    import numpy as np
    a = tensor.numpy().astype(np.uint8)
    header = bytes([0, 0, 8, a.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in a.shape)
    tmp = path + ".tmp"
    with gzip.open(tmp, "wb") as f:
        f.write(header + a.tobytes())
    os.replace(tmp, path)


def prepare_data(args):
    """-> (--data-dir for the stages, extra flags).  IDX datasets: the first N / T images written
    once under <workdir>/data; other datasets: --limit N (train and test alike)."""
    if args.data not in IDX:
        return args.data_dir, ["--limit", str(args.train)]
    import nominal
    folder = os.path.join(args.workdir, "data")
    stamp = os.path.join(folder, "subset.json")
    want = {"source": os.path.abspath(args.data_dir), "train": args.train, "test": args.test}
    if os.path.exists(stamp) and json.load(open(stamp)) == want:
        return folder, []
    os.makedirs(folder, exist_ok=True)
    for train, prefix, n in ((True, "train", args.train), (False, "t10k", args.test)):
        x, y, _ = nominal.load_split(args.data, args.data_dir, train, n)
        write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), x[:, 0])
        write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), y)
    json.dump(want, open(stamp, "w"))
    log(f"data subset: {args.train} train / {args.test} test images of {args.data} in {folder}")
    return folder, []


# --- training -------------------------------------------------------------------------------

def finished(path, epochs):
    if not os.path.exists(path):
        return False
    import torch
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt.get("epoch") == epochs


def ablation_seed(args, seed, data_dir, extra):
    """magnet.py variants from the seed's nominal checkpoint; -> {name: per-epoch record}."""
    folder = os.path.join(args.workdir, f"seed{seed}", "ablation")
    os.makedirs(folder, exist_ok=True)
    common = ["magnet.py", "--data", args.data, "--data-dir", data_dir, "--width", str(args.width),
              "--device", "cpu", *extra, *args.stage_args.split(), "--seed", str(seed)]
    nominal_path = os.path.join(args.workdir, f"seed{seed}", "nominal.pt")
    weak = os.path.join(folder, "nominal_weak.pt")
    weak_epochs = max(1, args.epochs_nominal // 4)

    def one(name):
        flags, epochs, init = list(ABLATION[name]), args.epochs, nominal_path
        if flags == ["double"]:
            flags, epochs = [], 2 * args.epochs
        elif flags == ["weak"]:
            flags, init = [], weak
        elif "--epochs" in flags:
            epochs = int(flags[flags.index("--epochs") + 1])
            flags = flags[:flags.index("--epochs")] + flags[flags.index("--epochs") + 2:]
        path = os.path.join(folder, f"{name}.pt")
        if name == "base":                                   # = the seed's ClusTR model
            path = os.path.join(args.workdir, f"seed{seed}", "clustr.pt")
        if not finished(path, epochs):
            cmd = [*common, *flags, "--init", init, "--epochs", str(epochs), "--out", path]
            log(f"ablation {seed}/{name}: python {' '.join(cmd)}")
            if os.path.exists(path):
                os.remove(path)
            timed(args, f"{seed}/ablation/{name}", cmd, path + ".out.txt")
        with open(path + ".log.jsonl") as f:
            curve = [json.loads(line) for line in f if line.strip()]
        return name, {"flags": ABLATION[name], "init": os.path.basename(init),
                      "test_accuracy": [r.get("test_accuracy") for r in curve],
                      "train_loss": [r.get("train_loss") for r in curve],
                      "seconds": train_time(args, f"{seed}/ablation/{name}" if name != "base" else f"{seed}/clustr")}

    names = args.ablation or list(ABLATION)
    if "weak_warm_start" in names and not finished(weak, weak_epochs):
        cmd = ["nominal.py", *common[1:], "--epochs", str(weak_epochs), "--out", weak, "--overwrite"]
        log(f"ablation {seed} weak warm start: python {' '.join(cmd)}")
        timed(args, f"{seed}/ablation/nominal_weak", cmd, weak + ".out.txt")
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        out = dict(pool.map(one, names))
    import torch
    for key, path in (("nominal", nominal_path), ("nominal_weak", weak)):
        if os.path.exists(path):
            out[key] = {"test_accuracy": [torch.load(path, map_location="cpu",
                                                     weights_only=True)["metrics"]["test_accuracy"]]}
    return out


def print_ablation(ablation):
    for seed, ab in ablation.items():
        print(f"\n{f'seed {seed}: magnet.py from nominal':<34}{'init':>18}  test accuracy after epoch 0, 1, 2, ...")
        for name, rec in ab.items():
            accs = " ".join(f"{100 * a:5.1f}" for a in rec["test_accuracy"] if a is not None)
            print(f"{name:<34}{rec.get('init', '-'):>18}  {accs}")


def train_seed(args, seed, data_dir, extra):
    """Every model's checkpoint for one seed; -> {(seed, model): {"path", "seconds"}}."""
    common = ["--data", args.data, "--data-dir", data_dir, "--width", str(args.width),
              "--device", "cpu", *extra, *args.stage_args.split()]
    jobs = [(seed, m) for m in args.models]
    out = {}

    def one(seed, name):
        stage, flags, needs_init, _ = MODELS[name]
        folder = os.path.join(args.workdir, f"seed{seed}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{name}.pt")
        epochs = args.epochs_nominal if name == "nominal" else args.epochs
        key = f"{seed}/{name}"
        if not finished(path, epochs):
            cmd = [stage, *common, *flags, "--seed", str(seed), "--epochs", str(epochs), "--out", path]
            if needs_init:
                cmd += ["--init", os.path.join(folder, "nominal.pt")]
            log(f"train {key}: python {' '.join(cmd)}")
            if os.path.exists(path):
                os.remove(path)                              # unfinished earlier try: start again
            timed(args, key, cmd, path + ".out.txt")
        import torch
        accuracy = torch.load(path, map_location="cpu", weights_only=True)["metrics"]["test_accuracy"]
        out[(seed, name)] = {"path": path, "seconds": train_time(args, key), "test_accuracy": accuracy}

    # the nominal checkpoints (and the models that need none) first, then the rest
    first = [j for j in jobs if not MODELS[j[1]][2]]
    then = [j for j in jobs if MODELS[j[1]][2]]
    for batch in (first, then):
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda j: one(*j), batch))
    return out


# --- evaluation -----------------------------------------------------------------------------

def clustering(ckpt):
    import torch
    return torch.load(ckpt, map_location="cpu", weights_only=True)["stage"] in ("magnet", "qtrades-magnet")


def attack_column(args, data_dir, ckpt, eps, column, result_path):
    if os.path.exists(result_path) and column not in args.redo:
        return json.load(open(result_path))
    flags = PROTOCOLS[column] + ["--no-strict"]
    if column == "authors" and not clustering(ckpt):
        # a linear head's logits are logits: the authors' cross-entropy is Eq. (5)'s here
        flags = [("ce" if f == "scores-ce" else f) for f in flags]
    cmd = ["attack.py", "--ckpt", ckpt, "--data-dir", data_dir, "--eps", eps, "--limit",
           str(args.attack_images), "--device", "cpu", "--out", result_path, "--overwrite", *flags]
    seconds = run(cmd, result_path + ".out.txt")
    res = json.load(open(result_path))
    res["wall_seconds"] = seconds
    dump(res, result_path)
    return res


def robust_of(res):
    """The headline of an attack.py result: its worst-case row when there is one, else its only row."""
    rows = res["results"]
    worst = [r for r in rows if r["loss"] == "worst-case"]
    return (worst or rows)[0]["robust_accuracy"]


def autoattack(args, data_dir, ckpt, eps, result_path):
    if os.path.exists(result_path) and "autoattack" not in args.redo:
        return json.load(open(result_path))
    try:
        import torchattacks
    except ImportError:
        return None
    import torch
    import attack
    torch.set_num_threads(1)
    clf, info = attack.read_classifier(ckpt, "cpu")
    x, y, _ = attack.load_split(info["data"]["name"], data_dir, False, args.aa_images)
    x = attack.to_float(x)
    t0 = time.time()
    # AutoAttack standard from torchattacks' parts, as benchmarks/autoattack.py builds it (APGD-CE,
    # APGD-T and FAB-T with 9 targets, 100 iterations each, Square 5000 queries, in a cascade):
    # torchattacks.AutoAttack itself runs its APGDs for 10 iterations only.
    import importlib.util
    spec = importlib.util.spec_from_file_location("aa_bench", os.path.join(ROOT, "benchmarks", "autoattack.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # eval mode on the wrapper too: torchattacks restores the mode it found after each attack, so a
    # wrapper left in train mode would put the network's batch norm in train mode after the first
    # attack (batch statistics, running buffers updated) -- every later figure would be wrong
    model = bench.Finite(clf).eval()
    aa = bench.autoattack_standard(model, attack.parse_fraction(eps),
                                   info["data"]["num_classes"], steps=100, queries=5000)
    x_adv = aa(x, y)
    if clf.training or model.training:
        raise SystemExit("AutoAttack left the classifier in train mode: its figures would be wrong")
    with torch.no_grad():
        natural = clf(x).argmax(1) == y
        robust = (clf(x_adv).argmax(1) == y) & natural
        linf = float((x_adv - x).abs().amax()) if len(x) else 0.0
    res = {"images": len(y), "natural_accuracy": float(natural.double().mean()),
           "robust_accuracy": float(robust.double().mean()), "max_linf": linf,
           "seconds": time.time() - t0, "torchattacks": torchattacks.__version__,
           "robust_mask": robust.tolist()}
    dump(res, result_path)
    return res


def certify_column(args, data_dir, ckpt, result_path):
    if os.path.exists(result_path) and "certified" not in args.redo:
        return json.load(open(result_path))
    cmd = ["certify.py", "--ckpt", ckpt, "--data-dir", data_dir, "--limit", str(args.attack_images),
           "--device", "cpu", "--out", result_path, "--overwrite", "--plot", "none"]
    seconds = run(cmd, result_path + ".out.txt")
    res = json.load(open(result_path))
    res["wall_seconds"] = seconds
    dump(res, result_path)
    return res


def evaluate_all(args, data_dir, trained):
    """Every (model, eps, column) cell, cached per file, run --jobs at a time in the order 8/255 first,
    the attack.py columns before AutoAttack, certificates last; -> one row per (seed, model)."""
    t_start = time.time()
    tasks = []                                       # (priority, seed, name, eps, column)
    for (seed, name), t in sorted(trained.items()):
        for k, eps in enumerate(args.eps):
            for column in args.protocols:
                tasks.append(((k, 0), seed, name, eps, column))
            if args.aa_images and (args.aa_eps is None or eps in args.aa_eps):
                tasks.append(((k, 1), seed, name, eps, "autoattack"))
        if name not in ("nominal", "qtrades"):
            tasks.append(((len(args.eps), 2), seed, name, None, "certified"))
    tasks.sort(key=lambda task: task[0])
    results = {}

    def one(task):
        _, seed, name, eps, column = task
        folder = os.path.join(args.workdir, f"seed{seed}", "eval")
        os.makedirs(folder, exist_ok=True)
        ckpt = trained[(seed, name)]["path"]
        tag = eps.replace("/", "_") if eps else ""
        path = {"autoattack": os.path.join(folder, f"{name}_aa_{tag}.json"),
                "certified": os.path.join(folder, f"{name}_certify.json")}.get(
            column, os.path.join(folder, f"{name}_{column}_{tag}.json"))
        cached = os.path.exists(path) and column not in args.redo
        if not cached and args.eval_minutes is not None and time.time() - t_start > 60 * args.eval_minutes:
            log(f"skip seed {seed} {name} eps {eps} {column} (--eval-minutes)")
            return
        log(f"eval seed {seed} {name} eps {eps} {column}{' (cached)' if cached else ''}")
        if column == "autoattack":
            res = autoattack(args, data_dir, ckpt, eps, path)
        elif column == "certified":
            res = certify_column(args, data_dir, ckpt, path)
        else:
            res = attack_column(args, data_dir, ckpt, eps, column, path)
        results[(seed, name, eps, column)] = res

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, tasks))
    rows = []
    for (seed, name), t in sorted(trained.items()):
        row = {"model": name, "label": MODELS[name][3], "seed": seed, "train_seconds": t["seconds"],
               "test_accuracy": t["test_accuracy"], "eps": {}}
        # the row's cost: its training plus every evaluation of it, each a process of one thread
        row["eval_seconds"] = sum(r.get("wall_seconds", r.get("seconds")) or 0
                                  for (s, n, _, _), r in results.items() if (s, n) == (seed, name))
        for eps in args.eps:
            cell = {}
            for column in args.protocols:
                res = results.get((seed, name, eps, column))
                if res is None:
                    continue
                cell["natural"] = res["natural_accuracy"]
                cell[column] = robust_of(res)
                cell[column + "_seconds"] = res.get("wall_seconds")
                # attack.py's checks of this cell: their names, and those that failed ([] all passed)
                cell[column + "_checks"] = sorted(res.get("checks") or {})
                cell[column + "_checks_failed"] = [k for k, v in (res.get("checks") or {}).items()
                                                   if v.get("ok") is False]
            aa = results.get((seed, name, eps, "autoattack"))
            if aa is not None:
                cell["autoattack"], cell["autoattack_images"] = aa["robust_accuracy"], aa["images"]
                cell["autoattack_natural"] = aa["natural_accuracy"]
                cell["autoattack_seconds"] = aa["seconds"]
                worst = results.get((seed, name, eps, "worst"))
                if worst is not None and worst.get("examples"):
                    # the same first images, example by example: attack.py's worst case vs AutoAttack
                    ours = worst["examples"][0]["robust"][:aa["images"]]
                    theirs = aa["robust_mask"][:len(ours)]
                    cell["worst_on_aa_images"] = sum(ours) / max(1, len(ours))
                    # robust under both: the worst case over attack.py's losses and AutoAttack
                    cell["both_on_aa_images"] = sum(o and a for o, a in zip(ours, theirs)) / max(1, len(ours))
                    cell["fooled_by_aa_only"] = sum(o and not a for o, a in zip(ours, theirs))
                    cell["fooled_by_worst_only"] = sum(a and not o for o, a in zip(ours, theirs))
            row["eps"][eps] = cell
        c = results.get((seed, name, None, "certified"))
        if c is not None:
            row["certified"] = {"lipschitz_bound": c["lipschitz"]["value"],
                                "lipschitz_lower_estimate": c["lipschitz"]["lower_estimate"],
                                "median_radius": c["radius"]["median_correct"],
                                "clean_accuracy_nearest_centre": c["clean_accuracy"],
                                "median_radius_if_L_were_lower_estimate":
                                    c["radius"]["median_correct_if_L_were_lower_estimate"],
                                "median_min_l2_perturbation": c["l2_attack"]["median_min_perturbation"],
                                "sound": c["sound"],
                                "max_radius": c["radius"]["max_correct"],
                                "vacuous": c["radius"]["vacuous"]}
        rows.append(row)
    return rows


# --- report ---------------------------------------------------------------------------------

def mean_std(values):
    """-> (mean, sample std) of the values that are not None; std None below two values."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def cell_of(row, eps, column):
    """One cell of a per-seed row: column of row["eps"][eps], or a row-level figure (eps None)."""
    if eps is None:
        return row.get(column)
    return row["eps"].get(eps, {}).get(column)


def summarise(rows, args):
    """One line per model and eps: mean, sample std and the per-seed values of every column."""
    cols = ["natural", *args.protocols, "worst_on_aa_images", "autoattack", "both_on_aa_images"]
    table = []
    for name in args.models:
        mine = sorted((r for r in rows if r["model"] == name), key=lambda r: r["seed"])
        if not mine:
            continue
        for eps in args.eps:
            line = {"model": name, "label": MODELS[name][3], "eps": eps, "seeds": [r["seed"] for r in mine]}
            for c in cols:
                values = [cell_of(r, eps, c) for r in mine]
                line[c], line[c + "_std"] = mean_std(values)
                line[c + "_per_seed"] = values
            for c in args.protocols:                # {check: seeds where it failed} of the cell
                failed = [k for r in mine for k in cell_of(r, eps, c + "_checks_failed") or []]
                line[c + "_failed"] = {k: failed.count(k) for k in sorted(set(failed))}
                line[c + "_checked"] = all(cell_of(r, eps, c + "_checks") for r in mine)
            table.append(line)
    return table


# Student's t, two-sided 95%, by degrees of freedom (n seeds - 1)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def judge(diffs):
    """Paired per-seed differences, oriented so that > 0 is what the claim says; -> (mean, std,
    half-width of the 95% t-interval of the mean, verdict).  "holds": the interval lies above 0;
    "does not hold": it lies at or below 0 (equal on every seed included: not "more"); otherwise
    "cannot tell at n = N"."""
    diffs = [d for d in diffs if d is not None]
    m, s = mean_std(diffs)
    if m is None or len(diffs) < 2:
        return m, s, None, f"cannot tell at n = {len(diffs)}"
    half = T95.get(len(diffs) - 1, 1.96) * s / len(diffs) ** 0.5
    verdict = ("holds" if m - half > 0 else "does not hold" if m + half <= 0
               else f"cannot tell at n = {len(diffs)}")
    return m, s, half, verdict


# The paper's claims, each as paired differences over seeds: (claim, text, [(model A, model B, eps,
# column, what A - B > 0 means)]).  eps None: a row-level figure (test_accuracy on --test images).
CLAIMS = [
    ("a", "ClusTR is more robust than its nominal warm start, without adversarial training",
     [("clustr", "nominal", "{eps}", "worst"), ("clustr", "nominal", "{eps}", "autoattack")]),
    ("b", "ClusTR+QTRADES is more robust than QTRADES alone",
     [("clustr_qtrades", "qtrades", "{eps}", "worst"), ("clustr_qtrades", "qtrades", "{eps}", "autoattack")]),
    ("c", "the authors' protocol overstates robustness (authors' protocol minus attack.py's worst case)",
     [(m, m, "{eps}", ("authors", "worst")) for m in ("magnet_random", "clustr", "clustr_qtrades",
                                                       "clustr_qtrades_kl")]),
    ("d", "ClusTR costs accuracy against its warm start (nominal minus ClusTR, test accuracy)",
     [("nominal", "clustr", None, "test_accuracy")]),
    ("f", "--consistency kl is more robust than the paper's cross-entropy term (KL minus CE)",
     [("clustr_qtrades_kl", "clustr_qtrades", "{eps}", "worst"),
      ("clustr_qtrades_kl", "clustr_qtrades", None, "test_accuracy")]),
]


def claims(rows, args, ablation):
    """Every claim's cells judged by judge(); -> list of dicts (JSON) in the order of CLAIMS."""
    by = {(r["seed"], r["model"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    ablation = ablation or {}
    out = []

    def add(key, text, cells, eps, diffs):
        m, sd, half, verdict = judge(diffs)
        out.append({"claim": key, "text": text, "cells": cells, "eps": eps, "per_seed": diffs, "mean": m,
                    "std": sd, "ci95_half": half, "verdict": verdict})

    def minus(x, y):
        return None if x is None or y is None else x - y

    for key, text, cells in CLAIMS:
        for a, b, eps_t, col in cells:
            for eps in (args.eps if eps_t else [None]):
                ca, cb = col if isinstance(col, tuple) else (col, col)
                add(key, text, f"{a}.{ca} - {b}.{cb}", eps,
                    [minus(cell_of(by[s, a], eps, ca), cell_of(by[s, b], eps, cb))
                     if (s, a) in by and (s, b) in by else None for s in seeds])
    final = {s: {n: rec["test_accuracy"][-1] for n, rec in ab.items()} for s, ab in ablation.items()}
    # (d), which setting: each ablation variant's final accuracy minus ClusTR's (base), per seed
    for name in sorted({n for f in final.values() for n in f} - {"base", "nominal", "nominal_weak"}):
        add("d", f"magnet.py {' '.join(ABLATION[name])} recovers accuracy (variant minus ClusTR, test accuracy)",
            f"ablation.{name} - clustr", None, [minus(f.get(name), f.get("base")) for f in final.values()])
    # (d), split: what replacing the head by k-means++ clusters on the nominal features costs alone
    if final and all("epochs0" in f for f in final.values()):
        add("d", "k-means++ on the nominal features alone costs accuracy (nominal minus magnet.py --epochs 0, "
            "test accuracy)", "nominal - ablation.epochs0", None,
            [minus(by[s, "nominal"]["test_accuracy"], final[s]["epochs0"]) if (s, "nominal") in by and s in final
             else None for s in seeds])
    return out


def pm(m, s, scale=100, digits=1):
    if m is None:
        return "-"
    return f"{scale * m:.{digits}f}" + (f" ± {scale * s:.{digits}f}" if s is not None else "")


def markdown(table, rows, judged, args):
    """The tables for benchmarks/README.md, from this run's figures only."""
    cols = ["natural", *args.protocols, "worst_on_aa_images", "autoattack", "both_on_aa_images"]
    names = {"natural": "natural", "authors": "authors' protocol", "pgd20": "PGD-20", "pgd100": "PGD-100",
             "worst": "attack.py worst", "worst_on_aa_images": f"attack.py worst (first {args.aa_images})",
             "autoattack": f"AutoAttack (first {args.aa_images})",
             "both_on_aa_images": f"worst of both (first {args.aa_images})"}

    def mark(line, c):      # a cell whose attack.py checks failed on some seed: †, or unchecked: ‡
        return (" †" if line.get(c + "_failed") else "") + ("" if line.get(c + "_checked", True) else " ‡")
    out = ["| model | eps | test accuracy | " + " | ".join(names[c] for c in cols) + " | minutes (train + eval) |",
           "| --- " * (4 + len(cols)) + "|"]
    for line in table:
        mine = [r for r in rows if r["model"] == line["model"]]
        acc = mean_std([r["test_accuracy"] for r in mine])
        mins = mean_std([((r["train_seconds"] or 0) + r["eval_seconds"]) / 60 for r in mine])
        out.append(f"| {line['label']} | {line['eps']} | {pm(*acc)} | "
                   + " | ".join(pm(line[c], line[c + '_std']) + mark(line, c) for c in cols)
                   + f" | {pm(*mins, scale=1) if line['eps'] == args.eps[0] else ''} |")
    failed = [f"{line['label']} at {line['eps']}, {names[c]}: " + ", ".join(f"{k} ({n} of {len(line['seeds'])} "
              "seeds)" for k, n in line[c + "_failed"].items()) for line in table for c in args.protocols
              if line.get(c + "_failed")]
    out += ["", "† attack.py's checks failed (README \"attack.py: losses, cascade, checks, results\"): "
            + ("; ".join(failed) if failed else "none") + ". ‡ a cell run without its checks."]
    out += ["", "| claim | cells (A - B, points) | eps | per seed | mean ± std | 95% interval | verdict |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for j in judged:
        seeds = " / ".join("-" if d is None else f"{100 * d:+.1f}" for d in j["per_seed"])
        ci = "-" if j["ci95_half"] is None else f"{100 * (j['mean'] - j['ci95_half']):+.1f} .. " \
             f"{100 * (j['mean'] + j['ci95_half']):+.1f}"
        out.append(f"| ({j['claim']}) | {j['cells']} | {j['eps'] or '-'} | {seeds} | "
                   f"{pm(j['mean'], j['std'])} | {ci} | {j['verdict']} |")
    cert = [r for r in rows if "certified" in r]
    if cert:
        out += ["", "| model | nearest-centre accuracy | L, sound bound | L, lower estimate | median certified "
                "radius (L2) | largest certified radius | median radius if L were the lower estimate | "
                "median L2 perturbation found | seeds where every radius < 1/255 |", "| --- " * 9 + "|"]
        for name in args.models:
            mine = [r["certified"] for r in cert if r["model"] == name]
            if mine:
                g = lambda k: mean_std([c[k] for c in mine])      # noqa: E731
                out.append(f"| {MODELS[name][3]} | {pm(*g('clean_accuracy_nearest_centre'))} | "
                           + " | ".join("-" if g(k)[0] is None else f"{g(k)[0]:.3g}"
                                        + (f" ± {g(k)[1]:.2g}" if g(k)[1] is not None else "")
                                        for k in ("lipschitz_bound", "lipschitz_lower_estimate", "median_radius",
                                                  "max_radius", "median_radius_if_L_were_lower_estimate",
                                                  "median_min_l2_perturbation"))
                           + f" | {sum(c['vacuous'] for c in mine)} of {len(mine)} |")
    return "\n".join(out)


def fmt(v, s=None):
    if v is None:
        return "-"
    return f"{100 * v:.2f}" + (f"±{100 * s:.1f}" if s else "")


def print_table(table, rows, args):
    cols = ["natural", *args.protocols, "autoattack"]
    print("\n" + f"{'model':<28}{'eps':>7} " + "".join(f"{c:>14}" for c in cols))
    for line in table:
        print(f"{line['label']:<28}{line['eps']:>7} "
              + "".join(f"{fmt(line[c], line[c + '_std']):>14}" for c in cols))
    print("\nnatural / robust accuracy in %, on the first --attack-images test images (AutoAttack "
          "on the first --aa-images); mean ± std over seeds where several ran.")
    print(f"\n{'attack.py worst vs AutoAttack, same images':<44}{'eps':>7}{'images':>8}{'worst':>8}"
          f"{'AA':>8}{'AA only':>9}{'worst only':>11}")
    for r in rows:
        for eps, cell in r["eps"].items():
            if "worst_on_aa_images" in cell:
                print(f"{r['label']:<44}{eps:>7}{cell['autoattack_images']:>8}"
                      f"{100 * cell['worst_on_aa_images']:>7.1f}%{100 * cell['autoattack']:>7.1f}%"
                      f"{cell['fooled_by_aa_only']:>9}{cell['fooled_by_worst_only']:>11}")
    cert = [r for r in rows if "certified" in r]
    if cert:
        print(f"\n{'certified (Prop. 1, sound bound)':<34}{'seed':>5}{'L bound':>12}{'L lower':>10}"
              f"{'median R':>11}{'max R':>11}{'vacuous':>9}")
        for r in cert:
            c = r["certified"]
            print(f"{r['label']:<34}{r['seed']:>5}{c['lipschitz_bound']:>12.3g}"
                  f"{c['lipschitz_lower_estimate'] or 0:>10.3g}{c['median_radius']:>11.3g}"
                  f"{c['max_radius']:>11.3g}{str(c['vacuous']):>9}")


def figure_data(table, judged):
    """What the figures plot, from reproduce.json's "table" and "claims" (checked by a test).
    -> {"eps": {model label: {column: [(eps value, mean, std)]}}, "claims": [(label, per-seed
    differences, mean, 95% half-width, verdict)]}, in points (%)."""
    curves = {}
    for t in table:
        num, _, den = t["eps"].partition("/")
        for c in ("worst", "authors", "autoattack"):
            if t.get(c) is not None:
                curves.setdefault(t["label"], {}).setdefault(c, []).append(
                    (float(num) / float(den or 1), 100 * t[c], 100 * (t[c + "_std"] or 0)))
    diffs = [(f"({j['claim']}) {j['cells']}" + (f" @ {j['eps']}" if j["eps"] else ""),
              [100 * d for d in j["per_seed"] if d is not None], 100 * j["mean"],
              100 * j["ci95_half"], j["verdict"]) for j in judged if j["ci95_half"] is not None]
    return {"eps": curves, "claims": diffs}


def figures(result, folder):
    """Two PNGs from a reproduce.json (no retraining): robust accuracy against eps per model, mean
    ± std over seeds (attack.py's worst case solid, the authors' protocol dashed, AutoAttack as
    markers), and each claim's per-seed paired differences with their 95% t-interval against 0.
    -> (paths written, or a note when matplotlib is missing; figure_data's dict)."""
    data = figure_data(result["table"], result["claims"])
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib missing: figures skipped", data
    os.makedirs(folder, exist_ok=True)
    n = len(data["eps"])
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.2), squeeze=False, sharey=True)
    cfg = result.get("config", {})
    style = {"worst": ("-", "o", f"attack.py worst case ({cfg.get('attack_images', '?')} images)"),
             "authors": ("--", "s", "authors' protocol"),
             "autoattack": ("", "x", f"AutoAttack standard (first {cfg.get('aa_images', '?')})")}
    for ax, (label, cols) in zip(axes[0], data["eps"].items()):
        for c, points in cols.items():
            x, m, sd = zip(*points)
            ax.errorbar(x, m, sd, linestyle=style[c][0], marker=style[c][1], capsize=2, label=style[c][2])
        ax.set(title=label, xlabel="eps (L-inf)", ylim=(-2, 100))
        ax.title.set_fontsize(8)
    axes[0][0].set_ylabel("robust accuracy (%)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"mean ± std over {len(result['table'][0]['seeds'])} seeds", fontsize=8)
    fig.tight_layout()
    paths = [os.path.join(folder, "robust_vs_eps.png"), os.path.join(folder, "claims.png")]
    fig.savefig(paths[0], dpi=90)
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(data["claims"]) + 1))
    for k, (label, per_seed, m, half, verdict) in enumerate(data["claims"]):
        ax.plot(per_seed, [k] * len(per_seed), "o", color="grey", markersize=3)
        ax.errorbar([m], [k], xerr=[half], fmt="D", color="C0" if m - half > 0 or m + half <= 0 else "C1",
                    capsize=3, markersize=4)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(data["claims"])), [f"{c[0]}: {c[4]}" for c in data["claims"]], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("paired difference A - B (points): per seed (grey), mean and 95% t-interval")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=90)
    plt.close("all")
    return paths, data


def report(args, rows, ablation, seed_seconds, t0):
    """reproduce.json, reproduce.md (the README's tables), the printed table and the plot."""
    import torch
    table = summarise(rows, args)
    judged = claims(rows, args, ablation)
    md = markdown(table, rows, judged, args)
    # each seed's cost: every process it ran (one thread each, --jobs at a time), cached ones included
    process_minutes = {seed: (sum((r["train_seconds"] or 0) + r["eval_seconds"] for r in rows if r["seed"] == seed)
                              + sum(v.get("seconds") or 0 for k, v in ablation.get(seed, {}).items()
                                    if k != "base")) / 60 for seed in args.seeds}
    md += "\n\nprocess minutes per seed (one thread each; wall time about this / --jobs): " + ", ".join(
        f"seed {seed} {m:.0f}" for seed, m in process_minutes.items())
    out = {"config": vars(args), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "machine": f"{os.cpu_count()} CPU cores", "rows": rows, "table": table, "claims": judged,
           "ablation": ablation, "wall_seconds_per_seed_this_run": seed_seconds,
           "process_minutes_per_seed": process_minutes,
           "seconds": time.time() - t0}
    path = os.path.join(args.workdir, "reproduce.json")
    dump(out, path)
    with open(os.path.join(args.workdir, "reproduce.md"), "w") as f:
        f.write(md + "\n")
    print_table(table, rows, args)
    if ablation:
        print_ablation(ablation)
    print("\n" + md)
    note, _ = figures(out, args.workdir)
    log(f"wrote {path} and reproduce.md; figures: {note}; {time.time() - t0:.0f} s this run")
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.figures:                # draw from a saved result, e.g. benchmarks/results/reproduce.json
        paths, _ = figures(json.load(open(args.figures)), args.workdir)
        return log(f"figures: {paths}")
    os.makedirs(args.workdir, exist_ok=True)
    t0 = time.time()
    data_dir, extra = prepare_data(args)
    rows, ablation, seed_seconds = [], {}, {}
    for seed in args.seeds:     # seed after seed: a stopped run leaves whole seeds and cached cells
        t_seed = time.time()
        trained = train_seed(args, seed, data_dir, extra)
        if args.ablation != ["none"]:
            ablation[seed] = ablation_seed(args, seed, data_dir, extra)
        if not args.train_only:
            rows += evaluate_all(args, data_dir, trained)
        seed_seconds[seed] = time.time() - t_seed
        log(f"seed {seed} done in {seed_seconds[seed] / 60:.1f} min (this run)")
    if args.train_only:
        log("trained; evaluation skipped (--train-only)")
        return None
    return report(args, rows, ablation, seed_seconds, t0)


if __name__ == "__main__":
    main()
