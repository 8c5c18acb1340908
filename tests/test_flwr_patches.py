"""The runtime patches of flwr 1.42.0 (app/node/flwr_patches.py): what they change, and that they refuse any other flwr."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
from processes import Processes
from waiting import wait_until

from app.node import flwr_patches
from app.node.flwr_patches import POLL_ENV, PatchRefused


def test_poll_setting_is_checked_and_names_itself():
    assert flwr_patches.poll_seconds({}) is None
    assert flwr_patches.poll_seconds({POLL_ENV: ""}) is None  # set empty: Flower's own waits
    assert flwr_patches.poll_seconds({POLL_ENV: "0.5"}) == 0.5
    for bad in ("fast", "0.05", "10", "nan"):
        with pytest.raises(PatchRefused, match=f"{POLL_ENV}=.*between 0.2 and 3"):
            flwr_patches.poll_seconds({POLL_ENV: bad})


def test_the_supernode_command_is_flowers_own_unless_the_poll_is_set():
    assert flwr_patches.supernode_command({}) == ["flower-supernode"]
    assert flwr_patches.supernode_command({POLL_ENV: "0.5"}) == [sys.executable, "-m", "app.node.flwr_patches"]


def test_any_other_flwr_is_refused(monkeypatch):
    monkeypatch.setattr(flwr_patches, "installed_flwr", lambda: "1.43.0")
    with pytest.raises(PatchRefused, match="patches flwr 1.42.0's SuperNode; this is flwr 1.43.0"):
        flwr_patches.supernode_command({POLL_ENV: "0.5"})
    with pytest.raises(PatchRefused, match="1.43.0"):
        flwr_patches.apply(0.5)
    assert flwr_patches.supernode_command({}) == ["flower-supernode"]  # unset: nothing patched, nothing refused


def test_the_supernode_waits_are_shortened_and_nothing_else(monkeypatch):
    from flwr.supernode import start_client_internal

    monkeypatch.setattr(start_client_internal, "time", start_client_internal.time)  # restored after the test
    monkeypatch.setattr(start_client_internal, "pull_objects", start_client_internal.pull_objects)
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    flwr_patches.apply(0.5)
    for asked in (3, 0.5, 1, 2.5):
        start_client_internal.time.sleep(asked)
    assert slept == [0.5, flwr_patches.REPLY_WAIT_SECONDS, 1, 2.5]
    assert start_client_internal.time.monotonic is time.monotonic  # the rest of `time` is untouched
    assert start_client_internal.pull_objects.keywords == {"initial_backoff": flwr_patches.PULL_RETRY_SECONDS}


def test_a_changed_supernode_source_is_refused(monkeypatch):
    """The literals it replaces are checked in the source: a same-numbered flwr with other waits is not patched blind."""
    monkeypatch.setattr(flwr_patches, "IDLE_SLEEP", 4)
    with pytest.raises(PatchRefused, match="is not flwr 1.42.0's"):
        flwr_patches.apply(0.5)


def _clientapp_imports(installed: str) -> dict:
    code = (
        "import json, sys\n"
        "from app.node import flwr_patches\n"
        f"flwr_patches.installed_flwr = lambda: {installed!r}\n"
        "entry = flwr_patches.import_clientapp_command()\n"
        "print(json.dumps({'entry': entry.__module__ + '.' + entry.__name__,"
        " 'sqlalchemy': 'sqlalchemy' in sys.modules,"
        " 'supernode': 'flwr.supernode.cli.flower_supernode' in sys.modules}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_clientapp_process_does_not_import_the_supernode():
    """On flwr 1.42.0 the ClientApp entry comes without the SuperNode's object store (sqlalchemy);
    on another flwr it is the ordinary import (which does bring it: so the check can tell)."""
    entry = "flwr.supernode.cli.flwr_clientapp.flwr_clientapp"
    assert _clientapp_imports("1.42.0") == {"entry": entry, "sqlalchemy": False, "supernode": False}
    assert _clientapp_imports("1.43.0") == {"entry": entry, "sqlalchemy": True, "supernode": True}


def test_a_patched_supernode_polls_the_superlink_at_the_set_period(tmp_path):
    """Real processes: a SuperLink and two `fedtune supernode`s, one with the poll set. Over the same
    idle stretch the SuperLink sees the patched node ask about every 0.5 s and the other every 3 s."""
    from app.deploy.launcher import flower_env, free_port

    port = free_port()
    with Processes(tmp_path / "logs", flower_env(tmp_path / "home")) as procs:
        superlink = procs.start("superlink", ["flower-superlink", "--insecure", "--port", str(port)], {"FLWR_LOG_LEVEL": "DEBUG"})
        logs = {"patched": procs.supernode("patched", port, tmp_path / "patched", {POLL_ENV: "0.5"}),
                "stock": procs.supernode("stock", port, tmp_path / "stock", {POLL_ENV: ""})}

        def node_id(name: str) -> str | None:
            found = re.search(r"SuperNode ID: (\d+)", logs[name].read_text(errors="replace"))
            return found.group(1) if found else None

        wait_until(lambda: node_id("patched") and node_id("stock"), 180, "both SuperNodes to connect")
        time.sleep(3)  # both past their first polls
        before = superlink.read_text(errors="replace")
        time.sleep(12)
        window = superlink.read_text(errors="replace")[len(before):]
        polls = {n: len(re.findall(rf"\[Fleet.PullMessages\] node_id={node_id(n)}\b", window)) for n in ("patched", "stock")}
        assert 14 <= polls["patched"] <= 26, polls  # 12 s / 0.5 s = 24, less each request's own time
        assert 3 <= polls["stock"] <= 5, polls  # 12 s / 3 s = 4


def test_a_missing_object_is_retried_after_a_tenth_of_a_second_not_flowers_second(monkeypatch):
    """A SuperLink publishes a reply before its objects arrive; the ServerApp's pull then waited 1 s."""
    from flwr.superlink.grid import http_grid
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)  # restored after the test

    def pull_once() -> float:
        calls: list[str] = []

        def pull_object(object_id: str) -> bytes:
            calls.append(object_id)
            if len(calls) == 1:
                raise ObjectUnavailableError(object_id)  # still uploading
            return b"content"

        started = time.monotonic()
        assert http_grid.pull_objects(["id"], pull_object_fn=pull_object) == {"id": b"content"}
        return time.monotonic() - started

    assert pull_once() >= 0.75  # flwr's first wait: 1 s, +-20 %
    assert flwr_patches.shorten_pull_retry(http_grid)
    assert pull_once() < 0.3


