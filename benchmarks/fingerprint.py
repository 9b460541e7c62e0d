"""benchmarks/fingerprint.py -- are two versions of the repository's results bit-identical?

Runs the whole pipeline of a checkout on fixed seeds at toy scale, on a generated 3-class 16x16
folder (no download): nominal.py, magnet.py, qtrades.py (both variants), attack.py (its default
losses and checks, the checks on all 30 images), certify.py and synthetic.py, each as a user runs
it (a subprocess in a work folder).  Then prints one SHA-256 per output: every tensor of each checkpoint (weights, clusters,
sampler and RNG state) and every number of each results JSON, with the entries that hold times,
paths, the command line or how files are written (--overwrite) left out.  Two checkouts whose
printed fingerprints are equal produced the same bits.  A restructuring that must not change behaviour (moved code, renamed variables)
is checked this way:

    python benchmarks/fingerprint.py --repo . --work /tmp/fp-after  > after.txt
    git worktree add /tmp/before <commit> && python benchmarks/fingerprint.py --repo /tmp/before \\
        --work /tmp/fp-before > before.txt && diff before.txt after.txt

Needs torch, torchvision, numpy and PIL (as the stages); takes about two minutes on 2 CPU cores.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generated import make_image_folder  # noqa: E402  (benchmarks/generated.py, this checkout's)

SKIP = ("time", "seconds", "second", "per_second", "elapsed", "eta", "date", "argv", "command",
        "path", "ckpt", "init", "out", "overwrite", "data_dir", "plot", "log", "host", "torch", "python", "cwd", "next")


def tensors(obj, prefix=""):
    """(name, tensor or number) of every leaf of a checkpoint, in a fixed order."""
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            if not any(word in str(k).lower() for word in SKIP):
                yield from tensors(obj[k], f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{prefix}/{i}")
    else:
        yield prefix, obj


def digest(items):
    h = hashlib.sha256()
    for name, v in items:
        h.update(name.encode())
        if isinstance(v, torch.Tensor):
            h.update(str(v.dtype).encode() + str(list(v.shape)).encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
        else:
            h.update(repr(v).encode())
    return h.hexdigest()[:16]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--repo", default=".", help="the checkout whose stage files run")
    p.add_argument("--work", required=True, help="an empty or new folder for the runs")
    args = p.parse_args()
    repo, work = os.path.abspath(args.repo), os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    folder = os.path.join(work, "folder")
    if not os.path.isdir(folder):
        make_image_folder(folder, classes=3, n_train=60, n_test=30, noise=60.0)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    data = ["--data", "folder", "--data-dir", folder]
    runs = [
        ("nominal.py", data + ["--width", "4", "--epochs", "2", "-b", "32", "--out", "n.pt"], "n.pt"),
        ("magnet.py", data + ["--init", "n.pt", "--epochs", "2", "--m", "3", "--d", "10", "--crop", "2",
                              "--flip", "--out", "m.pt"], "m.pt"),
        ("qtrades.py", data + ["--init", "n.pt", "--loss", "magnet", "--epochs", "1", "--m", "3", "--d", "10",
                               "--out", "qm.pt"], "qm.pt"),
        ("qtrades.py", data + ["--init", "n.pt", "--loss", "ce", "--epochs", "1", "--m", "3", "--d", "10",
                               "--out", "qc.pt"], "qc.pt"),
        ("attack.py", ["--ckpt", "m.pt", "--data-dir", folder, "--limit", "30", "--steps", "5",
                       "--square-queries", "20", "--check-images", "30", "--out", "a.json"], "a.json"),
        ("attack.py", ["--ckpt", "n.pt", "--data-dir", folder, "--limit", "30", "--steps", "5",
                       "--square-queries", "20", "--check-images", "30", "--out", "an.json"], "an.json"),
        ("certify.py", ["--ckpt", "m.pt", "--data-dir", folder, "--limit", "30", "--attack-limit", "10",
                        "--out", "c.json", "--plot", "none"], "c.json"),
        ("synthetic.py", ["--steps", "20", "--seeds", "1", "--n", "40", "--datasets", "moons",
                          "--plot", "none", "--out", "s.json"], "s.json"),
    ]
    for script, argv, out in runs:
        for stale in (out, out + ".log.jsonl"):
            if os.path.exists(os.path.join(work, stale)):
                os.remove(os.path.join(work, stale))
        proc = subprocess.run([sys.executable, os.path.join(repo, script), *argv], cwd=work, env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{script} {' '.join(argv)}: exit {proc.returncode}\n{proc.stderr[-2000:]}", file=sys.stderr)
            sys.exit(1)
        path = os.path.join(work, out)
        if out.endswith(".pt"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            with open(path) as f:
                obj = json.load(f)
        print(f"{script:<13} {out:<8} {digest(tensors(obj))}", flush=True)


if __name__ == "__main__":
    main()
