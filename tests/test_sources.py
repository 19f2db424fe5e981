import torch

from cascade.batches import balanced, balanced_batch
from cascade.data.sources import source_of


def test_source_of_names_the_sets():
    assert source_of({"source": "shapes", "objects": []}) == "shapes"
    assert source_of({"source": "openmoji"}) == source_of({"source": "fluent-emoji-3d"}) == "emoji"
    assert source_of({}) == source_of(None) == "other"


def test_balanced_takes_an_even_share_of_each_source():
    groups = {"shapes": list(range(10)), "emoji": ["a", "b"]}
    picked = balanced(groups, 6)
    assert [g for g, _ in picked].count("emoji") == 2 and len(picked) == 6  # emoji short: shapes fill up
    assert [g for g, _ in balanced(groups, 3)] == ["emoji", "shapes", "emoji"]


def _batch(source: str, start: int, n: int = 4) -> dict:
    ids = torch.arange(start, start + n)
    return {"image_64": ids.float().view(n, 1, 1, 1).expand(n, 3, 2, 2), "id": ids,
            "txt": [f"{source} {i}" for i in ids.tolist()], "json": [{"source": source}] * n,
            "source": [source_of({"source": source})] * n}


def test_balanced_batch_alternates_sources_even_when_one_sorts_first():
    # A mixed val split: all emoji shards sort before the shapes shards.
    batches = [_batch("openmoji", 0), _batch("openmoji", 4), _batch("shapes", 100), _batch("shapes", 104)]
    out = balanced_batch(batches, 6)
    assert out["id"].tolist() == [0, 100, 1, 101, 2, 102]
    assert out["txt"] == ["openmoji 0", "shapes 100", "openmoji 1", "shapes 101", "openmoji 2", "shapes 102"]
    assert out["image_64"].shape == (6, 3, 2, 2) and out["image_64"][1].eq(100).all()
    assert [source_of(j) for j in out["json"]] == ["emoji", "shapes"] * 3


def test_balanced_batch_stops_reading_once_every_source_is_full():
    read = []

    def batches():
        for b in [_batch("openmoji", 0), _batch("shapes", 10), _batch("shapes", 20)]:
            read.append(b)
            yield b
        raise AssertionError("read past the point where both sources had enough rows")

    assert balanced_batch(batches(), 4)["id"].tolist() == [0, 10, 1, 11]
    assert len(read) == 2
    assert balanced_batch(iter([]), 4) is None
