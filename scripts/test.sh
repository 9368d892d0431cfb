#!/usr/bin/env bash
# Run every test: unit tests, real-process runtime tests (local agents,
# agents over ssh to sshd instances the tests start on 127.0.1.x, chained
# sudo agents), the collection build/install check and the Ansible
# scenarios (vanilla linear against mitogen_linear) on the newest
# ansible-core, then the smoke scenarios and the async tests on the older
# supported lines (2.20 with pyenv's Python 3.12; 2.19 and 2.18 with the
# system Python 3.11).
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
# 2.20 needs Python 3.12+ (pyenv's); 2.19 and 2.18 run on the system Python.
py312=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3 2>/dev/null | tail -1 || true)
for spec in "2.20:$py312" "2.19:/usr/bin/python3" "2.18:/usr/bin/python3"; do
    line=${spec%%:*} interp=${spec#*:}
    if [ ! -x "$interp" ]; then
        echo "ansible-core $line NOT TESTED: no Python for it on this machine" >&2
        continue
    fi
    old=$(bash scripts/venv.sh "core${line/./}" "$interp" -- -r requirements-test.txt \
          "ansible-core>=$line,<${line%.*}.$(( ${line#*.} + 1 ))")
    echo "smoke scenarios and async tests on ansible-core" \
         "$("$old" -c 'import ansible.release as r; print(r.__version__)')" \
         "($("$old" --version))"
    MSVC_ANSIBLE_BIN=$(dirname "$old") "$py" -m pytest -m smoke tests/integration/ansible
done
