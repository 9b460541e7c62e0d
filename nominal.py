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
import io
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
    formatter, table = defaults_table(PAPER_DEFAULTS, "Defaults per --data (App. A; a flag you set wins):")
    p = argparse.ArgumentParser(
        prog="nominal.py",
        description="ClusTR warm start: cross-entropy training of the CIFAR ResNet18 "
                    "(Sec. 3.3, Appendix A). Writes a checkpoint that magnet.py --init takes.",
        epilog=table, formatter_class=formatter)
    add_common_args(p, data_default="cifar10")
    g = p.add_argument_group("nominal training (Appendix A 'Optimization' and 'Pre-processing')")
    g.add_argument("--out", default="ckpt.pt", help="checkpoint path; log goes to <out>.log.jsonl")
    g.add_argument("--epochs", type=positive_int, default=None, help="epochs (>= 1); App. A: 90")
    g.add_argument("--lr", type=parse_lr, default=None, help="Adam learning rate, in (0, 1]; App. A: 1e-2")
    g.add_argument("-b", "--batch-size", type=positive_int, default=None,
                   help="batch size; 256 as in the authors' code (the paper gives none)")
    g.add_argument("--milestones", type=int, nargs="*", default=None,
                   help="epochs after which lr is multiplied by --gamma; App. A: 30 60 for 90 "
                        "epochs; default: epochs//3 and 2*epochs//3 (= 30 60 at 90 epochs), "
                        "leaving out any below 1 and repeats, so the first epoch always trains at "
                        "--lr (--epochs 1: no drop; --epochs 2: one drop, after epoch 1)")
    g.add_argument("--gamma", type=float, default=0.1, help="lr decay factor; App. A: 0.1")
    g.add_argument("--crop", type=int, default=None,
                   help="random crops from a zero padding of this many pixels; App. A: 4 for "
                        "CIFAR10/100, 0 (none) for SVHN; 0 for folder, fashion-mnist, mnist")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips; on for CIFAR as in the authors' code (the paper "
                        "does not mention flips), off for SVHN, folder, fashion-mnist, mnist")
    add_run_args(g)
    args = p.parse_args(argv)
    for key, value in PAPER_DEFAULTS[args.data].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.milestones is None:  # App. A: 30, 60 of 90 -> the same fractions of --epochs;
        # a milestone at 0 would drop lr before the first epoch (epochs 1 gave [0, 0], epochs 2
        # [0, 1]: no epoch at --lr), so milestones below 1 and repeats are left out
        args.milestones = sorted({m for m in (args.epochs // 3, 2 * args.epochs // 3) if m >= 1})
    if not 0 < args.gamma <= 1:                                     # nan fails too
        fail(f"--gamma must be in (0, 1] (lr is multiplied by it at each milestone), not {args.gamma}")
    if not all(1 <= m <= args.epochs for m in args.milestones):
        fail(f"--milestones must lie in [1, --epochs {args.epochs}], not {args.milestones}")
    if args.stop_after is not None and args.stop_after < 1:
        fail(f"--stop-after must be an epoch >= 1, not {args.stop_after}")
    return args


# Arguments that do not change the trained weights: a resume may differ in these.
NOT_SHAPING = {"out", "resume", "stop_after", "slim", "device", "amp", "deterministic", "data_dir",
               "overwrite", "compile"}


# ======================================================================================
# 2. Model (App. A "Architecture"): CIFAR ResNet18, normalisation inside.
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
# 3. The method: cross-entropy with Adam and a step schedule (Sec. 3.3, App. A "Optimization")
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
    t0 = last_note = time.time()
    for start in range(0, n, args.batch_size):
        if time.time() - last_note > 60:  # long epochs (width 64 on a CPU): a note every minute
            last_note, rate = time.time(), start / (time.time() - t0)
            print(f"          {start}/{n} images  {rate:.0f} img/s  epoch ETA "
                  f"{fmt_time((n - start) / rate)}", flush=True)
        idx = perm[start:start + args.batch_size]
        x = to_float(augment(images[idx], args.crop, args.flip, generator))   # [B, C, H, W]
        y = labels[idx]
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
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
        x = to_float(images[start:start + batch_size])
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            correct += (model(x).argmax(1) == labels[start:start + batch_size]).sum()
    model.train(was_training)
    return correct.item() / max(1, len(labels))
# --- end shared: head-eval ---


# ======================================================================================
# 4. The run: data, model, (resume), the epochs of App. A, each saved and logged, the summary
#    (checkpoint and report: README "Where results and checkpoints go")
# ======================================================================================

def main(argv=None):
    """The warm start of Sec. 3.3 as a run.  Ctrl-C / SIGTERM: one line with the resume command,
    exit 130 (`owned`)."""
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    args = parse_args(argv)
    with owned(args, argv, training=True) as run:      # outputs checked, --out locked, before any work
        device = setup_runtime(args, training=True)
        train, test, info = device_data(args, device)
        model, opt, generator = build_training(args, info, info["num_classes"], device)   # with its head
        start, log, t_run = 0, [], time.time()
        if args.resume is not None:
            path = args.resume or args.out
            ckpt = load_checkpoint(path, stages=("nominal",))
            if not any(a.startswith("--mil") for a in argv):       # a longer --epochs keeps the
                args.milestones = ckpt["args"]["milestones"]       # finished epochs' schedule
            info = resume(path, ckpt, args, NOT_SHAPING, run, info, model, opt, generator)
            start, log = ckpt["epoch"], ckpt["log"]
        print(f"nominal.py | data {args.data} ({len(train[1])} train, {len(test[1])} test, {info['num_classes']} "
              f"classes, {info['image_size']}) | ResNet18 w={args.width} | device {device} amp {args.amp} | torch "
              f"{torch.__version__}\nconfig: {json.dumps(vars(args))}\n{'epoch':>9} {'loss':>8} {'train':>7} "
              f"{'test':>7} {'lr':>8} {'img/s':>8} {'elapsed':>9} {'ETA':>9}", flush=True)
        for epoch in range(start, min(args.epochs, args.stop_after or args.epochs)):
            lr = learning_rate(args, epoch)
            for group in opt.param_groups:
                group["lr"] = lr
            t0 = time.time()
            loss_sum, correct, n = train_one_epoch(model, opt, train, args, generator, device)
            train_loss = loss_sum.item() / n
            check_loss(train_loss, epoch, run, f"--lr (now {args.lr})")
            test_acc = evaluate(model, test, args.batch_size, args.amp, device)
            seconds, elapsed = time.time() - t0, time.time() - t_run
            log.append({"epoch": epoch + 1, "train_loss": train_loss, "train_accuracy": correct.item() / n,
                        "test_accuracy": test_acc, "lr": lr, "seconds": seconds, "images_per_second": n / seconds,
                        **compile_seconds()})
            save_epoch(run, "nominal", args, info, model, log, {"optimizer": opt, "generator": generator})
            print(f"{epoch + 1:>4}/{args.epochs:<4} {train_loss:8.4f} {log[-1]['train_accuracy']:7.2%} "
                  f"{test_acc:7.2%} {lr:8.1e} {n / seconds:8.0f} {fmt_time(elapsed):>9} "
                  f"{fmt_time(elapsed / (epoch + 1 - start) * (args.epochs - epoch - 1)):>9}", flush=True)
        return report(args, log, t_run)


def report(args, log, t_run):
    """The summary, beside the paper's accuracies, and the ClusTR command that comes next: magnet.py
    takes --data and --width from --init; the data folder and --limit are passed on."""
    metrics, done = (log or [{}])[-1], len(log) and log[-1]["epoch"]
    status = "finished" if done >= args.epochs else f"stopped after epoch {done} (--resume continues)"
    again = ["python", "magnet.py", "--init", args.out]
    again += ["--data-dir", args.data_dir] if args.data_dir != os.path.abspath("./data") else []
    again += ["--limit", str(args.limit)] if args.limit else []
    print(f"\nsummary: {status}\n"
          f"  test accuracy   {metrics.get('test_accuracy', float('nan')):.2%}  (paper, ResNet18 w=64: "
          f"95.01 CIFAR10, 78.84 CIFAR100, 98.38 SVHN)\n"
          f"  train loss      {metrics.get('train_loss', float('nan')):.4f}\n"
          f"  checkpoint      {args.out}   log {args.out}.log.jsonl\n"
          f"  next            {' '.join(shlex.quote(a) for a in again)}", flush=True)
    return {"stage": "nominal", "out": args.out, "data": args.data, "status": status, "epochs_done": done,
            "epochs": args.epochs, **metrics, "seconds_this_run": time.time() - t_run}


# ======================================================================================
# 5. Copied plumbing (compile, runtime, setup, run-files, data, checkpoints, resume): each block
#    identical in every stage that carries it; checked by test_all.py
# ======================================================================================

# --- shared: compile ---
# --compile (README "Flags"): the network f(x) through torch.compile on every hot path that calls
# it (training steps, feature passes, evaluation, attack.py's forward and input gradients).
COMPILED = {"backend": None}  # --compile's BACKEND of the model compiled last (None: eager)


def add_compile_arg(g):
    g.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND", type=backend,
                   help="f(x) through torch.compile (BACKEND: inductor when none is given; aot_eager: the same "
                        "graphs, no generated code): eager's results up to float rounding. Default: eager")


def backend(name):
    """argparse type of --compile: a backend of torch.compile that needs no other package."""
    if name not in ("inductor", "aot_eager", "eager", "cudagraphs"):
        raise argparse.ArgumentTypeError(f"backend {name!r} is not one of inductor, aot_eager, eager, cudagraphs")
    return name


def compile_features(model, backend):
    """--compile BACKEND: model.features (f(x); forward calls it too, so the head's logits go
    through it) replaced on this instance by its torch.compile form, so that the module, its
    state_dict keys and the checkpoint stay those of eager.  Each kind of call (train or eval
    mode, with or without gradients) compiles at its first call, its backward at the first
    backward, and once more, with a dynamic batch size, at the first other batch size (torch's
    default).  torch._dynamo.reset() first, so that torch's compile timers count this model's
    compiles alone.  backend None: eager, nothing changes."""
    COMPILED["backend"] = backend
    if backend:
        torch._dynamo.reset()                                       # torch's timers: this model's alone
        model.features = torch.compile(model.features, backend=backend)
    return model


def compile_seconds():
    """The log and results entry of --compile ({} without it): the seconds torch's own timers
    recorded for compiling f(x) so far (Dynamo and the backend's forward graphs, and the backward
    graphs, which compile at the first backward)."""
    timers = torch._dynamo.utils.compilation_time_metrics if COMPILED["backend"] else {}  # eager: no Dynamo import
    seconds = sum(sum(timers.get(k, ())) for k in ("_compile.compile_inner", "backward._backward_impl"))
    return {"compile_seconds": round(seconds, 3)} if COMPILED["backend"] else {}
# --- end shared: compile ---


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


# --- shared: train-args ---
def parse_lr(text):
    """argparse type of --lr: a finite number in (0, 1].  Adam moves every weight by about lr per
    step; App. A's rates are 1e-2 and 1e-4, and above 1 the weights only overflow."""
    value = float(text)                     # not a number: argparse says "invalid parse_lr value"
    if not 0 < value <= 1:                                          # nan fails too
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (App. A: 1e-2 nominal, 1e-4 fine-tuning), not {text}")
    return value


def add_run_args(g):
    """The flags of a training run's files (README "Bad input and safety") and --compile."""
    g.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue an interrupted run from PATH (default: --out); refused when the "
                        "arguments that shape the run differ")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out checkpoint and its log; both stay as they are "
                        "until this run saves its first epoch. Without it an existing --out is "
                        "refused (continue it with --resume)")
    g.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop cleanly after epoch N, as if interrupted (for --resume)")
    g.add_argument("--slim", action="store_true",
                   help="drop the resume state (optimizer, RNG, sampler) from the final checkpoint (no "
                        "resume; smaller)")
    add_compile_arg(g)


