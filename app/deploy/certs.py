"""Certificates, keys and secrets for TLS on every Flower API and SuperNode authentication.

One directory holds everything a deployment needs (flwr 1.42, checked by running it; see
certs/README.md):

    ca.crt, ca.key                  our CA; every client verifies its server against ca.crt
    superlink.crt, superlink.key    the SuperLink's one HTTPS port (Fleet, Control, Runtime APIs)
    edge.crt, edge.key              the TLS edge at a coordinating site: what remote sites dial;
                                    it forwards the Fleet API only (docker/edge-nginx.conf)
    superexec.secret                shared secret of a Runtime API and its SuperExec (process isolation)
    supernode-<i>.key, .pub         SuperNode i's ECDSA P-384 authentication key pair, OpenSSH
                                    format: what `flower-supernode --auth-supernode-private-key`
                                    and `flwr supernode register` load
    supernode-<i>-runtime.crt, .key SuperNode i's own Runtime API (its SuperExec and ClientApps):
                                    self-signed, its own trust anchor; the CA has no part in it

A site makes its SuperNode's files itself (`fedtune certs site-init`) and hands over only
supernode-<i>.pub, which the coordinator registers; `init --supernodes N` makes them centrally
for a single-host deployment.

Private keys and the secret are mode 0600, written to a temporary file and then linked into
place, so an existing file is never replaced unless `force` is given.

`service_files` says which of these files each service may hold (one definition for the compose
generator's mounts and the stack's `certs` service, which copies each service its own set).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import secrets
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Always in: a SuperLink bound to 0.0.0.0 or [::] starts its own SuperExec against 127.0.0.1 or [::1].
DEFAULT_SANS = ("localhost", "127.0.0.1", "::1")
NODE_SANS = ("supernode-{i}",)  # names of SuperNode i's Runtime API, besides DEFAULT_SANS
# `flwr supernode register` accepts any NIST curve and names P-384 in its help.
SUPERNODE_CURVE = ec.SECP384R1
CLOCK_SKEW = dt.timedelta(hours=1)  # certificates start an hour early: sites' clocks differ


class CertError(Exception):
    """A file is missing, invalid or would be overwritten; the message names it."""


@dataclass(frozen=True)
class CertPaths:
    directory: Path
    num_supernodes: int = 0

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.directory / "superlink.crt"

    @property
    def server_key(self) -> Path:
        return self.directory / "superlink.key"

    @property
    def edge_cert(self) -> Path:
        return self.directory / "edge.crt"

    @property
    def edge_key(self) -> Path:
        return self.directory / "edge.key"

    @property
    def superexec_secret(self) -> Path:
        return self.directory / "superexec.secret"

    def supernode_key(self, index: int) -> Path:
        return self.directory / f"supernode-{index}.key"

    def supernode_pub(self, index: int) -> Path:
        return self.directory / f"supernode-{index}.pub"

    def runtime_cert(self, index: int) -> Path:
        return self.directory / f"supernode-{index}-runtime.crt"

    def runtime_key(self, index: int) -> Path:
        return self.directory / f"supernode-{index}-runtime.key"

    def node_files(self, index: int) -> list[Path]:
        return [self.supernode_key(index), self.supernode_pub(index), self.runtime_key(index), self.runtime_cert(index)]

    def all_files(self) -> list[Path]:
        nodes = [p for i in range(self.num_supernodes) for p in self.node_files(i)]
        return [self.ca_key, self.ca_cert, self.server_key, self.server_cert, self.edge_key, self.edge_cert,
                self.superexec_secret, *nodes]


# The services that hold certificate material, and what each needs (the issuer alone holds ca.key).
SERVICES = ("superlink", "edge", "serverapp", "register", "run", "supernode")


def service_files(service: str, paths: CertPaths, node_index: int | None = None) -> list[Path]:
    """The files `service` needs, and the only ones it is given: ca.key goes nowhere, node keys
    only to their own SuperNode, the SuperExec secret only to the SuperLink and its SuperExec."""
    if service == "superlink":
        return [paths.ca_cert, paths.server_cert, paths.server_key, paths.superexec_secret]
    if service == "edge":
        return [paths.ca_cert, paths.edge_cert, paths.edge_key]
    if service == "serverapp":
        return [paths.ca_cert, paths.superexec_secret]
    if service == "register":
        return [paths.ca_cert, *(paths.supernode_pub(i) for i in range(paths.num_supernodes))]
    if service == "run":
        return [paths.ca_cert]
    if service == "supernode":
        if node_index is None:
            raise ValueError("service 'supernode' needs node_index")
        return [paths.ca_cert, paths.supernode_key(node_index), paths.runtime_cert(node_index), paths.runtime_key(node_index)]
    raise ValueError(f"unknown service {service!r}; expected one of {', '.join(SERVICES)}")


def export_service_files(paths: CertPaths, service: str, target: Path, node_index: int | None = None,
                         owner: tuple[int, int] | None = None) -> list[Path]:
    """Copy `service`'s files from the issuer's directory into `target` (its own volume), each
    written atomically with its mode (keys and secret 0600) and, as root, chowned to `owner`.
    Copies are replaced, so a re-issued certificate reaches every service on the next start."""
    written = []
    for source in service_files(service, paths, node_index):
        private = source.suffix in (".key", ".secret")
        dest = target / source.name
        _write(dest, source.read_bytes(), private=private, force=True, owner=owner)
        written.append(dest)
    return written


# ---------------------------------------------------------------------------- writing


def write_private(path: Path, data: bytes, owner: tuple[int, int] | None = None) -> None:
    """Replace `path` atomically with `data`, readable by its owner only (0600); `owner` (uid, gid) as root."""
    _write(path, data, private=True, force=True, owner=owner)


def _write(path: Path, data: bytes, private: bool, force: bool, owner: tuple[int, int] | None = None) -> None:
    """Write atomically; without `force`, fail rather than replace an existing file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        os.fchmod(fd, 0o600 if private else 0o644)
        if owner is not None:
            os.fchown(fd, *owner)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic and, unlike rename, never clobbers
            except FileExistsError:
                raise CertError(f"{path} exists; refusing to overwrite it (use --force to replace it)") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _names(sans: Sequence[str]) -> list[str]:
    return list(dict.fromkeys([*sans, *DEFAULT_SANS]))


