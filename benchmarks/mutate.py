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
~20 s), or for attack.py and certify.py the tests named after them (its `first` -k expression),
and only when that passes the whole suite; the verdict is the same as one full run.

    python benchmarks/mutate.py                  # every mutant, ~15-30 min on 2 busy cores
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
SHARED = ("magnet.py", "qtrades.py")      # a shared block's mutant is applied to every copy


def M(files, original, mutant, what, equivalent=None, first=None):
    """first: a pytest -k expression run before the whole suite (default: the wiring tier)."""
    return {"files": (files,) if isinstance(files, str) else files, "original": original,
            "mutant": mutant, "what": what, "equivalent": equivalent, "first": first}


# The evaluation's mutants first run the tests named after the evaluation stages.
ATTACK = "attack or square or target or check or cascade or pgd or per_loss or export or recomput"
CERTIFY = "certify or radius or radii or lipschitz or l2_attack or curve or prop1"
FAULTS = "fault or data_is or logs_are or atomic or certify_results or lock"


MUTANTS = [
    # ---------------------------------------------------------------- nominal.py (App. A)
    M("nominal.py", "x = to_float(augment(images[idx], args.crop, args.flip, generator))",
      "x = to_float(augment(images[idx], args.crop, False, generator))", "nominal ignores --flip"),
    M("nominal.py", "x = to_float(augment(images[idx], args.crop, args.flip, generator))",
      "x = to_float(images[idx])", "nominal trains without augmentation"),
    M("nominal.py", "        opt.zero_grad(set_to_none=True)\n", "",
      "nominal: no zero_grad (gradients accumulate over steps)"),
    M(("nominal.py", "magnet.py", "qtrades.py"), "torch.optim.Adam(model.parameters(), lr=args.lr), generator",
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
    M("magnet.py", "        sampler.record(idx, per_example)                                # Rippel",
      "        pass  # sampler.record(idx, per_example)                        # Rippel",
      "magnet: per-example losses never reach the sampler"),
    M("magnet.py", "        sampler.record(idx, per_example)                                # Rippel",
      "        sampler.record(idx.flip(0), per_example)                        # Rippel",
      "magnet: losses recorded at the wrong rows"),
    M(SHARED, "    sampler.set_clusters(assignment, centers, center_classes)\n"
                   "    return clusters_entry(centers, center_classes, sigma2, args), center_classes,",
      "    if epoch == 0:\n"
      "        sampler.set_clusters(assignment, centers, center_classes)\n"
      "    return clusters_entry(centers, center_classes, sigma2, args), center_classes,",
      "magnet: the sampler keeps the epoch-0 clusters forever"),
    M("magnet.py", "        x = to_float(augment(images[idx_dev], args.crop, args.flip, generator))",
      "        x = to_float(images[idx_dev])", "magnet trains without augmentation"),
    M("magnet.py", "magnet_loss(f, cluster_ids, center_classes[cluster_ids], args.alpha)",
      "magnet_loss(f, cluster_ids, center_classes[cluster_ids], 0.0)",
      "magnet: alpha is 0 inside the loop"),
    M("magnet.py", "magnet_loss(f, cluster_ids, center_classes[cluster_ids], args.alpha)",
      "magnet_loss(f, center_classes[cluster_ids], center_classes[cluster_ids], args.alpha)",
      "magnet: the loss sees one cluster per class instead of the sampled clusters"),
    M("magnet.py", '"svhn": dict(epochs=30, lr=1e-4, alpha=13.0, crop=0, flip=False)',
      '"svhn": dict(epochs=30, lr=1e-4, alpha=12.5, crop=0, flip=False)',
      "magnet: App. A default changed (SVHN alpha)"),
    M("magnet.py", "sampler = NeighbourhoodSampler(len(train[1]), args.m, args.d,",
      "sampler = NeighbourhoodSampler(len(train[1]), args.d, args.m,", "magnet: m and d swapped"),
    M("magnet.py", "        opt.zero_grad(set_to_none=True)\n", "", "magnet: no zero_grad"),
    M(SHARED, "test_acc = eq4_accuracy(test_features, test[1], centers, center_classes, sigma2, args.D)",
      "test_acc = eq4_accuracy(test_features, test[1], centers, center_classes, sigma2, None)",
      "magnet: --D ignored in the test accuracy"),
    M("magnet.py", "        loss_sum += float(per_example.sum())",
      "        loss_sum += float(per_example.mean())", "magnet: logged train loss wrong"),
    M("magnet.py", "    for _ in range(sampler.batches_per_epoch()):\n        idx, cluster_ids = sampler.sample()                             # CPU",
      "    for _ in range(sampler.batches_per_epoch() - 1):\n        idx, cluster_ids = sampler.sample()                             # CPU",
      "magnet: one batch per epoch too few"),
    M("magnet.py", "    images, _ = train\n    model.train()\n    loss_sum, seen = 0.0, 0\n",
      "    images, _ = train\n    loss_sum, seen = 0.0, 0\n",
      "magnet: train_one_epoch does not set train mode",
      equivalent="the model is already in train mode there: it starts so, and features_of and "
                 "eq4 evaluation restore the mode they found"),
    # ---------------------------------------------------------------- shared blocks (every copy)
    M(SHARED, "features, train[1], num_classes, args.K, generator)",
      "features, train[1], num_classes, 2, generator)", "k-means: --K ignored (always 2)"),
    M(SHARED, "        mu, a = kmeans_pp(x, K, iters, generator)",
      "        mu, a = kmeans_pp(x, K, iters)", "k-means++ without the run's generator"),
    M(SHARED, "    features = features_of(model, train[0], args.batch_size, args.amp)          # [N, 8w]",
      "    features = features_of(model, augment(train[0], args.crop, args.flip, generator), "
      "args.batch_size, args.amp)", "k-means on augmented images"),
    M(SHARED, "        self.losses[rows.cpu()] = losses.detach().float().cpu()",
      "        self.losses[rows.cpu()] = losses.detach().float().cpu().flip(0)",
      "sampler stores each loss at another row"),
    M(SHARED, "            mean = torch.where(seen, mean, mean[seen].mean())             # never drawn: average",
      "            mean = torch.where(seen, mean, 0.0)                           # never drawn: average",
      "sampler: never-drawn clusters never seeded"),
    M(SHARED, "        return math.ceil(self.num_examples / (self.m * self.d))",
      "        return self.num_examples // (self.m * self.d)", "sampler: epoch rounds down"),
    # ---------------------------------------------------------------- qtrades.py (Eq. (6), Sec. 4.2)
    M("qtrades.py", "x_adv = craft(model, x, eq4, args, generator)", "x_adv = x",
      "ClusTR+QTRADES with no adversary"),
    M("qtrades.py", "f, f_adv, cluster_ids, center_classes[cluster_ids], args.alpha, *eq4, args.lam,",
      "f, f_adv, cluster_ids, center_classes[cluster_ids], args.alpha, *eq4, 0.0,",
      "ClusTR+QTRADES with lambda = 0"),
    M("qtrades.py", "quick_adversary(log_q_fn, x, log_p, args.eps, args.step, generator)",
      "quick_adversary(log_q_fn, x, log_p, args.eps, args.eps, generator)",
      "QTRADES: the step equals eps"),
    M("qtrades.py", "x_adv = craft(model, x, None, args, generator)", "x_adv = x",
      "QTRADES alone uses x as its own adversary"),
    M("qtrades.py", "loss, cons = qtrades_ce_loss(logits, logits_adv, y, args.lam, args.consistency)",
      "loss, cons = qtrades_ce_loss(logits, logits_adv, y, 0.0, args.consistency)",
      "QTRADES alone with lambda = 0"),
    M("qtrades.py", "        x_adv = x_start + step * grad.sign()",
      "        x_adv = x_start - step * grad.sign()", "QTRADES: descent instead of ascent"),
    M("qtrades.py", "        sampler.record(idx, per_example)            # Rippel",
      "        sampler.record(idx, total)                  # Rippel",
      "ClusTR+QTRADES: the sampler ranks Eq. (6) totals, not Magnet losses"),
    M("qtrades.py", "            keep = nearest_mask(f, centers, D)                             # the clean D nearest",
      "            keep = nearest_mask(f, centers, None)                          # the clean D nearest",
      "QTRADES: the adversary ignores D"),
    M("qtrades.py", "            f_adv = model.features(x_adv)", "            f_adv = model.features(x)",
      "ClusTR+QTRADES: the adversarial features are the clean ones"),
    M("qtrades.py", '"svhn": dict(epochs=30, lr=1e-4, alpha=10.0, lam=9.7,',
      '"svhn": dict(epochs=30, lr=1e-4, alpha=10.0, lam=8.0,', "qtrades: App. A default changed (SVHN lambda)"),
    M("qtrades.py", '"cifar100": dict(epochs=60, lr=1e-4, alpha=8.5, lam=2.0, D=20,',
      '"cifar100": dict(epochs=60, lr=1e-4, alpha=8.5, lam=2.0, D="all",',
      "qtrades: Sec. 4.2 default changed (CIFAR100 D = 20)"),
    M("qtrades.py", 'g.add_argument("--step", type=parse_fraction, default="10/255",',
      'g.add_argument("--step", type=parse_fraction, default="8/255",', "qtrades: default step changed"),
    M("qtrades.py", "    (log-softmax of the head).  The clean target p(f(x)) is the eval-mode one, held constant.\"\"\"\n    model.eval()\n",
      "    (log-softmax of the head).  The clean target p(f(x)) is the eval-mode one, held constant.\"\"\"\n",
      "QTRADES: the adversary is crafted in train mode"),
    M("qtrades.py", "_, metrics = cluster_and_evaluate(model, train, test, info, sampler, args, generator, epoch)",
      "_, metrics = cluster_and_evaluate(model, train, test, info, sampler, args, generator, 0)",
      "ClusTR+QTRADES: every epoch's record says epoch 0"),
    M("qtrades.py", "            clusters, metrics = evaluate_epoch(*ev, epoch + 1, train_acc)",
      "            _, metrics = evaluate_epoch(*ev, epoch + 1, train_acc)",
      "ClusTR+QTRADES: Eq. (6) keeps the epoch-0 centres"),
    M("qtrades.py", "logits, logits_adv = model(x), model(x_adv)", "logits, logits_adv = model(x), model(x)",
      "QTRADES alone: the adversarial logits are the clean ones"),
    M("qtrades.py", "        x = to_float(augment(images[idx], args.crop, args.flip, generator))",
      "        x = to_float(images[idx])", "QTRADES alone trains without augmentation"),
    M("qtrades.py", "        x = to_float(augment(images[idx_dev], args.crop, args.flip, generator))",
      "        x = to_float(augment(images[idx_dev], args.crop, False, generator))",
      "ClusTR+QTRADES ignores --flip"),
    M("qtrades.py", "    perm = torch.randperm(n, device=device, generator=generator)",
      "    perm = torch.arange(n, device=device)", "QTRADES alone: batches never shuffled"),
    M("qtrades.py", "        opt.zero_grad(set_to_none=True)\n        loss.backward()\n        opt.step()\n"
                    "        per_example = per_example.detach().float().cpu()\n        total",
      "        loss.backward()\n        opt.step()\n"
      "        per_example = per_example.detach().float().cpu()\n        total",
      "ClusTR+QTRADES: no zero_grad"),
    M(SHARED, "test_features = features_of(model, test[0], args.batch_size, args.amp)",
      "test_features = features_of(model, train[0], args.batch_size, args.amp)",
      "magnet: 'test' accuracy from the training images"),
    M("qtrades.py", "_, metrics = cluster_and_evaluate(model, train, test, info, sampler",
      "_, metrics = cluster_and_evaluate(model, train, train, info, sampler",
      "ClusTR+QTRADES: 'test' accuracy from the training images"),
    M("qtrades.py", '"test_accuracy": evaluate(model, test, args.batch_size, args.amp, device)}',
      '"test_accuracy": evaluate(model, train, args.batch_size, args.amp, device)}',
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
    M("attack.py", "drawn = torch.where(window[same], x0[same] + eps * (sign * 2 - 1).to(x.dtype), xk[same])",
      "drawn = torch.where(window[same], xk[same] + eps * (sign * 2 - 1).to(x.dtype), xk[same])",
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
    M("certify.py", 'inside = int((pert < r["radius"][:m]).sum())',
      'inside = int((pert < r["radius"][-m:]).sum())',
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
    M("certify.py", "finite(med_p / float(r[\"radius\"][:m].median()))",
      "finite(med_p / float(r[\"radius\"].median()))",
      "certify: gap_median_ratio divides by the median radius of every image, not the attacked ones",
      first=CERTIFY),
    M("certify.py", "return pert, (float(torch.cat(lower).max()) if m else None)",
      "return pert, (float(torch.cat(lower).min()) if m else None)",
      "certify: the lower estimate of L is the smallest Jacobian norm, not the largest", first=CERTIFY),
    M("certify.py", "x = to_float(images[start:min(m, start + args.batch_size)])",
      "x = to_float(images[start:start + args.batch_size])",
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
    M("certify.py", "return torch.where(same, sq, inf).min(1).values - torch.where(same, inf, sq).min(1).values",
      "return torch.where(same, inf, sq).min(1).values - torch.where(same, sq, inf).min(1).values",
      "certify: attack_margin's sign flipped (the attack climbs towards its own class)", first=CERTIFY),
    M("certify.py", "for p in results[\"curve\"][::step]]", "for p in results[\"curve_tight\"][::step]]",
      "certify: the summary's certified-accuracy table prints the tight curve", first=CERTIFY),
    M("certify.py", "    if low is not None and L < low:",
      "    if low is not None and L > low:",
      "certify: the summary warns that L is too small when it is above the lower estimate",
      first=CERTIFY),
    M("certify.py", "plot_curves(results, r[\"radius\"][:len(pert)], pert, lower_estimate, plot)",
      "plot_curves(results, r[\"radius\"], pert, lower_estimate, plot)",
      "certify: the plot's radii are of every image, the attack's of the first --attack-limit",
      first=CERTIFY),
    M("certify.py", '"flipped": int(torch.isfinite(pert).sum()), "flipped_inside',
      '"flipped": int((pert > 0).sum()), "flipped_inside',
      "certify: flipped counts the images where the attack found nothing (inf)", first=CERTIFY),
    M("certify.py", '"lower_estimate_images": m,', '"lower_estimate_images": n,',
      "certify: lower_estimate_images says every test image", first=CERTIFY),
    M("certify.py", '(radius * L / (lower or L), "R(x) if L = lower estimate (not sound)", "--")',
      '(radius * (lower or L) / L, "R(x) if L = lower estimate (not sound)", "--")',
      "certify: the plot scales R(x) to the lower estimate of L the wrong way", first=CERTIFY),
    # ---------------------------------------------------------------- faults (issue 23): every stage's copy
    M(("nominal.py", "magnet.py", "qtrades.py", "attack.py", "certify.py", "synthetic.py"),
      "            if real in reads:\n", "            if False:\n",
      "check_outputs: an output may be a file the run reads", first=FAULTS),
    M(("nominal.py", "magnet.py", "qtrades.py", "attack.py", "certify.py"),
      "    bad = nonfinite({\"model\": ckpt[\"model\"], \"clusters\": ckpt.get(\"clusters\")})\n",
      "    bad = None\n", "read_checkpoint: NaN weights load", first=FAULTS),
    M(("nominal.py", "magnet.py", "qtrades.py", "attack.py"),
      "    bad = nonfinite({k: ckpt[k] for k in (\"model\", \"clusters\") if k in ckpt})\n",
      "    bad = None\n", "save_checkpoint: NaN weights are written", first=FAULTS),
    M(("nominal.py", "magnet.py", "qtrades.py", "attack.py", "certify.py"),
      "walks = [sorted(os.walk(os.path.join(split, c))) for c in classes]",
      "walks = [sorted(os.walk(os.path.join(split, c), followlinks=True)) for c in classes]",
      "folder splits follow links to folders again", first=FAULTS),
    M(("nominal.py", "magnet.py", "qtrades.py", "attack.py", "certify.py"),
      "    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(classes):\n",
      "    if False:\n", "labels outside the classes accepted", first=FAULTS),
    M("certify.py", "    sound = not inside and (not lower_estimate or L >= lower_estimate)\n",
      "    sound = not inside\n", "certify: an L below the lower estimate still gives certificates",
      first=FAULTS),
    M(("nominal.py", "magnet.py", "qtrades.py", "attack.py", "certify.py", "synthetic.py"),
      "            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n", "            pass\n",
      "the lock of --out is never taken", first=FAULTS),
    M("attack.py", "                m = torch.minimum(m, (sq[:, clf.D] - sq[:, clf.D - 1]) / (2 * clf.sigma2))\n",
      "                pass\n", "recompute: a D-masked flip at the D-th centre counts as beyond rounding",
      first=ATTACK),
    # ---------------------------------------------------------------- issue 22: the lean plumbing
    M(("nominal.py", "magnet.py", "qtrades.py", "attack.py", "certify.py", "synthetic.py"),
      "        if training and not resume and os.path.exists(out) and not args.overwrite:\n",
      "        if False:\n", "owned: a fresh training run writes over an existing --out", first=FAULTS + " or bad_input"),
    M(("nominal.py", "magnet.py", "qtrades.py", "attack.py", "certify.py", "synthetic.py"),
      "            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n", "            pass\n",
      "take_lock: no lock (two runs on one --out)", first=FAULTS + " or bad_input"),
    M(("nominal.py", "magnet.py", "qtrades.py", "attack.py", "certify.py", "synthetic.py"),
      "        again.append(\"--resume\")\n", "        pass\n",
      "stopped: the printed command restarts instead of resuming", first="interrupt or signal"),
    M(("nominal.py", "magnet.py", "qtrades.py", "attack.py", "certify.py", "synthetic.py"),
      "                os.remove(out + \".lock\")\n", "                pass\n",
      "owned: the lock file stays after the run", first="lock or signal or overwrite"),
    M(("nominal.py", "magnet.py", "qtrades.py", "attack.py"),
      "            run.update(epoch=ckpt[\"epoch\"], file=path)\n", "            pass\n",
      "save_checkpoint: the interrupt line never learns the saved epoch", first="interrupt or signal"),
    M(("nominal.py", "magnet.py", "qtrades.py", "attack.py"),
      "        if \"log\" in ckpt:\n            atomic_write(", "        if False:\n            atomic_write(",
      "save_checkpoint: the training log is never written", first="tiny_training or resume"),
    M(("nominal.py", "magnet.py", "qtrades.py"), "    opt.load_state_dict(ckpt[\"resume\"][\"optimizer\"])\n", "",
      "resume: Adam's moments start from zero", first="bit_identical"),
    M(("nominal.py", "magnet.py", "qtrades.py"), "        generator.set_state(ckpt[\"resume\"][\"rng\"][\"generator\"])\n",
      "        pass\n", "resume: the device generator restarts from the seed", first="bit_identical"),
    M(("nominal.py", "magnet.py", "qtrades.py"), "    if not math.isfinite(loss):\n", "    if False:\n",
      "check_loss: a NaN epoch is saved", first="nan"),
    M("magnet.py", "            if args.epochs == 0 or not os.path.exists(args.out):", "            if True:",
      "magnet --overwrite: the old checkpoint replaced before epoch 1", first="overwrite"),
    M(("nominal.py", "magnet.py", "qtrades.py", "attack.py", "certify.py"), "    bad = damaged(ckpt)\n", "    bad = None\n",
      "read_checkpoint: a damaged entry is used", first=FAULTS + " or damaged"),
    M(("nominal.py", "magnet.py", "qtrades.py", "attack.py", "certify.py"), "type(k[\"variance\"]) in (int, float) and k[\"variance\"] > 0",
      "type(k[\"variance\"]) in (int, float)", "damaged: a negative sigma^2 passes", first=FAULTS + " or damaged"),
    M(("nominal.py", "magnet.py", "qtrades.py", "attack.py", "certify.py"), "0 <= int(k[\"center_classes\"].min()) <= int(k[\"center_classes\"].max()) < d[\"num_classes\"]",
      "0 <= int(k[\"center_classes\"].min())", "damaged: centre classes beyond the classes pass",
      first=FAULTS + " or damaged"),
    M(("nominal.py", "magnet.py", "qtrades.py"), "        ckpt[\"log\"] = ckpt[\"log\"] or [ckpt[\"metrics\"]]\n", "        ckpt[\"log\"] = [ckpt[\"metrics\"]]\n",
      "resume: an old checkpoint's log file is dropped", first="without_its_log or resume"),
    M(("nominal.py", "magnet.py", "qtrades.py", "attack.py", "certify.py", "synthetic.py"), "        again = [a for a in argv if a != \"--overwrite\" and not a.startswith(\"--resume=\")]\n",
      "        again = [a for a in argv if not a.startswith(\"--resume=\")]\n",
      "stopped: --overwrite kept once --out holds an epoch (the command is refused... or replaces it)",
      first="interrupt or signal or overwrite"),
    M(("nominal.py", "magnet.py", "qtrades.py", "attack.py", "certify.py", "synthetic.py"), "        if \"--resume\" in again:             # --resume [PATH]", "        if False:             # --resume [PATH]",
      "stopped: --resume A stays in the command that should continue --out", first="interrupt or resume"),
    M(("nominal.py", "magnet.py", "qtrades.py", "attack.py", "certify.py", "synthetic.py"), "    if training and run[\"file\"] and os.path.abspath(run[\"file\"]) == os.path.abspath(args.out):",
      "    if training and run[\"file\"]:", "stopped: a resume not yet saved into --out continues --out",
      first="interrupt or resume or overwrite"),
    M(("nominal.py", "magnet.py", "qtrades.py", "attack.py", "certify.py", "synthetic.py"), "        if not training and os.path.isfile(out) and open(out, \"rb\").read(2) == b\"PK\":",
      "        if False:", "owned: an evaluation writes its results over a checkpoint", first=FAULTS),
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
    M("attack.py", "            same = (x_new == xk).flatten(1).all(1)", "            same = same & False",
      "square: a window whose values do not change is queried", first=ATTACK),
    M("attack.py", "    if args.strict and any(c[\"ok\"] is False for c in checks.values()):",
      "    if args.strict and False:", "a failed check exits 0", first=ATTACK),
    M("certify.py", "        sound, share = sound and L >= bound, \"assumed_L_accuracy\"",
      "        sound, share = sound, \"assumed_L_accuracy\"", "certify: a given L below the bound is sound",
      first=CERTIFY),
    M("certify.py", "        sound, share = sound and L >= bound, \"assumed_L_accuracy\"",
      "        sound, share = sound and L >= bound, share", "certify: a given L's curve is called certified",
      first=CERTIFY),
    M("certify.py", "float(inv_std.max()) * (1 + SLACK)", "float(inv_std.min()) * (1 + SLACK)",
      "certify: the normalisation's factor of the layer-wise bound", first=CERTIFY),
    M("certify.py", "better = adv & (dist < best)", "better = adv",
      "certify: the L2 search keeps its last flip, not its smallest", first=CERTIFY),
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
    """Each snippet must occur exactly once in every file it applies to (present files only)."""
    problems = []
    for number, m in enumerate(mutants, 1):
        for name in m["files"]:
            with open(os.path.join(ROOT, name)) as f:
                count = f.read().count(m["original"])
            if count != 1:
                problems.append(f"mutant {number} ({m['what']}): snippet occurs {count} times in {name}")
    return problems


def run_pytest(folder, extra, timeout):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "test_all.py", "-x", "-q", "-p", "no:cacheprovider", *extra]
    try:
        proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", None
    failed = re.findall(r"^(?:FAILED|ERROR) test_all\.py::(\S+)", proc.stdout, re.M)
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
            for name in m["files"]:
                path = os.path.join(folder, name)
                with open(path) as f:
                    text = f.read()
                with open(path, "w") as f:
                    f.write(text.replace(m["original"], m["mutant"], 1))
            t0 = time.time()
            killed, by = verdict(folder, args.timeout, m["first"])
            shutil.rmtree(folder)
            status = "killed" if killed else ("equivalent" if m["equivalent"] else "SURVIVED")
            rows.append((number, m, status, by, time.time() - t0))
            print(f"{number:>3} {status:<10} {time.time() - t0:6.0f}s  {m['what']}  "
                  f"[{', '.join(m['files'])}]  {by or m['equivalent'] or ''}", flush=True)
    counted = [r for r in rows if not r[1]["equivalent"]]
    killed = sum(r[2] == "killed" for r in counted)
    lines = ["| # | file | mutant | result | killed by |", "| --- | --- | --- | --- | --- |"]
    for number, m, status, by, _ in rows:
        note = f"`{by}`" if by else (m["equivalent"] or "")
        lines.append(f"| {number} | {', '.join(m['files'])} | {m['what']} | {status} | {note} |")
    summary = (f"killed {killed} of {len(counted)} non-equivalent mutants "
               f"({100 * killed / max(1, len(counted)):.1f}%); "
               f"{len(rows) - len(counted)} declared equivalent")
    table = "\n".join(lines) + "\n\n" + summary + "\n"
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
