"""benchmarks/mutate.py -- does the test suite notice when a piece of a stage is broken?

A mutation pass over the stages: each mutant below is one small semantic edit of the
kind a reviewer (or a hurried refactor) makes -- a loop line deleted, an argument swapped, a
default of Appendix A changed.  Each is applied to a fresh temporary copy of the repository
(the working files are never touched), and `python -m pytest test_all.py -x -q` runs there:
the mutant is *killed* when some test fails, and *survives* when the whole suite passes.
A survivor is either a missing test or an equivalent mutant (an edit that changes no behaviour
a user can observe); mutants known to be equivalent say why in their `equivalent` field and do
not count in the kill rate.

To save time each mutant first runs the `wiring` tier alone (the instrumented training runs,
~20 s), or for attack.py, certify.py and the plumbing the tests named after them (its `first` -k
expression), and only when that passes the whole suite; the verdict is the same as one full run.
A mutant of a shared block is applied to every file that carries the block (`carriers`; --check
refuses one that is not), so the shared-block identity test cannot be what kills it.

    python benchmarks/mutate.py                  # every mutant, ~1-1.5 h on 2 busy cores
    python benchmarks/mutate.py --only 3 17      # some of them (numbers as in the table)
    python benchmarks/mutate.py --check          # only verify that every snippet occurs once
    python benchmarks/mutate.py --out table.md   # also write the Markdown table there

Needs what the suite needs (torch, torchvision, numpy, pytest); run it with the interpreter of
the environment the suite runs in (sys.executable is used for pytest).
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("nominal.py", "magnet.py", "qtrades.py", "attack.py", "certify.py", "synthetic.py")
BLOCK = re.compile(r"^# --- shared: (\S+) ---\n.*?^# --- end shared: \1 ---\n", re.M | re.S)


def blocks(name):
    """{shared block: (start, end)} of one stage file."""
    with open(os.path.join(ROOT, name)) as f:
        return {b.group(1): b.span() for b in BLOCK.finditer(f.read())}


def carriers(block):
    """The stage files that carry a shared block: a mutant of it is applied to every copy, so the
    shared-block identity test cannot be what kills it (check() verifies this for every mutant)."""
    return tuple(name for name in STAGES if block in blocks(name))


SHARED = carriers("kmeans")               # magnet.py, qtrades.py: k-means++, the sampler, the cluster update


def M(files, original, mutant, what, equivalent=None, first=None):
    """first: a pytest -k expression run before the whole suite (default: the wiring tier)."""
    return {"files": (files,) if isinstance(files, str) else files, "original": original,
            "mutant": mutant, "what": what, "equivalent": equivalent, "first": first}


# The evaluation's mutants first run the tests named after the evaluation stages; the plumbing's
# the contract table (bad input), --overwrite, signals, the loaders, resume and load_classifier.
ATTACK = "attack or square or target or check or cascade or pgd or per_loss or export or recomput"
CERTIFY = "certify or radius or radii or lipschitz or l2_attack or curve or prop1"
FAULTS = ("bad_input or overwrite or signal or loader or resume_refuses or finished_run_extends or "
          "load_classifier or export_refuses")


MUTANTS = [
    # ---------------------------------------------------------------- nominal.py (App. A)
    M("nominal.py", "x = to_float(augment(images[idx], args.crop, args.flip, generator))",
      "x = to_float(augment(images[idx], args.crop, False, generator))", "nominal ignores --flip"),
    M("nominal.py", "x = to_float(augment(images[idx], args.crop, args.flip, generator))",
      "x = to_float(images[idx])", "nominal trains without augmentation"),
    M("nominal.py", "        opt.zero_grad(set_to_none=True)\n", "",
      "nominal: no zero_grad (gradients accumulate over steps)"),
    M(carriers("train-run"), "torch.optim.Adam(model.parameters(), lr=args.lr), generator",
      "torch.optim.SGD(model.parameters(), lr=args.lr), generator", "nominal: SGD instead of Adam"),
    M("nominal.py", "sum(epoch >= m for m in args.milestones)",
      "sum(epoch > m for m in args.milestones)", "nominal: lr drops one epoch late"),
    M("nominal.py", "return args.lr * args.gamma ** sum(", "return args.lr * 0.1 ** sum(",
      "nominal: --gamma ignored"),
    M("nominal.py", '            group["lr"] = lr\n', '            group["lr"] = args.lr\n',
      "nominal: the schedule never reaches the optimizer"),
    M("nominal.py",
      "args.milestones = sorted({m for m in (args.epochs // 3, 2 * args.epochs // 3) if m >= 1})",
      "args.milestones = [args.epochs // 3, 2 * args.epochs // 3]",
      "nominal: the old default milestones ([0, 0] at 1 epoch: never at --lr)"),
    M("nominal.py", "perm = torch.randperm(n, device=device, generator=generator)",
      "perm = torch.arange(n, device=device)", "nominal: batches never shuffled"),
    M("nominal.py", "        y = labels[idx]\n", "        y = labels[perm[:len(idx)]]\n",
      "nominal: labels of other rows"),
    M("nominal.py", '"svhn": dict(epochs=90, lr=1e-2, batch_size=256, crop=0, flip=False)',
      '"svhn": dict(epochs=90, lr=1e-2, batch_size=256, crop=4, flip=False)',
      "nominal: App. A default changed (SVHN crops)"),
    M("nominal.py", "loss_sum += loss.detach() * len(idx)", "loss_sum += loss.detach()",
      "nominal: logged train loss not weighted by batch size"),
    M("nominal.py", "test_acc = evaluate(model, test, args.batch_size, args.amp, device)",
      "test_acc = evaluate(model, train, args.batch_size, args.amp, device)",
      "nominal: 'test' accuracy measured on the training split"),
    # ---------------------------------------------------------------- magnet.py (Eq. (3), App. A)
    M("magnet.py", "        sampler.record(idx, per)                                        # Rippel",
      "        pass  # sampler.record(idx, per)                                # Rippel",
      "magnet: per-example losses never reach the sampler"),
    M("magnet.py", "        sampler.record(idx, per)                                        # Rippel",
      "        sampler.record(idx.flip(0), per)                                # Rippel",
      "magnet: losses recorded at the wrong rows"),
    M(carriers("cluster-update"), "    sampler.set_clusters(assignment, centers, classes)\n",
      "    if epoch == 0:\n        sampler.set_clusters(assignment, centers, classes)\n",
      "magnet: the sampler keeps the epoch-0 clusters forever"),
    M("magnet.py", "x = to_float(augment(train[0][idx.to(device)], args.crop, args.flip, generator))",
      "x = to_float(train[0][idx.to(device)])", "magnet trains without augmentation"),
    M("magnet.py", "magnet_loss(f, ids.to(device), sampler.center_classes[ids].to(device), args.alpha)",
      "magnet_loss(f, ids.to(device), sampler.center_classes[ids].to(device), 0.0)",
      "magnet: alpha is 0 inside the loop"),
    M("magnet.py", "magnet_loss(f, ids.to(device), sampler.center_classes[ids].to(device), args.alpha)",
      "magnet_loss(f, sampler.center_classes[ids].to(device), sampler.center_classes[ids].to(device), args.alpha)",
      "magnet: the loss sees one cluster per class instead of the sampled clusters"),
    M("magnet.py", '"svhn": dict(epochs=30, lr=1e-4, alpha=13.0, crop=0, flip=False)',
      '"svhn": dict(epochs=30, lr=1e-4, alpha=12.5, crop=0, flip=False)',
      "magnet: App. A default changed (SVHN alpha)"),
    M("magnet.py", "sampler = NeighbourhoodSampler(len(train[1]), args.m, args.d,",
      "sampler = NeighbourhoodSampler(len(train[1]), args.d, args.m,", "magnet: m and d swapped"),
    M("magnet.py", "        opt.zero_grad(set_to_none=True)\n", "", "magnet: no zero_grad"),
    M(carriers("cluster-update"), "(cluster_log_probs(f, centers, classes, sigma2, args.D).argmax(1) == y)",
      "(cluster_log_probs(f, centers, classes, sigma2, None).argmax(1) == y)",
      "magnet: --D ignored in the Eq. (4) accuracies"),
    M("magnet.py", "loss_sum + float(sampler.losses[idx].sum())", "loss_sum + float(sampler.losses[idx].mean())",
      "magnet: logged train loss wrong"),
    M("magnet.py", "    for _ in range(sampler.batches_per_epoch()):\n",
      "    for _ in range(sampler.batches_per_epoch() - 1):\n", "magnet: one batch per epoch too few"),
    M("magnet.py", "    model.train()\n    loss_sum, seen = 0.0, 0\n", "    loss_sum, seen = 0.0, 0\n",
      "magnet: train_one_epoch does not set train mode (features_of leaves the model in eval mode)"),
    # ---------------------------------------------------------------- shared blocks (every copy)
    M(carriers("cluster-update"), "fit_clusters(features, train[1], info[\"num_classes\"], args.K, generator)",
      "fit_clusters(features, train[1], info[\"num_classes\"], 2, generator)", "k-means: --K ignored (always 2)"),
    M(SHARED, "        mu, a = kmeans_pp(x, K, iters, generator)",
      "        mu, a = kmeans_pp(x, K, iters)", "k-means++ without the run's generator"),
    M(carriers("cluster-update"), "for x in (train[0], test[0]))",
      "for x in (augment(train[0], args.crop, args.flip, generator), test[0]))", "k-means on augmented images"),
    M(SHARED, "        self.losses[rows.cpu()] = losses.detach().float().cpu()",
      "        self.losses[rows.cpu()] = losses.detach().float().cpu().flip(0)",
      "sampler stores each loss at another row"),
    M(carriers("sampler"), "w = torch.where(count > 0, mean, mean[count > 0].mean())",
      "w = torch.where(count > 0, mean, 0.0)", "sampler: never-drawn clusters never seeded"),
    M(carriers("sampler"), "        return math.ceil(len(self.losses) / (self.m * self.d))",
      "        return len(self.losses) // (self.m * self.d)", "sampler: epoch rounds down"),
    # ---------------------------------------------------------------- qtrades.py (Eq. (6), Sec. 4.2)
    M("qtrades.py", "x_adv = craft(model, x, eq4, args, generator)", "x_adv = x",
      "ClusTR+QTRADES with no adversary"),
    M("qtrades.py", "*eq4, args.lam, args.consistency)", "*eq4, 0.0, args.consistency)",
      "ClusTR+QTRADES with lambda = 0"),
    M("qtrades.py", "log_probs(clean), args.eps, args.step, generator)", "log_probs(clean), args.eps, args.eps, generator)",
      "QTRADES: the step equals eps"),
    M("qtrades.py", "x_adv = craft(model, x, eq4, args, generator)",
      "x_adv = x if eq4 is None else craft(model, x, eq4, args, generator)",
      "QTRADES alone uses x as its own adversary"),
    M("qtrades.py", "qtrades_ce_loss(out, out_adv, labels[idx], args.lam, args.consistency)",
      "qtrades_ce_loss(out, out_adv, labels[idx], 0.0, args.consistency)", "QTRADES alone with lambda = 0"),
    M("qtrades.py", "        x_adv = x_start + step * grad.sign()",
      "        x_adv = x_start - step * grad.sign()", "QTRADES: descent instead of ascent"),
    M("qtrades.py", "            sampler.record(idx, per_example)        # Rippel",
      "            sampler.record(idx, per_example + args.lam * cons)  # Rippel",
      "ClusTR+QTRADES: the sampler ranks Eq. (6) totals, not Magnet losses"),
    M("qtrades.py", "nearest_mask(clean, clusters[0], clusters[3])", "nearest_mask(clean, clusters[0], None)",
      "QTRADES: the adversary ignores D"),
    M("qtrades.py", "qtrades_magnet_loss(out, out_adv, cluster_ids,", "qtrades_magnet_loss(out, out, cluster_ids,",
      "ClusTR+QTRADES: the adversarial features are the clean ones"),
    M("qtrades.py", '"svhn": dict(epochs=30, lr=1e-4, alpha=10.0, lam=9.7,',
      '"svhn": dict(epochs=30, lr=1e-4, alpha=10.0, lam=8.0,', "qtrades: App. A default changed (SVHN lambda)"),
    M("qtrades.py", '"cifar100": dict(epochs=60, lr=1e-4, alpha=8.5, lam=2.0, D=20,',
      '"cifar100": dict(epochs=60, lr=1e-4, alpha=8.5, lam=2.0, D="all",',
      "qtrades: Sec. 4.2 default changed (CIFAR100 D = 20)"),
    M("qtrades.py", 'g.add_argument("--step", type=number(float, 0, 1), default="10/255",',
      'g.add_argument("--step", type=number(float, 0, 1), default="8/255",', "qtrades: default step changed"),
    M("qtrades.py", "    (log-softmax of the head).  The clean target p(f(x)) is the eval-mode one, held constant.\"\"\"\n    model.eval()\n",
      "    (log-softmax of the head).  The clean target p(f(x)) is the eval-mode one, held constant.\"\"\"\n",
      "QTRADES: the adversary is crafted in train mode"),
    M("qtrades.py", "        clusters, metrics = cluster_and_evaluate(model, train, test, info, sampler, args, generator, epoch)",
      "        clusters, metrics = cluster_and_evaluate(model, train, test, info, sampler, args, generator, 0)",
      "ClusTR+QTRADES: every epoch's record says epoch 0"),
    M("qtrades.py", "                clusters, record = run_epoch(model, opt, train, test, info, sampler, clusters, args, generator, device,\n"
                    "                                             epoch)\n",
      "                new, record = run_epoch(model, opt, train, test, info, sampler, clusters, args, generator, device,\n"
      "                                        epoch)\n                clusters = clusters or new\n",
      "ClusTR+QTRADES: Eq. (6) keeps the epoch-0 centres"),
    M("qtrades.py", "qtrades_ce_loss(out, out_adv, labels[idx],", "qtrades_ce_loss(out, out, labels[idx],",
      "QTRADES alone: the adversarial logits are the clean ones"),
    M("qtrades.py", "x = to_float(augment(images[idx.to(device)], args.crop, args.flip, generator))",
      "x = to_float(augment(images[idx.to(device)], args.crop, args.flip, generator) if sampler else "
      "images[idx.to(device)])", "QTRADES alone trains without augmentation"),
    M("qtrades.py", "x = to_float(augment(images[idx.to(device)], args.crop, args.flip, generator))",
      "x = to_float(augment(images[idx.to(device)], args.crop, args.flip and sampler is None, generator))",
      "ClusTR+QTRADES ignores --flip"),
    M("qtrades.py", "torch.randperm(len(labels), device=device, generator=generator), args.m * args.d",
      "torch.arange(len(labels), device=device), args.m * args.d", "QTRADES alone: batches never shuffled"),
    M("qtrades.py", "        opt.zero_grad(set_to_none=True)\n",
      "        if sampler is None:\n            opt.zero_grad(set_to_none=True)\n", "ClusTR+QTRADES: no zero_grad"),
    M(carriers("cluster-update"), "for x in (train[0], test[0]))", "for x in (train[0], train[0][:len(test[0])]))",
      "magnet: 'test' accuracy from the training images"),
    M("qtrades.py", "clusters, metrics = cluster_and_evaluate(model, train, test, info, sampler",
      "clusters, metrics = cluster_and_evaluate(model, train, train, info, sampler",
      "ClusTR+QTRADES: 'test' accuracy from the training images"),
    M("qtrades.py", '"test_accuracy": evaluate(\n            model, test, args.batch_size',
      '"test_accuracy": evaluate(\n            model, train, args.batch_size',
      "QTRADES alone: 'test' accuracy on the training split"),
    # ---------------------------------------------------------------- attack.py (issue 21)
    # (attack.py's mutants go here)
    # (retargeted in issue 22, where attack.py's cascade and --per-loss became one loop, run_losses)
    M("attack.py", "if args.per_loss else worst.nonzero().squeeze(1)", "if True else worst.nonzero().squeeze(1)",
      "cascade: every loss attacks every example (rows count the wrong images)", first=ATTACK),
    M("attack.py", "        fooled_by[idx[first & natural[idx]]] = i\n", "        fooled_by[idx[first]] = i\n",
      "cascade: clean-misclassified examples counted as fooled by the first loss", first=ATTACK),
    M("attack.py", "        fooled_by[idx[first & natural[idx]]] = i\n",
      "        fooled_by[idx[first & natural[idx]]] = min(i + 1, len(losses) - 1)\n",
      "cascade: fooled_by names the next loss", first=ATTACK),
    M("attack.py", "        adv[idx[first]] = part[first]\n", "        adv[idx[~first]] = part[~first]\n",
      "cascade: the survivors' images kept instead of the fooling ones", first=ATTACK),
    M("attack.py", '"attacked": len(idx),', '"attacked": len(labels),',
      "cascade: a row's attacked count is every image", first=ATTACK),
    M("attack.py", "first = worst[idx] & ~robust", "first = ~robust",
      "--per-loss: fooled_by names the last loss that fooled, not the first", first=ATTACK),
    M("attack.py", "        adv[idx[first]] = part[first]\n", "        adv[idx[~robust]] = part[~robust]\n",
      "--per-loss: the worst case keeps the last fooling loss's image", first=ATTACK),
    M("attack.py", "seen[idx], disagree = recompute(clf, part, images[idx]",
      "seen[idx], disagree = recompute(clf, adv[idx], images[idx]",
      "--per-loss: a loss's row recomputed from the worst-case images", first=ATTACK),
    M("attack.py", '"robust": robust.tolist(),', '"robust": natural[D].tolist(),',
      "per-example 'robust' is clean accuracy", first=ATTACK),
    M("attack.py", 'adv_runs.append({"eps": eps, "D": D, "x_adv": adv.cpu()',
      'adv_runs.append({"eps": eps, "D": D, "x_adv": to_float(images).cpu()',
      "--save-adv writes the clean images", first=ATTACK),
    M("attack.py", "    if excess > 1e-6 or unexplained:\n", "    if unexplained:\n",
      "recompute: an image outside the ball or [0, 1] passes", first=ATTACK),
    M("attack.py", "(margin <= RECOMPUTE_MARGIN[bool(args.amp)])",
      "(margin <= 10 * RECOMPUTE_MARGIN[bool(args.amp)])",
      "recompute: ten times the rounding allowance", first=ATTACK),
    M("attack.py", "    if int(differ.sum()) > max(2, len(labels) // 200):\n",
      "    if int(differ.sum()) > max(3, len(labels) // 200):\n",
      "recompute: one more disagreement allowed", first=ATTACK),
    M("attack.py", "z.gather(1, y[:, None]).squeeze(1) - z.scatter(1, y[:, None], -math.inf).amax(1)",
      "z.gather(1, y[:, None]).squeeze(1) - z.amax(1)",
      "recompute: the margin's rival includes the true class", first=ATTACK),
    M("attack.py", "better = (m_new < m_k) | fooled", "better = (m_new <= m_k) | fooled",
      "square: a query that ties the margin is accepted", first=ATTACK),
    M("attack.py", "m_k, lm_k = torch.where(better, m_new, m_k), torch.where(better, lm_new, lm_k)",
      "lm_k = torch.where(better, lm_new, lm_k)",
      "square: the margin of an accepted query is not kept", first=ATTACK),
    M("attack.py", "for hi in (H - side + 1, W - side + 1))", "for hi in (H - side, W - side + 1))",
      "square: windows never reach the last rows", first=ATTACK),
    M("attack.py", "(rows >= r) & (rows < r + side)", "(rows >= r) & (rows <= r + side)",
      "square: windows one row too tall", first=ATTACK),
    M("attack.py", "drawn = torch.where(window[same], x0[same] + eps * (sign * 2 - 1).to(xk.dtype), xk[same])",
      "drawn = torch.where(window[same], xk[same] + eps * (sign * 2 - 1).to(xk.dtype), xk[same])",
      "square: new values are moves from the current point, not vertices", first=ATTACK),
    M("attack.py", "    x_adv[idx], margin[idx] = xk, lm_k                                      # survivors",
      "    margin[idx] = lm_k                                                      # survivors",
      "square: survivors keep the clean image", first=ATTACK),
    M("attack.py", "ranked = rank_targets(class_scores(clf, x), y)", "ranked = rank_targets(clf(x), y)",
      "targets ranked on the D-masked scores", first=ATTACK),
    M("attack.py", "runs = [ranked[:, t] for t in range(min(targets",
      "runs = [ranked[:, 0] for t in range(min(targets",
      "margin-t attacks the top target every run", first=ATTACK),
    M("attack.py", "order = scores.sort(dim=1, descending=True, stable=True).indices",
      "order = scores.sort(dim=1, descending=False, stable=True).indices",
      "targets: least likely first", first=ATTACK),
    M("attack.py", 'checks["robust_le_natural"] = {"ok": bad == 0,', 'checks["robust_le_natural"] = {"ok": bad <= 1,',
      "check robust_le_natural lets one example through", first=ATTACK),
    M("attack.py", '"ok": max(rises) <= tol if rises else None,', '"ok": max(rises) <= tol + 0.01 if rises else None,',
      "check monotone_in_eps: one point more allowed", first=ATTACK),
    M("attack.py", '"ok": t["rose"] / t["runs"] > 0.5 if t["runs"] else None,',
      '"ok": t["rose"] / t["runs"] >= 0.5 if t["runs"] else None,',
      "check objective_rises passes at exactly half", first=ATTACK),
    M("attack.py", '"ok": worst_share <= tol, "share_fooled_by_square_only"',
      '"ok": worst_share <= 2 * tol, "share_fooled_by_square_only"',
      "check square_finds_little: twice the tolerance", first=ATTACK),
    M("attack.py", '{"ok": share(large) <= 0.05, "eps": args.large_eps,',
      '{"ok": share(large) <= 0.1, "eps": args.large_eps,',
      "check near_zero_at_large_eps allows 10%", first=ATTACK),
    M("attack.py", '{"ok": a < r or random_only == 0, "eps": eps,',
      '{"ok": True, "eps": eps,', "check beats_random_search cannot fail", first=ATTACK),
    M("attack.py", 'checks[name] = {"ok": drop <= args.tolerance,', 'checks[name] = {"ok": True,',
      "checks double_steps and double_restarts cannot fail", first=ATTACK),
    M("attack.py", '{"ok": bool(torch.equal(at0, clean)), "images": len(y),',
      '{"ok": True, "images": len(y),', "check eps_zero_is_natural cannot fail", first=ATTACK),
    M("attack.py", "    if not worst <= 1e-5:\n", "    if not worst <= 1e-3:\n",
      "--export: the reloaded file may differ by 1e-3", first=ATTACK),
    M("attack.py", '"D": scores.D if scores.clusters else None, "checkpoint"', '"D": None, "checkpoint"',
      "--export: the note never names D", first=ATTACK),

    # ---------------------------------------------------------------- certify.py (issue 21)
    # (certify.py's mutants go here)
    M("certify.py", 'key: float((correct & (radius > r)).double().mean())}',
      'key: float((correct & (radius >= r)).double().mean())}',
      "certify: the curve counts radius >= r, not > r (Sec. 4.1)", first=CERTIFY),
    M("certify.py", 'key: float((correct & (radius > r)).double().mean())}',
      'key: float((correct & (radius > r)).double().sum() / max(1, int(correct.sum())))}',
      "certify: the curve's share is of the correct images, not of all images", first=CERTIFY),
    M("certify.py", "grid = [top * i / (points - 1) for i in range(points - 1)] + [top]",
      "grid = [top * i / (points - 1) for i in range(points)] + [top]",
      "certify: the curve has --grid + 1 radii (the last one twice)", first=CERTIFY),
    M("certify.py", "grid = [top * i / (points - 1) for i in range(points - 1)] + [top]",
      "grid = [top * i / points for i in range(points - 1)] + [top]",
      "certify: the curve's radii are not evenly spaced (a gap before the last)", first=CERTIFY),
    M("certify.py", "    ok = correct & torch.isfinite(radius)\n",
      "    ok = torch.isfinite(radius)\n",
      "certify: the curve runs to the largest radius of any image, not of a correct one", first=CERTIFY),
    M("certify.py", "+ [top] if top > 0 else [0.0]", "+ [top] if top > 0 else []",
      "certify: no curve at all when no correct image has a radius above 0", first=CERTIFY),
    M("certify.py", '"curve_tight": accuracy_curve(r["tight"], correct, args.grid, share)',
      '"curve_tight": accuracy_curve(r["radius"], correct, args.grid, share)',
      "certify: curve_tight built from the sound radius R(x)", first=CERTIFY),
    M("certify.py", 'accuracy_curve(r["two_closest"], correct, args.grid, "two_closest_not_sound")',
      'accuracy_curve(r["tight"], correct, args.grid, "two_closest_not_sound")',
      "certify: curve_two_closest built from the best same-class radius", first=CERTIFY),
    M("certify.py", 'accuracy_curve(pert, correct[:m], args.grid, "attacked_accuracy")',
      'accuracy_curve(pert, correct[-m:], args.grid, "attacked_accuracy")',
      "certify: the attacked curve pairs each perturbation with another image's correctness", first=CERTIFY),
    M("certify.py", 'inside, med_r_m = int((pert < r["radius"][:m]).sum())',
      'inside, med_r_m = int((pert < r["radius"][-m:]).sum())',
      "certify: flipped-inside compares each perturbation with another image's radius", first=CERTIFY),
    M("certify.py", '"two_closest_differs": int((r["two_closest"] > r["radius"]).sum())',
      '"two_closest_differs": int((r["two_closest"] >= r["radius"]).sum())',
      "certify: two_closest_differs counts the images where the radii are equal too", first=CERTIFY),
    M("certify.py", '"tight_exceeds_sound": int((r["tight"] > r["radius"]).sum())',
      '"tight_exceeds_sound": int((r["tight"] > r["two_closest"]).sum())',
      "certify: tight_exceeds_sound compares with the two-closest radius", first=CERTIFY),
    M("certify.py", 'float(r["tight"][correct].median()) if len(ok_r)',
      'float(r["tight"].median()) if len(ok_r)',
      "certify: median_correct_tight over every image, not the correct ones", first=CERTIFY),
    M("certify.py", "med_r * L / lower_estimate", "med_r * lower_estimate / L",
      "certify: the radius if L were the lower estimate scales the wrong way", first=CERTIFY),
    M("certify.py", 'float(r["radius"][:m].median())', 'float(r["radius"].median())',
      "certify: gap_median_ratio divides by the median radius of every image, not the attacked ones",
      first=CERTIFY),
    M("certify.py", "return torch.cat(pert), float(torch.cat(lower).max())",
      "return torch.cat(pert), float(torch.cat(lower).min())",
      "certify: the lower estimate of L is the smallest Jacobian norm, not the largest", first=CERTIFY),
    M("certify.py", "for x in map(to_float, images[:m].split(args.batch_size)):",
      "for x in map(to_float, images[:math.ceil(m / args.batch_size) * args.batch_size].split(args.batch_size)):",
      "certify: the last attack chunk runs past --attack-limit", first=CERTIFY),
    M("certify.py", "x_adv[hit[better]] = z[better]", "x_adv[hit][better] = z[better]",
      "certify: the bisection's smaller examples are written to a copy (x_adv not updated)",
      first=CERTIFY),
    M("certify.py", "better = adv & (dist < best[hit])", "better = adv",
      "certify: the bisection keeps its last flip, not the smallest", first=CERTIFY,
      equivalent="each bisection point lies below every earlier flip on its ray (hi only falls, "
                 "from top), and ||clamp(x + s d, 0, 1) - x|| never decreases with s (per "
                 "coordinate, also in float rounding), so a later flip is never farther: the "
                 "test dist < best fails only at the same point"),
    M("certify.py", "hi, lo = torch.where(adv, s, hi), torch.where(adv, lo, s)",
      "hi, lo = torch.where(adv, s, hi), lo",
      "certify: the bisection never raises its lower bound", first=CERTIFY),
    M("certify.py", "eps = torch.where(adv, torch.minimum(eps * (1 - gamma), best),",
      "eps = torch.where(adv, eps * (1 - gamma),",
      "certify: an adversarial step does not cap the radius at the best norm found", first=CERTIFY),
    M("certify.py", "m = sq.masked_fill(~same, math.inf).min(1).values - sq.masked_fill(same, math.inf).min(1).values",
      "m = sq.masked_fill(same, math.inf).min(1).values - sq.masked_fill(~same, math.inf).min(1).values",
      "certify: the L2 search's margin sign flipped (it climbs towards its own class)", first=CERTIFY),
    M("certify.py", 'for p in results["curve"][::args.grid // 4 or 1])',
      'for p in results["curve_tight"][::args.grid // 4 or 1])',
      "certify: the summary's certified-accuracy table prints the tight curve", first=CERTIFY),
    M("certify.py", '"flipped": int(torch.isfinite(pert).sum()), "flipped_inside',
      '"flipped": int((pert > 0).sum()), "flipped_inside',
      "certify: flipped counts the images where the attack found nothing (inf)", first=CERTIFY),
    M("certify.py", '"lower_estimate_images": m,', '"lower_estimate_images": n,',
      "certify: lower_estimate_images says every test image", first=CERTIFY),
    M("certify.py", 'scale = lip["value"] / (lip["lower_estimate"] or lip["value"])',
      'scale = (lip["lower_estimate"] or lip["value"]) / lip["value"]',
      "certify: the plot scales R(x) to the lower estimate of L the wrong way", first=CERTIFY),
    # ---------------------------------------------------------------- faults (issue 23): every stage's copy
    M(carriers("files"), "if real in reads - {resumed} | {w[2] for w in written[:i]}", "if real in {w[2] for w in written[:i]}",
      "claimed: an output may be a file the run reads", first=FAULTS),
    M(carriers("checkpoint"), '    if not finite({"model": ckpt["model"], "clusters": ckpt.get("clusters")}):\n',
      "    if False:\n", "read_checkpoint: NaN weights load", first=FAULTS),
    M(carriers("train-run"), '    if not finite({"model": ckpt["model"], "clusters": ckpt.get("clusters"), "loss":',
      '    if False and finite({"model": ckpt["model"], "clusters": ckpt.get("clusters"), "loss":',
      "save_epoch: a model with NaN is written (no finite check)", first=FAULTS),
    M(carriers("train-data"), " or max(train_y.max(), test_y.max()) >= len(classes):", ":",
      "load_data: labels outside the classes accepted", first=FAULTS),
    M("certify.py", "sound = not inside and L >= lower_estimate and (not given or L >= bound)",
      "sound = not inside and (not given or L >= bound)",
      "certify: an L below the lower estimate still gives certificates", first=CERTIFY),
    M(carriers("files"), "            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)\n", "            pass\n",
      "claimed: the lock of --out is never taken (two runs on one --out)", first=FAULTS),
    M("attack.py", "                m = torch.minimum(m, (sq[:, clf.D] - sq[:, clf.D - 1]) / (2 * clf.sigma2))\n",
      "                pass\n", "recompute: a D-masked flip at the D-th centre counts as beyond rounding",
      first=ATTACK),
    # ---------------------------------------------------------------- issue 22: the lean plumbing
    M(carriers("files"), "        if os.path.exists(path) and not args.overwrite and real != resumed:\n",
      "        if False:\n", "claimed: an existing output is replaced without --overwrite", first=FAULTS),
    M(carriers("train-run"), 'f"{out} holds epoch {saved}; continue with --resume" if',
      'f"{out} holds epoch {saved}" if', "stopped: the interrupt line does not say --resume continues",
      first="signal or interrupt"),
    M("nominal.py", '                saved = save_epoch("nominal",', '                save_epoch("nominal",',
      "nominal: the interrupt line never learns the saved epoch", first="signal or interrupt"),
    M(carriers("train-run"), '    write_file(args.out + ".log.jsonl", lambda tmp:',
      '    (lambda *a: None)(args.out + ".log.jsonl", lambda tmp:',
      "save_epoch: the training log is never written", first="tiny_training or resume or overwrite"),
    M(carriers("train-run"), "    opt.load_state_dict(ckpt[\"resume\"][\"optimizer\"])\n", "",
      "resume: Adam's moments start from zero", first="bit_identical"),
    M(carriers("train-run"), "    generator.set_state(ckpt[\"resume\"][\"rng\"][\"generator\"])\n", "",
      "resume: the device generator restarts from the seed", first="bit_identical"),
    M(carriers("train-run"), ', "loss": log[-1]["train_loss"] or 0.}):', "}):",
      "save_epoch: an epoch whose loss is NaN (finite weights) is saved", first="nan or overwrite or diverge"),
    M("magnet.py", "                if epoch or args.epochs == 0 or not os.path.exists(args.out):",
      "                if True:", "magnet --overwrite: the old checkpoint replaced before epoch 1", first="overwrite"),
    # ---------------------------------------------------------------- issue 31: robust verdicts backed from both sides
    M("attack.py", "        work[idx] += 1\n        lp = lp.detach().float()", "        lp = lp.detach().float()",
      "pgd: the iterates are not counted (no survivor looks attacked)", first=ATTACK),
    M("attack.py", "        work[idx] += 1\n        better = (m_new < m_k) | fooled",
      "        better = (m_new < m_k) | fooled", "square: the queries are not counted", first=ATTACK),
    M("attack.py", "        short = int(((worst | robust) & natural & (work != budget)).sum())",
      "        short = int((robust & natural & (work != budget)).sum())",
      "coverage: only what each loss itself attacked is checked (a loss that skips survivors passes)",
      first=ATTACK),
    M("attack.py", "budget = args.square_queries if loss == \"square\" else runs * (args.steps + 1)",
      "budget = args.square_queries if loss == \"square\" else runs * args.steps + 1",
      "coverage: the budget of one run for all restarts and targets", first=ATTACK),
    M("attack.py", "        closer = live & ~new & (m < margin[idx])", "        closer = live & ~new & (k == 0)",
      "pgd: a survivor keeps its random start, not its strongest iterate", first=ATTACK),
    M("attack.py", "closer = worst[idx] & robust & (rec[\"margin\"] < closest[idx])",
      "closer = worst[idx] & robust", "run_losses: a survivor keeps the last loss's point, not the strongest",
      first=ATTACK),
    M("attack.py", "    return robust & claimed, int(differ.sum())", "    return robust, int(differ.sum())",
      "recompute: a disagreement within rounding raises the figure", first=ATTACK),
    M("attack.py", "        same = (x_new == xk).flatten(1).all(1)", "        same = same & False",
      "square: a window whose values do not change is queried", first=ATTACK),
    M("attack.py", "    if args.strict and any(c[\"ok\"] is False for c in checks.values()):",
      "    if args.strict and False:", "a failed check exits 0", first=ATTACK),
    M("certify.py", "sound = not inside and L >= lower_estimate and (not given or L >= bound)",
      "sound = not inside and L >= lower_estimate", "certify: a given L below the bound is sound", first=CERTIFY),
    M("certify.py", 'share = "assumed_L_accuracy" if given else "certified_accuracy" if sound',
      'share = "certified_accuracy" if sound', "certify: a given L's curve is called certified", first=CERTIFY),
    M("certify.py", "float(inv_std.max()) * (1 + SLACK)", "float(inv_std.min()) * (1 + SLACK)",
      "certify: the normalisation's factor of the layer-wise bound", first=CERTIFY),
    M("certify.py", "better = adv & (dist < best)", "better = adv",
      "certify: the L2 search keeps its last flip, not its smallest", first=CERTIFY),
    # ---------------------------------------------------------------- issue 32: the new plumbing, each
    # shared block's mutant applied to every file that carries it (carriers)
    M(carriers("cli"), "            print(f\"error: {' '.join(str(e).split())}\", file=sys.stderr, flush=True)\n"
                       "            raise SystemExit(2) from None\n",
      "            print(f\"error: {' '.join(str(e).split())}\", file=sys.stderr, flush=True)\n"
      "            raise SystemExit(1) from None\n", "guarded: bad input exits 1, not 2", first=FAULTS),
    M(carriers("cli"), "            raise SystemExit(130) from None\n", "            raise SystemExit(0) from None\n",
      "guarded: Ctrl-C exits 0, not 130", first="signal or overwrite"),
    M(carriers("cli"), "        signal.signal(signal.SIGTERM, signal.default_int_handler)",
      "        pass", "guarded: SIGTERM kills the run (no exit 130, no line)", first="signal"),
    M(carriers("cli"), "        except (BadInput, OSError, MemoryError) as e:\n",
      "        except (BadInput, MemoryError) as e:\n", "guarded: an OSError ends in a traceback", first=FAULTS),
    M(carriers("cli"), "if not (low < value if open_low else low <= value) or not value <= high:",
      "if not low <= value <= high:", "number: open_low ignored (--lr 0 accepted)", first=FAULTS),
    M(carriers("cli"), "if not (low < value if open_low else low <= value) or not value <= high:",
      "if not (low < value if open_low else low <= value):", "number: the upper bound ignored", first=FAULTS),
    M(carriers("files"), "if os.path.exists(path) and not args.overwrite and real != resumed:",
      "if os.path.exists(path) and real != resumed:",
      "claimed: --overwrite ignored (an existing output always refused)", first=FAULTS),
    M(carriers("files"), "    data = [os.path.join(d, f) for d, _, files in os.walk(",
      "    data = [] and [os.path.join(d, f) for d, _, files in os.walk(",
      "claimed: the data files are not among the reads (an output may replace one)", first=FAULTS),
    M(carriers("files"), "    write(path + \".tmp\")\n    os.replace(path + \".tmp\", path)\n", "    write(path)\n",
      "write_file: writes in place, no tmp + os.replace (a killed save leaves a broken file)", first=FAULTS),
    M(carriers("files"), "        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)\n", "        pass\n",
      "claimed: an output's folder is not made", first=FAULTS),
    M(carriers("dataset"),
      "order = sorted(range(len(ds.targets)), key=lambda i: (i - first[ds.targets[i]], ds.targets[i]))[:limit]",
      "order = list(range(len(ds.targets)))[:limit]",
      "load_split: folder images in ImageFolder's order (--limit keeps the first classes only)", first=FAULTS),
    M(carriers("train-data"), "pixels = train_x.double().div_(255).transpose(0, 1).reshape(train_x.shape[1], -1)",
      "pixels = test_x.double().div_(255).transpose(0, 1).reshape(test_x.shape[1], -1)",
      "load_data: the App. A mean and std from the test split"),
    M(carriers("checkpoint"), "    if path and not torch.isfinite(f(to_float(images[:64]))).all():\n", "    if False:\n",
      "check_forward: a model whose forward is NaN loads", first=FAULTS),
    M(carriers("checkpoint"), " or ckpt[\"stage\"] not in stages or", " or",
      "read_checkpoint: a checkpoint of another stage is read", first=FAULTS),
    M(carriers("checkpoint"), "ckpt = torch.load(path, map_location=\"cpu\", weights_only=True)",
      "ckpt = torch.load(path, map_location=\"cpu\", weights_only=False)",
      "read_checkpoint: weights_only=False (a checkpoint's pickled code runs)", first=FAULTS),
    M(carriers("train-run"), "    if diff or args.epochs < ckpt[\"epoch\"] or", "    if args.epochs < ckpt[\"epoch\"] or",
      "resume: changed run-shaping flags not refused", first=FAULTS),
    M(carriers("train-run"), "if k not in not_shaping | {\"epochs\"}", "if k not in not_shaping",
      "resume: a larger --epochs refused (a finished run cannot be extended)", first=FAULTS),
    M(carriers("train-run"), " or \"resume\" not in ckpt or args.epochs", " or args.epochs",
      "resume: a --slim checkpoint (no resume state) not refused", first=FAULTS),
    M(carriers("train-run"), "    if not (args.slim and ckpt[\"epoch\"] == args.epochs):\n", "    if True:\n",
      "save_epoch: --slim ignored (the final checkpoint keeps its resume state)", first=FAULTS),
    M(carriers("train-run"), "    torch.set_rng_state(ckpt[\"resume\"][\"rng\"][\"torch\"])\n", "",
      "resume: torch's global RNG restarts from the seed", first="bit_identical",
      equivalent="after the resume point nothing draws from torch's global RNG: every permutation, crop, flip, "
                 "k-means++ seed and quick adversary draws from the run's generator, the sampler from its own "
                 "(a grep of the three training stages finds no draw without generator=); the global RNG "
                 "only initialises the weights that the resume then replaces"),
    M(carriers("train-run"), "model.load_state_dict(init_state or model.state_dict(), strict=True)",
      "model.load_state_dict(init_state or model.state_dict(), strict=False)",
      "build_training: --init's weights loaded with strict=False (missing weights stay random)", first=FAULTS),
    M(carriers("init-check"), "setattr(args, key, getattr(args, key) or have)",
      "setattr(args, key, getattr(args, key) or {\"data\": \"cifar10\", \"width\": 64}[key])",
      "defaults_from_init: --data and --width not taken from --init", first=FAULTS),
    M(carriers("init-check"), "args.data_dir = args.data_dir or (ckpt", "args.data_dir = args.data_dir or \"./data\" or (ckpt",
      "defaults_from_init: the data folder not taken from --init", first=FAULTS),
    M(carriers("init-check"), "        if source and getattr(args, key) not in (None, have):\n", "        if False:\n",
      "defaults_from_init: a --data or --width other than --init's not refused", first=FAULTS,
      equivalent="refused later, with the same exit 2, one line and no file written: another --width by "
                 "build_training's strict load of --init's weights (or by resume's changed-flag check), "
                 "another --data by read_init (its classes, image size and channels differ from --init's: no "
                 "two --data choices share class names) or by resume's check; only the message changes (and "
                 "with a network, torchvision could download the other data set before the refusal)"),
    M(carriers("init-check"), "    if have != want:\n", "    if False:\n",
      "read_init: --init of other classes, image size or channels accepted", first=FAULTS),
    M(carriers("init-check"), "return dict(info, mean=init[\"data\"][\"mean\"], std=init[\"data\"][\"std\"]), init[\"model\"]",
      "return info, init[\"model\"]", "read_init: the checkpoint's data entry says the data's mean/std, not --init's"),
    M(carriers("cluster-update"), "    if (args.D or 0) > args.K * info[\"num_classes\"]:\n", "    if False:\n",
      "cluster_and_evaluate: --D above the K x classes centres accepted", first=FAULTS),
    M(carriers("cluster-update"), "    if not torch.isfinite(features).all():\n", "    if False:\n",
      "cluster_and_evaluate: NaN features reach k-means", first=FAULTS,
      equivalent="save_epoch's finite check refuses the same epoch (the NaN centres and sigma^2 of k-means on "
                 "NaN features): exit 2, one line, --out keeps its last good epoch; k-means++ itself does not "
                 "raise on NaN rows (all-NaN seeding weights fall back to uniform draws); only the message "
                 "differs"),
    M(carriers("classifier"), "        return z.masked_fill(z == float(\"-inf\"), self.LOW)", "        return z",
      "Classifier(scores=True): -inf scores outside the D nearest (DLR gives NaN)", first=ATTACK),
    M(carriers("classifier"), "return z if self.scores else F.log_softmax(z, dim=1)", "return z",
      "Classifier: a head checkpoint's logits, not log p", first=ATTACK),
    M(carriers("classifier"), "cluster_log_probs(f, self.centers, self.center_classes, self.sigma2, self.D)",
      "cluster_log_probs(f, self.centers, self.center_classes, self.sigma2, None)",
      "Classifier: log p ignores D", first=ATTACK),
    M(carriers("classifier"), "Classifier(model, clusters, D, scores).to(device).eval().requires_grad_(False)",
      "Classifier(model, clusters, D, scores).to(device).requires_grad_(False)",
      "read_classifier: the classifier left in train mode (batch norm of the attacked batch)", first=ATTACK),
    M(carriers("classifier"), "D = (clusters or {}).get(\"D\") if D == \"stored\" else D",
      "D = None if D == \"stored\" else D", "read_classifier: the checkpoint's D ignored", first=ATTACK),
    M(carriers("classifier"), "model.load_state_dict(ckpt[\"model\"], strict=True)",
      "model.load_state_dict(ckpt[\"model\"], strict=False)",
      "build_model: a checkpoint's weights loaded with strict=False", first=FAULTS),
    M(carriers("classifier"), "    if args.data not in (None, info[\"name\"]) or args.width not in (None, width):\n",
      "    if False:\n", "args_from_checkpoint: a --data or --width other than the checkpoint's ignored silently",
      first=FAULTS),
    M(carriers("classifier"), "usable = isinstance(stored, str) and os.path.isabs(stored) and os.path.isdir(stored)",
      "usable = False", "args_from_checkpoint: the checkpoint's data folder not used", first=ATTACK),
    M(carriers("common-args"), "    torch.manual_seed(args.seed)\n", "",
      "setup_runtime: torch not seeded (--seed does not fix the initial weights)"),
    # the review's findings (issue 33): each guarantee added after the rewrite
    M(carriers("files"), "| {w[2] for w in written[:i]} or os.path.isdir(path)", "or os.path.isdir(path)",
      "claimed: one file named by two outputs accepted", first=FAULTS),
    M(carriers("files"), " or os.path.isdir(path) or not os.path.basename(path):", ":",
      "claimed: a folder or an empty name accepted as an output", first=FAULTS),
    M(carriers("checkpoint"), " or not isinstance(ckpt[\"args\"], dict):", ":",
      "read_checkpoint: a checkpoint without its args read", first=FAULTS),
    M(carriers("classifier"), "if clusters and not (clusters[\"variance\"] > 0 and", "if clusters and not (True and",
      "read_classifier: sigma^2 <= 0 accepted", first=FAULTS),
    M(carriers("classifier"), "clusters[\"center_classes\"].unique().tolist()\n"
                              "                             == list(range(ckpt[\"data\"][\"num_classes\"]))",
      "clusters[\"center_classes\"].unique().tolist()\n"
      "                             == clusters[\"center_classes\"].unique().tolist()",
      "read_classifier: centre classes beyond the data's classes accepted", first=FAULTS),
    M(carriers("train-run"), " or args.epochs == ckpt[\"epoch\"] \\\n"
                             "            and os.path.realpath(args.resume or args.out) != os.path.realpath(args.out):",
      ":", "resume: a finished run resumed into another --out (nothing would be written) accepted", first=FAULTS),
    M(carriers("train-run"), "    saved = ckpt[\"epoch\"] if os.path.realpath(args.resume or args.out) == "
                             "os.path.realpath(args.out) else None\n", "    saved = None\n",
      "resume: Ctrl-C before the first new epoch does not name the epoch --out holds", first="signal or interrupt"),
]


def copy_repo(dest):
    """What the suite needs: the top-level files (stage files, test_all.py, pytest.ini, README.md)
    and benchmarks/ (the suite runs gpu.py --tiny and reads the benchmarks' imports)."""
    for name in os.listdir(ROOT):
        path = os.path.join(ROOT, name)
        if os.path.isfile(path) and not name.startswith("."):
            shutil.copy2(path, dest)
    shutil.copytree(os.path.join(ROOT, "benchmarks"), os.path.join(dest, "benchmarks"),
                    ignore=shutil.ignore_patterns("__pycache__"))


def check(mutants):
    """Each snippet must occur exactly once in every file it applies to, and a snippet inside a
    shared block must be applied to every file that carries the block."""
    problems = []
    for number, m in enumerate(mutants, 1):
        for name in m["files"]:
            with open(os.path.join(ROOT, name)) as f:
                text = f.read()
            count = text.count(m["original"])
            if count != 1:
                problems.append(f"mutant {number} ({m['what']}): snippet occurs {count} times in {name}")
                continue
            at = text.index(m["original"])
            for block, (start, end) in blocks(name).items():
                if start <= at < end and set(m["files"]) != set(carriers(block)):
                    problems.append(f"mutant {number} ({m['what']}): edits the shared block {block} of {name}; "
                                    f"apply it to every carrier, carriers({block!r}) = {carriers(block)}")
    return problems


def run_pytest(folder, extra, timeout):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "test_all.py", "-x", "-q", "-p", "no:cacheprovider", *extra]
    try:
        proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", None
    failed = re.findall(r"^(?:FAILED|ERROR) test_all\.py::(.+?)(?: - .*)?$", proc.stdout, re.M)
    return proc.returncode, (failed[0] if failed else None)


