#!/usr/bin/env bash
# Run every test: unit tests, real-process runtime tests (local agents,
# agents over ssh to sshd instances the tests start on 127.0.1.x, chained
# sudo agents) and the collection build/install check.
#   scripts/test.sh [PYTEST-ARGS...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/testbed-deps.sh
py=$(bash scripts/venv.sh test -- -r requirements-test.txt)
echo "controller: $("$py" --version), $("$py" -m pip show ansible-core 2>/dev/null | sed -n 's/^Version: /ansible-core /p')"
exec "$py" -m pytest "${@:-tests}"
