"""Real-export ergonomics: one call fits one model per entity; messy columns are dropped and
reported; chronological holdout by timestamp or duration; the shape adapts to the input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from detector import load
from trainer import data as datalib
from trainer.config import from_mapping
from trainer.errors import DataError
from trainer.pipeline import TrainResult, auto_shape, resolve_shape, split_rows, train_many


def _export(path: Path, units: tuple[str, ...] = ("u1", "u2"), rows: int = 240) -> None:
    """A messy export: an entity column, a text column, a constant, an all-missing column,
    missing cells, and ISO timestamps."""
    rng = np.random.default_rng(0)
    lines = ["time,unit,a,b,c,d,flat,empty,note"]
    for u in units:
        z = rng.normal(size=(rows, 2))
        for i in range(rows):
            a, b = z[i]
            cells = [f"{a:.4f}", f"{b:.4f}", f"{a + b:.4f}", f"{a - b:.4f}"]
            if i % 50 == 7:
                cells[1] = ""
            t = f"2026-01-01T00:{i // 60:02d}:{i % 60:02d}Z"
            lines.append(",".join([t, u, *cells, "5", "", "ok" if i % 3 else "check"]))
    path.write_text("\n".join(lines) + "\n")


def _cfg(tmp: Path, **data: Any) -> Any:
    return from_mapping(
        {
            "name": "plant",
            "registry": str(tmp / "reg"),
            "data": {"path": str(tmp / "export.csv"), "timestamp_column": "time", **data},
            "model": {"epochs": 3, "hidden": [8], "code_size": 2, "batch_size": 64},
            "report": {"plots": False},
        }
    )


def test_one_model_per_entity_column_with_messy_columns(tmp_path: Path) -> None:
    _export(tmp_path / "export.csv")
    lines: list[str] = []
    out = train_many(_cfg(tmp_path, entity_column="unit"), lines.append)
    assert [e for e, _ in out] == ["u1", "u2"]
    for _, res in out:
        assert isinstance(res, TrainResult) and res.artifact is not None
        det = load(res.artifact)
        assert det.feature_names == ("a", "b", "c", "d")  # no unit, note, flat, empty
        assert [(c.name, c.value) for c in det.constants] == [("flat", 5.0)]
        data = res.metrics["data"]
        assert data["dropped_constant"] == ["flat"] and data["dropped_all_missing"] == ["empty"]
        assert data["ignored_columns"] == ["note"]
        assert data["imputed_values"] == {"b": 5} and data["time_order"] == "timestamp"
        assert res.dataset.n_rows == 240  # its own entity's rows only
        # 3 epochs cannot early-stop with patience 10: the report says training hit the cap.
        assert res.metrics["training"]["stopped_at_cap"] is True
        assert any("epoch cap" in w for w in res.metrics["warnings"])
        assert "## Warnings" in res.report_files["report/report.md"].decode()
    assert det.info.name == "plant-u2"
    warnings = [ln for ln in lines if ln.startswith("warning: ")]
    assert any("constant column(s), watched" in ln and "flat=5" in ln for ln in warnings)
    assert any("all-missing column(s)" in ln and "empty" in ln for ln in warnings)
    assert any("5 missing value(s)" in ln for ln in warnings)
    assert any("non-numeric column(s): note" in ln for ln in warnings)


def test_one_model_per_file_of_a_folder_and_errors_stay_per_entity(tmp_path: Path) -> None:
    folder = tmp_path / "units"
    folder.mkdir()
    _export(folder / "pump-a.csv", ("a",))
    _export(folder / "pump-b.csv", ("b",), rows=12)  # too few rows: a user error for b only
    out = dict(train_many(_cfg(tmp_path, path=str(folder), exclude=["unit"], per_file=True)))
    assert isinstance(out["pump-a"], TrainResult)
    assert isinstance(out["pump-b"], DataError) and "normal rows" in str(out["pump-b"])


def test_chronological_split_by_timestamp_rows_and_duration(tmp_path: Path) -> None:
    _export(tmp_path / "export.csv", ("u1",), rows=300)
    # Shuffle the file's rows: the holdout must still be the latest readings by timestamp.
    text = (tmp_path / "export.csv").read_text().splitlines()
    body = text[1:]
    order = np.random.default_rng(1).permutation(len(body))
    (tmp_path / "export.csv").write_text("\n".join([text[0], *(body[i] for i in order)]) + "\n")
    cfg = _cfg(tmp_path, exclude=["unit"])
    table = datalib.read_csv(tmp_path / "export.csv")
    ds = datalib.select(table, None, exclude=["unit"], timestamp_column="time")
    assert ds.times_ms is not None
    s = split_rows(ds, cfg)
    assert ds.times_ms[s.holdout].min() > ds.times_ms[s.validation].max()
    assert ds.times_ms[s.validation].min() > ds.times_ms[s.train].max()
    assert (len(s.validation), len(s.holdout)) == (45, 45)
    doc = {"validation": 30, "holdout": "60s"}
    s2 = split_rows(ds, from_mapping({**_plain(cfg), "split": doc}))
    assert len(s2.validation) == 30 and len(s2.holdout) == 60
    with pytest.raises(DataError, match=r"duration but split\.shuffle"):
        split_rows(ds, from_mapping({**_plain(cfg), "split": {**doc, "shuffle": True}}))


def _plain(cfg: Any) -> dict[str, Any]:
    from trainer.config import to_mapping

    return to_mapping(cfg)


def test_auto_shape_is_always_a_bottleneck_and_forced_width_warns() -> None:
    for n in range(2, 400):
        hidden, code = auto_shape(n)
        assert code < n and code < min(hidden)
    cfg = from_mapping({"data": {"path": "x.csv"}, "model": {"code_size": 6, "hidden": [8]}})
    hp, notes = resolve_shape(cfg.model, 6)
    assert hp.code_size == 6 and notes and "not narrower than the 6 model inputs" in notes[0]
    hp, notes = resolve_shape(from_mapping({"data": {"path": "x.csv"}}).model, 6)
    assert (hp.hidden, hp.code_size, notes) == ((8, 4), 2, [])
