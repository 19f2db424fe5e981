"""The compositional split (`cascade data build --holdout-pairs`) and the binding benchmark (`cascade.binding`,
`benchmarks/binding.py`): held-out pairs really absent from train, the prompt set, and its scores on
scenes the renderer draws right, and drawn with the shapes or the places swapped."""
from __future__ import annotations

import json

import pytest
import torch

from cascade.binding import DEFAULT_HOLDOUT, binding_cases, binding_scores, seen_controls
from cascade.data.reader import image_to_tensor
from cascade.data.shapes import parse_pairs, render
from cascade.errors import UserError

HOLDOUT = parse_pairs(DEFAULT_HOLDOUT)


def _draw(cases, change=lambda obj: obj):
    return torch.stack([image_to_tensor(render({**c.scene, "objects": [change(dict(o)) for o in c.scene["objects"]]},
                                               64)) for c in cases])


def test_holdout_pairs_are_absent_from_train_and_kept_in_val(tmp_path):
    from cascade.data.build import build
    from cascade.data.reader import make_val_batches

    data = tmp_path / "data"
    counts = build("shapes", data, sizes=(64,), count=300, seed=0, val_fraction=0.3, progress=False,
                   holdout_pairs="red:star,blue:circle")
    manifest = json.loads((data / "dataset.json").read_text())
    assert manifest["holdout_pairs"] == "red:star,blue:circle" and manifest["holdout_dropped"] > 0
    assert counts["train"] + counts["val"] + manifest["holdout_dropped"] == 300

    def pairs(split):
        return [(o["color"], o["shape"]) for batch in make_val_batches(data, image_sizes=(64,), split=split)
                for scene in batch["json"] for o in scene["objects"]]

    train, val = pairs("train"), pairs("val")
    assert ("red", "star") not in train and ("blue", "circle") not in train
    assert {("red", "star"), ("blue", "circle")} & set(val)
    assert {"red", "blue"} <= {c for c, _ in train} and {"star", "circle"} <= {s for _, s in train}


@pytest.mark.parametrize("text,needle", [("red:blob", "bad --holdout-pairs entry 'red:blob'"),
                                         ("red", "expected COLOUR:SHAPE"), (",", "names no pair"),
                                         ("red:circle,red:square,red:triangle,red:star,red:cross,red:heart",
                                          "every shape in red")])
