"""The shard reader: resume positions, rank splits, corrupt shards, deterministic shapes builds."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from cascade.cli import main
from cascade.data.reader import make_loader, read_samples


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "set"
    assert main(["data", "build", "--source", "shapes", "--out", str(out), "--count", "40", "--sizes", "32",
                 "--val-fraction", "0", "--seed", "3"]) == 0
    return out


def _digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*.tar"))}


def test_same_arguments_give_identical_bytes(shapes, tmp_path):
    again = tmp_path / "again"
    assert main(["data", "build", "--source", "shapes", "--out", str(again), "--count", "40", "--sizes", "32",
                 "--val-fraction", "0", "--seed", "3"]) == 0
    assert _digests(again) == _digests(shapes)


def test_resume_exactly_at_an_epoch_boundary(shapes):
    n = len(read_samples(shapes, "train", image_sizes=(32,)))
    assert n % 4 == 0
    first_of_next_epoch = next(iter(make_loader(shapes, batch_size=4, image_sizes=(32,), epoch=1)))
    resumed = next(iter(make_loader(shapes, batch_size=4, image_sizes=(32,), skip_batches=n // 4)))
    assert resumed["key"] == first_of_next_epoch["key"]


def test_two_ranks_see_disjoint_samples(shapes):
    keys = [set(k for b in make_loader(shapes, batch_size=1, image_sizes=(32,), rank=r, world_size=2,
                                      infinite=False) for k in b["key"]) for r in (0, 1)]
    assert keys[0] and keys[1] and not keys[0] & keys[1]


def test_a_truncated_shard_is_skipped_and_counted(shapes, tmp_path, caplog):
    broken = tmp_path / "broken" / "train"
    broken.mkdir(parents=True)
    good = sorted((shapes / "train").glob("*.tar"))[0]
    (broken / "a.tar").write_bytes(good.read_bytes())
    (broken / "b.tar").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 3])
    loader = make_loader(broken.parent, batch_size=1, image_sizes=(32,), infinite=False, shuffle=False)
    keys = [k for b in loader for k in b["key"]]
    assert set(keys) >= {
        s["key"] for s in read_samples(shapes, "train", image_sizes=(32,))}  # every sample of the good shard
    assert loader.skipped >= 1
    assert "skipping corrupt shard" in caplog.text
