"""``make chaos``: the worker under faults, in both delivery modes, checked by an oracle.

Starts a private Kafka broker of its own (free ports, data under .cache/chaos/), runs each
(scenario, mode) pair ``--runs`` times (see tests/chaos/scenarios.py for what each does),
prints one line per run and writes the table as Markdown and JSON (``--out``, default
.cache/chaos/results.{md,json}); ``--write-docs`` also replaces the generated table in
docs/reliability.md. The broker is stopped (by its PID) at the end.

Profiles: ``ci`` = the CI mix and the missing output topic, 30k readings; ``full`` = every
scenario of issue 9, 60k readings. ``--scenarios``, ``--modes``, ``--readings`` and ``--rate``
override the profile. ``--worker-ref REF`` runs the workers (and the oracle) from ``git
archive REF`` instead of the working tree, so a result names one commit.

Exit status: 0 every run passed; 1 some run failed (the table says which and why); 2 bad
arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Profile:
    scenarios: tuple[str, ...]  # empty = the whole matrix
    readings: int
    rate: float  # records/s


PROFILES = {
    "ci": Profile(("ci", "output_missing"), 30_000, 3000.0),
    "full": Profile((), 60_000, 2000.0),
}
BEGIN, END = "<!-- chaos:table:begin -->", "<!-- chaos:table:end -->"


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.strip()


def _export(ref: str) -> tuple[Path, str]:
    sha = _git("rev-parse", ref)
    dest = REPO / ".cache" / "chaos" / f"src-{sha[:12]}"
    if not (dest / ".complete").exists():
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "archive", sha, "worker", "detector", "simulator"],
            cwd=REPO,
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        (dest / ".complete").touch()
    return dest, sha


def table(results: list[dict[str, object]]) -> str:
    head = (
        "| scenario | mode | faults | readings | lost (ev/dl) | dup (ev/dl) | recovery s | exits "
        "| result |\n"
        "|---|---|---|---:|---:|---:|---:|---|---|\n"
    )
    rows = []
    for r in results:
        faults = "; ".join(r["faults"]) or "—"  # type: ignore[arg-type]
        if len(faults) > 90:
            faults = faults[:87] + "…"
        rec = r["recovery_s"]
        rec_s = "—" if rec is None else f"{rec:.1f}"
        if not r["recovered"]:
            rec_s += " (not recovered)"
        verdict = "pass" if r["passed"] else "**FAIL**: " + "; ".join(r["failures"])  # type: ignore[arg-type]
        rows.append(
            f"| {r['scenario']} | {r['mode']} | {faults} | {r['readings']:,} | "
            f"{r['lost_events']}/{r['lost_dead']} | {r['dup_events']}/{r['dup_dead']} | {rec_s} | "
            f"{r['exits'] or '—'} | {verdict} |"
        )
    return head + "\n".join(rows) + "\n"


def _write_docs(md: str) -> None:
    """Replace the generated table of docs/reliability.md."""
    doc = REPO / "docs" / "reliability.md"
    text = doc.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _old, tail = rest.split(END, 1)
        doc.write_text(f"{head}{BEGIN}\n{md}{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", choices=sorted(PROFILES), default="full")
    p.add_argument(
        "--scenarios", help="comma-separated (default: the profile's); 'list' prints them"
    )
    p.add_argument("--modes", default="at_least_once,exactly_once")
    p.add_argument("--readings", type=int, help="good readings per run")
    p.add_argument("--rate", type=float, help="records/s produced during a run")
    p.add_argument("--runs", type=int, default=1, help="repeat the whole selection")
    p.add_argument(
        "--client",
        choices=("kafka-python", "confluent"),
        help="kafka.client of the workers (default: $SENSOR_ANOMALY_KAFKA__CLIENT or kafka-python)",
    )
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--worker-ref", help="git ref to run the workers from (default: working tree)")
    p.add_argument("--out", type=Path, default=REPO / ".cache" / "chaos" / "results")
    p.add_argument(
        "--write-docs", action="store_true", help="replace the table in docs/reliability.md"
    )
    p.add_argument("--keep", action="store_true", help="keep broker data and worker logs")
    args = p.parse_args(argv)

    if args.worker_ref and "CHAOS_WORKER_SRC" not in os.environ:
        try:
            src, sha = _export(args.worker_ref)
        except subprocess.CalledProcessError as e:
            p.exit(
                2, f"chaos: error: cannot export --worker-ref {args.worker_ref!r}: {e.stderr!r}\n"
            )
        env = {
            **os.environ,
            "CHAOS_WORKER_SRC": str(src),
            "CHAOS_WORKER_SHA": sha,
            "PYTHONPATH": os.pathsep.join([str(src), str(REPO)]),
        }
        # Re-run with the exported code first on the path, so the oracle scores with it too.
        os.execve(
            sys.executable,
            [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])],
            env,
        )

    from tests.chaos import scenarios as sc
    from tests.chaos.broker import PrivateBroker

    prof = PROFILES[args.profile]
    if args.scenarios == "list":
        for s in sc.SCENARIOS.values():
            print(f"{s.name:16} {s.doc}")
        return 0
    names = args.scenarios.split(",") if args.scenarios else (list(prof.scenarios) or sc.MATRIX)
    modes = args.modes.split(",")
    bad = [n for n in names if n not in sc.SCENARIOS] + [m for m in modes if m not in sc.MODES]
    if bad:
        p.exit(
            2,
            f"chaos: error: unknown scenario/mode {bad}; scenarios: {','.join(sc.SCENARIOS)}; "
            f"modes: {','.join(sc.MODES)}\n",
        )
    readings = args.readings or prof.readings
    rate = args.rate or prof.rate
    if args.client:  # the workers inherit the environment (tests/chaos/procs.py)
        os.environ["SENSOR_ANOMALY_KAFKA__CLIENT"] = args.client
    client = os.environ.get("SENSOR_ANOMALY_KAFKA__CLIENT", "kafka-python")
    sha = os.environ.get("CHAOS_WORKER_SHA") or _git("rev-parse", "HEAD")
    dirty = (
        ""
        if os.environ.get("CHAOS_WORKER_SHA")
        else (
            " + uncommitted changes"
            if _git("status", "--porcelain", "--", "worker", "detector", "simulator")
            else ""
        )
    )
    work = REPO / ".cache" / "chaos" / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    port = _free_port_pair()
    broker = PrivateBroker(work / "broker", port)
    print(
        f"[chaos] worker code {sha[:12]}{dirty} on {client}; private broker on 127.0.0.1:{port}; "
        f"logs under {work}",
        flush=True,
    )
    t0 = time.monotonic()
    print(f"[chaos] broker ready in {broker.start():.1f}s", flush=True)
    results: list[dict[str, object]] = []
    try:
        for run in range(args.runs):
            for name in names:
                for mode in modes:
                    r = sc.run(name, mode, broker, work, readings, rate, args.seed + run)
                    d = dataclasses.asdict(r)
                    d["run"] = run + 1
                    results.append(d)
                    print(
                        f"[chaos] run {run + 1} {name:15} {mode:13} "
                        f"{'pass' if r.passed else 'FAIL'} lost {r.lost_events}/{r.lost_dead} "
                        f"dup {r.dup_events}/{r.dup_dead} recovery {r.recovery_s} "
                        f"exits [{r.exits}] ({r.duration_s:.0f}s)"
                        f"{'' if r.passed else ' — ' + '; '.join(r.failures)}",
                        flush=True,
                    )
    finally:
        broker.stop()
        if not args.keep:
            shutil.rmtree(work / "broker", ignore_errors=True)
    meta = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "worker_commit": sha + dirty,
        "client": client,
        "profile": args.profile,
        "readings": readings,
        "rate": rate,
        "runs": args.runs,
        "seed": args.seed,
        "minutes": round((time.monotonic() - t0) / 60, 1),
        "command": "scripts/chaos.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    md = (
        f"Measured {meta['date']} on worker commit `{meta['worker_commit']}` "
        f"(kafka.client {client}), "
        f"profile {args.profile}, {readings:,} readings per run at {rate:.0f} records/s, "
        f"seed {args.seed}, {args.runs} run(s), "
        f"{meta['minutes']} min. Command: `{meta['command']}`.\n\n" + table(results)
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(md)
    args.out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=2)
    )
    print(md)
    if args.write_docs:
        _write_docs(md)
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
