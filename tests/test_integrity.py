"""Model folders and checkpoints carry SHA-256 digests; a changed, truncated or damaged file is refused clearly."""

from __future__ import annotations

import hashlib
import subprocess

import pytest
import torch

from fedcvr.server.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from fedcvr.shared.integrity import DIGESTS, IntegrityError, file_digest, verify_digests, write_digests
from fedcvr.shared.model.config import ModelConfig
from fedcvr.shared.model.encoder import load_backbone
from fedcvr.shared.model.errors import ModelConfigError
from fedcvr.shared.model.esmm import ConversionModel
from fedcvr.shared.model.folder import load_model_folder, save_model_folder


def test_digests_are_sha256_in_the_sha256sum_format(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\x00\x01" * 1000)
    (tmp_path / "b.json").write_text("{}")
    write_digests(tmp_path, ["b.json", "a.bin", "absent.txt"])
    lines = (tmp_path / DIGESTS).read_text().splitlines()
    payload = b"\x00\x01" * 1000
    assert lines == [f"{hashlib.sha256(payload).hexdigest()}  a.bin",
                     f"{hashlib.sha256(b'{}').hexdigest()}  b.json"]
    assert file_digest(tmp_path / "a.bin") == lines[0].split()[0]
    verify_digests(tmp_path, ["a.bin"])
    checked = subprocess.run(["sha256sum", "-c", DIGESTS], cwd=tmp_path, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize("damage, needle", [
    (lambda f: f.write_bytes(f.read_bytes()[:-10]), "a.bin does not match its SHA-256 digest"),
    (lambda f: f.write_bytes(b"\xff" + f.read_bytes()[1:]), "a.bin does not match its SHA-256 digest"),
    (lambda f: f.unlink(), "a.bin is missing, but SHA256SUMS lists it"),
    (lambda f: (f.parent / DIGESTS).unlink(), "SHA256SUMS is missing"),
    (lambda f: (f.parent / DIGESTS).write_text("not a digest line\n"), "line 1: 'not a digest line' is not"),
    (lambda f: (f.parent / DIGESTS).write_text(""), "lists no digest for a.bin"),
])
def test_damage_is_named(tmp_path, damage, needle):
    target = tmp_path / "a.bin"
    target.write_bytes(bytes(range(256)) * 8)
    write_digests(tmp_path, ["a.bin"])
    damage(target)
    with pytest.raises(IntegrityError) as err:
        verify_digests(tmp_path, ["a.bin"])
    assert needle in str(err.value)


@pytest.fixture
def model_folder(tiny_bert, tmp_path):
    backbone = load_backbone(str(tiny_bert))
    model = ConversionModel(backbone, ModelConfig.defaults(encoder=str(tiny_bert), adapter_layers=1, dim=8))
    return save_model_folder(tmp_path / "model", model, backbone, {"train": {}}, {"test": {"ctcvr.auc": 0.6}})


@pytest.mark.parametrize("name", ["weights.safetensors", "config.json", "encoder.json", "metrics.json"])
def test_a_truncated_or_flipped_model_file_is_refused(model_folder, name):
    load_model_folder(model_folder)
    path = model_folder / name
    original = path.read_bytes()
    path.write_bytes(original[: len(original) // 2])
    with pytest.raises(ModelConfigError, match=f"{name} does not match its SHA-256 digest"):
        load_model_folder(model_folder)
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01
    path.write_bytes(bytes(flipped))
    with pytest.raises(ModelConfigError, match="changed, truncated or damaged"):
        load_model_folder(model_folder)
    path.write_bytes(original)
    load_model_folder(model_folder)


def test_a_damaged_checkpoint_is_refused_before_resuming(tmp_path):
    arrays = {"head.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4)}
    folder = save_checkpoint(tmp_path, Checkpoint(round=2, strategy="fedavg", federation="f", planned_rounds=5,
                                                  arrays=arrays, history=[{"round": 1}, {"round": 2}]))
    assert (folder / DIGESTS).is_file()
    assert torch.equal(load_checkpoint(tmp_path).arrays["head.weight"], arrays["head.weight"])
    weights = folder / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match="weights.safetensors does not match its SHA-256 digest"):
        load_checkpoint(tmp_path)
    (folder / DIGESTS).unlink()
    with pytest.raises(CheckpointError, match="SHA256SUMS is missing"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("entry", ["../outside.txt", "../../outside.txt", "sub/a.bin", "/etc/hostname", ".", "..",
                                   "a\\..\\outside.txt", "", "  a.bin", "a.bin\x00"])
def test_entries_outside_the_folder_are_refused(tmp_path, entry):
    """A SHA256SUMS line may only name a plain file of the folder itself: nothing outside it is read or hashed."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"weights")
    outside = tmp_path / "outside.txt"
    outside.write_text("not part of the model")
    write_digests(folder, ["a.bin"])
    digest = file_digest(outside)
    with (folder / DIGESTS).open("a", encoding="utf-8") as handle:
        handle.write(f"{digest}  {entry}\n")
    with pytest.raises(IntegrityError) as err:
        verify_digests(folder, ["a.bin"])
    assert "line 2" in str(err.value)
    assert "plain file name" in str(err.value)
