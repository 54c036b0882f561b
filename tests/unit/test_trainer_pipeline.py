"""End-to-end training on small synthetic fleets (the project's simulator): threshold
semantics, detection quality, reproducibility, reports and artifacts."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from detector import load, load_keras
from simulator.fleet import FleetSpec, feature_names, stream, write_normal_csv
from trainer.config import TrainConfig, from_mapping
from trainer.errors import DataError
from trainer.pipeline import TrainResult, train

SPEC = FleetSpec(devices=4, sensors=16, seed=3)
FEATURES = feature_names(SPEC)


def _eval_csv(path: Path, per_device: int = 400, fraction: float = 0.1) -> None:
    """Labelled readings with injected anomalies of every kind, as CSV with a label column."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["timestamp", "device_id", *FEATURES, "anomaly"])
        for r in stream(SPEC, per_device, anomaly_fraction=fraction):
            w.writerow(
                [
                    r.timestamp_ms,
                    r.device_id,
                    *(r.values[n] for n in FEATURES),
                    int(r.anomaly is not None),
                ]
            )


def _config(tmp: Path, **sections: Any) -> TrainConfig:
    doc: dict[str, Any] = {
        "name": "fleet",
        "registry": str(tmp / "registry"),
        "data": {"path": str(tmp / "normal.csv")},
        "model": {
            "hidden": [32, 16],
            "code_size": 4,
            "epochs": 12,
            "batch_size": 128,
            "learning_rate": 0.003,
            "patience": 3,
            "seed": 7,
        },
    }
    for key, value in sections.items():
        doc[key] = doc.get(key, {}) | value if isinstance(value, dict) else value
    return from_mapping(doc)


@pytest.fixture(scope="module")
def fleet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fleet")
    write_normal_csv(d / "normal.csv", SPEC, 4000)
    _eval_csv(d / "eval.csv")
    return d


@pytest.fixture(scope="module")
def trained(fleet_dir: Path) -> tuple[TrainConfig, TrainResult]:
    cfg = _config(
        fleet_dir,
        evaluate={"path": str(fleet_dir / "eval.csv"), "label_column": "anomaly"},
        report={"dir": str(fleet_dir / "report-copy")},
    )
    lines: list[str] = []
    result = train(cfg, lines.append)
    assert any(
        re.match(r"epoch 1/12 +loss [0-9.]+ +val_loss [0-9.]+ +[0-9.]+ s", ln) for ln in lines
    )
    return cfg, result


def test_threshold_is_mean_plus_k_std_of_holdout_errors(
    trained: tuple[TrainConfig, TrainResult],
) -> None:
    _, res = trained
    ds, sp = res.dataset, res.splits
    # Independently of Detector.score: scaler refitted on the train split with numpy, the
    # Keras model itself, numpy MSE, population std.
    x_train, x_hold = ds.x[sp.train], ds.x[sp.holdout]
    lo, hi = x_train.min(axis=0), x_train.max(axis=0)
    z_hold = ((x_hold - lo) / (hi - lo)).astype(np.float32)
    recon = res.keras_model.predict(z_hold, verbose=0)
    errors = ((z_hold - recon) ** 2).mean(axis=1)
    expected = errors.mean() + 2.0 * errors.std()
    t = res.detector.threshold
    assert (t.method, t.param, t.n) == ("mean_k_std", 2.0, len(sp.holdout))
    assert t.value == pytest.approx(expected, rel=1e-4)
    fe = (z_hold - recon) ** 2
    np.testing.assert_allclose(
        res.detector.feature_error_mean, fe.mean(axis=0), rtol=1e-3, atol=1e-9
    )
    np.testing.assert_allclose(res.detector.feature_error_std, fe.std(axis=0), rtol=1e-3, atol=1e-9)


def test_holdout_is_disjoint_from_training_and_validation(
    trained: tuple[TrainConfig, TrainResult],
) -> None:
    _, res = trained
    sp = res.splits
    sets = [set(sp.train.tolist()), set(sp.validation.tolist()), set(sp.holdout.tolist())]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert sum(map(len, sets)) == res.dataset.n_rows == 4000
    assert (len(sp.validation), len(sp.holdout)) == (600, 600)
    m = res.metrics["splits"]
    assert (m["train"], m["validation"], m["holdout"]) == (2800, 600, 600)


def test_saved_artifact_scores_identically(trained: tuple[TrainConfig, TrainResult]) -> None:
    _, res = trained
    assert res.artifact is not None and res.artifact.name == "v0001"
    loaded = load(res.artifact)
    x = res.dataset.x[:500]
    assert np.array_equal(loaded.score(x).score, res.detector.score(x).score)
    assert loaded.threshold == res.detector.threshold
    # The stored Keras model is the same model.
    km = load_keras(res.artifact)
    z = res.detector.preprocessor.transform(x)
    np.testing.assert_allclose(km.predict(z, verbose=0), res.detector.network.forward(z), atol=1e-5)


def test_injected_anomalies_score_higher_than_normal(
    fleet_dir: Path, trained: tuple[TrainConfig, TrainResult]
) -> None:
    _, res = trained
    rows = list(csv.DictReader((fleet_dir / "eval.csv").open()))
    x = np.array([[float(r[n]) for n in FEATURES] for r in rows])
    y = np.array([int(r["anomaly"]) for r in rows])
    assert 0.05 < y.mean() < 0.2
    auc = roc_auc_score(y, res.detector.score(x).score)
    assert auc > 0.95
    ev = res.metrics["evaluation"]
    assert ev["roc_auc"] == pytest.approx(auc)
    assert ev["recall"] > 0.8
    c = ev["confusion"]
    assert c["tp"] + c["fn"] == y.sum() and sum(c.values()) == len(y)


