#!/usr/bin/env bash
# The main job on its embedded default: start a loopback sshd target (or a
# local agent where sshd cannot run here), then run the FileService example
# of docs/services.md against it and print what happened.
#   scripts/demo.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/testbed-deps.sh
py=$(bash scripts/venv.sh demo -- -r requirements-demo.txt)
exec "$py" docs/examples/demo.py "$@"
