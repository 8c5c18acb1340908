"""What a SuperNode reads is its site's decision, not the run's.

The run config comes from whoever submitted the run (unsigned, through the coordinator), so its
`dataset.path`, a local `dataset.name` and a local `model.name` are honoured only inside the
directories the site lets its node read: the node's cache (FEDTUNE_CACHE, where `fedtune stack
cache` puts the model and data) and those the site lists in FEDTUNE_NODE_READ_DIRS (its .env or environment). A node's own
`--node-config data-path=...` is the site's choice and is not limited. The refusal goes back to
the server, so it names the key and the rule, not the site's directories.

These are all the run-config keys a node reads files by (app/config.py): `resume-from` and
`results.dir` are the ServerApp's, on the coordinator. `dataset.name` is a hub dataset only in
its `owner/name` form and only when no such local directory exists (`datasets.load_dataset`
looks on disk first); anything else is a local path, and must exist: a name that is neither
makes `datasets` read something else in its place (a builder name such as `json` reads the
process's working directory).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from app.config import Settings

log = logging.getLogger(__name__)

READ_DIRS_ENV = "FEDTUNE_NODE_READ_DIRS"
TINY_DATASET = "tiny"  # the tiny profile's generated set, in the node's cache (app/training/data.py)
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_MUST_EXIST = {"dataset.name"}  # if missing, datasets reads something else instead (a builder, the hub)


class ReadRefused(ValueError):
    """The run config names a file or directory outside what this site lets its node read."""


def read_dirs() -> list[Path]:
    from app.training.tiny import cache_root

    listed = [Path(p) for p in os.environ.get(READ_DIRS_ENV, "").split(os.pathsep) if p.strip()]
    return [d.expanduser().resolve() for d in (cache_root(), *listed)]


def _names_a_path(model_name: str) -> bool:
    """transformers loads a name that exists on disk as a local directory, before the hub."""
    return model_name.startswith(("/", ".", "~")) or Path(model_name).expanduser().exists()


def _hub_dataset(name: str) -> bool:
    """`owner/name` with no local directory of that name: datasets then asks the hub."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name and not _names_a_path(name)


def run_reads(settings: Settings) -> list[tuple[str, str]]:
    """(key, path) of every local file or directory the run config asks a node to read."""
    asked = [("dataset.path", settings.dataset.path)] if settings.dataset.path else []
    if settings.dataset.name != TINY_DATASET and not _hub_dataset(settings.dataset.name):
        asked.append(("dataset.name", settings.dataset.name))
    if _names_a_path(settings.model.name):
        asked.append(("model.name", settings.model.name))
    return asked


def check_run_reads(settings: Settings) -> None:
    """Raise ReadRefused if the run config points this node at files outside its read dirs."""
    allowed = read_dirs()
    for key, value in run_reads(settings):
        # symlinks and .. resolved: no way out. datasets takes the name as it is (no ~ expansion).
        target = (Path(value) if key in _MUST_EXIST else Path(value).expanduser()).resolve()
        if not any(target.is_relative_to(d) for d in allowed):  # first: outside, whether it exists or not
            why = "is outside the directories this node may read"
        elif key in _MUST_EXIST and not target.exists():
            why = "names no file or directory this node may read (a hub dataset is named owner/name)"
        else:
            continue
        log.error("refused run config %s=%r: %s; read dirs %s", key, value, why, [str(d) for d in allowed])
        raise ReadRefused(f"run config {key}={value!r} {why}; its site sets those ({READ_DIRS_ENV}), not the run")


def check_node_data_path(data_path: str) -> None:
    """A device trainer reads the data file of every node it serves (their registry's
    `data-path`): each must lie in the directories this site lets its nodes read, like the run's."""
    if not data_path:
        return
    allowed = read_dirs()
    if not any(Path(data_path).expanduser().resolve().is_relative_to(d) for d in allowed):
        raise ReadRefused(f"node data-path {data_path!r} is outside the directories this node may read ({READ_DIRS_ENV})")
