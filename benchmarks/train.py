"""benchmarks/train.py -- images/s of nominal training: nominal.py's design against the
conventional torchvision pipeline, on the same model, batch size and (random, CIFAR-shaped) data.

  design       the whole split as one uint8 tensor on the device; each batch indexed from it and
               augmented as tensor ops (nominal.augment: crops from 4-pixel zero padding + flips)
  dataloader   torch.utils.data.DataLoader over a dataset that, like torchvision.datasets.CIFAR10,
               turns each uint8 HWC array into a PIL image and applies
               transforms.Compose([RandomCrop(32, padding=4), RandomHorizontalFlip(), ToTensor()]);
               --workers worker processes (0 = in the main process)

Two measurements per pipeline: the data alone (batches produced per second), and whole training
steps (augmentation + forward + backward + Adam step).  Random data: timing only, no accuracy.

    python benchmarks/train.py                          # width 16, batch 256, 2 CPU threads
    python benchmarks/train.py --width 64 --steps 5     # the paper's width (slow on a CPU)
    python benchmarks/train.py --device cuda --width 64 --steps 50 --images 50000   # a GPU epoch

Needs torch, torchvision, numpy; imports nominal.py from the folder above (benchmarks may).
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import nominal  # noqa: E402


class PILDataset(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10.__getitem__ does: array -> PIL image -> transform."""

    def __init__(self, images_hwc, labels, transform):
        self.images, self.labels, self.transform = images_hwc, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def design_batches(images, labels, batch_size, device, generator):
    """nominal.py's pipeline: index the device-resident uint8 split, augment on the device."""
    while True:
        perm = torch.randperm(len(labels), device=device, generator=generator)
        for start in range(0, len(labels) - batch_size + 1, batch_size):
            idx = perm[start:start + batch_size]
            yield nominal.to_float(nominal.augment(images[idx], 4, True, generator)), labels[idx]


def loader_batches(images, labels, batch_size, workers, device):
    import torchvision.transforms as T
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])
    ds = PILDataset(images.permute(0, 2, 3, 1).numpy(), labels.numpy(), transform)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, persistent_workers=workers > 0,
                                         pin_memory=device.type == "cuda")
    while True:
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def timed(batches, steps, warmup, step_fn, device):
    """Images/s over `steps` batches after `warmup` untimed ones."""
    for _ in range(warmup):
        step_fn(*next(batches))
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, n = time.perf_counter(), 0
    for _ in range(steps):
        x, y = next(batches)
        step_fn(x, y)
        n += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("-b", "--batch-size", type=int, default=256)
    p.add_argument("--images", type=int, default=5120, help="random CIFAR-shaped training images")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per pipeline")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="alternating timings; the best is kept")
    p.add_argument("--workers", type=int, nargs="*", default=[0, 2],
                   help="DataLoader worker counts to try (the best is compared)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast + channels_last (CUDA)")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (args.images,))

    model = nominal.ResNet18(10, args.width).to(device)
    if args.amp:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def train_step(x, y):
        if args.amp:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def data_only(x, y):
        pass

    data_steps = max(args.steps, 20)
    rows = []
    resident = (images.to(device), labels.to(device))
    # Each pipeline is timed --repeats times, alternating, and its best figure kept, so that
    # neither gains from running first or last on a machine whose load varies.
    for kind, steps, fn in (("data only", data_steps, data_only), ("training", args.steps, train_step)):
        best = {}
        for _ in range(args.repeats):
            key = ("design", 0)
            best[key] = max(best.get(key, 0), timed(
                design_batches(*resident, args.batch_size, device, g), steps, args.warmup, fn, device))
            for w in args.workers:
                key = ("dataloader", w)
                best[key] = max(best.get(key, 0), timed(
                    loader_batches(images, labels, args.batch_size, w, device), steps, args.warmup,
                    fn, device))
        rows += [{"pipeline": k[0], "measure": kind, "workers": k[1], "images_per_second": v}
                 for k, v in best.items()]
    print(f"benchmarks/train.py | ResNet18 w={args.width} batch {args.batch_size} | {device} "
          f"threads {args.threads} amp {args.amp} | torch {torch.__version__} | {os.cpu_count()} CPUs")
    print(f"{'measure':<10} {'pipeline':<11} {'workers':>7} {'img/s':>10}")
    for r in rows:
        print(f"{r['measure']:<10} {r['pipeline']:<11} {r['workers']:>7} {r['images_per_second']:>10.0f}")
    summary = {}
    for kind in ("data only", "training"):
        ours = next(r["images_per_second"] for r in rows if r["measure"] == kind and r["pipeline"] == "design")
        best = max(r["images_per_second"] for r in rows if r["measure"] == kind and r["pipeline"] == "dataloader")
        summary[kind] = ours / best
        print(f"{kind}: design / best DataLoader = {ours / best:.2f}x")
    result = {"args": vars(args), "torch": torch.__version__, "rows": rows, "speedup": summary}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
