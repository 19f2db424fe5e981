"""The emoji source on a fixture shaped like the extracted npm packages (tests/fixtures/emoji/cache:
a few synthetic webps and SVGs with known colours, excerpts of emoji.json and openmoji.json), a fake
`npm` for the fetch path, and (slow) the real packages."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from cascade.cli import main
from cascade.data import emoji
from cascade.data.reader import read_samples
from cascade.errors import UserError

FIXTURE = Path(__file__).parent / "fixtures" / "emoji" / "cache"
FLUENT_COLOURS = {"fluent-1f600": (250, 200, 30), "fluent-1f44b-1f3fb": (240, 190, 150),
                  "fluent-2764-fe0f": (220, 20, 40)}
OPENMOJI_COLOURS = {"openmoji-1F600": (0xFC, 0xEA, 0x2B), "openmoji-1F34E": (0xD2, 0x2F, 0x27)}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A copy of the fixture cache; any call to npm fails the test (the packages are all there)."""
    dest = tmp_path / "cache"
    shutil.copytree(FIXTURE, dest)

    def no_npm(*args, **kwargs):
        raise AssertionError(f"npm was called although the package is cached: {args}")

    monkeypatch.setattr(emoji.subprocess, "run", no_npm)
    return dest


def build(cache: Path, out: Path, *extra: str) -> int:
    return main(["data", "build", "--source", "emoji", "--out", str(out), "--sizes", "32,64",
                 "--cache", str(cache), "--val-fraction", "0", *extra])


def rgb(tensor, y: int, x: int) -> tuple[int, ...]:
    """Pixel of a (3, H, W) tensor in [-1, 1] back in 0..255."""
    return tuple(round((float(v) + 1) * 127.5) for v in tensor[:, y, x])


def close(a, b, tol=3) -> bool:
    return all(abs(p - q) <= tol for p, q in zip(a, b))


