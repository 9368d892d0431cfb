#!/usr/bin/env bash
# The main job on its embedded default: start a small loopback sshd test bed
# (3 hosts; local targets where sshd cannot run here), run the demo playbook
# docs/examples/demo_playbook/site.yml once under vanilla `linear`
# (pipelining, ControlPersist) and once under mitogen.svc.mitogen_linear,
# print the timings side by side and whether the task results matched, then
# stop everything it started.
#   scripts/demo.sh [--hosts N]
#   scripts/demo.sh --runtime    # the runtime-only FileService example instead
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/testbed-deps.sh
py=$(bash scripts/venv.sh demo -- -r requirements-demo.txt)
if [ "${1:-}" = "--runtime" ]; then
    shift
    exec "$py" docs/examples/demo.py "$@"
fi
exec "$py" docs/examples/demo_playbook/demo.py "$@"
