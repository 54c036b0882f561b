"""A private single-node Kafka broker the chaos suite may kill, pause and restart.

Same server properties as ``deploy/kafka/kafka.sh`` (KRaft broker+controller on loopback,
one partition for the offsets and transaction-state topics, ``group.min.session.timeout.ms``
1000), but on ports and in a data directory of its own, started with ``subprocess.Popen`` so
the suite holds its PID: every signal goes to that PID and nothing else. The shared broker of
the other tests (127.0.0.1:39092) is never touched.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from confluent_kafka.admin import AdminClient

REPO = Path(__file__).resolve().parents[2]
KAFKA_SH = REPO / "deploy" / "kafka" / "kafka.sh"
LOG4J = REPO / "deploy" / "kafka" / "log4j2.properties"


def _props(host: str, port: int, cport: int, logs: Path) -> str:
    return f"""process.roles=broker,controller
node.id=1
controller.quorum.voters=1@{host}:{cport}
listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{cport}
advertised.listeners=PLAINTEXT://{host}:{port}
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs={logs}
num.partitions=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000
transaction.abort.timed.out.transaction.cleanup.interval.ms=2000
log.retention.hours=6
"""


def answers(bootstrap: str, timeout: float = 3.0) -> bool:
    """True when a metadata request answers (not just an open port)."""
    try:
        AdminClient({"bootstrap.servers": bootstrap, "log_level": 0}).list_topics(timeout=timeout)
        return True
    except Exception:
        return False


class PrivateBroker:
    """One broker process on ``127.0.0.1:port`` with its data under ``home``."""

    def __init__(self, home: Path, port: int, heap: str = "-Xms256m -Xmx768m") -> None:
        self.home = home
        self.port = port
        self.cport = port + 1
        self.host = "127.0.0.1"
        self.bootstrap = f"{self.host}:{port}"
        self.heap = heap
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = home / "broker.log"
        self.props = home / "server.properties"
        self.libs = REPO / ".cache" / "kafka" / "libs"
        self.starts = 0

    # -- lifecycle -------------------------------------------------------------------------

    def _java(self, *args: str) -> list[str]:
        return [
            "java",
            *self.heap.split(),
            "-XX:+UseG1GC",
            "-XX:TieredStopAtLevel=1",  # C1 only: faster start, less CPU on a shared machine
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={LOG4J}",
            "-cp",
            f"{self.libs}/*",
            *args,
        ]

    def start(self, timeout: float = 240.0) -> float:
        """Start (formatting the data dir the first time); return seconds until ready.

        After a SIGKILL the broker recovers every partition's log before it answers: minutes
        with many partitions on a loaded 2-core machine, hence the generous timeout."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("broker already running")
        if not (self.libs / ".complete").exists():
            subprocess.run([str(KAFKA_SH), "fetch"], check=True)
        self.home.mkdir(parents=True, exist_ok=True)
        self.props.write_text(_props(self.host, self.port, self.cport, self.home / "logs"))
        if not (self.home / ".formatted").exists():
            # Redrawn when it begins with '-', as Kafka's Uuid.randomUuid() does: the storage
            # tool's parser takes "-t -abc…" for an option and the format fails (1 in 64).
            cluster = "-"
            while cluster.startswith("-"):
                cluster = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
            with self.log_path.open("ab") as log:
                subprocess.run(
                    self._java(
                        "kafka.tools.StorageTool",
                        "format",
                        "-t",
                        cluster,
                        "-c",
                        str(self.props),
                        "--ignore-formatted",
                    ),
                    check=True,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            (self.home / ".formatted").touch()
        t0 = time.monotonic()
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self._java("kafka.Kafka", str(self.props)),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        self.starts += 1
        while not answers(self.bootstrap, timeout=2.0):
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited during start:\n{self.tail()}")
            if time.monotonic() - t0 > timeout:
                self.stop(signal.SIGKILL)
                raise RuntimeError(f"broker not ready after {timeout:.0f}s:\n{self.tail()}")
            time.sleep(0.2)
        return time.monotonic() - t0

    def stop(self, sig: int = signal.SIGTERM, grace: float = 20.0) -> int | None:
        """Send ``sig`` to our broker's PID (SIGKILL after ``grace`` s); return its exit code."""
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGCONT)  # a paused JVM cannot handle SIGTERM
            p.send_signal(sig)
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        self.proc = None
        return p.returncode

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ensure(self) -> None:
        """Running and answering (after a scenario left it in any state)."""
        if self.alive():
            self.resume()
            if answers(self.bootstrap, timeout=10.0):
                return
            self.stop(signal.SIGKILL)
        self.start()

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""