def test_the_pull_retry_is_left_alone_on_another_flwr(monkeypatch):
    from flwr.superlink.grid import http_grid

    original = http_grid.pull_objects
    monkeypatch.setattr(flwr_patches, "installed_flwr", lambda: "1.43.0")
    assert not flwr_patches.shorten_pull_retry(http_grid)
    assert http_grid.pull_objects is original


class _RuntimeWithReplies:
    """The Runtime API as the ServerApp's grid sees it: replies published with their object trees,
    their objects pulled one request each (counted)."""

    def __init__(self, replies) -> None:
        from flwr.app.message import remove_content_from_message
        from flwr.common.serde import message_to_proto
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree

        self.protos = [message_to_proto(remove_content_from_message(r)) for r in replies]
        self.trees = [get_object_tree(r) for r in replies]
        self.objects = {i: o.deflate() for r in replies for i, o in get_all_nested_objects(r).items()}
        self.pulled: list[str] = []

    def PullMessages(self, request):  # noqa: N802 (flwr's names)
        from flwr.proto.runtime_pb2 import PullAppMessagesResponse

        return PullAppMessagesResponse(messages_list=self.protos, message_object_trees=self.trees)

    def PullObject(self, request):  # noqa: N802
        from flwr.proto.message_pb2 import PullObjectResponse

        self.pulled.append(request.object_id)
        return PullObjectResponse(object_found=True, object_available=True, object_content=self.objects[request.object_id])

    def ConfirmMessageReceived(self, request):  # noqa: N802
        return None


