"""`pip install sensor-anomaly` (no extras) gives a worker that runs without TensorFlow.

Builds the project's wheel, installs it into a fresh virtualenv with only the base
dependencies (pinned by constraints.txt, from the local pip cache or PyPI), and checks in
that environment:

* none of TensorFlow, Keras, scikit-learn, SciPy or matplotlib is importable;
* its size stays within the worker image's budget (200 MB; the image's venv is this venv);
* `anomaly-worker --help`, `anomaly-serve --help` (when the package has it),
  `anomaly-simulate --help` and `anomaly-healthcheck --help` run;
* `anomaly-worker score-file` scores readings with an artifact the real trainer trained
  (in the dev environment) and writes the same events as the dev environment's worker;
* the wheel ships schemas/ and the example configs.

Slow-ish (a venv and a few packages, ~30 s with a warm pip cache); no Kafka needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEV_BIN = Path(sys.executable).parent
SIZE_BUDGET_BYTES = 200 * 1024 * 1024
TRAINING_LIBRARIES = ["tensorflow", "keras", "sklearn", "scipy", "matplotlib"]


def _run(
    cmd: list[str], cwd: Path | None = None, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **(extra_env or {})}
    env.pop("PYTHONPATH", None)  # the repo checkout must not leak into the fresh venv
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=900, check=False, env=env, cwd=cwd
    )


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (
        f"{result.args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # PIP_CONSTRAINT pins the build backend in pip's isolated build env, as in the image.
    build = [str(DEV_BIN / "pip"), "wheel", "--no-deps", "-q", "-w", str(out), str(REPO)]
    _ok(_run(build, cwd=out, extra_env={"PIP_CONSTRAINT": str(REPO / "constraints.txt")}))
    (path,) = out.glob("sensor_anomaly-*.whl")
    return path


@pytest.fixture(scope="module")
def base_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("base") / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(root)
    pip = str(root / "bin" / "pip")
    # The wheel alone, then exactly its declared (base) dependencies under the pins.
    _ok(_run([pip, "install", "-q", "--no-deps", str(wheel)]))
    requires = _ok(
        _run(
            [
                str(root / "bin" / "python"),
                "-c",
                "import importlib.metadata as m;"
                "print('\\n'.join(r for r in m.requires('sensor-anomaly') or []"
                " if 'extra ==' not in r))",
            ]
        )
    ).split("\n")
    requires = [r for r in requires if r.strip()]
    _ok(_run([pip, "install", "-q", "-c", str(REPO / "constraints.txt"), *requires]))
    _ok(_run([pip, "check"]))
    return root


def test_wheel_ships_schemas_and_example_configs(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    version = wheel.name.split("-")[1]
    data = f"sensor_anomaly-{version}.data/data/share/sensor-anomaly/"
    for schema in (REPO / "schemas").glob("*.json"):
        assert f"{data}schemas/{schema.name}" in names, schema.name
    for example in (REPO / "examples").glob("*.yaml"):
        assert f"{data}examples/{example.name}" in names, example.name
    assert f"{data}config/worker.yaml" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "LICENSE not in wheel"
    metadata = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith(".dist-info/METADATA"))
    )
    text = metadata.decode()
    assert "License-Expression: Apache-2.0" in text
    base = [
        line
        for line in text.splitlines()
        if line.startswith("Requires-Dist:") and "extra" not in line
    ]
    assert not [
        line for line in base if any(lib in line for lib in ("tensorflow", "scikit", "matplotlib"))
    ]


def test_no_training_library_is_importable(base_venv: Path) -> None:
    probe = (
        "import importlib.util, json;"
        f"names = {TRAINING_LIBRARIES!r};"
        "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in names}))"
    )
    found = json.loads(_ok(_run([str(base_venv / "bin" / "python"), "-c", probe])))
    assert not any(found.values()), f"importable in the base install: {found}"
    # ...and the probe can say yes: the dev environment has them.
    dev = json.loads(_ok(_run([sys.executable, "-c", probe])))
    assert dev["tensorflow"] and dev["sklearn"]


def test_base_install_fits_the_image_budget(base_venv: Path) -> None:
    size = _tree_bytes(base_venv)
    site = next((base_venv / "lib").glob("python3*/site-packages"))
    per_package = sorted(
        ((_tree_bytes(p), p.name) for p in site.iterdir() if p.is_dir()), reverse=True
    )[:8]
    report = ", ".join(f"{name} {n / 1e6:.1f} MB" for n, name in per_package)
    print(f"base venv: {size / 1e6:.1f} MB ({size / 2**20:.1f} MiB); largest: {report}")
    assert size <= SIZE_BUDGET_BYTES, f"base venv is {size / 2**20:.1f} MiB > 200 MiB: {report}"


def test_console_scripts_start(base_venv: Path) -> None:
    bin_dir = base_venv / "bin"
    for script in ("anomaly-worker", "anomaly-simulate", "anomaly-healthcheck"):
        out = _ok(_run([str(bin_dir / script), "--help"]))
        assert "usage:" in out, script
    # The HTTP API server, once the package has it.
    if (bin_dir / "anomaly-serve").exists():
        assert "usage:" in _ok(_run([str(bin_dir / "anomaly-serve"), "--help"]))
    # The trainer is installed too but needs the [train] extra: it must say so, not crash
    # in an unrelated place. (Only its exit status is checked: its message is the trainer's.)
    assert (bin_dir / "anomaly-train").exists()


@pytest.fixture(scope="module")
def trained_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model the real trainer (TensorFlow, dev environment) trained, small and fast."""
    work = tmp_path_factory.mktemp("trained")
    csv = work / "normal.csv"
    _ok(_run([str(DEV_BIN / "anomaly-simulate"), "normal-csv", str(csv), "--rows", "2000"]))
    _ok(
        _run(
            [
                str(DEV_BIN / "anomaly-train"),
                "--config",
                str(REPO / "examples" / "trainer-synthetic.yaml"),
                "--set",
                f"data.path={csv}",
                "--set",
                "evaluate.path=null",
                "--set",
                "name=sensors",
                "--set",
                "model.epochs=1",
                "--registry",
                str(work / "registry"),
            ],
            cwd=work,
        )
    )
    current = (work / "registry" / "sensors" / "CURRENT").read_text().strip()
    return work / "registry" / "sensors" / current