def test_report_in_artifact_and_copied(
    fleet_dir: Path, trained: tuple[TrainConfig, TrainResult]
) -> None:
    cfg, res = trained
    assert res.artifact is not None
    report = res.artifact / "report"
    md = (report / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert set(images) == {
        "loss.png",
        "errors.png",
        "latent.png",
        "pr_curve.png",
        "feature_errors.png",
    }
    import matplotlib.image as mpimg

    for name in images:
        blob = (report / name).read_bytes()
        assert blob.startswith(b"\x89PNG") and len(blob) > 10_000
        assert mpimg.imread(io.BytesIO(blob), format="png").shape[0] > 300
    metrics = json.loads((report / "metrics.json").read_text())
    for key in ("mse", "rmse", "mae"):
        assert metrics["holdout"][key] > 0
    for key in ("precision", "recall", "f1", "roc_auc", "pr_auc", "confusion", "tradeoff"):
        assert key in metrics["evaluation"]
    assert metrics["threshold"]["value"] == res.detector.threshold.value
    # The effective config is stored and reproduces the run's config.
    assert from_mapping(yaml.safe_load((res.artifact / "config.yaml").read_text())) == cfg
    copy = fleet_dir / "report-copy"
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in report.iterdir())
    assert (copy / "metrics.json").read_bytes() == (report / "metrics.json").read_bytes()


def _weights(res: TrainResult) -> list[np.ndarray]:
    return [w for layer in res.detector.network.layers for w in (layer.kernel, layer.bias)]


def test_same_seed_gives_identical_weights(fleet_dir: Path) -> None:
    small = {"epochs": 3, "dropout": 0.1, "hidden": [16], "code_size": 4}
    a = train(_config(fleet_dir, model=small, data={"rows": [0, 1500]}), save=False)
    b = train(_config(fleet_dir, model=small, data={"rows": [0, 1500]}), save=False)
    c = train(_config(fleet_dir, model=small | {"seed": 8}, data={"rows": [0, 1500]}), save=False)
    assert all(np.array_equal(x, y) for x, y in zip(_weights(a), _weights(b), strict=True))
    assert a.detector.threshold == b.detector.threshold
    assert not all(np.array_equal(x, y) for x, y in zip(_weights(a), _weights(c), strict=True))


def test_grid_search_selects_lowest_validation_loss(fleet_dir: Path) -> None:
    cfg = _config(
        fleet_dir,
        data={"rows": [0, 1500]},
        model={"epochs": 3, "hidden": [16]},
        tune={"method": "grid", "code_size": [2, 8], "learning_rate": [0.003]},
    )
    lines: list[str] = []
    res = train(cfg, lines.append, save=False)
    assert len(res.trials) == 2
    best = min(res.trials, key=lambda t: t.val_loss)
    assert res.metrics["tuning"]["best_trial"] == best.index
    assert res.metrics["model"]["hyperparameters"]["code_size"] == best.params["code_size"]
    assert sum(ln.startswith("trial ") and "-> val_loss" in ln for ln in lines) == 2
    md = res.report_files["report/report.md"].decode()
    assert "## Hyperparameter search" in md and md.count("| 2") >= 1


def test_random_search_draws_distinct_combinations(fleet_dir: Path) -> None:
    from trainer.tune import candidates

    cfg = _config(
        fleet_dir,
        tune={"method": "random", "trials": 3, "code_size": [2, 3, 4], "batch_size": [64, 128]},
    )
    picked = candidates(cfg.model, cfg.tune)
    assert len(picked) == 3
    assert len({(p.code_size, p.batch_size) for p in picked}) == 3
    assert picked == candidates(cfg.model, cfg.tune)  # seeded


def test_constant_column_is_an_error_or_dropped(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 4))
    lines = ["a,b,c,d,flat"] + [",".join(f"{v:.5f}" for v in row) + ",3.0" for row in x]
    (tmp_path / "normal.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"constant: \['flat'\].*constant_columns: drop"):
        train(_config(tmp_path, preprocess={"constant_columns": "error"}), save=False)
    # Issue 11: drop is the default; the dropped constant is watched with its value.
    res = train(_config(tmp_path, model={"epochs": 2, "hidden": [8], "code_size": 2}), save=False)
    assert res.detector.feature_names == ("a", "b", "c", "d")
    assert res.metrics["data"]["dropped_columns"] == ["flat"]
    assert [(c.name, c.value) for c in res.detector.constants] == [("flat", 3.0)]


def test_standard_scaler_missing_values_and_percentile(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(size=(800, 2))
    x = np.column_stack([z[:, 0], z[:, 1], z[:, 0] + z[:, 1], z[:, 0] - z[:, 1]]) * 10 + 50
    x[rng.random(x.shape) < 0.03] = np.nan
    rows = [",".join("" if np.isnan(v) else f"{v:.4f}" for v in r) for r in x]
    (tmp_path / "normal.csv").write_text("a,b,c,d\n" + "\n".join(rows) + "\n")
    cfg = _config(
        tmp_path,
        preprocess={"scaler": "standard", "impute": "median"},
        model={"epochs": 3, "hidden": [8], "code_size": 2},
        threshold={"method": "percentile", "percentile": 99.0},
    )
    res = train(cfg, save=False)
    assert res.detector.preprocessor.kind == "standard"
    assert res.detector.network.layers[-1].activation == "linear"
    t = res.detector.threshold
    hold = res.detector.score(res.dataset.x[res.splits.holdout]).score
    assert t.method == "percentile" and t.value == pytest.approx(np.percentile(hold, 99))
    assert np.isfinite(res.detector.score(x).score).all()  # NaNs imputed, never propagated
