"""Trigger: counts. The count lives in the step snapshot, so it survives restarts and redeploys."""


def process(msg, cfg, snapshot, ctx):
    n = snapshot.get("n", 0) + 1
    ctx.emit("snapshot", {"n": n})
    return {"text": f"{cfg.get('prefix', 'hi')} {n}", "n": n}