def _reply(monkeypatch, arrays: dict[str, int]):
    """A reply as a node sends it: uint8 arrays of the given byte counts, wire and metrics records."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 7)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    rng = np.random.default_rng(len(arrays))
    records = ArrayRecord({k: Array(rng.integers(0, 256, n, dtype=np.uint8)) for k, n in arrays.items()})
    reply = Message(RecordDict({"arrays": records, "wire": ConfigRecord({"index": "[]"}), "metrics": MetricRecord({"num-examples": 1})}),
                    dst_node_id=0, message_type="train")
    reply.metadata.__dict__["_message_id"] = reply.object_id
    return reply


def _pull(monkeypatch, reply):
    """The reply through flwr's own HttpGrid.pull_messages, and what it pulled."""
    from flwr.superlink.grid.http_grid import HttpGrid
    from flwr.supercore.run import Run

    grid, runtime = HttpGrid(token="t"), _RuntimeWithReplies([reply])
    grid._client, grid._run = runtime, Run.create_empty(1)
    (message,) = grid.pull_messages([reply.metadata.message_id])
    return message, runtime


def test_a_reply_far_above_its_expected_size_is_refused_before_it_is_pulled(monkeypatch):
    """The ServerApp's grid learns each reply's object tree (ids, no sizes) before it pulls a byte.
    A reply with more objects than one of the expected size is an error reply with nothing pulled;
    one whose objects add up past the expected bytes stops being pulled at that point; an honest
    reply is untouched."""
    from flwr.superlink.grid import http_grid

    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)  # restored after the test
    assert flwr_patches.shorten_pull_retry(http_grid)
    assert flwr_patches.bound_reply_pulls(http_grid, max_bytes=2 << 20)

    honest = _reply(monkeypatch, {"packed": 1 << 20})
    message, _ = _pull(monkeypatch, honest)
    assert not message.has_error()
    assert bytes(message.content["arrays"]["packed"].data) == bytes(honest.content["arrays"]["packed"].data)

    many = _reply(monkeypatch, {f"t{i}": 64 for i in range(40)})  # 40 arrays, 40 chunks, 3 records, RecordDict, Message
    message, runtime = _pull(monkeypatch, many)
    assert message.has_error() and "its tree has 85 objects" in message.error.reason, message.error.reason
    assert runtime.pulled == []

    assert flwr_patches.bound_reply_pulls(http_grid, max_bytes=2 << 20, max_arrays=100)  # the bound replaced, not nested
    large = _reply(monkeypatch, {f"t{i}": 256 << 10 for i in range(40)})  # 10 MiB in 40 arrays
    message, runtime = _pull(monkeypatch, large)
    assert message.has_error() and "exceed 2097152 bytes" in message.error.reason, message.error.reason
    pulled = sum(len(runtime.objects[i]) for i in runtime.pulled)
    assert pulled <= (2 << 20) + 2 * (256 << 10) + 4096, pulled  # the bound, plus flwr's 2 pulls in flight
    assert len(runtime.pulled) < len(runtime.objects) / 2
    message, _ = _pull(monkeypatch, many)  # within the new bound
    assert not message.has_error()
    assert http_grid.pull_objects.pull.keywords == {"initial_backoff": flwr_patches.PULL_RETRY_SECONDS}


def test_the_reply_bound_is_left_alone_on_another_flwr(monkeypatch):
    from flwr.superlink.grid import http_grid

    original = http_grid.pull_objects
    monkeypatch.setattr(flwr_patches, "installed_flwr", lambda: "1.43.0")
    assert not flwr_patches.bound_reply_pulls(http_grid, max_bytes=1 << 20)
    assert http_grid.pull_objects is original
    with pytest.raises(ValueError, match="max_bytes"):
        flwr_patches.bound_reply_pulls(http_grid, max_bytes=0)
