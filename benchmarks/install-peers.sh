#!/usr/bin/env bash
# Install what `socks6fast bench` compares against and what it builds with, on
# Debian/Ubuntu: Dante (`danted`, the SOCKS5 peer of the TCP rows and, relaying UDP
# ASSOCIATE, of the UDP rows) and microsocks (TCP only), a C compiler for the load
# generators (socks6fast/bench/loadgen.c and udpgen.c), and iperf3 (optional kernel reference).
# Idempotent; needs root (or sudo). Touches nothing but apt packages.
set -euo pipefail

pkgs=(dante-server microsocks gcc libc6-dev iperf3)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "install-peers: all present (${pkgs[*]})"
else
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    echo "install-peers: installing ${missing[*]}"
    $SUDO apt-get update -qq
    # danted's postinst tries to start the service with the stock config, which
    # fails harmlessly in containers without systemd; the benchmark runs its own
    # instance in the foreground with a generated loopback-only config.
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The distribution's service (if one was started) listens on the stock port 1080;
# the benchmark never uses it, it picks free loopback ports of its own.
for b in /usr/sbin/danted /usr/bin/microsocks cc; do
    command -v "$b" >/dev/null && echo "  ok  $b" || echo "  MISSING $b"
done
