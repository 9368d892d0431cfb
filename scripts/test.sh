#!/usr/bin/env bash
# Run every test: unit tests, real-process runtime tests (local agents,
# agents over ssh to sshd instances the tests start on 127.0.1.x, chained
# sudo agents), the collection build/install check and the Ansible
# scenarios (vanilla linear against mitogen_linear) on the newest
# ansible-core, then the smoke scenarios on the oldest supported lines
# (2.18 and 2.19, with the system Python 3.11) with the async tests.
#   scripts/test.sh                 everything
#   scripts/test.sh [PYTEST-ARGS]   only pytest with these arguments (newest ansible-core)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/testbed-deps.sh
py=$(bash scripts/venv.sh test -- -r requirements-test.txt)
echo "controller: $("$py" --version), $("$py" -m pip show ansible-core 2>/dev/null | sed -n 's/^Version: /ansible-core /p')"
if [ $# -gt 0 ]; then
    exec "$py" -m pytest "$@"
fi
"$py" -m pytest tests
for line in 2.19 2.18; do
    old=$(bash scripts/venv.sh "core${line/./}" /usr/bin/python3 -- -r requirements-test.txt \
          "ansible-core>=$line,<${line%.*}.$(( ${line#*.} + 1 ))")
    echo "smoke scenarios on ansible-core $line: $("$old" --version)"
    MSVC_ANSIBLE_BIN=$(dirname "$old") "$py" -m pytest -m smoke tests/integration/ansible
done
