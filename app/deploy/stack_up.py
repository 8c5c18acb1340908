"""`fedtune stack up`: `docker compose up --exit-code-from <last>` that fails clearly.

First the preflight (app/deploy/preflight.py). When `up` fails, Compose names only the service
("service "model-cache" didn't complete successfully") and leaves the long-running services
(superlink, serverapp, nodes) up. Here every service that exited non-zero gets its last log
lines printed, then `docker compose down` stops and removes what is left (volumes kept: the
model cache and the SuperLink's state survive for the next try).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

LOG_LINES = 40


def attached_service(compose: dict[str, Any]) -> str:
    """The one service `up --exit-code-from` follows: the generator attaches only the last."""
    attached = [name for name, s in compose.get("services", {}).items() if s.get("attach", True)]
    if len(attached) != 1:
        raise ValueError(f"expected one attached service (a file from `fedtune stack compose`), found {attached or 'none'}")
    return attached[0]


def parse_ps(text: str) -> list[dict[str, Any]]:
    """`docker compose ps --format json`: one object per line (Compose >= 2.21) or one array."""
    text = text.strip()
    if not text:
        return []
    if text.startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def stack_up(compose_file: Path, run: Callable[..., subprocess.CompletedProcess] = subprocess.run, preflight: bool = True,
             out=None) -> int:
    import yaml

    out = out or sys.stdout
    if preflight:
        from app.deploy.preflight import check_stack, report

        text, code = report(check_stack(compose_file), compose_file)
        print(text, file=out, flush=True)
        if code:
            return code
    last = attached_service(yaml.safe_load(compose_file.read_text()))
    compose = ["docker", "compose", "-f", str(compose_file)]
    try:
        code = run([*compose, "up", "--exit-code-from", last]).returncode
    except KeyboardInterrupt:
        code = 130
    if code == 0:
        return 0
    listed = run([*compose, "ps", "--all", "--format", "json"], capture_output=True, text=True)
    containers = parse_ps(listed.stdout) if listed.returncode == 0 else []
    for c in containers:
        if c.get("State") == "exited" and c.get("ExitCode", 0) != 0:
            logs = run([*compose, "logs", "--no-color", "--tail", str(LOG_LINES), c["Service"]], capture_output=True, text=True)
            print(f"--- {c['Service']} exited with code {c['ExitCode']}; its last {LOG_LINES} log lines:\n"
                  f"{(logs.stdout + logs.stderr).rstrip()}", file=out, flush=True)
    running = sorted(c["Service"] for c in containers if c.get("State") in ("running", "restarting", "created"))
    print(f"fedtune: `up` failed ({code}); stopping and removing "
          + (", ".join(running) if running else "the stack's containers")
          + " with `docker compose down` (volumes kept)", file=out, flush=True)
    run([*compose, "down"])
    return code
