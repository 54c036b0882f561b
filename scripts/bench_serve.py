"""Benchmark of ``anomaly-serve`` beside the tutorial's seed path, same model, same machine.

Usage::

    .venv/bin/python scripts/bench_serve.py [--seconds 5] [--out bench-out/serve.json]
                                            [--markdown bench-out/serve.md] [--skip-frameworks]

1. Builds the benchmark Keras autoencoder of ``make bench`` (``scripts/bench_scoring.py``:
   38 → 32 → 16 → 8 → 16 → 32 → 38, MinMaxScaler) into a temporary registry.
2. Starts two servers on loopback, each a process of its own:

   - *seed*: the tutorial's path, written here only as the baseline (it is not part of the
     project): a Flask app (its threaded development server, as the tutorial runs it) that
     unpickles a scikit-learn ``MinMaxScaler`` at start and per request calls
     ``scaler.transform`` and Keras ``model.predict`` and returns the MSE per reading.
     Flask is pip-installed into the venv at bench time if missing; it is no dependency;
   - ``anomaly-serve --model <artifact>`` (``POST /v1/models/sensors/score``), which returns
     far more per reading (threshold, flag, contributors, out-of-range features).

   Both get the same request bodies (simulated readings, 1 or 100 per request) and their
   scores are checked to agree to 1e-5 before timing.
3. Load from ``wrk`` (Debian package; a C client, so the client's cost stays small beside a
   Python server) at concurrency 1 and 16 for ``--seconds`` each: requests/s, latency p50 and
   p99 as wrk reports them, and the server's CPU time per request from ``/proc/<pid>/stat``
   (comparable even when other work shares the machine).
4. Unless ``--skip-frameworks``: the framework choice. A trivial JSON endpoint served by a
   bare ASGI callable, by Starlette, each on uvicorn with httptools and with h11, at
   concurrency 1: what routing and request objects cost per request.

Hook for ``make bench``: ``--out`` writes the results as JSON (``rows``: one per server ×
readings × concurrency) and ``--markdown`` the table that goes into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pickle
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

SEED_APP = r'''
"""The tutorial's serving path (baseline for scripts/bench_serve.py only)."""
import json, pickle, sys
import numpy as np
from flask import Flask, jsonify, request
import keras

state = pickle.load(open(sys.argv[1], "rb"))  # the tutorial pickles its scaler
scaler, features, threshold = state["scaler"], state["features"], state["threshold"]
model = keras.saving.load_model(sys.argv[2], compile=False)
app = Flask(__name__)


@app.route("/anomaly_score", methods=["POST"])
def anomaly_score():
    data = request.get_json()
    x = np.array([[r["values"][f] for f in features] for r in data["readings"]], dtype=float)
    z = scaler.transform(x)
    recon = model.predict(z, verbose=0)
    mse = np.mean(np.square(z - recon), axis=1)
    return jsonify({"scores": mse.tolist(), "is_anomaly": (mse > threshold).tolist()})


