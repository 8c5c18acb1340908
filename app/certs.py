"""Certificates for TLS on every Flower API: a CA and the SuperLink's server certificate.

Private keys are written with mode 0600 through a temporary file and a rename, and an existing
key is never overwritten (pass `force=True` to `init_certs` to start over).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DEFAULT_SANS = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class CertPaths:
    directory: Path

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


def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        os.fchmod(fd, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def init_certs(directory: Path, sans: list[str], days: int = 365, force: bool = False) -> CertPaths:
    """Create the CA and the SuperLink certificate (SANs: `sans` + localhost, 127.0.0.1)."""
    paths = CertPaths(Path(directory))
    existing = [p for p in (paths.ca_key, paths.server_key) if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{existing[0]} exists; refusing to overwrite a private key (use --force to start over)")
    now = dt.datetime.now(dt.timezone.utc)
    start = now - dt.timedelta(hours=1)  # tolerate small clock skew between sites
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtune CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    names = list(dict.fromkeys([*sans, *DEFAULT_SANS]))
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    _write(paths.ca_key, _key_pem(ca_key), private=True)
    _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(paths.server_key, _key_pem(server_key), private=True)
    _write(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    return paths


def ensure_certs(directory: Path, sans: list[str]) -> CertPaths:
    """Keep valid existing certificates; create them when missing."""
    paths = CertPaths(Path(directory))
    if all(p.exists() for p in (paths.ca_cert, paths.server_cert, paths.server_key)):
        cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
        if cert.not_valid_after_utc > dt.datetime.now(dt.timezone.utc):
            return paths
        raise ValueError(f"{paths.server_cert} expired on {cert.not_valid_after_utc:%Y-%m-%d}; run `fedtune certs init --force`")
    return init_certs(directory, sans)


def describe(path: Path) -> str:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        san_text = ", ".join(str(n.value) for n in sans)
    except x509.ExtensionNotFound:
        san_text = "-"
    expired = " (EXPIRED)" if cert.not_valid_after_utc < dt.datetime.now(dt.timezone.utc) else ""
    return (
        f"{path.name}: subject {cert.subject.rfc4514_string()}, issuer {cert.issuer.rfc4514_string()}\n"
        f"  SANs: {san_text}\n  SHA-256: {cert.fingerprint(hashes.SHA256()).hex(':')}\n"
        f"  expires: {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC{expired}"
    )


def register(subparsers) -> None:
    certs = subparsers.add_parser("certs", help="TLS certificates").add_subparsers(dest="certs_command", required=True)
    init = certs.add_parser("init", help="create the CA and the SuperLink certificate")
    init.add_argument("--dir", default="certs/generated")
    init.add_argument("--san", action="append", default=[], help="DNS name or IP of the SuperLink (repeatable)")
    init.add_argument("--days", type=int, default=365)
    init.add_argument("--force", action="store_true", help="replace existing keys")
    init.set_defaults(func=_init)
    show = certs.add_parser("show", help="print subjects, SANs, fingerprints and expiry")
    show.add_argument("--dir", default="certs/generated")
    show.set_defaults(func=_show)


def _init(args) -> int:
    try:
        paths = init_certs(Path(args.dir), args.san or ["superlink"], args.days, args.force)
    except FileExistsError as exc:
        print(f"fedtune: {exc}")
        return 2
    print(f"wrote {paths.ca_cert}, {paths.server_cert} (keys mode 0600)")
    return 0


def _show(args) -> int:
    found = sorted(Path(args.dir).glob("*.crt"))
    if not found:
        print(f"fedtune: no certificates in {args.dir}")
        return 2
    for path in found:
        print(describe(path))
    return 0
