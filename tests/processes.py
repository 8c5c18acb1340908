"""Real Flower processes for a test: each in its own session with its own log, all killed whole at the end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


class Processes:
    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir, self.env, self.procs = log_dir, env, []
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, command: list[str], extra: dict[str, str] | None = None) -> Path:
        log = self.log_dir / f"{name}.log"
        with open(log, "ab") as handle:
            self.procs.append(subprocess.Popen(command, env={**self.env, **(extra or {})}, stdout=handle,
                                               stderr=subprocess.STDOUT, start_new_session=True))
        return log

    def supernode(self, name: str, superlink_port: int, home: Path, extra: dict[str, str] | None = None) -> Path:
        """`fedtune supernode` (resident trainer, bundle allowlist), insecure, partition 0 of 1."""
        from app.deploy.launcher import free_port

        return self.start(name, [sys.executable, "-m", "app.cli", "supernode", "--", "--insecure",
                                 "--superlink", f"127.0.0.1:{superlink_port}", "--port", str(free_port()),
                                 "--node-config", "partition-id=0 num-partitions=1"],
                          {"FLWR_HOME": str(home), **(extra or {})})

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
