"""benchmarks/fold_bn.py -- does folding batch norm into the convolutions pay on attack.py's path?

    OMP_NUM_THREADS=1 python benchmarks/fold_bn.py          # ~1 minute on one CPU thread

attack.py's PGD (Eq. (5), the margin loss, 5 steps, 64 random 32x32 images, channels_last) on a
ResNet18 with random weights and random eval-mode batch-norm statistics, against the same network
with batch norm folded into its convolutions (fold_batchnorm of the shared fold-bn block, read from
commit 5492c17, the last that had it: neither stage carries it now); fastest of 3 interleaved runs each, at width 16 (quick CPU runs) and 64 (the paper's).
Issue 22 keeps an optimisation only where a benchmark shows at least 1.3x on the path users run
(benchmarks/README.md, "attack.py without the folded copy").
"""
import os
import subprocess
import sys
import time
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import attack  # noqa: E402
import nominal  # noqa: E402

before = types.ModuleType("certify_5492c17")                 # the fold-bn block as it last was
exec(compile(subprocess.run(["git", "-C", ROOT, "show", "5492c17:certify.py"], capture_output=True, text=True,
                            check=True).stdout, "certify_5492c17.py", "exec"), before.__dict__)

torch.manual_seed(0)
data = {"num_classes": 10, "mean": [0.5] * 3, "std": [0.25] * 3}
for width in (16, 64):
    model = attack.build_model(nominal.arch_entry(width, 3), data, with_head=True)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2)
    clf = attack.Classifier(model).eval().requires_grad_(False).to(memory_format=torch.channels_last)
    folded = before.fold_batchnorm(clf).to(memory_format=torch.channels_last)
    x = torch.rand(64, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = clf(x).argmax(1)
    times = {"batch norm": [], "folded": []}
    for _ in range(3):
        for name, f in (("batch norm", clf), ("folded", folded)):
            t0 = time.time()
            attack.pgd(f, x, y, 8 / 255, 2 / 255, 5, 1, "margin", torch.Generator().manual_seed(0))
            times[name].append(time.time() - t0)
    best = {k: min(v) for k, v in times.items()}
    print(f"width {width}: batch norm {best['batch norm']:.3f} s, folded {best['folded']:.3f} s, "
          f"speed-up {best['batch norm'] / best['folded']:.2f}x", flush=True)
