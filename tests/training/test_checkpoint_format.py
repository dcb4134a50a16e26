"""The manifest type and the shard reader, on the files themselves."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_lite.parallel.layout import ParamLayout
from megatron_lite.training.checkpoint import (
    CheckpointError,
    Manifest,
    ParamRecord,
    SavedLayout,
    ShardReader,
    read_manifest,
)

LEGACY = Path(__file__).parent / "fixtures" / "legacy_checkpoint" / "gpt2" / "iter_0000002"


def small_manifest() -> Manifest:
    grouped = ParamRecord(shape=[64, 32], dtype="float32", partition_dim=0, partition_groups=2, replicated_rows=16)
    return Manifest(
        iteration=5, layout=SavedLayout(tp=2, pp=1, dp=1), padded_vocab_size=112,
        files={"model_tp00_pp000.pt": ["a", "qkv"], "model_tp01_pp000.pt": ["a", "qkv"]},
        params={"a": ParamRecord(shape=[8], dtype="float32"), "qkv": grouped},
        train_state={"step": 5}, has_optimizer=True, config={"model": {"tie_embeddings": True}},
    )


def test_round_trip_through_json_keeps_every_field():
    manifest = small_manifest()
    again = Manifest.from_json(manifest.to_json())
    assert again == manifest
    assert again.params["qkv"].layout() == ParamLayout(partition_dim=0, partition_chunks=1, partition_groups=2,
                                                       replicated_rows=16)
    assert again.tied_embeddings and again.layout.virtual_pp == 1 and not again.layout.zero1


def test_ungrouped_entries_keep_the_short_form():
    entries = json.loads(small_manifest().to_json())["params"]
    assert entries["a"] == {"partition_dim": None, "partition_chunks": 1, "shape": [8], "dtype": "float32"}
    assert entries["qkv"]["partition_groups"] == 2 and entries["qkv"]["replicated_rows"] == 16


def test_unknown_field_is_named_with_the_nearest_one():
    entry = small_manifest().to_dict()
    entry["iteratoin"] = entry.pop("iteration")
    with pytest.raises(CheckpointError, match=r"unknown field 'iteratoin' \(did you mean 'iteration'\?\)"):
        Manifest.from_dict(entry, "ck/manifest.json")
    entry = small_manifest().to_dict()
    entry["params"]["a"]["partition_dims"] = 0
    with pytest.raises(CheckpointError, match=r"params.a: unknown field 'partition_dims' \(did you mean 'partition_dim'"):
        Manifest.from_dict(entry)


def test_missing_fields_are_named():
    entry = small_manifest().to_dict()
    del entry["files"], entry["config"]
    with pytest.raises(CheckpointError, match="ck/manifest.json: missing field\\(s\\) files, config; the manifest is damaged"):
        Manifest.from_dict(entry, "ck/manifest.json")
    entry = small_manifest().to_dict()
    del entry["layout"]["dp"]
    with pytest.raises(CheckpointError, match="layout: missing field\\(s\\) dp"):
        Manifest.from_dict(entry)


def test_optional_fields_of_early_manifests_take_their_defaults():
    entry = small_manifest().to_dict()
    for key in ("padded_vocab_size", "train_state", "has_optimizer"):
        del entry[key]
    manifest = Manifest.from_dict(entry)
    assert manifest.padded_vocab_size is None and manifest.train_state == {} and not manifest.has_optimizer


def test_another_format_version_is_refused():
    entry = {**small_manifest().to_dict(), "format": 2}
    with pytest.raises(CheckpointError, match="has checkpoint format 2, expected 1"):
        Manifest.from_dict(entry)


def test_stage_of_params_follows_the_shard_file_names():
    manifest = small_manifest()
    manifest.files = {"model_tp00_pp001.pt": ["head"], "model_tp00_pp000.pt": ["embed", "layer"]}
    assert list(manifest.stage_of_params().items()) == [("embed", 0), ("layer", 0), ("head", 1)]


def test_shard_reader_merges_and_reports_missing_pieces(tmp_path):
    reader = ShardReader(LEGACY.parent)
    assert reader.directory == LEGACY and reader.manifest == read_manifest(LEGACY)
    assert "output.weight" not in reader and reader.saved_name("output.weight") == "embedding.word.weight"
    assert reader["layers.0.mlp.fc.weight"].shape == (32, 16)
    assert float(reader.optimizer_state("layers.0.mlp.fc.weight")["step"]) == 2.0
    with pytest.raises(CheckpointError, match="holds no parameter 'nope'"):
        reader["nope"]
    broken = tmp_path / "broken"
    shutil.copytree(LEGACY, broken)
    (broken / "model_tp00_pp000.pt").unlink()
    with pytest.raises(CheckpointError, match="model_tp00_pp000.pt is missing; the checkpoint is incomplete"):
        ShardReader(broken)["layers.0.mlp.fc.weight"]


def test_local_shard_is_read_into_memory():
    shard = ShardReader(LEGACY).local_shard(0, 0)
    weight = shard["model"]["layers.0.mlp.fc.weight"]
    weight.add_(1.0)  # its own memory: the file is untouched
    assert not torch.equal(weight, ShardReader(LEGACY)["layers.0.mlp.fc.weight"])
