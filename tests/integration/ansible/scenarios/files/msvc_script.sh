#!/bin/sh
# Test-only: run on targets by the `script` action of the scenario suite.
echo "script args: $#"
for a in "$@"; do echo "arg=[$a]"; done
echo "cwd=$(pwd)"
echo "script stderr line" >&2
exit "${MSVC_SCRIPT_RC:-0}"
