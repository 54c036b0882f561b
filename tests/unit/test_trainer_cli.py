"""``anomaly-train``: every bad input gives exit 2, one ``error: ...; fix`` line, and leaves the
previous artifact byte-for-byte intact; evaluate and show work on saved artifacts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainer.cli import main

REPO = Path(__file__).resolve().parents[2]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _normal_rows(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 2))
    mix = np.array([[1.0, 0.2, 0.7, -0.5, 0.3], [0.1, 1.0, -0.4, 0.6, 0.9]])
    return z @ mix * 5 + 20 + rng.normal(0, 0.2, size=(n, 5))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    x = _normal_rows(900)
    header = "timestamp,device_id,s1,s2,s3,s4,s5,anomaly"
    lines = [header] + [
        f"{1000 * i},d{i % 3}," + ",".join(f"{v:.4f}" for v in r) + ",0" for i, r in enumerate(x)
    ]
    (d / "normal.csv").write_text("\n".join(lines) + "\n")
    xe = _normal_rows(300, seed=1)
    labels = np.zeros(300, dtype=int)
    labels[::10] = 1
    xe[labels == 1, 2] += 25  # break the correlation structure on one sensor
    lines = [header] + [
        f"{1000 * i},d0," + ",".join(f"{v:.4f}" for v in r) + f",{y}"
        for i, (r, y) in enumerate(zip(xe, labels, strict=True))
    ]
    (d / "eval.csv").write_text("\n".join(lines) + "\n")
    (d / "config.yaml").write_text(
        f"""
name: pumps
registry: {d / "registry"}
data:
  path: {d / "normal.csv"}
  label_column: anomaly
model:
  hidden: [8]
  code_size: 2
  epochs: 4
  batch_size: 64
  learning_rate: 0.01
evaluate:
  path: {d / "eval.csv"}
