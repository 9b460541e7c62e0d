"""benchmarks/recompute.py -- how far does rounding move a verdict at the decision boundary?

attack.py recomputes its headline from the saved adversarial images (attack.recompute) and stops
when a recomputed verdict differs from the attack's own bookkeeping by more than rounding can
explain: the example's margin z_y - max_{c != y} z_c at its image must lie within
attack.RECOMPUTE_MARGIN of 0.  This measures what rounding does, to choose that threshold.

For a nominal and a ClusTR model trained here (nominal.py, magnet.py on a generated 4-class 16x16
folder, no download), in fp32 and under bf16 autocast (forced on the CPU as --amp does on CUDA):
attack.py runs its default losses with --save-adv at two batch sizes; then every saved image's
margin is computed in three batch compositions (one image at a time, batches of 7, all at once).
Printed per (model, precision): the largest margin change between compositions (the rounding
noise a batch of other size or content adds), the largest difference between the fp32 and the bf16
margin of the images near the boundary (|margin| < 1: the size of bf16's own rounding, which a GPU's
other kernels for other batch sizes can show), the verdicts that batching flipped, and the
disagreements the recompute counted in attack.py's runs.

    python benchmarks/recompute.py                 # ~3 min on 2 CPU cores
"""

import argparse
import json
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # after ROOT: benchmarks/attack.py is not attack.py
import attack  # noqa: E402
import magnet  # noqa: E402
import nominal  # noqa: E402
from generated import make_image_folder  # noqa: E402


def margins(clf, x, y, batch, amp):
    out = []
    for i in range(0, len(y), batch):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            z = clf(x[i:i + batch]).float()
        yb = y[i:i + batch]
        out.append(z.gather(1, yb[:, None]).squeeze(1) - z.scatter(1, yb[:, None], -float("inf")).amax(1))
    return torch.cat(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=None)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    work = args.workdir or tempfile.mkdtemp(prefix="clustr-recompute-")
    data = make_image_folder(os.path.join(work, "data"), 4, 150, args.images // 4, noise=110.0)
    common = ["--data", "folder", "--data-dir", data, "--width", "8"]
    nom, mag = os.path.join(work, "nominal.pt"), os.path.join(work, "magnet.pt")
    if not os.path.exists(nom):
        nominal.main(common + ["--epochs", "4", "--out", nom, "--lr", "1e-3"])
    if not os.path.exists(mag):
        magnet.main(common + ["--init", nom, "--epochs", "3", "--out", mag, "--m", "4", "--d", "10"])
    setup = attack.setup_runtime
    table = []
    for ckpt in (nom, mag):
        for amp in (False, True):
            attack.setup_runtime = lambda a, training, amp=amp: (setup(a, training), setattr(a, "amp", amp))[0]
            worst, changed, differ, other = 0.0, 0, [], 0.0
            for b in (500, 13):
                adv = os.path.join(work, f"adv-{amp}-{b}.pt")
                res = attack.main(["--ckpt", ckpt, "--steps", str(args.steps), "--eps", "8/255",
                                   "--no-checks", "-b", str(b), "--save-adv", adv,
                                   "--out", os.path.join(work, f"a-{amp}-{b}.json")])
                run = torch.load(adv, weights_only=True)["runs"][0]
                clf, _ = attack.read_classifier(ckpt)
                y = torch.load(adv, weights_only=True)["labels"]
                m = [margins(clf, run["x_adv"], y, k, amp) for k in (1, 7, len(y))]
                worst = max(worst, float(max((m[0] - m[1]).abs().max(), (m[0] - m[2]).abs().max())))
                changed += int(((m[0] > 0) != (m[2] > 0)).sum())
                near = m[2].abs() < 1                                       # near the boundary
                other = max(other, float((margins(clf, run["x_adv"], y, len(y), not amp) - m[2])[near].abs().max()))
                row = next(r for r in res["results"] if r["loss"] == "worst-case")
                differ.append(row["disagreements"])
            table.append({"model": os.path.basename(ckpt), "precision": "bf16" if amp else "fp32",
                          "max_margin_change": worst, "verdicts_changed_by_batching": changed,
                          "max_fp32_bf16_difference_near_boundary": other,
                          "disagreements_b500_b13": differ, "threshold": attack.RECOMPUTE_MARGIN[amp]})
            print(json.dumps(table[-1]), flush=True)
    attack.setup_runtime = setup
    print(f"\n| model | precision | largest margin change across batchings | fp32 vs bf16 (margin < 1) | "
          f"verdicts flipped | disagreements (b 500, 13) | threshold |\n|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['model']} | {r['precision']} | {r['max_margin_change']:.3g} | "
              f"{r['max_fp32_bf16_difference_near_boundary']:.3g} | {r['verdicts_changed_by_batching']} | "
              f"{r['disagreements_b500_b13']} | {r['threshold']} |")


if __name__ == "__main__":
    main()
