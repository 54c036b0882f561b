#!/usr/bin/env bash
# Debian packages the tests and demo need: kcat (independent Kafka client, broker readiness
# probe), prometheus (promtool + a real server for the observability tests) and
# prometheus-alertmanager (incident delivery tests). Java 17 and
# Maven are expected on the machine (they resolve and run Kafka's jars).
set -euo pipefail
need=()
command -v kcat >/dev/null || need+=(kcat)
command -v prometheus >/dev/null && command -v promtool >/dev/null || need+=(prometheus)
# prometheus-alertmanager: a real Alertmanager for the incident delivery test.
command -v prometheus-alertmanager >/dev/null || need+=(prometheus-alertmanager)
for tool in java mvn; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found; install a JDK 17+ and Maven" >&2; exit 1; }
done
if ((${#need[@]})); then
  echo "[system-deps] installing ${need[*]} from Debian" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi
echo "[system-deps] kcat $(kcat -V 2>/dev/null | head -1 | awk '{print $2}'), $(prometheus --version 2>&1 | head -1)" >&2
