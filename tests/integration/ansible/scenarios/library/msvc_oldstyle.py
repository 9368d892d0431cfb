#!/usr/bin/python
# Test-only, runs on targets: an old-style module (no AnsiballZ wrapper).
# Ansible passes the path of a file of shell-quoted key=value pairs as the
# only argument; the module answers with one JSON object on stdout.
import json
import os
import shlex
import sys


def main():
    with open(sys.argv[1]) as fp:
        text = fp.read()
    args = {}
    for word in shlex.split(text):
        key, _, value = word.partition("=")
        args[key] = value
    own = dict((k, v) for k, v in args.items() if not k.startswith("_ansible_"))
    result = {
        "changed": own.get("change") == "yes",
        "args": own,
        "internal_keys": sorted(k for k in args if k.startswith("_ansible_")),
        "check_mode": args.get("_ansible_check_mode"),
        "argv_count": len(sys.argv),
        "args_file_mode": oct(os.stat(sys.argv[1]).st_mode & 0o777),
    }
    if own.get("fail") == "yes":
        result["failed"] = True
        result["msg"] = "old-style module failing on request"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
