"""The folder source: the user's image + .txt pairs and img2dataset .tar shards round-trip through
`cascade data build` and the reader with captions intact and pixels cropped and resized as promised."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from cascade.cli import main
from cascade.data import folder
from cascade.data.reader import read_samples
from cascade.data.shards import KEY_RE

QUADRANTS = ((230, 30, 30), (30, 200, 40), (40, 60, 220), (240, 220, 40))  # TL, TR, BL, BR
MARGIN = (255, 0, 255)  # lies outside the centre square, so the crop must remove it


def quadrant_image(w: int, h: int) -> Image.Image:
    """Magenta margins around a centre square split into four coloured quadrants."""
    image = Image.new("RGB", (w, h), MARGIN)
    side = min(w, h)
    x0, y0 = (w - side) // 2, (h - side) // 2
    half = side // 2
    draw = ImageDraw.Draw(image)
    for i, colour in enumerate(QUADRANTS):  # right/bottom quadrants take the extra pixel of an odd side
        left, top = (x0, x0 + half)[i % 2], (y0, y0 + half)[i // 2]
        right, bottom = (x0 + half, x0 + side)[i % 2], (y0 + half, y0 + side)[i // 2]
        draw.rectangle([left, top, right - 1, bottom - 1], fill=colour)
    return image


def rgb(tensor, y: int, x: int) -> tuple[int, ...]:
    return tuple(round((float(v) + 1) * 127.5) for v in tensor[:, y, x])


def assert_quadrants(image, size: int, tol: int) -> None:
    """Each quadrant's centre has its colour and no magenta survives anywhere."""
    for i, colour in enumerate(QUADRANTS):
        y, x = size // 4 + (i // 2) * size // 2, size // 4 + (i % 2) * size // 2
        assert all(abs(a - b) <= tol for a, b in zip(rgb(image, y, x), colour)), (i, rgb(image, y, x))
    r, g, b = ((image + 1) * 127.5)
    assert not bool(((r > 200) & (b > 200) & (g < 80)).any())


def run(*args: str) -> int:
    return main(["data", "build", *args])


