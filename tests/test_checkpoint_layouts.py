"""Checkpoint folders as they come: sharded with an index, sharded without, extra eos ids."""
from __future__ import annotations

import json

import numpy as np
import torch

import engine
from tests.checkpoints import load_reference


def test_sharded_checkpoint_with_and_without_index(checkpoint_dir, tmp_path):
    ref_model = load_reference(checkpoint_dir("olmoe"))
    ref_model.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").exists()
    ids = [5, 9, 2, 77, 31]
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(engine.load(tmp_path).forward(ids), ref, atol=1e-3 * np.abs(ref).max())
    (tmp_path / "model.safetensors.index.json").unlink()
    np.testing.assert_allclose(engine.load(tmp_path).forward(ids), ref, atol=1e-3 * np.abs(ref).max())


def test_index_naming_a_missing_shard_is_an_error(checkpoint_dir, tmp_path):
    load_reference(checkpoint_dir("olmoe")).save_pretrained(tmp_path, max_shard_size="40KB")
    victim = sorted(tmp_path.glob("*.safetensors"))[1]
    victim.unlink()
    try:
        engine.load(tmp_path)
    except engine.EngineError as e:
        assert victim.name in str(e) and "does not exist" in str(e)
    else:
        raise AssertionError("loading succeeded without a shard")


def test_eos_ids_come_from_config_and_generation_config(checkpoint_dir, tmp_path):
    import shutil

    shutil.copytree(checkpoint_dir("qwen2"), tmp_path / "m")
    folder = tmp_path / "m"
    cfg = json.loads((folder / "config.json").read_text())
    cfg["eos_token_id"] = 7
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 11, 13]}))
    assert engine.load_spec(folder).eos_token_ids == (7, 11, 13)
