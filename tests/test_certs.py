import argparse
import datetime as dt
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification

from app.deploy.certs import (
    CertError,
    CertPaths,
    ensure_certs,
    flower_tls_args,
    flwr_cli_config,
    init_certs,
    register_supernode_command,
    show,
)
from app.cli import main


def _load(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


def _verify_as_tls_client(ca_path, cert_path, name):
    """Path validation as a TLS client does it: chain to our CA, name in the SANs, validity, EKU."""
    store = verification.Store([_load(ca_path)])
    try:
        subject = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        subject = x509.DNSName(name)
    verifier = verification.PolicyBuilder().store(store).build_server_verifier(subject)
    verifier.verify(_load(cert_path), [])


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return init_certs(tmp_path_factory.mktemp("certs"), ["superlink", "10.0.0.5"], num_supernodes=2)


def _snapshot(paths):
    return {p.name: p.read_bytes() for p in paths.directory.iterdir()}


def test_server_certificate_has_sans_and_chains_to_ca(generated):
    sans = _load(generated.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["superlink", "localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(a) for a in ("10.0.0.5", "127.0.0.1", "::1")]
    for name in ("superlink", "10.0.0.5", "localhost", "127.0.0.1", "::1"):
        _verify_as_tls_client(generated.ca_cert, generated.server_cert, name)
    with pytest.raises(verification.VerificationError):
        _verify_as_tls_client(generated.ca_cert, generated.server_cert, "10.0.0.6")
    other = init_certs(generated.directory.parent / "other-ca", ["superlink"])
    with pytest.raises(verification.VerificationError):
        _verify_as_tls_client(other.ca_cert, generated.server_cert, "superlink")
    # each SuperNode's Runtime API certificate: self-signed (its own SuperExec trusts exactly it,
    # the CA has no part), its own name and loopback
    runtime = _load(generated.runtime_cert(1))
    assert runtime.issuer == runtime.subject and runtime.issuer != _load(generated.ca_cert).subject
    runtime.verify_directly_issued_by(runtime)
    sans = runtime.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["supernode-1", "localhost"]


def test_private_files_are_0600_and_public_ones_0644(generated):
    private = [generated.ca_key, generated.server_key, generated.edge_key, generated.superexec_secret,
               *(p for i in range(2) for p in (generated.supernode_key(i), generated.runtime_key(i)))]
    for path in generated.all_files():
        assert path.stat().st_mode & 0o777 == (0o600 if path in private else 0o644), path
    secret = generated.superexec_secret.read_bytes()
    assert len(secret) >= 32 and not secret.endswith(b"\n")


def test_supernode_keys_load_with_flowers_own_loaders(generated):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    for i in range(2):
        private, public = _try_setup_client_authentication(
            argparse.Namespace(auth_supernode_private_key=str(generated.supernode_key(i)), auth_supernode_public_key=None))
        assert isinstance(private.curve, ec.SECP384R1)
        registered = try_load_public_key(generated.supernode_pub(i))  # what `flwr supernode register` sends
        assert registered == public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert generated.supernode_key(0).read_bytes() != generated.supernode_key(1).read_bytes()


def test_refuses_to_overwrite_without_force(generated, capsys):
    before = _snapshot(generated)
    with pytest.raises(CertError, match=r"refusing to overwrite .*ca\.key.*use --force"):
        init_certs(generated.directory, ["superlink"], num_supernodes=2)
    assert main(["certs", "init", "--dir", str(generated.directory), "--supernodes", "2"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert _snapshot(generated) == before


def test_write_never_clobbers_a_file_that_appeared_meanwhile(tmp_path):
    from app.deploy.certs import _write

    target = tmp_path / "ca.key"
    target.write_bytes(b"made by someone else")
    with pytest.raises(CertError, match=r"ca\.key exists; refusing to overwrite it"):
        _write(target, b"new", private=True, force=False)
    assert target.read_bytes() == b"made by someone else"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.key"]


def test_force_replaces_everything_and_leaves_no_temp_files(tmp_path):
    paths = init_certs(tmp_path, ["superlink"], num_supernodes=1)
    before = _snapshot(paths)
    assert main(["certs", "init", "--dir", str(tmp_path), "--supernodes", "1", "--force"]) == 0
    after = _snapshot(paths)
    assert after.keys() == before.keys()
    assert all(after[name] != before[name] for name in before)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert paths.ca_key.stat().st_mode & 0o777 == 0o600


def test_ensure_is_idempotent_and_fills_in_what_is_missing(tmp_path):
    paths = ensure_certs(tmp_path, ["superlink"], num_supernodes=2)
    first = _snapshot(paths)
    assert _snapshot(ensure_certs(tmp_path, ["superlink"], num_supernodes=2)) == first
    paths.supernode_pub(1).unlink()
    paths.superexec_secret.unlink()
    more = ensure_certs(tmp_path, ["superlink"], num_supernodes=3)
    now = _snapshot(more)
    assert now["supernode-1.pub"] == first["supernode-1.pub"]  # rebuilt from the kept private key
    assert now["superexec.secret"] != first["superexec.secret"]
    assert {k: v for k, v in now.items() if k in first and k != "superexec.secret"} == {k: v for k, v in first.items() if k != "superexec.secret"}
    assert more.supernode_key(2).exists() and more.runtime_cert(2).exists()
    _load(more.runtime_cert(2)).verify_directly_issued_by(_load(more.runtime_cert(2)))


def test_ensure_refuses_invalid_material_without_touching_it(tmp_path):
    paths = ensure_certs(tmp_path, ["superlink"])
    before = _snapshot(paths)
    with pytest.raises(CertError, match=r"superlink\.crt lacks SAN\(s\) 10\.0\.0\.9"):
        ensure_certs(tmp_path, ["superlink", "10.0.0.9"])
    assert _snapshot(paths) == before
    other = init_certs(tmp_path / "other", ["superlink"])
    os.replace(other.server_cert, paths.server_cert)
    os.replace(other.server_key, paths.server_key)
    with pytest.raises(CertError, match=r"superlink\.crt is not signed by .*ca\.crt"):
        ensure_certs(tmp_path, ["superlink"])
    assert paths.ca_key.read_bytes() == before["ca.key"]


def test_ensure_refuses_a_supernode_key_flower_cannot_load(tmp_path):
    paths = ensure_certs(tmp_path, ["superlink"], num_supernodes=1)
    paths.supernode_key(0).write_bytes(paths.server_key.read_bytes())  # PEM/PKCS8: flwr wants OpenSSH
    with pytest.raises(CertError, match=r"supernode-0\.key: expected an unencrypted OpenSSH private key"):
        ensure_certs(tmp_path, ["superlink"], num_supernodes=1)


def test_expired_certificate_is_refused_and_shown(tmp_path, capsys):
    paths = init_certs(tmp_path, ["superlink"], num_supernodes=1, days=0)  # valid until the moment it is made
    with pytest.raises(CertError, match=r"ca\.crt expired on"):
        ensure_certs(tmp_path, ["superlink"], num_supernodes=1)
    assert show(tmp_path) == 1
    captured = capsys.readouterr()
    assert captured.out.count("(EXPIRED)") == 4  # CA, SuperLink, edge, SuperNode 0 Runtime API
    assert "expired" in captured.err
    assert _load(paths.server_cert).not_valid_after_utc <= dt.datetime.now(dt.timezone.utc)


def test_show_prints_sans_fingerprints_and_no_secret(generated, capsys):
    assert main(["certs", "show", "--dir", str(generated.directory)]) == 0
    out = capsys.readouterr().out
    assert "SANs: superlink, 10.0.0.5, localhost, 127.0.0.1, ::1" in out
    assert _load(generated.server_cert).fingerprint(hashes.SHA256()).hex(":").upper() in out
    assert "supernode-1.pub: ecdsa-sha2-nistp384 SHA256:" in out
    assert "(EXPIRED)" not in out and "WARNING" not in out
    assert "PRIVATE KEY" not in out and generated.superexec_secret.read_text() not in out
    generated.ca_key.chmod(0o644)
    try:
        assert main(["certs", "show", "--dir", str(generated.directory)]) == 0
        assert "WARNING: readable by group or others (expected mode 0600): ca.key" in capsys.readouterr().out
    finally:
        generated.ca_key.chmod(0o600)


def test_role_args_parse_with_the_installed_flower(generated):
    from flwr.supercore.cli.flower_superexec import _parse_args as superexec_parser
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    link = _parse_args_run_superlink().parse_args(flower_tls_args("superlink", generated, isolation="process"))
    assert link.enable_supernode_auth and not link.insecure and link.isolation == "process"
    assert link.ssl_certfile == str(generated.server_cert) and link.superexec_auth_secret_file == str(generated.superexec_secret)
    assert _parse_args_run_superlink().parse_args(flower_tls_args("superlink", generated)).superexec_auth_secret_file is None
    node = _parse_args_run_supernode().parse_args(flower_tls_args("supernode", generated, 1))
    assert node.auth_supernode_private_key == str(generated.supernode_key(1)) and node.root_certificates == str(generated.ca_cert)
    assert node.ssl_certfile == str(generated.runtime_cert(1)) and not node.insecure
    assert node.ssl_ca_certfile == str(generated.runtime_cert(1))  # trusts its own Runtime API certificate only
    execs = superexec_parser().parse_args([*flower_tls_args("superexec-serverapp", generated), "--runtime-api-address", "x:1"])
    assert execs.root_certificates == str(generated.ca_cert) and execs.superexec_auth_secret_file == str(generated.superexec_secret)
    with pytest.raises(ValueError, match="node_index"):
        flower_tls_args("supernode", generated)


def test_cli_config_is_read_by_flwr(generated, tmp_path):
    import tomllib

    from flwr.cli.flower_config import parse_superlink_connection

    text = flwr_cli_config(generated, "127.0.0.1:9093", "lab")
    conn = parse_superlink_connection(tomllib.loads(text)["superlink"]["lab"], "lab")
    assert conn.address == "127.0.0.1:9093" and not conn.insecure
    assert conn.root_certificates == str(generated.ca_cert.resolve()) and Path(conn.root_certificates).is_absolute()


# ---------------------------------------------------------------------------- real processes

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(proc) -> None:
    """Stop a process and everything it started (a SuperNode's SuperExec can outlive it)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _supernode(tmp_path, name, args, superlink) -> str:
    """Run a SuperNode that gives up after one retry; its exit status must be an error. Returns its output."""
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_HOME=str(tmp_path / name))
    cmd = [str(BIN / "flower-supernode"), *args, "--superlink", superlink, "--port", str(_free_port()),
           "--max-retries", "1", "--max-wait-time", "10"]
    log = tmp_path / f"{name}.log"
    with open(log, "w") as out:  # a file, not a pipe: a lingering child would keep a pipe open
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert proc.wait(60) != 0, log.read_text()
    finally:
        _stop(proc)
    return log.read_text()


def test_tls_auth_superlink_refuses_unregistered_plaintext_and_removed_supernodes(tmp_path):
    paths = init_certs(tmp_path / "certs", ["superlink"], num_supernodes=2)
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_HOME=str(tmp_path / "cli"))
    (tmp_path / "cli").mkdir()
    (tmp_path / "cli" / "config.toml").write_text(flwr_cli_config(paths, address, "lab"))
    with open(tmp_path / "superlink.log", "w") as log:
        link = subprocess.Popen(
            [str(BIN / "flower-superlink"), *flower_tls_args("superlink", paths, isolation="process"),
             "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    online = None
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                assert time.time() < deadline and link.poll() is None, (tmp_path / "superlink.log").read_text()
                time.sleep(0.2)

        # node 0's key is never registered: refused at activation
        assert "[code: 2004] Failed to activate SuperNode" in _supernode(tmp_path, "n0", flower_tls_args("supernode", paths, 0), address)
        # plaintext: the HTTPS port drops it before any HTTP is spoken
        assert "Server disconnected without sending a response" in _supernode(tmp_path, "plain", ["--insecure"], address)
        # TLS but a CA that did not sign the SuperLink's certificate
        other = init_certs(tmp_path / "other", ["superlink"], num_supernodes=1)
        assert "CERTIFICATE_VERIFY_FAILED" in _supernode(tmp_path, "wrongca", ["--root-certificates", str(other.ca_cert)], address)

        # control: node 1, registered, connects with the same flags
        flwr, *rest = register_supernode_command(paths, 1, "lab")
        reg = subprocess.run([str(BIN / flwr), *rest], env=env, capture_output=True, text=True, timeout=60)
        assert reg.returncode == 0, reg.stdout + reg.stderr
        node_id = reg.stdout.split("SuperNode ")[1].split()[0]
        node_env = dict(env, FLWR_HOME=str(tmp_path / "n1"))
        with open(tmp_path / "n1.log", "w") as out:
            online = subprocess.Popen(
                [str(BIN / "flower-supernode"), *flower_tls_args("supernode", paths, 1), "--superlink", address,
                 "--port", str(_free_port())],
                env=node_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 30
        while f"[Fleet.ActivateNode] Activated node_id={node_id}" not in (tmp_path / "superlink.log").read_text():
            assert time.time() < deadline and online.poll() is None, (tmp_path / "superlink.log").read_text()
            time.sleep(0.3)

        # removed from the federation while connected: the node is cut off and exits
        unreg = subprocess.run([str(BIN / "flwr"), "supernode", "unregister", node_id, "lab"], env=env,
                               capture_output=True, text=True, timeout=60)
        assert unreg.returncode == 0, unreg.stdout + unreg.stderr
        try:  # flwr 1.42 answers its next pull with 401 and the node stops, with status 0
            assert online.wait(timeout=60) == 0, (tmp_path / "n1.log").read_text()
        except subprocess.TimeoutExpired:
            raise AssertionError("an unregistered SuperNode kept running:\n" + (tmp_path / "superlink.log").read_text()) from None
        link_log = (tmp_path / "superlink.log").read_text()
        after = link_log[link_log.index("ControlServicer.UnregisterNode"):]
        assert '"POST /v1/fleet/pull-messages HTTP/1.1" 401' in after, link_log
    finally:
        for proc in (online, link):
            if proc is not None:
                _stop(proc)


def test_site_init_makes_a_sites_own_files_and_only_the_public_key_is_needed(tmp_path, capsys):
    """A site makes its key pair and Runtime API certificate itself; the coordinator needs only
    the .pub (registered as is) and the site only the coordinator's ca.crt."""
    coordinator = init_certs(tmp_path / "coordinator", ["superlink"], num_supernodes=0)
    assert not list(coordinator.directory.glob("supernode-*"))
    assert main(["certs", "site-init", "--dir", str(tmp_path / "site"), "--index", "3"]) == 0
    site = CertPaths(tmp_path / "site")
    out = capsys.readouterr().out
    assert "send " + str(site.supernode_pub(3)) in out and "never leave this machine" in out
    for path in (site.supernode_key(3), site.runtime_key(3)):
        assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in site.directory.iterdir()) == [
        "supernode-3-runtime.crt", "supernode-3-runtime.key", "supernode-3.key", "supernode-3.pub"]
    # the coordinator keeps its CA and registers the public key it was handed
    (coordinator.directory / "supernode-3.pub").write_bytes(site.supernode_pub(3).read_bytes())
    ensure_certs(coordinator.directory, ["superlink"], num_supernodes=0)
    assert main(["certs", "site-init", "--dir", str(tmp_path / "site"), "--index", "3"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