def defaults_table(defaults, title):
    """(formatter class, epilog block) of a stage's per-dataset defaults {data: {dest: value}}:
    the table its --help prints, one row per --data value, from the dict the run itself applies."""
    keys = list(next(iter(defaults.values())))
    shown = {True: "on", False: "off", None: "all"}
    rows = [["--data"] + ["--" + k.replace("_", "-") for k in keys]]
    rows += [[name] + [shown.get(v, v) if isinstance(v, (bool, type(None))) else f"{v:g}"
                       if isinstance(v, float) else str(v) for v in d.values()] for name, d in defaults.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return type("HelpFormatter", (HelpFormatter,), {"per_data": tuple(keys)}), title + "\n\n" + "\n".join(lines)
# --- end shared: train-args ---


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


# Data (README "Data"): each split is one uint8 tensor [N, C, H, W] held on the device;
# batches are indexed from it and augmented there (no DataLoader in the hot path).

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

# --- shared: train-data ---
def load_data(name, root, limit=None):
    """Both splits plus the `data` entry of the checkpoint (README "Where results and checkpoints go")."""
    train_x, train_y, classes = load_split(name, root, True, limit)
    test_x, test_y, test_classes = load_split(name, root, False, limit)
    if test_classes != classes:
        raise DataError(f"train/ and test/ hold different classes: {classes} vs {test_classes}")
    # App. A "Pre-processing": channel-wise mean/std of the training split, applied inside the
    # model (its first layer) so that inputs and epsilons stay in [0, 1] pixel units.
    pixels = train_x.double().div_(255).transpose(0, 1).reshape(train_x.shape[1], -1)
    info = {"name": name, "num_classes": len(classes), "classes": classes, "mean": pixels.mean(1).tolist(),
            "std": pixels.std(1).tolist(), "image_size": list(train_x.shape[2:])}
    return (train_x, train_y), (test_x, test_y), info


def check_against_data(args, info):
    """The flags the loaded data bounds, one line and exit 2: --crop by the image side, --D by
    the --K x classes centres the run fits."""
    if not 0 <= args.crop <= min(info["image_size"]):
        fail(f"--crop {args.crop} must be in [0, {min(info['image_size'])}] (the image side); App. A pads 4")
    if getattr(args, "D", None) is not None and args.D > args.K * info["num_classes"]:
        fail(f"--D {args.D} exceeds the --K x classes = {args.K * info['num_classes']} centres this "
             f"run fits; give --D at most that")


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
# --- end shared: train-data ---


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

# --- shared: checkpoint-cli ---
def load_checkpoint(path, stages=STAGES):
    """The command-line form of read_checkpoint: a bad file exits with code 2 and its one-line
    message (README "Bad input and safety")."""
    try:
        return read_checkpoint(path, stages)
    except CheckpointError as e:
        fail(str(e))
# --- end shared: checkpoint-cli ---

# --- shared: checkpoint-save ---
def save_checkpoint(ckpt, path, run=None):
    """Atomic write (atomic_write), so an interrupted run always leaves the last complete checkpoint;
    then, for a training stage, <path>.log.jsonl rewritten from the epochs' records the checkpoint holds
    (README "Where results and checkpoints go") and `run` told the epoch it holds.  A model with NaN or
    inf is not written, nor is anything on a failed write (a full disk): one line, exit 2, the previous
    files as they were.  Ctrl-C and SIGTERM wait until the files and `run` agree, then are raised again
    (a signal mask would not do: torch's threads would take the signal)."""
    bad = nonfinite({k: ckpt[k] for k in ("model", "clusters") if k in ckpt})
    if bad:
        fail(f"{bad} holds NaN or inf: training diverged (try a smaller --lr); stopped without "
             f"writing {path}, which keeps its last good epoch")
    caught = []
    try:
        held = {s: signal.signal(s, lambda signum, frame: caught.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:                                              # not the main thread
        held = {}
    try:
        data = io.BytesIO()
        torch.save(ckpt, data)
        atomic_write(path, data.getvalue())
        if "log" in ckpt:
            atomic_write(path + ".log.jsonl", "".join(json_line(r) for r in ckpt["log"]).encode())
        if run is not None:
            run.update(epoch=ckpt["epoch"], file=path)
    except OSError as e:
        fail(f"cannot write {e.filename or path} ({e.strerror or e}); each file is as it was or whole (free "
             f"space or choose another path, then continue with --resume where it is a checkpoint)")
    finally:
        for s, handler in held.items():
            signal.signal(s, handler)
        for s in caught[:1]:
            signal.raise_signal(s)
# --- end shared: checkpoint-save ---

# --- shared: training ---
def load_weights(model, state, path):
    """model.load_state_dict(state, strict=True); a mismatch is one line naming the file (exit 2)."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        fail(f"the weights in {path} do not fit this ResNet18 ({' '.join(str(e).split())[:200]}); not a "
             f"checkpoint of these stages, or a damaged one")


def device_data(args, device):
    """Both splits of --data (README "Data"), checked against the flags they bound, each moved whole
    onto the device."""
    try:
        train, test, info = load_data(args.data, args.data_dir, args.limit)
    except DataError as e:
        fail(str(e))
    check_against_data(args, info)
    return tuple(t.to(device) for t in train), tuple(t.to(device) for t in test), info


def resume(path, ckpt, args, not_shaping, run, info, model, opt, generator):
    """--resume: refuse a run whose run-shaping arguments differ from the stored run's (listing them),
    then weights, optimizer and RNG state from `ckpt`.  --epochs may grow, also past a finished run (as
    timm's resume allows): the epochs already done stay as they were; fewer than it holds is refused.
    -> `info` with the checkpoint's normalisation (the model's buffers)."""
    old, new = ckpt["args"], vars(args)
    if new["epochs"] < ckpt["epoch"]:
        fail(f"cannot resume: the checkpoint already holds {ckpt['epoch']} epochs, more than "
             f"--epochs {new['epochs']}; pass --epochs {ckpt['epoch']} or more")
    if new["epochs"] == ckpt["epoch"] and os.path.abspath(path) != os.path.abspath(args.out):
        fail(f"nothing to train: {path} holds all {ckpt['epoch']} epochs, so --out {args.out} would "
             f"not be written; raise --epochs to continue the run into it")
    diff = [f"--{k.replace('_', '-')}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if k not in not_shaping and k != "epochs" and old.get(k) != new.get(k)]
    if diff:
        fail("cannot resume: arguments that shape the run differ from the checkpoint's: " + "; ".join(diff))
    if "resume" not in ckpt:
        fail(f"{path} was saved with --slim and holds no optimizer/RNG state to resume from")
    load_weights(model, ckpt["model"], path)
    opt.load_state_dict(ckpt["resume"]["optimizer"])
    torch.set_rng_state(ckpt["resume"]["rng"]["torch"])
    if ckpt["resume"]["rng"]["generator_device"] == str(generator.device):
        generator.set_state(ckpt["resume"]["rng"]["generator"])
    else:  # a CPU generator state cannot seed a CUDA generator: the stream changes from here on
        print(f"note: the run moved from {ckpt['resume']['rng']['generator_device']} to {generator.device}; "
              f"its random stream continues from a fresh seed", flush=True)
    if "log" not in ckpt:   # written before the log moved into the checkpoint: its log file's records
        ckpt["log"] = []
        with contextlib.suppress(OSError), open(path + ".log.jsonl") as f:
            for line in f:
                with contextlib.suppress(ValueError):               # a line cut short
                    ckpt["log"] += [r for r in [json.loads(line)] if isinstance(r, dict) and
                                    r.get("epoch", -1) <= ckpt["epoch"]]
        ckpt["log"] = ckpt["log"] or [ckpt["metrics"]]
    run.update(epoch=ckpt["epoch"], file=path)
    print(f"resumed {path} at epoch {ckpt['epoch']}/{args.epochs}")
    return dict(info, mean=ckpt["data"]["mean"], std=ckpt["data"]["std"])


def check_loss(loss, epoch, run, hint):
    """A training loss that became NaN or inf stops the run before the epoch is written: one line."""
    if not math.isfinite(loss):
        fail(f"the training loss became {loss} in epoch {epoch + 1}; stopped without writing it, "
             + (f"so {run['file']} keeps the last good epoch ({epoch})" if run["file"] else
                "so nothing of this run was saved") + f". Try a smaller {hint}.")


def build_training(args, info, num_classes, device, init_state=None):
    """The ResNet18 of App. A "Architecture" (num_classes 0: headless, Sec. 3.3) with --init's weights,
    --compile's f(x), Adam (App. A "Optimization") and the seeded device generator that draws every
    permutation, crop, flip, k-means++ seed and quick adversary of the run."""
    model = ResNet18(num_classes, args.width, len(info["mean"]), info["mean"], info["std"])
    if init_state is not None:
        load_weights(model, init_state, args.init)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    compile_features(model, args.compile)                           # --compile: f(x) compiled in place
    generator = torch.Generator(device=device)
    generator.manual_seed(args.seed)
    return model, torch.optim.Adam(model.parameters(), lr=args.lr), generator


def save_epoch(run, stage, args, info, model, log, state, **entries):
    """The checkpoint of the epoch log[-1] records (README "Where results and checkpoints go"): the
    weights, the run's arguments, the records of every epoch so far (the log is rewritten from them)
    and `entries` (None ones left out); the resume state of `state` ({"optimizer", "generator", "sampler"}:
    the optimizer's, the RNGs', the sampler's unless None) unless --slim and it is the final epoch."""
    ckpt = {"format": FORMAT, "stage": stage, "arch": arch_entry(args.width, model.mean.shape[1]), "data": info,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "args": dict(vars(args)),
            "epoch": log[-1]["epoch"], "metrics": log[-1], "log": log,
            **{k: v for k, v in entries.items() if v is not None}}
    if not (args.slim and ckpt["epoch"] == args.epochs):
        ckpt["resume"] = {"optimizer": state["optimizer"].state_dict(),
                          "rng": {"torch": torch.get_rng_state(), "generator": state["generator"].get_state(),
                                  "generator_device": str(state["generator"].device)},
                          **{k: v.state_dict() for k, v in state.items() if k not in ("optimizer", "generator")
                             and v is not None}}
    save_checkpoint(ckpt, args.out, run)


def arch_entry(width, in_channels):
    return {"name": "resnet18", "width": width, "feat_dim": 8 * width, "in_channels": in_channels}
# --- end shared: training ---



if __name__ == "__main__":
    main()
