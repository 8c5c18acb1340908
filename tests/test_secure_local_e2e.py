"""Secure aggregation through real Flower processes: `fedtune local up --profile tiny` with
privacy.secure-aggregation=true completes, each protocol stage a ClientApp process of its own and
the node's secrets kept in the SuperNode's context state between them; a round's key stages run
during the previous round's train."""

import json
import os
import subprocess
import sys

from app.privacy import ring

NODES, ROUNDS = 4, 2


def test_a_secure_run_completes(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "app.cli", "local", "up", "--profile", "tiny", "--supernodes", str(NODES), "--rounds", str(ROUNDS),
                           "--results", str(tmp_path), "--no-eval", "--run-config", "privacy.secure-aggregation=true"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout
    [run] = [p for p in tmp_path.iterdir() if p.name.startswith("run-")]
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    assert [r["status"] for r in rounds] == ["aggregated"] * ROUNDS, rounds
    # Round 2's setup and share-keys ran while round 1 trained, each node's sessions apart in its context state.
    assert [r["secagg_prepared"] for r in rounds] == [False] + [True] * (ROUNDS - 1)
    for record in rounds:
        assert len(record["clients"]) == 3 and record["failed"] == [], record["failed"]  # secure aggregation samples at least 3
        assert record["secagg_bytes_masked"] == 3 * 2 * (summary["adapter_parameters"] + ring.WEIGHT_DIGITS)
        assert record["secagg_bytes_keys"] > 0 and record["secagg_bytes_shares"] > 0
        assert all(c["resident"] and c["secagg_mask_seconds"] > 0 for c in record["clients"])  # the resident trainer trained, the ClientApp masked
    assert summary["final_train_loss"] < rounds[0]["train_loss"] * 1.5
