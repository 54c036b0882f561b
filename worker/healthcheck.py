"""``anomaly-healthcheck``: exit 0 when the worker's readiness (or liveness) endpoint says so.

For container HEALTHCHECKs and orchestrator probes that run a command.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="anomaly-healthcheck",
        description="Exit 0 if the worker is ready (or alive with --live), 1 otherwise.",
    )
    p.add_argument("--url", default="http://127.0.0.1:9108", help="worker HTTP base URL")
    p.add_argument("--live", action="store_true", help="check /healthz instead of /readyz")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    a = p.parse_args(argv)
    url = a.url.rstrip("/") + ("/healthz" if a.live else "/readyz")
    try:
        with urllib.request.urlopen(url, timeout=a.timeout) as r:
            body = r.read().decode(errors="replace")
            print(body)
            return 0
    except urllib.error.HTTPError as e:
        print(
            f"unhealthy: {url} answered {e.code}: {e.read().decode(errors='replace')}",
            file=sys.stderr,
        )
    except (urllib.error.URLError, OSError) as e:
        print(f"unhealthy: cannot reach {url}: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
