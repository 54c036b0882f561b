"""``anomaly-train``: train, evaluate and inspect anomaly-detector artifacts.

Exit status: 0 success; 2 a user error (bad config, data, arguments, artifact), printed as
one line ``error: <what is wrong>; <how to fix>`` on stderr, with no traceback and nothing
written to the registry; 130 interrupted. Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml

from detector.errors import DetectorError
from trainer.errors import TrainerError

PROG = "anomaly-train"
COMMANDS = ("train", "evaluate", "show")
EXIT_USAGE = 2

_EPILOG = f"""\
commands:
  {PROG} [train] --config FILE ...   train a detector (the default command)
  {PROG} evaluate --artifact DIR --data FILE
                                     score a labelled file with a saved model, print metrics
  {PROG} show --registry DIR [--name NAME]
                                     list versions, the current one and thresholds

Run '{PROG} COMMAND --help' for a command's options. Configuration keys: docs/trainer.md.
Exit status: 0 ok, 2 user error (one 'error: ...; fix' line on stderr), 130 interrupted.
"""


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors become one ``error: ...`` line (not usage + error)."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message}; see {self.prog} --help")


def _train_parser(prog: str) -> argparse.ArgumentParser:
    p = _Parser(
        prog=prog,
        description="Train a dense-autoencoder anomaly detector from normal sensor data and save "
        "it as a new version in a registry (fit -> threshold -> evaluate -> report -> save).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", "-c", required=True, metavar="FILE", help="YAML training config")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set model.epochs=20 --set 'model.hidden=[64, 32]' "
        "(value parsed as YAML; repeatable)",
    )
    p.add_argument("--registry", metavar="DIR", help="registry root (overrides config registry)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")
    return p


def _evaluate_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=f"{PROG} evaluate",
        description="Score a labelled CSV/JSONL file with a saved detector and print precision, "
        "recall, F1, ROC-AUC, PR-AUC, FAR/MAR and the confusion matrix.",
    )
    p.add_argument(
        "--artifact",
        required=True,
        metavar="DIR",
        help="a version directory (registry/NAME/v0003), or a registry root with --name",
    )
    p.add_argument("--name", help="model name, when --artifact is a registry root (uses CURRENT)")
    p.add_argument("--data", required=True, metavar="FILE", help="labelled CSV or JSONL file")
    p.add_argument(
        "--label-column",
        metavar="COL",
        help="0/1 label column (default: the artifact's evaluate.label_column, else 'anomaly')",
    )
    p.add_argument(
        "--truth",
        metavar="FILE",
        help="ground-truth JSONL (anomaly-simulate jsonl --truth) instead of a label column",
    )
    p.add_argument("--format", choices=("auto", "csv", "jsonl"), default="auto")
    p.add_argument("--delimiter", default="auto", help="CSV delimiter: auto, tab or one character")
    p.add_argument("--decimal", choices=(".", ","), default=".", help="CSV decimal mark")
    p.add_argument("--rows", metavar="START:STOP", help="row slice of the file, e.g. 400:")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    return p


def _show_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=f"{PROG} show",
        description="List a model's versions (verified against their manifests), which one is "
        "current, and each threshold. Without --name, list the models in the registry.",
    )
    p.add_argument("--registry", required=True, metavar="DIR", help="registry root")
    p.add_argument("--name", help="model name")
    p.add_argument("--json", action="store_true", help="print as JSON")
    return p


# --------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------


def _cmd_train(args: argparse.Namespace) -> int:
    from trainer.config import load_config
    from trainer.pipeline import stderr_progress, train

    cfg = load_config(args.config, args.overrides, registry=args.registry)
    if cfg.data.entity_column is not None or cfg.data.per_file:
        return _train_entities(cfg, args.quiet)
    result = train(cfg, None if args.quiet else stderr_progress())
    m = result.metrics
    parts = [
        f"saved {result.artifact}",
        f"threshold {result.detector.threshold.value:.6g}",
        f"holdout MSE {m['holdout']['mse']:.6g}",
    ]
    ev = m.get("evaluation")
    if ev:
        parts.append(f"F1 {ev['f1']:.3f}")
        if ev.get("roc_auc") is not None:
            parts.append(f"ROC-AUC {ev['roc_auc']:.3f}")
    print("  ".join(parts))
    if result.artifact is not None:
        print(f"report: {result.artifact / 'report' / 'report.md'}")
    return 0


def _train_entities(cfg: Any, quiet: bool) -> int:
    """One model per entity in one process; exit 2 if any entity had a user error."""
    from trainer.pipeline import stderr_progress, train_many

    failed = 0
    for entity, res in train_many(cfg, None if quiet else stderr_progress()):
        if isinstance(res, TrainerError):
            failed += 1
            print(f"error: entity {entity}: {res}", file=sys.stderr)
            continue
        cap = " (stopped at the epoch cap)" if not res.history.stopped_early else ""
        print(
            f"{entity}: saved {res.artifact}  threshold {res.detector.threshold.value:.6g}"
            f"  dropped {len(res.metrics['data']['dropped_columns'])} column(s){cap}"
        )
    return 2 if failed else 0


def _parse_rows(text: str | None) -> tuple[int | None, ...] | None:
    if text is None:
        return None
    start, sep, stop = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return (int(start) if start else None, int(stop) if stop else None)
    except ValueError:
        raise TrainerError(f"--rows {text!r} is not START:STOP", "write e.g. --rows 400:") from None


def _artifact_label_column(path: Path) -> str:
    """The label column the artifact was evaluated with at training time, else ``anomaly``."""
    try:
        doc = yaml.safe_load((path / "config.yaml").read_text())
        col = doc["evaluate"]["label_column"]
        return col if isinstance(col, str) and col else "anomaly"
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return "anomaly"


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from detector.artifact import load, resolve
    from trainer.evaluate import evaluate_detector
    from trainer.pipeline import load_labelled_data

    path = resolve(args.artifact, args.name)
    det = load(path)
    label = args.label_column or _artifact_label_column(path)
    ds = load_labelled_data(
        args.data,
        det.feature_names,
        label,
        fmt=args.format,
        delimiter=args.delimiter,
        decimal=args.decimal,
        rows=_parse_rows(args.rows),
        truth=args.truth,
    )
    assert ds.labels is not None  # require_label=True guarantees it
    m = evaluate_detector(det, ds.x, ds.labels, ds.device_ids)
    m = {"artifact": str(path), "model": det.info.name, "version": det.info.version} | m
    if args.json:
        from trainer.report import json_safe

        m.pop("pr_curve", None)
        print(json.dumps(json_safe(m), indent=2, sort_keys=True))
        return 0
    t = det.threshold
    c = m["confusion"]

    def opt(v: float | None) -> str:
        return "n/a (one class only)" if v is None else f"{v:.4f}"

    lines = [
        ("artifact", f"{path} ({det.info.name} {det.info.version})"),
        ("data", f"{ds.source}: {m['n']} readings, {m['anomalous']} anomalous"),
        ("threshold", f"{t.value:.6g} ({t.method}, param {t.param:g})"),
        ("precision", f"{m['precision']:.4f}"),
        ("recall", f"{m['recall']:.4f}"),
        ("F1", f"{m['f1']:.4f}"),
        ("ROC-AUC", opt(m["roc_auc"])),
        ("PR-AUC", opt(m["pr_auc"])),
        ("FAR", f"{m['far_pct']:.2f} %"),
        ("MAR", f"{m['mar_pct']:.2f} %"),
        ("confusion", f"tn={c['tn']} fp={c['fp']} fn={c['fn']} tp={c['tp']}"),
    ]
    for k, v in lines:
        print(f"{k:<10} {v}")
    return 0


def _version_row(root: Path, name: str, version: str) -> dict[str, Any]:
    from detector.artifact import load

    row: dict[str, Any] = {"version": version}
    try:
        det = load(root / name / version)
    except DetectorError as e:
        return row | {"status": f"INVALID: {e}"}
    t = det.threshold
    return row | {
        "status": "ok",
        "trained_at": det.info.trained_at,
        "features": det.n_features,
        "threshold": t.value,
        "threshold_rule": f"{t.method} {t.param:g}",
    }


def _cmd_show(args: argparse.Namespace) -> int:
    from detector.artifact import Registry

    reg = Registry(args.registry)
    if not reg.root.is_dir():
        raise TrainerError(f"registry {reg.root} does not exist", "check --registry")
    if args.name is None:
        names = sorted(p.name for p in reg.root.iterdir() if p.is_dir() and reg.versions(p.name))
        if args.json:
            print(json.dumps({"models": names}))
        else:
            for n in names:
                print(
                    f"{n}  current {reg.current_version(n) or '-'}  versions {len(reg.versions(n))}"
                )
        return 0
    versions = reg.versions(args.name)
    if not versions:
        known = sorted(p.name for p in reg.root.iterdir() if p.is_dir())
        raise TrainerError(
            f"registry {reg.root} has no versions of model {args.name!r}",
            f"models there: {known}" if known else "train one first (anomaly-train --config ...)",
        )
    current = reg.current_version(args.name)
    rows = [_version_row(reg.root, args.name, v) | {"current": v == current} for v in versions]
    if args.json:
        print(json.dumps({"name": args.name, "current": current, "versions": rows}, indent=2))
        return 0
    print(f"model {args.name} in {reg.root}: current {current or '-'}")
    for r in rows:
        mark = "*" if r["current"] else " "
        if r["status"] != "ok":
            print(f"{mark} {r['version']}  {r['status']}")
            continue
        print(
            f"{mark} {r['version']}  trained {r['trained_at']}  features {r['features']}  "
            f"threshold {r['threshold']:.6g} ({r['threshold_rule']})"
        )
    return 0


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] in COMMANDS:
        command, rest = argv[0], argv[1:]
    else:
        command, rest = "train", argv
    if command == "evaluate":
        return _cmd_evaluate(_evaluate_parser().parse_args(rest))
    if command == "show":
        return _cmd_show(_show_parser().parse_args(rest))
    prog = f"{PROG} train" if argv and argv[0] == "train" else PROG
    return _cmd_train(_train_parser(prog).parse_args(rest))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``anomaly-train``; returns the exit status (see the module docstring)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(args)
    except (_UsageError, TrainerError, DetectorError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(
            "error: interrupted; nothing was saved unless a 'saved' line was printed",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