@app.route("/health")
def health():
    return "ok"


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(sys.argv[3]), threaded=True)
'''

BARE_ASGI = r"""
import sys, uvicorn
BODY = b'{"ok":true,"models":{"sensors":"v0001"}}'
async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            m = await receive()
            if m["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"}); return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(BODY)).encode())]})
    await send({"type": "http.response.body", "body": BODY})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), http=sys.argv[2], log_level="warning")
"""

STARLETTE_APP = r"""
import sys, uvicorn, msgspec
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
BODY = {"ok": True, "models": {"sensors": "v0001"}}
async def readyz(request):
    return Response(msgspec.json.encode(BODY), media_type="application/json")
app = Starlette(routes=[Route("/readyz", readyz)])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), http=sys.argv[2], log_level="warning")
"""

WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = assert(io.open("{body}", "rb"))
wrk.body = f:read("*a")
f:close()
"""


def say(msg: str) -> None:
    print(f"[bench-serve] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"{url} not ready within {timeout}s:\n{log.read_text()[-3000:]}")


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )


def stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _seconds(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"cannot read wrk duration {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk(url: str, body_file: Path | None, conns: int, seconds: float, tmp: Path) -> dict[str, Any]:
    """One wrk run; requests/s, p50/p99 latency in seconds, errors (non-2xx, socket)."""
    duration = f"-d{max(1, round(seconds))}s"
    cmd = ["wrk", f"-t{min(conns, 2)}", f"-c{conns}", duration, "--latency", "--timeout", "30s"]
    if body_file is not None:
        lua = tmp / f"{body_file.stem}.lua"
        lua.write_text(WRK_LUA.format(body=body_file))
        cmd += ["-s", str(lua)]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.M))
    if set(lat) != {"50", "99"}:
        raise SystemExit(f"cannot read wrk's latency distribution from:\n{out}")
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    return {
        "requests_per_s": rps,
        "p50_s": _seconds(lat["50"]),
        "p99_s": _seconds(lat["99"]),
        "requests": total,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sock.group(1) if sock else "",
    }


def post(url: str, body: bytes) -> Any:
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def ensure_flask() -> None:
    if importlib.util.find_spec("flask") is None:
        say("installing Flask into the venv for the seed baseline (not a project dependency)")
        subprocess.run([PY, "-m", "pip", "install", "-q", "flask>=3"], check=True)


def build(tmp: Path) -> tuple[Path, Path, Path, list[bytes], dict[str, Any]]:
    """The benchmark model: artifact dir, pickled scaler state, Keras file, reading bytes."""
    spec = importlib.util.spec_from_file_location(
        "bench_scoring", REPO / "scripts" / "bench_scoring.py"
    )
    assert spec is not None and spec.loader is not None
    bs = importlib.util.module_from_spec(spec)
    sys.modules["bench_scoring"] = bs
    spec.loader.exec_module(bs)
    det, _model, scaler, info = bs.build_model(tmp / "registry")
    artifact = Path(info["artifact"])
    state = tmp / "seed-scaler.pkl"
    with state.open("wb") as f:
        pickle.dump(
            {"scaler": scaler, "features": list(det.feature_names),
             "threshold": det.threshold.value}, f,
        )  # fmt: skip
    _keys, values = bs.readings(3)
    return artifact, state, artifact / "model.keras", values, info


def bodies(values: list[bytes], tmp: Path) -> dict[int, Path]:
    out = {}
    for n in (1, 100):
        readings = [json.loads(v) for v in values[:n]]
        p = tmp / f"body-{n}.json"
        p.write_bytes(json.dumps({"readings": readings}).encode())
        out[n] = p
    return out


def load_runs(name: str, url: str, pid: int, files: dict[int, Path], seconds: float,
              tmp: Path) -> list[dict[str, Any]]:  # fmt: skip
    rows = []
    for n, f in files.items():
        for conns in (1, 16):
            # Warm-up (first requests build caches, Keras traces its predict function).
            wrk(url, f, conns, max(1.0, seconds / 5), tmp)
            c0 = cpu_seconds(pid)
            r = wrk(url, f, conns, seconds, tmp)
            cpu = cpu_seconds(pid) - c0
            r.update(
                server=name,
                readings_per_request=n,
                concurrency=conns,
                server_cpu_ms_per_request=1000 * cpu / max(1, r["requests"]),
            )
            say(
                f"{name:>13} n={n:<3} c={conns:<2} {r['requests_per_s']:9.1f} req/s  "
                f"p50 {r['p50_s'] * 1000:8.2f} ms  p99 {r['p99_s'] * 1000:8.2f} ms  "
                f"cpu {r['server_cpu_ms_per_request']:.3f} ms/req  errors {r['non_2xx']}"
            )
            rows.append(r)
    return rows


def frameworks(seconds: float, tmp: Path) -> list[dict[str, Any]]:
    rows = []
    for label, src in (("bare ASGI", BARE_ASGI), ("Starlette", STARLETTE_APP)):
        script = tmp / f"fw-{label.split()[0].lower()}.py"
        script.write_text(src)
        for http in ("httptools", "h11"):
            port = free_port()
            log = tmp / f"{script.stem}-{http}.log"
            p = start([PY, str(script), str(port), http], log)
            try:
                url = f"http://127.0.0.1:{port}/readyz"
                wait_http(url, p, log)
                wrk(url, None, 1, 1, tmp)
                c0 = cpu_seconds(p.pid)
                r = wrk(url, None, 1, seconds, tmp)
                r["server_cpu_ms_per_request"] = 1000 * (cpu_seconds(p.pid) - c0) / r["requests"]
                r.update(framework=label, http=http)
                cpu_ms = r["server_cpu_ms_per_request"]
                say(
                    f"{label:>10} / {http:<9} {r['requests_per_s']:8.0f} req/s  "
                    f"p50 {r['p50_s'] * 1e3:.3f} ms  cpu {cpu_ms:.3f} ms/req"
                )
                rows.append(r)
            finally:
                stop(p)
    return rows


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.0f}×" if b > 0 else "∞ (seed: 0)"


def markdown(res: dict[str, Any]) -> str:
    """The table for docs/benchmarks.md: wall-clock figures and server CPU per request."""
    rows = res["rows"]
    by = {(r["server"], r["readings_per_request"], r["concurrency"]): r for r in rows}
    lines = [
        "| readings/request | concurrency | seed req/s | seed p50 / p99 ms | anomaly-serve req/s "
        "| anomaly-serve p50 / p99 ms | req/s ratio | server CPU ms/req seed / serve "
        "| CPU ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in (1, 100):
        for c in (1, 16):
            a, b = by[("seed", n, c)], by[("anomaly-serve", n, c)]
            ca, cb = a["server_cpu_ms_per_request"], b["server_cpu_ms_per_request"]
            lines.append(
                f"| {n} | {c} | {a['requests_per_s']:.1f} | {a['p50_s'] * 1e3:.1f} / "
                f"{a['p99_s'] * 1e3:.1f} | {b['requests_per_s']:.0f} | {b['p50_s'] * 1e3:.2f} / "
                f"{b['p99_s'] * 1e3:.2f} | {_ratio(b['requests_per_s'], a['requests_per_s'])} "
                f"| {ca:.1f} / {cb:.3f} | {_ratio(ca, cb)} |"
            )
    if res.get("frameworks"):
        lines += [
            "",
            "| framework (trivial GET, concurrency 1) | HTTP parser | req/s | p50 ms "
            "| server CPU ms/req |",
            "|---|---|---|---|---|",
        ]
        for r in res["frameworks"]:
            lines.append(
                f"| {r['framework']} | {r['http']} | {r['requests_per_s']:.0f} | "
                f"{r['p50_s'] * 1e3:.3f} | {r['server_cpu_ms_per_request']:.3f} |"
            )
    m = res["machine"]
    lines += [
        "",
        f"{m['cpus']} CPUs, load average {m['loadavg_before'][0]:.1f} before and "
        f"{m['loadavg_after'][0]:.1f} after the run (other work shares the machine); "
        f"`{res['command']}`, {res['when']}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="per timed wrk run")
    ap.add_argument(
        "--seed-seconds",
        type=float,
        default=15.0,
        help="per timed wrk run against the seed (its requests take 50 ms to seconds)",
    )
    ap.add_argument("--out", type=Path, default=REPO / "bench-out" / "serve.json")
    ap.add_argument("--markdown", type=Path, default=REPO / "bench-out" / "serve.md")
    ap.add_argument("--skip-frameworks", action="store_true")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        print("error: wrk is not installed; apt-get install -y wrk", file=sys.stderr)
        return 2
    ensure_flask()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as d:
        tmp = Path(d)
        say("building the benchmark model (Keras, 38 sensors)")
        artifact, state, keras_file, values, info = build(tmp)
        files = bodies(values, tmp)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            sport, aport = free_port(), free_port()
            seed_py = tmp / "seed_app.py"
            seed_py.write_text(SEED_APP)
            seed_log, serve_log = tmp / "seed.log", tmp / "serve.log"
            seed = start([PY, str(seed_py), str(state), str(keras_file), str(sport)], seed_log,
                         {"TF_CPP_MIN_LOG_LEVEL": "3"})  # fmt: skip
            procs.append(seed)
            serve = start(
                [PY, "-m", "serve.cli", "--model", str(artifact)],
                serve_log,
                {"SENSOR_ANOMALY_SERVE__PORT": str(aport),
                 "SENSOR_ANOMALY_LOG_LEVEL": "WARNING"},
            )  # fmt: skip
            procs.append(serve)
            wait_http(f"http://127.0.0.1:{aport}/readyz", serve, serve_log)
            wait_http(f"http://127.0.0.1:{sport}/health", seed, seed_log)
            seed_url = f"http://127.0.0.1:{sport}/anomaly_score"
            serve_url = f"http://127.0.0.1:{aport}/v1/models/sensors/score"
            body = files[100].read_bytes()
            a = np.array(post(seed_url, body)["scores"])
            b = np.array([r["score"] for r in post(serve_url, body)["results"]])
            diff = float(np.max(np.abs(a - b)))
            say(f"same model: max |seed score - anomaly-serve score| = {diff:.2e}")
            if diff > 1e-5:
                raise SystemExit(f"the two servers disagree by {diff}")
            rows = load_runs("seed", seed_url, seed.pid, files, args.seed_seconds, tmp)
            rows += load_runs("anomaly-serve", serve_url, serve.pid, files, args.seconds, tmp)
        finally:
            for p in procs:
                stop(p)
        fw = [] if args.skip_frameworks else frameworks(min(args.seconds, 3.0), tmp)
    res = {
        "command": " ".join(["scripts/bench_serve.py", *sys.argv[1:]]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "model": {k: info[k] for k in ("architecture", "threshold")},
        "score_agreement_max_abs_diff": diff,
        "rows": rows,
        "frameworks": fw,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    table = markdown(res)
    args.markdown.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
