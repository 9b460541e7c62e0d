"""benchmarks/gpu.py -- what the ClusTR pipeline costs at the paper's size, piece by piece, on the
device at hand, in one call: images/s, seconds, achieved TFLOP/s and their share of the device's
peak, and the whole pipeline projected from the epoch counts of App. A / Sec. 4.2.

Each row runs the stage files' own functions (imported, not re-implemented) on random CIFAR-shaped
data: 50,000 training and 10,000 test 32x32 RGB images, 10 classes, ResNet18 of width 64 (App. A);
random data time the work and nothing else (no accuracy is meant).
  nominal   one nominal.py epoch: train_one_epoch (batches of 256, App. A crops + flips), then
            the test accuracy (evaluate), as its main() does per epoch
  magnet    one magnet.py epoch: train_one_epoch (neighbourhoods of m x d = 12 x 20), then the
            cluster update of every epoch (cluster_and_evaluate: eval features of the training and
            test splits, k-means++ per class, sigma^2, the sampler's new clusters, the Eq. (4)
            accuracy of both splits)
  qtrades   one qtrades.py epoch (ClusTR+QTRADES, --loss magnet: Eq. (6), the one-step adversary
            of Sec. 4.2), then the same cluster update
  pgd20     attack.py's attack_split: PGD-20 x 10 restarts (Eq. (5), cross-entropy, constant step
            2/255, batches of 500, on the classifier itself) on the test split
  pgd100    the same with 100 steps
  certify   certify.py's bound: the Lipschitz upper bound of the features (lipschitz_layers,
            folded and per layer, as its main() prints both), the test features and Prop. 1's
            radii (certified_radii)
PGD rows attack at eps = 0 the labels the model itself predicts: no example can be fooled, so
every restart runs all its steps on every image -- the cost of a model that no restart fools,
attack.py's upper bound (a model with robust accuracy r costs about r of it, plus the partial runs
of the examples fooled on the way).

FLOPs are counted with torch.utils.flop_counter.FlopCounterMode on the eager model (one training
step, one feature batch, one PGD run on a few images, the cluster update on the warm-up slice),
per image, times the images timed.  It counts convolutions and matrix products (2 per multiply-
add), forward and backward; element-wise work, the Adam step, batch norm, sorting and the float64
SVDs of the Lipschitz bound are not counted, so the TFLOP/s are a lower bound.  The share of the
peak takes the dense peak (no sparsity) of the precision the row runs at: bf16 under autocast,
else tf32 when cuDNN may use it for convolutions (torch's default), else fp32 (table PEAKS below;
--peak-tflops overrides it; an unknown device, a CPU, shows n/a).

Budget (--minutes, default 10, everything included: set-up, FLOP counts, compilation): each row
gets an equal share of what is left; after two warm-up passes on a small slice (the first one
compiles under --compile; their difference is reported as first-call seconds, the cost of
compilation and of first-call allocations: there is no separate compile-time column) it times as many
images as fit its share, at least one batch, and projects its seconds linearly to the paper's
size ("full" column; a smaller --train-images/--test-images is projected the same way).  Rows are
printed as they finish and the JSON is rewritten after each, so a run stopped by its time limit
keeps the rows it finished.

    python benchmarks/gpu.py --device cuda --amp --minutes 9          # the paper's size, one call
    python benchmarks/gpu.py --device cuda --amp --compile --minutes 9
    python benchmarks/gpu.py --device cuda --rows pgd100 --test-images 2000
    python benchmarks/gpu.py --tiny --device cpu                      # the plumbing, in seconds

Writes --out (JSON: settings, device, peaks, one object per row, the projected pipeline).
Measured figures: README.md, "Benchmarks"; on a GPU: not measured yet.  Needs torch, torchvision,
numpy; imports the stage files from the folder above (benchmarks may).
"""

import argparse
import copy
import datetime
import json
import math
import os
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import attack  # noqa: E402
import certify  # noqa: E402
import magnet  # noqa: E402
import nominal  # noqa: E402
import qtrades  # noqa: E402

