"""`cascade data embed`: the members it writes are the ones the reader returns, equal to the encoder's
own outputs; done shards are skipped; another CLIP embeds again."""
import argparse
import json

import pytest
import torch

from cascade.bundle import save_stage
from cascade.clip_stage import ClipStage, ClipStageConfig
from cascade.data import embed
from cascade.data.build import build
from cascade.data.reader import read_samples
from cascade.encoders import load_encoder
from cascade.errors import UserError

CLIP = dict(embed_dim=16, image_size=32, max_text_len=12, pretrained_towers=False, ridge_baseline=False)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Two different CLIP stage folders (random heads, seeds 0 and 1)."""
    root = tmp_path_factory.mktemp("bundles")
    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        folders.append(save_stage(ClipStage(ClipStageConfig(**CLIP)).eval(), root / f"b{seed}" / "clip"))
    return folders


@pytest.fixture
def data(tmp_path):
    out = tmp_path / "shapes"
    build("shapes", out, sizes=(64,), count=30, val_fraction=0.2, shard_size=8, progress=False)
    return out


def test_embed_writes_members_the_reader_returns(clips, data, capsys):
    parser = argparse.ArgumentParser()
    embed.add_parser(parser.add_subparsers())
    args = parser.parse_args(["embed", "--data", str(data), "--clip", str(clips[0]), "--batch-size", "5"])
    assert args.func(args) == 0
    assert "embedded 30 samples" in capsys.readouterr().out
    samples = read_samples(data, "train", with_embeddings=True)
    encoder = load_encoder(clips[0])
    z_t, tokens, mask = encoder.encode_text([s["txt"] for s in samples[:4]])
    z_i = encoder.encode_image(torch.stack([s["image_64"] for s in samples[:4]]))
    got = {name: torch.stack([s[name] for s in samples[:4]]) for name in embed.EMBEDDING_FIELDS}
    torch.testing.assert_close(got["clip_image"], z_i, atol=1e-6, rtol=0)
    torch.testing.assert_close(got["clip_text"], z_t, atol=1e-6, rtol=0)
    # stored as float16: the embed ran in batches of 5 and this in one of 4, whose float rounding may put a
    # value on the other side of a float16 rounding boundary, one float16 step (2^-10 relative) away
    torch.testing.assert_close(got["clip_tokens"], tokens.half().float(), atol=1e-5, rtol=2 ** -10)
    assert got["clip_mask"].dtype == torch.bool and torch.equal(got["clip_mask"], mask)
    assert got["clip_tokens"].shape == (4, 12, encoder.token_dim)
    # every original member survives, and the split's samples are all there
    assert [s["key"] for s in samples] == [s["key"] for s in read_samples(data, "train")]
    state = json.loads((data / embed.STATE_FILE).read_text())
    assert state["embed_dim"] == 16 and sum(state["shards"].values()) == 30


def test_done_shards_are_skipped_and_another_clip_reembeds(clips, data):
    embed.embed_dataset(data, clips[0], batch_size=8)
    shard = sorted((data / "train").glob("*.tar"))[0]
    before = shard.stat().st_mtime_ns
    assert embed.embed_dataset(data, clips[0]) == {"embedded": 0, "skipped": 30}
    assert shard.stat().st_mtime_ns == before

    # an interrupted run: one shard's record lost -> only that shard is redone
    state_path = data / embed.STATE_FILE
    state = json.loads(state_path.read_text())
    n = state["shards"].pop("train/" + shard.name)
    state_path.write_text(json.dumps(state))
    assert embed.embed_dataset(data, clips[0]) == {"embedded": n, "skipped": 30 - n}

    first = read_samples(data, "val", with_embeddings=True)
    assert embed.embed_dataset(data, clips[1])["embedded"] == 30
    second = read_samples(data, "val", with_embeddings=True)
    assert not torch.allclose(first[0]["clip_image"], second[0]["clip_image"])
    expected = load_encoder(clips[1]).encode_image(second[0]["image_64"][None])[0]
    torch.testing.assert_close(second[0]["clip_image"], expected, atol=1e-6, rtol=0)
    assert not list(data.glob("**/.*embedding"))  # no temporary shard left behind


def test_empty_data_dir_is_a_user_error(clips, tmp_path):
    with pytest.raises(UserError, match="no shards"):
        embed.embed_dataset(tmp_path, clips[0])


def test_a_clip_path_that_is_missing_or_a_file_says_so(data, tmp_path, capsys):
    from cascade.cli import main

    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    for clip, needle in [(tmp_path / "missing" / "path", f"CLIP stage folder not found: {tmp_path}/missing/path "
                                                          "does not exist"),
                         (notes, f"{notes} is a file, not a CLIP stage folder")]:
        assert main(["data", "embed", "--data", str(data), "--clip", str(clip)]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1
    with pytest.raises(UserError, match="not found: bundles/nope does not exist"):
        load_encoder("bundles/nope")
    with pytest.raises(UserError, match="unknown open_clip model"):  # a name, not a path
        load_encoder("no-such-model:some/file.pt")


def test_rebuilding_a_set_with_overwrite_forgets_what_embed_did_to_the_old_shards(tmp_path):
    """The shards are new, so `cascade data embed` must embed them again rather than skip them as done."""
    from cascade.data.build import build
    from cascade.data.embed import STATE_FILE

    build("shapes", tmp_path, sizes=(64,), count=6, progress=False)
    (tmp_path / STATE_FILE).write_text('{"clip": "sha256:old", "done": ["train/shard-000000.tar"]}')
    build("shapes", tmp_path, sizes=(64,), count=6, seed=1, overwrite=True, progress=False)
    assert not (tmp_path / STATE_FILE).exists() and any((tmp_path / "train").glob("*.tar"))
