"""Security properties that need no federation: output modes."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from app.checkpoint import save_adapter
from app.config import load_settings
from app.report import plot_run, write_json_atomic


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_take_the_callers_umask(tmp_path, umask):
    """tempfile makes 0600 files and 0700 directories whatever the umask; outputs must instead be
    what the caller's umask gives (0644 / 0755 for the usual 0022) so the results can be read by
    whoever may read the results directory."""
    rounds = [{"round": 1, "clients": [{"train_loss": 1.0}], "train_loss": 1.0, "cumulative_mib": 1.0}]
    old = os.umask(umask)
    try:
        adapter = save_adapter(tmp_path / "peft_1", {"w": np.zeros(2, dtype=np.float32)}, load_settings({"profile": "tiny"}).model)
        write_json_atomic(tmp_path / "summary.json", {"a": 1})
        plot_run(rounds, tmp_path / "training.png")
    finally:
        os.umask(old)
    for path in [adapter, *adapter.iterdir(), tmp_path / "summary.json", tmp_path / "training.png"]:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, (path, oct(path.stat().st_mode))


def test_run_config_cannot_point_a_node_outside_its_read_dirs(tmp_path, monkeypatch):
    """The submitter's run config names dataset.path / a local model.name; the node reads them
    only inside its cache and the site's FEDTUNE_NODE_READ_DIRS (symlinks resolved), refuses
    anything else before loading, and the refusal does not reveal the site's directories."""
    from app.read_policy import ReadRefused, check_run_reads
    from app.worker import RoundWorker

    site = tmp_path / "site-data"
    site.mkdir()
    (site / "cards.jsonl").write_text("{}\n")
    secret = tmp_path / "elsewhere" / "patients.jsonl"
    secret.parent.mkdir()
    secret.write_text("{}\n")
    (site / "link.jsonl").symlink_to(secret)
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FEDTUNE_NODE_READ_DIRS", str(site))

    def settings(**run_config):
        return load_settings({"profile": "tiny", **run_config})

    check_run_reads(settings(**{"dataset.path": str(site / "cards.jsonl")}))
    check_run_reads(settings(**{"dataset.path": str(tmp_path / "cache" / "x.jsonl")}))
    check_run_reads(settings(**{"model.name": "org/hub-model"}))  # a hub id, not a path
    for run_config in ({"dataset.path": str(secret)}, {"dataset.path": str(site / "link.jsonl")},
                       {"dataset.path": str(site / ".." / "elsewhere" / "patients.jsonl")}, {"model.name": "/etc"}):
        with pytest.raises(ReadRefused, match=r"outside the directories this node may read") as refused:
            check_run_reads(settings(**run_config))
        told = str(refused.value).replace(repr(next(iter(run_config.values()))), "")  # the submitter's own value aside
        assert str(site) not in told and "cache" not in told, told
    with pytest.raises(ReadRefused, match="dataset.path"):  # before any model or data is loaded
        RoundWorker().initial_adapter({"profile": "tiny", "dataset.path": str(secret)})
