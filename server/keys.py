"""Keys and certificates for a real deployment, made with the `cryptography` package (no openssl).

`init_keys(folder, hosts, merchants)` writes:

    ca.pem, ca.key                 a certificate authority (EC P-384) that signs the SuperLink's certificate;
                                   merchants get ca.pem to check whom they talk to
    superlink.pem, superlink.key   the SuperLink's TLS certificate for the given host names and IP addresses
    merchants/merchant-NN(.pub)    one EC P-384 key pair per merchant node, in OpenSSH format, as Flower's node
                                   authentication reads it (`flower-supernode --auth-supernode-private-key`,
                                   `flwr supernode register KEY.pub`)

Private keys are written with mode 0600. Nothing is ever overwritten: a folder that already holds any of these
files is refused.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CURVE = ec.SECP384R1()
PRIVATE_MODE = 0o600


class KeysError(ValueError):
    """Bad input to `init_keys`; the message names the value and the fix."""


@dataclass
class KeySet:
    """The files `init_keys` wrote."""

    folder: Path
    ca_cert: Path
    ca_key: Path
    superlink_cert: Path
    superlink_key: Path
    merchant_keys: list[Path] = field(default_factory=list)

    def merchant_public_keys(self) -> list[Path]:
        return [p.with_name(p.name + ".pub") for p in self.merchant_keys]


def _names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        host = host.strip()
        if not host:
            raise KeysError("--superlink-host '': give the host name or IP address merchants connect to, "
                            "e.g. --superlink-host 127.0.0.1")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if any(c.isspace() or c in "/:@" for c in host):
                raise KeysError(f"--superlink-host {host!r}: not a host name or IP address (no scheme, port or "
                                "path: e.g. coordinator.example.org or 10.0.0.5)") from None
            names.append(x509.DNSName(host))
    return names


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, PRIVATE_MODE)  # whatever the umask


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate(subject: str, public_key, issuer: x509.Name | None, signer: ec.EllipticCurvePrivateKey,
                 days: int, ca: bool, names: list[x509.GeneralName] | None = None) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedcvr federation")])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name).public_key(public_key)
               .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                      content_commitment=False, key_encipherment=False,
                                                      data_encipherment=False, key_agreement=False,
                                                      encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = (builder.add_extension(x509.SubjectAlternativeName(names or []), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=True,
                                                encipher_only=False, decipher_only=False), critical=True))
    return builder.sign(signer, hashes.SHA384())


def init_keys(folder: Path, hosts: list[str], merchants: int, days: int = 365) -> KeySet:
    """Create the CA, the SuperLink's TLS certificate for `hosts` and `merchants` node key pairs in `folder`."""
    if isinstance(merchants, bool) or not isinstance(merchants, int) or merchants < 1:
        raise KeysError(f"--merchants {merchants!r}: must be a whole number >= 1 (one key pair per merchant node)")
    if not hosts:
        raise KeysError("no --superlink-host: give each name or IP address merchants use to reach the SuperLink")
    if days < 1:
        raise KeysError(f"--days {days}: certificates must be valid for at least 1 day")
    names = _names(hosts)
    folder = Path(folder)
    keys = KeySet(folder, folder / "ca.pem", folder / "ca.key", folder / "superlink.pem", folder / "superlink.key",
                  [folder / "merchants" / f"merchant-{i:02d}" for i in range(1, merchants + 1)])
    planned = [keys.ca_cert, keys.ca_key, keys.superlink_cert, keys.superlink_key, *keys.merchant_keys,
               *keys.merchant_public_keys()]
    existing = [str(p) for p in planned if p.exists()]
    if existing:
        raise KeysError(f"{folder}: already holds {', '.join(existing[:3])}{' ...' if len(existing) > 3 else ''}; "
                        "keys are never overwritten: choose an empty folder or move these away")
    (folder / "merchants").mkdir(parents=True, exist_ok=True)

    ca_key = ec.generate_private_key(CURVE)
    ca_cert = _certificate("fedcvr federation CA", ca_key.public_key(), None, ca_key, days, ca=True)
    server_key = ec.generate_private_key(CURVE)
    server_cert = _certificate(hosts[0].strip(), server_key.public_key(), ca_cert.subject, ca_key, days, ca=False,
                               names=names)
    _write_private(keys.ca_key, _pem_key(ca_key))
    keys.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(keys.superlink_key, _pem_key(server_key))
    keys.superlink_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    for path in keys.merchant_keys:
        node_key = ec.generate_private_key(CURVE)
        _write_private(path, node_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                    serialization.NoEncryption()))
        public = node_key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                    serialization.PublicFormat.OpenSSH)
        path.with_name(path.name + ".pub").write_bytes(public + f" {path.name}\n".encode())
    return keys
