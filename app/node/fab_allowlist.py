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
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ALLOWED_FABS_ENV = "FEDTUNE_ALLOWED_FABS"  # the site's extra approved bundles: sha256 hex, space/comma-separated
APP_ROOT = Path(__file__).resolve().parents[2]  # pyproject.toml and app/: what `flwr run` bundles
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
    digest = own_fab_sha256()
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(digest)
    os.replace(tmp, cache)
    return digest


def gated_clientapp(site_listed: set[str], own_hash_cache: Path) -> None:
    """flwr's `flwr-clientapp`, with the bundle checked before it is installed: its SHA-256 must
    be this installation's own app or one the site listed."""
    from app.node.flwr_patches import import_clientapp_command

    flwr_clientapp = import_clientapp_command()  # without the SuperNode's own imports (issue 16)
    from flwr.supernode.runtime import run_clientapp

    install = getattr(run_clientapp, "install_from_fab", None)
    if install is None:  # another flwr: refuse everything rather than run unchecked bundles
        sys.exit("fedtune: flwr's ClientApp runtime has no install_from_fab to guard; refusing to run any bundle")

    def checked_install(fab_content: bytes, *args, **kwargs):
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


@dataclass
class ClientAppGate:
    """The private directory holding the `flwr-clientapp` shim; `env` puts it first on PATH."""

    directory: Path
    env: dict[str, str]

    @classmethod
    def install(cls) -> ClientAppGate:
        listed = site_approved()
        directory = Path(tempfile.mkdtemp(prefix="fedtune-clientapp-"))  # 0700: only this node's user
        shim = directory / "flwr-clientapp"
        shim.write_text(
            f"#!{sys.executable}\n"
            "# written by `fedtune supernode` (app/node/fab_allowlist.py): flwr-clientapp with the site's bundle allowlist\n"
            "import sys\n"
            "from pathlib import Path\n"
            f"sys.path.insert(0, {str(APP_ROOT)!r})\n"
            "from app.node.fab_allowlist import gated_clientapp\n"
            f"gated_clientapp(set({listed!r}), Path({str(directory / 'own-app.sha256')!r}))\n"
        )
        shim.chmod(0o700)
        path = os.pathsep.join([str(directory), os.environ.get("PATH", "")])
        return cls(directory, {"PATH": path})

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
