"""nominal.py -- ClusTR stage 1: the cross-entropy "warm start" (Alfarra, Perez et al., BMVC 2021).

Paper: "Rethinking Clustering for Robustness", Sec. 3.3 (warm start), Sec. 4.2 (setup),
Appendix A ("Architecture", "Optimization", "Pre-processing").

ClusTR first trains a CIFAR-style ResNet18 with plain cross-entropy "until reasonable
performance" (footnote 1: 90% CIFAR10, 75% CIFAR100, 90% SVHN), then magnet.py removes the
last linear layer and fine-tunes the 8w-dimensional features with the Magnet loss.  This file is
that first stage: Adam, lr 1e-2, x0.1 at epochs 30 and 60, 90 epochs (Appendix A), batch 256
(the authors' code), random 32x32 crops from 4-pixel padding for CIFAR (Appendix A) plus the
horizontal flip of the authors' code, no augmentation for SVHN.

Usage (copy-paste):
    python nominal.py --data cifar10                      # the paper's setting -> ckpt.pt
    python nominal.py --data cifar100 --out c100.pt
    python nominal.py --data svhn --out svhn.pt
    python nominal.py --data folder --data-dir DIR        # DIR/train/<class>/*.png, DIR/test/...
    python nominal.py --data cifar10 --width 16 --limit 512 --epochs 3   # quick CPU smoke run
    python nominal.py --data cifar10 --stop-after 10      # ... interrupted after epoch 10
    python nominal.py --data cifar10 --resume             # ... continues from ckpt.pt

Reads: the dataset (torchvision download into --data-dir, or an ImageFolder).
Writes: --out (a self-describing checkpoint, format "clustr/1", rewritten atomically after every
epoch; load it with torch.load(path, weights_only=True)) and <out>.log.jsonl (one JSON object per
epoch).  Needs torch, torchvision, numpy (scipy for SVHN); imports no other file of this
repository: copy it freely.  Blocks between "# --- shared: NAME ---" markers are identical copies
of the same blocks in the other stages (test_all.py checks this).

Lineage: ResNet18 (He et al. 2016, CIFAR variant); Adam (Kingma & Ba 2014).
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

# Paper defaults per dataset, applied only to flags the user left unset.
#   epochs, lr, milestones, gamma: Appendix A "Optimization" (Adam, 1e-2, x0.1 at 30 and 60, 90 ep.)
#   batch_size 256: the authors' code (the paper gives none).
#   crop 4: Appendix A "Pre-processing" (random 32x32 crops, padding 4) for CIFAR; none for SVHN.
#   flip: the authors' code flips CIFAR horizontally (the paper does not mention it).
PAPER_DEFAULTS = {
    "cifar10": dict(epochs=90, lr=1e-2, batch_size=256, crop=4, flip=True),
    "cifar100": dict(epochs=90, lr=1e-2, batch_size=256, crop=4, flip=True),
    "svhn": dict(epochs=90, lr=1e-2, batch_size=256, crop=0, flip=False),
    "folder": dict(epochs=90, lr=1e-2, batch_size=256, crop=0, flip=False),
    # Not in the paper: 28x28 grey digits/clothes; CIFAR10's optimisation, no crop or flip.
    "fashion-mnist": dict(epochs=90, lr=1e-2, batch_size=256, crop=0, flip=False),
    "mnist": dict(epochs=90, lr=1e-2, batch_size=256, crop=0, flip=False),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="nominal.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="ClusTR warm start: cross-entropy training of the CIFAR ResNet18 "
                    "(Sec. 3.3, Appendix A). Writes a checkpoint that magnet.py --init takes.",
        epilog=f"Defaults per --data (App. A), for the flags left unset (None above): {PAPER_DEFAULTS}")
    add_common_args(p, data="cifar10", width=64, data_dir="./data")
    g = p.add_argument_group("nominal training (Appendix A 'Optimization' and 'Pre-processing')")
    g.add_argument("--out", default="ckpt.pt", help="checkpoint path; log goes to <out>.log.jsonl")
    g.add_argument("--epochs", type=number(int, 1), help="epochs; App. A: 90")
    g.add_argument("--lr", type=number(float, 0, 1, open_low=True), help="Adam learning rate; App. A: 1e-2")
    g.add_argument("-b", "--batch-size", type=number(int, 1), help="256 as in the authors' code (the paper: none)")
    g.add_argument("--milestones", type=number(int, 1), nargs="*",
                   help="epochs after which lr is multiplied by --gamma; App. A: 30 60 of 90 epochs; "
                        "None: epochs//3 and 2*epochs//3, those below 1 and repeats left out")
    g.add_argument("--gamma", type=number(float, 0, 1, open_low=True), default=0.1, help="lr decay; App. A: 0.1")
    g.add_argument("--crop", type=number(int, 0), help="random crops from a zero padding of this many pixels; "
                   "App. A: 4 for CIFAR10/100, 0 (none) for SVHN; 0 for folder, fashion-mnist, mnist")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, help="random horizontal flips; on for "
                   "CIFAR as in the authors' code (the paper does not mention flips), off for the others")
    add_run_args(g)
    args = p.parse_args(argv)
    for key, value in PAPER_DEFAULTS[args.data].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.milestones is None:  # App. A: 30, 60 of 90 -> the same fractions of --epochs; a milestone
        # at 0 would drop lr before the first epoch, so milestones below 1 and repeats are left out
        args.milestones = sorted({m for m in (args.epochs // 3, 2 * args.epochs // 3) if m >= 1})
    if max(args.milestones, default=0) > args.epochs:
        p.error(f"--milestones must lie in [1, --epochs {args.epochs}], not {args.milestones}")
    return args


# Arguments that do not change the trained weights: a resume may differ in these.
NOT_SHAPING = {"out", "resume", "stop_after", "slim", "device", "amp", "deterministic", "data_dir",
               "overwrite", "compile"}


# ======================================================================================
# 2. The method: cross-entropy with Adam and a step schedule (Sec. 3.3, App. A "Optimization")
# ======================================================================================

def learning_rate(args, epoch):
    """App. A: lr 1e-2, multiplied by 0.1 after epochs 30 and 60. `epoch` counts finished ones."""
    return args.lr * args.gamma ** sum(epoch >= m for m in args.milestones)


def train_one_epoch(model, opt, train, args, generator, device):
    """One pass over a fresh permutation of the training split; returns device tensors
    (sum of losses, correct count, images) so the epoch needs one host sync, at its end."""
    images, labels = train
    model.train()
    n = len(labels)
    perm = torch.randperm(n, device=device, generator=generator)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for start in range(0, n, args.batch_size):
        idx = perm[start:start + args.batch_size]
        x = to_float(augment(images[idx], args.crop, args.flip, generator))   # [B, C, H, W]
        y = labels[idx]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            logits = model(x)                                        # [B, classes]
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.detach() * len(idx)
        correct += (logits.argmax(1) == y).sum()
    return loss_sum, correct, n


# --- shared: head-eval ---
@torch.no_grad()
def evaluate(model, split, batch_size, amp, device):
    """Accuracy of the linear head in eval mode.  Batch-norm buffers are left untouched: README
    "Where this differs from the paper and the authors' code", "Consistent clusters"."""
    images, labels = split
    was_training = model.training
    model.eval()
    correct = torch.zeros((), device=device, dtype=torch.long)
    for start in range(0, len(labels), batch_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            correct += (model(to_float(images[start:start + batch_size])).argmax(1)
                        == labels[start:start + batch_size]).sum()
    model.train(was_training)
    return correct.item() / max(1, len(labels))
# --- end shared: head-eval ---


# ======================================================================================
# 3. The run: data, model, (resume), the epochs of App. A, each saved and logged, the summary
#    (checkpoint and report: README "Where results and checkpoints go")
# ======================================================================================

def main(argv=None):
    """The warm start of Sec. 3.3 as a run (README "Bad input and safety" for what it refuses)."""
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    args = parse_args(argv)
    device = setup_runtime(args, training=True)
    with claimed(args, outputs=[("--out", args.out)], inputs=[]):
        train, test, info = device_data(args, device)
        model, opt, generator = build_training(args, info, info["num_classes"], device)   # with its head
        start, log, saved, t_run = 0, [], None, time.time()
        if args.resume is not None:
            ckpt = read_checkpoint(args.resume or args.out, stages=("nominal",))
            if not any(a.startswith("--mil") for a in argv):       # a longer --epochs keeps the
                args.milestones = ckpt["args"]["milestones"]       # finished epochs' schedule
            info, saved = resume(ckpt, args, NOT_SHAPING, info, model, opt, generator)
            start, log = ckpt["epoch"], ckpt["log"]
        check_forward(model.eval(), train[0], args.resume is not None and (args.resume or args.out))
        print(f"nominal.py | data {args.data} ({len(train[1])} train, {len(test[1])} test, {info['num_classes']} "
              f"classes, {info['image_size']}) | ResNet18 w={args.width} | device {device} amp {args.amp} | torch "
              f"{torch.__version__}\nconfig: {json.dumps(vars(args))}\n{'epoch':>9} {'loss':>8} {'train':>7} "
              f"{'test':>7} {'lr':>8} {'img/s':>8} {'elapsed':>9} {'ETA':>9}", flush=True)
        try:
            for epoch in range(start, min(args.epochs, args.stop_after or args.epochs)):
                lr = learning_rate(args, epoch)
                for group in opt.param_groups:
                    group["lr"] = lr
                t0 = time.time()
                loss_sum, correct, n = train_one_epoch(model, opt, train, args, generator, device)
                test_acc = evaluate(model, test, args.batch_size, args.amp, device)
                seconds, elapsed = time.time() - t0, time.time() - t_run
                log.append({"epoch": epoch + 1, "train_loss": loss_sum.item() / n, "train_accuracy": correct.item() / n,
                            "test_accuracy": test_acc, "lr": lr, "seconds": seconds, "images_per_second": n / seconds})
                saved = save_epoch("nominal", args, info, model, log, {"optimizer": opt, "generator": generator})
                print(f"{epoch + 1:>4}/{args.epochs:<4} {log[-1]['train_loss']:8.4f} {log[-1]['train_accuracy']:7.2%} "
                      f"{test_acc:7.2%} {lr:8.1e} {n / seconds:8.0f} {fmt_time(elapsed):>9} "
                      f"{fmt_time(elapsed / (epoch + 1 - start) * (args.epochs - epoch - 1)):>9}", flush=True)
        except KeyboardInterrupt:
            raise stopped(args.out, saved) from None
        return report(args, log, t_run)


def report(args, log, t_run):
    """The summary, beside the paper's accuracies, and the ClusTR command that comes next: magnet.py
    takes --data, --width and the data folder from --init; --limit is passed on."""
    metrics, done = (log or [{}])[-1], len(log) and log[-1]["epoch"]
    status = "finished" if done >= args.epochs else f"stopped after epoch {done} (--resume continues)"
    print(f"\nsummary: {status}\n"
          f"  test accuracy   {metrics.get('test_accuracy', float('nan')):.2%}  (paper, ResNet18 w=64: "
          f"95.01 CIFAR10, 78.84 CIFAR100, 98.38 SVHN)\n"
          f"  train loss      {metrics.get('train_loss', float('nan')):.4f}\n"
          f"  checkpoint      {args.out}   log {args.out}.log.jsonl\n"
          f"  next            python magnet.py --init {args.out}{f' --limit {args.limit}' if args.limit else ''}",
          flush=True)
    return {"stage": "nominal", "out": args.out, "data": args.data, "status": status, "epochs_done": done,
            "epochs": args.epochs, **metrics, "seconds_this_run": time.time() - t_run}


# ======================================================================================
# 4. Copied plumbing (model, command line, files, data, checkpoints, training runs): each block
#    identical in every stage that carries it; checked by test_all.py
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


# --- shared: train-data ---
def load_data(name, root, limit=None):
    """Both splits plus the `data` entry of the checkpoint (README "Where results and checkpoints go")."""
    try:
        (train_x, train_y, classes), (test_x, test_y, test_classes) = (
            load_split(name, root, train, limit) for train in (True, False))
    except Exception as e:      # missing, not downloadable, unreadable, truncated, images of two sizes
        raise BadInput(f"cannot read --data {name} from {os.path.abspath(root)}: {type(e).__name__}: {e} "
                       f"(README \"Data\" says where the files go)") from None
    if test_classes != classes or train_x.shape[1:] != test_x.shape[1:] or len(train_x) != len(train_y) \
            or len(test_x) != len(test_y) or max(train_y.max(), test_y.max()) >= len(classes):
        raise BadInput(f"--data {name} in {root}: train and test differ in classes or image size, images and "
                       f"labels in number, or a label lies outside the {len(classes)} classes")
    # App. A "Pre-processing": channel-wise mean/std of the training split, applied inside the
    # model (its first layer) so that inputs and epsilons stay in [0, 1] pixel units.
    pixels = train_x.double().div_(255).transpose(0, 1).reshape(train_x.shape[1], -1)
    info = {"name": name, "num_classes": len(classes), "classes": classes, "mean": pixels.mean(1).tolist(),
            "std": pixels.std(1).tolist(), "image_size": list(train_x.shape[2:])}
    return (train_x, train_y), (test_x, test_y), info
# --- end shared: train-data ---


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


# --- shared: train-run ---
def add_run_args(g):
    """The flags of a training run's files (README "Bad input and safety") and --compile."""
    g.add_argument("--resume", nargs="?", const="", metavar="PATH", help="continue the run in PATH (none: --out)")
    g.add_argument("--overwrite", action="store_true", help="replace --out (kept until the first epoch is saved)")
    g.add_argument("--stop-after", type=number(int, 1), metavar="N", help="stop after epoch N, as if interrupted")
    g.add_argument("--slim", action="store_true", help="no resume state in the final checkpoint (smaller)")
    g.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   choices=["inductor", "aot_eager", "eager", "cudagraphs"],
                   help="f(x) through torch.compile with BACKEND (inductor when none is given); None: eager")


