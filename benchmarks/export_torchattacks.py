"""benchmarks/export_torchattacks.py -- the README's export, loaded and attacked in a clean interpreter.

OPTIONAL DEPENDENCY, benchmark only: torchattacks (`pip install torchattacks`; measured with 3.5.1).
attack.py and the tests never import it.

    python benchmarks/export_torchattacks.py --ckpt fm_clustr.pt --limit 100   # a checkpoint of yours
    python benchmarks/export_torchattacks.py                   # a generated 4-class checkpoint, ~1 min

What it does, as a user of the README section "Evaluate a ClusTR model with other tools" would:
  1. runs the README's export command (`python attack.py --ckpt CKPT --export clustr.pt2`) in a
     temporary folder;
  2. starts `python -I` there (isolated: no folder of this repository on sys.path), which loads the
     file with torch alone and runs the README's torchattacks and AutoAttack snippets on the test
     images (given to it as a tensor file), plus PGD-20 and APGD-CE; it fails if it imported any
     file of this repository;
  3. checks the scores it computed against this repository's `attack.load_classifier` (max
     |difference| <= 1e-5), and prints the robust accuracies.
Without --ckpt it generates a 4-class checkpoint with random weights and random test images:
that checks the plumbing, not robustness.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import attack  # noqa: E402
import nominal  # noqa: E402  (load_checkpoint: a bad file exits 2)

CHILD = """
import sys, time, torch, torchattacks
x, y, classes = torch.load("xy.pt")
t0 = time.time()
{torchattacks}
print(f"  ({{time.time() - t0:.1f}} s)", flush=True)
t0 = time.time()
pgd = torchattacks.PGD(model, eps={eps}, alpha=2/255, steps=20, random_start=True)
print(f"PGD-20 robust accuracy: {{(model(pgd(x, y)).argmax(1) == y).float().mean():.1%}}", flush=True)
apgd_ce = torchattacks.APGD(model, norm="Linf", eps={eps}, steps=100, loss="ce")
print(f"APGD-CE robust accuracy: {{(model(apgd_ce(x, y)).argmax(1) == y).float().mean():.1%}}", flush=True)
print(f"  ({{time.time() - t0:.1f}} s)", flush=True)
t0 = time.time()
{autoattack}
print(f"  ({{time.time() - t0:.1f}} s)", flush=True)
with torch.no_grad():
    torch.save(model(x), "z.pt")
print(f"natural accuracy: {{(torch.load('z.pt').argmax(1) == y).float().mean():.1%}}")
assert not any(name in sys.modules for name in ("attack", "certify")), "the repository was imported"
"""


def readme_snippets():
    """The snippets of README.md and of benchmarks/README.md ("Other tools: more snippets")."""
    text = "".join(open(os.path.join(ROOT, f)).read() for f in ("README.md", os.path.join("benchmarks", "README.md")))
    return dict(re.findall(r"<!-- snippet: (\w+) -->\n```\w+\n(.*?)```", text, re.S))


def test_images(ckpt_path, args):
    """(x in [0, 1], y, classes): the checkpoint's own test split, or random images for a
    generated checkpoint."""
    ckpt = nominal.load_checkpoint(ckpt_path)
    info = ckpt["data"]
    if args.ckpt is None:
        g = torch.Generator().manual_seed(0)
        x = torch.rand(args.limit, ckpt["arch"]["in_channels"], *info["image_size"], generator=g)
        with torch.no_grad():
            y = attack.load_classifier(ckpt_path)(x).argmax(1)     # labels: its own predictions
        return x, y, info["classes"]
    data_dir = args.data_dir or ckpt["args"].get("data_dir") or "./data"
    images, y, classes = attack.load_split(info["name"], data_dir, False, args.limit)
    return attack.to_float(images), y, classes


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default=None, help="a clustr/1 checkpoint; default: a generated one")
    p.add_argument("--data-dir", default=None, help="its test split (default: the folder it was trained on)")
    p.add_argument("--limit", type=int, default=100, help="test images")
    p.add_argument("--eps", default="8/255", help="L-inf radius, pixel units of [0, 1] images")
    args = p.parse_args()
    snippets = readme_snippets()
    with tempfile.TemporaryDirectory() as folder:
        ckpt = os.path.abspath(args.ckpt) if args.ckpt else os.path.join(folder, "magnet.pt")
        if args.ckpt is None:
            from generated import random_checkpoint                      # random weights, 4 classes
            random_checkpoint(ckpt, D=3)
        x, y, classes = test_images(ckpt, args)
        torch.save((x, y, classes), os.path.join(folder, "xy.pt"))
        command = snippets["export"].split("#")[0].split()
        command = [sys.executable, os.path.join(ROOT, "attack.py"), "--ckpt", ckpt] + command[4:]
        t0 = time.time()
        out = subprocess.run(command, cwd=folder, capture_output=True, text=True)
        print(f"$ python attack.py --ckpt {os.path.basename(ckpt)} {' '.join(command[4:])}   "
              f"({time.time() - t0:.1f} s)\n{out.stdout.splitlines()[0] if out.stdout else out.stderr}")
        if out.returncode:
            raise SystemExit(out.stderr)
        child = CHILD.format(torchattacks=snippets["torchattacks"], autoattack=snippets["autoattack"],
                             eps=args.eps)
        print(f"$ python -I (torch {torch.__version__}, torchattacks; no file of this repository): "
              f"{len(x)} test images, eps {args.eps}", flush=True)
        run = subprocess.run([sys.executable, "-I", "-c", child], cwd=folder, text=True)
        if run.returncode:
            raise SystemExit(f"the clean interpreter failed (exit code {run.returncode})")
        z = torch.load(os.path.join(folder, "z.pt"))
        with torch.no_grad():
            want = attack.load_classifier(ckpt)(x)
        diff = (z - want).abs().max().item()
        print(f"exported scores vs attack.load_classifier: max |difference| {diff:.1e} "
              f"({'ok' if diff <= 1e-5 else 'FAILED'}, tolerance 1e-5)")
        if not diff <= 1e-5:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