def test_folder_of_ten_round_trips(tmp_path, capsys):
    src = tmp_path / "photos"
    shapes = [(64, 64), (96, 64), (64, 96), (120, 40), (40, 120), (200, 100), (33, 47), (48, 48), (80, 60),
              (300, 200)]
    captions = {}
    for i, (w, h) in enumerate(shapes):
        sub = src / ("nested/deeper" if i % 3 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        stem = f"photo {i}.v2" if i == 4 else f"img{i}"  # spaces and dots must not reach the key
        suffix = (".png", ".webp", ".bmp")[i % 3]
        options = {"lossless": True} if suffix == ".webp" else {}
        quadrant_image(w, h).save(sub / f"{stem}{suffix}", **options)
        captions[f"{stem}{suffix}"] = f"  caption number {i}: a {w}x{h} picture\n"
        (sub / f"{stem}.txt").write_text(captions[f"{stem}{suffix}"])
    (src / "stray.png").write_bytes(b"")  # no caption beside it: not a pair, ignored
    out = tmp_path / "set"
    assert run("--source", f"folder:{src}", "--out", str(out), "--sizes", "16,32", "--val-fraction", "0") == 0
    assert "wrote 10 train and 0 val samples" in capsys.readouterr().out

    samples = read_samples(out, "train", image_sizes=(16, 32))
    assert len(samples) == 10
    by_path = {s["json"]["path"]: s for s in samples}
    assert all(s["json"]["source"] == "folder" and KEY_RE.match(s["key"]) for s in samples)
    assert len({s["key"] for s in samples}) == 10
    for name, caption in captions.items():
        path = next(p for p in by_path if p.endswith(name))
        sample = by_path[path]
        assert sample["txt"] == caption.strip()
        for size in (16, 32):
            assert_quadrants(sample[f"image_{size}"], size, tol=6)
    assert "nested/deeper/img0.png" in by_path


def test_img2dataset_tar(tmp_path):
    shard = tmp_path / "shards" / "00000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for i in range(3):
            buf = io.BytesIO()
            quadrant_image(90, 60).save(buf, format="JPEG", quality=95)
            add(f"00000000{i}.jpg", buf.getvalue())
            add(f"00000000{i}.txt", f"a web caption {i}".encode())
            add(f"00000000{i}.json", b'{"url": "http://example.invalid"}')
        add("000000009.jpg", buf.getvalue())  # image without a caption: skipped
    (tmp_path / "shards" / "00000.parquet").write_bytes(b"metadata img2dataset writes beside shards")
    out = tmp_path / "set"
    assert run("--source", f"folder:{tmp_path / 'shards'}", "--out", str(out), "--sizes", "32",
               "--val-fraction", "0") == 0
    samples = sorted(read_samples(out, "train", image_sizes=(32,)), key=lambda s: s["key"])
    assert [s["txt"] for s in samples] == [f"a web caption {i}" for i in range(3)]
    assert [s["json"]["path"] for s in samples] == [f"00000.tar:00000000{i}.jpg" for i in range(3)]
    assert [s["key"] for s in samples] == [f"00000_00000000{i}" for i in range(3)]
    for s in samples:
        assert_quadrants(s["image_32"], 32, tol=12)  # JPEG

    # A shard given directly, capped by --count.
    assert run("--source", f"folder:{shard}", "--out", str(tmp_path / "one"), "--sizes", "32",
               "--count", "2", "--val-fraction", "0") == 0
    assert len(read_samples(tmp_path / "one", "train", image_sizes=(32,))) == 2


def test_transparency_goes_onto_white(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(src / "clear.png")
    (src / "clear.txt").write_text("nothing")
    samples, total, licences = folder.open_source(src, (8,), None)
    [sample] = list(samples)
    assert total == 1 and licences is None
    assert set(sample.images[8].getdata()) == {(255, 255, 255)}


def test_square_resize_is_a_centre_crop():
    # A 3:1 strip whose middle third is one colour: the crop keeps exactly that third.
    image = Image.new("RGB", (30, 10), (255, 0, 0))
    image.paste((0, 0, 255), (10, 0, 20, 10))
    out = folder.square_resize(image, 10)
    assert out.size == (10, 10) and set(out.getdata()) == {(0, 0, 255)}


def test_colliding_names_get_distinct_keys():
    keys = folder.unique_keys(["a b.png", "a_b.png", "x/y.jpg", "s.tar:k.jpg"])
    assert keys[2:] == ["x_y", "s_k"]
    assert keys[0] != keys[1] and all(k.startswith("a_b-") and KEY_RE.match(k) for k in keys[:2])


def one_error(capsys) -> str:
    """The one error line (the build's progress bar may precede it on stderr)."""
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\n")[-1].split("\r")[-1]
    assert err.count("cascade: error") == 1 and last.startswith("cascade: error: ")
    return last


def test_missing_path(tmp_path, capsys):
    assert run("--source", f"folder:{tmp_path / 'nope'}", "--out", str(tmp_path / "o")) == 2
    err = one_error(capsys)
    assert "folder not found" in err and str(tmp_path / "nope") in err


def test_no_pairs(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "lonely.png").write_bytes(b"x")
    assert run("--source", f"folder:{tmp_path / 'empty'}", "--out", str(tmp_path / "o")) == 2
    assert "no captioned images in" in one_error(capsys)


def test_unreadable_image_names_the_file(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    quadrant_image(16, 16).save(src / "good.png")
    (src / "good.txt").write_text("fine")
    (src / "broken.jpg").write_bytes(b"definitely not a jpeg")
    (src / "broken.txt").write_text("a caption")
    assert run("--source", f"folder:{src}", "--out", str(tmp_path / "o"), "--sizes", "16") == 2
    assert f"unreadable image {src / 'broken.jpg'}" in one_error(capsys)
    assert not list((tmp_path / "o").glob("*/*.tar"))  # nothing half-written


@pytest.mark.parametrize("text", ["", "  \n\t"])
def test_empty_caption_names_the_file(tmp_path, capsys, text):
    src = tmp_path / "src"
    src.mkdir()
    quadrant_image(16, 16).save(src / "pic.png")
    (src / "pic.txt").write_text(text)
    assert run("--source", f"folder:{src}", "--out", str(tmp_path / "o")) == 2
    assert f"empty caption: {src / 'pic.txt'}" in one_error(capsys)