def device_data(args, device):
    """Both splits of --data (README "Data"), each moved whole onto the device; --crop within the image."""
    train, test, info = load_data(args.data, args.data_dir, args.limit)
    if args.crop > min(info["image_size"]):
        raise BadInput(f"--crop {args.crop} exceeds the image side {min(info['image_size'])}; App. A pads 4")
    return tuple(t.to(device) for t in train), tuple(t.to(device) for t in test), info


def build_training(args, info, num_classes, device, init_state=None):
    """The ResNet18 of App. A "Architecture" (num_classes 0: headless, Sec. 3.3) with --init's weights,
    --compile's f(x), Adam (App. A "Optimization") and the seeded device generator that draws every
    permutation, crop, flip, k-means++ seed and quick adversary of the run."""
    model = ResNet18(num_classes, args.width, len(info["mean"]), info["mean"], info["std"])
    try:
        model.load_state_dict(init_state or model.state_dict(), strict=True)
    except RuntimeError as e:
        raise BadInput(f"the weights in {args.init} do not fit: {' '.join(str(e).split())[:300]}") from None
    model = model.to(device)
    if args.compile:    # f(x) compiled on this instance: the module and its state_dict keys stay eager's
        model.features = torch.compile(model.features, backend=args.compile)
    generator = torch.Generator(device=device)
    generator.manual_seed(args.seed)
    return model, torch.optim.Adam(model.parameters(), lr=args.lr), generator


