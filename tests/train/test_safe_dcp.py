"""A Megatron checkpoint folder is read without running code from it (factory/train/safe_dcp.py).

The folder's index is checked in test_convert_cli; here the other pickles: the non-tensor
objects inside the .distcp files, which torch's load planner unpickles with
weights_only=False."""

from __future__ import annotations

import io
import pickle
import re

import pytest
import torch

from factory.stage import UserError
from tests.conftest import REPO
from tests.train.test_convert import _tiny_llama


class _Payload:     # unpickling it creates a file: code run from the checkpoint
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _megatron_folder(tmp_path):
    from factory.train.convert.folders import hf_to_megatron

    _tiny_llama(tmp_path / "hf", tie=False)
    hf_to_megatron(tmp_path / "hf", tmp_path / "meg")
    return tmp_path / "meg"


def test_a_hostile_object_in_a_checkpoint_is_refused_and_never_runs(tmp_path):
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from factory.train.convert.folders import megatron_to_hf

    meg = _megatron_folder(tmp_path)
    model = meg / "checkpoints" / "iter_0000000" / "model"
    # The attack keeps the index a plain index (it passes safe_dcp.check) and points one of
    # its objects at a pickle that runs code.
    with open(model / ".metadata", "rb") as f:
        meta = pickle.load(f)   # our own file, written a moment ago
    fqn = next(k for k, v in meta.state_dict_metadata.items()
               if isinstance(v, BytesStorageMetadata))
    marker = tmp_path / "ran"
    buf = io.BytesIO()
    torch.save(_Payload(marker), buf)
    (model / "__0_9.distcp").write_bytes(buf.getvalue())
    for index in [i for i in meta.storage_data if i.fqn == fqn]:
        meta.storage_data[index] = _StorageInfo("__0_9.distcp", 0, len(buf.getvalue()))
    with open(model / ".metadata", "wb") as f:
        pickle.dump(meta, f)

    with pytest.raises(UserError) as e:
        megatron_to_hf(meg, tmp_path / "out")
    assert str(e.value) == (f"{model}: checkpoint object {fqn} holds io.open, which a "
                            "checkpoint never needs; not loaded (the file would run code when "
                            "unpickled)")
    assert not marker.exists() and not (tmp_path / "out").exists()
    # and the planner is itself again afterwards
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    assert DefaultLoadPlanner.load_bytes.__module__ == "torch.distributed.checkpoint.default_planner"


def test_every_checkpoint_load_goes_through_safe_dcp():
    direct = [f"{p.relative_to(REPO)}:{n}" for p in (REPO / "factory").rglob("*.py")
              if p.name != "safe_dcp.py"
              for n, line in enumerate(p.read_text().splitlines(), 1)
              if re.search(r"dist_checkpointing\.load\w*\(|distributed\.checkpoint\.load|"
                           r"(?<!safe_)\bdcp\.load\(", line)]
    assert direct == []


def test_a_hostile_common_state_or_another_layout_is_refused(tmp_path, monkeypatch):
    from factory.train.convert.folders import megatron_to_hf

    meg = _megatron_folder(tmp_path)
    model = meg / "checkpoints" / "iter_0000000" / "model"
    marker = tmp_path / "ran"
    # megatron reads common.pt with a bare torch.load, unrestricted under this variable
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    real = (model / "common.pt").read_bytes()
    torch.save({"state": _Payload(marker)}, model / "common.pt")
    with pytest.raises(UserError, match=r"common\.pt: holds io\.open, which a checkpoint "
                                        r"never needs; not loaded"):
        megatron_to_hf(meg, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()

    (model / "common.pt").write_bytes(real)
    (model / "metadata.json").write_text('{"sharded_backend": "zarr", "common_backend": "torch"}')
    with pytest.raises(UserError, match="not the torch_dist checkpoint layout"):
        megatron_to_hf(meg, tmp_path / "out")
