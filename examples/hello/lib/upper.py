"""Action: appends each message it receives to the file named by the `out` field."""

import json

GREETING = "v1"  # change this, commit and push: the flow's output switches to the new code


def process(msg, cfg):
    line = {"n": msg["body"]["n"], "text": msg["body"]["text"], "by": GREETING}
    with open(cfg["out"], "a") as fh:
        fh.write(json.dumps(line) + "\n")
    return line