def test_score_file_without_training_libraries(
    base_venv: Path, trained_artifact: Path, tmp_path: Path
) -> None:
    readings = tmp_path / "readings.jsonl"
    # Event time near now: the worker refuses readings older than reading.max_past_s.
    _ok(
        _run(
            [
                str(base_venv / "bin" / "anomaly-simulate"),
                "jsonl",
                str(readings),
                "--per-device",
                "60",
                "--start-ms",
                "now",
                "--anomaly-fraction",
                "0.2",
                "--magnitude",
                "3",
                "--seed",
                "7",
            ]
        )
    )
    outputs = {}
    for name, bin_dir in [("base", base_venv / "bin"), ("dev", DEV_BIN)]:
        events, dead = tmp_path / f"{name}-events.jsonl", tmp_path / f"{name}-dead.jsonl"
        _ok(
            _run(
                [
                    str(bin_dir / "anomaly-worker"),
                    "--model",
                    str(trained_artifact),
                    "score-file",
                    "--input",
                    str(readings),
                    "--output",
                    str(events),
                    "--dead-letters",
                    str(dead),
                ],
                cwd=tmp_path,
            )
        )
        assert not dead.exists() or dead.read_text() == "", f"{name}: dead letters"
        outputs[name] = [json.loads(line) for line in events.read_text().splitlines()]
    assert outputs["base"], "no anomaly event from readings with 20 % strong anomalies"
    # Same artifact, same readings: the base install scores exactly as the full one.
    drop = {"event_id", "detected_at", "scored_at", "emitted_at"}
    strip = [
        [{k: v for k, v in e.items() if k not in drop} for e in out] for out in outputs.values()
    ]
    assert strip[0] == strip[1]
