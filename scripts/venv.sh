#!/usr/bin/env bash
# Create (or reuse) a virtualenv under .venv/ and print its python path.
#   scripts/venv.sh NAME [PYTHON] -- PIP-ARGS...
# PYTHON defaults to the newest interpreter on this machine (pyenv's 3.13 or
# 3.12, else /usr/bin/python3), so pip picks the newest ansible-core that
# Python supports. The venv is rebuilt when its pip arguments change.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
name=$1; shift
python=""
if [ "${1:-}" != "--" ]; then python=$1; shift; fi
[ "${1:-}" = "--" ] && shift

newest_python() {
    local pyroot=${PYENV_ROOT:-$HOME/.pyenv} v p
    for v in 3.13 3.12; do
        for p in "$pyroot"/versions/"$v"*/bin/python3; do
            [ -x "$p" ] && { echo "$p"; return; }
        done
    done
    for p in /usr/bin/python3.13 /usr/bin/python3.12 /usr/bin/python3; do
        [ -x "$p" ] && { echo "$p"; return; }
    done
    echo "no python3 found" >&2; exit 1
}
[ -n "$python" ] || python=$(newest_python)

venv=$root/.venv/$name
# The stamp covers the pip arguments and the contents of any -r files.
stamp="$python $* $(for a in "$@"; do if [ -f "$a" ]; then cksum < "$a"; fi; done | tr '\n' ' ')"
if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.stamp" 2>/dev/null)" = "$stamp" ]; then
    echo "$venv/bin/python"; exit 0
fi
rm -rf "$venv"
if ! "$python" -m venv "$venv" >/dev/null 2>&1; then
    # Debian's python3 needs python3-venv for ensurepip.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        rm -rf "$venv"; "$python" -m venv "$venv" >/dev/null
    else
        echo "cannot create a venv with $python" >&2; exit 1
    fi
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check "$@" >&2
echo "$stamp" > "$venv/.stamp"
echo "$venv/bin/python"