def resume(ckpt, args, not_shaping, info, model, opt, generator):
    """--resume: refused where an argument that shapes the run differs from the stored run's, or
    --epochs is below the epochs it holds (it may grow); then weights, optimizer and RNG states.
    -> (`info` with the checkpoint's normalisation (the model's buffers), the epoch --out holds or None)."""
    old = ckpt["args"]
    diff = sorted(k for k in set(old) | set(vars(args)) if k not in not_shaping | {"epochs"}
                  and old.get(k) != getattr(args, k, None))
    if diff or args.epochs < ckpt["epoch"] or "resume" not in ckpt or args.epochs == ckpt["epoch"] \
            and os.path.realpath(args.resume or args.out) != os.path.realpath(args.out):   # nothing would be written
        raise BadInput(f"cannot resume {args.resume or args.out} (epoch {ckpt['epoch']}, --slim {'resume' not in ckpt})"
                       f" with --epochs {args.epochs}; it was run with {[(k, old.get(k)) for k in diff]}")
    model.load_state_dict(ckpt["model"], strict=True)
    opt.load_state_dict(ckpt["resume"]["optimizer"])
    torch.set_rng_state(ckpt["resume"]["rng"]["torch"])
    generator.set_state(ckpt["resume"]["rng"]["generator"])
    print(f"resumed {args.resume or args.out} at epoch {ckpt['epoch']}/{args.epochs}")
    saved = ckpt["epoch"] if os.path.realpath(args.resume or args.out) == os.path.realpath(args.out) else None
    return dict(info, mean=ckpt["data"]["mean"], std=ckpt["data"]["std"]), saved   # saved: the epoch --out holds


