"""The shapes set: attributes match pixels, the scorer reads the renderer's own images, inspect works."""
from __future__ import annotations

import numpy as np
import pytest

from cascade.cli import main
from cascade.data import shapes
from cascade.data.shapes_scorer import count_objects, score_objects


def test_attributes_match_pixels():
    for i in range(40):
        _, scene = shapes.scene_for(0, i)
        image = np.asarray(shapes.render(scene, 64).convert("RGB")).astype(int)
        for obj in scene["objects"]:
            results = score_objects(image, {**scene, "objects": [obj]})
            assert results[0].color and results[0].position, (i, obj)
            row, col = obj["cell"]
            assert 0 <= row <= 2 and 0 <= col <= 2
            assert results[0].found_cell == tuple(obj["cell"])


def test_scorer_is_at_least_98_percent_right_on_rendered_64px_images():
    right = total = 0
    for i in range(200):
        _, scene = shapes.scene_for(1, i)
        for result in score_objects(shapes.render(scene, 64), scene):
            right += result.all
            total += 1
    assert right / total >= 0.98, right / total


def _one_object_scene(seed: int = 3) -> dict:
    for i in range(100):
        _, scene = shapes.scene_for(seed, i)
        if len(scene["objects"]) == 1 and scene["objects"][0]["cell"] != [2, 2]:
            return scene
    raise AssertionError("no one-object scene")


def test_count_objects_counts_the_rendered_objects_and_a_second_copy():
    scenes = [shapes.scene_for(4, i)[1] for i in range(150)]
    right = [count_objects(shapes.render(s, 64)) == len(s["objects"]) for s in scenes]
    assert sum(right) / len(right) >= 0.98, sum(right) / len(right)  # a small thin star can fall under the noise area
    scene = _one_object_scene()
    obj = scene["objects"][0]
    copy = {**obj, "cell": [2, 2], "center": [2.5 * shapes.CELL, 2.5 * shapes.CELL]}  # the same object again
    assert count_objects(shapes.render({**scene, "objects": [obj, copy]}, 64)) == 2


def test_scorer_rejects_a_wrong_colour_and_a_wrong_cell():
    _, scene = shapes.scene_for(2, 0)
    image = shapes.render(scene, 64)
    obj = scene["objects"][0]
    others = [c for c in shapes.COLORS if c != obj["color"] and all(o["color"] != c for o in scene["objects"])]
    wrong_colour = {**scene, "objects": [{**obj, "color": others[0]}]}
    assert not score_objects(image, wrong_colour)[0].color
    row, col = obj["cell"]
    wrong_cell = {**scene, "objects": [{**obj, "cell": [(row + 1) % 3, col]}]}
    assert not score_objects(image, wrong_cell)[0].position


def test_inspect_prints_counts_writes_a_sheet_and_scores(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["data", "build", "--source", "shapes", "--out", str(out), "--count", "30", "--sizes", "64"]) == 0
    assert main(["data", "inspect", str(out), "--score", "--n", "8"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert (out / "contact_sheet.png").is_file()
    assert lines[-1].startswith("shapes scorer accuracy") and float(lines[-1].split(": ")[1].split()[0]) >= 0.9


@pytest.mark.parametrize("args,needle", [
    (["data", "build", "--source", "nothing", "--out", "x"], "unknown source"),
    (["data", "build", "--source", "shapes", "--out", "x", "--sizes", "a,b"], "bad --sizes"),
    (["data", "inspect", "/nonexistent/dir"], "/nonexistent/dir"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_inspect_counts_a_mixed_set_by_source_and_scores_its_shapes_part(tmp_path, capsys):
    """A set copied together from others (as the demo's mixed set) has no dataset.json: the counts and
    sizes come from the shards, and --score judges the shapes scenes and skips the rest."""
    import json
    import shutil

    from PIL import Image

    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for i in range(6):
        Image.new("RGB", (80, 80), (40 * i, 90, 200)).save(pictures / f"p{i}.png")
        (pictures / f"p{i}.txt").write_text(f"a flat colour {i}")
    shapes, folder, mixed = tmp_path / "shapes", tmp_path / "folder", tmp_path / "mixed"
    assert main(["data", "build", "--source", "shapes", "--out", str(shapes), "--count", "20", "--sizes", "64,128"]) == 0
    assert main(["data", "build", "--source", f"folder:{pictures}", "--out", str(folder), "--sizes", "64,128"]) == 0
    for split in ("train", "val"):
        (mixed / split).mkdir(parents=True)
        for source in (shapes, folder):
            for shard in (source / split).glob("*.tar"):
                shutil.copyfile(shard, mixed / split / f"{source.name}-{shard.name}")
    counts = {s: json.loads((d / "dataset.json").read_text())["counts"] for s, d in (("shapes", shapes), ("other", folder))}
    capsys.readouterr()
    assert main(["data", "inspect", str(mixed), "--score", "--n", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    train = counts["shapes"]["train"] + counts["other"]["train"]
    assert lines[0] == (f"train: {train} samples in 2 shards (other {counts['other']['train']}, "
                        f"shapes {counts['shapes']['train']})")
    assert "sizes: 64,128" in lines[2] and "?" not in "\n".join(lines[:3])
    assert lines[-1].startswith("shapes scorer accuracy") and f"in {counts['shapes']['val']} shapes scenes" in lines[-1]
    assert float(lines[-1].split(": ")[1].split()[0]) >= 0.9


def test_shapes_single_draws_one_object_per_scene_under_its_own_keys(tmp_path):
    scenes = [shapes.scene_for(0, i, single=True) for i in range(60)]
    assert all(len(scene["objects"]) == 1 for _, scene in scenes)
    assert all(scene["objects"][0]["color"] in text for text, scene in scenes)
    assert shapes.sample_key(0, 3, single=True) != shapes.sample_key(0, 3)  # the two sets can be mixed
    out = tmp_path / "single"
    assert main(["data", "build", "--source", "shapes:single", "--out", str(out), "--count", "12"]) == 0
    from cascade.data.reader import read_samples

    samples = read_samples(out, "train") + read_samples(out, "val")
    assert len(samples) == 12 and all(len(s["json"]["objects"]) == 1 for s in samples)


def test_an_unknown_shapes_variant_is_a_one_line_error(tmp_path, capsys):
    assert main(["data", "build", "--source", "shapes:many", "--out", str(tmp_path / "x")]) == 2
    assert "shapes:many" in capsys.readouterr().err