"""
    )
    return d


@pytest.fixture(scope="module")
def v1(work: Path) -> Path:
    assert main(["--config", str(work / "config.yaml"), "--quiet"]) == 0
    return work / "registry" / "pumps" / "v0001"


def _bad(work: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    before = _snapshot(work / "registry")
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "; " in lines[0], err
    assert "Traceback" not in err
    # The previous artifact and the CURRENT pointer are untouched, nothing was added.
    assert _snapshot(work / "registry") == before
    return lines[0]


def _write(work: Path, name: str, text: str) -> str:
    p = work / name
    p.write_text(text)
    return str(p)


NOLABEL = ("--set", "data.label_column=null")
BAD_TRAINING = [
    # (extra argv builder, expected fragment)
    (lambda w: ["--set", "data.features=[s1, sx2]"], "feature column 'sx2' is not in"),
    (lambda w: ["--set", "data.features=[s1, sx2]"], "did you mean 's2'?"),
    (lambda w: ["--set", "data.label_column=anomally"], "did you mean 'anomaly'?"),
    (lambda w: ["--set", "data.features=[s1, anomaly]"], "remove 'anomaly' from data.features"),
    (lambda w: ["--set", "data.features=[s1, timestamp]"], "remove 'timestamp' from data.features"),
    (
        lambda w: [
            *NOLABEL,
            "--set",
            "data.path=" + _write(w, "text.csv", "s1,s2\n" + "1,2\n" * 50 + "1,oops\n"),
        ],
        "'s2' has 'oops' at line 52",
    ),
    (
        lambda w: [
            *NOLABEL,
            "--set",
            "data.path=" + _write(w, "few.csv", "s1,s2\n" + "1,2\n3,4\n" * 10),
        ],
        "only 20 normal rows",
    ),
    (lambda w: ["--set", "data.path=" + str(w / "missing.csv")], "does not exist"),
    (lambda w: ["--set", "data.path=" + str(w)], "cannot tell the format"),
    (lambda w: ["--set", "data.format=csv", "--set", "data.path=" + str(w)], "is a directory"),
    (lambda w: ["--set", "data.path=" + _write(w, "empty.csv", "")], "is empty"),
    (
        lambda w: [
            *NOLABEL,
            "--set",
            "preprocess.constant_columns=error",  # drop is the default (issue 11)
            "--set",
            "data.path="
            + _write(w, "flat.csv", "s1,s2\n" + "".join(f"{i},5\n" for i in range(200))),
        ],
        "constant: ['s2']",
    ),
    (lambda w: ["--set", "model.epoch=3"], "did you mean model.epochs?"),
    (lambda w: ["--set", "model.activation=softmax"], "use one of 'relu'"),
    (lambda w: ["--set", "model.epochs=-1"], "out of range"),
    (lambda w: ["--set", "threshold.k"], "is not key=value"),
    (
        lambda w: ["--set", "evaluate.path=" + _write(w, "e.csv", "s1,s2,anomaly\n1,2,0\n")],
        "feature column 's3' is not in",
    ),
    (lambda w: ["--set", "evaluate.label_column=label"], "label column 'label' is not in"),
    (lambda w: ["--set", "name=../../etc"], "not a valid model name"),
    (lambda w: ["--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize(("extra", "needle"), BAD_TRAINING)
def test_bad_training_input_is_one_line_exit_2_and_keeps_v1(
    work: Path, v1: Path, capsys: pytest.CaptureFixture[str], extra: object, needle: str
) -> None:
    argv = ["--config", str(work / "config.yaml"), *extra(work)]  # type: ignore[operator]
    line = _bad(work, capsys, argv)
    assert needle in line
    assert (v1.parent / "CURRENT").read_text().strip() == "v0001"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("data: [unclosed\n", "is not valid YAML at line"),
        (
            "data:\n  path: a.csv\nmodl:\n  epochs: 3\n",
            "unknown config key modl; did you mean model?",
        ),
    ],
)
def test_invalid_config_file(
    work: Path, v1: Path, capsys: pytest.CaptureFixture[str], text: str, needle: str
) -> None:
    assert needle in _bad(work, capsys, ["--config", _write(work, "bad.yaml", text)])


def test_missing_config_argument(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "the following arguments are required: --config" in _bad(work, capsys, [])


def test_success_prints_artifact_and_metrics(
    work: Path, v1: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["--config", str(work / "config.yaml"), "--set", "name=pumps2"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert "saved " in out and "pumps2/v0001" in out and "F1 " in out
    assert "epoch 1/4" in err and "threshold" in err  # progress on stderr
    assert "━" not in err and "ETA" not in err  # no Keras progress bars


def test_evaluate_command(work: Path, v1: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--artifact", str(v1), "--data", str(work / "eval.csv")]) == 0
    out, _ = capsys.readouterr()
    for key in ("precision", "recall", "F1", "ROC-AUC", "PR-AUC", "FAR", "confusion"):
        assert key in out
    assert (
        main(
            [
                "evaluate",
                "--artifact",
                str(work / "registry"),
                "--name",
                "pumps",
                "--data",
                str(work / "eval.csv"),
                "--json",
            ]
        )
        == 0
    )
    m = json.loads(capsys.readouterr().out)
    assert m["version"] == "v0001" and m["n"] == 300 and m["anomalous"] == 30
    assert m["roc_auc"] > 0.9


def test_evaluate_refuses_tampered_artifact(
    work: Path, v1: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import shutil

    copy = tmp_path / "v0001"
    shutil.copytree(v1, copy)
    (copy / "detector.json").write_text((copy / "detector.json").read_text().replace('"k"', '"k" '))
    with (copy / "weights.npz").open("ab") as f:
        f.write(b"\0")
    rc = main(["evaluate", "--artifact", str(copy), "--data", str(work / "eval.csv")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "checksum mismatch" in err[0]


def test_evaluate_without_label_column(
    work: Path, v1: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _write(work, "nolabel.csv", "s1,s2,s3,s4,s5\n1,2,3,4,5\n")
    line = _bad(work, capsys, ["evaluate", "--artifact", str(v1), "--data", data])
    assert "label column 'anomaly' is not in" in line


def test_show_command(work: Path, v1: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", "--registry", str(work / "registry"), "--name", "pumps"]) == 0
    out = capsys.readouterr().out
    assert "current v0001" in out and "* v0001" in out and "threshold" in out
    assert main(["show", "--registry", str(work / "registry"), "--name", "pumps", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["current"] == "v0001" and doc["versions"][0]["status"] == "ok"
    line = _bad(work, capsys, ["show", "--registry", str(work / "registry"), "--name", "pump"])
    assert "no versions of model 'pump'" in line


def test_help_and_real_entry_point(tmp_path: Path) -> None:
    # The installed console script, as a user runs it: help works, and a user error is one
    # line on the process's stderr (no TensorFlow chatter, no traceback).
    exe = Path(sys.executable).with_name("anomaly-train")
    help_out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "--config" in help_out and "evaluate" in help_out and "show" in help_out
    res = subprocess.run(
        [exe, "--config", str(tmp_path / "nope.yaml")], capture_output=True, text=True, check=False
    )
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        f"error: config file {tmp_path / 'nope.yaml'} does not exist; check the --config path"
    ]