def save_epoch(stage, args, info, model, log, state, **entries):
    """The checkpoint of the epoch log[-1] records (README "Where results and checkpoints go"): the
    weights, the run's arguments, the records of every epoch so far (<out>.log.jsonl is rewritten from
    them) and `entries` (None ones left out); the resume state of `state` ({"optimizer", "generator",
    "sampler"}) unless --slim and it is the final epoch.  A model with NaN or inf is not written: the
    file keeps its last good epoch.  -> the epoch saved."""
    ckpt = {"format": FORMAT, "stage": stage, "arch": {"name": "resnet18", "width": args.width, "feat_dim":
            8 * args.width, "in_channels": model.mean.shape[1]}, "data": info,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "args": dict(vars(args)),
            "epoch": log[-1]["epoch"], "metrics": log[-1], "log": log,
            **{k: v for k, v in entries.items() if v is not None}}
    if not (args.slim and ckpt["epoch"] == args.epochs):
        ckpt["resume"] = {"optimizer": state["optimizer"].state_dict(),
                          "rng": {"torch": torch.get_rng_state(), "generator": state["generator"].get_state(),
                                  "generator_device": str(state["generator"].device)},
                          **{k: v.state_dict() for k, v in state.items() if k not in ("optimizer", "generator")}}
    if not finite({"model": ckpt["model"], "clusters": ckpt.get("clusters"), "loss": log[-1]["train_loss"] or 0.}):
        raise BadInput(f"training diverged in epoch {ckpt['epoch']} (NaN or inf): {args.out} keeps its last "
                       f"good epoch; try a smaller --lr")
    write_file(args.out, lambda tmp: torch.save(ckpt, tmp))
    write_file(args.out + ".log.jsonl", lambda tmp: open(tmp, "w").write("".join(json.dumps(r) + "\n" for r in log)))
    return ckpt["epoch"]


def stopped(out, saved):
    """The KeyboardInterrupt (Ctrl-C, SIGTERM) a training loop raises again: what --out holds."""
    return KeyboardInterrupt(f"{out} holds epoch {saved}; continue with --resume" if saved is not None else
                             f"no epoch of this run was saved in {out}")


def augment(x, crop, flip, generator):
    """App. A: random HxW crops from a `crop`-pixel zero padding, plus optional horizontal flips,
    for a whole uint8 batch [B, C, H, W] at once, on its device; randomness from `generator`."""
    B, _, H, W = x.shape
    if crop > 0:
        off = torch.randint(0, 2 * crop + 1, (2, B), device=x.device, generator=generator)
        windows = F.pad(x, (crop,) * 4).unfold(2, H, 1).unfold(3, W, 1)    # [B, C, 2p+1, 2p+1, H, W], zeros
        x = windows[torch.arange(B, device=x.device), :, off[0], off[1]]   # [B, C, H, W]
    if flip:
        mirror = torch.rand(B, device=x.device, generator=generator) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    return x
# --- end shared: train-run ---



if __name__ == "__main__":
    guarded(main)()
