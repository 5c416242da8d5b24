"""`fedcvr keys init`: a CA, the SuperLink's TLS certificate and merchant node keys, as Flower reads them."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key
from cryptography.hazmat.primitives.serialization.ssh import load_ssh_public_key
from typer.testing import CliRunner

from fedcvr.cli import app
from fedcvr.server.keys import KeysError, init_keys


def test_keys_are_what_flower_and_tls_need(tmp_path):
    keys = init_keys(tmp_path / "k", ["127.0.0.1", "coordinator.example.org"], merchants=3)
    ca = x509.load_pem_x509_certificate(keys.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(keys.superlink_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # signed by the CA, for exactly the given names
    ca.public_key().verify(server.signature, server.tbs_certificate_bytes, ec.ECDSA(hashes.SHA384()))
    assert server.issuer == ca.subject
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert names.get_values_for_type(x509.DNSName) == ["coordinator.example.org"]
    server_key = load_pem_private_key(keys.superlink_key.read_bytes(), None)
    assert server_key.public_key().public_numbers() == server.public_key().public_numbers()
    # node keys: OpenSSH EC P-384, as flower-supernode and `flwr supernode register` load them
    assert len(keys.merchant_keys) == 3
    for private, public in zip(keys.merchant_keys, keys.merchant_public_keys()):
        key = load_ssh_private_key(private.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert load_ssh_public_key(public.read_bytes()).public_numbers() == key.public_key().public_numbers()
    from flwr.cli.supernode.register import try_load_public_key  # what `flwr supernode register KEY.pub` runs

    assert all(try_load_public_key(p) for p in keys.merchant_public_keys())
    for private in [keys.ca_key, keys.superlink_key, *keys.merchant_keys]:
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private


def test_keys_are_never_overwritten_and_bad_input_is_named(tmp_path):
    init_keys(tmp_path / "k", ["127.0.0.1"], merchants=1)
    before = (tmp_path / "k" / "ca.key").read_bytes()
    with pytest.raises(KeysError, match="never overwritten"):
        init_keys(tmp_path / "k", ["127.0.0.1"], merchants=1)
    assert (tmp_path / "k" / "ca.key").read_bytes() == before
    with pytest.raises(KeysError, match="--merchants 0"):
        init_keys(tmp_path / "a", ["127.0.0.1"], merchants=0)
    with pytest.raises(KeysError, match="not a host name or IP address"):
        init_keys(tmp_path / "b", ["https://127.0.0.1:9092"], merchants=1)
    assert not (tmp_path / "b").exists()


def test_cli_writes_keys_and_refuses_a_used_folder(tmp_path):
    args = ["keys", "init", str(tmp_path / "k"), "--superlink-host", "127.0.0.1", "--superlink-host", "localhost",
            "--merchants", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "k" / "merchants" / "merchant-02.pub").exists() and "2 merchant key pair(s)" in result.output
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "never overwritten" in " ".join(again.output.split())


def test_a_tls_client_trusting_the_ca_accepts_the_superlink_and_a_stranger_ca_does_not(tmp_path):
    import socket
    import ssl
    import threading

    keys = init_keys(tmp_path / "k", ["127.0.0.1"], merchants=1)
    other = init_keys(tmp_path / "other", ["127.0.0.1"], merchants=1)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(keys.superlink_cert, keys.superlink_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve(count):
        for _ in range(count):
            conn, _ = listener.accept()
            try:
                with server_context.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, args=(2,), daemon=True)
    thread.start()
    try:
        trusting = ssl.create_default_context(cafile=str(keys.ca_cert))
        with socket.create_connection(("127.0.0.1", port)) as raw, \
                trusting.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.recv(2) == b"ok"
        stranger = ssl.create_default_context(cafile=str(other.ca_cert))
        with pytest.raises(ssl.SSLCertVerificationError), socket.create_connection(("127.0.0.1", port)) as raw:
            stranger.wrap_socket(raw, server_hostname="127.0.0.1")
    finally:
        thread.join(timeout=5)
        listener.close()