# Dense peak TFLOP/s (no structured sparsity) by device name, from the vendors' data sheets, which
# print the sparse figures for the tensor-core rows (here halved):
#   "NVIDIA H100 Tensor Core GPU" data sheet: H100 SXM  FP32 67, TF32 989*, BF16 1,979*;
#                                             H100 PCIe FP32 51, TF32 756*, BF16 1,513*
#   "NVIDIA H200 Tensor Core GPU" data sheet: H200 SXM  FP32 67, TF32 989*, BF16 1,979*
#   "NVIDIA A100 Tensor Core GPU" data sheet: A100 (SXM and PCIe) FP32 19.5, TF32 312*, BF16 624*
#   (* with sparsity: twice the dense figure)
# The first entry whose key occurs in torch.cuda.get_device_name() wins; NVL boards (other clocks)
# and every other device: n/a (pass --peak-tflops).
PEAKS = [
    ("NVL", None),
    ("H100 PCIe", {"bf16": 756.5, "tf32": 378.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.5, "tf32": 494.5, "fp32": 67.0}),
    ("H200", {"bf16": 989.5, "tf32": 494.5, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]

ROWS = ["nominal", "magnet", "qtrades", "pgd20", "pgd100", "certify"]
PAPER = {"train": 50000, "test": 10000, "width": 64, "classes": 10}     # CIFAR10, App. A
TINY = {"train": 128, "test": 64, "width": 4, "classes": 10}
# the pipeline of README "The paper's pipeline, per dataset" for CIFAR10: epochs from the stages'
# own App. A / Sec. 4.2 defaults, one attack of each protocol, one certificate
COUNTS = {"nominal": nominal.PAPER_DEFAULTS["cifar10"]["epochs"],
          "magnet": magnet.PAPER_DEFAULTS["cifar10"]["epochs"],
          "qtrades": qtrades.PAPER_DEFAULTS["cifar10"]["epochs"], "pgd20": 1, "pgd100": 1, "certify": 1}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="benchmarks/gpu.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="The ClusTR pipeline's cost at the paper's size, one row per piece, in one call "
                    "(see the module docstring).")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto = cuda when available")
    p.add_argument("--tiny", action="store_true",
                   help="the same code at a small size: width 4, 128 train and 64 test images, "
                        "PGD-2 x 2 and PGD-4 x 2 instead of 20 x 10 and 100 x 10; projections to "
                        "that size (a check of the plumbing, seconds on a CPU)")
    p.add_argument("--width", type=int, default=None, help="ResNet18 base width; App. A: 64 (--tiny: 4)")
    p.add_argument("--train-images", type=int, default=None,
                   help="training images to time at most (CIFAR: 50000; --tiny: 128); the seconds "
                        "are projected to the full split")
    p.add_argument("--test-images", type=int, default=None,
                   help="test images to time at most (CIFAR: 10000; --tiny: 64)")
    p.add_argument("--minutes", type=float, default=10.0,
                   help="time budget of the whole call; rows time fewer images to fit it")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=ROWS, help="rows to run, in this order")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="the stages' --compile: torch.compile of f(x) (inductor when no BACKEND)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast on CUDA in every row but certify (always fp32); default: "
                        "each stage's own (training on, attack.py off)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last weights and images everywhere (--no-channels-last: nowhere); "
                        "default: each stage's own (training on CUDA only, attack.py always, "
                        "certify never)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak TFLOP/s for every row (default: the table PEAKS by "
                        "device name)")
    p.add_argument("--seed", type=int, default=0, help="seeds the data, models and generators")
    p.add_argument("--out", default="gpu.json", help="JSON results, rewritten after every row")
    o = p.parse_args(argv)
    size = TINY if o.tiny else PAPER
    o.width = o.width or size["width"]
    o.full = {"train": size["train"], "test": size["test"]}
    o.train_images = min(o.train_images or size["train"], size["train"])
    o.test_images = min(o.test_images or size["test"], size["test"])
    for flag, v, low in (("--width", o.width, 1), ("--train-images", o.train_images, 128),
                         ("--test-images", o.test_images, 64), ("--minutes", o.minutes, 0)):
        if not v >= low:
            p.error(f"{flag} must be at least {low}")
    return o


