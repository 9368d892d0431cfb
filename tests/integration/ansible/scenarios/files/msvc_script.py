# Test-only: run on targets with `script: ... executable=python3`.
import sys

print("python script, %d args: %s" % (len(sys.argv) - 1, " ".join(sys.argv[1:])))
sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 0)
