#!/usr/bin/env bash
# Install what the real-process tests need on this machine: the OpenSSH
# server (tests start their own sshd on 127.0.1.x), sudo and doas; and, if
# the package can be had, SoftHSM (a smart card in software for the
# pkcs11_provider scenario, skipped without it).
set -euo pipefail
need=()
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v sudo >/dev/null || need+=(sudo)
command -v doas >/dev/null || need+=(opendoas)
want=()
[ -e /usr/lib/softhsm/libsofthsm2.so ] || want+=(softhsm2)
[ $(( ${#need[@]} + ${#want[@]} )) -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "missing ${need[*]} ${want[*]}: the tests that need them will be skipped" >&2; exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null || true
[ ${#need[@]} -eq 0 ] || apt-get install -y -qq "${need[@]}" >/dev/null
[ ${#want[@]} -eq 0 ] || apt-get install -y -qq "${want[@]}" >/dev/null \
    || echo "could not install ${want[*]}: the tests that need it will be skipped" >&2