# ======================================================================================
# Timing, FLOPs, budget
# ======================================================================================

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(fn(), wall seconds), the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


class FlopCounter(FlopCounterMode):
    """torch.utils.flop_counter.FlopCounterMode with the total only.  Its per-module breakdown
    hooks the inputs of every module called, and torch.autograd.grad with respect to such an input
    when it is a leaf (attack.py's PGD: the classifier's input x^k) then fails ("A leaf node was
    passed to _will_engine_execute_node ..."); counted FLOPs are the same without it."""

    class Total:                                      # stands in for the module tracker
        parents = ("Global",)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def __init__(self):
        super().__init__(display=False)
        self.mod_tracker = self.Total()


def flops_of(fn):
    """FLOPs of fn() as FlopCounterMode counts them (convolutions and matrix products, forward and
    backward, 2 per multiply-add)."""
    with FlopCounter() as counter:
        fn()
    return counter.get_total_flops()


class Budget:
    """--minutes for the whole call: each row gets an equal share of what is left."""

    def __init__(self, minutes, rows):
        self.end, self.rows_left = time.perf_counter() + 60 * minutes, rows

    def row_started(self):
        self.row_end = time.perf_counter() + max(0.0, self.end - time.perf_counter()) / self.rows_left
        self.rows_left -= 1

    def fit(self, seconds_per_image, wanted, least):
        """Images to time: as many of `wanted` as the row's remaining share holds, >= least."""
        left = self.row_end - time.perf_counter()
        n = int(0.9 * left / max(seconds_per_image, 1e-12))
        return max(least, min(wanted, n))


# ======================================================================================
# The stages' set-up, as their main() does it
# ======================================================================================

def stage_args(stage, argv, ctx, training):
    """The stage's own parse_args and setup_runtime (App. A defaults, seeds, cudnn.benchmark,
    --amp resolved as the stage resolves it), then this benchmark's --amp and --compile."""
    args = stage.parse_args(argv + ["--device", ctx.device.type, "--seed", str(ctx.opts.seed)])
    stage.setup_runtime(args, training=training)
    if ctx.opts.amp is not None:
        args.amp = ctx.opts.amp and ctx.device.type == "cuda"      # the stages: bf16 on CUDA only
    args.compile = ctx.opts.compile
    return args


def compiled(model, backend):
    """--compile as the stages apply it (build_training, attack.py's prepare): f(x) of this instance
    through torch.compile; the module and its state_dict keys stay eager's."""
    if backend:
        model.features = torch.compile(model.features, backend=backend)


def layout(model, ctx, stage_default):
    """The memory layout: channels_last where the stage uses it (or as --channels-last says).
    --no-channels-last where a stage converts its images to channels_last itself: the weights
    stay contiguous and f(x) first makes its input contiguous (one copy of the batch), so the
    convolutions run in NCHW."""
    cl = stage_default if ctx.opts.channels_last is None else ctx.opts.channels_last
    if cl:
        model.to(memory_format=torch.channels_last)
    else:
        features = model.features
        model.features = lambda x: features(x.contiguous())
    return cl


def random_split(n, ctx, seed):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, PAPER["classes"], (n,), generator=g)
    return images.to(ctx.device), labels.to(ctx.device)


def subset(split, n):
    return split[0][:n], split[1][:n]


def new_resnet(stage, ctx, head):
    torch.manual_seed(ctx.opts.seed)
    return stage.ResNet18(PAPER["classes"] if head else 0, ctx.opts.width, 3, ctx.mean,
                          ctx.std).to(ctx.device)


# ======================================================================================
# The rows
# ======================================================================================