def _node_names(node_sans: Sequence[str], index: int) -> list[str]:
    return _names([t.format(i=index) for t in node_sans])


def _make_ca(paths: CertPaths, days: int, force: bool) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    now = dt.datetime.now(dt.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtune CA")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(paths.ca_key, _pem_key(key), private=True, force=force)
    _write(paths.ca_cert, cert.public_bytes(serialization.Encoding.PEM), private=False, force=force)
    return key, cert


def _make_server(cert_path: Path, key_path: Path, ca_key, ca_cert: x509.Certificate, names: list[str], days: int, force: bool) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        # never outlive the CA: a chain with an expired CA fails however new the leaf is
        .not_valid_before(now - CLOCK_SKEW).not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(key_path, _pem_key(key), private=True, force=force)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False, force=force)


def _make_runtime(paths: CertPaths, index: int, names: list[str], days: int, force: bool) -> None:
    """SuperNode `index`'s Runtime API certificate, self-signed: only the node's own SuperExec and
    ClientApps connect to it, and they trust exactly this certificate (flower_tls_args)."""
    now = dt.datetime.now(dt.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(paths.runtime_key(index), _pem_key(key), private=True, force=force)
    _write(paths.runtime_cert(index), cert.public_bytes(serialization.Encoding.PEM), private=False, force=force)


def _make_secret(paths: CertPaths, force: bool) -> None:
    # flwr reads the file as exact raw bytes: no trailing newline for an editor to drop or add.
    _write(paths.superexec_secret, secrets.token_urlsafe(32).encode("ascii"), private=True, force=force)


def _ssh_pub(key: ec.EllipticCurvePrivateKey, index: int) -> bytes:
    blob = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return blob + f" fedtune-supernode-{index}\n".encode()


def _make_node_key(paths: CertPaths, index: int, force: bool) -> None:
    key = ec.generate_private_key(SUPERNODE_CURVE())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    _write(paths.supernode_key(index), pem, private=True, force=force)
    _write(paths.supernode_pub(index), _ssh_pub(key, index), private=False, force=force)


# ---------------------------------------------------------------------------- loading and checking


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise CertError(f"{path} is missing; expected a PEM certificate") from None
    except ValueError as exc:
        raise CertError(f"{path}: expected a PEM certificate ({exc})") from None


def _load_pem_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise CertError(f"{path} is missing; expected the private key of the certificate beside it") from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CertError(f"{path}: expected an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{path}: expected an EC private key")
    return key


def load_supernode_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The key as flower-supernode loads it: OpenSSH format, EC on a NIST curve, no passphrase."""
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CertError(f"{path}: expected an unencrypted OpenSSH private key (as `fedtune certs site-init` or `ssh-keygen -t ecdsa -N ""` writes)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{path}: expected an ECDSA key (flwr accepts NIST P-256/384/521), got {type(key).__name__}")
    return key


def _expired(cert: x509.Certificate) -> bool:
    return cert.not_valid_after_utc <= dt.datetime.now(dt.timezone.utc)


def _sans_of(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n.value) for n in ext]


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def _same_public_key(a, b) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return a.public_bytes(*fmt) == b.public_bytes(*fmt)


def _check_server(cert_path: Path, key_path: Path, ca: x509.Certificate, ca_path: Path, names: list[str]) -> None:
    cert = _load_cert(cert_path)
    if _expired(cert):
        raise CertError(f"{cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; run `fedtune certs init --force`")
    if not _signed_by(cert, ca):
        raise CertError(f"{cert_path} is not signed by {ca_path}; run `fedtune certs init --force`")
    missing = [n for n in names if n not in _sans_of(cert)]
    if missing:
        raise CertError(f"{cert_path} lacks SAN(s) {', '.join(missing)}; run `fedtune certs init --force` with every --san")
    if not _same_public_key(_load_pem_key(key_path).public_key(), cert.public_key()):
        raise CertError(f"{key_path} does not match {cert_path}")


def _check_node_key(paths: CertPaths, index: int) -> None:
    key = load_supernode_key(paths.supernode_key(index))
    pub_path = paths.supernode_pub(index)
    if not pub_path.exists():  # the public half can always be rebuilt from the private one
        _write(pub_path, _ssh_pub(key, index), private=False, force=False)
        return
    try:
        pub = serialization.load_ssh_public_key(pub_path.read_bytes())
    except (ValueError, UnsupportedAlgorithm):
        raise CertError(f"{pub_path}: expected an OpenSSH public key (ecdsa-sha2-nistp384 ...)") from None
    if not _same_public_key(pub, key.public_key()):
        raise CertError(f"{pub_path} does not match {paths.supernode_key(index)}")


# ---------------------------------------------------------------------------- API


def init_certs(
    directory: Path, sans: Sequence[str], num_supernodes: int = 0, days: int = 365, force: bool = False,
    node_sans: Sequence[str] = NODE_SANS,
) -> CertPaths:
    """Create everything anew; refuse (naming the files) if any of them exists, unless `force`."""
    paths = CertPaths(Path(directory), num_supernodes)
    existing = [str(p) for p in paths.all_files() if p.exists()]
    if existing and not force:
        more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        raise CertError(f"refusing to overwrite {', '.join(existing[:3])}{more} (use --force to replace them all)")
    ca_key, ca_cert = _make_ca(paths, days, force)
    _make_server(paths.server_cert, paths.server_key, ca_key, ca_cert, _names(sans), days, force)
    _make_server(paths.edge_cert, paths.edge_key, ca_key, ca_cert, _names(sans), days, force)
    _make_secret(paths, force)
    for i in range(num_supernodes):
        _make_node_key(paths, i, force)
        _make_runtime(paths, i, _node_names(node_sans, i), days, force)
    return paths


def site_init(directory: Path, index: int, days: int = 365, force: bool = False, node_sans: Sequence[str] = NODE_SANS) -> CertPaths:
    """A site's own SuperNode files, made where they are used: the authentication key pair and
    the Runtime API certificate. Only supernode-<index>.pub leaves the site (the coordinator
    registers it); the site also needs the coordinator's ca.crt, which is public."""
    paths = CertPaths(Path(directory))
    files = [paths.supernode_key(index), paths.supernode_pub(index), paths.runtime_key(index), paths.runtime_cert(index)]
    existing = [str(p) for p in files if p.exists()]
    if existing and not force:
        raise CertError(f"refusing to overwrite {', '.join(existing)} (use --force to replace them)")
    _make_node_key(paths, index, force)
    _make_runtime(paths, index, _node_names(node_sans, index), days, force)
    return paths


def ensure_certs(
    directory: Path, sans: Sequence[str], num_supernodes: int = 0, days: int = 365, node_sans: Sequence[str] = NODE_SANS,
) -> CertPaths:
    """Create what is missing, keep what exists and is valid; raise CertError on anything invalid.

    Never replaces a file: an expired or mismatched certificate needs `fedtune certs init --force`,
    because everyone who holds the old CA or keys has to be given the new ones.
    """
    paths = CertPaths(Path(directory), num_supernodes)
    ca_key = None
    if not paths.ca_cert.exists():
        signed = [str(p) for p in paths.all_files() if p.suffix == ".crt" and p.exists()]
        if paths.ca_key.exists() or signed:
            raise CertError(f"{paths.ca_cert} is missing but {paths.ca_key if paths.ca_key.exists() else signed[0]} exists; "
                            "run `fedtune certs init --force`")
        ca_key, ca_cert = _make_ca(paths, days, force=False)
    else:
        ca_cert = _load_cert(paths.ca_cert)
        if _expired(ca_cert):
            raise CertError(f"{paths.ca_cert} expired on {ca_cert.not_valid_after_utc:%Y-%m-%d}; run `fedtune certs init --force`")

    def server(cert: Path, key: Path, names: list[str]) -> None:
        nonlocal ca_key
        if cert.exists() or key.exists():
            _check_server(cert, key, ca_cert, paths.ca_cert, names)
            return
        if ca_key is None:
            if not paths.ca_key.exists():
                raise CertError(f"{cert} is missing and {paths.ca_key}, needed to sign a new one, is not here")
            ca_key = _load_pem_key(paths.ca_key)
        _make_server(cert, key, ca_key, ca_cert, names, days, force=False)

    server(paths.server_cert, paths.server_key, _names(sans))
    server(paths.edge_cert, paths.edge_key, _names(sans))
    if not paths.superexec_secret.exists():
        _make_secret(paths, force=False)
    elif not paths.superexec_secret.read_bytes():
        raise CertError(f"{paths.superexec_secret} is empty; expected the SuperExec shared secret")
    for i in range(num_supernodes):
        if paths.supernode_key(i).exists():
            _check_node_key(paths, i)
        else:
            _make_node_key(paths, i, force=paths.supernode_pub(i).exists())  # a .pub without its key is useless
        runtime = paths.runtime_cert(i)
        if runtime.exists() or paths.runtime_key(i).exists():  # self-signed: its own issuer
            _check_server(runtime, paths.runtime_key(i), _load_cert(runtime), runtime, _node_names(node_sans, i))
        else:
            _make_runtime(paths, i, _node_names(node_sans, i), days, force=False)
    return paths


def flower_tls_args(role: str, paths: CertPaths, node_index: int | None = None, isolation: str = "subprocess") -> list[str]:
    """TLS and authentication arguments of each Flower 1.42 process: one definition for launcher and compose.

    "superlink"            flower-superlink: TLS on its one port, SuperNode authentication on.
    "superexec-serverapp"  flower-superexec --runtime-api-address <SuperLink host:port> (SuperLink
                           with isolation="process").
    "supernode"            flower-supernode, node `node_index`: TLS to the SuperLink, its auth key,
                           TLS on its own Runtime API.
    "superexec-clientapp"  flower-superexec --runtime-api-address <SuperNode host:port> (SuperNode
                           with isolation="process"); that address must be one of the node's SANs.
    `isolation` is returned as `--isolation` because the shared secret goes with it: flwr uses the
    secret only with "process" and ignores it, with a warning, with "subprocess".
    """
    ca, secret = str(paths.ca_cert), str(paths.superexec_secret)
    if isolation not in ("subprocess", "process"):
        raise ValueError(f"isolation must be 'subprocess' or 'process', not {isolation!r}")
    with_secret = ["--superexec-auth-secret-file", secret] if isolation == "process" else []
    if role == "superlink":
        return ["--ssl-certfile", str(paths.server_cert), "--ssl-keyfile", str(paths.server_key), "--ssl-ca-certfile", ca,
                "--enable-supernode-auth", "--isolation", isolation, *with_secret]
    if role in ("superexec-serverapp", "superexec-clientapp"):
        return ["--root-certificates", ca, "--superexec-auth-secret-file", secret]
    if role == "supernode":
        if node_index is None:
            raise ValueError("role 'supernode' needs node_index")
        return ["--root-certificates", ca, "--auth-supernode-private-key", str(paths.supernode_key(node_index)),
                "--ssl-certfile", str(paths.runtime_cert(node_index)), "--ssl-keyfile", str(paths.runtime_key(node_index)),
                # its SuperExec and ClientApps trust the node's own self-signed certificate only
                "--ssl-ca-certfile", str(paths.runtime_cert(node_index)), "--isolation", isolation, *with_secret]
    raise ValueError(f"unknown role {role!r}; expected superlink, superexec-serverapp, supernode or superexec-clientapp")


def flwr_cli_config(paths: CertPaths, address: str, name: str = "fedtune") -> str:
    """$FLWR_HOME/config.toml for `flwr run/ls/supernode ...` over TLS; flwr requires an absolute path."""
    root = str(paths.ca_cert.resolve())
    return f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\nroot-certificates = "{root}"\n'


def register_supernode_command(paths: CertPaths, node_index: int, connection: str = "fedtune") -> list[str]:
    """Registers node `node_index`'s key; run it before that SuperNode starts: an unknown key exits at once."""
    return ["flwr", "supernode", "register", str(paths.supernode_pub(node_index)), connection, "--name", f"supernode-{node_index}"]


# ---------------------------------------------------------------------------- show


def _ssh_fingerprint(pub_line: bytes) -> str:
    """As `ssh-keygen -lf` prints it."""
    blob = base64.b64decode(pub_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def describe(path: Path) -> tuple[str, bool]:
    """A certificate's summary and whether it has expired."""
    cert = _load_cert(path)
    expired = _expired(cert)
    text = (
        f"{path.name}: subject {cert.subject.rfc4514_string()}, issuer {cert.issuer.rfc4514_string()}\n"
        f"  SANs: {', '.join(_sans_of(cert)) or '-'}\n"
        f"  SHA-256: {cert.fingerprint(hashes.SHA256()).hex(':').upper()}\n"
        f"  expires: {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC{' (EXPIRED)' if expired else ''}"
    )
    return text, expired


def _natural(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in path.name.replace(".", "-").split("-")]


def show(directory: Path) -> int:
    """Print every certificate and SuperNode public key; 1 if any certificate has expired."""
    directory = Path(directory)
    certs = sorted(directory.glob("*.crt"), key=lambda p: (p.name != "ca.crt", p.name != "superlink.crt", _natural(p)))
    if not certs:
        print(f"fedtune: no certificates (*.crt) in {directory}; run `fedtune certs init --dir {directory}`", file=sys.stderr)
        return 2
    any_expired = False
    for path in certs:
        try:
            text, expired = describe(path)
        except CertError as exc:
            text, expired = f"{exc}", True
        any_expired |= expired
        print(text)
    for path in sorted(directory.glob("supernode-*.pub"), key=_natural):
        line = path.read_bytes()
        try:
            serialization.load_ssh_public_key(line)
            print(f"{path.name}: {line.split()[0].decode()} {_ssh_fingerprint(line)}")
        except (ValueError, IndexError, UnsupportedAlgorithm):
            print(f"{path.name}: not an OpenSSH public key")
    loose = [p.name for p in directory.iterdir() if p.suffix in (".key", ".secret") and p.stat().st_mode & 0o077]
    if loose:
        print(f"WARNING: readable by group or others (expected mode 0600): {', '.join(sorted(loose))}")
    if any_expired:
        print("fedtune: expired or unreadable certificate(s) above; run `fedtune certs init --force`", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------- CLI


def register(subparsers) -> None:
    certs = subparsers.add_parser("certs", help="TLS certificates and SuperNode keys").add_subparsers(dest="certs_command", required=True)
    init = certs.add_parser("init", help="create CA, certificates, SuperExec secret and SuperNode keys")
    init.add_argument("--dir", default="certs/generated")
    init.add_argument("--san", action="append", default=[], help="DNS name or IP of the SuperLink (repeatable)")
    init.add_argument("--node-san", action="append", default=[],
                      help="name of SuperNode {i}'s Runtime API, {i} replaced (repeatable; default supernode-{i})")
    init.add_argument("--supernodes", type=int, default=20, help="SuperNode key pairs to create (default 20)")
    init.add_argument("--days", type=int, default=365)
    init.add_argument("--force", action="store_true", help="replace existing files (new CA: hand out ca.crt and keys again)")
    init.set_defaults(func=_init)
    site = certs.add_parser("site-init", help="at a site: make this SuperNode's key pair and Runtime API certificate")
    site.add_argument("--dir", default="certs/site")
    site.add_argument("--index", type=int, required=True, help="this site's partition id i (files supernode-<i>.*)")
    site.add_argument("--node-san", action="append", default=[], help="name of the Runtime API, {i} replaced (default supernode-{i})")
    site.add_argument("--days", type=int, default=365)
    site.add_argument("--force", action="store_true", help="replace existing files (then register the new .pub)")
    site.set_defaults(func=_site_init)
    show_cmd = certs.add_parser("show", help="print subjects, SANs, fingerprints and expiry")
    show_cmd.add_argument("--dir", default="certs/generated")
    show_cmd.set_defaults(func=lambda args: show(Path(args.dir)))


def _init(args) -> int:
    if args.days < 1 or args.supernodes < 0:
        print("fedtune: --days must be >= 1 and --supernodes >= 0", file=sys.stderr)
        return 2
    sans = args.san or ["superlink"]
    try:
        [t.format(i=0) for t in args.node_san]
    except (KeyError, IndexError, ValueError):
        print(f"fedtune: --node-san {args.node_san}: expected names with at most a {{i}} placeholder", file=sys.stderr)
        return 2
    try:
        paths = init_certs(Path(args.dir), sans, args.supernodes, args.days, args.force, args.node_san or NODE_SANS)
    except CertError as exc:
        print(f"fedtune: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {paths.directory}: ca.crt, superlink.crt and edge.crt (SANs {', '.join(_names(sans))}), superexec.secret, "
          f"{args.supernodes} SuperNode key pair(s) and Runtime API certificate(s); private keys and secret mode 0600")
    return 0


def _site_init(args) -> int:
    if args.days < 1 or args.index < 0:
        print("fedtune: --days must be >= 1 and --index >= 0", file=sys.stderr)
        return 2
    try:
        paths = site_init(Path(args.dir), args.index, args.days, args.force, args.node_san or NODE_SANS)
    except CertError as exc:
        print(f"fedtune: {exc}", file=sys.stderr)
        return 2
    pub = paths.supernode_pub(args.index)
    print(f"wrote {paths.directory}: supernode-{args.index}.key and supernode-{args.index}-runtime.key (private, mode 0600; "
          f"they never leave this machine), supernode-{args.index}-runtime.crt and {pub.name}\n"
          f"send {pub} ({_ssh_fingerprint(pub.read_bytes())}) to the coordinator; get its ca.crt into {paths.directory}")
    return 0