def test_bad_holdout_pairs_are_one_line_errors(text, needle, tmp_path, capsys):
    from cascade.cli import main

    with pytest.raises(UserError, match=needle):
        parse_pairs(text)
    assert main(["data", "build", "--source", "shapes", "--out", str(tmp_path / "d"), "--count", "4",
                 "--holdout-pairs", text]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert main(["data", "build", "--source", "folder:x", "--out", str(tmp_path / "e"),
                 "--holdout-pairs", "red:star"]) == 2
    assert "works with --source shapes" in capsys.readouterr().err


def test_prompt_set_pairs_held_out_and_seen_objects_with_the_same_words():
    cases = binding_cases(HOLDOUT)
    assert len(cases) == 48 and [c.caption for c in binding_cases(HOLDOUT)] == [c.caption for c in cases]
    controls = seen_controls(HOLDOUT)
    assert not set(controls) & set(HOLDOUT)
    assert sorted(c for c, _ in controls) == sorted(c for c, _ in HOLDOUT)
    assert sorted(s for _, s in controls) == sorted(s for _, s in HOLDOUT)
    for case in cases:
        found = {(o["color"], o["shape"]) for o in case.scene["objects"]}
        assert found <= set(HOLDOUT if case.heldout else controls)
        for obj in case.scene["objects"]:
            assert f"{obj['color']} {obj['shape']}" in case.caption
    counts = {(c.heldout, c.count, c.relation is not None) for c in cases}
    assert counts == {(h, n, r) for h in (True, False) for n in (1, 2, 3) for r in (False, True) if n > 1 or not r}
    assert {c.relation[2] for c in cases if c.relation} == {"above", "to the left of"}


def test_scores_are_perfect_on_the_rendered_scenes_and_binding_catches_swaps():
    cases = binding_cases(HOLDOUT)
    right = binding_scores(_draw(cases), cases)
    assert right["binding_acc"] == right["count_acc"] == right["relation_acc"] == right["scene_acc"] == 1.0
    assert right["heldout_gap"] == 0.0
    # every object drawn with another shape of the set: colour and place stay right, binding is lost
    shapes = [s for _, s in HOLDOUT]
    swapped = binding_scores(_draw(cases, lambda o: {**o, "shape": shapes[(shapes.index(o["shape"]) + 1) % 4]}
                                   if o["shape"] in shapes else o), cases)
    assert swapped["colour_acc"] == 1.0 and swapped["position_acc"] == 1.0
    assert swapped["shape_acc"] < 0.5 and swapped["binding_acc"] == swapped["shape_acc"]
    # each scene mirrored top to bottom: "above" relations fail, colour and shape stay
    mirrored = binding_scores(_draw(cases, lambda o: {**o, "cell": [2 - o["cell"][0], o["cell"][1]],
                                                      "center": [o["center"][0], 1 - o["center"][1]]}), cases)
    assert mirrored["colour_acc"] == mirrored["shape_acc"] == 1.0
    assert mirrored["relation_acc"] == 0.5  # the "to the left of" half still holds
    # the held-out objects drawn wrong, the seen ones right: the gap is the whole binding
    gap = binding_scores(torch.stack([image_to_tensor(render({"objects": [], "background": c.scene["background"]},
                                                             64)) if c.heldout else img
                                      for c, img in zip(cases, _draw(cases))]), cases)
    assert gap["binding_heldout"] == 0.0 and gap["binding_seen"] == 1.0 and gap["heldout_gap"] == 1.0


def test_benchmark_prints_one_json_line_per_run_with_each_model(tmp_path, capsys):
    from benchmarks.binding import main
    from bundle_helpers import small_bundle

    bundle = small_bundle(tmp_path / "b")
    config = json.loads((bundle / "decoder" / "config.json").read_text())
    config["config"]["steps"] = 1
    (bundle / "decoder" / "config.json").write_text(json.dumps(config))
    figure = tmp_path / "fig.png"
    assert main(["--model", f"tiny={bundle}", "--holdout-pairs", "red:star,blue:circle,green:heart",
                 "--figure", str(figure), "--images", "2"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    scores = line["models"]["tiny"]
    assert line["holdout_pairs"] == "red:star,blue:circle,green:heart" and scores["images"] == 2 * 36
    assert line["images_per_prompt"] == 2
    assert {"binding_acc", "binding_seen", "binding_heldout", "heldout_gap", "count_acc", "relation_acc"} <= set(scores)
    assert all(0.0 <= scores[k] <= 1.0 for k in ("binding_acc", "colour_acc", "count_acc"))
    assert figure.stat().st_size > 0
    assert main(["--model", str(tmp_path / "nothing")]) == 2
    assert "not a model bundle" in capsys.readouterr().err


def test_benchmark_scores_each_model_at_each_guidance_scale_given(tmp_path, capsys, monkeypatch):
    import benchmarks.binding as bench
    import cascade.binding
    from bundle_helpers import small_bundle

    bundle = small_bundle(tmp_path / "b")
    config = json.loads((bundle / "decoder" / "config.json").read_text())
    config["config"]["steps"] = 1
    (bundle / "decoder" / "config.json").write_text(json.dumps(config))
    asked = []
    real = cascade.binding.generate_cases

    def spy(cascade_, cases, **kwargs):  # what the decoder was asked to sample with, per call
        settings = kwargs["settings"]
        asked.append(settings.for_stage("decoder", cascade_.stages["decoder"])["guidance"])
        return real(cascade_, cases, **kwargs)

    monkeypatch.setattr(cascade.binding, "generate_cases", spy)
    assert bench.main(["--model", f"tiny={bundle}", "--holdout-pairs", "red:star,blue:circle,green:heart",
                       "--guidance", "1,4.5"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert list(line["models"]) == ["tiny@g1", "tiny@g4.5"] and asked == [1.0, 4.5]
    assert all(line["models"][k]["images"] == 36 for k in line["models"])
    for bad in ("3,x", "-1", "inf", "60"):  # the CLI's bound, 0 to 50
        assert bench.main(["--model", str(bundle), "--guidance", bad]) == 2
        err = capsys.readouterr().err
        assert f"--guidance {bad}:" in err and "Traceback" not in err


def test_benchmark_scores_each_model_with_and_without_per_object_guidance(tmp_path, capsys, monkeypatch):
    import benchmarks.binding as bench
    import cascade.binding
    from bundle_helpers import small_bundle

    bundle = small_bundle(tmp_path / "b")
    asked = []

    def spy(cascade_, cases, **kwargs):  # the per-object scale (and share) each column asked the pipeline for
        asked.append(kwargs["regions"] if kwargs.get("region_share") is None else
                     (kwargs["regions"], kwargs["region_share"]))
        return torch.zeros(len(cases), 3, 64, 64)

    monkeypatch.setattr(cascade.binding, "generate_cases", spy)
    pairs = ["--holdout-pairs", "red:star,blue:circle,green:heart", "--guidance", "2"]
    assert bench.main(["--model", f"tiny={bundle}", *pairs, "--regions", "0,2.5"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert list(line["models"]) == ["tiny@g2", "tiny@g2+r2.5"] and asked == [None, 2.5]
    assert line["models"]["tiny@g2+r2.5"]["region_share"] == 0.25 and "region_share" not in line["models"]["tiny@g2"]
    asked.clear()
    assert bench.main(["--model", f"tiny={bundle}", *pairs, "--regions", "2", "--regions-share", "0.25,1"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert list(line["models"]) == ["tiny@g2+r2/s0.25", "tiny@g2+r2/s1"] and asked == [(2.0, 0.25), (2.0, 1.0)]
    assert line["models"]["tiny@g2+r2/s1"]["region_share"] == 1.0
    for bad, message in ((["--regions", "x"], "--regions x:"), (["--regions", "2", "--regions-share", "2"], "at most 1"),
                         (["--regions-share", "0.5"], "give --regions W too")):
        assert bench.main(["--model", str(bundle), *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    monkeypatch.undo()
    assert bench.main(["--model", str(bundle), "--regions", "2"]) == 2  # an unCLIP bundle: one line
    err = capsys.readouterr().err
    assert "Imagen-style bundle" in err and "Traceback" not in err


@pytest.mark.parametrize("args,message", [
    (["--system", "imagen"], "give 'unclip' or NAME=DECODER_YAML"),
    (["--system", "unclip", "--system", "x=nope.yaml"], "no such config file nope.yaml"),
    (["--minutes", "0"], "--minutes and --steps-per-minute must be > 0"),
])
def test_binding_hour_mistakes_are_one_line(args, message, tmp_path, capsys, monkeypatch):
    from benchmarks.binding_hour import ROOT, main

    monkeypatch.chdir(ROOT)
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "train" / "shard-000000.tar").write_bytes(b"")
    assert main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.slow
def test_binding_hour_trains_both_systems_inside_their_minutes_and_scores_them(tmp_path, capsys):
    """A 0.4-minute 'hour': unclip trains clip, embeds, trains prior and decoder; imagen its decoder; each
    chain ends near its budget, both bundles are scored, and a rerun keeps the finished stages."""
    import time

    from benchmarks.binding_hour import main
    from cascade.cli import main as cli

    data = tmp_path / "data"
    assert cli(["data", "build", "--source", "shapes", "--out", str(data), "--count", "120", "--sizes", "64",
                "--holdout-pairs", "red:star,blue:circle"]) == 0
    args = ["--data", str(data), "--out", str(tmp_path / "out"), "--minutes", "0.4", "--parallel",
            "--images", "1", "--steps-per-minute", "50"]
    started = time.monotonic()
    assert main(args) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(line["systems"]) == {"unclip", "imagen"} and line["threads"] >= 1
    unclip, imagen = line["systems"]["unclip"]["training"], line["systems"]["imagen"]["training"]
    assert set(unclip) == {"clip", "embed", "prior", "decoder"} and set(imagen) == {"decoder"}  # (sorted keys)
    assert all(part["steps"] >= 1 and part["ended_by"] in ("minutes", "max_steps")
               for part in (*unclip.values(), *imagen.values()) if "steps" in part)
    # the budget holds up to one step and each process's start-up
    assert imagen["decoder"]["minutes"] < 0.4 + 0.6
    cases = len(binding_cases(parse_pairs("red:star,blue:circle")))  # the prompt set of these two pairs
    for name in ("unclip", "imagen"):
        scores = line["systems"][name]["scores"]
        assert scores["images"] == cases and 0.0 <= scores["binding_acc"] <= 1.0
    assert (tmp_path / "out" / "binding.png").is_file()
    assert not (tmp_path / "out" / "imagen" / "bundle" / "clip").exists()  # text -> decoder reads no CLIP
    assert time.monotonic() - started < 600
    assert main(args) == 0  # again: every stage is there, nothing trains, the same scores
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["systems"]["imagen"]["scores"] == line["systems"]["imagen"]["scores"]
    assert again["systems"]["unclip"]["training"] == line["systems"]["unclip"]["training"]
