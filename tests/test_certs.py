import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from app.certs import CertPaths, describe, ensure_certs, init_certs


def _load(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_server_certificate_has_sans_and_chains_to_ca(tmp_path):
    paths = init_certs(tmp_path, ["superlink", "10.0.0.5"])
    server, ca = _load(paths.server_cert), _load(paths.ca_cert)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["superlink", "localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("127.0.0.1")]
    ca.public_key().verify(server.signature, server.tbs_certificate_bytes, ec.ECDSA(server.signature_hash_algorithm))
    assert server.issuer == ca.subject


def test_private_keys_are_0600_and_never_overwritten(tmp_path):
    paths = init_certs(tmp_path, ["superlink"])
    for key in (paths.ca_key, paths.server_key):
        assert key.stat().st_mode & 0o777 == 0o600
    before = paths.ca_key.read_bytes()
    with pytest.raises(FileExistsError, match="ca.key exists; refusing to overwrite"):
        init_certs(tmp_path, ["superlink"])
    assert paths.ca_key.read_bytes() == before
    init_certs(tmp_path, ["superlink"], force=True)
    assert paths.ca_key.read_bytes() != before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_ensure_keeps_valid_and_refuses_expired(tmp_path):
    first = ensure_certs(tmp_path, ["127.0.0.1"])
    key = first.server_key.read_bytes()
    assert ensure_certs(tmp_path, ["127.0.0.1"]).server_key.read_bytes() == key
    init_certs(tmp_path, ["127.0.0.1"], days=0, force=True)  # expires as it is made
    with pytest.raises(ValueError, match="superlink.crt expired"):
        ensure_certs(tmp_path, ["127.0.0.1"])
    assert "(EXPIRED)" in describe(CertPaths(tmp_path).server_cert)


def test_show_prints_fingerprint_and_sans(tmp_path, capsys):
    from app.cli import main

    assert main(["certs", "init", "--dir", str(tmp_path), "--san", "superlink"]) == 0
    assert main(["certs", "show", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "SANs: superlink, localhost, 127.0.0.1" in out and "SHA-256: " in out
    assert "PRIVATE KEY" not in out
    assert main(["certs", "init", "--dir", str(tmp_path)]) == 2
