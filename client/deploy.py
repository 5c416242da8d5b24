"""A merchant's side of a real deployment: check everything, then build the `flower-supernode` command.

`fedcvr merchant start` calls `merchant_plan`, which validates the data folder against the data contract, checks
the CA certificate, the node's private key and the SuperLink address, and only then returns the command: a node
never connects with data that would fail at the first round. The node config it passes to the SuperNode:

    data-dir    the merchant's data folder (read on this machine only; never sent)
    model-dir   where the coordinator's final model is saved when a run ends (serve recommendations from it)
    state-dir   where the node keeps its privacy ledger (ε spent per federation), so that a restarted node
                remembers what it has spent

The SuperNode runs with `--isolation process`: `fedcvr merchant start` starts its SuperExec itself
(`superexec_command`, through `fedcvr.client.superexec`, which forks each message's ClientApp process from a parent
that imported torch and the node's code once, and reaps the processes that ended) and stops both together.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedcvr.client import superexec, supernode
from fedcvr.shared.data.loader import MerchantData, load_merchant
from fedcvr.shared.deploy import DeployError, parse_address

DEFAULT_NODE_PORT = 9094  # the SuperNode's local API for its ClientApp processes; one per node on a machine


@dataclass(frozen=True)
class MerchantPlan:
    """What `fedcvr merchant start` will run, after every check passed."""

    command: list[str]
    data: MerchantData
    model_dir: Path
    state_dir: Path
    port: int = DEFAULT_NODE_PORT

    def superexec_command(self, python: str, supernode_pid: int) -> list[str]:
        """The SuperExec of this node: runs a ClientApp process per message against the SuperNode's local API
        (plaintext on 127.0.0.1) and ends when the SuperNode (`supernode_pid`) does."""
        return superexec.command(python, ["--insecure", "--runtime-api-address", f"127.0.0.1:{self.port}",
                                          "--parent-pid", str(supernode_pid)])


def _quote(path: Path) -> str:
    text = str(path)
    if "'" in text:
        raise DeployError(f"the path {text!r} contains a ' (quote), which Flower's --node-config cannot carry: "
                          "move the folder to a path without quotes.")
    return f"'{text}'"


def check_ca(path: Path) -> Path:
    if not path.is_file():
        raise DeployError(f"the CA certificate {path} does not exist: use the ca.pem the coordinator gave you "
                          "(from `fedcvr keys init`).")
    try:
        x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as err:
        raise DeployError(f"{path} is not a PEM certificate ({err}): use ca.pem from the coordinator.") from None
    return path.resolve()


def check_private_key(path: Path) -> Path:
    """The node's key for Flower's node authentication: an OpenSSH EC P-384 private key, readable only by you."""
    if not path.is_file():
        raise DeployError(f"the node key {path} does not exist: use the private key the coordinator made for you "
                          "(merchants/merchant-NN from `fedcvr keys init`, without .pub).")
    data = path.read_bytes()
    if data.startswith(b"ecdsa-sha2-") or data.startswith(b"ssh-"):
        raise DeployError(f"{path} is a PUBLIC key: --key takes the private key (the same name without .pub).")
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise DeployError(f"{path} is not an OpenSSH private key ({err}): use merchants/merchant-NN from "
                          "`fedcvr keys init`.") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp384r1":
        raise DeployError(f"{path} is not an EC P-384 key, which Flower's node authentication needs.")
    if path.stat().st_mode & 0o077:
        raise DeployError(f"{path} can be read by other users (mode {path.stat().st_mode & 0o777:o}): "
                          f"run `chmod 600 {path}`.")
    return path.resolve()


def merchant_plan(bin_dir: Path, *, data_dir: Path, model_dir: Path, superlink: str, ca: Path | None,
                  key: Path | None, insecure: bool = False, port: int = DEFAULT_NODE_PORT,
                  state_dir: Path | None = None, poll_seconds: float = supernode.POLL_SECONDS,
                  python: str | None = None) -> MerchantPlan:
    """Check the inputs (raises DeployError, or the data's DataValidationError with every problem) and build
    the SuperNode command."""
    parse_address(superlink, "--superlink")
    try:
        supernode.check_poll(poll_seconds)
    except ValueError as err:
        raise DeployError(str(err)) from None
    if not 0 < port < 65536:
        raise DeployError(f"--port {port} is not a port number: use a free port, e.g. {DEFAULT_NODE_PORT}.")
    if insecure and (ca is not None or key is not None):
        raise DeployError("--insecure turns TLS and node authentication off, but --ca/--key were given: pass "
                          "either --ca and --key, or --insecure.")
    if not insecure and (ca is None or key is None):
        missing = " and ".join(name for name, value in (("--ca", ca), ("--key", key)) if value is None)
        raise DeployError(f"{missing} missing: the node checks the SuperLink with the coordinator's CA certificate "
                          "(--ca ca.pem) and proves who it is with its private key (--key merchant-NN). For a "
                          "plaintext test on one machine only, pass --insecure instead.")
    data = load_merchant(data_dir)  # DataValidationError lists every problem; nothing has started yet
    data_dir, model_dir = data_dir.resolve(), model_dir.expanduser().resolve()
    if model_dir.exists() and not model_dir.is_dir():
        raise DeployError(f"--model-dir {model_dir} is a file: pass a folder (it is created if missing).")
    state_dir = (state_dir or model_dir.parent / f"{model_dir.name}-state").expanduser().resolve()
    node_config = " ".join([f"data-dir={_quote(data_dir)}", f"model-dir={_quote(model_dir)}",
                            f"state-dir={_quote(state_dir)}"])
    flower = ["--superlink", superlink.strip(), "--node-config", node_config, "--host", "127.0.0.1", "--port",
              str(port), "--isolation", "process"]
    if insecure:
        flower.append("--insecure")
    else:
        flower += ["--root-certificates", str(check_ca(ca)), "--auth-supernode-private-key",
                   str(check_private_key(key))]
    command = supernode.command(python or sys.executable, poll_seconds, flower)
    return MerchantPlan(command=command, data=data, model_dir=model_dir, state_dir=state_dir, port=port)