def row_nominal(ctx):
    """One nominal.py epoch: train_one_epoch, then evaluate on the test split."""
    dev, o = ctx.device, ctx.opts
    args = stage_args(nominal, ["--data", "cifar10", "--width", str(o.width)], ctx, training=True)
    model = new_resnet(nominal, ctx, head=True)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator(device=dev).manual_seed(o.seed)
    B = args.batch_size

    def train(m, op, n):
        return nominal.train_one_epoch(m, op, subset(ctx.train, n), args, gen, dev)

    def test(m, n):
        return nominal.evaluate(m, subset(ctx.test, n), B, args.amp, dev)

    def epoch(m, op, n_train, n_test):                # what nominal.py's main runs per epoch
        return train(m, op, n_train), test(m, n_test)

    k = 32                                            # FLOPs per image, on an eager copy
    m2, op2 = copy.deepcopy((model, opt))
    per_train = flops_of(lambda: train(m2, op2, k)) / k
    per_test = flops_of(lambda: test(m2, k)) / k
    del m2, op2
    cl = layout(model, ctx, dev.type == "cuda")
    compiled(model, args.compile)
    w = min(B + B // 2, o.train_images // 2)          # warm-up: a full and a last batch's shape
    wt = min(B + B // 2, o.test_images // 2)
    first = timed(lambda: epoch(model, opt, w, wt), dev)[1]
    second = timed(lambda: epoch(model, opt, w, wt), dev)[1]
    frac = ctx.budget.fit(second / w, o.train_images, min(B, o.train_images)) / o.train_images
    n_train, n_test = int(o.train_images * frac), max(wt, int(o.test_images * frac))
    train_s = timed(lambda: train(model, opt, n_train), dev)[1]
    test_s = timed(lambda: test(model, n_test), dev)[1]
    return {"label": "nominal epoch", "images": n_train, "test_images": n_test,
            "seconds": train_s + test_s, "train_seconds": train_s, "test_seconds": test_s,
            "full_seconds": train_s * o.full["train"] / n_train + test_s * o.full["test"] / n_test,
            "flops": per_train * n_train + per_test * n_test, "amp": args.amp, "channels_last": cl,
            "first_call_seconds": first - second, "batch_size": B}


def cluster_update(stage, model, train, test, args, generator, sampler):
    """What magnet.py's and qtrades.py's main run after every epoch: the stage's cluster_and_evaluate
    (the features of both splits, k-means++ per class, sigma^2, the sampler's new clusters, the Eq. (4)
    accuracies).  -> the checkpoint's `clusters` entry."""
    info = {"num_classes": PAPER["classes"]}
    return stage.cluster_and_evaluate(model, train, test, info, sampler, args, generator, 1)[0]


def few_batches(sampler, k):
    """The sampler with an epoch of k batches (for the warm-up and the FLOP count)."""
    sampler.batches_per_epoch = lambda: k
    return sampler


def row_clustering(ctx, stage, label):
    """One magnet.py or qtrades.py (--loss magnet) epoch: train_one_epoch, then the cluster update."""
    dev, o = ctx.device, ctx.opts
    args = stage_args(stage, ["--data", "cifar10", "--width", str(o.width)], ctx, training=True)
    model = new_resnet(stage, ctx, head=False)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator(device=dev).manual_seed(o.seed)

    def sampler_for(n):
        return stage.NeighbourhoodSampler(n, args.m, args.d, torch.Generator().manual_seed(o.seed))

    def train(m, op, sampler, clusters, n):
        if stage is magnet:                           # the sampler holds the clusters' classes
            return stage.train_one_epoch(m, op, subset(ctx.train, n), sampler, args, gen, dev)
        return stage.train_one_epoch(m, op, subset(ctx.train, n), sampler, clusters, args, gen, dev)

    B = args.m * args.d                               # App. A: 240 images per neighbourhood batch
    b = args.batch_size                               # feature passes: batches of 500
    w = min(b + b // 2, o.train_images // 2)          # warm-up: a full and a last feature batch
    wt = min(b + b // 2, o.test_images // 2)
    m2, op2 = copy.deepcopy((model, opt))             # FLOPs, on an eager copy
    s2 = sampler_for(w)
    with FlopCounter() as counter:
        c2 = cluster_update(stage, m2, subset(ctx.train, w), subset(ctx.test, wt), args, gen, s2)
    cluster_flops = counter.get_total_flops() / w                # per training image
    with FlopCounter() as counter:
        out = train(m2, op2, few_batches(s2, 1), c2, w)
    step_flops = counter.get_total_flops() / out[-1]             # per image of one batch
    del m2, op2, s2

    cl = layout(model, ctx, dev.type == "cuda")
    compiled(model, args.compile)
    sampler = sampler_for(w)
    clusters = cluster_update(stage, model, subset(ctx.train, w), subset(ctx.test, wt), args, gen, sampler)

    def warm():
        out = train(model, opt, few_batches(sampler, 1), clusters, w)
        cluster_update(stage, model, subset(ctx.train, w), subset(ctx.test, wt), args, gen, sampler)
        return out[-1]
    first = timed(warm, dev)[1]
    seen, second = timed(warm, dev)
    per_image = second / seen
    n = ctx.budget.fit(per_image, o.train_images, min(w, o.train_images))
    n_test = max(wt, int(o.test_images * n / o.train_images))
    sampler = sampler_for(n)                          # epoch 0 of the stage: clusters of all n
    clusters = cluster_update(stage, model, subset(ctx.train, n), subset(ctx.test, n_test), args, gen, sampler)
    out, train_s = timed(lambda: train(model, opt, sampler, clusters, n), dev)
    _, cluster_s = timed(lambda: cluster_update(stage, model, subset(ctx.train, n),
                                                subset(ctx.test, n_test), args, gen, sampler), dev)
    seconds = train_s + cluster_s
    return {"label": label, "images": n, "test_images": n_test, "seconds": seconds,
            "train_seconds": train_s, "cluster_seconds": cluster_s,
            "full_seconds": seconds * ctx.opts.full["train"] / n,
            "flops": step_flops * out[-1] + cluster_flops * n, "amp": args.amp, "channels_last": cl,
            "first_call_seconds": first - second, "batches": sampler.batches_per_epoch(), "batch_size": B}


def row_magnet(ctx):
    return row_clustering(ctx, magnet, "magnet epoch")


def row_qtrades(ctx):
    return row_clustering(ctx, qtrades, "qtrades epoch")


def random_clusters(model, ctx, K=2):
    """Centres for a clustering classifier: K per class, the eval features of random test images;
    sigma^2 their mean squared distance to the others (any positive value serves for timing)."""
    C = PAPER["classes"]
    with torch.no_grad():
        f = model.eval().features(nominal.to_float(ctx.test[0][:C * K])).float()   # [C*K, 8w]
    return {"centers": f, "center_classes": torch.arange(C, device=f.device).repeat_interleave(K),
            "variance": float(torch.cdist(f, f).pow(2).mean()) / 2 or 1.0}


def row_pgd(ctx, steps, restarts):
    """attack.py's attack_split at eps = 0 on the model's own predictions: every restart runs
    all its steps on every image (the module docstring says why)."""
    dev, o = ctx.device, ctx.opts
    args = attack.parse_args(["--loss", "ce", "--schedule", "constant", "--steps", str(steps),
                              "--restarts", str(restarts), "--eps", "0", "--no-checks",
                              "--device", dev.type, "--seed", str(o.seed)])
    attack.setup_runtime(args, training=False)
    if dev.type == "cuda":                            # as attack.py's main
        torch.backends.cudnn.benchmark = False
    if o.amp is not None:
        args.amp = o.amp and dev.type == "cuda"
    args.compile = o.compile
    model = new_resnet(attack, ctx, head=False)       # a clustering checkpoint's network
    clf = attack.Classifier(model, random_clusters(model, ctx)).to(dev).eval()
    for p in clf.parameters():                        # as read_classifier leaves it
        p.requires_grad_(False)
    fast = clf                                        # attack.py attacks the classifier itself
    cl = layout(fast.model, ctx, True)
    images, b = ctx.test[0], args.batch_size
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bool(args.amp)):
        # labels: the attacked classifier's own predictions, as attack_split computes them
        labels = torch.cat([fast(attack.to_float(images[i:i + b]).contiguous(
            memory_format=torch.channels_last)).argmax(1) for i in range(0, len(images), b)])
    def run(n, **budget):
        return attack.attack_split(clf, images[:n], labels[:n], args, 0.0, "ce", o.seed, **budget)
    k = 8
    per_image = flops_of(lambda: run(k)) / k          # eager: before --compile
    compiled(fast.model, args.compile)
    wb = min(b + b // 2, o.test_images // 2)          # warm-up: a full and a last batch
    warm = {"steps": 2, "restarts": 1}                # the same graphs, 3 iterates per image
    first = timed(lambda: run(wb, **warm), dev)[1]
    second = timed(lambda: run(wb, **warm), dev)[1]
    per_image_s = second / wb / 3 * restarts * (steps + 1)   # the row: restarts x (steps + 1) iterates
    n = ctx.budget.fit(per_image_s, o.test_images, min(args.batch_size, o.test_images))
    robust, seconds = timed(lambda: run(n), dev)
    return {"label": f"PGD-{steps} x {restarts}", "images": n, "seconds": seconds,
            "full_seconds": seconds * ctx.opts.full["test"] / n, "flops": per_image * n,
            "amp": bool(args.amp), "channels_last": cl, "first_call_seconds": first - second,
            "steps": steps, "restarts": restarts,
            "batch_size": args.batch_size, "not_fooled": float(robust.float().mean())}


def row_pgd20(ctx):
    return row_pgd(ctx, *((2, 2) if ctx.opts.tiny else (20, 10)))


def row_pgd100(ctx):
    return row_pgd(ctx, *((4, 2) if ctx.opts.tiny else (100, 10)))


def row_certify(ctx):
    """certify.py's bound: lipschitz_layers (folded and per layer), the test features (fp32,
    eval mode) and certified_radii of Prop. 1 over the stored centres."""
    dev, o = ctx.device, ctx.opts
    args = certify.parse_args(["--device", dev.type, "--seed", str(o.seed)])
    certify.setup_runtime(args, training=False)
    model = new_resnet(certify, ctx, head=False).eval()
    cl = layout(model, ctx, False)
    c = random_clusters(model, ctx)
    mu, mu_class = c["centers"], c["center_classes"]
    b = args.batch_size
    shape = ctx.test[0].shape[1:]

    def radii(n):
        with torch.no_grad():
            for start in range(0, n, b):
                f = model.features(nominal.to_float(ctx.test[0][start:min(n, start + b)])).double()
                certify.certified_radii(f, mu, mu_class, 1.0)

    def bound():
        certify.lipschitz_layers(model, shape, fold=True)
        certify.lipschitz_layers(model, shape, fold=False)
    k = min(b, o.test_images // 2)
    per_image = flops_of(lambda: radii(k)) / k
    first = timed(lambda: radii(k), dev)[1]
    second = timed(lambda: radii(k), dev)[1]
    _, bound_s = timed(bound, dev)
    n = ctx.budget.fit(second / k, o.test_images, k)
    _, radii_s = timed(lambda: radii(n), dev)
    return {"label": "certify bound", "images": n, "seconds": bound_s + radii_s,
            "bound_seconds": bound_s, "radii_seconds": radii_s,
            "full_seconds": bound_s + radii_s * ctx.opts.full["test"] / n, "flops": per_image * n,
            "amp": False, "channels_last": cl, "first_call_seconds": first - second,
            "batch_size": b}


# ======================================================================================
# Report
# ======================================================================================

def device_peaks(device, override):
    """-> ({precision: dense peak TFLOP/s} or None, where it came from)."""
    if override:
        return {"bf16": override, "tf32": override, "fp32": override}, "--peak-tflops"
    if device.type != "cuda":
        return None, f"{device.type}: no table entry"
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAKS:
        if key in name:
            return peaks, f"PEAKS['{key}']" if peaks else f"{name}: no table entry"
    return None, f"{name}: no table entry"


def precision(row, device):
    """The precision the row's convolutions run at (the peak it is compared with)."""
    if row["amp"]:
        return "bf16"
    return "tf32" if device.type == "cuda" and torch.backends.cudnn.allow_tf32 else "fp32"


def finish_row(key, row, ctx):
    row["key"] = key
    row["images_per_second"] = row["images"] / row["seconds"]
    row["tflops"] = row["flops"] / row["seconds"] / 1e12
    row["precision"] = precision(row, ctx.device)
    peak = ctx.peaks[row["precision"]] if ctx.peaks else None
    row["peak_tflops"] = peak
    row["share_of_peak"] = row["tflops"] / peak if peak else None
    row["count"] = COUNTS[key]
    row["pipeline_seconds"] = row["full_seconds"] * COUNTS[key]
    return row


HEADER = (f"{'row':<15} {'images':>7} {'seconds':>9} {'img/s':>9} {'full s':>9} {'TFLOP/s':>8} "
          f"{'% peak':>7} {'first s':>8} {'x':>3} {'pipeline':>9}")


def print_row(row):
    share = "n/a" if row["share_of_peak"] is None else f"{100 * row['share_of_peak']:.1f}"
    print(f"{row['label']:<15} {row['images']:>7} {row['seconds']:>9.3f} {row['images_per_second']:>9.1f} "
          f"{row['full_seconds']:>9.2f} {row['tflops']:>8.4f} {share:>7} "
          f"{row['first_call_seconds']:>8.2f} {row['count']:>3} "
          f"{row['pipeline_seconds']:>9.1f}", flush=True)


def write_json(obj, path):
    """Atomic: a temporary file beside it, then os.replace (a killed run keeps the last rows)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def main(argv=None):
    o = parse_args(argv)
    if o.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        raise SystemExit(2)
    device = torch.device("cuda" if o.device == "cuda" or (o.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    ctx = argparse.Namespace(opts=o, device=device, budget=Budget(o.minutes, len(o.rows)))
    ctx.peaks, peak_source = device_peaks(device, o.peak_tflops)
    ctx.train, ctx.test = random_split(o.train_images, ctx, o.seed), random_split(o.test_images, ctx, o.seed + 1)
    pixels = ctx.train[0][:1000].float().div_(255).transpose(0, 1).reshape(3, -1)
    ctx.mean, ctx.std = pixels.mean(1).tolist(), pixels.std(1).tolist()   # as load_data (App. A)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = {"command": "python benchmarks/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "device": name,
           "torch": torch.__version__, "threads": torch.get_num_threads(),
           "settings": {k: v for k, v in vars(o).items()}, "peaks": ctx.peaks,
           "peak_source": peak_source, "counts": COUNTS, "rows": [], "complete": False}
    print(f"benchmarks/gpu.py | device {name} | torch {torch.__version__} | ResNet18 w={o.width} | "
          f"{o.train_images} train / {o.test_images} test random images (full size {o.full['train']} / "
          f"{o.full['test']}) | compile {o.compile} | budget {o.minutes:g} min | peaks: {peak_source}")
    print(HEADER, flush=True)
    write_json(out, o.out)
    t0 = time.perf_counter()
    for key in o.rows:
        ctx.budget.row_started()
        t_row = time.perf_counter()
        row = finish_row(key, globals()[f"row_{key}"](ctx), ctx)
        row["row_wall_seconds"] = time.perf_counter() - t_row       # set-up, counts, warm-ups too
        out["rows"].append(row)
        print_row(row)
        write_json(out, o.out)
    total = sum(r["pipeline_seconds"] for r in out["rows"])
    out.update(pipeline_seconds=total, wall_seconds=time.perf_counter() - t0, complete=True)
    write_json(out, o.out)
    parts = " + ".join(f"{COUNTS[r['key']]} x {r['label']}" for r in out["rows"])
    print(f"pipeline projected: {total:.1f} s = {total / 60:.2f} min ({parts}, at the full size)\n"
          f"wall time of this call: {out['wall_seconds']:.1f} s; written {o.out}", flush=True)
    return out


if __name__ == "__main__":
    main()
