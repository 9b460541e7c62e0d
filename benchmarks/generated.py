"""benchmarks/generated.py -- the generated inputs the benchmarks share (no download, no training).

    make_image_folder(root, classes, n_train, n_test, size=16, noise=110.0, seed=0)
        an ImageFolder of PNGs (train/<class>/*.png, test/<class>/*.png): class c is a noisy patch of
        a random colour with a bright quadrant c mod 4, learnable by a small CNN and, at high noise,
        not robust by construction.  The same generator as test_all.py's (which the benchmarks do not
        import: a test file is not a library).
    random_checkpoint(path, stage="magnet", D=None, classes=4, width=4, size=16, seed=0)
        a clustr/1 checkpoint with random weights: random eval-mode batch-norm statistics; for a
        clustering stage K = 2 centres per class near the features of random images and sigma^2 a
        quarter of their feature variance.  Enough to time and to compare scores; says nothing of
        robustness.
"""

import os
import sys

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import attack  # noqa: E402  (build_model, save_checkpoint: the stages' own)
import nominal  # noqa: E402  (arch_entry: the entry a training stage writes)


def make_image_folder(root, classes, n_train, n_test, size=16, noise=110.0, seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    colors = rng.uniform(40, 215, size=(classes, 3))
    for split, n in (("train", n_train), ("test", n_test)):
        for c in range(classes):
            folder = os.path.join(root, split, f"class{c:02d}")
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                img = colors[c] + rng.normal(0, noise, (size, size, 3))
                q = c % 4
                img[(q // 2) * size // 2:(q // 2 + 1) * size // 2,
                    (q % 2) * size // 2:(q % 2 + 1) * size // 2] += 40
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                    os.path.join(folder, f"{i:04d}.png"))
    return root


def random_checkpoint(path, stage="magnet", D=None, classes=4, width=4, size=16, seed=0):
    with torch.random.fork_rng(devices=[]):                         # leaves the global stream as it was
        g = torch.Generator().manual_seed(seed)
        data = {"name": "folder", "num_classes": classes, "classes": [f"class{c:02d}" for c in range(classes)],
                "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "image_size": [size, size]}
        arch = nominal.arch_entry(width, 3)
        head = stage in ("nominal", "qtrades-ce")
        torch.manual_seed(seed)
        model = attack.build_model(arch, data, head)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
        ckpt = {"format": attack.FORMAT, "stage": stage, "arch": arch, "data": data,
                "model": model.state_dict(), "args": {}, "epoch": 0, "metrics": {}}
        if not head:
            with torch.no_grad():
                f = model.eval().features(torch.rand(2 * classes, 3, size, size, generator=g))
            ckpt["clusters"] = {"centers": f + 0.01 * torch.randn(f.shape, generator=g),
                                "center_classes": torch.arange(2 * classes) % classes,
                                "variance": float(f.var(0).sum()) / 4, "K": 2, "alpha": 12.5, "D": D}
        attack.save_checkpoint(ckpt, path)
    return path
