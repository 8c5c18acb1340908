"""A SuperNode runs only the app bundles (FABs) its site approved.

Anyone who reaches a SuperLink's Control API can submit a bundle, and every SuperNode would run
it: flwr 1.42's SuperExec starts `flwr-clientapp` (by name, from PATH) for each message, which
pulls the bundle, installs it and imports its ClientApp. flwr's own guard, `--trusted-entities`,
needs signatures that only Flower's hosted app platform attaches (`verifications`, set by the
SuperLink when it fetches a Hub app); a locally built bundle carries none and is refused
outright, so it cannot be used here.

So the site checks the bundle itself, in code the site controls: `fedtune supernode` puts a
`flwr-clientapp` of its own first on the SuperNode's PATH. It runs flwr's ClientApp process with
one step added: before the bundle is installed, the SHA-256 of its bytes must be the hash of the
bundle built from this installation's own app (the image's) or one the site lists in
FEDTUNE_ALLOWED_FABS. Anything else is refused with an error reply to the server,
before a single file of it is unpacked, let alone imported.

A ClientApp is not the only thing a SuperNode's SuperExec starts: it starts one command per task
type (`flwr.supercore.constant.TASK_TYPE_TO_COMMAND`), and flwr 1.42's SuperNode turns every
message of an *agent* run into an AGENT_APP task, started as `flwr-agentapp`, which installs and
imports the bundle unchecked. A fedtune node runs ClientApps only, so every other task command
is shadowed on the same PATH by one that refuses the task: it says so in the node's log and
finishes the task as failed (the run's message gets an error reply), never fetching the bundle
(tests/test_node_guards.py checks that every task type of the installed flwr has a command here).
A SuperExec the node does not start itself (`--isolation process`) would start commands from its
own PATH: `fedtune supernode` refuses that mode.

The `flwr-clientapp` shim starts warm: it asks the node's ClientApp fork server (in the same
private directory, app/node/clientapp_forkserver.py) for a child that has flwr's runtime imported
already and runs `gated_clientapp` with this shim's argv, environment and stdio; the bundle check
runs there, as here. When the fork server is unreachable or refuses, the shim says so and runs
`gated_clientapp` itself. `FEDTUNE_CLIENTAPP_FORKSERVER=0` writes the shim without the fork server.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


ALLOWED_FABS_ENV = "FEDTUNE_ALLOWED_FABS"  # the site's extra approved bundles: sha256 hex, space/comma-separated
APP_ROOT = Path(__file__).resolve().parents[2]  # pyproject.toml and app/: what `flwr run` bundles
CLIENTAPP_COMMAND = "flwr-clientapp"
FORKSERVER_SCRIPT = "clientapp-forkserver"  # the ClientApp fork server's script and socket, beside
SOCKET_NAME = "clientapp.sock"  # the shims in the gate's directory (not task commands)
# Every other command flwr 1.42's SuperExec starts for a task (TaskType's values): each refused.
REFUSED_TASK_COMMANDS = {
    "flwr-agentapp": "AgentApp",
    "flwr-connector": "connector",
    "flwr-model": "model",
    "flwr-serverapp": "ServerApp",
    "flwr-simulation": "simulation",
}
_SHA256 = re.compile(r"[0-9a-f]{64}")


class FabRefused(RuntimeError):
    """The submitted bundle is not one this site approved."""


def fab_sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def own_fab_sha256() -> str:
    """The hash of the bundle `flwr run` builds from this installation (deterministic: flwr fixes
    the zip timestamps and the pyproject's fab-include fixes the file set)."""
    from flwr.cli.build import build_fab_from_disk

    return fab_sha256(build_fab_from_disk(APP_ROOT))


def site_approved() -> list[str]:
    """The hashes in FEDTUNE_ALLOWED_FABS; a malformed entry is an error naming it."""
    listed = [h for h in re.split(r"[\s,]+", os.environ.get(ALLOWED_FABS_ENV, "").strip().lower()) if h]
    bad = [h for h in listed if not _SHA256.fullmatch(h)]
    if bad:
        raise ValueError(f"{ALLOWED_FABS_ENV}: {bad[0]!r} is not a SHA-256 (64 hex digits)")
    return listed


def _own_fab_sha256_cached(cache: Path) -> str:
    """own_fab_sha256, computed by the first ClientApp of this SuperNode and kept in its private
    gate directory (the wrapper itself stays small: it never imports flwr)."""
    if cache.exists():
        return cache.read_text().strip()
    started = time.monotonic()
    digest = own_fab_sha256()
    # Seconds of a ClientApp's start (flwr's build walks the whole installation): `fedtune local
    # up` lists the hash for its nodes so that none of them pays this.
    print(f"fedtune: hashed this node's own app bundle for the bundle check ({time.monotonic() - started:.1f} s)", file=sys.stderr, flush=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(digest)
    os.replace(tmp, cache)
    return digest


def gated_clientapp(site_listed: set[str], own_hash_cache: Path, process_start_ticks: int | None = None) -> None:
    """flwr's `flwr-clientapp`, with the bundle checked before it is installed: its SHA-256 must
    be this installation's own app or one the site listed. `process_start_ticks`: when this
    process is the fork server's child, its shim's start (the ClientApp's `t_process_start`)."""
    from app.node.clientapp_shim import PROCESS_START_TICKS_ENV, PULLED_AT_ENV
    from app.node.flwr_patches import import_clientapp_command

    os.environ.pop(PROCESS_START_TICKS_ENV, None)  # only ever this process's own shim's
    os.environ.pop(PULLED_AT_ENV, None)
    if process_start_ticks is not None:
        os.environ[PROCESS_START_TICKS_ENV] = str(process_start_ticks)

    flwr_clientapp = import_clientapp_command()  # without the SuperNode's own imports (issue 16)
    from flwr.supernode.runtime import run_clientapp

    install = getattr(run_clientapp, "install_from_fab", None)
    if install is None:  # another flwr: refuse everything rather than run unchecked bundles
        sys.exit("fedtune: flwr's ClientApp runtime has no install_from_fab to guard; refusing to run any bundle")

    def checked_install(fab_content: bytes, *args, **kwargs):
        os.environ[PULLED_AT_ENV] = repr(time.time())  # flwr installs the bundle right after pulling the task
        digest = fab_sha256(fab_content)
        if digest not in site_listed and digest != _own_fab_sha256_cached(own_hash_cache):
            raise FabRefused(f"app bundle sha256 {digest} is not approved by this site "
                             f"(approved: this node's own app and {ALLOWED_FABS_ENV})")
        return install(fab_content, *args, **kwargs)

    run_clientapp.install_from_fab = checked_install
    # the bundle's own modules come from where flwr installs it, not from the ones the shim imported
    for name in [m for m in sys.modules if m == "app" or m.startswith("app.")]:
        del sys.modules[name]
    if str(APP_ROOT) in sys.path:
        sys.path.remove(str(APP_ROOT))
    flwr_clientapp()


def superexec_elsewhere(flower_args: list[str]) -> bool:
    """Whether these flower-supernode arguments leave the SuperExec to a separate process
    (`--isolation process`): that one starts task commands from its own PATH, outside this gate."""
    parser = argparse.ArgumentParser(add_help=False)  # abbreviations as flwr's parser takes them
    parser.add_argument("--isolation", default="subprocess")
    try:
        return parser.parse_known_args(flower_args)[0].isolation != "subprocess"
    except SystemExit:  # e.g. --isolation without a value: not provably the gated mode
        return True


def refuse_task(command: str, argv: list[str]) -> int:
    """A task command this node does not run, started with flwr's arguments `argv`: say so in the
    node's log and finish the task as failed, without installing its bundle.

    The SuperExec that started this process (its parent) writes to the node's log; flwr sends a
    ServerApp or simulation task's own output to /dev/null, so the refusal goes to the parent's."""
    reason = (f"refused {_article(REFUSED_TASK_COMMANDS[command])} task ({command}): this node runs "
              "only ClientApp bundles its site approved; the bundle was not installed")
    problem = _fail_task(command, argv, f"fedtune {reason}")
    message = f"fedtune: {reason}" + (f" ({problem})" if problem else "") + "\n"
    try:
        with open(f"/proc/{os.getppid()}/fd/2", "a") as node_log:
            node_log.write(message)
    except OSError:
        sys.stderr.write(message)
    return 1


def _fail_task(command: str, argv: list[str], reason: str) -> str | None:
    """Finish the task as failed through the node's Runtime API (with the token flwr started this
    process with); None, or what went wrong. flwr 1.42's SuperNode handles one message at a time
    and waits for its reply: a task left unfinished would stall the node (its SuperExec starts it
    again each time its token expires), a failed one gets the run's message an error reply."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--runtime-api-address", default="")
    parser.add_argument("--token", default="")
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--root-certificates")
    args, _ = parser.parse_known_args(argv)
    if not (args.runtime_api_address and args.token):
        return "no Runtime API address or token to finish the task with"
    from flwr.common.constant import SubStatus
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PushTaskOutputRequest
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    try:
        client = RuntimeHttpClient.from_server_address(
            server_address=args.runtime_api_address,
            insecure=args.insecure,
            root_certificates=validate_and_resolve_root_certificates(args.root_certificates, args.insecure),
            interceptors=[RuntimeVersionHttpInterceptor(component_name=command), RuntimeTokenHttpInterceptor(args.token)],
        )
        try:
            # The task's message taken (metadata and object ids only), so that failing the task
            # answers it: flwr errors the messages an AgentApp task took when the task fails.
            client.PullMessages(PullAppMessagesRequest())
            client.PushTaskOutput(PushTaskOutputRequest(sub_status=SubStatus.FAILED, details=reason))
        finally:
            client.close()
    except Exception as exc:  # the refusal stands; the SuperNode expires the task's token instead
        return f"could not mark the task failed: {type(exc).__name__}: {exc}"
    return None


def _article(kind: str) -> str:
    return ("an " if kind[0].lower() in "aeiou" else "a ") + kind


def clientapp_shim(listed: list[str], own_hash_cache: Path, forkserver_socket: Path | None) -> str:
    """The text of the `flwr-clientapp` shim: the gated ClientApp, started by the fork server
    listening at `forkserver_socket` when it can, else in the shim's own process."""
    gated = f"gated_clientapp(set({listed!r}), Path({str(own_hash_cache)!r}))\n"
    prelude = f"import sys\nsys.path.insert(0, {str(APP_ROOT)!r})\n"
    if forkserver_socket is None:
        return (_shim_header("flwr-clientapp with the site's bundle allowlist") + prelude
                + "from pathlib import Path\nfrom app.node.fab_allowlist import gated_clientapp\n" + gated)
    return (_shim_header("flwr-clientapp with the site's bundle allowlist, started warm by the node's ClientApp "
                         "fork server (app/node/clientapp_forkserver.py)") + prelude
            + "from app.node.clientapp_shim import run_shim\n"
            + f"code = run_shim({str(forkserver_socket)!r})\n"
            + "if code is not None:\n    sys.exit(code)\n"
            + "# the fork server is unreachable or refused: the gated ClientApp in this process, as without one\n"
            + "from pathlib import Path\nfrom app.node.fab_allowlist import gated_clientapp\n" + gated)


def _shim_header(what: str) -> str:
    return f"#!{sys.executable}\n# written by `fedtune supernode` (app/node/fab_allowlist.py): {what}\n"


@dataclass
class TaskCommandGate:
    """The private directory holding a shim for every command a SuperNode's SuperExec starts:
    `flwr-clientapp` with the bundle allowlist, every other one refused. `env` puts it first on PATH.
    With `forkserver_command`, the ClientApp fork server the shim asks first (its socket is
    `forkserver_socket`; `fedtune supernode` runs it, app/node/clientapp_forkserver.py)."""

    directory: Path
    env: dict[str, str]
    forkserver_command: list[str] | None = None
    forkserver_socket: Path | None = None

    @classmethod
    def install(cls, forkserver: bool = False) -> TaskCommandGate:
        listed = site_approved()
        directory = Path(tempfile.mkdtemp(prefix="fedtune-tasks-"))  # 0700: only this node's user
        own_hash_cache = directory / "own-app.sha256"
        socket_path = directory / SOCKET_NAME if forkserver else None
        prelude = f"import sys\nfrom pathlib import Path\nsys.path.insert(0, {str(APP_ROOT)!r})\n"
        shims = {CLIENTAPP_COMMAND: clientapp_shim(listed, own_hash_cache, socket_path)}
        for command in REFUSED_TASK_COMMANDS:
            shims[command] = (_shim_header("a task this node does not run") + prelude
                              + f"from app.node.fab_allowlist import refuse_task\nsys.exit(refuse_task({command!r}, sys.argv[1:]))\n")
        if socket_path is not None:
            # Started like the shim (same interpreter, script directory and sys.path), so that its
            # children see the modules and paths the shim's own process would.
            shims[FORKSERVER_SCRIPT] = (
                _shim_header("the ClientApp fork server of this node (app/node/clientapp_forkserver.py)") + prelude
                + "from app.node.clientapp_forkserver import serve_gated\n"
                + f"sys.exit(serve_gated({str(socket_path)!r}, set({listed!r}), {str(own_hash_cache)!r}))\n")
        for command, text in shims.items():
            shim = directory / command
            shim.write_text(text)
            shim.chmod(0o700)
        path = os.pathsep.join([str(directory), os.environ.get("PATH", "")])
        if socket_path is None:
            return cls(directory, {"PATH": path})
        return cls(directory, {"PATH": path}, [str(directory / FORKSERVER_SCRIPT)], socket_path)

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
