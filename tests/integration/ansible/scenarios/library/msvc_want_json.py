#!/usr/bin/python
# Test-only, runs on targets: a non-native module that asks for its
# arguments as a JSON file. WANT_JSON
import json
import sys


def main():
    with open(sys.argv[1]) as fp:
        args = json.load(fp)
    own = dict((k, v) for k, v in args.items() if not k.startswith("_ansible_"))
    print(json.dumps({
        "changed": False,
        "args": own,
        "types": dict((k, type(v).__name__) for k, v in own.items()),
        "diff_mode": args.get("_ansible_diff"),
        "internal_keys": sorted(k for k in args if k.startswith("_ansible_")),
    }))


if __name__ == "__main__":
    main()