def verdict(folder, timeout, first=None):
    """-> (killed, by which test or why)."""
    for extra in (["-k", first] if first else ["-m", "wiring"], []):
        code, test = run_pytest(folder, extra, timeout)
        if code == "timeout":
            return True, "timeout (the suite did not finish)"
        if code == 5 and extra:                                 # the first pass selected nothing
            continue
        if code != 0:
            return True, test or f"pytest exit {code} (collection or import error)"
    return False, None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", type=int, nargs="*", help="mutant numbers to run (1-based)")
    p.add_argument("--check", action="store_true", help="only verify the snippets")
    p.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the unmutated run (which must pass for the verdicts to mean anything)")
    p.add_argument("--out", default=None, help="also write the Markdown table to this file")
    args = p.parse_args(argv)
    problems = check(MUTANTS)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        raise SystemExit(2)
    print(f"{len(MUTANTS)} mutants, every snippet found once")
    if args.check:
        return
    chosen = args.only or list(range(1, len(MUTANTS) + 1))
    with tempfile.TemporaryDirectory(prefix="clustr-mutants-") as tmp:
        if not args.no_baseline:
            base = os.path.join(tmp, "baseline")
            os.makedirs(base)
            copy_repo(base)
            code, test = run_pytest(base, [], args.timeout)
            if code != 0:
                print(f"the unmutated suite fails ({code}, {test}): fix that first", file=sys.stderr)
                raise SystemExit(1)
            print("baseline: the unmutated suite passes", flush=True)
        rows = []
        for number in chosen:
            m = MUTANTS[number - 1]
            folder = os.path.join(tmp, f"m{number}")
            os.makedirs(folder)
            copy_repo(folder)
            t0, missing = time.time(), []
            for name in m["files"]:         # the files as they are now: a stage edited since --check?
                path = os.path.join(folder, name)
                with open(path) as f:
                    text = f.read()
                missing += [name] if text.count(m["original"]) != 1 else []
                with open(path, "w") as f:
                    f.write(text.replace(m["original"], m["mutant"], 1))
            killed, by = (False, None) if missing else verdict(folder, args.timeout, m["first"])
            shutil.rmtree(folder)
            status = ("NOT APPLIED" if missing else "killed" if killed else
                      "equivalent" if m["equivalent"] else "SURVIVED")
            by = by or (missing and f"snippet not found once in {', '.join(missing)}") or None
            rows.append((number, m, status, by, time.time() - t0))
            print(f"{number:>3} {status:<10} {time.time() - t0:6.0f}s  {m['what']}  "
                  f"[{', '.join(m['files'])}]  {by or m['equivalent'] or ''}", flush=True)
            if args.out:                    # rewritten after every mutant: a stopped pass keeps its rows
                with open(args.out, "w") as f:
                    f.write(table(rows, len(chosen)))
    print("\n" + table(rows, len(chosen)))


def table(rows, planned):
    """The Markdown table of the mutants run so far and the kill rate of the non-equivalent ones."""
    counted = [r for r in rows if not r[1]["equivalent"] and r[2] != "NOT APPLIED"]
    killed = sum(r[2] == "killed" for r in counted)
    lines = ["| # | file | mutant | result | killed by |", "| --- | --- | --- | --- | --- |"]
    for number, m, status, by, _ in rows:
        note = f"`{by}`" if by and status == "killed" else by or m["equivalent"] or ""
        lines.append(f"| {number} | {', '.join(m['files'])} | {m['what']} | {status} | {note} |")
    summary = (f"killed {killed} of {len(counted)} non-equivalent mutants "
               f"({100 * killed / max(1, len(counted)):.1f}%); "
               f"{sum(r[2] == 'equivalent' for r in rows)} equivalent (declared, survived); "
               f"{sum(r[2] == 'NOT APPLIED' for r in rows)} not applied"
               + ("" if len(rows) == planned else f"; {len(rows)} of {planned} run (partial)"))
    return "\n".join(lines) + "\n\n" + summary + "\n"


if __name__ == "__main__":
    main()
