"""What a SuperNode reads is its site's decision, not the run's.

The run config comes from whoever submitted the run (unsigned, through the coordinator), so its
`dataset.path` and a local `model.name` are honoured only inside the directories the site lets
its node read: the node's cache (FEDTUNE_CACHE, where `fedtune stack cache` puts the model and
data) and those the site lists in FEDTUNE_NODE_READ_DIRS (its .env or environment). A node's own
`--node-config data-path=...` is the site's choice and is not limited. The refusal goes back to
the server, so it names the key and the rule, not the site's directories.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from app.config import Settings

log = logging.getLogger(__name__)

READ_DIRS_ENV = "FEDTUNE_NODE_READ_DIRS"


class ReadRefused(ValueError):
    """The run config names a file or directory outside what this site lets its node read."""


def read_dirs() -> list[Path]:
    from app.training.tiny import cache_root

    listed = [Path(p) for p in os.environ.get(READ_DIRS_ENV, "").split(os.pathsep) if p.strip()]
    return [d.expanduser().resolve() for d in (cache_root(), *listed)]


def _names_a_path(model_name: str) -> bool:
    """transformers loads a name that exists on disk as a local directory, before the hub."""
    return model_name.startswith(("/", ".", "~")) or Path(model_name).expanduser().exists()


def run_reads(settings: Settings) -> list[tuple[str, str]]:
    """(key, path) of every local file or directory the run config asks a node to read."""
    asked = [("dataset.path", settings.dataset.path)] if settings.dataset.path else []
    if _names_a_path(settings.model.name):
        asked.append(("model.name", settings.model.name))
    return asked


def check_run_reads(settings: Settings) -> None:
    """Raise ReadRefused if the run config points this node at files outside its read dirs."""
    allowed = read_dirs()
    for key, value in run_reads(settings):
        target = Path(value).expanduser().resolve()  # symlinks and .. resolved: no way out
        if not any(target.is_relative_to(d) for d in allowed):
            log.error("refused run config %s=%r: outside this node's read dirs %s", key, value, [str(d) for d in allowed])
            raise ReadRefused(f"run config {key}={value!r} is outside the directories this node may read; "
                              f"its site sets those ({READ_DIRS_ENV}), not the run")
