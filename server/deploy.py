"""The coordinator's side of a real deployment: plain functions that check inputs and build the Flower commands.

`fedcvr coordinator start|register|run` call these, then start the command. A coordinator folder (`--home`)
holds everything of one deployment on the coordinator's machine:

    <home>/flwr/config.toml    the connection `flwr` uses to reach this SuperLink's Control API (the control
                               address, CA), named "fedcvr"
    <home>/state.db            the SuperLink's database: registered merchant keys and runs survive a restart

The SuperLink (`server/superlink.py`) listens twice: the merchants' nodes reach the Fleet API alone on the
merchant address (`--host`/`--port`, the one port that faces the merchants); the Control API (register, run,
ls, stop) and the ServerApp's runtime API listen on the control address, 127.0.0.1 by default, which only the
coordinator's machine reaches.

TLS and node authentication are on unless `--insecure` is given explicitly (plaintext, no authentication: for a
test on one machine only). Runtime dependency installation is off: nodes run the fedcvr they have installed.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedcvr.shared.deploy import DeployError

CONNECTION = "fedcvr"  # the name of the SuperLink connection in <home>/flwr/config.toml
DEFAULT_PORT = 9092  # the merchants' Fleet API
DEFAULT_CONTROL_ADDRESS = "127.0.0.1:9093"  # the Control and runtime API: the coordinator's machine only
LOOPBACK = ("127.0.0.1", "localhost", "::1")
INSECURE_WARNING = ("--insecure: plaintext, no node authentication. Anyone on the network can read and change "
                    "model updates and any program can join as a merchant. Use it only for a test on one machine.")


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


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def control_address(host: str, port: int, tls_names: list[str] | None, merchant_port: int) -> str:
    """The address of the Control and runtime API as the coordinator's `flwr` and ServerApp reach it, after the
    checks: another port than the merchants', and with TLS a host the certificate names (TLS checks the name)."""
    if port == merchant_port:
        raise DeployError(f"--control-address {_host_port(host, port)} uses the merchants' port {merchant_port}: "
                          f"the Control API needs a port of its own, e.g. --control-address 127.0.0.1:{port + 1}")
    if host in ("0.0.0.0", "::", ""):
        raise DeployError(f"--control-address {_host_port(host, port)} would let every network reach the Control "
                          "API, which registers and unregisters nodes without an account check: give the "
                          f"coordinator's own address, e.g. --control-address 127.0.0.1:{port}")
    if tls_names is not None and host not in tls_names:
        raise DeployError(f"the SuperLink certificate names {', '.join(tls_names) or 'no host'}, not {host}, where "
                          "the Control API listens (the coordinator's flwr and ServerApp check the name): recreate "
                          "the keys with `fedcvr keys init DIR --superlink-host 127.0.0.1 --superlink-host "
                          "PUBLIC-NAME ...`, or give --control-address a name the certificate has.")
    return _host_port(host, port)


def superlink_command(python: str, home: CoordinatorHome, tls: TlsFiles | None, merchants: tuple[str, int],
                      control: tuple[str, int]) -> list[str]:
    """The SuperLink (`server/superlink.py`): the Fleet API alone on `merchants` (host, port), the Control and
    runtime API on `control`; TLS and node authentication (tls given), or plaintext (tls None = --insecure);
    runtime dependency installation off; registrations and runs kept in <home>/state.db."""
    command = [python, "-m", "fedcvr.server.superlink", "--merchant-address", _host_port(*merchants),
               "--host", control[0], "--port", str(control[1]),
               "--database", str(home.database), "--disable-runtime-dependency-installation"]
    if tls is None:
        return [*command, "--insecure"]
    return [*command, "--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.cert),
            "--ssl-keyfile", str(tls.key), "--enable-supernode-auth"]


def write_connection(home: CoordinatorHome, address: str, ca: Path | None) -> Path:
    """Write <home>/flwr/config.toml: the connection to the Control API (`address`) that `flwr` uses for register,
    run, ls and stop (TLS with `ca`, or insecure when `ca` is None)."""
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


def status_command(bin_dir: Path, run_id: str) -> list[str]:
    return [str(bin_dir / "flwr"), "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"]


def stop_command(bin_dir: Path, run_id: str) -> list[str]:
    return [str(bin_dir / "flwr"), "stop", str(run_id), CONNECTION]


def stop_hint(home: CoordinatorHome, bin_dir: Path, run_id: str | None) -> str:
    """The exact command that stops the run at the SuperLink, to print when fedcvr could not stop it itself."""
    run = str(run_id) if run_id is not None else "RUN_ID"
    listing = "" if run_id is not None else f" (find RUN_ID with `FLWR_HOME={home.flwr_home} {bin_dir / 'flwr'} ls`)"
    return f"FLWR_HOME={home.flwr_home} {' '.join(stop_command(bin_dir, run))}{listing}"
