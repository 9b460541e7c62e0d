"""test_all.py -- the test suite of this repository (CPU, no network, a few minutes).

    python -m pytest test_all.py            # everything
    python -m pytest test_all.py -k nominal # one stage

Three tiers (STYLE rule 11):
  shape   -- shared blocks identical across stage files; no stage imports another.
  oracles -- each formula against an independent computation (naive loops, closed forms,
             properties that must hold).
  smoke   -- each stage run end to end at toy scale on generated data (no downloads), plus the
             bad-input contract of SPEC section 7 (exit code 2, one clear message, no traceback).
"""

import ast
import difflib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
STAGES = ["nominal.py", "magnet.py", "qtrades.py", "attack.py", "certify.py", "synthetic.py"]
PRESENT = [s for s in STAGES if os.path.exists(os.path.join(ROOT, s))]

import nominal  # noqa: E402  (the stage under test; each stage guards its entry point)


# ======================================================================================
# helpers
# ======================================================================================

def run_script(script, *args, cwd=None):
    """Run a stage as a user would; returns (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd or ROOT, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def exit_code_and_message(capsys, fn, *args):
    """Call fn(*args) that must exit 2 (SPEC section 7); return its stderr."""
    with pytest.raises(SystemExit) as info:
        fn(*args)
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
    results = nominal.main(["--data", "folder", "--data-dir", image_folder, "--width", "8",
                            "--epochs", "3", "-b", "32", "--out", out])
    return results, out


# ======================================================================================
# shape: shared blocks (SPEC section 1) and the flat layout
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


def test_shared_blocks_identical_across_stages():
    paths = [os.path.join(ROOT, s) for s in PRESENT]
    problems = check_shared(paths)
    assert not problems, "\n".join(problems)
    with open(os.path.join(ROOT, "nominal.py")) as f:
        names = set(shared_blocks(f.read())[0])
    assert {"args", "runtime", "data", "model", "checkpoint"} <= names


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


def test_no_stage_imports_another_and_every_stage_has_a_main_guard():
    local = {s[:-3] for s in STAGES} | {"test_all"}
    for stage in PRESENT:
        with open(os.path.join(ROOT, stage)) as f:
            source = f.read()
        tree = ast.parse(source)
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert not imported & local, f"{stage} imports {imported & local}"
        assert 'if __name__ == "__main__":' in source, stage
        assert not re.search(r"torch\.load\((?![^)]*weights_only=True)", source), stage


# ======================================================================================
# nominal.py: data
# ======================================================================================

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


def test_folder_loader_errors(tmp_path):
    with pytest.raises(nominal.DataError, match="train"):
        nominal.load_data("folder", str(tmp_path))
    make_image_folder(str(tmp_path / "odd"), classes=2, n_train=2, n_test=2)
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "odd" / "train" / "class00" / "zz.png")
    with pytest.raises(nominal.DataError, match="one size"):
        nominal.load_data("folder", str(tmp_path / "odd"))


def test_offline_cifar10_is_a_clear_error_with_exit_code_2(tmp_path):
    code, out, err = run_script("nominal.py", "--data", "cifar10", "--data-dir", tmp_path,
                                "--width", "8", "--epochs", "1")
    assert code == 2, (out, err)
    assert "Traceback" not in err
    assert "cifar-10-batches-py" in err and str(tmp_path) in err and "--data folder" in err


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


# ======================================================================================
# nominal.py: model, schedule
# ======================================================================================

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


def test_help_cites_the_paper():
    code, out, _ = run_script("nominal.py", "--help")
    assert code == 0 and "App. A" in out and "--stop-after" in out and "--data-path" in out


# ======================================================================================
# nominal.py: training, checkpoint, resume
# ======================================================================================

def test_tiny_training_run_learns(nominal_run):
    results, out = nominal_run
    assert results["epochs_done"] == 3 and results["status"] == "finished"
    assert results["test_accuracy"] > 0.8                           # chance is 1/3
    with open(out + ".log.jsonl") as f:
        log = [json.loads(line) for line in f]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert {"epoch", "train_loss", "test_accuracy", "images_per_second"} <= set(log[-1])


def test_checkpoint_matches_spec_5_and_round_trips(nominal_run, image_folder):
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
    model = nominal.build_model(ckpt["arch"], ckpt["data"], with_head=True)
    model.load_state_dict(ckpt["model"], strict=True)
    _, (test_x, test_y), _ = nominal.load_data("folder", image_folder)
    acc = nominal.evaluate(model, (test_x, test_y), 64, False, torch.device("cpu"))
    assert acc == ckpt["metrics"]["test_accuracy"]
    assert not [f for f in os.listdir(os.path.dirname(out)) if ".tmp-" in f]


def test_resume_is_bit_identical_to_an_uninterrupted_run(nominal_run, image_folder, tmp_path):
    _, full = nominal_run
    out = str(tmp_path / "ckpt.pt")
    common = ["--data", "folder", "--data-dir", image_folder, "--width", "8", "--epochs", "3",
              "-b", "32", "--out", out]
    first = nominal.main(common + ["--stop-after", "1"])
    assert first["epochs_done"] == 1 and "stopped" in first["status"]
    second = nominal.main(common + ["--resume"])
    assert second["epochs_done"] == 3
    a = torch.load(full, map_location="cpu", weights_only=True)
    b = torch.load(out, map_location="cpu", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["metrics"]["test_accuracy"] == b["metrics"]["test_accuracy"]
    with open(out + ".log.jsonl") as f:
        assert [json.loads(line)["epoch"] for line in f] == [1, 2, 3]


def test_resume_refuses_changed_arguments(nominal_run, image_folder, capsys):
    _, out = nominal_run
    err = exit_code_and_message(capsys, nominal.main, [
        "--data", "folder", "--data-dir", image_folder, "--width", "8", "--epochs", "3",
        "-b", "32", "--lr", "0.5", "--out", out, "--resume"])
    assert "--lr: 0.01 -> 0.5" in err


def test_atomic_write_keeps_the_old_file_when_saving_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pt")
    nominal.save_checkpoint({"a": torch.ones(2)}, path)
    before = open(path, "rb").read()

    def broken(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        nominal.save_checkpoint({"a": torch.zeros(2)}, path)
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["c.pt"]


# ======================================================================================
# nominal.py: bad input (SPEC section 7)
# ======================================================================================

def test_corrupt_truncated_and_pickled_checkpoints_exit_2(nominal_run, tmp_path, capsys):
    _, out = nominal_run
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(out, "rb").read()[:5000])
    pickled = tmp_path / "pickled.pt"
    import argparse
    torch.save({"format": "clustr/1", "args": argparse.Namespace(a=1)}, pickled)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    for path, words in ((garbage, "corrupt"), (truncated, "truncated"), (pickled, "weights_only"),
                        (foreign, "not a clustr/1"), (tmp_path / "missing.pt", "does not exist")):
        err = exit_code_and_message(capsys, nominal.load_checkpoint, str(path))
        assert words in err and str(path) in err
    err = exit_code_and_message(capsys, nominal.load_checkpoint, out, ("magnet",))
    assert "'nominal' checkpoint" in err


def test_cli_exit_code_2_on_bad_input(image_folder, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    common = ["--data", "folder", "--data-dir", image_folder, "--width", "8", "--epochs", "1"]
    code, _, err = run_script("nominal.py", *common, "--out", bad, "--resume")
    assert code == 2 and "Traceback" not in err and "corrupt" in err
    code, _, err = run_script("nominal.py", "--data", "folder", "--data-dir", tmp_path / "nowhere")
    assert code == 2 and "Traceback" not in err and "train" in err
    if not torch.cuda.is_available():
        code, _, err = run_script("nominal.py", *common, "--device", "cuda")
        assert code == 2 and "no CUDA" in err and "Traceback" not in err


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(image_folder, tmp_path, capsys):
    out = str(tmp_path / "ckpt.pt")
    nominal.save_checkpoint({"format": "clustr/1", "marker": torch.arange(3)}, out)
    before = open(out, "rb").read()
    # Adam's first steps move every weight by about lr: 1e38 overflows float32 within two steps
    err = exit_code_and_message(capsys, nominal.main, [
        "--data", "folder", "--data-dir", image_folder, "--width", "8", "--epochs", "2",
        "-b", "32", "--lr", "1e38", "--out", out])
    assert "loss became" in err and "smaller" in err
    assert open(out, "rb").read() == before
