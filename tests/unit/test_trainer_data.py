"""Reading CSV / JSON Lines and the column rules (features, labels, clear errors)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trainer.data import (
    detect_delimiter,
    labels_from_truth,
    read_csv,
    read_jsonl,
    read_truth,
    select,
)
from trainer.errors import DataError

REPO = Path(__file__).resolve().parents[2]
SKAB = REPO.parent / "shared" / "data" / "skab" / "data"
SKAB_HEADER = (
    "datetime;Accelerometer1RMS;Accelerometer2RMS;Current;Pressure;Temperature;Thermocouple;"
    "Voltage;Volume Flow RateRMS;anomaly;changepoint"
)
# The first rows of SKAB's valve1/0.csv, byte for byte (';' separated, CRLF).
SKAB_SNIPPET = "\r\n".join(
    [
        SKAB_HEADER,
        "2020-03-09 10:14:33;0.0265878;0.0401113;1.3302;0.054711;"
        "79.3366;26.0199;233.062;32.0;0.0;0.0",
        "2020-03-09 10:14:34;0.0261697;0.0404525;1.35399;0.382638;"
        "79.5158;26.0258;236.04;32.0;0.0;0.0",
        "2020-03-09 10:14:35;0.026199;0.0394189;1.54006;0.710565;"
        "79.3756;26.0265;251.38;32.0;0.0;0.0",
        "",
    ]
)
SKAB_SENSORS = (
    "Accelerometer1RMS",
    "Accelerometer2RMS",
    "Current",
    "Pressure",
    "Temperature",
    "Thermocouple",
    "Voltage",
    "Volume Flow RateRMS",
)


def _write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return p


def _skab_select(path: Path) -> tuple[str | None, object]:
    table = read_csv(path)
    ds = select(
        table, None, exclude=("changepoint",), timestamp_column="datetime", label_column="anomaly"
    )
    return table.delimiter, ds


def test_delimiter_detected_on_skab_snippet_with_crlf(tmp_path: Path) -> None:
    delimiter, ds = _skab_select(_write(tmp_path, "skab.csv", SKAB_SNIPPET))
    assert delimiter == ";"
    assert ds.feature_names == SKAB_SENSORS  # type: ignore[attr-defined]
    assert ds.x.shape == (3, 8)  # type: ignore[attr-defined]
    assert ds.x[0, 0] == pytest.approx(0.0265878)  # type: ignore[attr-defined]
    assert ds.labels.tolist() == [0, 0, 0]  # type: ignore[attr-defined]


@pytest.mark.skipif(not SKAB.is_dir(), reason="SKAB data not present beside the repository")
def test_delimiter_detected_on_real_skab_files() -> None:
    for name in ("valve1/0.csv", "other/13.csv"):  # LF and CRLF line endings
        delimiter, ds = _skab_select(SKAB / name)
        assert delimiter == ";"
        assert ds.feature_names == SKAB_SENSORS  # type: ignore[attr-defined]
        assert ds.labels is not None and ds.labels.sum() > 0  # type: ignore[attr-defined]
        assert np.isfinite(ds.x).all()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["a,b,c", "1,2,3"], ","),
        (["a;b;c", "1,5;2,5;3"], ";"),  # decimal commas do not fool it
        (["a\tb", "1\t2"], "\t"),
        (["a|b|c", "1|2|3"], "|"),
        (["only", "1"], ","),
    ],
)
def test_detect_delimiter(lines: list[str], expected: str) -> None:
    assert detect_delimiter(lines) == expected


def test_decimal_comma_and_bom(tmp_path: Path) -> None:
    p = _write(tmp_path, "eu.csv", "\ufeffts;a;b\n1;1,5;2\n2;3,25;4\n")
    ds = select(read_csv(p, decimal=","), None, timestamp_column="ts")
    assert ds.feature_names == ("a", "b")
    assert ds.x.tolist() == [[1.5, 2.0], [3.25, 4.0]]


def test_auto_features_skip_timestamp_device_label_text_and_index(tmp_path: Path) -> None:
    text = (
        ",timestamp,device_id,s1,s2,note,label\n"
        "0,1000,pump-1,1.0,2.0,ok,0\n"
        "1,2000,pump-2,,4.0,hi,1\n"
    )
    ds = select(
        read_csv(_write(tmp_path, "d.csv", text)),
        None,
        timestamp_column="timestamp",
        device_column="device_id",
        label_column="label",
    )
    assert ds.feature_names == ("s1", "s2")  # unnamed pandas index column never a feature
    assert ds.ignored_columns == ("note",)
    assert np.isnan(ds.x[1, 0])  # empty cell = missing
    assert ds.labels.tolist() == [0, 1]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("features", "needle"),
    [
        (["s1", "sensr_2"], "feature column 'sensr_2' is not in"),
        (["s1", "sensr_2"], "did you mean 'sensor_2'?"),
        (["s1", "zzz"], "available columns: 'timestamp', 's1'"),
    ],
)
def test_missing_column_suggests_closest(tmp_path: Path, features: list[str], needle: str) -> None:
    p = _write(tmp_path, "d.csv", "timestamp,s1,sensor_2\n1,1,2\n")
    with pytest.raises(DataError) as e:
        select(read_csv(p), features)
    assert needle in str(e.value)


def test_missing_label_column_suggests_closest(tmp_path: Path) -> None:
    p = _write(tmp_path, "d.csv", "s1,anomaly\n1,0\n")
    with pytest.raises(
        DataError, match=r"label column 'anomally' is not in .*did you mean 'anomaly'"
    ):
        select(read_csv(p), None, label_column="anomally", require_label=True)


def test_non_numeric_value_names_column_and_line(tmp_path: Path) -> None:
    rows = "\n".join(f"{i},{i * 0.5}" for i in range(10))
    p = _write(tmp_path, "d.csv", f"s1,s2\n{rows}\n3,ERR\n")
    with pytest.raises(DataError, match=r"'s2' has 'ERR' at line 12 .*data\.exclude"):
        select(read_csv(p), None)
    with pytest.raises(DataError, match=r"'s2' has 'ERR' at line 12"):
        select(read_csv(p), ["s1", "s2"])


def test_infinite_value_is_refused(tmp_path: Path) -> None:
    p = _write(tmp_path, "d.csv", "s1,s2\n1,2\n3,inf\n")
    with pytest.raises(DataError, match="infinite value at line 3"):
        select(read_csv(p), None)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"", "is empty"),
        (b"\x00\x01\x02binary", "not a text file"),
        (b"a,b\n\xff\xfe,1\n", "not UTF-8"),
        (b"a,b\n1,2,3\n", "line 2 has 3 fields but the header has 2"),
        (b"a,b\n", "no data rows"),
        (b"a,a\n1,2\n", "duplicate column names"),
    ],
)
def test_unreadable_files(tmp_path: Path, content: bytes, needle: str) -> None:
    with pytest.raises(DataError, match=needle):
        read_csv(_write(tmp_path, "d.csv", content))


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_csv(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="is a directory"):
        read_csv(tmp_path)


def test_jsonl_reading_records_and_flat_objects(tmp_path: Path) -> None:
    text = (
        '{"device_id": "d1", "timestamp": 1, "values": {"s0": 1.5, "s1": 2}}\n'
        "\n"
        '{"device_id": "d2", "timestamp": 2, "values": {"s0": null, "s1": 3}, "anomaly": "spike"}\n'
        '{"device_id": "d3", "timestamp": 3, "s0": 4.0, "s1": 5.0, "anomaly": null}\n'
    )
    table = read_jsonl(_write(tmp_path, "r.jsonl", text))
    ds = select(
        table, None, timestamp_column="timestamp", device_column="device_id", label_column="anomaly"
    )
    assert ds.feature_names == ("s0", "s1")
    assert np.isnan(ds.x[1, 0]) and ds.x[2].tolist() == [4.0, 5.0]
    assert ds.labels.tolist() == [0, 1, 0]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('{"s0": NaN}', "line 1 is not valid JSON"),
        ("[1, 2]", "is a JSON list, not an object"),
        ('{"s0": 1', "not valid JSON"),
    ],
)
def test_bad_jsonl_lines(tmp_path: Path, line: str, needle: str) -> None:
    with pytest.raises(DataError, match=needle):
        read_jsonl(_write(tmp_path, "r.jsonl", line + "\n"))


def test_booleans_and_numeric_strings_are_not_numbers_in_json(tmp_path: Path) -> None:
    text = '{"s0": 1.0, "s1": true}\n{"s0": 2.0, "s1": false}\n'
    with pytest.raises(DataError, match="'s1' has True at line 1"):
        select(read_jsonl(_write(tmp_path, "r.jsonl", text)), ["s0", "s1"])


def test_bad_labels_are_refused(tmp_path: Path) -> None:
    p = _write(tmp_path, "d.csv", "s1,anomaly\n1,0\n2,2\n")
    with pytest.raises(DataError, match="labels must be 0"):
        select(read_csv(p), None, label_column="anomaly")


def test_truth_file_labels(tmp_path: Path) -> None:
    text = (
        '{"device_id": "d1", "timestamp": 1000, "values": {"s0": 1.0}}\n'
        '{"device_id": "d2", "timestamp": 1000, "values": {"s0": 9.0}}\n'
    )
    table = read_jsonl(_write(tmp_path, "r.jsonl", text))
    truth = read_truth(
        _write(tmp_path, "t.jsonl", '{"device_id": "d2", "timestamp_ms": 1000, "kind": "spike"}\n')
    )
    assert labels_from_truth(table, truth, "device_id", "timestamp").tolist() == [0, 1]
    with pytest.raises(DataError, match="not a"):
        read_truth(_write(tmp_path, "bad.jsonl", '{"device": "d2"}\n'))


def test_row_slice_keeps_true_line_numbers(tmp_path: Path) -> None:
    p = _write(tmp_path, "d.csv", "s1\n" + "\n".join(str(i) for i in range(10)) + "\nbad\n")
    table = read_csv(p).sliced((5, None))
    assert table.n_rows == 6
    with pytest.raises(DataError, match="line 12"):
        select(table, ["s1"])


def test_fast_and_careful_csv_paths_agree(tmp_path: Path) -> None:
    # Plain files take numpy's C reader; a quote anywhere forces the csv-module path.
    # Both must give the same table.
    rng = np.random.default_rng(0)
    rows = [
        f"{1000 + i},pump-{i % 3},{a:.6g},{b:.6g},{i % 2}"
        for i, (a, b) in enumerate(rng.normal(size=(300, 2)))
    ]
    plain = _write(
        tmp_path, "plain.csv", "timestamp,device_id,s1,s2,label\r\n" + "\r\n".join(rows) + "\r\n"
    )
    quoted = _write(
        tmp_path, "quoted.csv", 'timestamp,device_id,"s1",s2,label\r\n' + "\r\n".join(rows) + "\r\n"
    )
    fast, careful = read_csv(plain), read_csv(quoted)
    assert isinstance(fast.cells["s1"], np.ndarray) and isinstance(careful.cells["s1"], list)
    a, b = (
        select(
            t, None, timestamp_column="timestamp", device_column="device_id", label_column="label"
        )
        for t in (fast, careful)
    )
    assert a.feature_names == b.feature_names == ("s1", "s2")
    assert np.array_equal(a.x, b.x) and np.array_equal(a.labels, b.labels)  # type: ignore[arg-type]
    assert list(fast.cells["device_id"]) == list(careful.cells["device_id"])
