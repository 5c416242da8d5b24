"""The coordinator's side of a real deployment: plain functions that check inputs and build the Flower commands.

`fedcvr coordinator start|register|run` call these, then start the command. A coordinator folder (`--home`)
holds everything of one deployment on the coordinator's machine:

    <home>/flwr/config.toml    the connection `flwr` uses to reach this SuperLink (address, CA), named "fedcvr"
    <home>/state.db            the SuperLink's database: registered merchant keys and runs survive a restart

TLS and node authentication are on unless `--insecure` is given explicitly (plaintext, no authentication: for a
test on one machine only). Runtime dependency installation is off: nodes run the fedcvr they have installed.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

CONNECTION = "fedcvr"  # the name of the SuperLink connection in <home>/flwr/config.toml
DEFAULT_PORT = 9092
INSECURE_WARNING = ("--insecure: plaintext, no node authentication. Anyone on the network can read and change "
                    "model updates and any program can join as a merchant. Use it only for a test on one machine.")
_HOST_PORT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(?P<port>\d{1,5})$")


class DeployError(ValueError):
    """Bad input to a deployment command; the message names the file or value and the fix."""


@dataclass(frozen=True)
class CoordinatorHome:
    """The files of one deployment on the coordinator's machine."""

    folder: Path

    @property
    def flwr_home(self) -> Path:
        return self.folder / "flwr"

    @property
    def config_toml(self) -> Path:
        return self.flwr_home / "config.toml"

    @property
    def database(self) -> Path:
        return self.folder / "state.db"

    def connection(self) -> dict[str, object]:
        """The SuperLink connection `coordinator start` wrote; DeployError when there is none."""
        if not self.config_toml.is_file():
            raise DeployError(f"{self.config_toml} does not exist: start the SuperLink first with "
                              f"`fedcvr coordinator start --home {self.folder} ...` (it writes this file).")
        try:
            table = tomllib.loads(self.config_toml.read_text(encoding="utf-8"))["superlink"][CONNECTION]
        except (tomllib.TOMLDecodeError, KeyError, TypeError) as err:
            raise DeployError(f"{self.config_toml} has no [superlink.{CONNECTION}] table ({err}): run "
                              f"`fedcvr coordinator start --home {self.folder} ...` again to rewrite it.") from None
        return dict(table)


def env_for(flwr_home: Path, bin_dir: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every Flower process fedcvr starts: its own FLWR_HOME, offline, no installs, and this
    environment's bin folder first on PATH (the SuperLink and SuperNode start `flower-superexec` and
    `flwr-clientapp` from PATH, also when the virtual environment is not activated)."""
    env = dict(os.environ if base is None else base)
    env.update({"FLWR_HOME": str(flwr_home), "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1")})
    return env


def parse_address(text: str, what: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 in brackets) -> (host, port); DeployError naming `what` otherwise."""
    match = _HOST_PORT.match(text.strip())
    if not match or not 0 < int(match["port"]) < 65536:
        raise DeployError(f"{what} {text!r} is not HOST:PORT: give the SuperLink's host name or IP address and "
                          "port, e.g. 127.0.0.1:9092 or coordinator.example.com:9092 (no https://).")
    return match["host"].strip("[]"), int(match["port"])


def _need_file(path: Path, what: str, fix: str) -> Path:
    if not path.is_file():
        raise DeployError(f"{what} {path} does not exist: {fix}")
    return path.resolve()


@dataclass(frozen=True)
class TlsFiles:
    """The SuperLink's TLS files from a `fedcvr keys init` folder."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def from_keys_dir(cls, keys: Path) -> TlsFiles:
        fix = f"create them with `fedcvr keys init {keys} --superlink-host HOST --merchants N`"
        return cls(ca=_need_file(keys / "ca.pem", "the CA certificate", fix),
                   cert=_need_file(keys / "superlink.pem", "the SuperLink certificate", fix),
                   key=_need_file(keys / "superlink.key", "the SuperLink private key", fix))

    def names(self) -> list[str]:
        """The host names and IP addresses the SuperLink's certificate is valid for."""
        cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return []
        return [str(v) for v in san.get_values_for_type(x509.IPAddress)] + san.get_values_for_type(x509.DNSName)


def local_address(names: list[str], port: int) -> str:
    """The address the coordinator's own `flwr` uses to reach its SuperLink: a loopback name the certificate is
    valid for if it has one, else its first name (TLS checks the name against the certificate)."""
    for preferred in ("127.0.0.1", "localhost", "::1"):
        if preferred in names:
            return f"[{preferred}]:{port}" if preferred == "::1" else f"{preferred}:{port}"
    if not names:
        raise DeployError("the SuperLink certificate names no host: recreate the keys with "
                          "`fedcvr keys init DIR --superlink-host HOST ...`")
    host = names[0]
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass
    return f"{host}:{port}"


def superlink_command(bin_dir: Path, home: CoordinatorHome, tls: TlsFiles | None, host: str, port: int) -> list[str]:
    """`flower-superlink` with TLS and node authentication (tls given), or plaintext (tls None = --insecure);
    runtime dependency installation off; registrations and runs kept in <home>/state.db."""
    command = [str(bin_dir / "flower-superlink"), "--host", host, "--port", str(port),
               "--database", str(home.database), "--disable-runtime-dependency-installation"]
    if tls is None:
        return [*command, "--insecure"]
    return [*command, "--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.cert),
            "--ssl-keyfile", str(tls.key), "--enable-supernode-auth"]


def write_connection(home: CoordinatorHome, address: str, ca: Path | None) -> Path:
    """Write <home>/flwr/config.toml: the connection `flwr` uses for register and run (TLS with `ca`, or
    insecure when `ca` is None)."""
    home.flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "{address}"']
    lines.append(f'root-certificates = "{ca}"' if ca is not None else "insecure = true")
    home.config_toml.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return home.config_toml


def check_public_key(path: Path) -> Path:
    """A merchant's public key as `flwr supernode register` needs it: an OpenSSH EC P-384 public key."""
    path = _need_file(path, "the merchant public key", "pass the merchant's .pub file from `fedcvr keys init` "
                                                       "(merchants/merchant-NN.pub)")
    data = path.read_bytes()
    if b"PRIVATE KEY" in data:
        raise DeployError(f"{path} is a PRIVATE key: register the merchant's public key ({path.name}.pub); the "
                          "private key stays with the merchant and is never sent to the coordinator.")
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise DeployError(f"{path} is not an OpenSSH public key ({err}): pass merchants/merchant-NN.pub from "
                          "`fedcvr keys init`.") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise DeployError(f"{path} is not an EC P-384 key, which Flower's node authentication needs: make the "
                          "merchant keys with `fedcvr keys init`.")
    return path


def register_command(bin_dir: Path, public_key: Path) -> list[str]:
    return [str(bin_dir / "flwr"), "supernode", "register", str(public_key), CONNECTION]


def run_command(bin_dir: Path, app_dir: Path, config_file: Path) -> list[str]:
    return [str(bin_dir / "flwr"), "run", str(app_dir), CONNECTION, "--stream", "--run-config", str(config_file)]
