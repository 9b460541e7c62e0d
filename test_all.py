"""test_all.py -- the test suite of this repository (CPU, no network, a few minutes).

    python -m pytest test_all.py            # everything
    python -m pytest test_all.py -k nominal # one stage

Four tiers, one pytest marker each (registered in pytest.ini; `-m NAME` runs one alone):
  shape   -- shared blocks identical across stage files; no stage imports another; --help.
  oracle  -- each formula against an independent computation (naive loops, closed forms,
             properties that must hold).
  smoke   -- each stage run end to end at toy scale on generated data (no downloads), plus the
             bad-input contract (exit code 2, one clear message, no traceback).
  wiring  -- each training stage run with its own functions wrapped, so that every piece of its
             loop is checked to reach what it feeds (a deleted line or a swapped argument fails a
             test); the per-dataset defaults against the paper's words.

    python -m pytest test_all.py -m oracle  # one tier

Index: the paper's equations and the evaluation, in the paper's order, and the tests that check
each against an independent computation; then the stages end to end and the plumbing.  Each line's
tests sit under the section banner below whose title begins with the line's name, in this order
(test_the_index_names_tests_that_exist keeps both true).
  shape                      test_shared_blocks_identical_across_stages,
                             test_every_test_has_one_registered_tier
  Eq. (3)                    test_magnet_loss_equals_a_naive_loop_over_eq3,
                             test_magnet_loss_gradient_matches_finite_differences,
                             test_fit_clusters_per_class_with_eq3_variance
  Eq. (4)                    test_cluster_log_probs_is_eq4, test_class_scores_are_eq4_log_scores_against_a_float64_loop,
                             test_eq4_expanded_form_in_float32_agrees_with_float64_explicit_differences,
                             test_qtrades_nearest_mask_is_the_d_smallest_float64_distances_and_eq4s_set
  k-means++                  test_kmeans_pp_finds_the_brute_force_optimum,
                             test_kmeans_pp_on_relu_like_float32_rows_float64_nearest_and_means
  the neighbourhood sampler  test_sampler_batches_are_m_clusters_of_d_with_the_nearest_impostors,
                             test_sampler_seeds_in_proportion_to_the_recent_loss
  Eq. (5)                    test_pgd_reaches_the_closed_form_optimum_of_linear_classifiers,
                             test_restarts_with_early_exit_equal_every_restart_on_every_example,
                             test_attack_objectives_match_naive_float64_loops
  the attacks' worst case    test_cascade_and_per_loss_equal_a_naive_loop_of_each_example_alone,
                             test_square_accepts_exactly_the_queries_that_lower_the_margin_in_windows_of_its_schedule,
                             test_margin_t_targets_the_top_classes_of_a_naive_ranking_with_ties_and_d_masks,
                             test_recompute_counts_rounding_level_disagreements_and_exits_1_beyond_them,
                             test_each_broken_attack_fails_its_check_and_the_correct_one_passes_them_all
  Prop. 1, the radius        test_prop1_radius_matches_a_naive_loop,
                             test_isometry_one_centre_per_class_radius_is_the_exact_distance_and_a_step_beyond_flips,
                             test_several_centres_per_class_sound_radius_never_exceeds_the_exact_distance
  Prop. 1, the Lipschitz     test_conv_bound_is_above_the_exact_norm_and_equal_for_circular_padding,
                             test_lipschitz_bound_is_above_jacobian_norms_on_random_resnets,
                             test_lipschitz_bound_is_exact_where_the_network_is_a_composition_of_its_layer_norms
  certify.py's L2 attack     test_l2_attack_on_a_linear_feature_map_finds_the_closed_form_distance_to_the_decision_hyperplane,
                             test_batched_l2_attack_equals_a_per_example_loop_and_its_examples_flip_at_their_distance,
                             test_power_iteration_span_beats_the_plain_iterate_and_reaches_the_explicit_jacobian_norm
  certify.py's certified-accuracy curves
                             test_certified_accuracy_curve_is_a_brute_force_count_of_correct_images_with_radius_above_r,
                             test_certify_results_pair_each_image_with_its_own_radius_and_recount_like_a_naive_loop
  Eq. (6)                    test_consistency_is_eq6_cross_entropy_with_finite_gradients,
                             test_lam_0_is_magnet_py_loss_and_lam_adds_the_naive_consistency,
                             test_quick_adversary_is_one_signed_step_in_the_ball_and_raises_the_loss
  Sec. 4.1, exact Lipschitz  test_exact_lipschitz_of_random_networks,
                             test_exact_lipschitz_of_a_single_linear_layer_is_its_spectral_norm
  Sec. 4.1, Fig. 3           test_every_radius_is_sound, test_both_runs_start_from_the_same_weights_and_take_the_same_steps
  end to end: nominal.py     test_tiny_training_run_learns, test_checkpoint_has_the_documented_entries_and_round_trips
  end to end: magnet.py      test_warm_start_beats_random_init_at_equal_epochs,
                             test_clustr_checkpoint_reproduces_eq4_accuracy_from_its_own_contents
  end to end: attack.py      test_tiny_nominal_checkpoint_is_fooled_at_a_large_eps
  end to end: the library use
                             test_export_loads_in_a_clean_interpreter_and_matches_load_classifier
  end to end: certify.py     test_certify_end_to_end_matches_a_naive_recomputation
  end to end: synthetic.py   test_short_run_writes_the_documented_json_with_non_increasing_curves,
                             test_synthetic_refuses_bad_numbers_and_an_existing_out_without_overwrite
  end to end: qtrades.py     test_both_variants_write_documented_checkpoints_that_attack_py_evaluates
  end to end, every training stage
                             test_resume_is_bit_identical_to_an_uninterrupted_run,
                             test_every_stage_writes_the_entries_and_types_every_reader_expects
  wiring: nominal.py         test_nominal_adam_steps_on_the_gradient_of_each_shuffled_batch_alone
  wiring: magnet.py          test_magnet_sampler_is_fed_the_losses_the_loop_computed_for_the_rows_it_drew
  wiring: qtrades.py         test_qtrades_lam_scales_the_consistency_term_of_each_step_gradient
  wiring: the per-dataset defaults
                             test_every_per_dataset_default_is_the_papers, test_paper_defaults_per_dataset_and_help
  the reproduction's verdicts
                             test_reproduce_judges_each_claim_by_the_95_percent_t_interval_of_its_paired_seed_differences
  plumbing                   test_bad_input_exits_2_with_one_line_and_changes_no_file,
                             test_overwrite_keeps_the_old_files_until_the_first_save_of_a_finite_model,
                             test_a_signal_exits_130_naming_the_saved_epoch_and_resume_continues_bit_identically,
                             test_torchrun_with_2_cpu_processes_writes_the_single_process_result,
                             test_compile_flag_reaches_the_network_each_stage_trains_and_attacks
"""

import ast
import contextlib
import copy
import datetime
import difflib
import io
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.abspath(__file__))
STAGES = ["nominal.py", "magnet.py", "qtrades.py", "attack.py", "certify.py", "synthetic.py"]
PRESENT = [s for s in STAGES if os.path.exists(os.path.join(ROOT, s))]

# the stages under test (each guards its entry point, so importing runs nothing)
import attack  # noqa: E402
import certify  # noqa: E402
import magnet  # noqa: E402
import nominal  # noqa: E402
import qtrades  # noqa: E402
import synthetic  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One torch thread for the whole suite.  On a 2-core machine shared with other jobs, torch's
    OpenMP threads spin while they wait for busy cores: the magnet tests took 232 s with 2 threads
    under a load average of 5 and 14 s with 1.  Session scope: set before session fixtures run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ======================================================================================
# fixtures and helpers shared by several sections
# ======================================================================================

# The environment as the session found it: the background jobs below start their interpreters with
# it, not with os.environ, which a test in the main thread may be changing at that moment
# (monkeypatch.setenv("WORLD_SIZE", ...) would make a stage started then join a torchrun group).
SESSION_ENV = dict(os.environ)


def child_env():
    """SESSION_ENV on one thread (OMP_NUM_THREADS=1: the suite's float sums, and a share of the cores)."""
    return dict(SESSION_ENV, OMP_NUM_THREADS="1")


def run_script(script, *args, cwd=None):
    """Run a stage as a user would; returns (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd or ROOT, timeout=600, env=child_env())
    return proc.returncode, proc.stdout, proc.stderr


def nominal_args(folder, out, *extra):
    """nominal.py on a generated folder at the suite's size (width 8, batch 32), then extra."""
    return ["--data", "folder", "--data-dir", folder, "--width", "8", "-b", "32", "--out", out,
            *map(str, extra)]


def certified_radius(features, centers, center_classes, lipschitz):
    """Prop. 1 for the tests: -> (pred [n], sound radius R(x) [n], two-closest radius [n])."""
    r = certify.certified_radii(features, centers, center_classes, lipschitz)
    return r["pred"], r["radius"], r["two_closest"]


# Fresh interpreters, started when the session starts.  A test that runs a stage as a user would
# (its own interpreter: torch's import alone costs 3-4 s here) registers a job: `prepare(request)`
# runs in the suite's own thread when the session starts (it may take fixtures) and returns the
# function that starts the interpreters and waits for them; a worker thread runs these one after
# another on the core the suite leaves idle (it runs on one torch thread), and the test takes the
# job's result when its turn comes and checks it there.  Only the jobs of the selected tests start.
BACKGROUND = {}                                     # job name -> (test name, prepare)


def background_job(name, test):
    def register(prepare):
        BACKGROUND[name] = (test, prepare)
        return prepare
    return register


@pytest.fixture(scope="session", autouse=True)
def background(request, one_torch_thread):
    """{job name: Future} of the selected tests' jobs, in the order they were registered."""
    import concurrent.futures
    tests = {f.__name__ for f in globals().values() if callable(f) and f.__name__.startswith("test_")}
    assert all(test in tests for test, _ in BACKGROUND.values()), "a job names a test that does not exist"
    selected = {item.originalname for item in request.session.items}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="background")
    jobs = {}
    for name, (test, prepare) in BACKGROUND.items():
        if test in selected:
            try:
                with torch.random.fork_rng(devices=[]):     # the tests' global stream as it was
                    jobs[name] = pool.submit(prepare(request))
            except (KeyboardInterrupt, pytest.exit.Exception):
                raise
            except BaseException as error:         # a fixture it needs failed, exited or skipped:
                jobs[name] = concurrent.futures.Future()  # its test alone reports it
                jobs[name].set_exception(error)
    yield jobs
    pool.shutdown(wait=True, cancel_futures=True)


def exit_code_and_message(capsys, fn, *args):
    """Call fn(*args) that must exit 2 (README "Bad input and safety"); return its stderr.  A stage's
    main runs behind its entry point, guarded(main)."""
    stage = sys.modules[fn.__module__]
    with pytest.raises(SystemExit) as info:
        (stage.guarded(fn) if fn.__name__ == "main" and hasattr(stage, "guarded") else fn)(*args)
    assert info.value.code == 2
    return capsys.readouterr().err


def make_image_folder(root, classes=3, n_train=60, n_test=30, size=16, noise=60.0, seed=0):
    """A learnable ImageFolder of PNGs: class c is a noisy patch of colour c (plus a class-specific
    bright quadrant), so a small CNN separates the classes within a few epochs."""
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


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("folder")))


@pytest.fixture(scope="session")
def nominal_run(image_folder, tmp_path_factory):
    """One tiny nominal training run shared by several tests: (results, checkpoint path)."""
    out = str(tmp_path_factory.mktemp("nominal") / "ckpt.pt")
    results = nominal.main(nominal_args(image_folder, out, "--epochs", 3))
    return results, out


class Features(nn.Module):
    """A stand-in network whose features are the input itself (times a scale): puts the
    features exactly where a test wants them relative to the centres."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = scale

    def features(self, x):
        return x.flatten(1) * self.scale


def clusters(centers, center_classes, sigma2, D=None):
    return {"centers": torch.as_tensor(centers), "center_classes": torch.as_tensor(center_classes),
            "variance": sigma2, "K": 2, "alpha": 12.5, "D": D}


def arch_entry(width, in_channels):
    """A checkpoint's `arch` entry (README "Where results and checkpoints go")."""
    return {"name": "resnet18", "width": width, "feat_dim": 8 * width, "in_channels": in_channels}


def resnet(arch, data, with_head):
    """A ResNet18 with fresh weights, shaped by a checkpoint's `arch` and `data` entries."""
    return nominal.ResNet18(data["num_classes"] if with_head else 0, arch["width"], arch["in_channels"],
                            data["mean"], data["std"])


@pytest.fixture(scope="session")
def clustering_ckpt(nominal_run, image_folder, tmp_path_factory):
    """A clustering checkpoint (stage magnet) made from the nominal one without
    magnet.py: eval-mode training features; K = 2 centres per class = the means of the two halves
    of the class split at the median of its first principal direction; sigma^2 = 1/(N-1) sum of
    squared distances to the nearest own-class centre (Eq. (3))."""
    _, path = nominal_run
    ck = torch.load(path, map_location="cpu", weights_only=True)
    model = attack.build_model(ck, path, with_head=True).eval()
    (train_x, train_y), _, _ = nominal.load_data("folder", image_folder)
    with torch.no_grad():
        f = model.features(nominal.to_float(train_x))
    centers, center_classes, own = [], [], []
    for c in range(ck["data"]["num_classes"]):
        fc = f[train_y == c]
        proj = (fc - fc.mean(0)) @ torch.linalg.svd(fc - fc.mean(0), full_matrices=False).Vh[0]
        mu = torch.stack([fc[proj <= proj.median()].mean(0), fc[proj > proj.median()].mean(0)])
        centers.append(mu)
        center_classes += [c, c]
        own.append((fc[:, None] - mu[None]).pow(2).sum(-1).min(1).values)
    own = torch.cat(own)
    ckpt = dict(ck, stage="magnet",
                model={k: v for k, v in ck["model"].items() if not k.startswith("head.")},
                clusters=clusters(torch.cat(centers), center_classes, float(own.sum() / (len(own) - 1))))
    del ckpt["resume"]
    out = str(tmp_path_factory.mktemp("clustr") / "magnet.pt")
    torch.save(ckpt, out)
    return out


def generated_checkpoint(path, stage="magnet", D=None, classes=4, width=4, size=16, seed=0):
    """A clustr/1 checkpoint with random weights (no training): random eval-mode batch-norm
    statistics, K = 2 centres per class near the features of random images, sigma^2 their feature
    variance.  Enough to check that scores, export and loading agree; says nothing of robustness."""
    with torch.random.fork_rng(devices=[]):                              # leaves the global stream as it was
        return _generated_checkpoint(path, stage, D, classes, width, size, seed)


def _generated_checkpoint(path, stage, D, classes, width, size, seed):
    g = torch.Generator().manual_seed(seed)
    data = {"name": "folder", "num_classes": classes, "classes": [f"class{c:02d}" for c in range(classes)],
            "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "image_size": [size, size]}
    arch = arch_entry(width, 3)
    head = stage in ("nominal", "qtrades-ce")
    torch.manual_seed(seed)
    model = resnet(arch, data, head)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
    ckpt = {"format": attack.FORMAT, "stage": stage, "arch": arch, "data": data,
            "model": model.state_dict(), "args": {}, "epoch": 0, "metrics": {}}
    if not head:
        with torch.no_grad():
            f = model.eval().features(torch.rand(2 * classes, 3, size, size, generator=g))
        ckpt["clusters"] = clusters(f + 0.01 * torch.randn(f.shape, generator=g),
                                    torch.arange(2 * classes) % classes, float(f.var(0).sum()) / 4, D)
    torch.save(ckpt, path)
    return path


@pytest.fixture
def own_rng():
    """The tests that take it leave torch's global random stream as they found it: later tests
    (random_resnet's convolutions) draw from it."""
    with torch.random.fork_rng(devices=[]):
        yield


# ======================================================================================
# shape: shared blocks, the flat layout, this file's index and tiers
# ======================================================================================

BEGIN = re.compile(r"^# --- shared: ([\w-]+) ---$")


END = re.compile(r"^# --- end shared: ([\w-]+) ---$")


def shared_blocks(text, filename="<text>"):
    """-> ({name: block text}, [problems]) for one file's `# --- shared: NAME ---` blocks."""
    blocks, problems, name, lines = {}, [], None, []
    for number, line in enumerate(text.splitlines(), 1):
        begin, end = BEGIN.match(line), END.match(line)
        if begin:
            if name is not None:
                problems.append(f"{filename}:{number}: block '{begin.group(1)}' opens inside '{name}'")
            name, lines = begin.group(1), []
        elif end:
            if name != end.group(1):
                problems.append(f"{filename}:{number}: 'end shared: {end.group(1)}' closes "
                                f"{'nothing' if name is None else repr(name)}")
            elif name in blocks:
                problems.append(f"{filename}: block '{name}' appears twice")
            else:
                blocks[name] = "\n".join(lines) + "\n"
            name = None
        elif name is not None:
            lines.append(line)
    if name is not None:
        problems.append(f"{filename}: block '{name}' is never closed")
    return blocks, problems


def check_shared(paths):
    """Every copy of a shared block must be the same text in every file. Returns the problems,
    each with a unified diff against the first file that has the block and the file to fix."""
    problems, first = [], {}
    for path in paths:
        with open(path) as f:
            blocks, found = shared_blocks(f.read(), os.path.basename(path))
        problems += found
        for name, text in blocks.items():
            if name not in first:
                first[name] = (path, text)
            elif text != first[name][1]:
                ref_path, ref = first[name]
                diff = "".join(difflib.unified_diff(
                    ref.splitlines(True), text.splitlines(True),
                    os.path.basename(ref_path), os.path.basename(path)))
                problems.append(f"shared block '{name}' in {os.path.basename(path)} differs from "
                                f"{os.path.basename(ref_path)}; fix {os.path.basename(path)}:\n{diff}")
    return problems


@pytest.mark.shape
def test_shared_blocks_identical_across_stages():
    paths = [os.path.join(ROOT, s) for s in PRESENT]
    problems = check_shared(paths)
    assert not problems, "\n".join(problems)
    with open(os.path.join(ROOT, "nominal.py")) as f:
        names = set(shared_blocks(f.read())[0])
    assert {"cli", "common-args", "files", "dataset", "train-data", "model", "checkpoint", "train-run"} <= names


@pytest.mark.shape
def test_shared_checker_catches_drift_and_bad_markers(tmp_path):
    good = "x = 1\n# --- shared: blk ---\ndef f():\n    return 1\n# --- end shared: blk ---\n"
    (tmp_path / "a.py").write_text(good)
    (tmp_path / "b.py").write_text(good.replace("return 1", "return 2"))
    (tmp_path / "c.py").write_text(good)
    assert check_shared([tmp_path / "a.py", tmp_path / "c.py"]) == []
    problems = check_shared([tmp_path / "a.py", tmp_path / "b.py"])
    assert len(problems) == 1 and "fix b.py" in problems[0]
    assert "-    return 1" in problems[0] and "+    return 2" in problems[0]
    # a block that is never closed, closed under another name, or opened twice
    assert shared_blocks("# --- shared: a ---\nx\n")[1]
    assert shared_blocks("# --- shared: a ---\nx\n# --- end shared: b ---\n")[1]
    assert shared_blocks("# --- shared: a ---\n# --- end shared: a ---\n" * 2)[1]


@pytest.mark.shape
def imported_modules(path):
    """Top-level names of every module the Python file imports (anywhere in it)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    return imported


@pytest.mark.shape
def test_no_stage_imports_another_and_every_stage_has_a_main_guard():
    local = {s[:-3] for s in STAGES} | {"test_all"}
    for stage in PRESENT:
        with open(os.path.join(ROOT, stage)) as f:
            source = f.read()
        imported = imported_modules(os.path.join(ROOT, stage))
        assert not imported & local, f"{stage} imports {imported & local}"
        assert 'if __name__ == "__main__":' in source, stage
        assert not re.search(r"torch\.load\((?![^)]*weights_only=True)", source), stage


def code_names(tree):
    """Every name a reader meets in code: variables, arguments, attributes, keyword arguments."""
    for node in ast.walk(tree):
        for name in (getattr(node, "id", None), getattr(node, "arg", None),
                     node.attr if isinstance(node, ast.Attribute) else None,
                     node.name if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else None):
            if name:
                yield name


@pytest.mark.shape
def test_one_name_per_paper_symbol_and_one_helper_for_the_d_nearest_centres():
    """README "Paper symbols, flags, variables": each name of its code column is a name in the
    stages' code, and sigma^2 is never `variance` there (the checkpoint and log key stays
    "variance"); the D nearest centres of Eq. (4) come from the eq4 block's nearest_centers_mask
    alone: every other ranking (topk, sort, argsort, kthvalue) of a stage is one of those below."""
    with open(os.path.join(ROOT, "README.md")) as f:
        table = f.read().split("### Paper symbols, flags, variables")[1].split("\n## ")[0]
    documented = {name for row in table.splitlines()[4:] if row.startswith("|")
                  for name in re.findall(r"`(\w+)`", row.split("|")[4])}
    assert {"sigma2", "alpha", "lam", "eps", "step", "centers", "K", "D"} <= documented, documented
    names, topk = set(), {}
    for stage in PRESENT:
        with open(os.path.join(ROOT, stage)) as f:
            tree = ast.parse(f.read())
        names |= set(code_names(tree))
        assert "variance" not in set(code_names(tree)), stage
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef):
                for node in ast.walk(fn):
                    if isinstance(node, ast.Attribute) and node.attr in ("topk", "sort", "argsort", "kthvalue"):
                        topk.setdefault(fn.name, set()).add(stage)
    assert documented <= names, documented - names
    assert set(topk) == {"nearest_centers_mask",  # the D nearest centres (Eq. (4), Sec. 4.2)
                         "_lloyd",                # k-means: the farthest points re-seed empty clusters
                         "set_clusters",          # the sampler: rows by cluster, impostor clusters (App. A)
                         "rank_targets",          # attack.py: target classes by score (APGD-T's order)
                         "recompute"}, topk       # attack.py: how near the D nearest are to changing
    users = [s for s in PRESENT if "nearest_centers_mask(" in open(os.path.join(ROOT, s)).read()]
    assert topk["nearest_centers_mask"] == set(users) == {"magnet.py", "qtrades.py", "attack.py", "certify.py"}


@pytest.mark.shape
def test_benchmarks_do_not_import_the_test_file():
    """A benchmark is a user of the stage files; the test file is not a library (its generators
    for benchmarks live in benchmarks/generated.py)."""
    scripts = sorted(f for f in os.listdir(os.path.join(ROOT, "benchmarks")) if f.endswith(".py"))
    assert "generated.py" in scripts
    for script in scripts:
        assert "test_all" not in imported_modules(os.path.join(ROOT, "benchmarks", script)), script


@pytest.mark.shape
def test_every_readme_command_block_is_tested_or_states_its_time():
    """Each command of a README shell block either runs in a test (a `<!-- snippet -->` block, or a
    comment saying "tested"), states its measured time in a comment (`# ..., 1 min`, `~20 s`), or
    says that it is not run here (in a comment or in the paragraph above its block)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    blocks = list(re.finditer(r"(<!-- snippet: \w+ -->\n)?```bash\n(.*?)```", text, re.S))
    assert len(blocks) >= 4
    for block in blocks:
        above = text[:block.start()].rstrip().rsplit("\n\n", 1)[-1]
        if block.group(1) or "not run here" in above.lower():
            continue
        for command in block.group(2).replace("\\\n", " ").splitlines():
            if re.match(r"\s*(python|pip|apt-get|torchrun|sudo)\b", command):
                note = command.split("#", 1)[1] if "#" in command else ""
                assert re.search(r"\d\s*(s|min|h)\b|tested|not run here", note), command


@pytest.mark.shape
def test_every_readme_reference_names_a_heading_that_exists():
    """A comment, docstring or help text that sends the reader to a README heading (the word
    README, then the heading in double quotes) finds that heading there, word for word; and no file
    cites a document a user of the repository does not have (the project's contract, a test file
    that does not exist)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        headings = {line.lstrip("#").strip() for line in f if re.match(r"#{1,4} ", line)}
    files = PRESENT + ["test_all.py"] + [os.path.join("benchmarks", f) for f in os.listdir(
        os.path.join(ROOT, "benchmarks")) if f.endswith(".py")]
    cited = 0
    for name in files:
        with open(os.path.join(ROOT, name)) as f:
            text = f.read()
        for ref in re.findall("README" + r' "([^"(][^"]*)"', text):
            ref = " ".join(ref.split())                             # a reference may wrap a line
            assert ref in headings, f"{name}: README \"{ref}\" is not a heading of README.md"
            cited += 1
        outside = ["SP" + "EC", "test_" + "certify.py"]                 # spelt apart: this file is read too
        assert not any(word in text for word in outside), name
    assert cited > 50


PUBLIC = {"main", "load_classifier"}                   # a stage's names for other programs


@pytest.mark.shape
@pytest.mark.parametrize("stage", PRESENT)
def test_each_stage_reads_like_its_paper_section(stage):
    """README "Design": the stage's own method begins (banner `# 2. The method`) within the first
    25% of the file, its sections are numbered 1, 2, 3, ... in order, no function is longer than 40
    lines, and every top-level definition is used in the file (or is public)."""
    with open(os.path.join(ROOT, stage)) as f:
        source = f.read()
    lines, tree = source.splitlines(), ast.parse(source)
    method = [i for i, line in enumerate(lines, 1) if line.startswith("# 2. The method")]
    assert len(method) == 1 and method[0] <= 0.25 * len(lines), (method, len(lines))
    numbers = [int(m.group(1)) for line in lines for m in [re.match(r"# (\d+)\. \S", line)] if m]
    assert numbers == list(range(1, len(numbers) + 1)), numbers
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno >= 40]
    assert not long, long
    defined = {}
    for node in tree.body:
        targets = [node] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            [t for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        defined.update({getattr(t, "name", getattr(t, "id", None)): (node.lineno, node.end_lineno) for t in targets})
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id in defined
            and not defined[n.id][0] <= n.lineno <= defined[n.id][1]}
    assert set(defined) - used - PUBLIC == set(), sorted(set(defined) - used - PUBLIC)


@pytest.mark.shape
def test_readme_design_table_lists_the_blocks_each_stage_carries():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    section = readme[readme.index("## Design"):readme.index("## Flags")]
    header = next(line for line in section.splitlines() if line.startswith("| block |"))
    stages = [c.strip(" `") + ".py" for c in header.strip("|").split("|")[2:]]
    table = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `"):
            table[cells[0].strip("`")] = {s for s, c in zip(stages, cells[2:]) if c == "x"}
    carried = {}
    for stage in stages:
        with open(os.path.join(ROOT, stage)) as f:
            for name in shared_blocks(f.read())[0]:
                carried.setdefault(name, set()).add(stage)
    assert table == carried


TIERS = ("oracle", "smoke", "shape", "wiring")


@pytest.mark.shape
def test_the_index_names_tests_that_exist():
    """The docstring's index names tests of this file, each once."""
    index = __doc__.split("Index:", 1)[1]
    named = re.findall(r"\b(test_\w+)", index)
    tests = {name for name in globals() if name.startswith("test_")}
    assert len(named) == len(set(named)) >= 20 and set(named) - {"test_the_index_names_tests_that_exist"} <= tests, \
        set(named) - tests
    # each index line's tests sit under the one section banner whose title begins with the line's
    # name, and the lines follow the banners' order in this file
    with open(os.path.join(ROOT, "test_all.py")) as f:
        lines = f.read().splitlines()
    bar = "# " + "=" * 86
    banners = [i for i in range(len(lines) - 1) if lines[i] == bar and lines[i + 1].startswith("# ")
               and lines[i + 1] != bar]
    defs = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"def (test_\w+)\(", line))}
    entries = []
    for line in index.splitlines():
        if re.match(r"  \S", line):
            entries.append((re.split(r"\s{2,}", line.strip())[0], []))
        if entries:
            entries[-1][1].extend(re.findall(r"\b(test_\w+)", line))
    assert len(entries) >= 20 and sum(len(names) for _, names in entries) == len(named) - 1  # less this test
    previous = 0
    for label, names in entries:
        at = [i for i in banners if lines[i + 1][2:].startswith(label)]
        assert len(at) == 1, f"index line {label!r}: {len(at)} section banners begin with it"
        end = min([i for i in banners if i > at[0]] + [len(lines)])
        assert at[0] >= previous, f"index line {label!r} is out of the sections' order"
        previous = at[0]
        for name in names:
            assert at[0] < defs[name] < end, f"{name} is not under the section {label!r}"


@pytest.mark.shape
def test_every_test_has_one_registered_tier():
    """Each test function here carries exactly one tier marker, and pytest.ini registers them
    all, so that `-m oracle`, `-m smoke`, `-m shape`, `-m wiring` partition the suite."""
    import configparser
    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, "pytest.ini"))
    registered = {line.split(":")[0].strip() for line in config["pytest"]["markers"].splitlines() if line.strip()}
    assert registered == set(TIERS) and "--strict-markers" in config["pytest"]["addopts"]
    tests = {name: fn for name, fn in globals().items() if name.startswith("test_") and callable(fn)}
    for name, fn in tests.items():
        tiers = [m.name for m in getattr(fn, "pytestmark", []) if m.name in TIERS]
        assert len(tiers) == 1, f"{name} has tiers {tiers}; give it exactly one of {TIERS}"


# ######################################################################################
# the paper, equation by equation, in its order: each against an independent computation
# ######################################################################################


# ======================================================================================
# Eq. (3): the Magnet loss (magnet.py), and the clusters and sigma^2 it is computed on
# ======================================================================================

def naive_magnet(features, cluster_ids, class_ids, alpha):
    """Eq. (3) written out per example with Python floats (float64): -> (mean, [per], sigma2)."""
    f = features.double().tolist()
    cl, cs = cluster_ids.tolist(), class_ids.tolist()
    ids = sorted(set(cl))
    mu, cls_of = {}, {}
    for k in ids:
        rows = [f[i] for i in range(len(f)) if cl[i] == k]
        mu[k] = [sum(col) / len(rows) for col in zip(*rows)]
        cls_of[k] = cs[cl.index(k)]

    def sq(a, b):
        return sum((x - y) ** 2 for x, y in zip(a, b))
    own = [sq(f[i], mu[cl[i]]) for i in range(len(f))]
    sigma2 = sum(own) / (len(f) - 1)
    per = []
    for i in range(len(f)):
        den = sum(math.exp(-sq(f[i], mu[k]) / (2 * sigma2)) for k in ids if cls_of[k] != cs[i])
        per.append(max(0.0, alpha + own[i] / (2 * sigma2) + math.log(den)))
    return sum(per) / len(per), per, sigma2


@pytest.mark.oracle
def test_magnet_loss_equals_a_naive_loop_over_eq3():
    g = torch.Generator().manual_seed(0)
    for trial in range(6):
        n_clusters, dim = 3 + trial, 2 + trial
        cluster_of = torch.randint(0, n_clusters, (30,), generator=g)
        cluster_of[:n_clusters] = torch.arange(n_clusters)               # every cluster present
        class_of_cluster = torch.arange(n_clusters) % 3                   # several clusters per class
        f = torch.randn(30, dim, generator=g, dtype=torch.float64) * 1.5
        ids = cluster_of * 11 + 5                                         # arbitrary integer ids
        for alpha in (0.0, 1.0, 12.5):
            mean, per, sigma2 = magnet.magnet_loss(f, ids, class_of_cluster[cluster_of], alpha)
            ref_mean, ref_per, ref_sigma2 = naive_magnet(f, ids, class_of_cluster[cluster_of], alpha)
            assert abs(sigma2.item() - ref_sigma2) < 1e-10 * ref_sigma2
            assert np.allclose(per.numpy(), ref_per, rtol=1e-10, atol=1e-12)
            assert abs(mean.item() - ref_mean) < 1e-10 * max(1, ref_mean)
    # the hinge {.}_+ is active somewhere (alpha 0) and inactive somewhere (alpha 12.5)
    assert (magnet.magnet_loss(f, ids, class_of_cluster[cluster_of], 0.0)[1] == 0).any()
    assert (magnet.magnet_loss(f, ids, class_of_cluster[cluster_of], 12.5)[1] > 0).all()


@pytest.mark.oracle
def test_a_far_same_class_cluster_changes_nothing():
    """The denominator of Eq. (3) runs over other-class clusters only: a cluster of class c must
    not enter the rows of class c, not even as exp(0) = 1 (a mask multiplied into the exponent
    would add exactly that).  The added cluster's two rows sit at mu_far +- v with ||v||^2 =
    sigma^2, so the batch sigma^2 of Eq. (3) stays the same and the old rows must not move."""
    g = torch.Generator().manual_seed(1)
    f = torch.randn(24, 4, generator=g, dtype=torch.float64)
    ids = torch.arange(24) % 6
    classes = ids // 2                                                    # 3 classes x 2 clusters
    _, per, sigma2 = magnet.magnet_loss(f, ids, classes, 1.0)
    v = torch.randn(4, generator=g, dtype=torch.float64)
    v *= sigma2.sqrt() / v.norm()
    far = torch.full((4,), 1e4, dtype=torch.float64)
    f2 = torch.cat([f, (far + v)[None], (far - v)[None]])
    for c in range(3):
        ids2 = torch.cat([ids, torch.tensor([99, 99])])
        classes2 = torch.cat([classes, torch.tensor([c, c])])
        _, per2, sigma2_new = magnet.magnet_loss(f2, ids2, classes2, 1.0)
        assert abs(sigma2_new.item() - sigma2.item()) < 1e-12 * sigma2.item()
        assert torch.allclose(per2[:24], per, rtol=1e-12, atol=0)
    # the test can fail: the same cluster placed *near* class 0's rows as another class's cluster
    # does change class-0 losses
    near = f[classes == 0].mean(0)
    f3 = torch.cat([f, (near + v)[None], (near - v)[None]])
    _, per3, _ = magnet.magnet_loss(f3, torch.cat([ids, torch.tensor([99, 99])]),
                                    torch.cat([classes, torch.tensor([1, 1])]), 1.0)
    assert not torch.allclose(per3[:24][classes == 0], per[classes == 0], rtol=1e-6)


@pytest.mark.oracle
def test_magnet_loss_stays_finite_for_far_apart_features_at_alpha_12_5():
    g = torch.Generator().manual_seed(2)
    ids = torch.arange(40) % 8
    classes = ids // 2
    centres = torch.randn(8, 16, generator=g) * 1e3                      # clusters ~1e3 apart
    f32 = (centres[ids] + torch.randn(40, 16, generator=g)).requires_grad_()
    mean, per, sigma2 = magnet.magnet_loss(f32, ids, classes, 12.5)
    mean.backward()
    assert torch.isfinite(per).all() and torch.isfinite(f32.grad).all()
    # a naive float64 loop would underflow exp(); compare with the float64 logsumexp form instead
    f64 = f32.detach().double()
    mu = torch.stack([f64[ids == k].mean(0) for k in range(8)])
    d2 = ((f64[:, None, :] - mu[None]) ** 2).sum(-1)
    own = d2[torch.arange(40), ids]
    s2 = own.sum() / 39
    log_den = torch.stack([torch.logsumexp(-d2[i, (torch.arange(8) // 2) != classes[i]] / (2 * s2), 0)
                           for i in range(40)])
    ref = torch.relu(12.5 + own / (2 * s2) + log_den)
    assert torch.allclose(per.double(), ref, rtol=1e-4, atol=1e-4)
    assert (ref == 0).all()                                              # far apart: no loss left


@pytest.mark.oracle
def test_magnet_loss_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(3)
    f = torch.randn(12, 3, generator=g, dtype=torch.float64)
    ids = torch.arange(12) % 4
    classes = ids // 2
    assert (magnet.magnet_loss(f, ids, classes, 5.0)[1] > 0).all()       # away from the hinge kink
    f.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: magnet.magnet_loss(x, ids, classes, 5.0)[0], (f,))
    assert torch.autograd.gradcheck(lambda x: magnet.magnet_loss(x, ids, classes, 5.0)[2], (f,))


@pytest.mark.oracle
def test_fit_clusters_per_class_with_eq3_variance(capsys):
    g = torch.Generator().manual_seed(5)
    labels = torch.arange(60) % 3
    f = torch.randn(60, 6, generator=g, dtype=torch.float64) + labels[:, None] * 4.0
    centers, center_classes, assignment, sigma2 = magnet.fit_clusters(f, labels, 3, 2, g)
    assert center_classes.tolist() == [0, 0, 1, 1, 2, 2] and centers.shape == (6, 6)
    assert torch.equal(center_classes[assignment], labels)              # own class's clusters only
    for j in range(6):                                                   # centres = means
        assert torch.allclose(centers[j].double(), f[assignment == j].mean(0), atol=1e-5)
    for n in range(60):                                                  # v* of Eq. (3)
        own = [j for j in range(6) if j // 2 == labels[n]]
        d2 = [float(((f[n] - centers[j].double()) ** 2).sum()) for j in own]
        assert own[int(np.argmin(d2))] == assignment[n]
    ref = sum(float(((f[n] - centers[assignment[n]].double()) ** 2).sum()) for n in range(60)) / 59
    assert sigma2 == pytest.approx(ref, rel=1e-5)
    with pytest.raises(magnet.BadInput, match="K=3"):                      # fewer than K rows in a class
        magnet.fit_clusters(f[:7], labels[:7], 3, 3, g)


# ======================================================================================
# Eq. (4): soft nearest-cluster probabilities (magnet.py, attack.py's class scores, QTRADES' D nearest)
# ======================================================================================

def naive_eq4(f, centers, center_classes, sigma2, D=None):
    """Eq. (4) with Python floats; D nearest centres by distance."""
    out = []
    for row in f.double().tolist():
        e = [math.exp(-sum((a - b) ** 2 for a, b in zip(row, mu)) / (2 * sigma2))
             for mu in centers.double().tolist()]
        keep = sorted(range(len(e)), key=lambda j: -e[j])[:D or len(e)]
        den = sum(e[j] for j in keep)
        out.append([sum(e[j] for j in keep if center_classes[j] == c) / den
                    for c in range(int(center_classes.max()) + 1)])
    return np.array(out)


@pytest.mark.oracle
def test_cluster_log_probs_is_eq4():
    g = torch.Generator().manual_seed(4)
    f = torch.randn(9, 5, generator=g, dtype=torch.float64)
    centers = torch.randn(8, 5, generator=g, dtype=torch.float64)
    center_classes = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    for D in (None, 8, 3):
        log_p = magnet.cluster_log_probs(f, centers, center_classes, 0.8, D)
        assert np.allclose(log_p.exp().numpy(), naive_eq4(f, centers, center_classes, 0.8, D), atol=1e-12)
        assert torch.allclose(log_p.logsumexp(1), torch.zeros(9, dtype=torch.float64), atol=1e-12)
    # D = 1: all the probability on the class of the nearest centre
    nearest = ((f[:, None] - centers[None]) ** 2).sum(-1).argmin(1)
    log_p = magnet.cluster_log_probs(f, centers, center_classes, 0.8, D=1)
    assert torch.equal(log_p.argmax(1), center_classes[nearest])
    assert torch.allclose(log_p.max(1).values, torch.zeros(9, dtype=torch.float64))
    assert (log_p.isinf().sum(1) == 3).all()                             # the other classes: p = 0


@pytest.mark.oracle
def test_cluster_log_probs_gradients_are_finite_far_away_and_for_absent_classes():
    g = torch.Generator().manual_seed(5)
    centers = torch.randn(6, 8, generator=g) * 1e3
    center_classes = torch.tensor([0, 0, 1, 1, 2, 2])
    f = (torch.randn(4, 8, generator=g) * 1e3).requires_grad_()        # far from every centre
    for D in (None, 2):
        log_p = magnet.cluster_log_probs(f, centers, center_classes, 0.5, D)
        y = log_p.argmax(1)
        (-log_p[torch.arange(4), y]).sum().backward()
        assert torch.isfinite(f.grad).all()
        f.grad = None
    log_p = magnet.cluster_log_probs(f, centers, center_classes, 0.5, None)
    assert torch.isfinite(log_p).all() and torch.allclose(log_p.logsumexp(1), torch.zeros(4), atol=1e-5)


def relu_like_clusters(seed, n, dim=512, classes=100, K=2, spread=0.03, close=False):
    """ReLU-like features around centres that share a non-negative base (norms about 25, as a
    width-64 ResNet18's pooled features), sigma^2 from a tight clustering (Eq. (3)), so that the
    exponents of Eq. (4) reach a few hundred.  close: the rows lie 2e-4 per feature from a centre
    (squared distance about 2e-5, the size of float32 rounding in the expanded form).
    -> float64 features [n, d], centres [M, d], centre classes [M], labels [n], sigma^2."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(dim, generator=g, dtype=torch.float64).abs()
    centers = (base + 0.5 * torch.randn(classes * K, dim, generator=g, dtype=torch.float64)).clamp_min(0)
    own = torch.randint(classes * K, (n,), generator=g)
    noisy = (centers[own] + spread * torch.randn(n, dim, generator=g, dtype=torch.float64)).clamp_min(0)
    sigma2 = float((noisy - centers[own]).pow(2).sum() / (n - 1))
    f = centers[own] + 2e-4 * torch.randn(n, dim, generator=g, dtype=torch.float64) if close else noisy
    center_classes = torch.arange(classes).repeat_interleave(K)
    return f, centers, center_classes, center_classes[own], sigma2


def explicit_eq4(f, centers, center_classes, sigma2, D=None, sq=None):
    """Eq. (4) in log space from explicit [n, M, d] differences and an [n, classes, M] masked
    logsumexp (the form the eq4 block had before issue 15); sq: other squared distances."""
    if sq is None:
        sq = (f[:, None, :] - centers[None, :, :]).pow(2).sum(-1)
    s = -sq / (2 * sigma2)
    if D is not None:
        keep = torch.zeros_like(s, dtype=torch.bool).scatter_(1, sq.detach().topk(D, 1, largest=False).indices, True)
        s = s.masked_fill(~keep, float("-inf"))
    member = center_classes[None, :] == torch.arange(int(center_classes.max()) + 1)[:, None]
    return s[:, None, :].masked_fill(~member[None], float("-inf")).logsumexp(-1) - s.logsumexp(-1, keepdim=True)


def eq4_and_input_gradient(fn, f, weights):
    """-> (log p [n, classes], d/df of sum(weights * log p) over the finite entries)."""
    f = f.detach().clone().requires_grad_()
    log_p = fn(f)
    (log_p.masked_fill(~torch.isfinite(log_p), 0) * weights).sum().backward()
    return log_p.detach(), f.grad


@pytest.mark.oracle
def test_eq4_expanded_form_in_float32_agrees_with_float64_explicit_differences():
    """The eq4 block's float32 log-probabilities and input gradients against float64 explicit
    differences, on tight clusters (exponents of about -300) and on rows next to a centre, with
    all centres and with the D = 20 nearest.  Log-probabilities: within 8 float32 epsilons of the
    row's largest |exponent| (measured: the explicit float32 form 1.2-1.7, the shifted expanded
    form 2.5-3.3, less accurate by that factor because the matmul sums 512 products in a longer
    chain than torch's cascaded sum; the same expanded form without the centre shift 20-27, which
    this bound rejects).  Gradients: within 1e-4 relative per row, and on average at least as
    accurate as explicit float32 (measured: 3-4x more accurate)."""
    eps = torch.finfo(torch.float32).eps
    for seed, close in ((0, False), (1, True)):
        f, mu, cc, _, var = relu_like_clusters(seed, 32, close=close)
        weights = torch.randn(f.shape[0], 100, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        s_max = ((f[:, None] - mu[None]).pow(2).sum(-1) / (2 * var)).amax(1, keepdim=True)   # [n, 1]
        assert s_max.min() > 100                                         # large exponents
        for D in (None, 20):
            ref, ref_grad = eq4_and_input_gradient(lambda x: explicit_eq4(x, mu, cc, var, D), f, weights)
            finite = torch.isfinite(ref)
            bound = (8 * eps * s_max).expand_as(ref)[finite]

            def check(fn):
                log_p, grad = eq4_and_input_gradient(fn, f.float(), weights.float())
                assert torch.equal(torch.isfinite(log_p), finite)
                error = (log_p.double() - ref)[finite].abs()
                rel = (grad.double() - ref_grad).norm(dim=1) / ref_grad.norm(dim=1)
                return bool((error <= bound).all()), rel

            ok, rel = check(lambda x: magnet.cluster_log_probs(x, mu.float(), cc, var, D))
            assert ok and rel.max() < 1e-4
            ok_explicit, rel_explicit = check(lambda x: explicit_eq4(x, mu.float(), cc, var, D))
            assert ok_explicit and rel.mean() <= rel_explicit.mean()
            # without the shift the same expanded form loses the digits the bound asks for
            m32 = mu.float()
            assert not check(lambda x: explicit_eq4(x, m32, cc, var, D, sq=x.square().sum(1, keepdim=True)
                                                    - 2 * x @ m32.T + m32.square().sum(1)))[0]


@pytest.mark.oracle
def test_cluster_log_probs_per_class_sums_match_a_masked_logsumexp_without_underflow():
    """The [n, M] per-class reduction against the [n, classes, M] masked logsumexp in float64:
    unsorted centre classes of unequal sizes, a class id without centres, keep masks that empty
    whole classes, and a class 2000 nats below the best (exp underflows there: the per-class
    peak keeps it finite).  Gradients equal the masked form's, finite, and 0 at masked centres."""
    g = torch.Generator().manual_seed(3)
    cc = torch.tensor([2, 0, 3, 0, 2, 2, 0, 3])                         # class 1 has no centre
    mu = torch.randn(8, 6, generator=g, dtype=torch.float64)
    f = torch.randn(10, 6, generator=g, dtype=torch.float64)
    mu[[2, 7]] += 80.0                                                   # class 3 far away
    keep = torch.rand(10, 8, generator=g) < 0.6
    keep[:, 1] = True                                                    # every row keeps a centre
    for k in (None, keep):
        fa, fb = f.clone().requires_grad_(), f.clone().requires_grad_()
        ours = magnet.cluster_log_probs(fa, mu, cc, 0.7, keep=k)
        sq = (fb[:, None] - mu[None]).pow(2).sum(-1)
        s = -sq / 1.4 if k is None else (-sq / 1.4).masked_fill(~k, float("-inf"))
        member = cc[None, :] == torch.arange(4)[:, None]
        ref = s[:, None].masked_fill(~member[None], float("-inf")).logsumexp(-1) - s.logsumexp(-1, keepdim=True)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)) and torch.isinf(ours[:, 1]).all()
        finite = torch.isfinite(ref)
        assert torch.allclose(ours[finite], ref[finite], atol=1e-9, rtol=1e-12)
        if k is None:
            assert (ours[:, 3] < -2000).all()                            # finite, far below 0
        w = torch.randn(10, 4, generator=g, dtype=torch.float64)
        (ours.masked_fill(~finite, 0) * w).sum().backward()
        (ref.masked_fill(~finite, 0) * w).sum().backward()
        assert torch.isfinite(fa.grad).all() and torch.allclose(fa.grad, fb.grad, atol=1e-9, rtol=1e-9)


@pytest.mark.oracle
@pytest.mark.usefixtures("own_rng")
def test_class_scores_are_eq4_log_scores_against_a_float64_loop():
    """load_classifier's module: z_c = log sum_{j in c} exp(s_j) (a naive float64 loop), softmax(z)
    = Eq. (4) computed naively and = exp of the stages' cluster_log_probs; with D the classes
    outside the D nearest get the finite LOW and probability exactly 0; a head gives its logits."""
    torch.manual_seed(0)
    data = {"num_classes": 3, "mean": [0.5] * 3, "std": [0.25] * 3}
    model = resnet(arch_entry(2, 3), data, with_head=False).double().eval()
    x = torch.rand(5, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        f = model.features(x)
    mu = f[[0, 1, 2, 3, 4, 0]] + 0.3 * torch.randn(6, f.shape[1], dtype=torch.float64)   # [6, d]
    mu = mu.float().double()                          # the classifier keeps the centres in float32
    mu_class = [0, 0, 1, 1, 2, 2]
    sigma2 = float((f[:, None] - mu[None]).pow(2).sum(-1).mean()) / 8
    for D in (None, 4, 1):
        clf = attack.Classifier(model, clusters(mu, mu_class, sigma2), D)
        scores = attack.Classifier(model, clusters(mu, mu_class, sigma2), D, scores=True).double().eval()
        with torch.no_grad():
            z, log_p = scores(x), clf(x)
        for n in range(len(x)):
            s = [-sum((float(a) - float(b)) ** 2 for a, b in zip(f[n], mu[j])) / (2 * sigma2) for j in range(6)]
            nearest = sorted(range(6), key=lambda j: -s[j])[:D or 6]
            total = sum(math.exp(s[j]) for j in nearest)
            for c in range(3):
                inside = [math.exp(s[j]) for j in nearest if mu_class[j] == c]
                if inside:
                    assert float(z[n, c]) == pytest.approx(math.log(sum(inside)), rel=1e-12, abs=1e-12)
                else:
                    assert float(z[n, c]) == attack.Classifier.LOW
                p = torch.softmax(z[n], 0)[c]
                assert float(p) == pytest.approx(sum(inside) / total, rel=1e-10, abs=1e-300)  # Eq. (4)
        assert torch.allclose(torch.softmax(z, 1), log_p.exp(), rtol=1e-12, atol=0)
    head = resnet(arch_entry(2, 3), data, with_head=True).double().eval()
    with torch.no_grad():
        assert torch.equal(attack.Classifier(head, scores=True).double()(x).float(), head(x).float())


@pytest.mark.oracle
def test_qtrades_nearest_mask_is_the_d_smallest_float64_distances_and_eq4s_set():
    f, mu, cc, _, var = relu_like_clusters(4, 40, classes=20, spread=0.3)
    sq = (f[:, None] - mu[None]).pow(2).sum(-1)                          # float64, explicit
    for D in (1, 5, 39):
        keep = qtrades.nearest_mask(f.float(), mu.float(), D)
        expected = torch.zeros_like(keep).scatter_(1, sq.topk(D, 1, largest=False).indices, True)
        assert torch.equal(keep, expected)
        log_p = magnet.cluster_log_probs(f.float(), mu.float(), cc, var, D)
        assert torch.equal(log_p, qtrades.cluster_log_probs(f.float(), mu.float(), cc, var, keep=keep))
    assert qtrades.nearest_mask(f, mu, None).all() and qtrades.nearest_mask(f, mu, 40).all()


@pytest.mark.oracle
def test_eq4_and_kmeans_distances_stay_float32_under_bfloat16_autocast():
    """The training and attack steps run under autocast, which would turn the expanded form's
    matmul into a bfloat16 one (8 significant bits); the eq4 and kmeans blocks switch it off."""
    f, mu, cc, _, var = relu_like_clusters(7, 64, classes=10, spread=0.1)
    f, mu = f.float(), mu.float()
    x = relu_like_clusters(8, 400, classes=1, K=1, spread=1.0)[0].float()   # one blob: many borders

    def run():
        return (magnet.cluster_log_probs(f, mu, cc, var, 5), qtrades.nearest_mask(f, mu, 5),
                *magnet.kmeans_pp(x, 4, generator=torch.Generator().manual_seed(0)))
    plain = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.mm(f, mu.T).dtype == torch.bfloat16                 # autocast is live here
        mixed = run()
    assert all(torch.equal(a, b) for a, b in zip(plain, mixed))


# ======================================================================================
# k-means++ (Sec. 3.3, App. B.1)
# ======================================================================================

def brute_force_inertia(x, k):
    """Smallest k-means objective over every assignment of the n rows to k non-empty clusters
    (all k^n of them): sum_j sum_{i in j} ||x_i - mean_j||^2 = sum ||x||^2 - sum_j ||s_j||^2 / n_j."""
    a = np.array(list(itertools.product(range(k), repeat=len(x))))     # [k^n, n]
    onehot = (a[:, :, None] == np.arange(k)).astype(float)              # [k^n, n, k]
    counts = onehot.sum(1)                                               # [k^n, k]
    sums = np.einsum("pnk,nd->pkd", onehot, x)                           # [k^n, k, d]
    objective = (x ** 2).sum() - ((sums ** 2).sum(2) / np.maximum(counts, 1)).sum(1)
    return objective[(counts > 0).all(1)].min()


def inertia(x, centers, assignment):
    return float(((x - centers[assignment]) ** 2).sum())


@pytest.mark.oracle
def test_kmeans_pp_finds_the_brute_force_optimum():
    rng = np.random.default_rng(0)
    hits = 0
    for trial in range(24):
        k = 2 + trial % 2
        # separated groups (centres on a circle of radius 10, spread 1): one run must find it
        angles = rng.permutation(k) * 2 * np.pi / k
        blob = np.stack([np.cos(angles), np.sin(angles)], 1) * 10
        x = np.repeat(blob, 3, 0) + rng.normal(size=(3 * k, 2))
        c, a = magnet.kmeans_pp(torch.tensor(x), k, generator=torch.Generator().manual_seed(trial))
        assert inertia(torch.tensor(x), c, a) == pytest.approx(brute_force_inertia(x, k), rel=1e-9)
        # structureless data: every run with tol=rtol=0 is a Lloyd fixed point (centres = means, rows at their
        # nearest centre); the best of 5 seeds reaches the optimum in most problems (Lloyd has
        # local optima: scikit-learn's KMeans, 5 seeds, reached it in 34 of 40 such problems)
        x = rng.normal(size=(8, 2))
        runs = []
        for s in range(5):
            c, a = magnet.kmeans_pp(torch.tensor(x), k, generator=torch.Generator().manual_seed(s), tol=0,
                                    rtol=0)
            for j in range(k):
                assert np.allclose(c[j].numpy(), x[a.numpy() == j].mean(0), atol=1e-12)
            assert torch.equal(a, torch.cdist(torch.tensor(x), c).argmin(1))
            runs.append(inertia(torch.tensor(x), c, a))
        hits += min(runs) <= brute_force_inertia(x, k) * (1 + 1e-9)
    assert hits >= 18


@pytest.mark.oracle
def test_kmeans_pp_duplicates_k_equals_n_and_determinism():
    x = torch.tensor([[0.0, 0.0]] * 5 + [[3.0, 1.0]] * 4, dtype=torch.float64)
    for k in (1, 2, 3, 9):                                               # 3 and 9 > distinct points
        c, a = magnet.kmeans_pp(x, k, generator=torch.Generator().manual_seed(0))
        assert c.shape == (k, 2) and a.shape == (9,) and torch.isfinite(c).all()
        assert 0 <= a.min() and a.max() < k
        assert inertia(x, c, a) == (0.0 if k >= 2 else pytest.approx(5 * 4 / 9 * 10))
    # k = n with distinct rows: every row is its own centre
    y = torch.randn(7, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    c, a = magnet.kmeans_pp(y, 7, generator=torch.Generator().manual_seed(2))
    assert sorted(a.tolist()) == list(range(7)) and torch.allclose(c[a], y)
    with pytest.raises(ValueError):
        magnet.kmeans_pp(y, 8)
    # a seeded generator makes it deterministic; another seed gives another seeding
    z = torch.randn(300, 16, generator=torch.Generator().manual_seed(3))
    first = magnet.kmeans_pp(z, 4, generator=torch.Generator().manual_seed(7))
    again = magnet.kmeans_pp(z, 4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    other = magnet.kmeans_pp(z, 4, generator=torch.Generator().manual_seed(8), iters=0)
    seeded = magnet.kmeans_pp(z, 4, generator=torch.Generator().manual_seed(7), iters=0)
    assert not torch.equal(other[0], seeded[0])


@pytest.mark.oracle
def test_kmeans_pp_separates_blobs_in_512_d():
    """The greedy D^2 seeding puts one centre in each of 10 separated blobs in 512-d (plain
    uniform seeding would often put two in one blob and leave Lloyd stuck)."""
    g = torch.Generator().manual_seed(4)
    blobs = torch.randn(10, 512, generator=g) * 3
    labels = torch.arange(1000) % 10
    x = blobs[labels] + torch.randn(1000, 512, generator=g)
    for seed in range(3):
        _, a = magnet.kmeans_pp(x, 10, generator=torch.Generator().manual_seed(seed))
        pairs = set(zip(a.tolist(), labels.tolist()))
        assert len(pairs) == 10                                          # a bijection blob <-> cluster


@pytest.mark.oracle
def test_kmeans_pp_on_relu_like_float32_rows_float64_nearest_and_means():
    """float32 rows far from the origin (norm about 25, spread about 3): the returned assignment
    is the nearest returned centre by float64 explicit differences (a different one only within
    float32 rounding of a tie), the converged centres (tol = rtol = 0) are their rows' float64
    means, and the default stop's inertia is at or above the converged run's (same seeding:
    an earlier point of the same Lloyd trajectory)."""
    f, mu, cc, labels, _ = relu_like_clusters(5, 3000, classes=3, K=2, spread=0.15)
    x = f.float()
    runs = {}
    for name, kw in (("default", {}), ("converged", {"tol": 0, "rtol": 0})):
        c, a = magnet.kmeans_pp(x, 6, generator=torch.Generator().manual_seed(0), **kw)
        d64 = (x.double()[:, None] - c.double()[None]).pow(2).sum(-1)     # [n, k] explicit
        best = d64.min(1).values
        gap = d64.gather(1, a[:, None])[:, 0] - best
        assert (gap <= 1e-5 * best).all() and (gap == 0).float().mean() > 0.999
        runs[name] = (c, a, float(d64.gather(1, a[:, None]).sum()))
    c, a, inertia_converged = runs["converged"]
    for j in range(6):
        members = x.double()[a == j]
        assert len(members) and torch.allclose(c[j].double(), members.mean(0), atol=1e-5, rtol=0)
    assert runs["default"][2] >= inertia_converged * (1 - 1e-7)


# ======================================================================================
# the neighbourhood sampler (Rippel et al.; App. A)
# ======================================================================================

def toy_clusters(sizes=(30, 30, 25, 30, 12, 30), dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    M = len(sizes)
    centers = torch.randn(M, dim, generator=g) * 5
    center_classes = torch.arange(M) // 2
    assignment = torch.cat([torch.full((s,), j) for j, s in enumerate(sizes)])
    assignment = assignment[torch.randperm(len(assignment), generator=g)]
    return assignment, centers, center_classes


@pytest.mark.oracle
def test_sampler_batches_are_m_clusters_of_d_with_the_nearest_impostors():
    assignment, centers, center_classes = toy_clusters(sizes=(30,) * 10, seed=1)
    sampler = magnet.NeighbourhoodSampler(300, m=4, d=7, generator=torch.Generator().manual_seed(0))
    sampler.set_clusters(assignment, centers, center_classes)
    assert sampler.batches_per_epoch() == math.ceil(300 / 28)
    for _ in range(30):
        rows, ids = sampler.sample()
        assert len(rows) == 28 and len(set(rows.tolist())) == 28       # without replacement
        assert torch.equal(assignment[rows], ids)                        # rows are in their cluster
        order = list(dict.fromkeys(ids.tolist()))
        assert [ids.tolist().count(j) for j in order] == [7] * 4
        seed = order[0]
        # brute force: other-class centres by distance from the seed's centre
        d = [(float(((centers[seed] - centers[j]) ** 2).sum()), j) for j in range(10)
             if center_classes[j] != center_classes[seed]]
        assert order[1:] == [j for _, j in sorted(d)[:3]]


@pytest.mark.oracle
def test_sampler_seeds_in_proportion_to_the_recent_loss(capsys):
    assignment, centers, center_classes = toy_clusters()
    sampler = magnet.NeighbourhoodSampler(len(assignment), m=2, d=5,
                                          generator=torch.Generator().manual_seed(0))
    sampler.set_clusters(assignment, centers, center_classes)
    p = sampler.seed_probabilities()
    assert torch.allclose(p, torch.full((6,), 1 / 6, dtype=p.dtype))    # before any loss: uniform
    # all-zero losses: still uniform, no NaN
    sampler.record(torch.arange(len(assignment)), torch.zeros(len(assignment)))
    assert torch.allclose(sampler.seed_probabilities(), torch.full((6,), 1 / 6, dtype=p.dtype))
    # cluster 2 has five times the loss of the others; cluster 5 has none recorded (never drawn):
    # it counts at the mean of the others
    losses = torch.ones(len(assignment))
    losses[assignment == 2] = 5.0
    sampler.losses = torch.full((len(assignment),), float("nan"))
    seen = assignment != 5
    sampler.record(torch.arange(len(assignment))[seen], losses[seen])
    expected = torch.tensor([1, 1, 5, 1, 1, 9 / 5], dtype=torch.float64)
    expected /= expected.sum()
    assert torch.allclose(sampler.seed_probabilities(), expected)
    draws = 2000
    seeds = torch.tensor([int(sampler.sample()[1][0]) for _ in range(draws)])
    freq = torch.bincount(seeds, minlength=6).double() / draws
    sd = (expected * (1 - expected) / draws).sqrt()
    assert ((freq - expected).abs() < 5 * sd).all(), (freq, expected)
    assert freq[2] > 3 * freq[0]                                        # the lossy cluster wins
    # cluster 4 holds 12 < d = 20 examples: taken whole, with one note
    small = magnet.NeighbourhoodSampler(len(assignment), m=2, d=20,
                                        generator=torch.Generator().manual_seed(1))
    small.set_clusters(assignment, centers, center_classes)
    capsys.readouterr()
    counts = set()
    for _ in range(60):
        rows, ids = small.sample()
        counts |= {int((ids == 4).sum())} if (ids == 4).any() else set()
    assert counts == {12} and capsys.readouterr().out.count("note: cluster") == 1


@pytest.mark.oracle
def test_sampler_state_dict_continues_the_same_stream():
    assignment, centers, center_classes = toy_clusters(seed=2)
    a = magnet.NeighbourhoodSampler(len(assignment), m=3, d=5, generator=torch.Generator().manual_seed(0))
    a.set_clusters(assignment, centers, center_classes)
    for _ in range(5):
        rows, _ = a.sample()
        a.record(rows, torch.rand(len(rows)))
    state = a.state_dict()
    b = magnet.NeighbourhoodSampler(len(assignment), m=3, d=5, generator=torch.Generator().manual_seed(99))
    b.load_state_dict(state)
    for _ in range(5):
        (ra, ia), (rb, ib) = a.sample(), b.sample()
        assert torch.equal(ra, rb) and torch.equal(ia, ib)


# ======================================================================================
# Eq. (5): PGD (attack.py) against closed forms and replays
# ======================================================================================

@pytest.mark.oracle
def test_pgd_reaches_the_closed_form_optimum_of_linear_classifiers():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    n, d, eps = 300, 20, 0.05
    x = torch.rand(n, d, dtype=torch.float64)
    # binary: the L-inf optimum of the margin (w_y - w_o).x' + b_y - b_o over the eps-ball and the
    # box [0, 1] is the vertex x* = clip(x - eps sign(w_y - w_o), 0, 1)
    W, b = torch.randn(2, d, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    y = (x @ W.T + b).argmax(1)
    w = W[y] - W[1 - y]                                                    # [n, d]
    x_star = (x - eps * w.sign()).clamp(0, 1)
    robust = (w * x_star).sum(1) + b[y] - b[1 - y] > 0
    assert 0.2 < robust.float().mean() < 0.8                               # the test can fail both ways
    x_adv, still = attack.pgd(lambda v: F.log_softmax(v @ W.T + b, 1), x, y, eps, eps / 4, 10,
                              loss="ce", generator=g, schedule="constant")
    assert torch.equal(still, robust)
    assert torch.equal(x_adv[robust], x_star[robust])                     # exactly the optimum
    assert ((x_adv[~robust] @ W.T + b).argmax(1) != y[~robust]).all()     # fooled ones are fooled
    # 5 classes: robust iff every pairwise optimum keeps y ahead; the targeted margin towards
    # each of the 4 other classes reaches each of those vertices (cosine: the first step is 2 eps)
    W, b = torch.randn(5, d, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    y = (x @ W.T + b).argmax(1)
    robust = torch.ones(n, dtype=torch.bool)
    for c in range(5):
        w = W[y] - W[c]
        x_c = (x - eps * w.sign()).clamp(0, 1)
        robust &= (y == c) | ((w * x_c).sum(1) + b[y] - b[c] > 0)
    assert 0.2 < robust.float().mean() < 0.8
    x_adv, still = attack.pgd(lambda v: F.log_softmax(v @ W.T + b, 1), x, y, eps, 2 / 255, 3,
                              loss="margin-t", generator=g, targets=4, schedule="cosine")
    assert torch.equal(still, robust)
    assert ((x_adv - x).abs().max() <= eps + 1e-12) and x_adv.min() >= 0 and x_adv.max() <= 1


@pytest.mark.oracle
def test_pgd_on_a_checkpoint_stays_in_the_ball_keeps_batch_norm_and_eps_0_changes_nothing(
        clustering_ckpt, image_folder):
    clf, _ = attack.read_classifier(clustering_ckpt)
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    images, labels, _ = nominal.load_split("folder", image_folder, False, limit=30)
    x, y = nominal.to_float(images), labels
    clean = clf(x).argmax(1) == y
    eps = 8 / 255
    for loss in ("ce", "margin", "margin-t", "magnet", "scores-ce"):
        x_adv, still = attack.pgd(clf, x, y, eps, 2 / 255, 4, 2, loss, torch.Generator().manual_seed(0))
        assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
        assert not (still & ~clean).any()                                  # robust => clean-correct
        with torch.no_grad():                                              # fooled ones re-checked
            assert (clf(x_adv[~still]).argmax(1) != y[~still]).all()
        assert torch.equal(x_adv[~clean], x[~clean])                      # never attacked
    x_adv, still = attack.pgd(clf, x, y, 0.0, 2 / 255, 3, 2, "margin")
    assert torch.equal(x_adv, x) and torch.equal(still, clean)
    assert not clf.training and not any(p.requires_grad for p in clf.parameters())
    for k, v in clf.state_dict().items():                                  # batch-norm buffers too
        assert torch.equal(v, before[k]), k


@pytest.mark.oracle
def test_restarts_with_early_exit_equal_every_restart_on_every_example():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    with torch.no_grad():                          # steeper, centred on the box: varied decisions
        net[0].weight.mul_(10)
        net[0].bias.sub_(net[0].weight.sum(1) / 2)
    for p in net.parameters():
        p.requires_grad_(False)
    x = torch.rand(60, 12, dtype=torch.float64)
    y = net(x).argmax(1)
    fn = lambda v: F.log_softmax(net(v), 1)                                # noqa: E731
    args = (fn, x, y, 0.05, 0.0125, 3)
    _, merged = attack.pgd(*args, restarts=4, loss="margin", generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)               # the same stream, restart by restart, all rows
    each = [attack.pgd(*args, restarts=1, loss="margin", generator=g)[1] for _ in range(4)]
    assert torch.equal(merged, each[0] & each[1] & each[2] & each[3])
    assert (each[0] & ~merged).any() and merged.any()                      # restarts mattered


@pytest.mark.oracle
def test_restarts_merge_by_fooling_not_by_loss_and_random_starts_are_clipped():
    # p(x) = (0.34, 0.33, 0.33) below 0.5: correct, CE 1.08; (0.40, 0.45, 0.15) above: fooled,
    # yet with the lower CE 0.92.  A fooled restart must count whatever its loss.
    seen = []

    def fn(v):
        seen.append(v.detach().clone())
        low = torch.tensor([0.34, 0.33, 0.33]).log()
        high = torch.tensor([0.40, 0.45, 0.15]).log()
        return torch.where(v[:, :1] < 0.5, low, high) + 0 * v[:, :1]
    x, y = torch.full((200, 1), 0.499), torch.zeros(200, dtype=torch.long)   # correct, 0.001 from the edge
    x_adv, merged = attack.pgd(fn, x, y, 0.5, 0.1, 0, restarts=2, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    first, second = (attack.pgd(fn, x, y, 0.5, 0.1, 0, generator=g)[1] for _ in range(2))
    assert torch.equal(merged, first & second)
    assert (first & ~second).any()             # restart 1 survived with the higher loss, 2 fooled
    assert (x_adv[~merged] >= 0.5).all() and (x_adv[merged] < 0.5).all()
    # random starts from the corners of [0, 1] are clipped into it
    seen.clear()
    corners = torch.tensor([[0.0], [1.0]]).repeat(50, 1)
    _, still = attack.pgd(fn, corners, torch.tensor([0, 1]).repeat(50), 0.5, 0.1, 0, restarts=3,
                          generator=torch.Generator().manual_seed(0))
    assert still.all() and len(seen) == 4                  # each restart started every example
    starts = torch.cat(seen[1:])                                           # seen[0]: the clean input
    assert starts.min() >= 0 and starts.max() <= 1
    assert (starts == 0).any() and (starts == 1).any() and ((starts > 0) & (starts < 1)).any()


class Vee(nn.Module):
    """2 classes in float64: class 1 scores -sum_i w_i |x_i - a_i| (a V around the point a), class 0
    a constant 50 above it, so no iterate is ever fooled and the margin loss's input gradient has
    the sign of a - x in every pixel: PGD oscillates around a, its steps seen in full once they
    are shorter than the ball.  Keeps a copy of every batch it is asked about."""

    def __init__(self, a, w):
        super().__init__()
        self.a, self.w, self.seen = a, w, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        z1 = -((x.flatten(1) - self.a).abs() * self.w).sum(1)
        return F.log_softmax(torch.stack([torch.full_like(z1, 50.0), z1], 1), 1)


@pytest.mark.oracle
@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_each_pgd_step_is_its_schedules_eta_k_along_the_gradient_sign_then_the_projection(schedule):
    # eta_k, k = 0..steps-1: constant --step, or the cosine schedule written as 2 eps cos^2(pi k / (2 steps))
    # (= eps (1 + cos(pi k / steps)): 2 eps first, as APGD's first step, down towards 0)
    g = torch.Generator().manual_seed(0)
    n, eps, step, steps = 8, 0.05, 0.02, 8
    x = torch.rand(n, 1, 4, 4, generator=g, dtype=torch.float64)
    x[:2] = x[:2].round()                                                  # on the edges of the box
    a = x.flatten(1) + eps * (2.4 * torch.rand(n, 16, generator=g, dtype=torch.float64) - 1.2)  # a few outside
    clf = Vee(a, 0.5 + torch.rand(16, generator=g, dtype=torch.float64))
    y = torch.zeros(n, dtype=torch.long)
    x_adv, still = attack.pgd(clf, x, y, eps, step, steps, 1, "margin", torch.Generator().manual_seed(1),
                              schedule=schedule)
    assert still.all() and len(clf.seen) == steps + 2                      # the clean pass, x^0 .. x^steps
    iterates = clf.seen[1:]
    x0 = iterates[0]
    assert ((x0 - x).abs() <= eps + 1e-12).all() and x0.min() >= 0 and x0.max() <= 1   # the random start
    etas = [step if schedule == "constant" else 2 * eps * math.cos(math.pi * k / (2 * steps)) ** 2
            for k in range(steps)]
    assert etas[0] == pytest.approx(step if schedule == "constant" else 2 * eps, abs=1e-15)
    for k, eta in enumerate(etas):
        xk, nxt = iterates[k], iterates[k + 1]
        sign = (a - xk.flatten(1)).sign().view_as(xk)                      # the margin gradient's sign

        def naive(eta):                                                    # the step, then Proj_S and [0, 1]
            return torch.minimum(torch.maximum(xk + eta * sign, x - eps), x + eps).clamp(0, 1)
        assert (nxt - naive(eta)).abs().max() <= 1e-12, (k, (nxt - naive(eta)).abs().max())
        # the step's size is seen: 5% shorter would land elsewhere; 5% longer too, after the first
        # (2 eps from a random start in the ball: every pixel reaches the ball's edge or the box's)
        assert (nxt - naive(0.95 * eta)).abs().max() > 1e-6, k
        assert k == 0 or (nxt - naive(1.05 * eta)).abs().max() > 1e-6, k
    assert all(any(torch.equal(x_adv[i], v[i]) for v in iterates) for i in range(n))   # a survivor keeps an iterate


@pytest.mark.oracle
def test_far_features_margin_gradient_survives_where_ce_gradient_vanishes():
    # class 0 centres at (0,0), (1,0); class 1 at (10,0), (11,0); sigma^2 = 0.05; features far
    # from every centre: exp(-d^2 / (2 sigma^2)) underflows for every centre in float32, and the
    # class gap (about 600 in log space) makes log p_y round to 0, so CE has no gradient at all
    clf = attack.Classifier(Features(300.0), clusters([[0., 0.], [1., 0.], [10., 0.], [11., 0.]],
                                                      [0, 0, 1, 1], 0.05)).eval()
    x = torch.stack([torch.linspace(1.0, 2.0, 8) / 300, torch.ones(8)], 1)   # features (1..2, 300)
    y = torch.zeros(8, dtype=torch.long)
    assert torch.isfinite(clf(x)).all() and (clf(x).argmax(1) == 0).all()
    grads = {}
    for loss in ("ce", "margin", "magnet"):
        xg = x.clone().requires_grad_(True)
        obj, _ = attack.objective(clf, xg, y, loss)
        grads[loss], = torch.autograd.grad(obj.sum(), xg)
    assert (grads["ce"] == 0).all()
    for loss in ("margin", "magnet"):
        assert torch.isfinite(grads[loss]).all() and (grads[loss][:, 0] > 0).all()  # towards class 1
    counts, every, correct = attack.zero_gradient_counts(clf, x, y, ["ce", "margin", "magnet"])
    assert counts == {"ce": 8, "margin": 0, "magnet": 0} and every == 0 and correct == 8
    # PGD-CE therefore never moves from its random start; PGD-margin crosses to class 1
    eps = 5.0 / 300                                        # 5 feature units; the boundary is ~4 away
    x_ce, still_ce = attack.pgd(clf, x, y, eps, eps / 5, 10, loss="ce", generator=torch.Generator().manual_seed(0))
    x_0 = attack.pgd(clf, x, y, eps, eps / 5, 0, loss="ce", generator=torch.Generator().manual_seed(0))[0]
    assert torch.equal(x_ce, x_0) and still_ce.any()
    _, still = attack.pgd(clf, x, y, eps, eps / 5, 10, loss="margin", generator=torch.Generator().manual_seed(0))
    assert not still.any()


@pytest.mark.oracle
def test_attack_objectives_match_naive_float64_loops():
    torch.manual_seed(0)
    n, d, C, K, var = 6, 3, 4, 2, 0.7
    centers = torch.randn(C * K, d, dtype=torch.float64)
    cc = torch.arange(C).repeat_interleave(K)
    f = torch.randn(n, d, dtype=torch.float64)
    y = torch.randint(0, C, (n,))
    t = (y + 1) % C
    for D in (None, 3):
        clf = attack.Classifier(Features(), clusters(centers, cc, var), D)
        clf.centers = centers                              # float64, not the float32 buffer copy
        for loss in ("ce", "margin", "margin-t", "magnet", "scores-ce"):
            obj, _ = attack.objective(clf, f, y, loss, t)
            for i in range(n):
                d2 = [sum((f[i, k].item() - centers[j, k].item()) ** 2 for k in range(d)) for j in range(C * K)]
                kept = sorted(range(C * K), key=lambda j: d2[j])[:D or C * K]
                score = [sum(math.exp(-d2[j] / (2 * var)) for j in kept if cc[j] == c) for c in range(C)]
                logp = [math.log(sc / sum(score)) if sc > 0 else -math.inf for sc in score]
                yi = int(y[i])
                expected = {
                    "ce": -logp[yi],
                    "margin": max(logp[c] for c in range(C) if c != yi) - logp[yi],
                    "margin-t": logp[int(t[i])] - logp[yi],
                    # Eq. (3) without alpha and {.}_+, all centres, mu = nearest true-class centre
                    "magnet": min(d2[j] for j in range(C * K) if cc[j] == yi) / (2 * var)
                    + math.log(sum(math.exp(-d2[j] / (2 * var)) for j in range(C * K) if cc[j] != yi)),
                    # the authors' code: softmax over the unnormalised scores as if they were logits
                    "scores-ce": -math.log(math.exp(score[yi]) / sum(math.exp(sc) for sc in score)),
                }[loss]
                if math.isnan(expected):                   # y and t both outside the D nearest
                    assert math.isnan(obj[i].item()), (loss, D, i)
                elif math.isinf(expected):
                    assert math.isinf(obj[i].item()) and (obj[i] > 0) == (expected > 0), (loss, D, i)
                else:
                    assert abs(obj[i].item() - expected) < 1e-9, (loss, D, i)


# ======================================================================================
# the attacks' worst case (Sec. 4.2): Square, targets, the cascade, and the checks against broken attacks
# ======================================================================================

class Quantised(nn.Module):
    """A binary linear classifier on inputs rounded to 1/8: the input gradient is exactly zero
    everywhere (a masked gradient), yet a move of eps = 0.25 per pixel can cross the boundary."""

    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x):
        m = (x.flatten(1) * 8).round() / 8 @ self.w + self.b                # margin of class 0
        return F.log_softmax(torch.stack([m, torch.zeros_like(m)], 1), 1)


@pytest.mark.oracle
def test_square_fools_where_gradients_are_masked_stays_in_the_ball_and_is_seeded():
    torch.manual_seed(0)
    w = torch.randn(16).sign()
    clf = Quantised(w, 1 - 0.5 * w.sum())                 # margin 1 at q(x) = 0.5, up to -3 in the ball
    x = (0.5 + 0.02 * (2 * torch.rand(60, 1, 4, 4) - 1))   # rounds to 0.5: all correct, margin 1
    x[:5] = torch.rand(5, 1, 4, 4).round()                 # a few images on the corners of [0, 1]
    y = torch.zeros(60, dtype=torch.long)
    y[:5] = clf(x[:5]).argmax(1)
    eps = 0.25
    _, every, correct = attack.zero_gradient_counts(clf, x, y, ["ce", "margin"])
    assert every == correct == 60                                          # gradients fully masked
    _, still_pgd = attack.pgd(clf, x, y, eps, 2 / 255, 20, 1, "margin", torch.Generator().manual_seed(0),
                              schedule="cosine")
    x_sq, still_sq = attack.square(clf, x, y, eps, 200, torch.Generator().manual_seed(0))
    assert still_pgd[5:].float().mean() >= 0.8 and still_sq[5:].float().mean() <= 0.1
    assert (x_sq - x).abs().max() <= eps + 1e-6 and x_sq.min() >= 0 and x_sq.max() <= 1
    with torch.no_grad():
        assert (clf(x_sq[~still_sq]).argmax(1) != y[~still_sq]).all()       # fooled ones are fooled
    again = attack.square(clf, x, y, eps, 200, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], x_sq) and torch.equal(again[1], still_sq)  # seeded: the same run
    x0, s0 = attack.square(clf, x, y, 0.0, 200, torch.Generator().manual_seed(0))
    assert torch.equal(x0, x) and torch.equal(s0, clf(x).argmax(1) == y)    # eps 0: nothing moves
    assert [attack.square_side(i, 1000, 32) for i in (1, 10, 999)] == [29, 14, 1]  # p 0.8, 0.2, 0.8/512


class Recorder(nn.Module):
    """2 classes; the margin of class 0 is c + w . x with w zero outside a few pixels, so a query
    that changes only other pixels ties.  Keeps a copy of every batch it is asked about."""

    def __init__(self, w, c):
        super().__init__()
        self.w, self.c, self.seen = w, c, []

    def margin(self, x):
        return self.c + x.flatten(1).double() @ self.w

    def forward(self, x):
        self.seen.append(x.detach().clone())
        m = self.margin(x)
        return F.log_softmax(torch.stack([m, -m], 1) / 2, 1)


@pytest.mark.oracle
@pytest.mark.parametrize("c", [3.0, -0.1])                  # never fooled; fooled by some queries
def test_square_accepts_exactly_the_queries_that_lower_the_margin_in_windows_of_its_schedule(c):
    g = torch.Generator().manual_seed(1)
    n, C, H, W, eps, queries = 12, 2, 4, 4, 0.1, 150
    w = torch.zeros(C * H * W, dtype=torch.float64)
    w[[5, 18, 31]] = torch.tensor([-1.0, 2.0, 1.5], dtype=torch.float64)   # three pixels matter
    clf = Recorder(w, c)
    x = torch.rand(n, C, H, W, generator=g)
    x[:3] = x[:3].round()                                                  # corners of [0, 1]
    if c < 0:                                    # clean margin 0.3 everywhere, -0.15 at the best vertex
        x = x.flatten(1)
        x[:, [5, 18, 31]] = torch.tensor([0.5, 0.3, 0.2])
        x = x.view(n, C, H, W)
    y = torch.zeros(n, dtype=torch.long)
    x_adv, still = attack.square(clf, x, y, eps, queries, torch.Generator().manual_seed(0))
    # the replay: the stripes, then query i (1-based) accepted iff its margin is below the best so
    # far, or it fools; changes only inside one side x side window of square_side's schedule
    rows = torch.arange(n)
    current, best = clf.seen[1].clone(), clf.margin(clf.seen[1])
    assert torch.equal(clf.seen[0], x) and ((current - x).abs() <= eps + 1e-6).all()
    touched = torch.zeros(H, W, dtype=torch.bool)
    fooled, kept = torch.zeros(n, dtype=torch.bool), x.clone()
    fooled |= best < 0
    kept[fooled] = current[fooled]
    for i, q in enumerate(clf.seen[2:], 1):
        live = rows[~fooled]                                                  # the rows asked about
        assert len(q) == len(live)
        diff = (q != current[live]).any(1)                                     # [m, H, W]
        assert diff.flatten(1).any(1).all(), i            # never a query of the point it holds (AutoAttack's redraw)
        for d in diff:
            if d.any():
                r, cc = d.any(1).nonzero(), d.any(0).nonzero()
                side = attack.square_side(i, queries, H)
                assert r.max() - r.min() < side and cc.max() - cc.min() < side, i
                touched |= d
        assert ((q - x[live]).abs() <= eps + 1e-6).all() and q.min() >= 0 and q.max() <= 1
        vertex = torch.minimum((q - (x[live] - eps).clamp(0, 1)).abs(), (q - (x[live] + eps).clamp(0, 1)).abs())
        assert (vertex[diff[:, None].expand_as(q)] < 1e-6).all()              # new values: x +- eps
        m = clf.margin(q)
        better = (m < best[live]) | (m < 0)
        current[live[better]], best[live[better]] = q[better], m[better]
        newly = live[m < 0]
        fooled[newly], kept[newly] = True, q[m < 0]
    kept[~fooled] = current[~fooled]
    assert torch.equal(x_adv, kept) and torch.equal(still, ~fooled)
    assert touched.all()                                                       # every window position
    if c > 1:
        assert not fooled.any() and (best[3:] < clf.margin(clf.seen[1])[3:]).all()  # lowered off the corners
        assert len(clf.seen) == queries + 1                                    # the clean pass + queries
    else:
        assert fooled.any()


class SeenFeatures(Features):
    """Features (the input itself) that keep a copy of every batch the network is asked about."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def features(self, x):
        self.seen.append(x.detach().clone())
        return super().features(x)


@pytest.mark.oracle
def test_square_under_a_d_mask_ranks_queries_by_the_all_centre_margin_and_stops_where_the_d_mask_is_fooled():
    # Eq. (4) with D = 2: the prediction comes from the 2 nearest centres, Square's margin from all 9.
    # Replay every query the network saw against float64 loops: accepted iff its all-centre margin is
    # below the best so far or the D-masked prediction is not y (which also ends the example).
    g = torch.Generator().manual_seed(0)
    n, C, H, W, eps, queries, D, classes, sigma2 = 40, 1, 4, 4, 1 / 16, 120, 2, 3, 0.15   # eps exact in float32
    centers = torch.rand(9, C * H * W, generator=g, dtype=torch.float64)
    cc = torch.arange(9) % classes
    clf = attack.Classifier(SeenFeatures(), clusters(centers, cc, sigma2), D)
    clf.centers = centers                                                   # float64, not the float32 buffer

    def naive(v, labels):   # -> per row: margin over all centres, margin under the D mask, their two classes
        out = []
        for f, t in zip(v.flatten(1).tolist(), labels.tolist()):
            d2 = [sum((a - b) ** 2 for a, b in zip(f, mu)) for mu in centers.tolist()]
            near = sorted(range(9), key=lambda j: d2[j])[:D]

            def z(kept):            # log sum_{j in c, kept} exp(-d2_j / (2 sigma^2)); -inf for none
                top = max(-d2[j] / (2 * sigma2) for j in kept)
                sums = [sum(math.exp(-d2[j] / (2 * sigma2) - top) for j in kept if cc[j] == c) for c in range(classes)]
                return [top + math.log(s) if s > 0 else -math.inf for s in sums]
            za, zd = z(range(9)), z(near)
            out.append((za[t] - max(za[c] for c in range(classes) if c != t),
                        zd[t] - max(zd[c] for c in range(classes) if c != t),
                        max(range(classes), key=lambda c: za[c]), max(range(classes), key=lambda c: zd[c])))
        return [torch.tensor(col) for col in zip(*out)]
    x = torch.rand(n, C, H, W, generator=g, dtype=torch.float64)
    y = naive(x, torch.zeros(n, dtype=torch.long))[3]                       # correct under the D mask
    x_adv, still = attack.square(clf, x, y, eps, queries, torch.Generator().manual_seed(0))
    seen = clf.model.seen
    assert torch.equal(seen[0], x)                                          # the clean pass
    rows = torch.arange(n)
    current = seen[1].clone()                                               # the stripes
    best, best_d, _, pred = naive(current, y)
    fooled, kept = pred != y, x.clone()
    kept[fooled] = current[fooled]
    events = {"fooled under D, correct over all centres": 0, "correct under D, wrong over all centres": 0,
              "accepted by fooling alone": 0, "the D-masked margin would decide otherwise": 0}
    for i, q in enumerate(seen[2:], 1):
        live = rows[~fooled]                                                # the rows asked about
        assert len(q) == len(live), i
        diff = (q != current[live]).any(1)                                  # [m, H, W]
        side = attack.square_side(i, queries, min(H, W))
        for d in diff:
            if d.any():
                r, c = d.any(1).nonzero(), d.any(0).nonzero()
                assert r.max() - r.min() < side and c.max() - c.min() < side, i
        assert ((q - x[live]).abs() <= eps + 1e-12).all() and q.min() >= 0 and q.max() <= 1
        m, m_d, top_all, top_d = naive(q, y[live])
        fool = top_d != y[live]
        better = (m < best[live]) | fool
        events["fooled under D, correct over all centres"] += int((fool & (top_all == y[live])).sum())
        events["correct under D, wrong over all centres"] += int((~fool & (top_all != y[live])).sum())
        events["accepted by fooling alone"] += int((fool & (m >= best[live])).sum())
        events["the D-masked margin would decide otherwise"] += int((~fool & ((m < best[live]) != (m_d < best_d[live])))
                                                                    .sum())
        tie = (m - best[live]).abs() <= 1e-6                                # float32 rounding could decide these
        assert torch.equal(q[tie], current[live][tie]), i                   # only a point already queried ties
        current[live[better]], best[live[better]], best_d[live[better]] = q[better], m[better], m_d[better]
        fooled[live[fool]], kept[live[fool]] = True, q[fool]
    kept[~fooled] = current[~fooled]
    assert torch.equal(still, ~fooled) and torch.equal(x_adv, kept)
    assert 0 < int(fooled.sum()) < n and all(v > 0 for v in events.values()), (int(fooled.sum()), events)


@pytest.mark.oracle
def test_margin_t_targets_the_top_classes_of_a_naive_ranking_with_ties_and_d_masks(monkeypatch):
    inf = float("inf")

    def naive(scores, y):                        # most likely first, ties to the lower class, y out
        return [[c for c in sorted(range(len(s)), key=lambda c: (-s[c], c)) if c != t]
                for s, t in zip(scores.tolist(), y.tolist())]
    table = torch.tensor([[0., -1., -1., -inf, -2.], [-inf, -inf, 0., -inf, -3.], [-1., -1., -1., -1., -1.],
                          [-2., -inf, -inf, -0.5, -0.5]])
    y = torch.tensor([1, 2, 4, 3])
    assert attack.rank_targets(table, y).tolist() == naive(table, y)
    assert attack.rank_targets(table[:0], y[:0]).shape == (0, 4)           # no example (a check's empty set)
    # margin-t in pgd: 5 classes on a line, D = 2; each example ties two wrong classes
    centers = [[0., 0.], [1., 0.], [2., 0.], [3., 0.], [4., 0.]]
    clf = attack.Classifier(Features(4.0), clusters(centers, [0, 1, 2, 3, 4], 0.5), D=2)
    f = torch.tensor([[1.0, 0.], [2.0, 0.4], [3.1, 0.], [0.4, 0.]]).view(4, 1, 1, 2) / 4   # in [0, 1]
    y = clf(f).argmax(1)
    full = attack.cluster_log_probs(4 * f.flatten(1), clf.centers, clf.center_classes, clf.sigma2, None)
    expected = torch.tensor(naive(full, y))                                # over all centres, not the D nearest
    assert expected.tolist() != naive(clf(f), y)                           # the masked ranking differs
    seen = []
    objective = attack.objective

    def recording(fn, x, yy, loss, target=None):
        seen.append(target.tolist())
        return objective(fn, x, yy, loss, target)
    monkeypatch.setattr(attack, "objective", recording)
    targets, restarts = 3, 2
    attack.pgd(clf, f, y, 0.0, 0.1, 1, restarts, "margin-t", torch.Generator().manual_seed(0), targets)
    runs = seen[::2]                                                       # 2 iterates per run at steps 1
    assert runs == [expected[:, t].tolist() for t in range(targets) for _ in range(restarts)]
    seen.clear()
    attack.pgd(clf, f, y, 0.0, 0.1, 1, 1, "margin-t", torch.Generator().manual_seed(0), 9)
    assert seen[::2] == [expected[:, t].tolist() for t in range(4)]        # at most classes - 1


@pytest.mark.oracle
def test_targets_are_ranked_over_all_centres_and_never_the_true_class():
    # 4 classes on a line; D = 1: only the nearest centre's class has a finite log p.  Ranking
    # the wrong classes by the masked log p would tie at -inf and pick classes 0, 1, 2 (even y)
    centers = [[0., 0.], [1., 0.], [2.5, 0.], [4., 0.]]
    clf = attack.Classifier(Features(), clusters(centers, [0, 1, 2, 3], 0.5), D=1)
    f = torch.tensor([[0.1, 0.], [3.9, 0.], [2.4, 0.]])
    y = torch.tensor([0, 3, 2])
    assert torch.isinf(clf(f)).sum() == 9                                  # 3 of 4 classes masked
    ranked = attack.rank_targets(attack.class_scores(clf, f), y)
    assert ranked.tolist() == [[1, 2, 3], [2, 1, 0], [1, 3, 0]]             # by distance, y removed
    assert attack.parse_args([]).targets is None                           # resolved in main: min(9, C - 1)


class Linear64(nn.Module):
    """A 3-class linear classifier computed in float64 (each row's value independent of the batch
    around it): an attack's per-example result is the same in a batch of 1 as in a batch of 40."""

    def __init__(self, seed=0, classes=3, pixels=16):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W, self.b = torch.randn(classes, pixels, generator=g, dtype=torch.float64), torch.zeros(classes)

    def forward(self, x):
        return F.log_softmax(x.double().flatten(1) @ self.W.T * 8 + self.b, 1)


def linear_setup(n=40, seed=0):
    """uint8 images [n, 1, 4, 4] around mid-grey, labels = the clean prediction except every 7th
    (misclassified), and args of short attacks that fool some examples, each loss others."""
    clf = Linear64(seed)
    g = torch.Generator().manual_seed(seed)
    images = (128 + 40 * torch.randn(n, 1, 4, 4, generator=g)).clamp(0, 255).to(torch.uint8)
    labels = clf(attack.to_float(images)).argmax(1)
    labels[::7] = (labels[::7] + 1) % 3
    args = attack.parse_args(["--eps", "12/255", "--steps", "2", "--step", "2/255", "--schedule", "constant",
                              "--targets", "1", "--square-queries", "40", "--loss", "ce", "margin-t",
                              "margin", "square", "-b", "1"])
    return clf, images, labels, args


@pytest.mark.oracle
def test_cascade_and_per_loss_equal_a_naive_loop_of_each_example_alone():
    clf, images, labels, args = linear_setup()
    eps, losses, n = args.eps[0], args.loss, len(labels)
    natural = attack.natural_mask(clf, images, labels, 500)

    def alone(i, loss):                          # one example, one loss, its own generator (index i)
        out, record = torch.zeros(1, 1, 4, 4), {}
        still = attack.attack_split(clf, images[i:i + 1], labels[i:i + 1], args, eps, loss, args.seed,
                                    adv=out, index=torch.tensor([i]), record=record)
        with torch.no_grad():                    # the margin of the image it returned, in float64
            lp = clf(out).double()[0]
        margin = lp[labels[i]] - lp[[c for c in range(3) if c != labels[i]]].max()
        assert float(record["margin"]) == pytest.approx(float(margin), abs=1e-5) or not still
        budget = args.square_queries if loss == "square" else args.steps + 1   # --targets 1, 1 restart
        assert int(record["work"]) == budget or not still
        return bool(still), out[0], float(record["margin"])
    single = {(i, l): alone(i, l) for i in range(n) for l in losses}
    # the cascade: an example meets the losses in order until one fools it; that one's image is kept,
    # a survivor's the image of lowest margin over the losses (the first on a tie)
    robust, fooled_by, images_kept = [], [], attack.to_float(images).clone()
    for i in range(n):
        first = next((j for j, l in enumerate(losses) if not single[i, l][0]), -1)
        robust.append(first == -1)
        fooled_by.append(first if first >= 0 and natural[i] else -1)
        if first >= 0:
            images_kept[i] = single[i, losses[first]][1]
        elif natural[i]:
            images_kept[i] = min((single[i, l] for l in losses), key=lambda s: s[2])[1]
    adv, rows = attack.to_float(images).clone(), []
    worst, got_by, _ = attack.run_losses(clf, images, labels, args, eps, losses, natural, adv, {}, True, rows.append)
    assert worst.tolist() == robust and got_by.tolist() == fooled_by and torch.equal(adv, images_kept)
    for j, row in enumerate(rows):              # what each row counts, from the naive verdicts
        before = [all(single[i, l][0] for l in losses[:j]) for i in range(n)]
        after = [b and single[i, losses[j]][0] and bool(natural[i]) for i, b in enumerate(before)]
        assert row["attacked"] == sum(before) and row["robust_accuracy"] == pytest.approx(sum(after) / n)
        assert row["fooled"] == sum(b and not single[i, losses[j]][0] and bool(natural[i])
                                    for i, b in enumerate(before)) and row["disagreements"] == 0
    assert sum(r["fooled"] > 0 for r in rows) >= 3      # the order matters: three losses fool someone
    # --per-loss: every loss on every example; the worst case's image is the first fooling loss's
    adv, rows = attack.to_float(images).clone(), []
    args.per_loss = True
    worst, got_by, masks = attack.run_losses(clf, images, labels, args, eps, losses, natural, adv, {}, True,
                                             rows.append)
    assert worst.tolist() == robust and got_by.tolist() == fooled_by and torch.equal(adv, images_kept)
    for l, row in zip(losses, rows):
        mine = [single[i, l][0] and bool(natural[i]) for i in range(n)]
        assert masks[l].tolist() == mine and row["robust_accuracy"] == pytest.approx(sum(mine) / n) and row["attacked"] == n
        assert row["fooled"] == sum(not single[i, l][0] and bool(natural[i]) for i in range(n))
    assert len({tuple(m.tolist()) for m in masks.values()}) >= 3      # the losses fool different examples


class Shift(nn.Module):
    """2 classes, margin of class 0 = 10 (mean pixel - 0.5): a verdict exactly as far from the
    decision boundary as a test wants."""

    def forward(self, x):
        m = 10 * (x.flatten(1).mean(1) - 0.5)
        return torch.stack([m, -m], 1) / 2


@pytest.mark.oracle
def test_recompute_counts_rounding_level_disagreements_and_exits_1_beyond_them(capsys):
    args = attack.parse_args(["--eps", "8/255"])
    images, labels = torch.full((4, 1, 2, 2), 128, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)
    x = attack.to_float(images)                                            # margin 10 * (128/255 - 0.5) > 0
    eps, tol = 8 / 255, attack.RECOMPUTE_MARGIN[False]
    claimed = torch.tensor([True, True, False, False])
    adv = x.clone()
    adv[2:] -= x[2:].mean() - 0.5 - tol / 40      # margins +tol / 4: correct; the bookkeeping says fooled
    robust, differ = attack.recompute(Shift(), adv, images, labels, eps, claimed, args, "test")
    assert robust.tolist() == [True, True, False, False] and differ == 2    # counted, the lower figure kept
    robust, differ = attack.recompute(Shift(), adv, images, labels, eps, ~claimed, args, "test")
    assert robust.tolist() == [False, False, True, True] and differ == 2    # the other way round: the same
    with pytest.raises(SystemExit):                     # a third: more than rounding flips (2 of 4)
        attack.recompute(Shift(), adv, images, labels, eps, torch.tensor([True, False, False, False]), args, "t")
    assert "3 of 4 verdicts" in capsys.readouterr().err
    # under a D mask log p jumps to -inf: a verdict that flips as the D nearest centres change
    # is rounding when the D-th and (D+1)-th nearest distances are that close
    D1 = attack.Classifier(Features(), clusters([[0., 0.], [1., 0.]], [0, 1], 0.5), D=1)
    im = torch.full((1, 1, 1, 2), 0, dtype=torch.uint8)
    for shift, fails in ((1e-4, False), (0.1, True)):                     # gap 2 shift / (2 sigma^2)
        xa = torch.tensor([0.5 + shift, 0.0]).view(1, 1, 1, 2)            # nearest: class 1's centre
        assert torch.isinf(D1(xa)).any()
        call = lambda: attack.recompute(D1, xa, im, torch.zeros(1, dtype=torch.long), 1.0,   # noqa: E731
                                        torch.tensor([True]), args, "D")
        if fails:
            with pytest.raises(SystemExit):
                call()
        else:
            assert call() == (torch.tensor([False]), 1)
    for bad in ("margin", "ball", "box", "nan"):
        broken = adv.clone()
        if bad == "margin":
            broken[2:] += 4 * tol / 10                                     # margin 4.25 tol: beyond rounding
        elif bad == "ball":
            broken[0] += eps + 2e-6
        elif bad == "box":                                                 # (checked at eps 1)
            broken[1, 0, 0, 0] = -2e-6
        else:
            broken[3] = float("nan")
        with pytest.raises(SystemExit) as info:
            attack.recompute(Shift(), broken, images, labels, eps if bad != "box" else 1.0, claimed, args, "test")
        assert info.value.code == 1, bad
        assert "contradicts the attack's bookkeeping" in capsys.readouterr().err, bad


@pytest.mark.oracle
def test_ball_excess_is_the_largest_step_out_of_the_ball_below_0_or_above_1_over_every_batch():
    # the check in_ball's figure against a naive loop over the pixels: max(|x_adv - x| - eps, -x_adv, x_adv - 1)
    eps = 0.1
    x = torch.tensor([0.0, 0.5, 1.0, 0.3], dtype=torch.float64).view(1, 1, 2, 2).repeat(3, 1, 1, 1)

    def naive(xa):
        return max(max(abs(a - b) - eps, -a, a - 1) for a, b in zip(xa.flatten().tolist(), x.flatten().tolist()))
    moves = {"inside": [(1, 1, 0.5 + eps)], "below 0": [(0, 0, -2e-6)], "above 1": [(2, 2, 1 + 3e-6)],
             "beyond eps": [(1, 3, 0.3 - eps - 4e-6)]}
    moves["all three"] = moves["below 0"] + moves["above 1"] + moves["beyond eps"]
    expected = {"inside": 0.0, "below 0": 2e-6, "above 1": 3e-6, "beyond eps": 4e-6, "all three": 4e-6}
    ball, largest = {}, 0.0
    for i, name in enumerate(["inside", "below 0", "above 1", "beyond eps", "all three", "below 0", "inside"]):
        xa = x.clone()
        for r, p, v in moves[name]:
            xa.view(3, 4)[r, p] = v
        one = {}
        attack.measure_ball(one, xa, x, eps)
        assert one["max_excess"] == pytest.approx(naive(xa), abs=1e-12)
        assert one["max_excess"] == pytest.approx(expected[name], abs=1e-12), name
        attack.measure_ball(ball, xa, x, eps)                                 # the running figure: the largest
        largest = max(largest, naive(xa))
        assert ball["batches"] == i + 1 and ball["max_excess"] == pytest.approx(largest, abs=1e-12)
    # recompute stops on a pixel 2e-6 below 0 whose verdict nothing changes (Shift: margin -5, class 1)
    # and accepts one 5e-7 below 0 (the 1e-6 allowance of in_ball)
    args = attack.parse_args(["--eps", "8/255"])
    images, labels = torch.zeros((2, 1, 2, 2), dtype=torch.uint8), torch.ones(2, dtype=torch.long)
    for below, stops in ((2e-6, True), (5e-7, False)):
        adv = attack.to_float(images).clone()
        adv[1, 0, 0, 1] = -below
        call = lambda: attack.recompute(Shift(), adv, images, labels, 8 / 255,  # noqa: E731
                                        torch.ones(2, dtype=torch.bool), args, "test")
        if stops:
            with pytest.raises(SystemExit) as info:
                call()
            assert info.value.code == 1
        else:
            robust, differ = call()
            assert robust.all() and differ == 0


# Attack configurations on Band (below): the intact attack passes every check in each of them.
BAND_CONFIGS = {
    "cascade": ["--steps", "10", "--loss", "margin-t", "square"],
    "margin-t alone": ["--steps", "10", "--loss", "margin-t"],
    "one step, 10 restarts": ["--steps", "1", "--restarts", "10", "--step", "0.015", "--loss", "margin-t"],
}
WEAK_CONFIGS = {  # an intact attack at too small a budget: the check named fails
    "double_restarts": ["--steps", "1", "--restarts", "1", "--step", "0.015", "--loss", "margin-t"],
    "square_finds_little": ["--steps", "1", "--step", "0.001", "--loss", "margin-t", "square"],
}


BROKEN = {  # ways to break the attack, each applied to a copy of attack.py: (old, new, config, the check that fails)
    "sign flipped": ("xk + eta * grad.sign()", "xk - eta * grad.sign()", "cascade", "objective_rises"),
    "sign flipped, no square": ("xk + eta * grad.sign()", "xk - eta * grad.sign()", "margin-t alone",
                                "beats_random_search"),
    "step 0": ('eta = step if schedule == "constant"', 'eta = 0 * step if schedule == "constant"', "cascade",
               "objective_rises"),
    "steps a tenth": ('eta = step if schedule == "constant"', 'eta = step / 10 if schedule == "constant"',
                      "margin-t alone", "double_steps"),
    # the bookkeeping stops these: fewer runs than configured; a fooling point found, not recorded
    "restarts ignored": ("for t in range(min(targets, log_p.shape[1] - 1)) for _ in range(restarts)]",
                         "for t in range(min(targets, log_p.shape[1] - 1)) for _ in range(1)]", "one step, 10 restarts",
                         "bookkeeping"),
    "fooled only at the last iterate": ("new = live & (lp.argmax(1) != y0)",
                                        "new = live & (lp.argmax(1) != y0) & (k == steps)",
                                        "cascade", "bookkeeping"),
    "the start ignores eps = 0": ("xk = (x0 + (2 * noise - 1) * eps).clamp(0, 1)",
                                  "xk = (x0 + (2 * noise - 1) * max(eps, 0.1)).clamp(0, 1)", "cascade",
                                  "eps_zero_is_natural"),
    "never moves beyond 0.02": ('            if loss == "square":\n                x_adv, still = square(',
                                '            eps = min(eps, 0.02)\n            if loss == "square":\n'
                                '                x_adv, still = square(', "cascade", "near_zero_at_large_eps"),
    "a fooling square query found, not recorded": (
        "x_adv[idx[fooled]], still[idx[fooled]], margin[idx[fooled]] = xk[fooled], False, lm_k[fooled]",
        "x_adv[idx[fooled]], still[idx[fooled]], margin[idx[fooled]] = xk[fooled], True, lm_k[fooled]",
        "square_finds_little", "bookkeeping"),
    "no projection": ("xk = torch.min(torch.max(xk + eta * grad.sign(), x0 - eps), x0 + eps).clamp(0, 1)",
                      "xk = xk + eta * grad.sign()", "cascade", "bookkeeping"),
}


class Band(nn.Module):
    """3 classes on the mean pixel shift u: class 1 wins only in the band 0.03 < u < 0.07, class 2
    (the top-ranked target) only beyond u = 0.15.  PGD towards class 2 crosses the band and ends
    at u = eps = 0.1 classified as 0 again: only an attack that judges every iterate is fooled."""

    def forward(self, x):
        u = x.flatten(1).mean(1) - 128 / 255
        z = torch.stack([torch.zeros_like(u), 10 * (1 - (u - 0.05).abs() / 0.02), 20 * u - 3], 1)
        return F.log_softmax(z, 1)


def checks_on_band(module, flags):
    clf = Band()
    args = module.parse_args(["--eps", "0.1", "--step", "0.02", "--schedule", "constant", "--targets", "1",
                              "--square-queries", "100", "--tolerance", "0.1", "--check-images", "50", *flags])
    images, labels = torch.full((50, 1, 2, 2), 128, dtype=torch.uint8), torch.zeros(50, dtype=torch.long)
    natural, tally, rows = module.natural_mask(clf, images, labels, 500), {}, []
    try:
        worst, fooled_by, _ = module.run_losses(clf, images, labels, args, 0.1, args.loss, natural,
                                                module.to_float(images).clone(), tally, True, rows.append)
    except SystemExit as e:                         # the attack's own record contradicts the attack
        assert e.code == 1
        return {"bookkeeping": False, "in_ball": tally["max_excess"] <= 1e-6}
    rows = [dict(r, eps=0.1, D=None) for r in rows]
    checks = module.run_checks(clf, images, labels, args, args.loss, rows, natural,
                               [(None, 0.1, worst, fooled_by)], 0.1, tally)
    return {name: c["ok"] for name, c in checks.items()}


@pytest.mark.smoke
def test_each_broken_attack_fails_its_check_and_the_correct_one_passes_them_all(tmp_path):
    import importlib.util
    text = open(os.path.join(ROOT, "attack.py")).read()
    for config, flags in BAND_CONFIGS.items():
        ok = checks_on_band(attack, flags)
        assert False not in ok.values(), (config, ok)                      # the attack as it is
    for check, flags in WEAK_CONFIGS.items():
        ok = checks_on_band(attack, flags)
        assert ok[check] is False and "bookkeeping" not in ok, (check, ok)
    for i, (name, (old, new, config, catches)) in enumerate(BROKEN.items()):
        assert text.count(old) == 1, name
        path = tmp_path / f"attack_broken{i}.py"
        path.write_text(text.replace(old, new))
        spec = importlib.util.spec_from_file_location(f"attack_broken{i}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        ok = checks_on_band(module, {**BAND_CONFIGS, **WEAK_CONFIGS}[config])
        assert ok[catches] is False, (name, ok)
        assert ok.get("bookkeeping", True) is (catches != "bookkeeping"), (name, ok)
    assert ok["in_ball"] is False                   # the ball check fails on its own too (no projection)


@pytest.mark.oracle
def test_the_bookkeeping_checks_fail_on_the_results_they_exist_to_catch():
    clf = Band()
    args = attack.parse_args(["--eps", "0.05", "0.1", "--steps", "10", "--step", "0.02", "--targets", "1",
                              "--tolerance", "0.1", "--check-images", "20", "--loss", "margin-t", "--no-checks"])
    images, labels = torch.full((20, 1, 2, 2), 128, dtype=torch.uint8), torch.zeros(20, dtype=torch.long)
    natural = attack.natural_mask(clf, images, labels, 500)
    natural[:2] = False                                    # as if two were misclassified on clean images
    robust = torch.zeros(20, dtype=torch.bool)

    def checks(robust, rises):
        rows = [{"loss": "margin-t", "eps": e, "D": None, "robust_accuracy": a}
                for e, a in ((0.05, 0.5), (0.1, 0.5 + rises))]
        return attack.run_checks(clf, images, labels, args, args.loss, rows, natural,
                                 [(None, 0.1, robust, torch.full((20,), -1))], 0.1, {"runs": 0, "rose": 0})
    ok = checks(robust, 0.1)                               # at the tolerance: not a failure
    assert ok["robust_le_natural"]["ok"] and ok["monotone_in_eps"]["ok"]
    for rose, passes in ((5, False), (6, True)):           # the objective rose on more than half
        c = attack.run_checks(clf, images, labels, args, args.loss, [], natural, [(None, 0.1, robust, -robust.long())],
                              None, {"runs": 10, "rose": rose})["objective_rises"]
        assert c["ok"] is passes and c["share_rose"] == rose / 10
    # Square fooled at most --tolerance (0.1) of the images: 2 of 20 passes, 3 fail
    args.loss = ["margin-t", "square"]
    for fooled, passes in ((2, True), (3, False)):
        by = torch.full((20,), -1)
        by[:fooled], by[fooled:fooled + 4] = 1, 0          # square (1) fooled `fooled`; margin-t four more
        c = attack.run_checks(clf, images, labels, args, args.loss, [], natural, [(None, 0.1, robust, by)],
                              None, {})["square_finds_little"]
        assert c["ok"] is passes and c["share_fooled_by_square_only"] == fooled / 20
    args.loss = ["margin-t"]
    robust[1] = True                                       # robust, yet misclassified on the clean image
    ok = checks(robust, 0.1 + 1e-6)                        # robust accuracy rose with eps
    assert ok["robust_le_natural"] == {"ok": False, "robust_but_misclassified": 1}
    assert ok["monotone_in_eps"]["ok"] is False
    assert ok["monotone_in_eps"]["max_rise"] == pytest.approx(0.1 + 1e-6)
    # masked gradients (Quantised: exactly zero input gradients) fail zero_gradient_share; Band's pass it
    assert ok["zero_gradient_share"]["ok"] and ok["zero_gradient_share"]["every_loss"] == 0
    w = torch.ones(4)
    c = attack.run_checks(Quantised(w, 1 - 0.5 * w.sum()), images, labels, args, ["margin-t"], [], natural, [], None,
                          {})["zero_gradient_share"]
    assert c["ok"] is False and c["every_loss"] == 1.0 and c["correct_examples"] == 20


class OnGrid(nn.Module):
    """2 classes: class 0 where every pixel is on the uint8 grid (k / 255) or the mean pixel is above
    0.75, class 1 elsewhere: any random point in the ball fools a mid-grey image, none a white one."""

    def forward(self, x):
        v = x.flatten(1).double()
        on = ((v * 255 - (v * 255).round()).abs() < 1e-3).all(1) | (v.mean(1) > 0.75)
        m = torch.where(on, 1.0, -1.0).double() + 0 * v.sum(1)
        return F.log_softmax(torch.stack([m, -m], 1), 1)


@pytest.mark.oracle
def test_square_finds_little_takes_the_worst_run_and_a_tie_with_random_search_passes_only_if_it_fooled_no_more():
    clf = OnGrid()
    images = torch.full((20, 1, 2, 2), 128, dtype=torch.uint8)            # 10 mid-grey, then 10 white
    images[10:] = 255
    labels, natural = torch.zeros(20, dtype=torch.long), torch.ones(20, dtype=torch.bool)
    args = attack.parse_args(["--eps", "0.1", "--steps", "2", "--check-images", "20", "--tolerance", "0.1",
                              "--loss", "margin", "square", "--square-queries", "10"])
    robust = torch.zeros(20, dtype=torch.bool)
    # square_finds_little: the largest share fooled by Square alone over the runs (D, eps) it is given;
    # at --tolerance 0.1 of 20 images, 2 pass and 3 fail, whichever run holds them
    for counts in ([0, 3], [3, 0], [2, 2], [1, 3, 0], [2, 0, 1]):
        runs = []
        for j, k in enumerate(counts):
            by = torch.full((20,), -1)
            by[:k], by[k:k + 5] = 1, 0                                     # square (1) fooled k; margin 5 more
            runs.append((None, 0.05 * (j + 1), robust, by))
        c = attack.run_checks(clf, images, labels, args, args.loss, [], natural, runs, None, {})["square_finds_little"]
        assert c["share_fooled_by_square_only"] == max(counts) / 20, counts
        assert c["ok"] is (max(counts) <= 2), counts
    # beats_random_search at eps 0.1 (3 random points per example: 0 steps, 3 restarts): random
    # search fools exactly the 10 grey images, robust accuracy 0.5.  The attack's headline masks:
    args.loss = ["margin"]
    cases = {  # grey ones robust, white ones robust: (its robust accuracy vs random's 0.5, random_only, ok)
        (0, 10): ("equal", 0, True), (2, 8): ("equal", 2, False), (2, 7): ("lower", 2, True),
        (0, 9): ("lower", 0, True), (2, 9): ("higher", 2, False)}
    for (grey, white), (_, random_only, passes) in cases.items():
        robust = torch.zeros(20, dtype=torch.bool)
        robust[:grey], robust[10:10 + white] = True, True
        c = attack.run_checks(clf, images, labels, args, args.loss, [], natural,
                              [(None, 0.1, robust, torch.where(robust, -1, 0))], 0.1, {})["beats_random_search"]
        assert c["robust_random"] == 0.5 and c["robust_attack"] == (grey + white) / 20, (grey, white, c)
        assert c["random_only"] == random_only and c["ok"] is passes, (grey, white, c)


class Bright(nn.Module):
    """Class 0 when the mean pixel is above 0.5: an image at 1 stays class 0 within any eps < 0.5,
    one at 0.6 is fooled from eps 0.1 on."""

    def forward(self, x):
        m = 10 * (x.flatten(1).mean(1) - 0.5)
        return F.log_softmax(torch.stack([m, -m], 1), 1)


@pytest.mark.oracle
@pytest.mark.parametrize("stay, passes", [(1, True), (2, False)])
def test_check_near_zero_at_large_eps_allows_exactly_5_percent(stay, passes):
    images = torch.full((20, 1, 2, 2), 153, dtype=torch.uint8)             # 0.6: fooled at eps 64/255
    images[:stay] = 255                                                    # cannot be moved below 0.5
    labels = torch.zeros(20, dtype=torch.long)
    args = attack.parse_args(["--steps", "5", "--check-images", "20", "--loss", "margin"])
    c = attack.run_checks(Bright(), images, labels, args, args.loss, [], torch.ones(20, dtype=torch.bool), [], None,
                          {})["near_zero_at_large_eps"]
    assert c["ok"] is passes and c["robust_accuracy"] == stay / 20 and c["images"] == 20


BROKEN_BOOKKEEPING = {  # a copy of attack.py whose record of the attack is wrong in one place
    "a fooled example kept as robust": ("        worst[idx] &= robust\n",
                                        "        worst[idx] &= robust | natural[idx]\n"),
    "the fooling image never kept": ("        adv[idx[first]] = part[first]\n", ""),
    "the image of another example kept": ("        adv[idx[first]] = part[first]\n",
                                          "        adv[idx[first]] = part[first].flip(0)\n"),
    # robust verdicts backed from the other side: every survivor met every loss in full, and a
    # survivor's saved image is the strongest point found, so a fooling point left unrecorded shows
    "later losses attack every other survivor": (
        "idx = torch.arange(n, device=dev) if args.per_loss else worst.nonzero().squeeze(1)",
        "idx = torch.arange(n, device=dev) if args.per_loss else worst.nonzero().squeeze(1)[::1 + (i > 0)]"),
    "square stops one query early": ("        if len(idx) == 0 or i == queries:\n",
                                     "        if len(idx) == 0 or i == queries - 1:\n"),
    "a fooling iterate found, not recorded": ("            still_correct[idx[new]] = False\n", ""),
}


@pytest.mark.smoke
@pytest.mark.parametrize("name", BROKEN_BOOKKEEPING)
def test_a_run_whose_bookkeeping_is_broken_exits_1_and_writes_no_result(name, nominal_run, image_folder, tmp_path,
                                                                         capsys):
    import importlib.util
    old, new = BROKEN_BOOKKEEPING[name]
    text = open(os.path.join(ROOT, "attack.py")).read()
    assert text.count(old) == 1
    path = tmp_path / "attack_broken.py"
    path.write_text(text.replace(old, new))
    spec = importlib.util.spec_from_file_location("attack_broken", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "out" / "a.json"
    argv = ["--ckpt", nominal_run[1], "--data-dir", image_folder, "--limit", "30", "--steps", "3",
            "--square-queries", "30", "--eps", "16/255", "--no-checks", "--out", str(out),
            "--save-adv", str(tmp_path / "out" / "adv.pt")] + (["--per-loss"] if "another" in name else [])
    res = attack.main(argv)                                                # the intact attack: no disagreement
    assert all(r["disagreements"] == 0 for r in res["results"]) and res["results"][-1]["robust_accuracy"] < 1
    for f in os.listdir(out.parent):
        os.remove(out.parent / f)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        module.main(argv)
    assert info.value.code == 1 and "contradicts the attack's bookkeeping" in capsys.readouterr().err
    assert os.listdir(out.parent) == ["a.json.lock"]        # no result, no log, no images (the lock file stays)


# ======================================================================================
# Prop. 1, the radius: against exact geometry (certify.py, synthetic.py)
# ======================================================================================

def nearest_class_naive(f, centers, classes):
    d = [float(((f - c) ** 2).sum()) for c in centers]
    return int(classes[int(np.argmin(d))])


def exact_distance_to_other_cells_2d(f, centers, classes, pred):
    """Exact L2 distance in the plane from f to the union of the Voronoi cells of other-class
    centres.  Cell j = {z : a_k . z <= b_k for all k}, a_k = 2 (mu_k - mu_j), b_k = |mu_k|^2 - |mu_j|^2.
    The nearest point of a convex polygon is f itself, a projection on one edge line, or a vertex
    (intersection of two lines): enumerate them all and keep the feasible ones (KKT)."""
    best = math.inf
    for j in range(len(centers)):
        if classes[j] == pred:
            continue
        A = np.array([2 * (centers[k] - centers[j]) for k in range(len(centers)) if k != j])
        b = np.array([centers[k] @ centers[k] - centers[j] @ centers[j]
                      for k in range(len(centers)) if k != j])
        cands = [f] + [f - (a @ f - bb) / (a @ a) * a for a, bb in zip(A, b)]
        for (a1, b1), (a2, b2) in itertools.combinations(zip(A, b), 2):
            M = np.stack([a1, a2])
            if abs(np.linalg.det(M)) > 1e-12:
                cands.append(np.linalg.solve(M, np.array([b1, b2])))
        for z in cands:
            if np.all(A @ z <= b + 1e-9 * (1 + np.abs(b))):
                best = min(best, float(np.linalg.norm(z - f)))
    return best


@pytest.mark.oracle
def test_isometry_one_centre_per_class_radius_is_the_exact_distance_and_a_step_beyond_flips():
    g = torch.Generator().manual_seed(1)
    n, C = 6, 4
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))   # orthogonal
    t = torch.randn(n, dtype=torch.float64, generator=g)
    feat = lambda x: x @ Q.T + t                                       # noqa: E731  isometry, L = 1
    mu = torch.randn(C, n, dtype=torch.float64, generator=g)
    cls = torch.arange(C)
    x = torch.randn(60, n, dtype=torch.float64, generator=g)
    pred, radius, two = certified_radius(feat(x), mu, cls, 1.0)
    tight = certify.certified_radii(feat(x), mu, cls, 1.0)["tight"]
    assert torch.equal(tight, radius)                                  # K = 1: one same-class centre
    assert torch.all(two >= radius)
    assert torch.any(two > radius * (1 + 1e-6))    # the paper's two-closest form overstates, K = 1
    for b in range(len(x)):
        f = feat(x[b]).numpy()
        c = nearest_class_naive(f, mu.numpy(), cls.numpy())
        assert c == pred[b]
        # exact distance to the bisector hyperplane of (mu_c, mu_j), by projection, min over j
        dists = []
        for j in range(C):
            if j != c:
                u = (mu[j] - mu[c]).numpy() / np.linalg.norm((mu[j] - mu[c]).numpy())
                dists.append((abs(u @ (f - (mu[c] + mu[j]).numpy() / 2)), j, u))
        exact, j, u = min(dists, key=lambda d: d[0])
        assert radius[b].item() == pytest.approx(exact, rel=1e-9, abs=1e-12)
        # tightness: a step of (1 + 1e-6) R towards mu_j (in input space: Q^T u) flips the class;
        # steps of (1 - 1e-6) R in that and in 200 random directions do not
        step = torch.from_numpy(u) @ Q                                  # Q^T u, unit norm
        beyond = feat(x[b] + (1 + 1e-6) * exact * step).numpy()
        assert nearest_class_naive(beyond, mu.numpy(), cls.numpy()) != c
        dirs = torch.cat([step[None], torch.randn(200, n, dtype=torch.float64, generator=g)])
        dirs = dirs / dirs.norm(dim=1, keepdim=True)
        inside = feat(x[b] + (1 - 1e-6) * exact * dirs)
        _, cls_inside = certify.nearest_center(inside, mu, cls)
        assert torch.all(cls_inside == c)


@pytest.mark.oracle
def test_several_centres_per_class_sound_radius_never_exceeds_the_exact_distance():
    rng = np.random.default_rng(0)
    counts = {"two_closest_too_large": 0, "tight_larger": 0}
    for trial in range(12):
        C, K = 3, 3
        mu = rng.normal(size=(C * K, 2))
        cls = np.repeat(np.arange(C), K)
        f = rng.normal(size=(25, 2)) * 1.5
        r = certify.certified_radii(torch.from_numpy(f), torch.from_numpy(mu), torch.from_numpy(cls), 1.0)
        for b in range(len(f)):
            c = nearest_class_naive(f[b], mu, cls)
            assert c == r["pred"][b]
            exact = exact_distance_to_other_cells_2d(f[b], mu, cls, c)
            assert r["radius"][b] <= exact * (1 + 1e-9) + 1e-12
            assert r["radius"][b] <= r["tight"][b] <= exact * (1 + 1e-9) + 1e-12
            assert r["two_closest"][b] >= r["radius"][b]
            counts["two_closest_too_large"] += r["two_closest"][b] > exact * (1 + 1e-6)
            counts["tight_larger"] += r["tight"][b] > r["radius"][b] * (1 + 1e-6)
    # the paper's two-closest form overstates some radii when K > 1; the best same-class centre
    # form does certify more than R(x) for some points
    assert counts["two_closest_too_large"] > 0 and counts["tight_larger"] > 0


@pytest.mark.oracle
def test_radius_scales_as_1_over_L_and_ties_give_0():
    mu = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    cls = torch.tensor([0, 1, 2])
    f = torch.tensor([[0.5, 0.5], [1.0, 3.0]], dtype=torch.float64)
    _, r1, _ = certified_radius(f, mu, cls, 1.0)
    _, r3, _ = certified_radius(f, mu, cls, 3.0)
    assert torch.allclose(r1, 3 * r3)
    # f = (0.5, 0.5): bisector x = 1 at distance 0.5, bisector y = 2 at distance 1.5
    assert r1[0].item() == pytest.approx(0.5, abs=1e-15)
    # the two-closest form overstates with K = 1 (certified_radii docstring, step 6): closed form
    mu3 = torch.tensor([[0.0, 0.0], [1.0, 0.0], [-0.5, 1.6]], dtype=torch.float64)
    _, r, two = certified_radius(torch.tensor([[-0.5, 0.0]], dtype=torch.float64), mu3, cls, 1.0)
    assert two.item() == pytest.approx(1.0, rel=1e-12)                   # bisector x = 0.5
    assert r.item() == pytest.approx((2.56 - 0.25) / (2 * math.sqrt(0.25 + 2.56)), rel=1e-12)
    _, r_tie, _ = certified_radius(torch.tensor([[1.0, 0.0]], dtype=torch.float64), mu, cls, 1.0)
    assert r_tie.item() == 0.0


@pytest.mark.oracle
def test_prop1_radius_matches_a_naive_loop():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(50, 3))
    mu = rng.normal(size=(2, 3))
    pred, radius = synthetic.prop1_radius(torch.tensor(f), torch.tensor(mu), 2.5)
    for i in range(50):
        d = [sum((f[i, k] - mu[j, k]) ** 2 for k in range(3)) for j in range(2)]
        near = 0 if d[0] < d[1] else 1
        sep = math.sqrt(sum((mu[0, k] - mu[1, k]) ** 2 for k in range(3)))
        assert pred[i] == near
        assert radius[i].item() == pytest.approx((d[1 - near] - d[near]) / (2 * 2.5 * sep), rel=1e-12)


# ======================================================================================
# Prop. 1, the Lipschitz constant: certify.py's bound above every measured norm
# ======================================================================================

def random_resnet(width, seed, in_channels=3):
    """A ResNet18 (the shared model block) with random weights and random eval-mode batch norm."""
    g = torch.Generator().manual_seed(seed)
    net = nominal.ResNet18(0, width, in_channels, mean=torch.rand(in_channels, generator=g),
                           std=0.2 + 0.3 * torch.rand(in_channels, generator=g))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(0.5 + 1.5 * torch.rand(m.num_features, generator=g))
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return net.eval()


def unrolled(conv_fn, in_shape):
    """The matrix of a linear map on tensors of in_shape, column by column (float64)."""
    n = int(np.prod(in_shape))
    eye = torch.eye(n, dtype=torch.float64).view(n, *in_shape)
    return conv_fn(eye).flatten(1).T


@pytest.mark.parametrize("c_out,c_in,k,n,stride,pad", [
    (4, 3, 3, 5, 1, 1), (6, 4, 3, 6, 2, 1), (5, 5, 1, 4, 2, 0), (3, 2, 3, 3, 1, 1), (2, 3, 3, 7, 1, 0)])
@pytest.mark.oracle
def test_conv_bound_is_above_the_exact_norm_and_equal_for_circular_padding(c_out, c_in, k, n, stride, pad):
    w = torch.randn(c_out, c_in, k, k, dtype=torch.float64, generator=torch.Generator().manual_seed(n + k))
    exact = torch.linalg.matrix_norm(
        unrolled(lambda z: F.conv2d(z, w, stride=stride, padding=pad), (c_in, n, n)), 2).item()
    bound = certify.conv_operator_norm_bound(w, (n, n), (pad, pad))
    assert bound >= exact
    # the FFT formula (Sedghi et al.) is exact for a circular convolution on the N x N canvas
    N = n + 2 * pad
    circ = torch.linalg.matrix_norm(unrolled(
        lambda z: F.conv2d(F.pad(z, (k // 2,) * 4, mode="circular"), w), (c_in, N, N)), 2).item()
    assert bound == pytest.approx(circ, rel=1e-10)


def conv_inputs(net, shape):
    """Input spatial size of every convolution of net for an input of `shape` (forward hooks)."""
    sizes, hooks = {}, []
    for name, m in net.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: sizes.__setitem__(name, (mod, tuple(inp[0].shape[1:])))))
    with torch.no_grad():
        net.features(torch.zeros(1, *shape))
    for h in hooks:
        h.remove()
    return sizes


@pytest.mark.oracle
def test_each_conv_bound_is_above_its_power_iteration_norm():
    net = random_resnet(4, seed=3)
    for name, (conv, shape) in conv_inputs(net, (3, 16, 16)).items():
        w = conv.weight.detach().double()
        op = lambda z: F.conv2d(z, w, stride=conv.stride, padding=conv.padding)  # noqa: E731
        v = torch.randn(1, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        for _ in range(100):                     # power iteration on A^T A (adjoint by autograd)
            v = (v / v.norm()).requires_grad_(True)
            v, = torch.autograd.grad(op(v), v, op(v).detach())
        sigma = (op(v / v.norm()).norm()).item()
        assert certify.conv_operator_norm_bound(w, shape[1:], conv.padding) >= sigma, name


@pytest.mark.parametrize("width,size,seed", [(2, 8, 0), (4, 16, 1)])
@pytest.mark.oracle
def test_lipschitz_bound_is_above_jacobian_norms_on_random_resnets(width, size, seed):
    net = random_resnet(width, seed)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    shape = (3, size, size)
    L = certify.lipschitz_layers(net, shape)[0]
    layerwise, _ = certify.lipschitz_layers(net, shape, fold=False)
    assert 0 < L <= layerwise
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(40, *shape, generator=g, dtype=torch.float64)
    v = torch.randn(40, *shape, generator=g, dtype=torch.float64)
    net64 = copy.deepcopy(net).double()
    with torch.no_grad():                       # ||J(x) v|| by float64 central differences
        h = 1e-6
        jv = (net64.features(x + h * v) - net64.features(x - h * v)) / (2 * h)
        ratios = jv.norm(dim=1) / v.flatten(1).norm(dim=1)
        assert torch.all(ratios <= L)
        y = x + 0.05 * torch.randn(40, *shape, generator=g, dtype=torch.float64)   # secant slopes
        slopes = (net64.features(x) - net64.features(y)).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
        assert torch.all(slopes <= L)
    # the lower estimate is the spectral norm of the explicit Jacobian (power iteration converged)
    lower = certify.jacobian_norm_lower(net.features, x[:2].float(), iters=50, generator=g)
    for b in range(2):
        J = torch.autograd.functional.jacobian(lambda z: net64.features(z[None])[0], x[b])
        exact = torch.linalg.matrix_norm(J.flatten(1), 2).item()
        assert exact * 0.99 <= lower[b] <= exact * (1 + 1e-4)
        assert lower[b] <= L
    assert not net.training
    for k, t in net.state_dict().items():
        assert torch.equal(t, before[k]), k                           # evaluation changed nothing


def delta_resnet(width, seed):
    """A ResNet18 on which the layer-by-layer bound is EXACT: every convolution is a centred delta
    kernel embedding its input channels ([I; 0]), every batch norm a uniform positive scaling, so on
    positive inputs (no ReLU is ever cut) the network is linear: subsampling, scaling by
    s0 * prod(branch + shortcut), average pooling.  Its Jacobian norm is then
    max_c 1/std_c * s0 * prod(s1 s2 + s3) / sqrt(h w): exactly the product of the per-layer bounds."""
    g = torch.Generator().manual_seed(seed)
    net = nominal.ResNet18(0, width, 3, mean=[0.0, 0.0, 0.0], std=[0.2, 0.25, 0.3])
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.zero_()
                c = m.kernel_size[0] // 2
                for i in range(min(m.in_channels, m.out_channels)):
                    m.weight[i, i, c, c] = 1.0
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
                m.weight.fill_(0.5 + float(torch.rand(1, generator=g)))
                m.bias.zero_()
    return net.eval()


@pytest.mark.oracle
def test_lipschitz_bound_is_exact_where_the_network_is_a_composition_of_its_layer_norms():
    net = delta_resnet(4, seed=2)
    L = certify.lipschitz_layers(net, (3, 16, 16))[0]                 # final map 2 x 2
    x = 0.5 + 0.5 * torch.rand(3, 16, 16, dtype=torch.float64)           # positive: ReLUs pass
    J = torch.autograd.functional.jacobian(lambda z: copy.deepcopy(net).double().features(z[None])[0], x)
    exact = torch.linalg.matrix_norm(J.flatten(1), 2).item()
    assert L == pytest.approx(exact, rel=1e-6)
    assert certify.jacobian_norm_lower(net.features, x[None].float(), iters=60)[0] == pytest.approx(L, rel=1e-4)


@pytest.mark.oracle
def test_lipschitz_layerwise_bound_is_the_product_of_each_layers_explicit_matrix_norm(own_rng):
    """lipschitz_layers(fold=False), factor by factor, against the spectral norm of each layer's
    explicit matrix (unrolled column by column, torch.linalg.matrix_norm, float64), each layer run
    by its own code: the input normalisation z -> (z - mean) / std (App. A), each convolution as the
    stride-1 circular one on its N x N canvas, N = n + 2 padding (whose norm bounds the zero-padded
    one: test_conv_bound_is_above_the_exact_norm_and_equal_for_circular_padding), each eval-mode
    batch norm's linear part z -> bn(z) - bn(0) (a negative weight in the stem's), a block
    branch * branch + shortcut, the average pooling over the final 2 x 2.  The channels' std are 5x
    apart: a normalisation factor of 1 / max std (or none) is 5x off."""
    torch.manual_seed(13)                                   # random_resnet's convolutions: fixed
    net = random_resnet(2, seed=13)
    with torch.no_grad():
        net.std.copy_(torch.tensor([0.5, 0.1, 0.3]).view(1, 3, 1, 1))
        net.bn1.weight[0] = -4.0
    shape = (3, 16, 16)
    sizes = conv_inputs(net, shape)                         # conv name -> (module, its input [c, h, w])
    final = net.layer4(net.layer3(net.layer2(net.layer1(torch.zeros(1, 2, 16, 16))))).shape[1:]

    def norm(fn, in_shape):
        return torch.linalg.matrix_norm(unrolled(fn, in_shape), 2).item()

    def conv_bn(conv_name, bn_name):
        conv, (c, h, w) = sizes[conv_name]
        k, (p, _) = conv.kernel_size[0], conv.padding
        wt = conv.weight.detach().double()
        circular = norm(lambda z: F.conv2d(F.pad(z, (k // 2,) * 4, mode="circular"), wt), (c, h + 2 * p, w + 2 * p))
        bn = copy.deepcopy(net.get_submodule(bn_name)).double()
        zero = torch.zeros(1, bn.num_features, 1, 1, dtype=torch.float64)
        return circular * norm(lambda z: bn(z) - bn(zero), (bn.num_features, 1, 1))

    mean, std = net.mean.double(), net.std.double()
    expected = [norm(lambda z: (z - mean) / std - (0 - mean) / std, (3, 1, 1)), conv_bn("conv1", "bn1")]
    for name, block in net.named_modules():
        if isinstance(block, nominal.BasicBlock):
            short = conv_bn(f"{name}.shortcut.0", f"{name}.shortcut.1") if len(block.shortcut) else 1.0
            expected.append(conv_bn(f"{name}.conv1", f"{name}.bn1") * conv_bn(f"{name}.conv2", f"{name}.bn2") + short)
    expected.append(norm(lambda z: F.adaptive_avg_pool2d(z, 1).flatten(1), (1, *final[1:])))
    assert expected[0] == pytest.approx(10.0) and expected[-1] == pytest.approx(0.5)       # 1/0.1, 1/sqrt(4)
    bound, parts = certify.lipschitz_layers(net, shape, fold=False)
    assert len(parts) == len(expected) == 11
    assert [v for _, v in parts] == pytest.approx(expected, rel=1e-9)
    assert bound == pytest.approx(math.prod(expected), rel=1e-9)


# ======================================================================================
# certify.py's L2 attack and power iteration: never inside a certified radius, close to it where the bound
# is exact
# ======================================================================================

@pytest.mark.oracle
def test_l2_attack_on_an_isometry_finds_the_exact_radius_and_never_goes_inside():
    g = torch.Generator().manual_seed(5)
    n = 3 * 4 * 4
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    feat = lambda x: x.flatten(1) @ Q.T                                  # noqa: E731  isometry
    x = 0.4 + 0.2 * torch.rand(16, 3, 4, 4, generator=g)                  # away from the box faces
    mu = feat(x[:4]) + 0.1 * torch.randn(4, n, generator=g)              # one centre per class
    cls = torch.arange(4)
    _, radius, _ = certified_radius(feat(x).double(), mu, cls, 1.0)
    pert = certify.l2_attack(feat, x, mu, cls, steps=20, bisect=10)
    assert torch.all(torch.isfinite(pert))
    assert torch.all(pert >= radius * (1 - 1e-4))                       # float32 features
    assert (pert / radius).median() < 1.05                               # the attack is tight here


@pytest.mark.oracle
def test_l2_attack_on_a_linear_feature_map_finds_the_closed_form_distance_to_the_decision_hyperplane():
    """f(x) = A x (not an isometry), two centres: the nearest-centre decision changes on the
    hyperplane h(x) = ||A x - mu_1||^2 - ||A x - mu_0||^2 = 0, h linear in x (the ||A x||^2 terms
    cancel), so the smallest perturbation is |h(x)| / ||grad h|| exactly (its foot inside the box
    here).  Every image: found, never closer than that, and within 0.03% of it after bisection."""
    g = torch.Generator().manual_seed(6)
    n = 16
    A = torch.randn(3, n, generator=g, dtype=torch.float64) * torch.tensor([[2.0], [1.0], [0.3]], dtype=torch.float64)
    feat = lambda x: x.flatten(1) @ A.T                                  # noqa: E731
    x = 0.45 + 0.1 * torch.rand(12, 1, 4, 4, generator=g, dtype=torch.float64)
    f = feat(x)
    mu = torch.stack([f[0], f[1]]) + 0.2 * torch.randn(2, 3, generator=g, dtype=torch.float64)
    cls = torch.tensor([0, 1])
    h = ((f - mu[1]) ** 2).sum(1) - ((f - mu[0]) ** 2).sum(1)           # [12]
    grad_h = 2 * A.T @ (mu[0] - mu[1])                                   # [16], the same for every x
    exact = h.abs() / grad_h.norm()
    foot = x.flatten(1) - (h / grad_h.norm() ** 2)[:, None] * grad_h[None]
    assert 0 <= foot.min() and foot.max() <= 1                           # the nearest flip is in the box
    best, x_adv = certify.l2_attack(feat, x, mu, cls, steps=20, bisect=12, return_examples=True)
    # the search alone stops 4e-4 beyond; 12 rounds of bisection on s in (0, 1] leave < 2^-12
    assert torch.all(best >= exact * (1 - 1e-9)) and torch.all(best <= exact * (1 + 3e-4)), (best / exact)
    assert torch.all(torch.sign(((feat(x_adv) - mu[1]) ** 2).sum(1) - ((feat(x_adv) - mu[0]) ** 2).sum(1))
                     == -torch.sign(h))                                  # on the other side


@pytest.mark.parametrize("bisect", [0, 6])
@pytest.mark.oracle
def test_l2_attack_reports_the_smallest_flip_among_every_point_it_tried(bisect):
    """The answer is the minimum over what the attack evaluated: every point given to feature_fn is
    recorded, its side of the decision hyperplane read from the closed form (f = A x, two centres:
    h(z) = ||A z - mu_1||^2 - ||A z - mu_0||^2 is linear in z) and its distance to x measured here.
    Per image (one call each): the distance reported is the smallest among the recorded points on
    the other side (every image has some), the example returned is such a point, and neither is closer
    than |h(x)| / ||grad h||.  bisect = 0 is the search alone, where later flips lie farther than
    earlier ones (its radius grows again after a step back across): one kept in place of the
    smallest fails here."""
    g = torch.Generator().manual_seed(6)
    A = torch.randn(3, 16, generator=g, dtype=torch.float64) * torch.tensor([[2.0], [1.0], [0.3]], dtype=torch.float64)
    x = 0.45 + 0.1 * torch.rand(12, 1, 4, 4, generator=g, dtype=torch.float64)
    mu = (x[:2].flatten(1) @ A.T) + 0.2 * torch.randn(2, 3, generator=g, dtype=torch.float64)
    cls = torch.tensor([0, 1])
    grad_h = 2 * A.T @ (mu[0] - mu[1])
    h = lambda z: z.flatten(1) @ grad_h + (mu[1] ** 2).sum() - (mu[0] ** 2).sum()   # noqa: E731  closed form
    for xi in x.split(1):
        tried = []

        def feat(z):
            tried.append(z.detach().clone())
            return z.flatten(1) @ A.T
        best, x_adv = certify.l2_attack(feat, xi, mu, cls, steps=40, bisect=bisect, return_examples=True)
        tried = torch.cat(tried)
        flips = torch.sign(h(tried)) != torch.sign(h(xi))
        dist = (tried - xi).flatten(1).norm(dim=1)
        assert flips.any() and float(best[0]) == float(dist[flips].min())    # the nearest flip is in the box
        assert any(torch.equal(x_adv[0], z) for z in tried[flips & (dist == best[0])])
        assert float(best[0]) >= float(h(xi).abs()[0] / grad_h.norm()) * (1 - 1e-9)


@pytest.mark.oracle
def test_l2_attack_never_flips_inside_the_sound_radius_of_random_resnets(own_rng):
    torch.manual_seed(7)                # random_resnet's convolutions: torch 2.14 seeds its default
    net = random_resnet(2, seed=7)      # generator at random, so -k runs drew other networks
    before = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(7)
    x = torch.rand(12, 3, 8, 8, generator=g)
    with torch.no_grad():
        f = net.features(x)
    mu, cls = f[:6] + 0.01 * torch.randn(6, f.shape[1], generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    L = certify.lipschitz_layers(net, (3, 8, 8))[0]
    _, radius, _ = certified_radius(f.double(), mu, cls, L)
    pert = certify.l2_attack(net.features, x, mu, cls, steps=40, bisect=6)
    assert torch.isfinite(pert).sum() >= 6
    assert not torch.any(pert < radius)
    # the check is live: with an L 1000x below a Jacobian norm found, "radii" are broken
    low = certify.jacobian_norm_lower(net.features, x, iters=10, generator=g).max().item()
    _, fake, _ = certified_radius(f.double(), mu, cls, low / 1000)
    assert torch.any(pert < fake)
    assert not net.training and all(torch.equal(t, before[k]) for k, t in net.state_dict().items())


# certify.l2_attack runs every image's minimum-norm search in one batch (its radius moves at every
# step) and jacobian_norm_lower answers with the best vector of the power iterates' span.  The
# oracles: the same rules written per example with Python scalars, and explicit Jacobians.
def tiny_feature_net(seed, n_in=16, hidden=12, d=3):
    """A float64 ReLU feature map [n, 1, 4, 4] -> [n, d] whose Jacobian is explicit."""
    g = torch.Generator().manual_seed(seed)
    W1 = torch.randn(hidden, n_in, generator=g, dtype=torch.float64)
    b1 = 0.1 * torch.randn(hidden, generator=g, dtype=torch.float64)
    W2 = torch.randn(d, hidden, generator=g, dtype=torch.float64)
    return lambda x: torch.relu(x.flatten(1) @ W1.T + b1) @ W2.T


def naive_nearest_class(f, mu, cls):
    """Class of the nearest centre of one feature vector, by a loop over the centres."""
    d2 = [float(((f - m) ** 2).sum()) for m in mu]
    return int(cls[d2.index(min(d2))])


def naive_l2_attack(feat, x, mu, cls, steps, bisect):
    """certify.l2_attack's rules, one image at a time, the radius a Python float.
    -> (smallest norms, images found)."""
    bests, advs = [], []
    for xi in x.split(1):
        y = naive_nearest_class(feat(xi)[0], mu, cls)
        delta, eps, best, adv_x = torch.zeros_like(xi), 0.0, math.inf, xi.clone()
        for t in range(steps + 1):
            z = (xi + delta).requires_grad_(True)
            f = feat(z)[0]
            d2 = [((f - m) ** 2).sum() for m in mu]
            adv = naive_nearest_class(f.detach(), mu, cls) != y
            dist = float((z.detach() - xi).norm())
            if adv and dist < best:
                best, adv_x = dist, z.detach().clone()
            if t == steps:
                break
            margin = min(d for d, c in zip(d2, cls) if c == y) - min(d for d, c in zip(d2, cls) if c != y)
            g, = torch.autograd.grad(margin, z)
            z = z.detach()
            g[((z <= 0) & (g < 0)) | ((z >= 1) & (g > 0))] = 0               # box-feasible
            g_norm = max(float(g.norm()), 1e-30)
            c = 0.5 * (1 + math.cos(math.pi * t / steps))
            gamma = certify.GAMMA_END + (certify.GAMMA - certify.GAMMA_END) * c
            alpha = certify.ALPHA_END + (certify.ALPHA - certify.ALPHA_END) * c
            if adv:
                eps = min(eps * (1 - gamma), best)
            elif best < math.inf:
                eps = eps * (1 + gamma)
            else:
                eps = max(float(delta.norm()) + max(-float(margin.detach()), 0.0) / g_norm,
                          eps * (1 + certify.GROW))
            delta = delta + alpha * eps / g_norm * g
            delta = delta * min(1.0, eps / max(float(delta.norm()), 1e-30))
            delta = (xi + delta).clamp(0, 1) - xi
        d, lo, hi = adv_x - xi, 0.0, 1.0                                     # bisection along the ray
        for _ in range(bisect if best < math.inf else 0):
            s = (lo + hi) / 2
            zs = (xi + s * d).clamp(0, 1)
            adv = naive_nearest_class(feat(zs)[0], mu, cls) != y
            if adv and float((zs - xi).norm()) < best:
                best, adv_x = float((zs - xi).norm()), zs
            lo, hi = (lo, s) if adv else (s, hi)
        bests.append(best)
        advs.append(adv_x)
    return torch.tensor(bests, dtype=torch.float64), torch.cat(advs)


@pytest.mark.oracle
def test_batched_l2_attack_equals_a_per_example_loop_and_its_examples_flip_at_their_distance():
    feat = tiny_feature_net(seed=3)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(10, 1, 4, 4, generator=g, dtype=torch.float64)
    x[:4, 0, 0] = 0.0                                                       # pixels on the box faces
    x[2:6, 0, 3] = 1.0
    with torch.no_grad():
        f = feat(x)
    mu = f[:6] + 0.05 * torch.randn(6, 3, generator=g, dtype=torch.float64)
    cls = torch.tensor([0, 1, 2, 0, 1, 2])
    best, x_adv = certify.l2_attack(feat, x, mu, cls, steps=12, bisect=6, return_examples=True)
    naive_best, naive_adv = naive_l2_attack(feat, x, mu, cls, 12, 6)
    assert torch.equal(torch.isfinite(best), torch.isfinite(naive_best))
    assert int(torch.isfinite(best).sum()) >= 7
    fin = torch.isfinite(best)
    assert torch.allclose(best[fin], naive_best[fin], rtol=1e-9, atol=0)
    assert torch.allclose(x_adv, naive_adv, rtol=0, atol=1e-9)
    # every example reported lies in the box, at the distance reported, and changes feat's class
    assert x_adv.min() >= 0 and x_adv.max() <= 1 and torch.equal(x_adv[~fin], x[~fin])
    assert torch.equal((x_adv - x).flatten(1).norm(dim=1)[fin], best[fin])
    for i in fin.nonzero().flatten().tolist():
        assert naive_nearest_class(feat(x_adv[i:i + 1])[0], mu, cls) != naive_nearest_class(feat(x[i:i + 1])[0], mu, cls)


@pytest.mark.oracle
def test_l2_attack_on_a_resnet_reports_only_flips_outside_its_radius(own_rng):
    """certify.main's path: the search and its verdicts on the network certified; every finding
    flips it, in the box, at its distance, and none lies inside a sound radius of Prop. 1."""
    torch.manual_seed(11)                                   # random_resnet's convolutions: fixed
    net = random_resnet(2, seed=11)
    g = torch.Generator().manual_seed(11)
    x = torch.rand(10, 3, 8, 8, generator=g)
    with torch.no_grad():
        f = net.features(x)
    mu, cls = f[:6] + 0.01 * torch.randn(6, f.shape[1], generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    best, x_adv = certify.l2_attack(net.features, x, mu, cls, steps=12, bisect=6, return_examples=True)
    fin = torch.isfinite(best)
    assert int(fin.sum()) >= 6
    with torch.no_grad():
        _, y = certify.nearest_center(net.features(x), mu, cls)
        _, y_adv = certify.nearest_center(net.features(x_adv), mu, cls)
    assert torch.all(y_adv[fin] != y[fin]) and torch.equal(x_adv[~fin], x[~fin])
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.equal((x_adv.double() - x.double()).flatten(1).norm(dim=1)[fin], best[fin])
    _, radius, _ = certified_radius(f.double(), mu, cls, certify.lipschitz_layers(net, (3, 8, 8))[0])
    assert not torch.any(best < radius)


def naive_power_estimates(J, v0, T):
    """One image: (plain power iteration's ||J v_T||, the best ||J v|| over unit v in the span of
    v_0, A v_0, ..., A^T v_0 by QR of those vectors, the largest singular value of J), A = J^T J."""
    A = J.T @ J
    v = v0 / v0.norm()
    krylov = [v]
    for _ in range(T):
        v = A @ v
        v = v / v.norm()
        krylov.append(v)
    Q, _ = torch.linalg.qr(torch.stack(krylov, 1))
    ritz = torch.linalg.eigvalsh(Q.T @ A @ Q)[-1].clamp_min(0).sqrt()
    return float((J @ v).norm()), float(ritz), float(torch.linalg.matrix_norm(J, 2))


@pytest.mark.oracle
@pytest.mark.parametrize("kind", ["mlp", "resnet"])
def test_power_iteration_span_beats_the_plain_iterate_and_reaches_the_explicit_jacobian_norm(kind, own_rng):
    if kind == "mlp":
        feat, shape, d = tiny_feature_net(seed=5), (1, 4, 4), 3
    else:
        torch.manual_seed(5)                                # random_resnet's convolutions: fixed
        net = copy.deepcopy(random_resnet(2, seed=5)).double()
        feat, shape, d = net.features, (3, 8, 8), 16
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    Js = [torch.autograd.functional.jacobian(lambda z: feat(z[None])[0], xi).flatten(1) for xi in x]
    for T in (1, 2, d):
        got = certify.jacobian_norm_lower(feat, x, iters=T, generator=torch.Generator().manual_seed(7))
        v0 = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).double().flatten(1)
        for b, J in enumerate(Js):
            plain, ritz, sigma = naive_power_estimates(J, v0[b], T)
            assert plain * (1 - 1e-12) <= got[b] <= sigma * (1 + 1e-12)
            if T < int(torch.linalg.matrix_rank(J)):                        # the Krylov vectors independent
                assert float(got[b]) == pytest.approx(ritz, rel=1e-9)
            if T >= d:                                                      # rank(A) <= d: the span is invariant
                assert float(got[b]) == pytest.approx(sigma, rel=1e-9)


# ======================================================================================
# certify.py's certified-accuracy curves and the results' bookkeeping, against plain loops
# ======================================================================================

def brute_force_share(radius, correct, r):
    """Sec. 4.1 by a plain loop: the share of ALL images that are correct with radius > r."""
    return sum(1 for v, c in zip(radius, correct) if c and v > r) / len(radius)


def brute_force_curve(radius, correct, points):
    """(radii, shares) of a certified-accuracy curve by plain loops: `points` evenly spaced radii
    from 0 to the largest finite radius of a correct image (one point, 0, when that is 0)."""
    top = max([v for v, c in zip(radius, correct) if c and math.isfinite(v)], default=0.0)
    grid = [top * k / (points - 1) for k in range(points)] if top > 0 else [0.0]
    return grid, [brute_force_share(radius, correct, r) for r in grid]


@pytest.mark.oracle
def test_certified_accuracy_curve_is_a_brute_force_count_of_correct_images_with_radius_above_r():
    # wrong images with the largest radii, a correct image with no flip found (inf), radii on the
    # grid's points (1, 2: not counted there, radius > r), 3 wrong images of 10 (the denominator)
    radius = [0.0, 1.0, 2.0, 4.0, 3.5, 9.0, math.inf, 2.0, 0.5, 6.0]
    correct = [True, True, True, True, True, False, True, False, True, False]
    for points in (2, 5, 9):
        curve = certify.accuracy_curve(torch.tensor(radius, dtype=torch.float64), torch.tensor(correct),
                                       points, key="attacked_accuracy")
        grid, shares = brute_force_curve(radius, correct, points)
        assert len(curve) == points and all(set(p) == {"radius", "attacked_accuracy"} for p in curve)
        assert [p["radius"] for p in curve] == pytest.approx(grid, rel=1e-15, abs=0)
        assert curve[0]["radius"] == 0.0 and curve[-1]["radius"] == 4.0     # ends where it reaches 0
        assert [p["attacked_accuracy"] for p in curve] == pytest.approx(shares, abs=1e-15)
    assert [p["attacked_accuracy"] for p in curve][::2] == pytest.approx([0.6, 0.4, 0.3, 0.3, 0.1])
    # no correct image with a radius above 0: one point, (0, 0), not an empty curve
    for radius0, correct0 in (([0.0, 0.0, 3.0], [True, True, False]), ([1.0, 2.0], [False, False])):
        curve = certify.accuracy_curve(torch.tensor(radius0, dtype=torch.float64), torch.tensor(correct0), 7)
        assert curve == [{"radius": 0.0, "certified_accuracy": 0.0}]


@pytest.mark.oracle
def test_certify_results_pair_each_image_with_its_own_radius_and_recount_like_a_naive_loop():
    """results_of against naive recounts: each curve from its own radius array, the attack's m
    perturbations against the first m images' radius and correctness, the counts and medians
    (torch's median of an even count is the lower middle value: statistics.median_low)."""
    import argparse
    import statistics
    radius = [0.5, 2.0, 1.0, 3.0, 0.2, 0.1, 4.0, 0.3]
    tight = [0.5, 2.5, 1.0, 3.5, 0.2, 0.1, 4.0, 0.3]                 # >= radius (best same-class centre)
    two = [0.7, 2.0, 1.0, 5.0, 0.2, 0.4, 4.0, 0.3]                   # >= radius (two closest; some equal)
    correct = [True, True, False, True, True, False, True, False]
    pert = [0.6, 1.5, math.inf, 3.2]                                 # the first m = 4 images attacked
    n, m, L, lower = len(radius), len(pert), 2.0, 0.5
    t = lambda v: torch.tensor(v, dtype=torch.float64)               # noqa: E731
    r = {"pred": torch.zeros(n, dtype=torch.long), "radius": t(radius), "tight": t(tight), "two_closest": t(two)}
    args = argparse.Namespace(ckpt="c.pt", data="folder", lipschitz="bound", grid=5, attack_steps=3, bisect=2)
    res = certify.results_of(args, n, L, 7.0, 9.0, r, torch.tensor(correct), t(pert), lower)
    assert res["sound"] is False                          # image 1 flipped at 1.5 inside its radius 2
    for key, values, share in (("curve", radius, "accuracy_not_sound"), ("curve_tight", tight, "accuracy_not_sound"),
                               ("curve_two_closest", two, "two_closest_not_sound")):
        grid, shares = brute_force_curve(values, correct, 5)
        assert [p["radius"] for p in res[key]] == pytest.approx(grid, rel=1e-15), key
        assert [p[share] for p in res[key]] == pytest.approx(shares, abs=1e-15), key
    grid, shares = brute_force_curve(pert, correct[:m], 5)
    assert [p["radius"] for p in res["l2_attack"]["curve"]] == pytest.approx(grid, rel=1e-15)
    assert [p["attacked_accuracy"] for p in res["l2_attack"]["curve"]] == pytest.approx(shares, abs=1e-15)
    assert res["clean_accuracy"] == sum(correct) / n
    assert res["two_closest_differs"] == sum(a > b for a, b in zip(two, radius)) == 3
    assert res["tight_exceeds_sound"] == sum(a > b for a, b in zip(tight, radius)) == 2
    ok = [v for v, c in zip(radius, correct) if c]
    med_r = statistics.median_low(ok)
    assert res["radius"] == {"median_correct": med_r, "max_correct": max(ok), "vacuous": False,
                             "median_correct_tight": statistics.median_low([v for v, c in zip(tight, correct) if c]),
                             "median_correct_if_L_were_lower_estimate": pytest.approx(med_r * L / lower)}
    att = res["l2_attack"]
    assert att["images"] == m and res["lipschitz"]["lower_estimate_images"] == m
    assert res["lipschitz"] == {"value": L, "kind": "bound", "lower_estimate": lower, "lower_estimate_images": m,
                                "upper_bound": 7.0, "upper_bound_layerwise": 9.0}
    assert att["flipped"] == sum(math.isfinite(p) for p in pert) == 3
    assert att["flipped_inside_certified_radius"] == sum(p < v for p, v in zip(pert, radius)) == 1
    assert att["share_flipped_inside"] == 1 / m
    assert att["median_min_perturbation"] == statistics.median_low(pert)
    assert att["gap_median_ratio"] == pytest.approx(statistics.median_low(pert) / statistics.median_low(radius[:m]))
    # a certificate only where L is one: nothing flipped inside, and L not below the Jacobian norm found
    outside = t([0.6, 2.5, math.inf, 3.2])
    for L_used, sound in ((lower, True), (0.99 * lower, False)):
        res = certify.results_of(args, n, L_used, 7.0, 9.0, r, torch.tensor(correct), outside, lower)
        key = "certified_accuracy" if sound else "accuracy_not_sound"
        assert res["sound"] is sound and all(key in p for p in res["curve"] + res["curve_tight"])


def nested_keys(obj):
    """Every dict key anywhere in a results object."""
    if isinstance(obj, dict):
        return set(obj) | {k for v in obj.values() for k in nested_keys(v)}
    return {k for v in obj for k in nested_keys(v)} if isinstance(obj, list) else set()


@pytest.mark.oracle
def test_certify_given_lipschitz_is_assumed_and_sound_only_at_or_above_the_bound():
    """--lipschitz VALUE: Prop. 1's radii hold only if f is L-Lipschitz.  The run proves that only
    for L >= its layer-wise bound (every number above a Lipschitz constant is one); a Jacobian norm
    found and the attack's flips can refute it, never prove it.  So, by a plain rule over cases:
    a given L names the curves of R(x) `assumed_L_accuracy`, nowhere `certified_accuracy`, and is
    sound iff L >= bound, L >= the lower estimate and no flip lies inside its radius; the bound
    itself keeps `certified_accuracy`, or `accuracy_not_sound` after a flip inside."""
    import argparse
    radius, correct = [0.5, 2.0, 1.0, 3.0, 0.2, 0.1], [True, True, False, True, True, False]
    outside, inside = [0.6, 2.5, math.inf, 3.2], [0.6, 1.5, math.inf, 3.2]      # image 1: 1.5 < 2.0
    t = lambda v: torch.tensor(v, dtype=torch.float64)                          # noqa: E731
    r = {"pred": torch.zeros(6, dtype=torch.long), "radius": t(radius), "tight": t(radius), "two_closest": t(radius)}
    bound, lower = 7.0, 0.5
    cases = [("given", 3.0, outside), ("given", 7.0, outside), ("given", 9.0, outside), ("given", 9.0, inside),
             ("given", 0.4, outside), ("bound", bound, outside), ("bound", bound, inside)]
    for kind, L, pert in cases:
        args = argparse.Namespace(ckpt="c.pt", data="folder", lipschitz=L if kind == "given" else "bound",
                                  grid=5, attack_steps=3, bisect=2)
        res = certify.results_of(args, 6, L, bound, 9.0, r, torch.tensor(correct), t(pert), lower)
        no_flip_inside = all(p >= v for p, v in zip(pert, radius))
        sound = no_flip_inside and L >= lower and L >= bound
        key = "assumed_L_accuracy" if kind == "given" else "certified_accuracy" if sound else "accuracy_not_sound"
        assert res["sound"] is sound, (kind, L, pert)
        assert res["lipschitz"]["kind"] == kind and res["lipschitz"]["value"] == L
        grid, shares = brute_force_curve(radius, correct, 5)
        for name in ("curve", "curve_tight"):
            assert [set(p) for p in res[name]] == [{"radius", key}] * 5, (kind, L, name)
            assert [p[key] for p in res[name]] == pytest.approx(shares, abs=1e-15)
        assert ("certified_accuracy" in nested_keys(res)) == (kind == "bound" and sound)


@pytest.mark.oracle
def test_certify_attack_first_attacks_the_first_limit_images_in_order_and_keeps_the_largest_jacobian_norm(
        monkeypatch, tmp_path):
    """attack_first's bookkeeping, with the attack and the power iteration replaced by functions of
    an image's number (written into its first pixel): chunks of -b up to --attack-limit (0: all),
    each perturbation at its image's place, the lower estimate the LARGEST per-image norm (a
    Jacobian norm found anywhere bounds L from below), the attack run on the network certified
    (net.features)."""
    import argparse
    norms = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0]                       # per image: the largest is past the limit
    calls = []

    def number(x):                                                   # image k has first pixel 10 k / 255
        return (x.flatten(1)[:, 0].double() * 25.5).round()

    def fake_lower(feature_fn, x, iters, generator):
        return torch.tensor([norms[int(k)] for k in number(x)], dtype=torch.float64)

    def fake_attack(feature_fn, x, mu, cls, steps, bisect):
        calls.append((feature_fn, steps, bisect))
        return number(x) + 0.5
    monkeypatch.setattr(certify, "jacobian_norm_lower", fake_lower)
    monkeypatch.setattr(certify, "l2_attack", fake_attack)

    class Net(nn.Module):
        def features(self, x):
            return x.flatten(1)[:, :2]
    net = Net()
    images = torch.zeros(len(norms), 1, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = 10 * torch.arange(len(norms), dtype=torch.uint8)
    mu, cls = torch.zeros(2, 2), torch.tensor([0, 1])
    for limit, m in ((5, 5), (0, len(norms))):
        out = str(tmp_path / f"c{limit}.json")
        args = argparse.Namespace(out=out, attack_limit=limit, seed=0, attack_steps=3, bisect=2, power_iters=1,
                                  batch_size=2)
        calls.clear()
        pert, lower = certify.attack_first(net, images, mu, cls, {"radius": torch.zeros(len(norms))}, args, "cpu")
        assert pert.tolist() == [k + 0.5 for k in range(m)]
        assert lower == max(norms[:m])
        assert len(calls) == math.ceil(m / 2) and all(c[1:] == (3, 2) for c in calls)
        assert all(feat == net.features for feat, *_ in calls)
        with open(out + ".log.jsonl.partial") as f:
            rows = [json.loads(line) for line in f]
        assert [(r["images"], r["lower_estimate"]) for r in rows] == \
            [(min(m, k + 2), max(norms[:min(m, k + 2)])) for k in range(0, m, 2)]


@pytest.mark.oracle
def test_certify_plot_draws_each_result_curve_and_the_radii_l_over_the_lower_estimate(monkeypatch, tmp_path):
    """plot_curves' data, read back from its axis: each curve of the results under its own key (the
    sound radius, the best same-class centre, the two closest, the L2 attack's perturbations), and
    the sound curve at radii x L / lower estimate (what they would be with L = the lower estimate:
    larger), on a log radius axis; each labelled with its share's name (accuracy_not_sound when L is
    refuted); -> the path written."""
    from matplotlib.figure import Figure
    figures, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: figures.append(fig) or savefig(fig, *a, **k))
    curve = lambda key, points: [{"radius": r, key: v} for r, v in points]          # noqa: E731
    for share in ("certified_accuracy", "accuracy_not_sound"):
        results = {"curve": curve(share, [(0.0, 0.75), (1.0, 0.5), (2.0, 0.0)]),
                   "curve_tight": curve(share, [(0.0, 0.75), (1.5, 0.5), (3.0, 0.0)]),
                   "curve_two_closest": curve("two_closest_not_sound", [(0.0, 0.75), (2.5, 0.25), (5.0, 0.0)]),
                   "l2_attack": {"curve": curve("attacked_accuracy", [(0.0, 0.75), (0.75, 0.5), (1.5, 0.25)])},
                   "lipschitz": {"value": 4.0, "kind": "bound", "lower_estimate": 2.0}}
        path = str(tmp_path / f"{share}.png")
        assert certify.plot_curves(results, path) == path
        (ax,) = figures[-1].axes
        assert [(list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()] == [
            ([p["radius"] * scale for p in c], [p[key] for p in c]) for c, key, scale in (
                (results["curve"], share, 1), (results["curve_tight"], share, 1),
                (results["curve_two_closest"], "two_closest_not_sound", 1),
                (results["curve"], share, 4.0 / 2.0),                                   # R(x) x L / lower
                (results["l2_attack"]["curve"], "attacked_accuracy", 1))]
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels[0] == f"{share}: R(x)" and "not sound" in labels[2] and ax.get_xscale() == "log"
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


# ======================================================================================
# Eq. (6): QTRADES' consistency term and the quick adversary (qtrades.py; Sec. 4.2, App. A)
# ======================================================================================

def naive_consistency(log_p, log_q):
    """-sum_c p_c log q_c with Python floats, terms with p_c = 0 left out."""
    out = []
    for lp, lq in zip(log_p.double().tolist(), log_q.double().tolist()):
        out.append(-sum(math.exp(a) * b for a, b in zip(lp, lq) if a != float("-inf")))
    return torch.tensor(out, dtype=torch.float64)


def toy_clusters_qtrades(seed=0, classes=4, K=2, dim=5):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes * K, dim, generator=g, dtype=torch.float64) * 2
    return centers, torch.arange(classes).repeat_interleave(K), g


@pytest.mark.parametrize("D", [None, 3])
@pytest.mark.oracle
def test_consistency_is_eq6_cross_entropy_with_finite_gradients(D):
    centers, center_classes, g = toy_clusters_qtrades()
    f = torch.randn(20, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    f_adv = (f.detach() + 0.7 * torch.randn(20, 5, generator=g, dtype=torch.float64)).requires_grad_(True)
    keep = qtrades.nearest_mask(f, centers, D)
    log_p = qtrades.cluster_log_probs(f, centers, center_classes, 1.5, keep=keep)
    log_q = qtrades.cluster_log_probs(f_adv, centers, center_classes, 1.5, keep=keep)
    # the clean distribution is Eq. (4) with D, exactly the shared block's
    assert torch.allclose(log_p, qtrades.cluster_log_probs(f, centers, center_classes, 1.5, D),
                          atol=1e-12, rtol=0)
    if D is not None:
        assert torch.isneginf(log_p).any()                                 # absent classes: p = 0
    # same centre set for both: q_c > 0 wherever p_c > 0, so the term is finite
    assert torch.equal(torch.isneginf(log_p), torch.isneginf(log_q))
    cons = qtrades.consistency(log_p, log_q)
    assert torch.allclose(cons, naive_consistency(log_p, log_q), atol=1e-12, rtol=1e-12)
    cons.sum().backward()
    assert torch.isfinite(f.grad).all() and torch.isfinite(f_adv.grad).all()
    assert f.grad.abs().sum() > 0 and f_adv.grad.abs().sum() > 0
    # CE(q, p) >= H(p), with equality at q = p
    entropy = naive_consistency(log_p.detach(), log_p.detach())
    assert (cons.detach() >= entropy - 1e-12).all()
    assert torch.allclose(qtrades.consistency(log_p, log_p), entropy, atol=1e-12)


def naive_kl(log_p, log_q):
    """KL(p || q) = sum_c p_c (log p_c - log q_c) with Python floats, terms with p_c = 0 left out."""
    out = []
    for lp, lq in zip(log_p.double().tolist(), log_q.double().tolist()):
        out.append(sum(math.exp(a) * (a - b) for a, b in zip(lp, lq) if a != float("-inf")))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.oracle
@pytest.mark.parametrize("D", [None, 3])
def test_consistency_kl_is_trades_kl_and_ce_minus_the_clean_entropy(D):
    centers, center_classes, g = toy_clusters_qtrades(seed=1)
    f = torch.randn(20, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    f_adv = (f.detach() + 0.7 * torch.randn(20, 5, generator=g, dtype=torch.float64)).requires_grad_(True)
    keep = qtrades.nearest_mask(f, centers, D)
    log_p = qtrades.cluster_log_probs(f, centers, center_classes, 1.5, keep=keep)
    log_q = qtrades.cluster_log_probs(f_adv, centers, center_classes, 1.5, keep=keep)
    kl = qtrades.consistency(log_p, log_q, "kl")
    assert torch.allclose(kl, naive_kl(log_p, log_q), atol=1e-12, rtol=1e-12)
    assert (kl.detach() >= -1e-12).all()                                   # Gibbs' inequality
    assert torch.allclose(qtrades.consistency(log_p, log_p, "kl"), torch.zeros(20, dtype=torch.float64),
                          atol=1e-12)                                      # KL(p || p) = 0
    entropy = naive_consistency(log_p.detach(), log_p.detach())
    assert torch.allclose(qtrades.consistency(log_p, log_q, "ce").detach() - kl.detach(), entropy,
                          atol=1e-12)                                      # CE = H(p) + KL
    kl.sum().backward()
    assert torch.isfinite(f.grad).all() and torch.isfinite(f_adv.grad).all()
    # wiring: both losses pass the kind on, and differ from "ce" by lam * mean H(p) exactly
    cluster_ids = torch.arange(20) % len(centers)
    for kind in ("ce", "kl"):
        total, _, cons = qtrades.qtrades_magnet_loss(f.detach(), f_adv.detach(), cluster_ids,
                                                     center_classes[cluster_ids], 1.0, centers,
                                                     center_classes, 1.5, D, 3.0, kind)
        assert torch.allclose(cons, (naive_consistency if kind == "ce" else naive_kl)(
            log_p.detach(), log_q.detach()), atol=1e-12)
    logits, logits_adv = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    y = torch.arange(6) % 4
    ce_total, _ = qtrades.qtrades_ce_loss(logits, logits_adv, y, 2.0, "ce")
    kl_total, kl_cons = qtrades.qtrades_ce_loss(logits, logits_adv, y, 2.0, "kl")
    lp = F.log_softmax(logits, 1)
    assert torch.allclose(kl_cons.double(), naive_kl(lp, F.log_softmax(logits_adv, 1)), atol=1e-6)
    assert torch.allclose(ce_total - kl_total, 2.0 * naive_consistency(lp, lp).mean().float(), atol=1e-5)


@pytest.mark.wiring
@pytest.mark.parametrize("loss", ["magnet", "ce"])
def test_consistency_flag_reaches_the_training_loss(nominal_run, image_folder, tmp_path, monkeypatch, loss):
    kinds, real = [], qtrades.consistency

    def recording(log_p, log_q, kind="ce"):
        kinds.append(kind)
        return real(log_p, log_q, kind)
    monkeypatch.setattr(qtrades, "consistency", recording)
    out = qtrades.main(folder_args(image_folder, str(tmp_path / "q.pt"), "--init", nominal_run[1],
                                   "--epochs", 1, "--limit", 60, "--loss", loss, "--consistency", "kl"))
    # crafting calls it with the default (same gradient in x'); every training loss with "kl"
    assert kinds.count("kl") >= 1 and kinds.count("kl") == kinds.count("ce"), kinds
    ckpt = torch.load(tmp_path / "q.pt", map_location="cpu", weights_only=True)
    assert ckpt["args"]["consistency"] == "kl" and out["epochs_done"] == 1


@pytest.mark.oracle
def test_lam_0_is_magnet_py_loss_and_lam_adds_the_naive_consistency():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(24, 6, generator=g, requires_grad=True)
    f_adv = f.detach() + 0.3 * torch.randn(24, 6, generator=g)
    cluster_ids = torch.arange(4).repeat_interleave(6)                    # 4 clusters x 6
    class_ids = cluster_ids // 2                                          # 2 classes, K = 2
    centers = torch.randn(4, 6, generator=g)
    center_classes = torch.tensor([0, 0, 1, 1])
    reference, per_reference, _ = magnet.magnet_loss(f, cluster_ids, class_ids, 12.5)
    loss, per_example, cons = qtrades.qtrades_magnet_loss(
        f, f_adv, cluster_ids, class_ids, 12.5, centers, center_classes, 2.0, None, 0.0)
    assert torch.equal(loss, reference) and torch.equal(per_example, per_reference)
    loss3, _, _ = qtrades.qtrades_magnet_loss(
        f, f_adv, cluster_ids, class_ids, 12.5, centers, center_classes, 2.0, None, 3.0)
    log_p = magnet.cluster_log_probs(f.double(), centers.double(), center_classes, 2.0)
    log_q = magnet.cluster_log_probs(f_adv.double(), centers.double(), center_classes, 2.0)
    expected = float(reference.detach()) + 3.0 * float(naive_consistency(log_p, log_q).mean())
    assert float(loss3.detach()) == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(cons.double(), naive_consistency(log_p, log_q), atol=1e-5)
    # gradients flow through the clean p(f(x)) too (not detached, as in TRADES and the authors'
    # code): d(loss3 - magnet)/df = 3 d(mean CE)/df, both arguments depending on f
    grad_loss3, = torch.autograd.grad(loss3, f)
    grad_ref, = torch.autograd.grad(reference, f)
    f64 = f.detach().double().requires_grad_(True)
    cons64 = qtrades.consistency(
        magnet.cluster_log_probs(f64, centers.double(), center_classes, 2.0),
        magnet.cluster_log_probs(f_adv.double(), centers.double(), center_classes, 2.0)).mean()
    grad_cons, = torch.autograd.grad(3.0 * cons64, f64)
    assert grad_cons.abs().max() > 1e-3
    assert torch.allclose((grad_loss3 - grad_ref).double(), grad_cons, atol=1e-4)
    # QTRADES alone: lam = 0 is the cross-entropy of the head
    logits, logits_adv, y = f.detach()[:, :3], f_adv[:, :3], class_ids
    ce, _ = qtrades.qtrades_ce_loss(logits, logits_adv, y, 0.0)
    assert torch.equal(ce, F.cross_entropy(logits, y))


def small_model(seed=0, with_head=0):
    torch.manual_seed(seed)
    model = nominal.ResNet18(with_head, width=4)
    model.train()
    with torch.no_grad():                                                  # non-trivial running stats
        model(torch.rand(16, 3, 8, 8))
    return model


@pytest.mark.oracle
def test_quick_adversary_is_one_signed_step_in_the_ball_and_raises_the_loss():
    model = small_model().eval()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(32, 3, 8, 8, generator=g)
    x[:4] = 0.0                                                            # corners of [0, 1]: clipping
    x[4:8] = 1.0
    centers = model.features(torch.rand(6, 3, 8, 8, generator=g)).detach()
    center_classes = torch.tensor([0, 0, 1, 1, 2, 2])
    sigma2 = float(centers.var(0).sum()) / 4
    with torch.no_grad():
        f = model.features(x)
    keep = qtrades.nearest_mask(f, centers, None)
    log_p = qtrades.cluster_log_probs(f, centers, center_classes, sigma2, keep=keep)
    calls = []

    def log_q_fn(z):
        calls.append(z.requires_grad)
        return qtrades.cluster_log_probs(model.features(z), centers, center_classes, sigma2, keep=keep)

    eps, step = 8 / 255, 10 / 255
    state = g.get_state()
    x_adv, x_start = qtrades.quick_adversary(log_q_fn, x, log_p, eps, step, g)
    assert calls == [True]                                                 # one forward, one gradient
    assert all(p.grad is None for p in model.parameters())                 # no parameter gradients
    # manual: the same uniform draw, one signed step, projection to the ball and [0, 1]
    g.set_state(state)
    start = (x + (torch.rand(x.shape, generator=g) * (2 * eps) - eps)).clamp(0, 1).requires_grad_(True)
    assert torch.equal(start.detach(), x_start)
    loss = qtrades.consistency(log_p, log_q_fn(start)).sum()
    grad, = torch.autograd.grad(loss, start)
    manual = torch.max(torch.min(start.detach() + step * grad.sign(), x + eps), x - eps).clamp(0, 1)
    assert torch.equal(x_adv, manual)
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_start - x).abs().max() <= eps + 1e-6 and x_start.min() >= 0 and x_start.max() <= 1
    assert (x_adv != x_start).float().mean() > 0.5                         # the step moved pixels
    with torch.no_grad():
        before = qtrades.consistency(log_p, log_q_fn(x_start))
        after = qtrades.consistency(log_p, log_q_fn(x_adv))
    assert after.mean() > before.mean(), (before.mean(), after.mean())


@pytest.mark.parametrize("with_head", [0, 3])
@pytest.mark.oracle
def test_crafting_runs_in_eval_mode_and_leaves_batch_norm_and_gradients_alone(with_head):
    model = small_model(1, with_head)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = qtrades.parse_args(["--data", "folder", "--width", "4"])
    args.amp = False
    x = torch.rand(10, 3, 8, 8)
    if with_head:
        clusters = None
    else:
        centers = model.features(torch.rand(6, 3, 8, 8)).detach()
        clusters = (centers, torch.tensor([0, 0, 1, 1, 2, 2]), 1.0, 3)
        model.load_state_dict(before)                                      # undo that forward's BN update
    x_adv = qtrades.craft(model, x, clusters, args, torch.Generator().manual_seed(0))
    assert model.training                                                  # back in train mode
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert (x_adv - x).abs().max() <= args.eps + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1


# ======================================================================================
# Sec. 4.1, exact Lipschitz constants of small networks (synthetic.py's exact_lipschitz)
# ======================================================================================

@pytest.fixture
def one_thread():
    """Training outside main() (which does this itself): one thread, as synthetic.py runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hand_net(*layers):
    """nn.Sequential from [(W, b) | "relu"] with the given float64 weights."""
    modules = []
    for layer in layers:
        if layer == "relu":
            modules.append(nn.ReLU())
            continue
        W, b = (torch.tensor(a, dtype=torch.float64) for a in layer)
        lin = nn.Linear(W.shape[1], W.shape[0]).double()
        with torch.no_grad():
            lin.weight.copy_(W)
            lin.bias.copy_(b)
        modules.append(lin)
    return nn.Sequential(*modules)


def random_net(seed, scale=1.0):
    torch.manual_seed(seed)
    net = synthetic.feature_net(20, 2).double()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    return net


def patterns_numpy(net, x):
    """Per ReLU layer, which units are on (pre-activation > 0: torch's ReLU'(0) = 0) at points
    x [P, 2], computed by a plain float64 forward pass -> list of tuples of tuples."""
    z, out = x, []
    for m in net:
        if isinstance(m, nn.Linear):
            z = z @ m.weight.detach().double().numpy().T + m.bias.detach().double().numpy()
        else:
            out.append(z > 0)
            z = np.maximum(z, 0)
    return [tuple(tuple(bool(v) for v in layer[i]) for layer in out) for i in range(len(x))]


def jacobian_norm(net, point):
    J = torch.autograd.functional.jacobian(net, torch.tensor(point, dtype=torch.float64))
    return float(torch.linalg.matrix_norm(J, 2))


@pytest.mark.oracle
def test_exact_lipschitz_of_a_single_linear_layer_is_its_spectral_norm():
    rng = np.random.default_rng(0)
    for out in (1, 2, 5):
        W = rng.normal(size=(out, 2))
        net = hand_net((W, rng.normal(size=out)))
        assert synthetic.exact_lipschitz(net) == pytest.approx(np.linalg.svd(W)[1][0], rel=1e-12)
        assert len(synthetic.linear_regions(net)) == 1                    # no ReLU: one region


@pytest.mark.oracle
def test_exact_lipschitz_finds_a_thin_strip_that_a_grid_misses():
    # f(x) = 3 (relu(x1) - relu(x1 - eps)) + 4 relu(x2): a ramp of slope 3 only on 0 < x1 < eps.
    # Regions (x1 < 0 | 0 < x1 < eps | x1 > eps) x (x2 < 0 | x2 > 0) with gradients
    # (0,0) (0,4) (3,0) (3,4) (0,0) (0,4): L = ||(3, 4)|| = 5, reached only inside the strip.
    eps = 1e-3
    net = hand_net(([[1, 0], [1, 0], [0, 1]], [0, -eps, 0]), "relu",
                   ([[1, -1, 0], [0, 0, 1]], [0, 0]), "relu",
                   ([[3, 4]], [0]))
    regions = synthetic.linear_regions(net)
    norms = sorted(float(np.linalg.norm(J, 2)) for _, J, _ in regions)
    assert len(regions) == 6 and norms == pytest.approx([0, 0, 3, 4, 4, 5], abs=1e-12)
    assert synthetic.exact_lipschitz(net) == pytest.approx(5.0, rel=1e-12)
    assert synthetic.lipschitz_grid_lower(net, -3, 3, n=101) == pytest.approx(4.0)  # grid misses it
    assert synthetic.lipschitz_upper(net) >= 5.0


@pytest.mark.oracle
def test_exact_lipschitz_finds_a_region_far_outside_the_first_box():
    # g(x) = 7 relu(relu(x1) - 100) + relu(x2): slope 7 only for x1 > 100. The first layer's lines
    # meet at the origin, so the first box is tiny; the second layer's line x1 = 100 must grow it.
    net = hand_net(([[1, 0], [0, 1]], [0, 0]), "relu",
                   ([[1, 0], [0, 1]], [-100, 0]), "relu",
                   ([[7, 1]], [0]))
    assert synthetic.exact_lipschitz(net) == pytest.approx(math.sqrt(50), rel=1e-12)
    assert synthetic.lipschitz_grid_lower(net, -5, 5) == pytest.approx(1.0)


@pytest.mark.parametrize("seed,scale", [(0, 1.0), (1, 1.0), (2, 3.0)])
@pytest.mark.oracle
def test_exact_lipschitz_of_random_networks(seed, scale):
    net = random_net(seed, scale)
    regions = synthetic.linear_regions(net)
    L = synthetic.exact_lipschitz(net)
    # between the dense-grid lower bound and the spectral-norm product
    assert synthetic.lipschitz_grid_lower(net, -4, 4) <= L * (1 + 1e-12)
    assert L <= synthetic.lipschitz_upper(net) * (1 + 1e-12)
    # every region is real: the network's own on/off pattern at its centroid is the region's, and
    # autograd's Jacobian there has the region's spectral norm (so L itself is attained)
    centroids = np.array([P.mean(0) for P, _, _ in regions])
    assert patterns_numpy(net, centroids) == [pat for _, _, pat in regions]
    for (P, J, _), c in zip(regions, centroids):
        if np.linalg.norm(J, 2) > 0.999 * L:
            assert jacobian_norm(net, c) == pytest.approx(np.linalg.norm(J, 2), rel=1e-9)
    # and no region is missing: every on/off pattern met by brute-force sampling near the data and
    # far away is one of the enumerated regions
    rng = np.random.default_rng(seed)
    points = np.concatenate([rng.uniform(-5, 5, (20000, 2)),
                             rng.normal(size=(20000, 2)) * np.exp(rng.uniform(0, 9, (20000, 1)))])
    assert set(patterns_numpy(net, points)) <= {pat for _, _, pat in regions}
    # no pair of points stretches more than L: random pairs, close pairs, and pairs along the top
    # singular direction of the steepest region (ratio = L there, so an underestimate would fail)
    with torch.no_grad():
        f = lambda a: net(torch.tensor(a, dtype=torch.float64)).numpy()  # noqa: E731
        a = np.concatenate([rng.normal(size=(5000, 2)) * 3, points[:5000]])
        b = np.concatenate([rng.normal(size=(5000, 2)) * 3, points[:5000] + rng.normal(size=(5000, 2)) * 1e-3])
        P, J, _ = max(regions, key=lambda r: np.linalg.norm(r[1], 2))
        v = np.linalg.svd(J)[2][0]
        c = P.mean(0)
        a = np.concatenate([a, c[None] + 1e-7 * rng.normal(size=(50, 2))])
        b = np.concatenate([b, a[-50:] + 1e-7 * v])
        ratio = np.linalg.norm(f(a) - f(b), axis=1) / np.linalg.norm(a - b, axis=1)
    assert ratio.max() <= L * (1 + 1e-6)
    assert ratio.max() >= L * (1 - 1e-6)


@pytest.mark.oracle
def test_regions_partition_the_box():
    # the clipped regions tile the box: their areas add up to its area
    regions = synthetic.linear_regions(random_net(3))
    R = max(np.abs(P).max() for P, _, _ in regions)
    assert sum(synthetic._area(P) for P, _, _ in regions) == pytest.approx((2 * R) ** 2, rel=1e-9)


# ======================================================================================
# Sec. 4.1, Fig. 3: sound radii, the datasets, and both runs from the same weights (synthetic.py)
# ======================================================================================

def perturbation_flips(net, centres, x, radius, rng, directions=64):
    """Share of points whose nearest-centre prediction changes under random perturbations of
    length 0.999 R(x) (on the sphere) and uniformly inside the ball."""
    x = x.double()
    with torch.no_grad():
        pred0, _ = synthetic.prop1_radius(net(x), centres, 1.0)
        flips = torch.zeros(len(x), dtype=torch.bool)
        for k in range(directions):
            u = torch.tensor(rng.normal(size=x.shape))
            u = u / u.norm(dim=1, keepdim=True)
            length = 0.999 if k % 2 == 0 else float(np.sqrt(rng.uniform()))
            pred, _ = synthetic.prop1_radius(net(x + u * radius[:, None] * length), centres, 1.0)
            flips |= pred != pred0
    return flips


@pytest.mark.oracle
def test_every_radius_is_sound(one_thread):
    rng = np.random.default_rng(0)
    args = synthetic.parse_args(["--steps", "60", "--n", "200"])
    for name in ("moons", "circles"):
        data, runs = synthetic.run_seed(name, 0, args)
        for run, (net, _, _) in runs.items():
            e = synthetic.evaluate(net, data, 0.0)
            radius = e["radius"]
            assert torch.isfinite(radius).all() and (radius > 0).float().mean() > 0.9
            flips = perturbation_flips(net, e["centres"], data[2], radius, rng)
            assert not flips.any(), (name, run, int(flips.sum()))
            # the same perturbations at 3x the certified radius flip someone: the test can fail
            assert perturbation_flips(net, e["centres"], data[2], 3 * radius, rng).any()


@pytest.mark.oracle
def test_datasets_are_the_named_shapes_balanced_and_seeded():
    rng = np.random.default_rng(0)
    x, y = synthetic.make_circles(400, 0.0, rng)
    r = np.linalg.norm(x, axis=1)
    assert np.allclose(r[y == 0], 1.0) and np.allclose(r[y == 1], 0.5) and y.sum() == 200
    x, y = synthetic.make_moons(401, 0.0, rng)
    upper = x[y == 0] + np.array([0.5, 0.25])                               # back to (cos t, sin t)
    lower = x[y == 1] + np.array([0.5, 0.25]) - np.array([1.0, 0.5])       # back to (-cos t, -sin t)
    assert np.allclose(np.linalg.norm(upper, axis=1), 1) and (upper[:, 1] >= 0).all()
    assert np.allclose(np.linalg.norm(lower, axis=1), 1) and (lower[:, 1] <= 0).all()
    assert len(upper) == 200 and len(lower) == 201
    a, b = synthetic.make_dataset("moons", 100, 0.1, 0), synthetic.make_dataset("moons", 100, 0.1, 0)
    assert all(torch.equal(s, t) for s, t in zip(a, b))
    c = synthetic.make_dataset("moons", 100, 0.1, 1)
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], a[2])    # seeds and splits differ


@pytest.mark.wiring
def test_both_runs_start_from_the_same_weights_and_take_the_same_steps(monkeypatch, one_thread):
    calls = []
    real_train = synthetic.train

    def spy(net, head, x, y, steps, lr, alpha):
        calls.append((head is not None, steps, lr, [p.detach().clone() for p in net.parameters()]))
        return real_train(net, head, x, y, steps, lr, alpha)
    monkeypatch.setattr(synthetic, "train", spy)
    args = synthetic.parse_args(["--steps", "9", "--warm-steps", "4", "--n", "40"])
    synthetic.run_seed("moons", 0, args)
    (ce0, s0, lr0, w0), (ce1, s1, lr1, w1), (ce2, s2, lr2, _) = calls
    assert (ce0, s0, lr0) == (False, 9, args.lr)                           # (1) Magnet from scratch
    assert (ce1, s1, lr1) == (True, 4, args.lr) and (ce2, s2, lr2) == (False, 5, args.ft_lr)  # (2)
    assert s0 == s1 + s2 and all(torch.equal(a, b) for a, b in zip(w0, w1))


# ######################################################################################
# the stages end to end: toy runs of each stage, resume, and the wiring of each training loop
# ######################################################################################


# ======================================================================================
# end to end: nominal.py (App. A: the model, its schedule, pre-processing, a run and its checkpoint)
# ======================================================================================

@pytest.mark.shape
def test_resnet18_shapes_normalisation_and_head():
    torch.manual_seed(0)
    m = nominal.ResNet18(10, width=4, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3]).eval()
    x = torch.rand(2, 3, 32, 32)
    assert m.features(x).shape == (2, 32) and m(x).shape == (2, 10)
    assert m(torch.rand(2, 3, 16, 16)).shape == (2, 10)              # any size: global pooling
    # the first layer is (x - mean) / std: a model with identity normalisation fed the
    # normalised image gives the same features
    plain = nominal.ResNet18(10, width=4).eval()
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if k not in ("mean", "std")},
                          strict=False)
    mean, std = torch.tensor([0.5, 0.4, 0.3])[:, None, None], torch.tensor([0.2, 0.25, 0.3])[:, None, None]
    assert torch.allclose(plain.features((x - mean) / std), m.features(x), atol=1e-5)
    headless = nominal.ResNet18(0, width=4)
    assert headless.head is None and headless(x).shape == (2, 32)
    n_blocks = sum(isinstance(mod, nominal.BasicBlock) for mod in m.modules())
    n_convs = sum(isinstance(mod, torch.nn.Conv2d) for mod in m.modules())
    assert n_blocks == 8 and n_convs == 1 + 16 + 3                   # stem + 8x2 + 3 projections


@pytest.mark.wiring
def test_learning_rate_schedule_is_appendix_a():
    args = nominal.parse_args(["--data", "cifar10"])
    assert (args.epochs, args.lr, args.batch_size, args.milestones) == (90, 1e-2, 256, [30, 60])
    assert (args.crop, args.flip) == (4, True)
    lrs = [nominal.learning_rate(args, e) for e in range(90)]
    assert all(abs(lr - 1e-2) < 1e-12 for lr in lrs[:30])
    assert all(abs(lr - 1e-3) < 1e-12 for lr in lrs[30:60])
    assert all(abs(lr - 1e-4) < 1e-12 for lr in lrs[60:])
    svhn = nominal.parse_args(["--data", "svhn"])
    assert (svhn.crop, svhn.flip) == (0, False)
    assert nominal.parse_args(["--data", "cifar10", "--no-flip", "--crop", "0"]).flip is False


@pytest.mark.oracle
def test_augment_crops_are_windows_of_the_padded_image_and_flips_mirror():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    out = nominal.augment(x, 2, True, g)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    offsets, flips = set(), 0
    for b in range(len(x)):
        matches = [(i, j, fl) for i in range(5) for j in range(5) for fl in (False, True)
                   if torch.equal(out[b], (padded[b, :, i:i + 8, j:j + 8].flip(2) if fl
                                           else padded[b, :, i:i + 8, j:j + 8]))]
        assert matches, f"image {b} is no window of its padded input"
        offsets.add(matches[0][:2])
        flips += matches[0][2]
    assert len(offsets) > 10 and 10 < flips < 54          # offsets and flips do vary
    assert torch.equal(nominal.augment(x, 0, False, g), x)  # no augmentation: identity


@pytest.mark.smoke
def test_tiny_training_run_learns(nominal_run):
    results, out = nominal_run
    assert results["epochs_done"] == 3 and results["status"] == "finished"
    assert results["test_accuracy"] > 0.8                           # chance is 1/3
    with open(out + ".log.jsonl") as f:
        log = [json.loads(line) for line in f]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert {"epoch", "train_loss", "test_accuracy", "images_per_second"} <= set(log[-1])


@pytest.mark.smoke
def test_checkpoint_has_the_documented_entries_and_round_trips(nominal_run, image_folder):
    _, out = nominal_run
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert ckpt["format"] == "clustr/1" and ckpt["stage"] == "nominal" and ckpt["epoch"] == 3
    assert ckpt["arch"] == {"name": "resnet18", "width": 8, "feat_dim": 64, "in_channels": 3}
    assert set(ckpt["data"]) == {"name", "num_classes", "classes", "mean", "std", "image_size"}
    assert ckpt["data"]["name"] == "folder" and ckpt["data"]["num_classes"] == 3
    assert any(k.startswith("head.") for k in ckpt["model"])
    assert isinstance(ckpt["args"], dict) and ckpt["args"]["epochs"] == 3
    assert {"optimizer", "rng"} <= set(ckpt["resume"])
    # rebuild the model from the checkpoint alone and reproduce its stored test accuracy
    model = attack.build_model(ckpt, out, with_head=True)                 # strict=True
    (train_x, _), (test_x, test_y), _ = nominal.load_data("folder", image_folder)
    acc = nominal.evaluate(model, (test_x, test_y), 64, False, torch.device("cpu"))
    assert acc == ckpt["metrics"]["test_accuracy"]
    pixels = train_x.double().div(255).transpose(0, 1).flatten(1)         # App. A: the training split's
    assert ckpt["data"]["mean"] == pytest.approx(pixels.mean(1).tolist(), rel=1e-9)
    assert ckpt["data"]["std"] == pytest.approx(pixels.std(1).tolist(), rel=1e-9)
    with torch.no_grad():                                                  # attack.py's classifier: log p
        x = nominal.to_float(test_x)
        assert torch.allclose(attack.read_classifier(out)[0](x), torch.log_softmax(model.eval()(x), 1), atol=1e-5)
    assert not [f for f in os.listdir(os.path.dirname(out)) if f.endswith(".tmp")]


@pytest.mark.smoke
def test_resume_refuses_changed_arguments(nominal_run, image_folder, capsys):
    _, out = nominal_run
    err = exit_code_and_message(capsys, nominal.main, [
        *nominal_args(image_folder, out, "--epochs", 3, "--lr", 0.5, "--resume")])
    assert "'lr', 0.01" in err.splitlines()[-1] and "Traceback" not in err     # the stored run's value


# ======================================================================================
# end to end: magnet.py (Sec. 3.3, 4.2, App. A; README "Where results and checkpoints go")
# ======================================================================================

def folder_args(folder, out, *extra):
    return ["--data", "folder", "--data-dir", folder, "--width", "8", "--m", "3", "--d", "10",
            "--crop", "2", "--flip", "--lr", "1e-3", "--out", out, *map(str, extra)]


@pytest.fixture(scope="module")
def magnet_run(nominal_run, image_folder, tmp_path_factory):
    """ClusTR from the shared nominal checkpoint, 2 epochs: (results, checkpoint path)."""
    out = str(tmp_path_factory.mktemp("magnet") / "magnet.pt")
    results = magnet.main(folder_args(image_folder, out, "--init", nominal_run[1], "--epochs", 2))
    return results, out


def eval_features(model, images):
    model.eval()
    with torch.no_grad():
        return model.features(images.float() / 255).double()


@pytest.mark.smoke
def test_clustr_checkpoint_reproduces_eq4_accuracy_from_its_own_contents(magnet_run, nominal_run, image_folder):
    results, out = magnet_run
    assert results["status"] == "finished" and results["epochs_done"] == 2
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert ckpt["format"] == "clustr/1" and ckpt["stage"] == "magnet" and ckpt["epoch"] == 2
    assert not any(k.startswith("head.") for k in ckpt["model"])
    cl = ckpt["clusters"]
    assert set(cl) == {"centers", "center_classes", "variance", "K", "alpha", "D"}
    assert cl["centers"].shape == (6, 64) and cl["center_classes"].tolist() == [0, 0, 1, 1, 2, 2]
    assert (cl["K"], cl["alpha"], cl["D"]) == (2, 12.5, None) and isinstance(cl["variance"], float)
    assert {"optimizer", "rng", "sampler"} <= set(ckpt["resume"])
    # the fine-tuning moved the nominal weights
    nominal_ckpt = torch.load(nominal_run[1], map_location="cpu", weights_only=True)
    assert not torch.equal(ckpt["model"]["conv1.weight"], nominal_ckpt["model"]["conv1.weight"])
    # rebuild from the checkpoint alone; recompute everything from eval-mode features
    model = attack.build_model(ckpt, out, with_head=False)               # strict=True
    (train_x, train_y), (test_x, test_y), _ = nominal.load_data("folder", image_folder)
    f = eval_features(model, train_x)
    mu = cl["centers"].double()
    d2 = ((f[:, None, :] - mu[None]) ** 2).sum(-1)                      # [N, 6]
    own = d2.masked_fill(cl["center_classes"][None, :] != train_y[:, None], float("inf")).argmin(1)
    for j in range(6):                                                   # k-means fixed point
        assert torch.allclose(mu[j], f[own == j].mean(0), atol=1e-4)
    sigma2 = d2[torch.arange(len(f)), own].sum() / (len(f) - 1)          # Eq. (3) over the split
    assert cl["variance"] == pytest.approx(float(sigma2), rel=1e-4)
    p = naive_eq4(eval_features(model, test_x), mu, cl["center_classes"], cl["variance"])
    acc = float((torch.tensor(p.argmax(1)) == test_y).double().mean())
    assert acc == pytest.approx(ckpt["metrics"]["test_accuracy"], abs=1e-9)
    assert acc > 0.8                                                     # chance is 1/3
    with open(out + ".log.jsonl") as fh:
        log = [json.loads(line) for line in fh]
    assert [r["epoch"] for r in log] == [0, 1, 2]
    assert {"epoch", "train_loss", "test_accuracy", "variance"} <= set(log[-1])


@pytest.mark.smoke
def test_epochs_0_clusters_nominal_features_without_fine_tuning(nominal_run, image_folder, tmp_path):
    """App. B.1: k-means on the nominal features and Eq. (4), no training; a valid checkpoint."""
    out = str(tmp_path / "b1.pt")
    results = magnet.main(folder_args(image_folder, out, "--init", nominal_run[1], "--epochs", 0))
    assert results["epochs_done"] == 0 and results["status"] == "finished"
    ckpt = magnet.read_checkpoint(out, stages=("magnet",))
    nominal_ckpt = torch.load(nominal_run[1], map_location="cpu", weights_only=True)
    headless = {k: v for k, v in nominal_ckpt["model"].items() if not k.startswith("head.")}
    assert set(ckpt["model"]) == set(headless)
    assert all(torch.equal(ckpt["model"][k], headless[k]) for k in headless)   # untouched weights
    assert ckpt["clusters"]["centers"].shape == (6, 64) and 0 <= results["test_accuracy"] <= 1


@pytest.mark.smoke
def test_warm_start_beats_random_init_at_equal_epochs(tmp_path):
    """Sec. 4.2, Table 1: ClusTR (nominal warm start) vs the Magnet loss from random weights, on
    a harder generated folder (6 classes, noisy): the warm start must win clearly."""
    folder = make_image_folder(str(tmp_path / "hard"), classes=6, n_train=40, n_test=20,
                               noise=200.0, seed=1)
    ckpt = str(tmp_path / "nominal.pt")
    nominal.main(nominal_args(folder, ckpt, "--epochs", 3))
    warm = magnet.main(folder_args(folder, str(tmp_path / "w.pt"), "--init", ckpt, "--epochs", 2))
    cold = magnet.main(folder_args(folder, str(tmp_path / "c.pt"), "--epochs", 2))
    assert warm["test_accuracy"] > 2 / 6                                 # chance is 1/6
    assert warm["test_accuracy"] > cold["test_accuracy"] + 0.1, (warm, cold)


@pytest.mark.oracle
def test_evaluation_leaves_the_model_untouched(nominal_run):
    ckpt = torch.load(nominal_run[1], map_location="cpu", weights_only=True)
    model = attack.build_model(ckpt, nominal_run[1], with_head=True)
    model.head = None                                                    # Sec. 3.3: headless
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8)
    f = magnet.features_of(model, images, 4, False)
    assert f.shape == (10, 64) and not model.training                  # eval mode, as documented
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.allclose(f.double(), eval_features(model, images), atol=1e-5)


# ======================================================================================
# end to end: attack.py (Sec. 4.2, Eq. (5); README "Result files")
# ======================================================================================

@pytest.mark.smoke
def test_tiny_nominal_checkpoint_is_fooled_at_a_large_eps(nominal_run, image_folder, tmp_path):
    _, ckpt = nominal_run
    out = str(tmp_path / "attack.json")
    res = attack.main(["--ckpt", ckpt, "--eps", "0", "2/255",              # the data folder: the checkpoint's
                       "128/255", "--steps", "5", "--square-queries", "50", "--out", out, "--check-images", "30",
                       "--large-eps", "128/255"])
    with open(out) as f:
        assert json.load(f) == json.loads(json.dumps(res))
    assert {"ckpt", "data", "images", "natural_accuracy", "results", "checks"} <= set(res)
    assert res["data"] == "folder" and res["images"] == 90 and res["natural_accuracy"] > 0.8
    keys = {"loss", "eps", "D", "natural_accuracy", "robust_accuracy", "seconds", "images_per_second"}
    assert all(keys <= set(r) for r in res["results"])
    rows = {(r["loss"], round(r["eps"] * 255)): r["robust_accuracy"] for r in res["results"]}
    assert {loss for loss, _ in rows} == {"ce", "margin", "margin-t", "square", "worst-case"}  # no magnet: a head
    assert [loss for loss, e in rows if e == 0] == ["worst-case"]          # eps 0: nothing attacked
    assert rows[("worst-case", 0)] == res["natural_accuracy"]              # eps 0 = natural
    for loss in ("ce", "margin", "margin-t", "square", "worst-case"):
        assert rows[("worst-case", 128)] <= rows[(loss, 128)] <= rows[(loss, 2)] <= res["natural_accuracy"]
    assert rows[("worst-case", 128)] <= 0.05
    checks = res["checks"]
    assert set(checks) == {"robust_le_natural", "monotone_in_eps", "eps_zero_is_natural",
                           "near_zero_at_large_eps", "zero_gradient_share", "double_steps",
                           "double_restarts", "objective_rises", "square_finds_little",
                           "beats_random_search", "in_ball"}
    for name in ("robust_le_natural", "eps_zero_is_natural", "near_zero_at_large_eps", "in_ball",
                 "objective_rises", "square_finds_little", "beats_random_search"):
        assert checks[name]["ok"] is True, (name, checks[name])
    assert checks["double_steps"]["eps"] == 2 / 255                        # the first eps > 0
    for name in ("double_steps", "double_restarts"):                       # fresh random streams
        assert checks[name]["seed"] != checks[name]["headline_seed"] == 0
    assert checks["double_steps"]["seed"] != checks["double_restarts"]["seed"]
    with open(out + ".log.jsonl") as f:
        assert len(f.readlines()) == len(res["results"])


@pytest.mark.smoke
def test_clustering_checkpoint_with_a_D_list(clustering_ckpt, image_folder, tmp_path):
    res = attack.main(["--ckpt", clustering_ckpt, "--data-dir", image_folder, "--D", "all", "1",
                       "--steps", "3", "--square-queries", "50", "--limit", "30", "--no-checks",
                       "--out", str(tmp_path / "a.json")])
    assert res["checks"] == {} and res["images"] == 30
    losses = {r["loss"] for r in res["results"]}
    assert losses == {"ce", "margin", "margin-t", "magnet", "square", "worst-case"}
    for D in (None, 1):
        rows = {r["loss"]: r for r in res["results"] if r["D"] == D}
        assert rows["worst-case"]["robust_accuracy"] <= min(r["robust_accuracy"] for r in rows.values())
    # natural accuracy with D = 1 is that of the nearest centre (an independent float64 oracle)
    ck = torch.load(clustering_ckpt, map_location="cpu", weights_only=True)
    model = attack.build_model(ck, clustering_ckpt, with_head=False)
    images, labels, _ = nominal.load_split("folder", image_folder, False, limit=30)
    with torch.no_grad():
        f = model.eval().features(nominal.to_float(images)).double()
    mu = ck["clusters"]["centers"].double()
    nearest = ck["clusters"]["center_classes"][((f[:, None] - mu[None]) ** 2).sum(-1).argmin(1)]
    natural_D1 = next(r["natural_accuracy"] for r in res["results"] if r["D"] == 1)
    assert natural_D1 == (nearest == labels).double().mean().item()
    # a stored D is the default; --D overrides it
    stored = str(tmp_path / "d1.pt")
    torch.save(dict(ck, clusters=dict(ck["clusters"], D=1)), stored)
    common = ["--ckpt", stored, "--data-dir", image_folder, "--steps", "1", "--limit", "30",
              "--loss", "ce", "--no-checks", "--out", str(tmp_path / "b.json")]
    assert [r["D"] for r in attack.main(common)["results"]] == [1]
    assert [r["D"] for r in attack.main(common + ["--D", "all", "--overwrite"])["results"]] == [None]


@pytest.mark.smoke
def test_each_D_of_a_D_list_records_the_examples_of_a_run_with_that_D_alone(clustering_ckpt, image_folder, tmp_path):
    # every chunk's stream is seeded by (seed, loss, first index): a run with one --D reproduces that D's
    # entries of a run with several, so an entry holding another D's (or eps') masks differs from it.
    # The checkpoint: class 0's second centre relabelled class 1 and sigma^2 x 30, so that over all
    # centres class 1 (three centres) wins on class-0 images that the nearest centre (D = 1) gets right
    # (the first D, all, then has the fewer correct images: its mask in D = 1's entries would show)
    ck = torch.load(clustering_ckpt, map_location="cpu", weights_only=True)
    assert ck["clusters"]["center_classes"].tolist() == [0, 0, 1, 1, 2, 2]
    path = str(tmp_path / "relabelled.pt")
    torch.save(dict(ck, clusters=dict(ck["clusters"], center_classes=torch.tensor([0, 1, 1, 1, 2, 2]),
                                      variance=30 * ck["clusters"]["variance"])), path)
    common = ["--ckpt", path, "--data-dir", image_folder, "--limit", "30", "--steps", "2",
              "--square-queries", "20", "--eps", "2/255", "8/255", "--no-checks"]
    both = attack.main(common + ["--D", "all", "1", "--out", str(tmp_path / "both.json")])
    with open(tmp_path / "both.json") as f:
        assert json.load(f)["examples"] == both["examples"]
    entries = {(e["D"], e["eps"]): e for e in both["examples"]}
    assert list(entries) == [(None, 2 / 255), (None, 8 / 255), (1, 2 / 255), (1, 8 / 255)]
    images, labels, _ = nominal.load_split("folder", image_folder, False, limit=30)
    for D, flag in ((1, "1"), (None, "all")):
        alone = attack.main(common + ["--D", flag, "--out", str(tmp_path / f"{flag}.json")])
        assert alone["examples"] == [entries[D, e] for e in (2 / 255, 8 / 255)], D
        clf, _ = attack.read_classifier(path, D=D)                          # the clean verdicts under this D
        with torch.no_grad():
            correct = (clf(nominal.to_float(images)).argmax(1) == labels).tolist()
        for e in (2 / 255, 8 / 255):
            ex = entries[D, e]
            assert ex["correct"] == correct and ex["index"] == list(range(30))
            assert ex["robust"] == [c and f is None for c, f in zip(correct, ex["fooled_by"])]
    # the entries differ where a mix-up would show: the clean verdicts between the D, the robust masks
    # between the D at 2/255 and between the eps
    assert entries[1, 2 / 255]["correct"] != entries[None, 2 / 255]["correct"]
    robust = {key: e["robust"] for key, e in entries.items()}
    assert robust[1, 2 / 255] != robust[None, 2 / 255]
    assert robust[1, 2 / 255] != robust[1, 8 / 255] and robust[None, 2 / 255] != robust[None, 8 / 255]


@pytest.mark.smoke
def test_per_example_results_save_adv_per_loss_and_strict(nominal_run, image_folder, tmp_path, capsys):
    _, ckpt = nominal_run
    common = ["--ckpt", ckpt, "--data-dir", image_folder, "--limit", "30", "--steps", "3",
              "--square-queries", "30", "--eps", "16/255"]
    adv_path = str(tmp_path / "adv.pt")
    res = attack.main(common + ["--no-checks", "--save-adv", adv_path, "--out", str(tmp_path / "a.json")])
    assert res["config"]["targets"] == 2                                   # min(9, 3 - 1)
    (ex,) = res["examples"]
    assert ex["index"] == list(range(30)) and ex["eps"] == 16 / 255
    rows = [r for r in res["results"] if r["loss"] != "worst-case"]
    assert [r["loss"] for r in rows] == ["ce", "margin", "margin-t", "square"]
    assert [r["attacked"] for r in rows[1:]] == [round(30 * r["robust_accuracy"]) for r in rows[:-1]]
    assert sum(r["fooled"] for r in rows) == sum(f is not None for f in ex["fooled_by"]) > 0
    clf, _ = attack.read_classifier(ckpt)
    images, labels, _ = nominal.load_split("folder", image_folder, False, limit=30)
    x = nominal.to_float(images)
    with torch.no_grad():
        assert ex["correct"] == (clf(x).argmax(1) == labels).tolist()
    assert ex["robust"] == [c and f is None for c, f in zip(ex["correct"], ex["fooled_by"])]
    saved = torch.load(adv_path, weights_only=True)
    (run,) = saved["runs"]
    x_adv, robust = run["x_adv"], torch.tensor(ex["robust"])
    assert (x_adv - x).abs().max() <= 16 / 255 + 1e-6 and torch.equal(saved["labels"], labels)
    with torch.no_grad():
        fooled = torch.tensor([f is not None for f in ex["fooled_by"]])
        assert (clf(x_adv[fooled]).argmax(1) != labels[fooled]).all()      # each one fools the model
    with torch.no_grad():   # a survivor's image: the strongest point found, in the ball and still correct
        lp, lp_clean = clf(x_adv[robust]), clf(x[robust])
    assert (lp.argmax(1) == labels[robust]).all() and torch.equal(run["robust"], robust) and robust.any()
    margin = lambda lp, y: lp.gather(1, y[:, None])[:, 0] - lp.scatter(1, y[:, None], -1e9).max(1).values  # noqa
    assert (margin(lp, labels[robust]) < margin(lp_clean, labels[robust])).all()    # nearer the boundary
    # --per-loss: every loss on every image, with its own mask per example
    res = attack.main(common + ["--no-checks", "--per-loss", "--out", str(tmp_path / "b.json")])
    assert all(r["attacked"] == 30 for r in res["results"] if r["loss"] != "worst-case")
    assert set(res["examples"][0]["robust_by_loss"]) == {"ce", "margin", "margin-t", "square"}
    # one loss: no worst-case row, so no "headline" note
    capsys.readouterr()
    res = attack.main(common + ["--no-checks", "--loss", "ce", "--out", str(tmp_path / "d.json")])
    out = capsys.readouterr().out
    assert [r["loss"] for r in res["results"]] == ["ce"] and "headline" not in out
    assert f"next     python magnet.py --init {ckpt}" in out                 # a nominal checkpoint's next step
    # a failed check (robust at a "large" eps of 1/255) exits 1 by default, with its meaning, after
    # writing the results; --no-strict: exit 0, the same failure in the results
    for flags, name in (([], "c.json"), (["--no-strict"], "e.json")):
        argv = common + ["--large-eps", "1/255", "--check-images", "10", "--out", str(tmp_path / name), *flags]
        if flags:
            attack.main(argv)
        else:
            with pytest.raises(SystemExit) as info:
                attack.main(argv)
            assert info.value.code == 1
        out = capsys.readouterr().out
        assert "near_zero_at_large_eps   FAILED" in out and 'README.md "attack.py: losses, cascade, checks' in out
        assert json.load(open(tmp_path / name))["checks"]["near_zero_at_large_eps"]["ok"] is False


# ======================================================================================
# end to end: the library use of attack.py / certify.py and --export
# (README "Evaluate a ClusTR model with other tools")
# ======================================================================================

def readme_snippets():
    """{name: code} of the blocks marked `<!-- snippet: NAME -->` in README.md and, for the tools the
    README names without a snippet, benchmarks/README.md ("Other tools: more snippets")."""
    text = "".join(open(os.path.join(ROOT, f)).read() for f in ("README.md", os.path.join("benchmarks", "README.md")))
    return dict(re.findall(r"<!-- snippet: (\w+) -->\n```\w+\n(.*?)```", text, re.S))


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """The README's export command, run as a user would in a folder holding magnet.pt (a generated
    4-class checkpoint whose D = 3 leaves one class out of every prediction): the folder."""
    folder = tmp_path_factory.mktemp("export")
    generated_checkpoint(str(folder / "magnet.pt"), D=3)
    command = shlex.split(readme_snippets()["export"].split("#")[0])
    assert command[:2] == ["python", "attack.py"]
    with contextlib.chdir(folder), contextlib.redirect_stdout(io.StringIO()) as out:
        attack.main(command[2:])                                    # in-process: its own interpreter costs seconds
    assert "torch.export" in out.getvalue() and os.path.isfile(folder / "clustr.pt2")
    note = {"clustr.json": ""}
    torch.export.load(str(folder / "clustr.pt2"), extra_files=note)           # the note other tools read
    note = json.loads(note["clustr.json"])
    assert (note["D"], len(note["classes"]), note["input_shape"], note["stage"]) == (3, 4, ["n", 3, 16, 16], "magnet")
    return folder


@pytest.mark.smoke
@pytest.mark.usefixtures("own_rng")
def test_load_classifier_raises_bad_input_from_python_and_exits_2_from_the_command_line(tmp_path, capsys):
    good = generated_checkpoint(str(tmp_path / "magnet.pt"))
    empty, foreign, headless = tmp_path / "empty.pt", tmp_path / "foreign.pt", tmp_path / "headless.pt"
    empty.write_bytes(b"")
    torch.save({"weights": torch.zeros(2)}, foreign)
    ck = torch.load(good, weights_only=True)
    torch.save({k: v for k, v in ck.items() if k != "clusters"}, headless)  # a magnet checkpoint without its centres
    for module in (attack, certify):
        model = module.load_classifier(good)
        assert isinstance(model, nn.Module) and not model.training
        assert not any(p.requires_grad for p in model.parameters())
        assert model(torch.rand(3, 3, 16, 16)).shape == (3, 4)
        for path in (tmp_path / "missing.pt", empty, foreign, headless):
            with pytest.raises(module.BadInput, match=re.escape(str(path))):   # the message names the file
                module.load_classifier(str(path))
        assert not issubclass(module.BadInput, SystemExit)
    # the command line: exit code 2, one line naming the file (or the flag), nothing written
    for argv, words in ((["--ckpt", str(empty)], str(empty)), (["--ckpt", good, "--D", "1", "2"], "one --D")):
        err = exit_code_and_message(capsys, attack.main, argv + ["--export", str(tmp_path / "m.pt2")])
        assert words in err and err.startswith("error:") and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "m.pt2")


@background_job("export", test="test_export_loads_in_a_clean_interpreter_and_matches_load_classifier")
def start_export(request):
    """The exported file alone, in a folder of its own, with three batches to score: -> (folder, xs, proc)."""
    import shutil
    folder = request.getfixturevalue("tmp_path_factory").mktemp("clean")
    shutil.copy(request.getfixturevalue("exported") / "clustr.pt2", folder)
    g = torch.Generator().manual_seed(1)
    xs = [torch.rand(n, 3, 16, 16, generator=g) for n in (1, 3, 7)]
    torch.save(xs, folder / "xs.pt")
    child = ("import sys, torch\n"
             "model = torch.export.load('clustr.pt2').module()\n"
             "xs = torch.load('xs.pt')\n"
             "with torch.no_grad():\n"
             "    torch.save([model(x) for x in xs], 'zs.pt')\n"
             "assert not any(n in sys.modules for n in ('attack', 'certify')), 'the repository was imported'\n"
             "assert not any(p and __import__('os').path.isfile(p + '/attack.py') for p in sys.path)\n")
    return lambda: (folder, xs, subprocess.run([sys.executable, "-I", "-c", child], cwd=str(folder), env=child_env(),
                                               capture_output=True, text=True, timeout=300))


@pytest.mark.smoke
def test_export_loads_in_a_clean_interpreter_and_matches_load_classifier(exported, background):
    """The exported file, loaded by `python -I` (no folder of this repository on sys.path) from
    another folder with torch alone, gives load_classifier's scores to 1e-5 for several batch sizes."""
    folder, xs, proc = background["export"].result()
    assert proc.returncode == 0, proc.stderr
    zs = torch.load(folder / "zs.pt")
    model = attack.load_classifier(str(exported / "magnet.pt"))
    with torch.no_grad():
        for x, z in zip(xs, zs):
            want = model(x)
            assert z.shape == (len(x), 4) and (z - want).abs().max() <= 1e-5
            assert bool((want == attack.Classifier.LOW).any(1).all())       # D = 3 of 4 classes' centres
            assert torch.isfinite(z).all()


@pytest.mark.smoke
def test_export_refuses_a_file_that_does_not_reload_as_the_classifier(clustering_ckpt, tmp_path, monkeypatch):
    load = torch.export.load

    class Reloaded:                                  # what torch.export.load gives, 2e-5 off
        def __init__(self, path):
            self.inner = load(path).module()

        def module(self):
            return lambda x: self.inner(x) + 2e-5
    monkeypatch.setattr(torch.export, "load", Reloaded)
    with pytest.raises(RuntimeError, match=r"differs from the classifier by 2\.\d+e-05"):
        attack.export_classifier(clustering_ckpt, str(tmp_path / "m.pt2"))


@pytest.mark.smoke
@pytest.mark.usefixtures("own_rng")
def test_export_with_D_of_a_1_channel_checkpoint_gives_the_D_nearest_scores_of_load_classifier(tmp_path,
                                                                                                monkeypatch):
    # a generated 1-channel clustering checkpoint (random weights, as generated_checkpoint's: K = 2 centres
    # per class near the features of random images, no D stored), exported with --D 1; the export is
    # the run's only output (its lock beside it): nothing of --out's default, attack.json, appears
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(2)
    classes, size = 4, 12
    data = {"name": "folder", "num_classes": classes, "classes": [f"class{c:02d}" for c in range(classes)],
            "mean": [0.45], "std": [0.25], "image_size": [size, size]}
    arch = arch_entry(4, 1)
    torch.manual_seed(2)
    net = resnet(arch, data, False)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
    with torch.no_grad():
        f = net.eval().features(torch.rand(2 * classes, 1, size, size, generator=g))
    cc = torch.arange(2 * classes) % classes
    ckpt = {"format": attack.FORMAT, "stage": "magnet", "arch": arch, "data": data, "model": net.state_dict(),
            "args": {}, "epoch": 0, "metrics": {},
            "clusters": clusters(f + 0.01 * torch.randn(f.shape, generator=g), cc, float(f.var(0).sum()) / 4)}
    path, out = str(tmp_path / "grey.pt"), str(tmp_path / "grey_D1.pt2")
    torch.save(ckpt, path)
    with contextlib.redirect_stdout(io.StringIO()):
        attack.main(["--ckpt", path, "--export", out, "--D", "1"])
    assert sorted(os.listdir(tmp_path)) == ["grey.pt", "grey_D1.pt2", "grey_D1.pt2.lock"]
    note = {"clustr.json": ""}
    exported = torch.export.load(out, extra_files=note).module()
    note = json.loads(note["clustr.json"])
    assert note["D"] == 1 and note["input_shape"] == ["n", 1, size, size]
    x = torch.rand(6, 1, size, size, generator=g)
    with torch.no_grad():
        z = exported(x)
        want, every = attack.load_classifier(path, D=1)(x), attack.load_classifier(path)(x)
        feats = net.features(x).double()
    assert z.shape == (6, classes) and (z - want).abs().max() <= 1e-5
    # D = 1 (a float64 loop): the nearest centre's class keeps -||f - mu||^2 / (2 sigma^2), every other class LOW
    mu, sigma2 = ckpt["clusters"]["centers"].double(), ckpt["clusters"]["variance"]
    for i in range(len(x)):
        d2 = [float(((feats[i] - m) ** 2).sum()) for m in mu]
        j = min(range(len(mu)), key=lambda k: d2[k])
        assert z[i, cc[j]].item() == pytest.approx(-d2[j] / (2 * sigma2), rel=1e-4, abs=1e-4)
        low = [c for c in range(classes) if z[i, c] == attack.Classifier.LOW]
        assert low == [c for c in range(classes) if c != cc[j]]
    assert not (every == attack.Classifier.LOW).any()           # the stored D (all centres): a different model
    assert len(set(z.argmax(1).tolist())) > 1                       # the rows' nearest centres differ


@pytest.mark.smoke
@pytest.mark.usefixtures("own_rng")
def test_readme_snippets_run_on_a_generated_checkpoint(exported, tmp_path):
    """Every snippet of the README section compiles; the ones that need torch and this repository
    alone (data, load_classifier) run on the generated checkpoint, with `fashion-mnist` and
    `./data` replaced by a generated 4-class image folder.  The torchattacks and AutoAttack
    snippets need torchattacks, which test_all.py does not use: benchmarks/export_torchattacks.py
    runs them (README "Evaluate a ClusTR model with other tools")."""
    snippets = readme_snippets()
    assert set(snippets) == {"export", "data", "torchattacks", "autoattack", "robustbench", "load_classifier"}
    for name, code in snippets.items():
        if name != "export":
            compile(code, f"README snippet {name}", "exec")
    folder = make_image_folder(str(tmp_path / "folder"), classes=4, n_train=1, n_test=3)
    data = snippets["data"].replace('"fashion-mnist", "./data"', f'"folder", {folder!r}')
    assert data != snippets["data"]
    check = ("\nassert x.shape == (12, 3, 16, 16) and 0 <= x.min() and x.max() <= 1 and len(classes) == 4\n"
             "assert model(x).shape == (12, 4)\n")
    code = data + snippets["load_classifier"] + check
    with contextlib.chdir(exported), contextlib.redirect_stdout(io.StringIO()) as out:
        exec(compile(code, "README snippets data + load_classifier", "exec"), {"__name__": "__main__"})
    assert "not loaded: cannot load the checkpoint no-such-file.pt" in out.getvalue()


@pytest.mark.smoke
def test_readme_robustbench_snippet_names_benchmark_arguments_that_exist():
    """RobustBench's benchmark() downloads the CIFAR10 test set and needs a CIFAR10 model, so the
    README snippet cannot run offline on a generated checkpoint; where robustbench is installed,
    the arguments it passes must exist."""
    pytest.importorskip("robustbench", reason="robustbench is not installed (not a dependency of "
                        "this repository; its benchmark() also downloads CIFAR10, which an offline "
                        "test cannot)")
    import inspect
    from robustbench.eval import benchmark
    call = readme_snippets()["robustbench"].split("benchmark(model,", 1)[1]
    names = set(re.findall(r"(\w+)=", call))
    assert names and names <= set(inspect.signature(benchmark).parameters), names


# ======================================================================================
# end to end: certify.py (Prop. 1 on a checkpoint)
# ======================================================================================

@pytest.fixture(scope="session")
def magnet_ckpt(clustering_ckpt):
    """The clustering checkpoint of the shared fixtures (clustering_ckpt: stage magnet, K = 2 per class)."""
    return clustering_ckpt


@pytest.mark.smoke
def test_certify_end_to_end_matches_a_naive_recomputation(magnet_ckpt, image_folder, tmp_path, capsys):
    out = str(tmp_path / "certify.json")
    res = certify.main(["--ckpt", magnet_ckpt, "--data-dir", image_folder, "--limit", "60",
                        "--attack-limit", "8", "--attack-steps", "8", "--bisect", "5",
                        "--power-iters", "5", "-b", "25", "--out", out])
    with open(out) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(res))
    assert {"ckpt", "data", "images", "clean_accuracy", "lipschitz", "curve", "two_closest_differs",
            "l2_attack"} <= set(saved)
    assert set(saved["lipschitz"]) >= {"value", "kind", "lower_estimate"} and saved["lipschitz"]["kind"] == "bound"
    assert saved["data"] == "folder" and saved["images"] == 60
    lip = saved["lipschitz"]
    assert 0 < lip["lower_estimate"] <= lip["value"] <= lip["upper_bound_layerwise"]
    assert saved["l2_attack"]["flipped_inside_certified_radius"] == 0
    assert saved["l2_attack"]["flipped"] > 0 and saved["l2_attack"]["median_min_perturbation"] > 0
    assert saved["l2_attack"]["images"] == lip["lower_estimate_images"] == 8      # --attack-limit
    # naive float64 recomputation: model from the checkpoint, nearest centre and Prop. 1 by loops
    ck = torch.load(magnet_ckpt, map_location="cpu", weights_only=True)
    model = certify.ResNet18(0, ck["arch"]["width"], ck["arch"]["in_channels"], ck["data"]["mean"], ck["data"]["std"])
    model.load_state_dict(ck["model"])
    model.eval()
    _, (test_x, test_y), _ = nominal.load_data("folder", image_folder, limit=60)
    with torch.no_grad():
        feats = model.features(nominal.to_float(test_x)).double().numpy()
    mu = ck["clusters"]["centers"].double().numpy()
    mc = ck["clusters"]["center_classes"].numpy()
    radii, correct = [], []
    for f, y in zip(feats, test_y.tolist()):
        d = [float(((f - m) ** 2).sum()) for m in mu]
        i = int(np.argmin(d))
        radii.append(min((d[j] - d[i]) / (2 * lip["value"] * np.linalg.norm(mu[j] - mu[i]))
                         for j in range(len(mu)) if mc[j] != mc[i]))
        correct.append(mc[i] == y)
    radii, correct = np.array(radii), np.array(correct)
    assert saved["clean_accuracy"] == pytest.approx(correct.mean(), abs=1e-6)   # written to 1e-6
    assert saved["radius"]["max_correct"] == pytest.approx(radii[correct].max(), rel=1e-9)
    curve = saved["curve"]
    assert curve[0]["radius"] == 0 and curve[-1]["certified_accuracy"] == 0
    assert all(a["certified_accuracy"] >= b["certified_accuracy"] for a, b in zip(curve, curve[1:]))
    for p in curve[1:-1]:
        if np.all(np.abs(radii - p["radius"]) > 1e-9 * p["radius"]):
            assert p["certified_accuracy"] == pytest.approx((correct & (radii > p["radius"])).mean(), abs=1e-6)
    assert curve[0]["certified_accuracy"] <= saved["clean_accuracy"]
    assert len(curve) == 101                                                       # --grid's default
    assert curve[-1]["radius"] == pytest.approx(radii[correct].max(), rel=1e-9)
    # the summary's points are the result file's curve (every (--grid // 4)-th point), no flip inside R(x)
    text = capsys.readouterr().out
    assert f"next: python attack.py --ckpt {magnet_ckpt}" in text         # a copy-pasteable next step
    summary = text.split("\nsummary: ")[1].splitlines()[0]
    points = re.findall(r"(\S+): (\S+)%", summary.split("certified_accuracy at r = ")[1])
    assert [[float(v) for v in row] for row in points] == \
        [[pytest.approx(p["radius"], rel=5e-3), pytest.approx(100 * p["certified_accuracy"], abs=0.006)]
         for p in curve[::25]]
    assert summary.startswith(f"clean accuracy {100 * saved['clean_accuracy']:.2f}%, sound True, ")
    # only sound radii sit under "certified_accuracy": the L2 attack's curve and the two-closest
    # curve (the paper's text, not sound) are named for what they are
    def keys(obj):
        if isinstance(obj, dict):
            return {k for k in obj} | {k for v in obj.values() for k in keys(v)}
        return {k for v in obj for k in keys(v)} if isinstance(obj, list) else set()
    assert "certified_accuracy" not in keys([saved["l2_attack"], saved["curve_two_closest"]])
    assert all(set(p) == {"radius", "attacked_accuracy"} for p in saved["l2_attack"]["curve"])
    assert all(set(p) == {"radius", "two_closest_not_sound"} for p in saved["curve_two_closest"])
    assert open(str(tmp_path / "certify.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with open(out + ".log.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [(r["images"], r["flipped_inside_radius"]) for r in rows] == [(8, 0)]     # one chunk of the attack


@pytest.mark.smoke
def test_certify_end_to_end_with_a_given_lipschitz_takes_every_radius_from_it(magnet_ckpt, image_folder, tmp_path):
    """certify.py --lipschitz VALUE on a checkpoint, at half and at twice the network's layer-wise
    bound: each run's radii are Prop. 1's with THAT L, recomputed here by loops from the
    checkpoint's features and centres (so they scale as 1 / L), and its curves are named for an
    assumed L; only the run at twice the bound is sound.  At half the bound nothing refutes L (no
    flip inside a radius, L above the Jacobian norm found): the case a falsification check alone
    would call certified."""
    ck = torch.load(magnet_ckpt, map_location="cpu", weights_only=True)
    model = certify.ResNet18(0, ck["arch"]["width"], ck["arch"]["in_channels"], ck["data"]["mean"], ck["data"]["std"])
    model.load_state_dict(ck["model"])
    model.eval()
    _, (test_x, test_y), _ = nominal.load_data("folder", image_folder, limit=40)
    bound = certify.lipschitz_layers(model, test_x.shape[1:])[0]
    with torch.no_grad():
        feats = model.features(nominal.to_float(test_x)).double().numpy()
    mu = ck["clusters"]["centers"].double().numpy()
    mc = ck["clusters"]["center_classes"].numpy()
    for L, sound in ((bound / 2, False), (2 * bound, True)):
        out = str(tmp_path / f"given{sound}.json")
        res = certify.main(["--ckpt", magnet_ckpt, "--data-dir", image_folder, "--limit", "40", "--lipschitz", repr(L),
                            "--attack-limit", "4", "--attack-steps", "4", "--bisect", "2", "--power-iters", "2",
                            "-b", "20", "--grid", "11", "--out", out])
        with open(out) as f:
            saved = json.load(f)
        radii, correct = [], []
        for f, y in zip(feats, test_y.tolist()):
            d = [float(((f - m) ** 2).sum()) for m in mu]
            i = int(np.argmin(d))
            radii.append(min((d[j] - d[i]) / (2 * L * np.linalg.norm(mu[j] - mu[i]))
                             for j in range(len(mu)) if mc[j] != mc[i]))
            correct.append(mc[i] == y)
        radii, correct = np.array(radii), np.array(correct)
        assert correct.any() and saved["lipschitz"]["value"] == L and saved["lipschitz"]["kind"] == "given"
        assert saved["radius"]["max_correct"] == pytest.approx(radii[correct].max(), rel=1e-9)
        assert saved["radius"]["median_correct"] == pytest.approx(np.sort(radii[correct])[(correct.sum() - 1) // 2],
                                                                  rel=1e-9)        # torch: the lower middle
        curve = saved["curve"]
        assert all(set(p) == {"radius", "assumed_L_accuracy"} for p in curve + saved["curve_tight"])
        assert curve[-1]["radius"] == pytest.approx(radii[correct].max(), rel=1e-9)
        for p in curve[1:-1]:
            if np.all(np.abs(radii - p["radius"]) > 1e-9 * p["radius"]):
                assert p["assumed_L_accuracy"] == pytest.approx((correct & (radii > p["radius"])).mean(), abs=1e-6)
        assert "certified_accuracy" not in nested_keys(res)
        assert saved["sound"] is sound
        assert saved["l2_attack"]["flipped_inside_certified_radius"] == 0 and saved["lipschitz"]["lower_estimate"] < L


# ======================================================================================
# end to end: synthetic.py (Sec. 4.1, Fig. 3)
# ======================================================================================

@pytest.mark.smoke
def test_short_run_writes_the_documented_json_with_non_increasing_curves(tmp_path):
    out, png = str(tmp_path / "s.json"), str(tmp_path / "s.png")
    argv = ["--steps", "40", "--seeds", "2", "--n", "200", "--radii", "11", "--out", out, "--plot", png]
    threads = torch.get_num_threads()
    results = synthetic.main(argv)
    assert torch.get_num_threads() == threads                              # main() restores it
    with open(out) as f:
        saved = json.load(f)
    assert set(saved["datasets"]) == {"moons", "circles"} and saved["seeds"] == [0, 1]
    for name, entry in saved["datasets"].items():
        assert set(entry["runs"]) == {"random_init", "warm_start"}
        for run, res in entry["runs"].items():
            assert {"accuracy", "accuracy_std", "lipschitz", "curve", "seeds"} <= set(res)
            lip = res["lipschitz"]
            assert lip["lower"] <= lip["exact"] * (1 + 1e-12) and lip["exact"] <= lip["upper"] * (1 + 1e-12)
            assert lip == res["seeds"][0]["lipschitz"]                     # the first seed's (README "Result files")
            curve = [p["certified_accuracy"] for p in res["curve"]]
            assert len(curve) == 11 and res["curve"][0]["radius"] == 0.0
            assert all(a >= b for a, b in zip(curve, curve[1:])) and curve[0] <= res["accuracy"]
            assert all("certified_accuracy_std" in p for p in res["curve"])
            per_seed = np.array([[p["certified_accuracy"] for p in s["curve"]] for s in res["seeds"]])
            assert len(per_seed) == 2 and np.allclose(per_seed.mean(0), curve)
            for s in per_seed:
                assert all(a >= b for a, b in zip(s, s[1:]))
            accs = [s["accuracy"] for s in res["seeds"]]
            assert res["accuracy"] == pytest.approx(np.mean(accs), abs=1e-6)          # written to 1e-6
            assert res["accuracy_std"] == pytest.approx(np.std(accs, ddof=1), abs=2e-6)
        c = entry["comparison"]
        assert c["seeds"] == 2 and 0 <= c["warm_start_larger"] <= 2
    try:
        import matplotlib  # noqa: F401
        assert os.path.getsize(png) > 1000 and results["plot"] == png
    except ImportError:
        assert results["plot"] is None
    # deterministic for a seed
    again = synthetic.main(argv[:-2] + ["--plot", "none", "--overwrite"])
    assert again["datasets"] == results["datasets"]


@pytest.mark.smoke
def test_without_matplotlib_the_run_notes_it_and_skips_the_figure(tmp_path, monkeypatch, capsys):
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    png = tmp_path / "s.png"
    results = synthetic.main(["--steps", "4", "--seeds", "1", "--n", "40", "--datasets", "moons",
                              "--out", str(tmp_path / "s.json"), "--plot", str(png)])
    assert results["plot"] is None and not png.exists()
    assert "matplotlib is not installed" in capsys.readouterr().out


@pytest.mark.smoke
def test_synthetic_refuses_bad_numbers_and_an_existing_out_without_overwrite(tmp_path, capsys):
    """Every numeric flag finite and in range (`--lr nan`, `--table-radii nan -1` once passed), --warm-steps
    within --steps, a --plot format matplotlib writes; an existing --out kept byte-identical without --overwrite."""
    for argv in (["--lr", "nan"], ["--ft-lr", "0"], ["--table-radii", "nan"], ["--table-radii", "0.1", "-1"],
                 ["--seeds", "0"], ["--n", "3"], ["--alpha", "-1"], ["--steps", "10", "--warm-steps", "11"],
                 ["--plot", "s.txt"]):
        err = exit_code_and_message(capsys, synthetic.parse_args, argv)
        assert "error:" in err.strip().splitlines()[-1] and "Traceback" not in err, argv
    out = tmp_path / "s.json"
    out.write_text("{}")
    argv = ["--steps", "2", "--seeds", "1", "--n", "40", "--datasets", "moons", "--plot", "none", "--out", str(out)]
    err = exit_code_and_message(capsys, synthetic.main, argv)
    assert err.startswith("error:") and "--overwrite" in err and out.read_text() == "{}"
    assert synthetic.main(argv + ["--overwrite"])["seeds"] == [0] and json.loads(out.read_text())["seeds"] == [0]


# ======================================================================================
# end to end: qtrades.py (Eq. (6), App. A "QTRADES") and attack.py on its checkpoints
# ======================================================================================

@pytest.fixture(scope="module")
def qtrades_runs(nominal_run, image_folder, tmp_path_factory):
    """Both variants from the shared nominal checkpoint, 2 epochs: {loss: (results, path)}."""
    runs = {}
    for loss in ("magnet", "ce"):
        out = str(tmp_path_factory.mktemp("qtrades") / f"{loss}.pt")
        runs[loss] = qtrades.main(folder_args(image_folder, out, "--init", nominal_run[1],
                                              "--epochs", 2, "--loss", loss)), out
    return runs


@pytest.mark.smoke
def test_both_variants_write_documented_checkpoints_that_attack_py_evaluates(qtrades_runs, nominal_run, image_folder, tmp_path):
    nominal_ckpt = torch.load(nominal_run[1], map_location="cpu", weights_only=True)
    tracked = nominal_ckpt["model"]["bn1.num_batches_tracked"]
    for loss, stage, batches in (("magnet", "qtrades-magnet", math.ceil(180 / 30)),
                                 ("ce", "qtrades-ce", math.ceil(180 / 30))):
        results, out = qtrades_runs[loss]
        assert results["status"] == "finished" and results["stage"] == stage
        ckpt = torch.load(out, map_location="cpu", weights_only=True)
        assert ckpt["format"] == "clustr/1" and ckpt["stage"] == stage and ckpt["epoch"] == 2
        heads = [k for k in ckpt["model"] if k.startswith("head.")]
        if loss == "magnet":
            assert not heads and set(ckpt["clusters"]) == {"centers", "center_classes", "variance",
                                                           "K", "alpha", "D"}
            assert ckpt["clusters"]["centers"].shape == (6, 64) and "sampler" in ckpt["resume"]
        else:
            assert heads and "clusters" not in ckpt and "sampler" not in ckpt["resume"]
        # batch norm: one update by the clean and one by the adversarial batch per step, none by
        # the crafting (eval mode) or the evaluations
        assert int(ckpt["model"]["bn1.num_batches_tracked"]) == int(tracked) + 2 * 2 * batches
        assert not torch.equal(ckpt["model"]["conv1.weight"], nominal_ckpt["model"]["conv1.weight"])
        with open(out + ".log.jsonl") as fh:
            log = [json.loads(line) for line in fh]
        assert [r["epoch"] for r in log] == [0, 1, 2]
        assert all(math.isfinite(r["train_loss"]) and r["consistency"] >= 0 for r in log[1:])
        assert results["test_accuracy"] > 0.8                              # chance is 1/3
        res = attack.main(["--ckpt", out, "--data-dir", image_folder, "--limit", "30", "--steps", "5",
                           "--square-queries", "50", "--out", str(tmp_path / f"{loss}.json")])
        assert res["images"] == 30 and res["natural_accuracy"] > 0.8
        losses = {r["loss"] for r in res["results"]}
        assert ("magnet" in losses) == (loss == "magnet")                  # the adaptive attack needs clusters
        assert all(r["robust_accuracy"] <= res["natural_accuracy"] for r in res["results"])
    # the ce checkpoint's head is what attack.py evaluates: recompute its natural accuracy
    ckpt = torch.load(qtrades_runs["ce"][1], map_location="cpu", weights_only=True)
    model = attack.build_model(ckpt, qtrades_runs["ce"][1], with_head=True).eval()    # strict=True
    _, (test_x, test_y), _ = nominal.load_data("folder", image_folder)
    with torch.no_grad():
        acc = float((model(test_x.float() / 255).argmax(1) == test_y).double().mean())
    assert acc == pytest.approx(ckpt["metrics"]["test_accuracy"], abs=1e-9)


@pytest.mark.smoke
def test_init_from_a_magnet_checkpoint_and_with_D(nominal_run, image_folder, tmp_path):
    clustr = str(tmp_path / "magnet.pt")
    magnet.main(folder_args(image_folder, clustr, "--init", nominal_run[1], "--epochs", 1))
    out = str(tmp_path / "q0.pt")
    qtrades.main(folder_args(image_folder, out, "--init", clustr, "--epochs", 0))
    a = torch.load(clustr, map_location="cpu", weights_only=True)
    b = torch.load(out, map_location="cpu", weights_only=True)
    assert b["stage"] == "qtrades-magnet" and set(a["model"]) == set(b["model"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])   # weights kept
    assert b["clusters"]["centers"].shape == a["clusters"]["centers"].shape
    # D = 2 of 6 centres: classes absent from the clean point's 2 nearest get p = 0, no NaN
    out = str(tmp_path / "qD.pt")
    results = qtrades.main(folder_args(image_folder, out, "--init", clustr, "--epochs", 1, "--D", 2))
    assert results["status"] == "finished" and math.isfinite(results["train_loss"])
    assert torch.load(out, map_location="cpu", weights_only=True)["clusters"]["D"] == 2


# ======================================================================================
# end to end, every training stage: resume is bit-identical, the checkpoint schema, real images
# ======================================================================================

RESUME = [  # stage, the fixture holding its uninterrupted run, its arguments (that run's), log epochs
    ("nominal", nominal, "nominal_run",
     lambda folder, out, init: nominal_args(folder, out, "--epochs", 3), [1, 2, 3]),
    ("magnet", magnet, "magnet_run",
     lambda folder, out, init: folder_args(folder, out, "--init", init, "--epochs", 2), [0, 1, 2]),
    ("qtrades-magnet", qtrades, "qtrades_runs",
     lambda folder, out, init: folder_args(folder, out, "--init", init, "--epochs", 2, "--loss", "magnet"), [0, 1, 2]),
    ("qtrades-ce", qtrades, "qtrades_runs",
     lambda folder, out, init: folder_args(folder, out, "--init", init, "--epochs", 2, "--loss", "ce"), [0, 1, 2]),
]


@pytest.mark.smoke
@pytest.mark.parametrize("name,stage,fixture,argv,epochs", RESUME, ids=[row[0] for row in RESUME])
def test_resume_is_bit_identical_to_an_uninterrupted_run(name, stage, fixture, argv, epochs, request,
                                                         nominal_run, image_folder, tmp_path):
    """--stop-after 1, then --resume: the weights, the clusters, the sampler's losses, the metrics and
    the log equal those of the uninterrupted run of the same arguments (a module fixture)."""
    run = request.getfixturevalue(fixture)
    _, full = run[name.split("-")[1]] if fixture == "qtrades_runs" else run
    out = str(tmp_path / "resumed.pt")
    args = argv(image_folder, out, nominal_run[1])
    first = stage.main(args + ["--stop-after", "1"])
    assert first["epochs_done"] == 1 and "stopped" in first["status"]
    assert stage.main(args + ["--resume"])["epochs_done"] == epochs[-1]
    a = torch.load(full, map_location="cpu", weights_only=True)
    b = torch.load(out, map_location="cpu", weights_only=True)
    assert a["stage"] == b["stage"] and set(a["model"]) == set(b["model"]) and a["data"] == b["data"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert ("clusters" in a) == ("clusters" in b) == (name != "nominal" and name != "qtrades-ce")
    if "clusters" in a:
        assert torch.equal(a["clusters"]["centers"], b["clusters"]["centers"])
        assert a["clusters"]["variance"] == b["clusters"]["variance"]
        la, lb = a["resume"]["sampler"]["losses"], b["resume"]["sampler"]["losses"]
        assert torch.equal(la.isnan(), lb.isnan()) and torch.equal(la.nan_to_num(), lb.nan_to_num())
    for metric in ("train_loss", "test_accuracy"):
        assert a["metrics"][metric] == b["metrics"][metric], metric
    with open(out + ".log.jsonl") as fh:
        assert [json.loads(line)["epoch"] for line in fh] == epochs


@pytest.mark.smoke
def test_every_stage_writes_the_entries_and_types_every_reader_expects(nominal_run, magnet_run, qtrades_runs):
    """The schema of a clustr/1 checkpoint, checked where it is written (the readers check only that
    the entries exist): what magnet.py/qtrades.py --init, --resume, attack.py and certify.py read."""
    def count(v, low=1):
        return isinstance(v, int) and not isinstance(v, bool) and v >= low
    paths = {"nominal": nominal_run[1], "magnet": magnet_run[1], "qtrades-magnet": qtrades_runs["magnet"][1],
             "qtrades-ce": qtrades_runs["ce"][1]}
    for stage, path in paths.items():
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        arch, data = ckpt["arch"], ckpt["data"]
        assert ckpt["format"] == "clustr/1" and ckpt["stage"] == stage
        assert arch["name"] == "resnet18" and count(arch["width"]) and arch["feat_dim"] == 8 * arch["width"]
        assert count(arch["in_channels"]) and isinstance(data["name"], str) and count(data["num_classes"])
        assert len(data["classes"]) == data["num_classes"] and all(isinstance(c, str) for c in data["classes"])
        for key in ("mean", "std"):
            assert len(data[key]) == arch["in_channels"] and all(isinstance(v, float) for v in data[key])
        assert len(data["image_size"]) == 2 and all(count(v) for v in data["image_size"])
        assert all(isinstance(k, str) and torch.is_tensor(v) for k, v in ckpt["model"].items())
        assert isinstance(ckpt["args"], dict) and count(ckpt["epoch"], 0) and ckpt["metrics"] == ckpt["log"][-1]
        assert [r["epoch"] for r in ckpt["log"]] == list(range(ckpt["epoch"] + 1 - len(ckpt["log"]), ckpt["epoch"] + 1))
        assert {"optimizer", "rng"} <= set(ckpt["resume"]) and ("sampler" in ckpt["resume"]) == ("clusters" in ckpt)
        assert any(k.startswith("head.") for k in ckpt["model"]) == (stage in ("nominal", "qtrades-ce"))
        if "clusters" in ckpt:
            c = ckpt["clusters"]
            assert c["centers"].dtype == torch.float32 and c["centers"].shape[1] == arch["feat_dim"]
            assert c["center_classes"].dtype == torch.long and c["center_classes"].shape == (len(c["centers"]),)
            assert 0 <= int(c["center_classes"].min()) and int(c["center_classes"].max()) < data["num_classes"]
            assert isinstance(c["variance"], float) and math.isfinite(c["variance"]) and c["variance"] > 0
            assert c["D"] is None or count(c["D"])
        for stage_file in (nominal, magnet, qtrades, attack, certify):  # each reader's copy takes it
            assert stage_file.read_checkpoint(path)["epoch"] == ckpt["epoch"]


FASHION_MNIST_DIR = os.path.abspath(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))


FASHION_MNIST = os.path.isfile(os.path.join(FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz"))


@background_job("fashion-mnist", test="test_every_training_stage_learns_on_1000_real_fashion_mnist_images")
def start_fashion_mnist(request):
    """The three training stages' main() one after another in one fresh interpreter (one torch
    import): -> (folder, process); the folder gets results.json, {stage: what its main returned}."""
    if not FASHION_MNIST:
        return lambda: None                         # its test is skipped: no interpreter, no download
    tmp = request.getfixturevalue("tmp_path_factory").mktemp("fashion")
    common = ["--data", "fashion-mnist", "--data-dir", FASHION_MNIST_DIR, "--width", "8",
              "--limit", "1000", "--device", "cpu"]
    runs = {"nominal": common + ["--epochs", "1", "--milestones", "--lr", "1e-3", "-b", "32", "--out", f"{tmp}/n.pt"],
            "magnet": common + ["--init", f"{tmp}/n.pt", "--epochs", "1", "--out", f"{tmp}/m.pt"],
            "qtrades": common + ["--init", f"{tmp}/n.pt", "--loss", "magnet", "--epochs", "1", "--out", f"{tmp}/q.pt"]}
    child = ("import importlib, json, sys\n"
             "runs = json.loads(sys.argv[1])\n"
             "done = {stage: importlib.import_module(stage).main(argv) for stage, argv in runs.items()}\n"
             f"json.dump(done, open({str(tmp / 'results.json')!r}, 'w'), default=str)\n")
    return lambda: (tmp, subprocess.run([sys.executable, "-c", child, json.dumps(runs)], cwd=ROOT, text=True,
                                        capture_output=True, timeout=600, env=child_env()))


@pytest.mark.smoke
@pytest.mark.skipif(not FASHION_MNIST, reason=f"real Fashion-MNIST files not in {FASHION_MNIST_DIR}: `apt-get "
                                              f"install dataset-fashion-mnist` (Debian) or set FASHION_MNIST_DIR")
def test_every_training_stage_learns_on_1000_real_fashion_mnist_images(background):
    """One short epoch per training stage on the first 1,000 real training images (and the first
    1,000 test images).  Chance is 10%; a width-8 ResNet18 reaches about 60-65% here after one
    nominal epoch; the clustering stages start from it and must keep well above chance.  qtrades.py
    runs its Magnet variant only: `--loss ce` reads the same data through the same code (its own
    wiring is tested on generated images), and each real-data run costs seconds."""
    tmp, proc = background["fashion-mnist"].result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = json.load(open(tmp / "results.json"))
    assert done["nominal"]["test_accuracy"] > 0.45, done["nominal"]
    ckpt = torch.load(tmp / "n.pt", map_location="cpu", weights_only=True)
    assert ckpt["arch"]["in_channels"] == 1 and ckpt["data"]["image_size"] == [28, 28]
    assert done["magnet"]["test_accuracy"] > 0.40, done["magnet"]
    assert done["qtrades"]["test_accuracy"] > 0.40, done["qtrades"]
    assert proc.stdout.count("1000 train, 1000 test, 10 classes") == 3


# ======================================================================================
# wiring: every piece of each training loop reaches what it feeds (instrumented runs)
# ======================================================================================

# Each training stage runs for 1-3 epochs at toy scale (width 4, the generated folder) with its
# own functions wrapped: the wrappers only record what the loop passed and got back, and the
# tests check those records against independent computations (crop windows found by brute
# force, Eq. (3) as a naive loop, the adversary re-drawn from a cloned generator, each step's
# gradient recomputed from that batch alone).  A loop line deleted, or fed the wrong argument,
# fails one of these; `python benchmarks/mutate.py` measures how many such edits the suite catches.
class Trace:
    """What an instrumented run recorded: events (kind, epoch, data) in the order they happened;
    epoch = the number of train_one_epoch calls so far (0 = before training)."""

    def __init__(self):
        self.events, self.epoch, self.model = [], 0, None

    def add(self, kind, **data):
        self.events.append((kind, self.epoch, data))

    def of(self, kind, epoch=None):
        return [d for k, e, d in self.events if k == kind and (epoch is None or e == epoch)]


def params_of(model):
    return [p for p in model.parameters() if p.requires_grad]


def grads_of(loss, model):
    """d loss / d theta, leaving the graph for the loop's own backward."""
    params = params_of(model)
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach().clone() for p, g in zip(params, grads)]


def same_grads(a, b, rtol=1e-3):
    """Two gradient lists agree to rtol of the larger norm (per tensor)."""
    return all(float((x - y).norm()) <= rtol * max(float(x.norm()), float(y.norm()), 1e-12)
               for x, y in zip(a, b))


def naive_eq6_consistency(log_p, log_q):
    """-sum_c p_c log q_c per row, terms with p_c = 0 left out (differentiable; Eq. (6))."""
    return -(log_p.exp() * log_q.masked_fill(torch.isneginf(log_p), 0.0)).sum(1)


def nearest_keep(f, centers, D):
    """[n, M] bool, the D centres nearest each row of f, by argsort of explicit distances."""
    d2 = (f.detach().double()[:, None, :] - centers.double()[None]).pow(2).sum(-1)
    keep = torch.zeros(d2.shape, dtype=torch.bool)
    return keep.scatter_(1, d2.argsort(1)[:, :D or d2.shape[1]], True)


def traced_main(module, argv, given, snapshot=False):
    """Run module.main(argv) with its loop's functions wrapped; `given` holds the settings the
    test passed (alpha, lam, D), used only for the independent expected losses.  -> Trace."""
    trace = Trace()
    with pytest.MonkeyPatch.context() as mp:
        features = module.ResNet18.features

        def traced_features(self, x):
            trace.model = self
            out = features(self, x)
            if self.training:
                trace.add("forward", x=x.detach().clone(), out=out)
            return out
        mp.setattr(module.ResNet18, "features", traced_features)
        augment = module.augment

        def traced_augment(x, crop, flip, generator):
            out = augment(x, crop, flip, generator)
            trace.add("augment", x=x.clone(), generator=generator, generator_state=generator.get_state(),
                      model=copy.deepcopy(trace.model).eval() if snapshot else None)
            return out
        mp.setattr(module, "augment", traced_augment)
        adam_step = torch.optim.Adam.step

        def traced_step(self, *a, **k):
            params = [p for group in self.param_groups for p in group["params"]]
            trace.add("step", lr=self.param_groups[0]["lr"], defaults=dict(self.defaults),
                      grads=[torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params])
            return adam_step(self, *a, **k)
        mp.setattr(torch.optim.Adam, "step", traced_step)
        for name in ("train_one_epoch", "train_one_epoch_ce"):
            if hasattr(module, name):
                def traced_epoch(*a, _original=getattr(module, name), **k):
                    trace.epoch += 1
                    trace.add("epoch", args=a)
                    return _original(*a, **k)
                mp.setattr(module, name, traced_epoch)
        if hasattr(module, "evaluate"):                             # the head's accuracy
            evaluate = module.evaluate

            def traced_evaluate(model, split, *a, **k):
                accuracy = evaluate(model, split, *a, **k)
                trace.add("evaluate", images=split[0], accuracy=accuracy)
                return accuracy
            mp.setattr(module, "evaluate", traced_evaluate)
        if module is nominal:
            proxy = type(sys)("F")                                  # nominal's F, one call wrapped
            proxy.__dict__.update(vars(F))

            def traced_ce(logits, y, *a, **k):
                loss = F.cross_entropy(logits, y, *a, **k)
                trace.add("loss", logits=logits.detach().clone(), y=y.clone(), loss=loss.detach(),
                          grads=grads_of(loss, trace.model))
                return loss
            proxy.cross_entropy = traced_ce
            mp.setattr(nominal, "F", proxy)
        if hasattr(module, "NeighbourhoodSampler"):
            cls = module.NeighbourhoodSampler
            sample, record, fit = cls.sample, cls.record, module.fit_clusters

            def traced_sample(self):
                before = dict(probabilities=self.seed_probabilities(), losses=self.losses.clone(),
                              assignment=self.assignment.clone(), centers=self.centers.clone(),
                              m=self.m, d=self.d)
                rows, ids = sample(self)
                trace.add("sample", rows=rows.clone(), ids=ids.clone(), **before)
                return rows, ids

            def traced_record(self, rows, losses):
                trace.add("record", rows=rows.clone(), losses=losses.detach().clone())
                return record(self, rows, losses)

            def traced_fit(features, labels, num_classes, K, generator=None, iters=100):
                out = fit(features, labels, num_classes, K, generator, iters)
                trace.add("fit", K=K, generator=generator, centers=out[0].clone(),
                          center_classes=out[1].clone(), assignment=out[2].clone(), sigma2=out[3])
                return out
            mp.setattr(cls, "sample", traced_sample)
            mp.setattr(cls, "record", traced_record)
            mp.setattr(module, "fit_clusters", traced_fit)
            kmeans_pp = module.kmeans_pp

            def traced_kmeans(x, k, iters=100, generator=None, tol=1e-4):
                trace.add("kmeans", k=k, generator=generator)
                return kmeans_pp(x, k, iters, generator, tol)
            mp.setattr(module, "kmeans_pp", traced_kmeans)
            magnet_loss = module.magnet_loss

            def traced_magnet_loss(f, cluster_ids, class_ids, alpha):
                out = magnet_loss(f, cluster_ids, class_ids, alpha)
                trace.add("magnet_loss", f=f, cluster_ids=cluster_ids.clone(), class_ids=class_ids.clone(),
                          alpha=alpha, per_example=out[1].detach().clone(),
                          grads=grads_of(out[0], trace.model) if f.requires_grad else None)
                return out
            mp.setattr(module, "magnet_loss", traced_magnet_loss)
            log_probs = module.cluster_log_probs

            def traced_log_probs(*a, **k):
                trace.add("eq4", D=k.get("D", a[4] if len(a) > 4 else None), keep=k.get("keep"))
                return log_probs(*a, **k)
            mp.setattr(module, "cluster_log_probs", traced_log_probs)
        if module is qtrades:
            qm, qce = qtrades.qtrades_magnet_loss, qtrades.qtrades_ce_loss

            def traced_qm(f, f_adv, cluster_ids, class_ids, alpha, centers, center_classes,
                          sigma2, D, lam, kind="ce"):
                assert kind == given.get("consistency", "ce")
                out = qm(f, f_adv, cluster_ids, class_ids, alpha, centers, center_classes,
                         sigma2, D, lam, kind)
                # expected Eq. (6) from the settings the test gave, built from the oracle-tested
                # magnet.py blocks and this file's own D-nearest mask
                keep = nearest_keep(f, centers, given["D"])
                cons = naive_eq6_consistency(
                    magnet.cluster_log_probs(f, centers, center_classes, sigma2, keep=keep),
                    magnet.cluster_log_probs(f_adv, centers, center_classes, sigma2, keep=keep))
                expected = magnet.magnet_loss(f, cluster_ids, class_ids, given["alpha"])[0] \
                    + given["lam"] * cons.mean()
                trace.add("eq6", lam=lam, D=D, loss=out[0].detach(), expected=expected.detach(),
                          grads=grads_of(expected, trace.model), cons=out[2].detach().clone(),
                          clean_twice=torch.equal(f, f_adv))     # Eq. (6) compares clean and adversarial
                return out

            def traced_qce(logits, logits_adv, labels, lam, kind="ce"):
                assert kind == given.get("consistency", "ce")
                out = qce(logits, logits_adv, labels, lam, kind)
                cons = naive_eq6_consistency(F.log_softmax(logits.float(), 1),
                                             F.log_softmax(logits_adv.float(), 1))
                expected = F.cross_entropy(logits.float(), labels) + given["lam"] * cons.mean()
                head_only = F.cross_entropy(logits.float(), labels)
                trace.add("eq6", lam=lam, y=labels.clone(), loss=out[0].detach(),
                          expected=expected.detach(), grads=grads_of(expected, trace.model),
                          head_only_grads=grads_of(head_only, trace.model),
                          clean_twice=torch.equal(logits, logits_adv))
                return out
            mp.setattr(qtrades, "qtrades_magnet_loss", traced_qm)
            mp.setattr(qtrades, "qtrades_ce_loss", traced_qce)
        trace.results = module.main(argv)
    return trace


def as_uint8(x):
    return (x * 255).round().to(torch.uint8)


def window_of(out, src, crop):
    """(dy, dx, flipped) such that the uint8 image `out` [C, H, W] is the window at (dy, dx) of
    src zero-padded by `crop` (mirrored left-right if flipped), or None: brute force."""
    H, W = src.shape[-2:]
    padded = F.pad(src, (crop, crop, crop, crop))
    for dy in range(2 * crop + 1):
        for dx in range(2 * crop + 1):
            w = padded[:, dy:dy + H, dx:dx + W]
            if torch.equal(out, w):
                return dy, dx, False
            if torch.equal(out, w.flip(-1)):
                return dy, dx, True
    return None


def check_augmentation(trace, crop, flip, forwards_per_step=1):
    """Each step's model input is a crop window (and mirror) of that step's un-augmented batch
    when augmentation is on (with both kinds present), the batch itself when it is off."""
    augments, forwards = trace.of("augment"), trace.of("forward")
    assert augments and len(forwards) == forwards_per_step * len(augments), (len(augments), len(forwards))
    shifted = flipped = total = 0
    for a, fw in zip(augments, forwards[::forwards_per_step]):
        seen = as_uint8(fw["x"])
        assert seen.shape == a["x"].shape
        if not crop and not flip:
            assert torch.equal(seen, a["x"]), "augmentation is off, but the model saw other images"
            continue
        for out, src in zip(seen, a["x"]):
            found = window_of(out, src, crop)
            assert found is not None, f"a training image is no crop-{crop} window of its source"
            shifted += found[:2] != (crop, crop)
            flipped += found[2]
            total += 1
    if crop or flip:
        assert (shifted > 0.3 * total) == bool(crop), (shifted, total)    # offsets drawn in 0..2crop
        assert (0.2 * total < flipped < 0.8 * total) if flip else flipped == 0, (flipped, total)


# ======================================================================================
# wiring: nominal.py (App. A "Optimization", "Pre-processing")
# ======================================================================================

def nominal_argv(folder, out, *extra):
    return ["--data", "folder", "--data-dir", folder, "--width", "4", "--out", out, *map(str, extra)]


@pytest.fixture(scope="module")
def nominal_traces(image_folder, tmp_path_factory):
    """Three instrumented nominal runs: {name: (Trace, train split)}.  The first on a noisier
    folder, where the train and test accuracies of the result differ (66% and 69%)."""
    root = tmp_path_factory.mktemp("nominal_wiring")
    noisy = make_image_folder(str(root / "noisy"), noise=200.0, seed=2)
    runs = {"schedule": ("--epochs", 3, "--milestones", 1, 2, "--gamma", 0.5, "--lr", 0.02, "-b", 40,
                         "--crop", 2, "--flip"),
            "two": ("--epochs", 2, "--lr", 0.004, "-b", 30, "--limit", 60, "--crop", 0, "--no-flip"),
            "one": ("--epochs", 1, "--lr", 0.005, "-b", 30, "--limit", 60, "--crop", 0, "--flip")}
    out = {}
    for name, extra in runs.items():
        folder = noisy if name == "schedule" else image_folder
        trace = traced_main(nominal, nominal_argv(folder, str(root / f"{name}.pt"), *extra), {})
        trace.folder = folder
        limit = extra[extra.index("--limit") + 1] if "--limit" in extra else None
        out[name] = trace, nominal.load_data("folder", folder, limit)[0]
    return out


@pytest.mark.wiring
def test_nominal_lr_is_in_force_in_epoch_1_and_drops_by_gamma_at_each_milestone(nominal_traces):
    trace, _ = nominal_traces["schedule"]                 # --milestones 1 2 --gamma 0.5 --lr 0.02
    for epoch, lr in ((1, 0.02), (2, 0.01), (3, 0.005)):
        lrs = [s["lr"] for s in trace.of("step", epoch)]
        assert len(lrs) == math.ceil(180 / 40) and all(v == pytest.approx(lr, rel=1e-12) for v in lrs), (epoch, lrs)
    # default milestones epochs//3, 2 epochs//3 without those below 1: the first epoch at --lr
    trace, _ = nominal_traces["two"]                                      # --epochs 2 --lr 0.004
    assert trace.results["epochs_done"] == 2
    assert {s["lr"] for s in trace.of("step", 1)} == {0.004}
    assert [s["lr"] for s in trace.of("step", 2)] == pytest.approx([0.0004, 0.0004])
    trace, _ = nominal_traces["one"]                                      # --epochs 1 --lr 0.005
    assert {s["lr"] for s in trace.of("step", 1)} == {0.005} and len(trace.of("step")) == 2
    for epochs, milestones in ((1, []), (2, [1]), (3, [1, 2]), (90, [30, 60])):
        assert nominal.parse_args(["--epochs", str(epochs)]).milestones == milestones, epochs
    assert nominal.parse_args(["--epochs", "90", "--milestones", "5"]).milestones == [5]


@pytest.mark.wiring
def test_nominal_adam_steps_on_the_gradient_of_each_shuffled_batch_alone(nominal_traces):
    """App. A: Adam on the cross-entropy; each step's gradient is its own batch's (no gradient
    left over from the previous step); batches of -b cover a fresh permutation every epoch, with
    each image's own label; the logged loss and accuracy are those of the batches."""
    trace, (train_x, train_y) = nominal_traces["schedule"]
    index = {bytes(img.numpy()): i for i, img in enumerate(train_x)}
    assert len(index) == len(train_x)                                      # images are unique
    steps, losses, augments = trace.of("step"), trace.of("loss"), trace.of("augment")
    assert len(steps) == len(losses) == len(augments) == 3 * math.ceil(180 / 40)
    for s, loss in zip(steps, losses):
        assert s["defaults"]["betas"] == (0.9, 0.999) and s["defaults"]["weight_decay"] == 0
        assert same_grads(s["grads"], loss["grads"], rtol=1e-5)
    orders = []
    log = read_log(trace.results["out"])
    for epoch in (1, 2, 3):
        rows, correct, total = [], 0, 0.0
        for a, loss in zip(trace.of("augment", epoch), trace.of("loss", epoch)):
            batch = [index[bytes(img.numpy())] for img in a["x"]]
            assert len(batch) <= 40
            assert torch.equal(loss["y"], train_y[batch])                   # each image's own label
            rows += batch
            correct += int((loss["logits"].argmax(1) == loss["y"]).sum())
            total += float(loss["loss"]) * len(batch)
        assert sorted(rows) == list(range(180))                             # every image once
        orders.append(rows)
        assert log[epoch - 1]["train_loss"] == pytest.approx(total / 180, rel=1e-5)
        assert log[epoch - 1]["train_accuracy"] == pytest.approx(correct / 180)
    assert orders[0] != list(range(180)) and orders[0] != orders[1] != orders[2]   # shuffled anew


def read_log(out):
    with open(out + ".log.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.wiring
def test_nominal_crops_and_flips_reach_the_batches_only_when_asked(nominal_traces):
    check_augmentation(nominal_traces["schedule"][0], crop=2, flip=True)
    check_augmentation(nominal_traces["two"][0], crop=0, flip=False)
    check_augmentation(nominal_traces["one"][0], crop=0, flip=True)


# ======================================================================================
# wiring: magnet.py (Eq. (3), the sampler, k-means++ after every epoch; App. A)
# ======================================================================================

def loop_argv(folder, out, *extra):
    return ["--data", "folder", "--data-dir", folder, "--width", "4", "--limit", "90",
            "--out", out, *map(str, extra)]


@pytest.fixture(scope="module")
def magnet_traces(image_folder, tmp_path_factory):
    """Instrumented magnet.py runs with non-default alpha, K, m, d, D, lr: {name: Trace}."""
    root = tmp_path_factory.mktemp("magnet_wiring")
    on = ("--epochs", 2, "--alpha", 3.5, "--K", 3, "--m", 3, "--d", 5, "--D", 4, "--lr", 2e-3,
          "--crop", 2, "--flip")
    off = ("--epochs", 1, "--alpha", 3.5, "--m", 2, "--d", 6, "--crop", 0, "--no-flip")
    return {"on": traced_main(magnet, loop_argv(image_folder, str(root / "on.pt"), *on), {}),
            "off": traced_main(magnet, loop_argv(image_folder, str(root / "off.pt"), *off), {})}


@pytest.fixture(scope="module")
def train90(image_folder):
    return nominal.load_data("folder", image_folder, 90)[0]


def check_sampler_and_loss(trace, train, alpha, m, d, epochs):
    """The loop's batches, Eq. (3) losses and the sampler's loss index agree row by row."""
    train_x, train_y = train
    samples, augments, losses, records = (trace.of(k) for k in ("sample", "augment", "magnet_loss", "record"))
    forwards = trace.of("forward")
    per_epoch = math.ceil(len(train_y) / (m * d))
    assert len(samples) == len(augments) == len(losses) == len(records) == epochs * per_epoch
    for s, a, loss, r, fw in zip(samples, augments, losses, records, forwards[::len(forwards) // len(samples)]):
        assert (s["m"], s["d"]) == (m, d)
        order = list(dict.fromkeys(s["ids"].tolist()))                       # seed, then impostors
        sizes = torch.bincount(s["assignment"], minlength=len(s["centers"]))
        assert len(order) == m and [int((s["ids"] == j).sum()) for j in order] == \
            [min(d, int(sizes[j])) for j in order]
        assert torch.equal(a["x"], train_x[s["rows"]])                       # the drawn rows enter
        assert loss["f"] is fw["out"]                                        # this batch's features
        assert torch.equal(loss["cluster_ids"], s["ids"])
        assert torch.equal(loss["class_ids"], train_y[s["rows"]])            # a row's cluster's class
        _, naive_per, _ = naive_magnet(loss["f"].detach(), s["ids"], train_y[s["rows"]], alpha)
        assert torch.allclose(loss["per_example"].double(), torch.tensor(naive_per, dtype=torch.float64),
                              rtol=1e-4, atol=1e-4)
        assert torch.equal(r["rows"], s["rows"]) and torch.equal(r["losses"], loss["per_example"])


@pytest.mark.wiring
def test_magnet_sampler_is_fed_the_losses_the_loop_computed_for_the_rows_it_drew(magnet_traces, train90):
    trace = magnet_traces["on"]
    check_sampler_and_loss(trace, train90, alpha=3.5, m=3, d=5, epochs=2)
    check_sampler_and_loss(magnet_traces["off"], train90, alpha=3.5, m=2, d=6, epochs=1)
    # seed probabilities: uniform before any loss; at the start of epoch 2 the mean of the last
    # loss each row of a cluster had (never-drawn clusters at the mean of the others), computed
    # here from the recorded Eq. (3) losses and the assignment k-means made after epoch 1
    first = trace.of("sample", 1)[0]["probabilities"]
    assert torch.allclose(first, torch.full_like(first, 1 / len(first)))
    last = {}
    for loss, s in zip(trace.of("magnet_loss", 1), trace.of("sample", 1)):
        last.update(zip(s["rows"].tolist(), loss["per_example"].tolist()))
    assignment = trace.of("fit")[1]["assignment"]
    means = []
    for j in range(len(first)):
        mine = [last[i] for i in range(len(assignment)) if assignment[i] == j and i in last]
        means.append(sum(mine) / len(mine) if mine else None)
    known = [v for v in means if v is not None]
    w = torch.tensor([sum(known) / len(known) if v is None else v for v in means], dtype=torch.float64)
    assert torch.allclose(trace.of("sample", 2)[0]["probabilities"], w / w.sum(), rtol=1e-6)
    log = read_log(trace.results["out"])
    for epoch in (1, 2):
        per = torch.cat([loss["per_example"] for loss in trace.of("magnet_loss", epoch)])
        assert log[epoch]["train_loss"] == pytest.approx(float(per.double().mean()), rel=1e-6)


@pytest.mark.wiring
def test_magnet_sampler_draws_from_the_clusters_kmeans_made_after_the_previous_epoch(magnet_traces):
    trace = magnet_traces["on"]
    fits = trace.of("fit")
    assert len(fits) == 3                                                  # epoch 0, after 1, after 2
    assert not torch.equal(fits[1]["centers"], fits[0]["centers"])
    for epoch in (1, 2):
        fit = fits[epoch - 1]
        centers, classes = fit["centers"], fit["center_classes"]
        for s in trace.of("sample", epoch):
            assert torch.equal(s["assignment"], fit["assignment"]) and torch.equal(s["centers"], centers)
            assert torch.equal(s["ids"], fit["assignment"][s["rows"]])
            order = list(dict.fromkeys(s["ids"].tolist()))
            seed = order[0]
            others = sorted((float((centers[seed] - centers[j]).double().pow(2).sum()), j)
                            for j in range(len(centers)) if classes[j] != classes[seed])
            assert order[1:] == [j for _, j in others[:len(order) - 1]] and len(order) == 3
        # Eq. (3)'s class of a row is its cluster's, as this epoch's k-means made them
        for s, loss in zip(trace.of("sample", epoch), trace.of("magnet_loss", epoch)):
            assert torch.equal(loss["class_ids"], classes[s["ids"]])
    ckpt = torch.load(trace.results["out"], map_location="cpu", weights_only=True)
    assert torch.equal(ckpt["clusters"]["centers"], fits[2]["centers"])
    assert ckpt["clusters"]["variance"] == fits[2]["sigma2"]


@pytest.mark.wiring
def test_magnet_augmentation_reaches_the_model_when_on_and_not_when_off(magnet_traces):
    check_augmentation(magnet_traces["on"], crop=2, flip=True)
    check_augmentation(magnet_traces["off"], crop=0, flip=False)


@pytest.mark.wiring
def test_magnet_alpha_K_m_d_D_lr_reach_the_run_as_given(magnet_traces):
    """alpha and m, d: checked per batch above; here K (k-means++ per class, with the run's own
    generator), D (every Eq. (4) evaluation), lr and Adam on each batch's gradient alone."""
    trace = magnet_traces["on"]                                            # K 3, D 4, lr 2e-3
    run_generator = trace.of("augment")[0]["generator"]                    # seeded from --seed
    for fit in trace.of("fit"):
        assert fit["K"] == 3 and fit["centers"].shape == (9, 32)
        assert fit["center_classes"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        assert fit["generator"] is run_generator
    assert len(trace.of("kmeans")) == 3 * 3                                # per class, per update
    assert all(k["k"] == 3 and k["generator"] is run_generator for k in trace.of("kmeans"))
    assert trace.of("eq4") and all(e["D"] == 4 for e in trace.of("eq4"))
    ckpt = torch.load(trace.results["out"], map_location="cpu", weights_only=True)
    assert (ckpt["clusters"]["K"], ckpt["clusters"]["alpha"], ckpt["clusters"]["D"]) == (3, 3.5, 4)
    steps, losses = trace.of("step"), trace.of("magnet_loss")
    assert len(steps) == len(losses) == 2 * math.ceil(90 / 15)
    for s, loss in zip(steps, losses):
        assert s["lr"] == 2e-3 and s["defaults"]["betas"] == (0.9, 0.999)
        assert same_grads(s["grads"], loss["grads"], rtol=1e-5)            # zero_grad, then this loss
    assert magnet.parse_args(["--data", "cifar10"]).lr == 1e-4             # the default is App. A's


# ======================================================================================
# wiring: qtrades.py (Eq. (6), the quick adversary of Sec. 4.2 and App. A "QTRADES")
# ======================================================================================

EPS, STEP = 6 / 255, 3 / 255                                               # neither is a default


@pytest.fixture(scope="module")
def qtrades_traces(image_folder, tmp_path_factory):
    """Instrumented qtrades.py runs, both losses, lam 5 and 0, augmentation on and off."""
    root = tmp_path_factory.mktemp("qtrades_wiring")
    common = ("--eps", "6/255", "--step", "3/255", "--alpha", 3.5, "--m", 3, "--d", 5, "--lr", 2e-3)
    runs = {"magnet": ("--loss", "magnet", "--epochs", 2, "--lam", 5, "--K", 3, "--D", 4,
                       "--crop", 0, "--no-flip"),
            "magnet0": ("--loss", "magnet", "--epochs", 1, "--lam", 0, "--crop", 2, "--flip"),
            "ce": ("--loss", "ce", "--epochs", 1, "--lam", 5, "--crop", 2, "--flip"),
            "ce0": ("--loss", "ce", "--epochs", 1, "--lam", 0, "--crop", 0, "--no-flip")}
    traces = {}
    for name, extra in runs.items():
        lam, D = float(extra[extra.index("--lam") + 1]), (4 if "--D" in extra else None)
        traces[name] = traced_main(qtrades, loop_argv(image_folder, str(root / f"{name}.pt"), *common, *extra),
                                   {"lam": lam, "D": D, "alpha": 3.5}, snapshot=True)
    return traces


def expected_adversary(model, x, generator_state, distribution):
    """Sec. 4.2 written out: x' = clip(x + U[-eps, eps]) from the run's generator state; one
    signed step of size eta on -sum_c p_c(x) log p_c(x') (p(x) held constant); projection to the
    eps-ball and [0, 1].  distribution(model, x) -> log_probs(z) = log p(f(z)) (for Eq. (4): on
    the D centres nearest f(x)).  -> (x_adv, x', CE at x', CE at x_adv)."""
    g = torch.Generator().set_state(generator_state)
    start = (x + (torch.rand(x.shape, generator=g) * (2 * EPS) - EPS)).clamp(0, 1)
    with torch.no_grad():
        log_probs = distribution(model, x)
        log_p = log_probs(x)
    z = start.clone().requires_grad_(True)
    ce_start = naive_eq6_consistency(log_p, log_probs(z)).sum()
    grad, = torch.autograd.grad(ce_start, z)
    x_adv = torch.min(torch.max(start + STEP * grad.sign(), x - EPS), x + EPS).clamp(0, 1)
    with torch.no_grad():
        ce_adv = naive_eq6_consistency(log_p, log_probs(x_adv)).sum()
    return x_adv, start, float(ce_start.detach()), float(ce_adv)


def check_adversaries(trace, distribution_of_step):
    augments, forwards = trace.of("augment"), trace.of("forward")
    assert augments and len(forwards) == 2 * len(augments)                 # clean, then adversarial
    raised, gain = 0, 0.0
    for i, a in enumerate(augments):
        x, x_adv = forwards[2 * i]["x"], forwards[2 * i + 1]["x"]
        assert (x_adv != x).float().mean() > 0.5                           # an adversary, not x
        assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
        expected, start, ce_start, ce_adv = expected_adversary(
            a["model"], x, a["generator_state"], distribution_of_step(i))
        # one signed step of --step from the same uniform start: the same pixels, up to the few
        # whose gradient is ~0 and whose sign rounding may decide
        assert ((x_adv - expected).abs() < 1e-6).float().mean() > 0.98, i
        moved = (x_adv - start).abs()
        assert moved.max() <= STEP + 1e-6 and ((moved - STEP).abs() < 1e-6).float().mean() > 0.3
        raised, gain = raised + (ce_adv > ce_start), gain + ce_adv - ce_start
    # the signed step raises Eq. (6)'s CE over the start in most batches, and in total
    assert raised > 0.5 * len(augments) and gain > 0, (raised, len(augments), gain)


@pytest.mark.wiring
def test_qtrades_magnet_adversary_is_one_step_of_step_from_the_uniform_start(qtrades_traces):
    for name in ("magnet", "magnet0"):
        trace = qtrades_traces[name]
        D = 4 if name == "magnet" else None
        epochs = [e for k, e, _ in trace.events if k == "augment"]

        def distribution_of_step(i, trace=trace, epochs=epochs, D=D):
            clusters = trace.of("epoch", epochs[i])[0]["args"][4]       # the epoch's clusters
            centers, classes, sigma2 = (clusters[k] for k in ("centers", "center_classes", "variance"))

            def distribution(model, x):
                keep = nearest_keep(model.features(x), centers, D)         # the clean D nearest
                return lambda z: magnet.cluster_log_probs(model.features(z), centers, classes,
                                                          sigma2, keep=keep)
            return distribution
        check_adversaries(trace, distribution_of_step)


@pytest.mark.wiring
def test_qtrades_ce_adversary_is_one_step_of_step_on_the_head(qtrades_traces):
    def distribution_of_step(i):
        return lambda model, x: (lambda z: F.log_softmax(model(z), 1))
    for name in ("ce", "ce0"):
        check_adversaries(qtrades_traces[name], distribution_of_step)


@pytest.mark.wiring
def test_qtrades_lam_scales_the_consistency_term_of_each_step_gradient(qtrades_traces):
    """Each Adam step's gradient is that of Eq. (6) with the lam given (recomputed from the
    oracle-tested blocks); lam = 0 gives exactly the Magnet-only (ce: head-only) gradient, lam > 0
    a clearly different one."""
    for name in ("magnet", "magnet0", "ce", "ce0"):
        trace = qtrades_traces[name]
        lam = 0.0 if name.endswith("0") else 5.0
        steps, eq6 = trace.of("step"), trace.of("eq6")
        assert steps and len(steps) == len(eq6), name
        if name.startswith("magnet"):
            alone = [loss["grads"] for loss in trace.of("magnet_loss") if loss["grads"] is not None]
        else:
            alone = [e["head_only_grads"] for e in eq6]
        assert len(alone) == len(steps)
        for s, e, a in zip(steps, eq6, alone):
            assert e["lam"] == lam and s["lr"] == 2e-3
            assert same_grads(s["grads"], e["grads"], rtol=1e-4), name
            assert float(e["loss"]) == pytest.approx(float(e["expected"]), rel=1e-5)
            if lam == 0:                                                   # bit for bit
                assert all(torch.equal(x, y) for x, y in zip(s["grads"], a)), name
        if lam > 0:
            assert not all(same_grads(s["grads"], a, rtol=0.05) for s, a in zip(steps, alone)), name
        assert not any(e.get("clean_twice") for e in eq6), name       # f(x_adv) is not f(x) again


@pytest.mark.wiring
def test_qtrades_loop_wiring_sampler_clusters_D_and_augmentation(qtrades_traces, train90):
    trace = qtrades_traces["magnet"]
    check_sampler_and_loss(trace, train90, alpha=3.5, m=3, d=5, epochs=2)
    check_sampler_and_loss(qtrades_traces["magnet0"], train90, alpha=3.5, m=3, d=5, epochs=1)
    fits = trace.of("fit")
    assert len(fits) == 3 and all(f["K"] == 3 and f["centers"].shape[0] == 9 for f in fits)
    for epoch in (1, 2):                   # the clusters of the k-means after the previous epoch
        clusters = trace.of("epoch", epoch)[0]["args"][4]
        assert torch.equal(clusters["centers"], fits[epoch - 1]["centers"])
        assert clusters["variance"] == fits[epoch - 1]["sigma2"]
        assert all(torch.equal(s["assignment"], fits[epoch - 1]["assignment"])
                   for s in trace.of("sample", epoch))
    assert all(e["D"] == 4 for e in trace.of("eq6")) and all(e["D"] == 4 for e in trace.of("eq4") if e["keep"] is None)
    log = read_log(trace.results["out"])
    for epoch in (1, 2):
        per = torch.cat([loss["per_example"] for loss in trace.of("magnet_loss", epoch)])
        cons = torch.cat([e["cons"] for e in trace.of("eq6", epoch)])
        assert log[epoch]["train_loss"] == pytest.approx(float((per + 5 * cons).double().mean()), rel=1e-5)
        assert log[epoch]["consistency"] == pytest.approx(float(cons.double().mean()), rel=1e-5)
    check_augmentation(trace, crop=0, flip=False, forwards_per_step=2)
    check_augmentation(qtrades_traces["magnet0"], crop=2, flip=True, forwards_per_step=2)
    check_augmentation(qtrades_traces["ce"], crop=2, flip=True, forwards_per_step=2)
    check_augmentation(qtrades_traces["ce0"], crop=0, flip=False, forwards_per_step=2)
    # --loss ce: shuffled batches of m x d over the whole split, each image with its own label
    index = {bytes(img.numpy()): i for i, img in enumerate(train90[0])}
    rows = []
    for e, a in zip(qtrades_traces["ce"].of("eq6"), qtrades_traces["ce"].of("augment")):
        batch = [index[bytes(img.numpy())] for img in a["x"]]
        assert len(batch) == 15 and torch.equal(e["y"], train90[1][batch])
        rows += batch
    assert sorted(rows) == list(range(90)) and rows != list(range(90))


# ======================================================================================
# wiring: the per-dataset defaults are the paper's (App. A, Sec. 4.2); the logged accuracies the saved
# model's
# ======================================================================================

# {stage: {dataset: {flag attribute: value}}} for the paper's datasets; the paper's words above.
# Other datasets a stage offers (folder, ...) are not the paper's and are not checked here.
PAPER_SETTINGS = {
    # App. A "Optimization": "For the warm start stage of training ClusTR, we use the Adam optimizer
    #   for 90 epochs with learning rate of 10^{-2} that is multiplied by 10^{-1} at epochs 30 and 60
    #   with cross entropy loss."
    # App. A "Pre-processing": "For CIFAR10 and CIFAR100. We apply standard data augmentation of
    #   random 32x32 crops with a padding of 4. For SVHN, we do not employ any data augmentation."
    # Not in the paper: batch 256 and the horizontal flips of CIFAR, both from the authors' code.
    "nominal": {
        "cifar10": dict(epochs=90, lr=1e-2, milestones=[30, 60], gamma=0.1, crop=4, flip=True, batch_size=256),
        "cifar100": dict(epochs=90, lr=1e-2, milestones=[30, 60], gamma=0.1, crop=4, flip=True, batch_size=256),
        "svhn": dict(epochs=90, lr=1e-2, milestones=[30, 60], gamma=0.1, crop=0, flip=False, batch_size=256),
    },
    # App. A "Optimization": "we fine-tune the DNN with the Magnet Loss with a learning rate of
    #   10^{-4} for another 30 epochs for CIFAR10 and 60 epochs for CIFAR100 and SVHN."
    # Sec. 4.2: "Fine-tuning is done for 30 epochs on CIFAR10 and SVHN, and 60 epochs on CIFAR100."
    #   (SVHN: the two disagree; the stages follow Sec. 4.2, README "Where this differs from the paper and the authors' code".)
    # App. A "Magnet Loss": "We use K = 2 as the number of clusters per class [...] we set the total
    #   number of sampled clusters to 12, and the number of samples per cluster to 20." and "We set
    #   alpha to 12.5 for ClusTR and ClusTR+QTRADES on CIFAR10; to 13 for ClusTR and to 10 for
    #   ClusTR+QTRADES on SVHN; to 8.5 for ClusTR+QTRADES on CIFAR100."
    #   (ClusTR on CIFAR100: the paper gives no alpha; 8.5, its ClusTR+QTRADES value.)
    # Sec. 4.2: Eq. (4) over "only the D nearest clusters" is for ClusTR+QTRADES on CIFAR100; ClusTR
    #   uses all clusters (D = None).  Crops as the warm start's "Pre-processing".
    "magnet": {
        "cifar10": dict(epochs=30, lr=1e-4, alpha=12.5, K=2, m=12, d=20, D=None, crop=4, flip=True),
        "cifar100": dict(epochs=60, lr=1e-4, alpha=8.5, K=2, m=12, d=20, D=None, crop=4, flip=True),
        "svhn": dict(epochs=30, lr=1e-4, alpha=13.0, K=2, m=12, d=20, D=None, crop=0, flip=False),
    },
    # App. A "QTRADES": "We set lambda to 8 on CIFAR10, to 9.7 on SVHN, and to 2 on CIFAR100."
    # App. A "Magnet Loss": alpha 12.5 CIFAR10, 10 SVHN, 8.5 CIFAR100 for ClusTR+QTRADES (above).
    # Sec. 4.2: "we compute predictions for ClusTR+QTRADES without considering all clusters [...]
    #   but only the D nearest clusters. While we take D = 20 in this experiment" (CIFAR100).
    # Sec. 4.2: "an attack strength of eps = 8/255".  The step eta of the quick adversary: the paper
    #   gives none; 10/255 is the authors' code.
    "qtrades": {
        "cifar10": dict(epochs=30, lr=1e-4, alpha=12.5, lam=8.0, D=None, K=2, m=12, d=20,
                        eps=8 / 255, step=10 / 255, crop=4, flip=True, loss="magnet"),
        "cifar100": dict(epochs=60, lr=1e-4, alpha=8.5, lam=2.0, D=20, K=2, m=12, d=20,
                         eps=8 / 255, step=10 / 255, crop=4, flip=True, loss="magnet"),
        "svhn": dict(epochs=30, lr=1e-4, alpha=10.0, lam=9.7, D=None, K=2, m=12, d=20,
                     eps=8 / 255, step=10 / 255, crop=0, flip=False, loss="magnet"),
    },
}


@pytest.mark.parametrize("stage", sorted(PAPER_SETTINGS))
@pytest.mark.wiring
def test_every_per_dataset_default_is_the_papers(stage):
    module = {"nominal": nominal, "magnet": magnet, "qtrades": qtrades}[stage]
    for data, expected in PAPER_SETTINGS[stage].items():
        args = module.parse_args(["--data", data])
        got = {key: getattr(args, key) for key in expected}
        assert got == expected, (stage, data)
        assert all(type(got[k]) is type(v) for k, v in expected.items() if v is not None), (stage, data)


@pytest.mark.wiring
def test_paper_defaults_per_dataset_and_help():
    for data, lam, alpha, D in (("cifar10", 8.0, 12.5, None), ("svhn", 9.7, 10.0, None),
                                ("cifar100", 2.0, 8.5, 20), ("folder", 8.0, 12.5, None)):
        args = qtrades.parse_args(["--data", data])
        assert (args.lam, args.alpha, args.D, args.loss) == (lam, alpha, D, "magnet")
        assert args.eps == 8 / 255 and args.step == 10 / 255 and args.lr == 1e-4
    assert qtrades.parse_args(["--data", "cifar100", "--D", "all"]).D is None
    assert qtrades.parse_args(["--eps", "4/255", "--step", "0.01"]).eps == 4 / 255


def split_accuracies(out, folder, limit):
    """(train, test) accuracy of a saved checkpoint, recomputed here: the head's argmax, or Eq. (4)
    as a naive loop over the checkpoint's centres (with its D)."""
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    clusters = ckpt.get("clusters")
    model = attack.build_model(ckpt, out, with_head=clusters is None).eval()          # strict=True
    accuracies = []
    for x, y in nominal.load_data("folder", folder, limit)[:2]:
        with torch.no_grad():
            if clusters is None:
                pred = model(x.float() / 255).argmax(1)
            else:
                p = naive_eq4(model.features(x.float() / 255), clusters["centers"],
                              clusters["center_classes"], clusters["variance"], clusters["D"])
                pred = torch.tensor(p.argmax(1))
        accuracies.append(float((pred == y).double().mean()))
    return accuracies


@pytest.mark.wiring
def test_logged_accuracies_are_those_of_the_saved_model_on_the_named_split(
        nominal_traces, magnet_traces, qtrades_traces, image_folder):
    """The last log line's test accuracy is the saved model's on the test split (and, for the
    clustering stages, its train accuracy on the training split); the runs are chosen so that
    the two splits give different figures, so a swapped split fails."""
    schedule = nominal_traces["schedule"][0]
    runs = [(schedule, schedule.folder, None, False), (magnet_traces["on"], image_folder, 90, True),
            (qtrades_traces["magnet"], image_folder, 90, True)]
    # QTRADES alone: its tiny head predicts one class on both splits here, so the split that
    # reached the head's evaluation after each epoch is checked directly
    test_x = nominal.load_data("folder", image_folder, 90)[1][0]
    trace = qtrades_traces["ce"]
    calls = [(e, d) for k, e, d in trace.events if k == "evaluate" and e >= 1]
    assert [e for e, _ in calls] == [1] and all(torch.equal(d["images"], test_x) for _, d in calls)
    assert read_log(trace.results["out"])[-1]["test_accuracy"] == calls[-1][1]["accuracy"]
    for trace, folder, limit, clustering in runs:
        train_acc, test_acc = split_accuracies(trace.results["out"], folder, limit)
        last = read_log(trace.results["out"])[-1]
        assert train_acc != test_acc, trace.results["out"]                   # the check has teeth
        assert last["test_accuracy"] == pytest.approx(test_acc, abs=1e-9), trace.results["out"]
        if clustering:
            assert last["train_accuracy"] == pytest.approx(train_acc, abs=1e-9), trace.results["out"]


# ======================================================================================
# the reproduction's verdicts (benchmarks/reproduce.py: the paper's claims judged over seeds)
# ======================================================================================

@pytest.mark.oracle
def test_reproduce_judges_each_claim_by_the_95_percent_t_interval_of_its_paired_seed_differences():
    import importlib.util
    spec = importlib.util.spec_from_file_location("reproduce", os.path.join(ROOT, "benchmarks", "reproduce.py"))
    rp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rp)
    # Student's t quantiles in closed form: CDF(t) = 1/2 + atan(t)/pi (1 dof), 1/2 + t/(2 sqrt(2 + t^2)) (2)
    assert 0.5 + math.atan(rp.T95[1]) / math.pi == pytest.approx(0.975, abs=2e-5)
    assert 0.5 + rp.T95[2] / (2 * math.sqrt(2 + rp.T95[2] ** 2)) == pytest.approx(0.975, abs=2e-5)
    m, s, half, verdict = rp.judge([0.01, 0.02, 0.03])      # mean 2, std 1 points: half-width 2.48
    assert (m, s, half) == pytest.approx((0.02, 0.01, rp.T95[2] * 0.01 / math.sqrt(3)))
    assert verdict == "cannot tell at n = 3"
    assert rp.judge([0.05, 0.06, 0.07])[3] == "holds" and rp.judge([-0.05, -0.06, -0.07])[3] == "does not hold"
    assert rp.judge([0.0, 0.0, 0.0])[3] == "does not hold"             # equal on every seed: not "more"
    assert rp.judge([0.1, None])[3] == "cannot tell at n = 1"
    # the claims' orientation on rows built by hand: each model's cells differ from the nominal
    # model's by a known amount per seed
    offset = {"nominal": 0.0, "magnet_random": -0.3, "clustr": 0.05, "qtrades": 0.2, "clustr_qtrades": 0.1,
              "clustr_qtrades_kl": 0.15}
    rows = [{"seed": seed, "model": name, "test_accuracy": 0.9 - offset[name] / 10 + 0.001 * seed,
             "eps": {"8/255": {"worst": 0.4 + offset[name] + 0.01 * seed, "autoattack": 0.39 + offset[name],
                               "authors": 0.45 + offset[name] + 0.02 * seed * (name == "clustr")}}}
            for seed in range(3) for name in offset]
    ablation = {seed: {"base": {"test_accuracy": [0.85, 0.8]}, "alpha1": {"test_accuracy": [0.85, 0.83 + seed / 100]},
                       "epochs0": {"test_accuracy": [0.85]}} for seed in range(3)}
    judged = {(j["cells"], j["eps"]): j for j in rp.claims(rows, rp.parse_args(["--eps", "8/255"]), ablation)}
    a = judged["clustr.worst - nominal.worst", "8/255"]
    assert a["claim"] == "a" and a["per_seed"] == pytest.approx([0.05] * 3) and a["verdict"] == "holds"
    b = judged["clustr_qtrades.autoattack - qtrades.autoattack", "8/255"]
    assert b["claim"] == "b" and b["mean"] == pytest.approx(-0.1) and b["verdict"] == "does not hold"
    c = judged["clustr.authors - clustr.worst", "8/255"]
    assert c["claim"] == "c" and c["per_seed"] == pytest.approx([0.05, 0.06, 0.07]) and c["verdict"] == "holds"
    d = judged["nominal.test_accuracy - clustr.test_accuracy", None]
    assert d["claim"] == "d" and d["per_seed"] == pytest.approx([0.005] * 3)
    f = judged["clustr_qtrades_kl.worst - clustr_qtrades.worst", "8/255"]
    assert f["claim"] == "f" and f["per_seed"] == pytest.approx([0.05] * 3)
    alpha = judged["ablation.alpha1 - clustr", None]
    assert alpha["per_seed"] == pytest.approx([0.03, 0.04, 0.05]) and alpha["verdict"] == "holds"
    kmeans = judged["nominal - ablation.epochs0", None]                  # nominal 0.9 + seed / 1000
    assert kmeans["per_seed"] == pytest.approx([0.05, 0.051, 0.052]) and kmeans["verdict"] == "holds"


@pytest.mark.oracle
def test_reproduce_figures_plot_the_table_and_the_judged_claims_of_a_results_file(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("reproduce", os.path.join(ROOT, "benchmarks", "reproduce.py"))
    rp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rp)
    # a tiny fake results set: two models, two eps, two seeds, as report() writes reproduce.json
    rows = [{"seed": seed, "model": m, "test_accuracy": 0.9, "eps": {e: {"worst": w + 0.1 * seed, "authors": w + 0.2,
                                                                        "autoattack": w}
                                                                    for e, w in (("8/255", 0.4), ("0.1", 0.1))}}
            for seed in (0, 1) for m in ("nominal", "clustr")]
    args = rp.parse_args(["--eps", "8/255", "0.1", "--models", "nominal", "clustr", "--seeds", "0", "1"])
    result = {"table": rp.summarise(rows, args), "claims": rp.claims(rows, args, {})}
    json.dump(result, open(tmp_path / "reproduce.json", "w"))
    rp.main(["--figures", str(tmp_path / "reproduce.json"), "--workdir", str(tmp_path / "figs")])
    for name in ("robust_vs_eps.png", "claims.png"):
        assert os.path.getsize(tmp_path / "figs" / name) > 1000
    _, data = rp.figures(result, str(tmp_path / "figs"))
    worst = data["eps"]["ClusTR"]["worst"]                  # (eps, mean, sample std) in points, per eps
    assert [p[0] for p in worst] == pytest.approx([8 / 255, 0.1])
    assert [p[1] for p in worst] == pytest.approx([45, 15]) and [p[2] for p in worst] == pytest.approx([50 ** 0.5] * 2)
    assert [p[1] for p in data["eps"]["Nominal (CE)"]["authors"]] == pytest.approx([60, 30])
    # each judged claim with an interval: its per-seed differences, mean and 95% half-width, in points
    judged = [j for j in result["claims"] if j["ci95_half"] is not None]
    assert len(data["claims"]) == len(judged) > 0
    for (label, per_seed, m, half, verdict), j in zip(data["claims"], judged):
        assert per_seed == pytest.approx([100 * d for d in j["per_seed"]]) and m == pytest.approx(100 * j["mean"])
        assert half == pytest.approx(100 * j["ci95_half"]) and verdict == j["verdict"] and j["cells"] in label


# ======================================================================================
# plumbing: data loaders, bad input, faults, --help, overwrite and interrupt, signals, locks, torchrun,
# the GPU benchmark's tiny run, --compile (README "Bad input and safety"; README "attack.py under torchrun")
# ======================================================================================

# -- data loaders (folder of PNGs, Fashion-MNIST's raw idx files) --
@pytest.mark.oracle
def test_folder_loader_reads_the_pngs(image_folder):
    from PIL import Image
    (train_x, train_y), (test_x, test_y), info = nominal.load_data("folder", image_folder)
    assert train_x.dtype == torch.uint8 and train_x.shape == (180, 3, 16, 16)
    assert test_x.shape == (90, 3, 16, 16) and info["num_classes"] == 3
    assert info["classes"] == ["class00", "class01", "class02"] and info["image_size"] == [16, 16]
    # round-robin order: class 0 #0, class 1 #0, class 2 #0, class 0 #1, ... (so --limit keeps all)
    assert train_y[:6].tolist() == [0, 1, 2, 0, 1, 2]
    # pixel-exact against PIL, read independently: item 4 is class 1, its second file
    png = np.asarray(Image.open(os.path.join(image_folder, "train", "class01", "0001.png")))
    assert torch.equal(train_x[4], torch.from_numpy(png.copy()).permute(2, 0, 1))
    # App. A normalisation statistics, from the training split, in [0, 1] units
    pixels = train_x.double().div(255)
    assert np.allclose(info["mean"], pixels.mean((0, 2, 3)).numpy())
    assert np.allclose(info["std"], pixels.permute(1, 0, 2, 3).reshape(3, -1).std(1).numpy())
    limited = nominal.load_data("folder", image_folder, limit=7)
    assert len(limited[0][1]) == 7 and len(limited[1][1]) == 7 and set(limited[0][1].tolist()) == {0, 1, 2}


def write_idx(path, array):
    """A gzipped IDX file (MNIST format) written independently of the stages' reader: magic 0 0 8 n,
    big-endian int32 sizes, uint8 data."""
    import gzip
    array = np.asarray(array, dtype=np.uint8)
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape))
        f.write(array.tobytes())


def make_idx_dataset(folder):
    """Fashion-MNIST's four gzipped IDX files (40 train, 20 test random images; labels 0..9 in turn), with
    Debian's names: -> {"train" or "t10k": (images, labels)}."""
    rng, arrays = np.random.default_rng(0), {}
    os.makedirs(folder, exist_ok=True)
    for prefix, n in (("train", 40), ("t10k", 20)):
        arrays[prefix] = rng.integers(0, 256, (n, 28, 28)), np.arange(n) % 10
        for kind, array in zip(("images-idx3", "labels-idx1"), arrays[prefix]):
            write_idx(os.path.join(folder, f"{prefix}-{kind}-ubyte.gz"), array)
    return arrays


@pytest.mark.oracle
def test_fashion_mnist_loader_reads_the_gzipped_idx_files_in_the_data_folder(tmp_path):
    arrays = make_idx_dataset(str(tmp_path))               # Debian's dataset-fashion-mnist: the four .gz files
    (train_x, train_y), (test_x, test_y), info = nominal.load_data("fashion-mnist", str(tmp_path))
    assert train_x.dtype == torch.uint8 and train_x.shape == (40, 1, 28, 28)
    assert test_x.shape == (20, 1, 28, 28) and info["image_size"] == [28, 28]
    assert torch.equal(train_x[:, 0], torch.from_numpy(arrays["train"][0].astype(np.uint8)))
    assert torch.equal(test_y, torch.from_numpy(arrays["t10k"][1]).long())
    assert info["num_classes"] == 10 and info["classes"][0] == "T-shirt/top"
    assert len(info["mean"]) == 1 and abs(info["mean"][0] - arrays["train"][0].mean() / 255) < 1e-9
    model = nominal.ResNet18(10, 2, 1, info["mean"], info["std"])
    assert model(nominal.to_float(train_x[:3])).shape == (3, 10)   # one input channel


# -- bad input: one table of cases against the contract (README "Bad input and safety"): exit code 2;
#    stderr's last line the error ("error: ..." alone or, for a flag's value, argparse's "prog: error: ..."
#    under its usage); no traceback; no file written but a lock; every input and existing output
#    byte-identical.  The wording is not tested. --
def make_plumbing_inputs(root, nominal_ckpt):
    """The files of the CASES table, all under `root`: {name: path}.  Checkpoints from the shared
    nominal run (width 8; 3 classes of 16x16 images, those of the folder here)."""
    import gzip
    import shutil
    p = {"root": str(root), "empty_name": "", "missing": str(root / "missing.pt"), "nowhere": str(root / "nowhere"),
         "old_json": str(root / "old.json"), "pwned": str(root / "pwned")}
    for name, classes, n_train, n_test, size in (("folder", 3, 20, 2, 16), ("four", 4, 20, 2, 16), ("big", 3, 2, 2, 24),
                                                 ("sizes", 3, 2, 0, 16), ("png_cut", 3, 2, 2, 16)):
        p[name] = make_image_folder(str(root / name), classes, n_train, n_test, size)
    shutil.copytree(root / "big" / "test", root / "sizes" / "test", dirs_exist_ok=True)   # test 24x24, train 16x16
    open(root / "png_cut" / "train" / "class01" / "0001.png", "r+b").truncate(60)
    for name in ("fm", "fm_label", "fm_count", "fm_cut"):                  # Fashion-MNIST, Debian's layout
        arrays, p[name] = make_idx_dataset(str(root / name)), str(root / name)
    write_idx(root / "fm_label" / "t10k-labels-idx1-ubyte.gz", np.r_[arrays["t10k"][1][:-1], 10])   # 10 of 10
    write_idx(root / "fm_count" / "train-images-idx3-ubyte.gz", np.zeros((3, 28, 28)))      # 3 images, 40 labels
    (root / "fm_cut" / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(
        bytes([0, 0, 8, 3]) + (100).to_bytes(4, "big") * 3))                    # 3 sizes of 100, no data
    (root / "old.json").write_text("{}\n")
    ck = torch.load(nominal_ckpt, map_location="cpu", weights_only=True)

    class Code:
        def __reduce__(self):
            return os.system, (f"touch {p['pwned']}",)
    # a clustering checkpoint: K = 2 centres per class at the features of the folder's first 6 training
    # images (round-robin: classes 0 1 2 0 1 2); then damages that leave every number finite but not the
    # forward pass: a batch-norm variance of -1, a data std of 0 (the model's buffers), the centres x 1e30
    weights = {k: v for k, v in ck["model"].items() if not k.startswith("head.")}
    m = {k: v for k, v in ck.items() if k != "resume"} | {"stage": "magnet", "model": weights}
    (x, y), _, _ = nominal.load_data("folder", p["folder"], limit=6)
    with torch.no_grad():
        f = attack.build_model(m, "m", with_head=False).eval().features(nominal.to_float(x))
    files = {"ckpt": ck, "old_pt": ck, "empty": b"", "truncated": open(nominal_ckpt, "rb").read()[:5000],
             "foreign": {"state_dict": weights}, "pickled": {"format": "clustr/1", "payload": Code()},
             "nan": dict(ck, model=dict(ck["model"], **{"conv1.weight": ck["model"]["conv1.weight"] * np.nan})),
             "qce": dict(ck, stage="qtrades-ce"), "m": dict(m, clusters=clusters(f, y, float(f.var(0).sum()) / 4)),
             "headless": dict(ck, model=weights),                       # a nominal checkpoint without its head
             "slim": {k: v for k, v in ck.items() if k != "resume"},    # --slim's final epoch: no resume state
             "qm": dict(m, stage="qtrades-magnet", clusters=clusters(f, y, 1.0)),
             "m_bn": dict(m, clusters=clusters(f, y, 1.0), model=dict(weights, **{
                 "bn1.running_var": -torch.ones_like(weights["bn1.running_var"])})),
             "m_std": dict(m, clusters=clusters(f, y, 1.0), data=dict(m["data"], std=[0.0] * 3),
                           model=dict(weights, std=torch.zeros_like(weights["std"]))),
             "m_far": dict(m, clusters=clusters(f * 1e30, y, 1.0)),
             "m_var": dict(m, clusters=clusters(f, y, -1.0)),             # finite, sigma^2 < 0: the farthest wins
             "m_cls": dict(m, clusters=dict(clusters(f, y, 1.0), center_classes=torch.arange(6))),   # 6 of 3 classes
             "no_args": dict(m, clusters=clusters(f, y, 1.0), args=None),
             "m_inf": dict(m, clusters=clusters(torch.cat([f[:-1], f[-1:] * np.inf]), y, 1.0))}
    for name, obj in files.items():
        p[name] = str(root / f"{name}.pt")
        (root / f"{name}.pt").write_bytes(obj) if isinstance(obj, bytes) else torch.save(obj, p[name])
    return p


@pytest.fixture(scope="session")
def plumbing_inputs(nominal_run, tmp_path_factory):
    return make_plumbing_inputs(tmp_path_factory.mktemp("plumbing") / "inputs", nominal_run[1])


# Each stage's arguments on these files, to which a case adds its own (a flag given twice: the last wins).
BASE = {nominal: lambda p: ["--data", "folder", "--data-dir", p["folder"], "--width", "4", "--epochs", "1", "-b", "32"],
        magnet: lambda p: ["--init", p["ckpt"], "--data-dir", p["folder"], "--m", "3", "--d", "4", "--epochs", "1"],
        attack: lambda p: ["--ckpt", p["ckpt"], "--data-dir", p["folder"], "--steps", "1", "--limit", "4",
                           "--no-checks"],
        certify: lambda p: ["--ckpt", p["m"], "--data-dir", p["folder"], "--limit", "4", "--plot", "none"],
        synthetic: lambda p: ["--datasets", "moons", "--seeds", "1", "--n", "40", "--steps", "20", "--plot", "none"]}
BASE[qtrades] = BASE[magnet]
# Flags out of their range or not finite (magnet.py's and qtrades.py's --init has width 8, 20 images a class).
FLAGS = {nominal: ["--lr nan", "--lr 2", "--epochs 0", "--seed -1", "--limit 0", "--gamma nan", "-b 0", "--width 0",
                   "--milestones 100", "--crop 100", "--stop-after 0", "--compile nonsense"],
         magnet: ["--lr nan", "--limit 0", "--alpha inf", "--K 100", "--width 16", "--D 7"],   # 7 of 3 x 2 centres
         qtrades: ["--eps 8", "--step inf", "--lam nan", "--limit 0", "--width 16"],
         attack: ["--eps 8", "--eps -8/255", "--eps nan", "--tolerance nan", "--seed -1", "--compile tvm",
                  "--width 16"],                                      # the checkpoint's width is 8
         certify: ["--limit 0", "--seed -1", "--lipschitz nan", "--lipschitz -1"],
         synthetic: ["--lr nan", "--table-radii nan", "--table-radii -1", "--seed -1", "--warm-steps 21"]}
READS = {nominal: "--resume", magnet: "--init", qtrades: "--init", attack: "--ckpt", certify: "--ckpt"}

# (stage, case, the arguments it adds: {name} is the file of that name above).  Each runs in an empty
# folder holding ./held.pt.lock, a live run's lock.  A case that begins with "-" is a flag's value.
CASES = [(stage, f"{kind} as {flag}", f"{flag} {{{name}}}") for stage, flag in READS.items() for kind, name in (
    ("a missing checkpoint", "missing"), ("a 0-byte checkpoint", "empty"), ("a truncated checkpoint", "truncated"),
    ("not a clustr/1 checkpoint", "foreign"), ("pickled code", "pickled"), ("NaN weights", "nan"))] + [
    (stage, case, case) for stage, cases in FLAGS.items() for case in cases] + [
    # a checkpoint of another stage
    (nominal, "a magnet checkpoint as --resume", "--resume {m}"),
    (magnet, "a magnet checkpoint as --init", "--init {m}"),
    (magnet, "a nominal checkpoint as --resume", "--resume {ckpt}"),
    (qtrades, "a magnet checkpoint as --init of --loss ce", "--init {m} --loss ce"),
    (qtrades, "a qtrades-ce checkpoint as --init of --loss magnet", "--init {qce}"),
    (qtrades, "a qtrades-magnet checkpoint as --resume of --loss ce", "--loss ce --resume {qm}"),
    (certify, "a checkpoint without clusters", "--ckpt {ckpt}"),
    (certify, "an inf centre", "--ckpt {m_inf}"),
    # finite numbers, a forward pass that is not
    *[(stage, f"{what} (finite numbers, NaN forward)", f"--ckpt {{{name}}}") for stage in (attack, certify)
      for what, name in (("batch-norm variance -1", "m_bn"), ("data std 0", "m_std"), ("centres x 1e30", "m_far"))],
    # finite numbers and forward passes, damaged entries: sigma^2 < 0, centre classes beyond the data's, no args
    *[(stage, what, f"--ckpt {{{name}}}") for stage in (attack, certify) for what, name in (
        ("a negative sigma^2", "m_var"), ("centre classes beyond the classes", "m_cls"), ("no args entry", "no_args"))],
    # a checkpoint that does not fit the run or the data
    (nominal, "resumed with another --lr", "--width 8 --epochs 3 --lr 0.5 --resume {ckpt}"),
    (nominal, "resumed into another --out with nothing left to train", "--width 8 --epochs 3 --resume {ckpt}"),
    (nominal, "resumed with fewer --epochs than it holds", "--width 8 --epochs 2 --resume {ckpt}"),
    (nominal, "a --slim checkpoint (no resume state) as --resume", "--width 8 --epochs 4 --resume {slim}"),
    (qtrades, "a nominal checkpoint without its head as --init of --loss ce", "--init {headless} --loss ce"),
    (attack, "a nominal checkpoint without its head", "--ckpt {headless}"),
    *[(stage, "a folder of 4 classes, a checkpoint of 3", "--data-dir {four}") for stage in (magnet, qtrades, attack,
                                                                                             certify)],
    *[(stage, "test images of another size than the checkpoint's", "--data-dir {big}") for stage in (attack, certify)],
    # data that cannot be used
    *[(stage, "a missing data folder", "--data-dir {nowhere}") for stage in (nominal, magnet, attack, certify)],
    *[(stage, "test images of another size than the train ones", "--data-dir {sizes}") for stage in (nominal, attack)],
    (nominal, "a truncated PNG", "--data-dir {png_cut}"),
    *[(nominal, f"Fashion-MNIST: {what}", f"--data fashion-mnist --data-dir {{{name}}}") for what, name in (
        ("a test label outside the 10 classes", "fm_label"), ("3 images, 40 labels", "fm_count"),
        ("an IDX file shorter than its sizes", "fm_cut"))],
    # the output rule: an existing output without --overwrite, whatever flag names it ...
    *[(stage, f"an existing {flag}", f"{flag} {{{name}}}") for stage, flag, name in (
        (nominal, "--out", "old_pt"), (magnet, "--out", "old_pt"), (qtrades, "--out", "old_pt"),
        (attack, "--out", "old_json"), (certify, "--out", "old_json"), (synthetic, "--out", "old_json"),
        (attack, "--save-adv", "old_pt"), (attack, "--export", "old_pt"), (certify, "--plot", "old_json"))],
    # ... and an output that is a file the run reads, even with --overwrite
    *[(stage, f"the {flag} is {what}", f"{flag} {path} --overwrite") for stage, flag, what, path in (
        (attack, "--out", "the --ckpt", "{ckpt}"), (attack, "--save-adv", "the --ckpt", "{ckpt}"),
        (attack, "--export", "the --ckpt", "{ckpt}"), (certify, "--out", "the --ckpt", "{m}"),
        (certify, "--plot", "the --ckpt", "{m}"), (magnet, "--out", "the --init", "{ckpt}"),
        (qtrades, "--out", "the --init", "{ckpt}"),
        (nominal, "--out", "a test-labels file", "{fm}/t10k-labels-idx1-ubyte.gz --data fashion-mnist --data-dir {fm}"),
        (attack, "--save-adv", "a test image", "{folder}/test/class00/0000.png"),
        (certify, "--out", "a test image", "{folder}/test/class01/0001.png"))],
    # ... or no file: an empty name, a folder, one file named by two outputs
    *[(stage, f"{flag} {what}", f"{flag} {path}") for stage, flag, what, path in (
        (nominal, "--out", "empty", "{empty_name}"), (attack, "--out", "a folder", "{root}"),
        (synthetic, "--out", "empty", "{empty_name}"), (attack, "--export", "empty", "{empty_name}"), (attack, "--save-adv", "the --out", "held2.json --out held2.json"))],
    # an output whose folder cannot be made (an OSError: one line, exit 2, as every expected error)
    (nominal, "an --out below a file", "--out {old_json}/c.pt"),
    # a second run on an --out whose lock a live run holds
    *[(stage, "an --out held by a live run", "--out held.pt") for stage in (nominal, magnet, attack, synthetic)],
]


def snapshot(*folders):
    """{path: bytes} of every file under the folders."""
    return {os.path.join(d, f): open(os.path.join(d, f), "rb").read()
            for folder in folders for d, _, names in os.walk(folder) for f in names}


def changes(before, after):
    """The files changed or written between two snapshots, locks aside."""
    return [f for f in before if after.get(f) != before[f]] + [f for f in after if f not in before
                                                               and not f.endswith(".lock")]


def assert_refused(case, code, err, before, after):
    lines = err.strip().splitlines() or [""]
    usage = case.startswith("-") and re.match(r"\S+: error: ", lines[-1])
    assert code == 2 and "Traceback" not in err, (code, err[-3000:])
    assert usage or len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    assert changes(before, after) == [], "an input or an existing output changed, or a file was written"


@pytest.mark.smoke
@pytest.mark.parametrize("stage,case,adds", CASES, ids=[f"{s.__name__}: {c}" for s, c, _ in CASES])
def test_bad_input_exits_2_with_one_line_and_changes_no_file(stage, case, adds, plumbing_inputs, tmp_path,
                                                             monkeypatch, capsys):
    import fcntl
    p = plumbing_inputs
    monkeypatch.chdir(tmp_path)
    with open("held.pt.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        before = snapshot(p["root"], ".")
        with pytest.raises(SystemExit) as info:
            stage.guarded(stage.main)(BASE[stage](p) + [a.format(**p) for a in adds.split()])
    assert_refused(case, info.value.code, capsys.readouterr().err, before, snapshot(p["root"], "."))


SHELL = ["nominal: a 0-byte checkpoint as --resume", "magnet: NaN weights as --init", "qtrades: --eps 8",
         "attack: pickled code as --ckpt", "certify: centres x 1e30 (finite numbers, NaN forward)",
         "synthetic: --table-radii nan"]


@background_job("shell", test="test_bad_input_from_the_shell_exits_2_without_a_traceback")
def start_shell(request):
    """Cases of the table as a user runs them: each stage's `__main__` in a fresh interpreter, on its own
    copy of the inputs -> {case: (exit code, stderr, files before, files after)}."""
    root = request.getfixturevalue("tmp_path_factory").mktemp("shell")
    p = make_plumbing_inputs(root / "inputs", request.getfixturevalue("nominal_run")[1])

    def run(stage, adds):
        cwd = root / stage.__name__
        os.makedirs(cwd)
        before = snapshot(p["root"], cwd)
        code, _, err = run_script(f"{stage.__name__}.py", *BASE[stage](p), *[a.format(**p) for a in adds.split()],
                                  cwd=cwd)
        return code, err, before, snapshot(p["root"], cwd)
    return lambda: {f"{s.__name__}: {c}": run(s, a) for s, c, a in CASES if f"{s.__name__}: {c}" in SHELL}


@pytest.mark.smoke
def test_bad_input_from_the_shell_exits_2_without_a_traceback(background):
    done = background["shell"].result()
    assert sorted(done) == sorted(SHELL)
    for case, (code, err, before, after) in done.items():
        assert_refused(case.split(": ", 1)[1], code, err, before, after)


# -- --help --
HELP = [(nominal, "App. A"), (magnet, "Eq. (3)"), (qtrades, "Eq. (6)"), (attack, "Sec. 4.2"), (certify, "Prop. 1"),
        (synthetic, "Sec. 4.1")]   # stage, a citation of the paper its --help must give


@pytest.mark.shape
@pytest.mark.parametrize("stage,words", HELP, ids=[s.__name__ for s, _ in HELP])
def test_help_cites_the_paper_and_exits_0(stage, words, capsys):
    with pytest.raises(SystemExit) as info:
        stage.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())                       # the wrapping aside
    assert info.value.code == 0 and words in out
    if stage is attack:                                                    # defaults as the flags take them
        assert "(default: 64/255)" in out and "0.0313" not in out


# -- overwrite, interrupt, signals, locks, resume, printed next commands --
def train_lines(path):
    with open(path + ".log.jsonl") as f:
        return [json.loads(line)["epoch"] for line in f]


def interrupt_line(err, out):
    """The one stderr line of an interrupted run (exit 130): -> the numbers it names besides --out's."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return re.findall(r"\d+", lines[0].replace(out, ""))


@pytest.mark.smoke
@pytest.mark.parametrize("stage", [nominal, magnet, qtrades], ids=["nominal", "magnet", "qtrades"])
def test_overwrite_keeps_the_old_files_until_the_first_save_of_a_finite_model(stage, plumbing_inputs, tmp_path,
                                                                              capsys, monkeypatch):
    """--overwrite: the old checkpoint and log stay until the run's first save (Ctrl-C in the middle of
    that save: exit 130, no epoch named, the torn write in a temporary file alone); a model with NaN is
    never saved (exit 2; magnet.py and qtrades.py may have saved their start, epoch 0, before the NaN);
    a finished run replaces both, with --slim without its resume state, its data entry the model's
    normalisation (magnet.py, qtrades.py: --init's, from other images than these)."""
    import shutil
    out = str(tmp_path / "c.pt")
    shutil.copy(plumbing_inputs["ckpt"], out)
    open(out + ".log.jsonl", "w").write('{"epoch": 3}\n')
    old, argv = snapshot(tmp_path), BASE[stage](plumbing_inputs) + ["--out", out, "--overwrite"]

    def torn(obj, path):                                                  # Ctrl-C in the middle of the first save
        open(path, "wb").write(b"torn")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(SystemExit) as info:
        stage.guarded(stage.main)(argv)
    assert info.value.code == 130 and interrupt_line(capsys.readouterr().err, out) == []
    assert [f for f in changes(old, snapshot(tmp_path)) if not f.endswith(".tmp")] == []
    for f in tmp_path.glob("*.tmp"):
        f.unlink()
    monkeypatch.undo()
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, closure=None: [    # diverged (--lr > 1 is refused)
        w.data.fill_(float("nan")) for group in self.param_groups for w in group["params"]])
    with pytest.raises(SystemExit) as info:
        stage.guarded(stage.main)(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert changes(old, snapshot(tmp_path)) == [] or nominal.read_checkpoint(out)["epoch"] == 0   # finite, or raises
    monkeypatch.undo()
    stage.main(argv + ["--slim"])
    ck = nominal.read_checkpoint(out)
    assert train_lines(out)[-1] == 1 and ck["epoch"] == 1 and "resume" not in ck
    assert torch.equal(torch.tensor(ck["data"]["mean"] + ck["data"]["std"]),
                       torch.cat([ck["model"]["mean"].flatten(), ck["model"]["std"].flatten()]))


def signal_argv(image_folder, out):
    return ["--data", "folder", "--data-dir", image_folder, "--width", "4", "--epochs", "200", "-b", "64", "--out", out]


@background_job("signals", test="test_a_signal_exits_130_naming_the_saved_epoch_and_resume_continues_bit_identically")
def start_signals(request):
    """-> run(), which starts three training processes side by side, sends them SIGINT, SIGTERM and
    SIGKILL after their first epoch, and returns {signal: (checkpoint path, stderr, exit code)}."""
    folder, tmp = request.getfixturevalue("image_folder"), request.getfixturevalue("tmp_path_factory").mktemp("signals")
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # A shell's background job starts with SIGINT ignored, and a child inherits that; a user's
        # run does not.  With Python's own handler here, exec gives the children the default (set
        # here, in the main thread: a preexec_fn in the worker thread could deadlock the child).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        request.addfinalizer(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))

    def run():
        procs = {sig: (str(tmp / f"{sig}.pt"), subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "nominal.py"), *signal_argv(folder, str(tmp / f"{sig}.pt"))],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=child_env()))
            for sig in ("SIGINT", "SIGTERM", "SIGKILL")}
        for sig, (out, proc) in procs.items():
            next(line for line in proc.stdout if line.strip().startswith("1/200"))   # the first epoch's row
            proc.send_signal(getattr(signal, sig))
        return {sig: (out, proc.communicate(timeout=120)[1], proc.returncode) for sig, (out, proc) in procs.items()}
    return run


@pytest.mark.smoke
def test_a_signal_exits_130_naming_the_saved_epoch_and_resume_continues_bit_identically(background, image_folder,
                                                                                       tmp_path):
    """Ctrl-C (SIGINT), a scheduler's SIGTERM and kill -9, each sent to its own training process after its
    first epoch: the first two exit 130 with one line naming the epoch the checkpoint holds and --resume;
    every lock is free (flock: the kernel frees it however the process ends); --resume continues each run
    to the weights of a run never interrupted."""
    import fcntl
    done, plain = background["signals"].result(), {}
    assert sorted(done) == ["SIGINT", "SIGKILL", "SIGTERM"] and done["SIGKILL"][2] == -signal.SIGKILL
    for sig, (out, err, code) in done.items():
        n = torch.load(out, map_location="cpu", weights_only=True)["epoch"] + 1
        assert sig == "SIGKILL" or code == 130 and interrupt_line(err, out) == [str(n - 1)] and "--resume" in err
        with open(out + ".lock") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        nominal.main(signal_argv(image_folder, out) + ["--stop-after", str(n), "--resume"])
        if n not in plain:
            plain[n] = str(tmp_path / f"{n}.pt")
            nominal.main(signal_argv(image_folder, plain[n]) + ["--stop-after", str(n)])
        a, b = (torch.load(path, map_location="cpu", weights_only=True)["model"] for path in (out, plain[n]))
        assert all(torch.equal(a[k], b[k]) for k in a), sig


@pytest.mark.smoke
def test_a_finished_run_extends_and_its_printed_next_command_runs_as_printed(nominal_run, image_folder, tmp_path,
                                                                             capsys, monkeypatch):
    """A larger --epochs continues a finished run on its schedule; the magnet.py command it prints then
    runs as printed (--data, --width and the data folder from --init; budget flags added)."""
    import shutil
    monkeypatch.chdir(tmp_path)
    shutil.copy(nominal_run[1], "ckpt.pt")
    assert nominal.main(["--data", "folder", "--data-dir", image_folder, "--width", "8", "--epochs", "4",
                         "-b", "32", "--resume"])["epochs_done"] == 4
    milestones = [torch.load(f, weights_only=True)["args"]["milestones"] for f in ("ckpt.pt", nominal_run[1])]
    assert train_lines("ckpt.pt") == [1, 2, 3, 4] and milestones[0] == milestones[1]
    command = shlex.split(capsys.readouterr().out.split("next ")[-1])
    assert command[:4] == ["python", "magnet.py", "--init", "ckpt.pt"], command
    assert magnet.main(command[2:] + ["--epochs", "1", "--m", "3", "--d", "10"])["epochs_done"] == 1
    # Ctrl-C in the first epoch of a resumed run names the epoch --out holds, the resumed one; resumed into
    # another --out, that --out holds none of this run
    monkeypatch.setattr(nominal, "train_one_epoch", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    argv = ["--data", "folder", "--data-dir", image_folder, "--width", "8", "--epochs", "6", "-b", "32"]
    for extra, said in ((["--resume"], "ckpt.pt holds epoch 4;"), (["--resume", "ckpt.pt", "--out", "b.pt"],
                                                                   "no epoch of this run was saved in b.pt")):
        with pytest.raises(SystemExit) as info:
            nominal.guarded(nominal.main)(argv + extra)
        assert info.value.code == 130 and said in capsys.readouterr().err.strip().splitlines()[-1]


# -- attack.py under torchrun --
def without_timing(result):
    """A result file (or its log rows) less what may differ between a torchrun run and a plain run of the
    same seed: the process count and wall-clock timings.  Everything else (rows, per-example verdicts,
    checks and their numbers, config) must be equal."""
    if isinstance(result, list):                                           # log.jsonl rows
        return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")} for r in result]
    return {k: v for k, v in result.items() if k not in ("world_size", "attack_seconds", "check_seconds", "seconds")
            } | {"results": without_timing(result["results"])}

def torchrun_argv(request):
    return ["--ckpt", request.getfixturevalue("nominal_run")[1], "--data-dir", request.getfixturevalue("image_folder"),
            "--limit", "16", "-b", "4", "--steps", "2", "--square-queries", "10", "--eps", "8/255", "32/255",
            "--large-eps", "64/255", "--check-images", "8", "--save-adv", "adv.pt", "--out", "attack.json"]


@background_job("torchrun", test="test_torchrun_with_2_cpu_processes_writes_the_single_process_result")
def start_torchrun(request):
    """attack.py under torchrun (`python -m torch.distributed.run --standalone`), 2 CPU processes on one
    thread each (the plain run's float sums), in a folder "two" beside an empty "one" (the same relative
    --out: equal configs): -> (their parent, exit code, stdout, stderr)."""
    tmp_path, args = request.getfixturevalue("tmp_path_factory").mktemp("torchrun"), torchrun_argv(request)
    for name in ("one", "two"):
        os.makedirs(tmp_path / name)

    def run():
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               os.path.join(ROOT, "attack.py"), *args], capture_output=True, text=True,
                              cwd=tmp_path / "two", env=child_env(), timeout=300)
        return tmp_path, proc.returncode, proc.stdout, proc.stderr
    return run


@pytest.mark.smoke
def test_torchrun_with_2_cpu_processes_writes_the_single_process_result(request, background, monkeypatch):
    tmp_path, code, out, err = background["torchrun"].result()
    assert code == 0, err[-3000:]
    args = torchrun_argv(request)
    monkeypatch.chdir(tmp_path / "one")
    attack.main(args)
    one, two = (json.load(open(tmp_path / name / "attack.json")) for name in ("one", "two"))
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert without_timing(two) == without_timing(one)                      # examples, checks, config too
    verdicts = [r for e in one["examples"] for r in e["robust"]]
    assert True in verdicts and any(f is not None for e in one["examples"] for f in e["fooled_by"])
    assert one["checks"]["in_ball"]["batches"] > 2 * 4 and one["checks"]["beats_random_search"]["images"] == 8
    adv = [torch.load(tmp_path / name / "adv.pt", weights_only=True) for name in ("one", "two")]
    for a, b in zip(adv[0]["runs"], adv[1]["runs"]):
        assert torch.equal(a["x_adv"], b["x_adv"]) and torch.equal(a["fooled_by"], b["fooled_by"])
    # rank 0 alone wrote (the files of the plain run, no temporary or second file) and printed the header
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))
    for log in [f for f in os.listdir(tmp_path / "one") if f.endswith(".jsonl")]:
        rows = [[json.loads(line) for line in open(tmp_path / name / log)] for name in ("one", "two")]
        assert without_timing(rows[1]) == without_timing(rows[0])
    assert out.count("attack.py | ") == 1 and out.count("config: ") == 1


@pytest.mark.smoke
def test_bad_input_under_torchrun_exits_2_on_every_process_with_one_line(
        nominal_run, image_folder, tmp_path, monkeypatch, capsys):
    """Rank 0 in this process, rank 1 a subprocess, both with the variables torchrun sets (one
    torch import fewer than a torchrun launch): a missing checkpoint stops both, exit 2, with one
    line at most each, and writes nothing."""
    import socket
    with socket.socket() as s:                                             # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    argv = ["--ckpt", str(tmp_path / "missing.pt"), "--data-dir", image_folder, "--device", "cpu",
            "--dist-timeout", "2", "--out", str(tmp_path / "a.json")]
    other = subprocess.Popen([sys.executable, os.path.join(ROOT, "attack.py"), *argv],
                             env=dict(os.environ, **env, RANK="1", LOCAL_RANK="1", OMP_NUM_THREADS="1"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for k, v in dict(env, RANK="0", LOCAL_RANK="0").items():
            monkeypatch.setenv(k, v)
        with pytest.raises(SystemExit) as info:
            attack.guarded(attack.main)(argv)
        out_1, err_1 = other.communicate(timeout=120)
    finally:
        other.kill()
        if torch.distributed.is_initialized():                             # rank 0's group, in this process
            torch.distributed.destroy_process_group()
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert other.returncode == 2 and len(err_1.strip().splitlines()) <= 1 and "Traceback" not in err_1, err_1
    assert [f for f in os.listdir(tmp_path) if not f.endswith(".lock")] == []

# -- the GPU benchmark's tiny run on the CPU --
def resnet18_flops(width, classes, size=32, channels=3):
    """2 x the multiply-adds of one image through the CIFAR ResNet18 of App. A, by layer from its
    shapes alone: (all convolutions, the stem convolution, the linear head)."""
    stem = 2 * channels * width * 9 * size * size
    convs, hw, c_in = stem, size, width
    for i, c_out in enumerate([width, 2 * width, 4 * width, 8 * width]):
        for block in range(2):
            stride = 2 if i > 0 and block == 0 else 1
            hw //= stride
            convs += 2 * c_in * c_out * 9 * hw * hw + 2 * c_out * c_out * 9 * hw * hw
            if stride != 1 or c_in != c_out:                        # 1x1 projection shortcut
                convs += 2 * c_in * c_out * hw * hw
            c_in = c_out
    return convs, stem, 2 * 8 * width * classes


@background_job("gpu", test="test_gpu_benchmark_tiny_on_the_cpu_prints_and_writes_every_row")
def start_gpu(request):
    out = request.getfixturevalue("tmp_path_factory").mktemp("gpu") / "gpu.json"
    return lambda: (out, *run_script("benchmarks/gpu.py", "--tiny", "--device", "cpu", "--out", out))


@pytest.mark.smoke
def test_gpu_benchmark_tiny_on_the_cpu_prints_and_writes_every_row(background):
    """benchmarks/gpu.py --tiny --device cpu: every row printed and in the JSON with finite
    numbers; the nominal row's FLOPs equal a count from the layer shapes (a training image: the
    forward, the input and weight gradients of every layer but the stem's input gradient; a test
    image: the forward)."""
    out, code, stdout, stderr = background["gpu"].result()
    assert code == 0, stderr
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["key"] for r in rows] == ["nominal", "magnet", "qtrades", "pgd20", "pgd100", "certify"]
    assert result["complete"] and result["device"] == "cpu" and result["peaks"] is None
    lines = stdout.splitlines()
    for r in rows:
        printed = [l for l in lines if l.startswith(r["label"] + " ")]
        assert len(printed) == 1, (r["label"], stdout)
        assert printed[0].split()[-1] == f"{r['pipeline_seconds']:.1f}"
        for key in ("images", "seconds", "images_per_second", "full_seconds", "flops", "tflops",
                    "pipeline_seconds"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["key"], key, r[key])
        assert math.isfinite(r["first_call_seconds"])
        assert r["share_of_peak"] is None and r["precision"] == "fp32" and not r["amp"]
        assert r["pipeline_seconds"] == pytest.approx(r["full_seconds"] * r["count"])
        assert r["tflops"] == pytest.approx(r["flops"] / r["seconds"] / 1e12)
        assert r["full_seconds"] == pytest.approx(r["seconds"])   # all of --tiny's size was timed
    assert result["pipeline_seconds"] == pytest.approx(sum(r["pipeline_seconds"] for r in rows))
    assert [r["count"] for r in rows] == [nominal.PAPER_DEFAULTS["cifar10"]["epochs"],
                                          magnet.PAPER_DEFAULTS["cifar10"]["epochs"],
                                          qtrades.PAPER_DEFAULTS["cifar10"]["epochs"], 1, 1, 1]
    assert all(r["not_fooled"] == 1 for r in rows if r["key"].startswith("pgd"))   # eps 0: full work
    convs, stem, head = resnet18_flops(result["settings"]["width"], 10)
    n = rows[0]
    assert n["flops"] == pytest.approx(n["images"] * (3 * (convs + head) - stem)
                                       + n["test_images"] * (convs + head), rel=1e-9)


# -- --compile, and compiled steps against eager --
def fake_compile(calls):
    """torch.compile stand-in that records what it was given and calls it unchanged, and each kind
    of call that goes through it (train or eval mode, with or without gradients, and the backward
    from its output: "train, gradients, backward")."""
    def compile(fn, backend="inductor", **kwargs):
        record = {"module": fn.__self__, "backend": backend, "calls": 0, "kinds": set()}
        calls.append(record)

        def run(x):
            record["calls"] += 1
            kind = ("train" if fn.__self__.training else "eval") + (", gradients" if torch.is_grad_enabled() else "")
            record["kinds"].add(kind)
            out = fn(x)
            if out.requires_grad:
                out.register_hook(lambda grad: record["kinds"].add(kind + ", backward"))
            return out
        return run
    return compile


def same_record(a, b):
    timing = {"seconds", "images_per_second", "cluster_seconds"}
    return {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}


@pytest.mark.wiring
def test_compile_flag_reaches_the_network_each_stage_trains_and_attacks(
        nominal_run, magnet_run, qtrades_runs, clustering_ckpt, image_folder, tmp_path, capsys, monkeypatch):
    """--compile BACKEND hands the f(x) of the network that trains (whose weights are saved) or
    that attack.py attacks to torch.compile with that backend; every kind of call of the loop goes
    through it (the stand-in records them), and the run is the eager run's: epoch 1 of each stage
    equals the shared fixtures' epoch 1."""
    calls = []
    monkeypatch.setattr(torch, "compile", fake_compile(calls))

    def check(ckpt_path, kinds):
        capsys.readouterr()
        assert len(calls) == 1 and calls[0]["backend"] == "aot_eager" and calls[0]["calls"] > 0
        assert set(kinds) <= calls[0]["kinds"], (kinds, calls[0]["kinds"])
        if ckpt_path:
            saved = torch.load(ckpt_path, map_location="cpu", weights_only=True)["model"]
            trained = calls[0]["module"].state_dict()
            assert saved.keys() == trained.keys()
            assert all(torch.equal(saved[k], trained[k]) for k in saved)
        calls.clear()

    def log(path, epoch):
        with open(path + ".log.jsonl") as f:
            return next(r for r in map(json.loads, f) if r["epoch"] == epoch)

    out = str(tmp_path / "n.pt")
    nominal.main(["--data", "folder", "--data-dir", image_folder, "--width", "8", "--epochs", "1",
                  "-b", "32", "--out", out, "--compile", "aot_eager"])
    assert same_record(log(out, 1), log(nominal_run[1], 1))
    check(out, ["train, gradients", "train, gradients, backward", "eval"])
    out = str(tmp_path / "m.pt")
    magnet.main(folder_args(image_folder, out, "--init", nominal_run[1], "--epochs", 1, "--compile", "aot_eager"))
    assert same_record(log(out, 1), log(magnet_run[1], 1)) and same_record(log(out, 0), log(magnet_run[1], 0))
    check(out, ["eval", "train, gradients", "train, gradients, backward"])
    for loss, kinds in (("magnet", ["eval", "eval, gradients", "eval, gradients, backward", "train, gradients"]),
                        ("ce", ["eval", "eval, gradients", "train, gradients, backward"])):
        out = str(tmp_path / f"q{loss}.pt")
        qtrades.main(folder_args(image_folder, out, "--init", nominal_run[1], "--epochs", 1,
                                 "--loss", loss, "--compile", "aot_eager"))
        assert same_record(log(out, 1), log(qtrades_runs[loss][1], 1))
        check(out, kinds)
    common = ["--ckpt", clustering_ckpt, "--data-dir", image_folder, "--limit", "20", "--steps", "3",
              "--loss", "ce", "--no-checks"]
    compiled = attack.main(common + ["--out", str(tmp_path / "c.json"), "--compile", "aot_eager"])
    check(None, ["eval", "eval, gradients", "eval, gradients, backward"])
    eager = attack.main(common + ["--out", str(tmp_path / "e.json")])
    assert not calls and compiled["examples"] == eager["examples"]
    assert [same_record(a, b) for a, b in zip(compiled["results"], eager["results"])] == [True]


@pytest.mark.oracle
def test_compiled_training_step_and_attack_gradient_equal_eager(own_rng):
    """Real torch.compile (backend aot_eager: Dynamo's graphs and AOTAutograd's forward and
    backward, as inductor receives them, without generating code; the default inductor costs
    minutes per graph on this CPU), as the stages' --compile applies it: two nominal.py training
    steps give the eager losses and weights, and attack.py's objective and its input gradient (each
    PGD step) the eager ones, within float rounding."""
    torch.manual_seed(0)
    eager = nominal.ResNet18(3, 4, 3, [0.5] * 3, [0.25] * 3)
    compiled = copy.deepcopy(eager)
    compiled.features = torch.compile(compiled.features, backend="aot_eager")
    g = torch.Generator().manual_seed(1)
    train = (torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8, generator=g),
             torch.randint(0, 3, (64,), generator=g))
    args = nominal.parse_args(["--data", "cifar10", "-b", "32"])   # 2 steps; App. A crops and flips
    args.amp = False                                               # as setup_runtime on a CPU
    sums = []
    for model in (eager, compiled):
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        loss_sum, correct, n = nominal.train_one_epoch(model, opt, train, args, torch.Generator().manual_seed(2),
                                                       torch.device("cpu"))
        sums.append((float(loss_sum), int(correct), n))
    assert sums[0][1:] == sums[1][1:] and sums[0][0] == pytest.approx(sums[1][0], rel=1e-5)
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5), name
    clfs = [attack.Classifier(m).eval() for m in (eager, compiled)]
    x = nominal.to_float(train[0][:16]).requires_grad_(True)
    y = train[1][:16]
    grads = []
    for clf in clfs:
        obj, log_p = attack.objective(clf, x, y, "margin")
        grads.append((obj.detach(), torch.autograd.grad(obj.sum(), x)[0]))
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-4, atol=1e-5)
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-3, atol=1e-6)
    assert torch.equal(grads[0][1].sign(), grads[1][1].sign())       # the PGD step itself
    # the compiled graphs ran: the input gradient flows through AOTAutograd's compiled backward
    assert type(clfs[1].model.features(x).grad_fn).__name__ == "CompiledFunctionBackward"