def test_builds_both_sources_from_cache(cache, tmp_path, capsys):
    out = tmp_path / "set"
    assert build(cache, out) == 0
    samples = {s["key"]: s for s in read_samples(out, "train", image_sizes=(32, 64))}
    # The unmatched fluent file (no emoji.json entry) and the openmoji row without an SVG are skipped.
    assert sorted(samples) == sorted([*FLUENT_COLOURS, *OPENMOJI_COLOURS])
    for key, colour in {**FLUENT_COLOURS, **OPENMOJI_COLOURS}.items():
        s = samples[key]
        for size in (32, 64):
            image = s[f"image_{size}"]
            assert image.shape == (3, size, size)
            assert close(rgb(image, size // 2, size // 2), colour), key  # opaque centre keeps its colour
            assert rgb(image, size - 1, 0) == (255, 255, 255), key  # transparent corner -> white
    # The half-transparent black band of the fluent webps composites to mid grey, not black.
    assert close(rgb(samples["fluent-1f600"]["image_64"], 1, 1), (127, 127, 127), tol=2)

    wave = samples["fluent-1f44b-1f3fb"]
    assert wave["json"] == {"source": "fluent-emoji-3d", "licence": "MIT", "codepoint": "1f44b-1f3fb",
                            "name": "waving hand sign: light skin tone", "category": "People & Body",
                            "native_size": 64}  # the fixture webp's size: the SR stages skip upscales beyond it
    assert "waving hand sign: light skin tone" in wave["txt"]
    assert "heavy black heart" in samples["fluent-2764-fe0f"]["txt"]  # matched with FE0F dropped
    apple = samples["openmoji-1F34E"]
    assert apple["json"]["licence"] == "CC-BY-SA-4.0" and apple["json"]["author"] == "Laura Humpfer"
    assert apple["json"]["tags"] == ["apple", "fruit", "red"]
    assert "red apple" in apple["txt"]

    licences = (out / "LICENSES").read_text()
    for needle in ("@lobehub/fluent-emoji-3d@1.1.0", "emoji-datasource-google@16.0.0", "openmoji@17.0.0",
                   "MIT", "CC-BY-SA-4.0", "Microsoft", "Cal Henderson", "OpenMoji contributors",
                   "Attribution-ShareAlike 4.0 International"):
        assert needle in licences
    assert "wrote 5 train and 0 val samples" in capsys.readouterr().out


def test_same_arguments_give_identical_shards(cache, tmp_path):
    digests = []
    for name in ("a", "b"):
        assert build(cache, tmp_path / name) == 0
        shard = tmp_path / name / "train" / "shard-000000.tar"
        digests.append(hashlib.sha256(shard.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


@pytest.mark.parametrize("which, prefix", [("fluent", "fluent-"), ("openmoji", "openmoji-")])
def test_one_package_only(cache, which, prefix):
    samples, total, licences = emoji.open_source(cache, (16,), None, which)
    keys = [s.key for s in samples]
    assert total == len(keys) > 0 and all(k.startswith(prefix) for k in keys)
    assert keys == sorted(keys)
    assert ("openmoji@" in licences) == (which == "openmoji")


def test_count_takes_an_even_spread_across_both_sources(cache):
    samples, total, _ = emoji.open_source(cache, (16,), 2, "all")
    keys = [s.key for s in samples]
    assert total == 2 and keys == ["fluent-1f600", "openmoji-1F34E"]  # items 1 and 3 of the 5, sorted
    assert emoji.evenly_spaced(list(range(10)), 3) == [1, 5, 8]
    assert emoji.evenly_spaced(list(range(3)), 7) == [0, 1, 2]


def test_caption_phrasing_depends_only_on_the_key():
    fields = dict(name="red apple", a_name="a red apple", tags="apple, fruit")
    first = [emoji._phrase(f"openmoji-{i}", emoji.OPENMOJI_PHRASINGS, **fields) for i in range(40)]
    again = [emoji._phrase(f"openmoji-{i}", emoji.OPENMOJI_PHRASINGS, **fields) for i in reversed(range(40))]
    assert first == again[::-1]
    assert len(set(first)) == len(emoji.OPENMOJI_PHRASINGS)  # every phrasing is used
    no_tags = {emoji._phrase(f"k{i}", emoji.OPENMOJI_PHRASINGS, **{**fields, "tags": ""}) for i in range(40)}
    assert not any("()" in t for t in no_tags)


def test_svg_cairosvg_cannot_draw_is_skipped_with_a_line(cache, capsys):
    # As in a few real OpenMoji files: a marker that the SVG references but never defines.
    om = cache / "openmoji-17.0.0"
    (om / "color" / "svg" / "1F3F4.svg").write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72"><path stroke="#000" d="m20 40v-3" '
        'marker-end="url(#Dot)"/></svg>\n')
    table = json.loads((om / "data" / "openmoji.json").read_text())
    table.append({"hexcode": "1F3F4", "group": "flags", "annotation": "black flag", "tags": "flag"})
    (om / "data" / "openmoji.json").write_text(json.dumps(table))
    samples, total, _ = emoji.open_source(cache, (16,), None, "openmoji")
    assert total == 3 and [s.key for s in samples] == ["openmoji-1F34E", "openmoji-1F600"]
    assert "skipping openmoji-1F3F4: cairosvg cannot render" in capsys.readouterr().err


def test_bad_set_name_is_a_one_line_error(cache, tmp_path, capsys):
    code = main(["data", "build", "--source", "emoji:twemoji", "--out", str(tmp_path / "x"),
                 "--cache", str(cache)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "twemoji" in err


def fake_npm(bin_dir: Path, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "npm"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_missing_npm_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    code = main(["data", "build", "--source", "emoji:openmoji", "--out", str(tmp_path / "x"),
                 "--cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "npm not found" in err
    assert not (tmp_path / "x" / "train").exists()


def test_failed_fetch_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    fake_npm(tmp_path / "bin", "echo 'npm error code E404' >&2\n"
                               "echo 'npm error 404 Not Found - openmoji' >&2\nexit 1\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    code = main(["data", "build", "--source", "emoji:openmoji", "--out", str(tmp_path / "x"),
                 "--cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and [line for line in err if line.startswith("cascade: error")] == err[-1:]
    assert "npm pack openmoji@17.0.0 failed: npm error 404 Not Found" in err[-1]
    assert list((tmp_path / "cache").iterdir()) == []  # the temporary fetch folder is gone


def test_fetch_extracts_only_used_files_once(tmp_path, monkeypatch):
    # An npm tarball (everything under package/) with a file the builder must not extract.
    tgz = tmp_path / "openmoji-17.0.0.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(FIXTURE / "openmoji-17.0.0", arcname="package")
        extra = tmp_path / "unused.md"
        extra.write_text("not needed")
        tar.add(extra, arcname="package/src/unused.md")
    log = tmp_path / "npm.log"
    # `npm pack SPEC --pack-destination DIR ...`: copy the tarball into DIR and log the call.
    fake_npm(tmp_path / "bin", f'echo "$@" >> "{log}"\ncp "{tgz}" "$4/"\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    cache = tmp_path / "cache"
    root = emoji.fetch(emoji.OPENMOJI, cache)
    assert root == cache / "openmoji-17.0.0"
    extracted = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert extracted == ["LICENSE.txt", "color/svg/1F34E.svg", "color/svg/1F600.svg", "data/openmoji.json",
                         "package.json"]
    assert sorted(p.name for p in cache.iterdir()) == ["openmoji-17.0.0"]  # no tarball or temp folder left
    assert emoji.fetch(emoji.OPENMOJI, cache) == root
    assert log.read_text().splitlines()[0].startswith("pack openmoji@17.0.0 --pack-destination")
    assert len(log.read_text().splitlines()) == 1  # the second call reused the cache


def test_unreadable_cached_table_names_the_file(cache):
    (cache / "openmoji-17.0.0" / "data" / "openmoji.json").write_text("{not json")
    with pytest.raises(UserError, match="openmoji.json"):
        emoji.open_source(cache, (16,), None, "openmoji")


@pytest.mark.slow
def test_real_packages_build(tmp_path):
    """Fetches the real npm packages (into $CASCADE_CACHE when set, so CI can reuse them)."""
    cache = os.environ.get("CASCADE_CACHE") or str(tmp_path / "cache")
    out = tmp_path / "set"
    code = main(["data", "build", "--source", "emoji", "--out", str(out), "--sizes", "64,256",
                 "--count", "40", "--cache", cache, "--val-fraction", "0"])
    assert code == 0
    samples = read_samples(out, "train", image_sizes=(64, 256))
    sources = [s["json"]["source"] for s in samples]
    # Evenly spread over the 3,374 fluent + ~4,490 openmoji entries: both sources, roughly in proportion.
    assert len(samples) == 40 and 12 <= sources.count("fluent-emoji-3d") <= 22
    assert all(s["txt"].strip() and s["json"]["name"] for s in samples)
    _, total, _ = emoji.open_source(Path(cache), (64,), None, "fluent")
    assert total == 3374  # the fluent files whose code point emoji.json names
    # Emoji sit on white: the corners of every image are (nearly) white.
    for s in samples:
        corners = s["image_256"][:, [0, 0, -1, -1], [0, -1, 0, -1]]
        assert float(corners.min()) > 0.9, s["key"]
