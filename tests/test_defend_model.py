"""`flain defend --model`: a model from outside a run directory (a factory named module:function,
state_dicts, .npz or class-folder image sets). The defended weight is checked against the
paper's Algorithm 1 written out (tests/oracles.py); bad files get one line and exit code 2."""

from __future__ import annotations

import json
import re
import textwrap

import numpy as np
import pytest
import torch

from launch.cli import EXIT_CONFIG, main
from tests import oracles

MODULE = textwrap.dedent('''
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)
            self.fc1, self.fc2 = nn.Linear(2 * 4 * 4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))

    def net():
        return Net()

    def broken():
        raise OSError("no weights here")

    def not_a_model():
        return 3
''')


@pytest.fixture
def files(tmp_path, monkeypatch):
    """A model module in the working directory, W0 and trained state_dicts, uint8 aux/test/triggered sets."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "mymodels.py").write_text(MODULE)
    import importlib

    import mymodels
    importlib.reload(mymodels)
    torch.manual_seed(0)
    w0 = mymodels.net().state_dict()
    trained = {k: v + 0.5 * torch.randn(v.shape) for k, v in w0.items()}
    torch.save(w0, tmp_path / "w0.pt")
    torch.save(trained, tmp_path / "w.pt")
    g = np.random.default_rng(1)
    model = mymodels.net()
    model.load_state_dict(trained)

    def image_set(name, n, label=None):
        images = g.integers(0, 256, (n, 1, 4, 4), dtype=np.uint8)
        with torch.no_grad():
            predicted = model(torch.from_numpy(images).float() / 255).argmax(1).numpy()
        labels = predicted if label is None else np.full(n, label)
        np.savez(tmp_path / name, images=images, labels=labels)
        return torch.from_numpy(images).float() / 255, torch.from_numpy(labels).long()

    sets = {"aux": image_set("aux.npz", 80), "test": image_set("test.npz", 50), "trig": image_set("trig.npz", 30, 2)}
    return tmp_path, w0, trained, sets, mymodels


def _args(tmp, **extra):
    args = ["defend", "--model", "mymodels:net", "--initial", str(tmp / "w0.pt"), "--final", str(tmp / "w.pt"),
            "--aux", str(tmp / "aux.npz"), "--out", str(tmp / "out"), "--post-defenses", "flain",
            "--set", "flain-step=0.02", "--set", "flain-rho=0.1"]
    for key, value in extra.items():
        args += [f"--{key}", str(value)]
    return args


def test_a_saved_model_is_defended_as_algorithm1_says_with_acc_and_asr(files, capsys):
    tmp, w0, trained, sets, mymodels = files
    assert main(_args(tmp, test=tmp / "test.npz", triggered=tmp / "trig.npz")) == 0
    summary = json.loads((tmp / "out" / "summary.json").read_text())
    defended = torch.load(tmp / "out" / "flain.pt", weights_only=True)
    # the oracle: tau = fc1 (the first Linear after the conv), its inputs captured by hand
    model = mymodels.net()
    model.load_state_dict(trained)
    aux_x, aux_y = sets["aux"]
    with torch.no_grad():
        x = torch.relu(model.conv(aux_x)).flatten(1).mean(0).double().numpy()

    def accuracy(w, images, labels):
        m = mymodels.net()
        m.load_state_dict({**trained, "fc1.weight": w})
        with torch.no_grad():
            return (m(images).argmax(1) == labels).float().mean().item()

    naive = oracles.algorithm1(x, w0["fc1.weight"], trained["fc1.weight"], 0.02, 0.1,
                               lambda w: accuracy(w, aux_x, aux_y))
    assert 0 < naive.flipped < 32
    assert torch.allclose(defended["fc1.weight"], naive.weight, atol=1e-6)
    report = summary["post_defenses"]["flain"]
    assert report["flipped"] == naive.flipped and summary["status"] == "completed"
    assert report["acc"] == pytest.approx(accuracy(naive.weight, *sets["test"]), abs=1e-6)
    assert report["asr"] == pytest.approx(accuracy(naive.weight, *sets["trig"]), abs=1e-6)
    assert summary["no_defense"] == {"acc": 1.0, "asr": pytest.approx(accuracy(trained["fc1.weight"], *sets["trig"]))}
    assert "flain" in capsys.readouterr().out


def test_an_aux_folder_of_class_folders_is_read_like_the_npz(files):
    from PIL import Image

    tmp, *_ = files
    with np.load(tmp / "aux.npz") as data:
        images, labels = data["images"], data["labels"]
    for i, (image, label) in enumerate(zip(images, labels)):
        (tmp / "auxdir" / f"c{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0]).save(tmp / "auxdir" / f"c{label}" / f"{i}.png")  # 1 x 4 x 4 -> grayscale
    assert main(_args(tmp)) == 0
    assert main(_args(tmp, aux=tmp / "auxdir") + ["--out", str(tmp / "out2")]) == 0
    # class folders c0, c1, c2 are indices 0, 1, 2: the same aux set, the same defended weight
    a = torch.load(tmp / "out" / "flain.pt", weights_only=True)["fc1.weight"]
    b = torch.load(tmp / "out2" / "flain.pt", weights_only=True)["fc1.weight"]
    assert set(np.unique(labels)) == {0, 1, 2} and torch.equal(a, b)


def test_without_test_sets_it_still_defends_and_says_what_was_not_measured(files, capsys):
    tmp, *_ = files
    assert main(_args(tmp)) == 0
    summary = json.loads((tmp / "out" / "summary.json").read_text())
    assert summary["no_defense"] == {} and "acc" not in summary["post_defenses"]["flain"]
    out = capsys.readouterr().out
    assert "no-Defense         -       -" in out and "nan" not in out


def _bad(tmp):
    np.savez(tmp / "nolabels.npz", images=np.zeros((3, 1, 4, 4), np.uint8))
    np.savez(tmp / "floats.npz", images=np.full((3, 1, 4, 4), 2.0, np.float32), labels=np.zeros(3, np.int64))
    torch.save({"fc1.weight": torch.zeros(2, 2)}, tmp / "small.pt")
    (tmp / "junk.pt").write_bytes(b"not a torch file")
    with np.load(tmp / "aux.npz") as data:
        images, labels = data["images"], data["labels"]
    np.savez(tmp / "one.npz", images=images[:1], labels=labels[:1])
    np.savez(tmp / "rgb.npz", images=np.repeat(images, 3, axis=1), labels=labels)
    np.savez(tmp / "big_label.npz", images=images, labels=labels + 10)
    np.savez(tmp / "black.npz", images=np.zeros_like(images), labels=(labels + 1) % 3)  # mislabelled: below chance
    (tmp / "outfile").write_text("x")
    return {
        "one": ({"aux": tmp / "one.npz"}, "1 image.* of 1 class"),
        "rgb": ({"aux": tmp / "rgb.npz"}, r"cannot take the aux images \(each 3x4x4\): RuntimeError"),
        "label": ({"aux": tmp / "big_label.npz"}, "aux label 12 is not a class of the model"),
        "chance": ({"aux": tmp / "black.npz"}, "no better than chance"),
        "test": ({"test": tmp / "rgb.npz"}, r"--test .*rgb.npz: the model cannot take the test images"),
        "out": ({"out": tmp / "outfile"}, "is a file, not a directory"),
        "ref": ({"model": "mymodels"}, "expected MODULE:FUNCTION"),
        "module": ({"model": "nosuchmodule:net"}, "ModuleNotFoundError"),
        "raises": ({"model": "mymodels:broken"}, "raised OSError: no weights here"),
        "type": ({"model": "mymodels:not_a_model"}, "returned a int, not a torch.nn.Module"),
        "missing": ({"final": tmp / "nope.pt"}, "no such file"),
        "junk": ({"final": tmp / "junk.pt"}, "not a torch.save file"),
        "fit": ({"initial": tmp / "small.pt"}, "does not fit the model"),
        "keys": ({"aux": tmp / "nolabels.npz"}, "needs arrays 'images' and 'labels'"),
        "range": ({"aux": tmp / "floats.npz"}, r"in \[0, 1\]"),
        "layer": ({"set": "flain-layer=conv"}, "not a Linear layer"),
    }


@pytest.mark.parametrize("case", ["one", "rgb", "label", "chance", "test", "out", "ref", "module", "raises", "type",
                                  "missing", "junk", "fit", "keys", "range", "layer"])
def test_bad_inputs_get_one_line_and_exit_2(files, capsys, case):
    tmp, *_ = files
    changes, message = _bad(tmp)[case]
    args = _args(tmp)
    for key, value in changes.items():
        args += [f"--{key}", str(value)]
    assert main(args) == EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (tmp / "out").exists()  # nothing written on a refused input


def test_run_dir_and_model_options_do_not_mix(files, capsys):
    tmp, *_ = files
    assert main(["defend", str(tmp), "--model", "mymodels:net"]) == EXIT_CONFIG
    assert "not both" in capsys.readouterr().err
    assert main(["defend", str(tmp), "--aux", "x.npz"]) == EXIT_CONFIG
    assert "--aux belong to `flain defend --model" in capsys.readouterr().err
    assert main(["defend", "--model", "mymodels:net"]) == EXIT_CONFIG
    assert "needs --initial, --final, --aux, --out" in capsys.readouterr().err


def test_flain_cv_on_a_model_it_cannot_split_is_refused_before_anything_is_written(files, capsys):
    tmp, *_ = files
    (tmp / "skipmodels.py").write_text(MODULE + textwrap.dedent('''
        class Skip(Net):
            def __init__(self):
                super().__init__()
                self.skip = nn.Linear(2 * 4 * 4, 3)

            def forward(self, x):
                h = torch.relu(self.conv(x)).flatten(1)
                return self.fc2(torch.relu(self.fc1(h))) + self.skip(h)
    '''))
    import skipmodels

    torch.manual_seed(0)
    torch.save(skipmodels.Skip().state_dict(), tmp / "s0.pt")
    trained = {k: v + 0.5 * torch.randn(v.shape) for k, v in skipmodels.Skip().state_dict().items()}
    torch.save(trained, tmp / "s.pt")
    model = skipmodels.Skip()
    model.load_state_dict(trained)
    with np.load(tmp / "aux.npz") as data:
        images = data["images"]
    with torch.no_grad():
        labels = model(torch.from_numpy(images).float() / 255).argmax(1).numpy()
    np.savez(tmp / "saux.npz", images=images, labels=labels)
    args = ["defend", "--model", "skipmodels:Skip", "--initial", str(tmp / "s0.pt"), "--final", str(tmp / "s.pt"),
            "--aux", str(tmp / "saux.npz"), "--out", str(tmp / "out")]
    assert main(args + ["--post-defenses", "flain-cv"]) == EXIT_CONFIG
    assert "flain-cv needs a model whose output after layer 'fc1'" in capsys.readouterr().err
    assert not (tmp / "out").exists()
    assert main(args + ["--post-defenses", "flain"]) == 0  # Algorithm 1 scores the whole model instead
    assert json.loads((tmp / "out" / "summary.json").read_text())["post_defenses"]["flain"]["split"] is False
