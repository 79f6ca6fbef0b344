"""`star profile data`: runs on real shards, counts what it timed, writes JSON; routes the rest."""

from __future__ import annotations

import json

import pytest

from star.profiling import cli as profile
from tests.support.pipeline_fixtures import write_split


def test_profile_data_times_the_loader_and_writes_json(tmp_path, capsys):
    write_split(tmp_path / "shards", "train", 24, per_shard=12)
    out = tmp_path / "data.json"
    code = profile.main(["data", "--data", str(tmp_path / "shards"), "--batch-size", "4", "--image-size", "32",
                         "--batches", "5", "--warmup", "1", "--threads", "1", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    (rank0,) = result["per_rank"]
    assert rank0["batches"] == 5 and rank0["images"] == 20  # 5 batches of 4, across an epoch boundary
    assert result["images_per_s"] == pytest.approx(rank0["images_per_s"]) and rank0["images_per_s"] > 0
    assert result["settings"]["backend"] == "dali" and result["settings"]["mode"] == "pretrain"
    assert "images/s" in capsys.readouterr().out


def test_profile_routes_and_rejects(capsys):
    assert profile.main(["bogus"]) == 2
    assert "unknown subcommand 'bogus'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        profile.main(["data", "--batches", "2"])  # neither --data nor --config
    assert "give --data DIR or --config NAME" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        profile.main(["model", "--help"])
    assert info.value.code == 0 and "star profile model" in capsys.readouterr().out
