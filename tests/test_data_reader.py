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


def _keys(out: Path, split: str) -> list[str]:
    return [s["key"] for s in read_samples(out, split, image_sizes=(32,))]


def test_a_small_build_gets_one_val_sample_where_the_hash_picks_none(tmp_path, capsys):
    """20 shapes samples at seed 0: no key hashes into a 5% val split, so the last one goes there; at seed 2
    one does, and the splits are the hash's alone. One sample, or a val fraction of 0, leaves val empty."""
    from cascade.data.shards import split_of

    def build(name, count, seed, fraction="0.05"):
        out = tmp_path / name
        assert main(["data", "build", "--source", "shapes", "--out", str(out), "--count", str(count),
                     "--sizes", "32", "--val-fraction", fraction, "--seed", str(seed)]) == 0
        return out

    keys = [f"shapes-s0-{i:07d}" for i in range(20)]
    assert all(split_of(k, 0.05) == "train" for k in keys)
    out = build("small", 20, 0)
    assert "wrote 19 train and 1 val samples" in capsys.readouterr().out
    assert _keys(out, "val") == keys[-1:] and _keys(out, "train") == keys[:-1]
    out = build("hashed", 20, 2)
    for split in ("train", "val"):
        assert _keys(out, split) == [f"shapes-s2-{i:07d}" for i in range(20)
                                     if split_of(f"shapes-s2-{i:07d}", 0.05) == split]
    assert len(_keys(build("one", 1, 0), "train")) == 1
    assert len(_keys(build("none", 20, 0, fraction="0"), "train")) == 20


def _one_object(meta: dict) -> bool:
    return len(meta["objects"]) == 1


def test_select_reads_only_the_samples_a_stage_keeps_and_resumes_exactly(shapes):
    """A stage's `keeps(json)` filters before decoding; skip_batches counts the kept samples, so a resumed
    run reads on exactly where an uninterrupted one would."""
    everything = read_samples(shapes, "train", image_sizes=(32,))
    wanted = sorted(s["key"] for s in everything if len(s["json"]["objects"]) == 1)
    assert 0 < len(wanted) < len(everything)
    one_pass = make_loader(shapes, batch_size=2, image_sizes=(32,), select=_one_object, infinite=False,
                           drop_last=False, shuffle=False)
    assert sorted(k for batch in one_pass for k in batch["key"]) == wanted
    straight = iter(make_loader(shapes, batch_size=2, image_sizes=(32,), select=_one_object))
    keys = [next(straight)["key"] for _ in range(5)]
    resumed = iter(make_loader(shapes, batch_size=2, image_sizes=(32,), select=_one_object, skip_batches=3))
    assert [next(resumed)["key"] for _ in range(2)] == keys[3:]


@pytest.mark.parametrize("meta,sr256,sr1024", [
    ({"source": "shapes", "objects": []}, True, True),  # drawn: real at every size
    ({"source": "openmoji"}, True, True),  # SVGs are rendered at each size
    ({"source": "fluent-emoji-3d", "native_size": 256}, True, False),  # a 256x256 webp: 1024 is an upscale
    ({"source": "fluent-emoji-3d"}, True, False),  # built before native_size was recorded
    ({"source": "folder", "native_size": 700}, True, False),
    ({"source": "folder", "native_size": 2000}, True, True),
])
def test_upsamplers_skip_images_upscaled_from_a_smaller_original(meta, sr256, sr1024):
    from cascade.registry import get_stage

    for name, kept in (("sr256", sr256), ("sr1024", sr1024)):
        cls = get_stage(name)
        stage = cls.__new__(cls)  # keeps() reads only the class's sizes
        assert stage.keeps(meta) is kept, (name, meta)
    decoder = get_stage("decoder")
    assert decoder.keeps(decoder.__new__(decoder), meta) is True


def test_a_split_with_nothing_the_stage_reads_is_a_one_line_error(shapes):
    from cascade.errors import UserError

    with pytest.raises(UserError, match="none of the 40 samples in .* is one this stage reads"):
        next(iter(make_loader(shapes, batch_size=2, image_sizes=(32,), select=lambda meta: False)))
