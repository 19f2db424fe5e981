"""What the `cascade` command does with a user's inputs before and after sampling: seeds, --out, the
default model, which stages it loads, file names that never replace earlier outputs, messages that say
what is wrong, and help text for every option (issue #20)."""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cascade.cli import build_parser, main
from cascade.pipeline import Cascade, Result
from cascade.registry import EMBEDDING_JOBS

FAST = "prior=2,decoder=2"


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "src.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(path)
    return path


@pytest.fixture
def quick_generate(monkeypatch):
    """`Cascade.generate` without sampling: 64x64 images drawn from the seed (for tests of what happens
    around the sampling)."""
    def generate(self, prompts, *, seed=0, until="sr1024", settings=None, progress=None, negative_prompt=None):
        g = torch.Generator().manual_seed(seed)
        return Result({"decoder": torch.rand(len(prompts), 3, 64, 64, generator=g) * 2 - 1},
                      torch.zeros(len(prompts), 32))

    monkeypatch.setattr(Cascade, "generate", generate)


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the command gets as far as loading a model."""
    monkeypatch.setattr(Cascade, "from_bundle", lambda *a, **k: pytest.fail("a model was loaded"))


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _commands(image: Path) -> list[list[str]]:
    """One call of every model command that samples, each valid but for what the test adds."""
    return [["generate", "--prompt", "a red circle"], ["vary", "--image", str(image)],
            ["interpolate", "--image", str(image), "--image", str(image)],
            ["textdiff", "--image", str(image), "--from", "a red circle", "--to", "a blue square"]]


# ---------------------------------------------------------------------------------------------- seeds
@pytest.mark.parametrize("seed", [str(2**63), "100000000000000000000", "-1"])
def test_an_out_of_range_seed_is_one_line_before_any_model_loads(bundle, image, tmp_path, seed, no_loading, capsys):
    for command in _commands(image):
        assert main([*command, "--model", str(bundle), "--out", str(tmp_path / "o"), "--seed", seed]) == 2
        err = _error(capsys)
        assert "--seed" in err and "2**63" in err
    data = tmp_path / "data"
    (data / "val").mkdir(parents=True)
    assert main(["eval", "--model", str(bundle), "--data", str(data), "--out", str(tmp_path / "e"),
                 "--seed", seed]) == 2
    assert "--seed" in _error(capsys)


@pytest.mark.parametrize("seed", [10**16, 2**63 - 1])
def test_large_seeds_run(bundle, tmp_path, seed, capsys):
    """10**16 * 7919 overflowed the generator's 64 bits (issue #20); every seed below 2**63 runs."""
    assert main(["generate", "--prompt", "a red circle", "--model", str(bundle), "--until", "decoder",
                 "--steps", FAST, "--num-images", "1", "--seed", str(seed), "--out", str(tmp_path / "o"),
                 "--quiet"]) == 0
    assert f"s{seed}-00.png" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- --out
def test_an_out_that_is_a_file_or_under_a_file_is_one_line_before_any_model_loads(bundle, image, tmp_path,
                                                                                    no_loading, capsys):
    file = tmp_path / "taken.png"
    file.write_bytes(b"not a directory")
    for out, needle in [(file, f"--out {file} is a file, not a directory"),
                        (file / "sub" / "dir", f"cannot make --out {file / 'sub' / 'dir'}: {file} is a file")]:
        for command in _commands(image):
            assert main([*command, "--model", str(bundle), "--out", str(out)]) == 2
            assert needle in _error(capsys)
    assert file.read_bytes() == b"not a directory"


def test_a_read_only_out_is_one_line_before_any_model_loads(bundle, image, tmp_path, monkeypatch, no_loading,
                                                            capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root may write anyway: answer as the kernel does for anyone else
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: (Path(p) != ro or not mode & os.W_OK)
                            and real(p, mode, **kw))
    try:
        for out, needle in [(ro, f"--out {ro} is not writable"),
                            (ro / "new", f"cannot make --out {ro / 'new'}: {ro} is not writable")]:
            for command in _commands(image):
                assert main([*command, "--model", str(bundle), "--out", str(out)]) == 2
                assert needle in _error(capsys)
    finally:
        ro.chmod(0o755)


# ---------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("theta", ["7", "0", "-0.5", "nan"])
def test_max_theta_outside_0_to_1_is_one_line(bundle, image, tmp_path, theta, no_loading, capsys):
    assert main(["textdiff", "--image", str(image), "--from", "a", "--to", "b", "--max-theta", theta,
                 "--model", str(bundle), "--out", str(tmp_path / "o")]) == 2
    assert f"--max-theta {float(theta)}" in _error(capsys)


def test_every_option_of_every_command_has_help_and_every_command_a_description():
    def walk(parser, name):
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, child in action.choices.items():
                    yield from walk(child, f"{name} {sub}")

    parsers = dict(walk(build_parser(), "cascade"))
    assert {"cascade vary", "cascade interpolate", "cascade textdiff", "cascade data build",
            "cascade data embed"} <= set(parsers)
    for name, parser in parsers.items():
        assert parser.description, f"{name} has no description"
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"{name} {'/'.join(action.option_strings) or action.dest} has no help"


def test_vary_help_starts_with_its_description(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["vary", "--help"])
    assert exit_.value.code == 0
    assert "Make variations of an image" in capsys.readouterr().out


@pytest.mark.parametrize("argv,command", [(["data", "inspect", "some/set", "--data", "x"], "cascade data inspect"),
                                          (["generate", "--prompt", "a red star", "--bundle", "b"], "cascade generate")])
def test_an_unknown_option_is_reported_with_the_commands_own_usage(argv, command, capsys):
    """Not the top level's "usage: cascade [-h] COMMAND ...", which does not show the options there are."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: {command} " in err
    assert f"{command}: error: unrecognized arguments: {' '.join(argv[-2:])}" in err


@pytest.mark.parametrize("argv,wrong,guess", [
    (["generate", "--prompt", "a red star", "--bundle", "b"], "--bundle", "--model"),
    (["generate", "--prompt", "a red star", "--num-imgs", "2"], "--num-imgs", "--num-images"),
    (["generate", "--negative-prompts=red", "--prompt", "a red star"], "--negative-prompts", "--negative-prompt"),
    (["eval", "--model", "m", "--dataset", "d"], "--dataset", "--data"),
    (["train_stage.py", "--stage", "decoder", "--confg", "c.yaml"], "--confg", "--config"),
    (["train_stage.py", "--stage", "decoder", "--config", "c.yaml", "--steps", "9"], "--steps", "--max-steps")])
def test_an_unknown_option_names_the_option_it_was_probably_meant_to_be(argv, wrong, guess, capsys):
    """A synonym (--bundle), near spellings, and one that stands in for a required option (eval's --data);
    in `cascade` and in train_stage.py."""
    from train_stage import main as train_main

    with pytest.raises(SystemExit) as exit_:
        train_main(argv[1:]) if argv[0] == "train_stage.py" else main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f"(did you mean {guess}, not {wrong}?)")


def test_an_unknown_option_like_no_option_gets_no_guess(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "a red star", "--frobnicate", "3"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --frobnicate 3" in err and "did you mean" not in err


def test_an_abbreviated_option_is_not_taken_for_an_unknown_one(capsys):
    """argparse takes --num-im for --num-images: the error here is the missing --prompt, with no guess."""
    with pytest.raises(SystemExit):
        main(["generate", "--num-im", "2"])
    err = capsys.readouterr().err
    assert err.strip().endswith("required: --prompt")


# ---------------------------------------------------------------------------------------------- outputs
def test_a_second_run_with_the_same_prompt_and_seed_keeps_the_first_runs_files(bundle, tmp_path, quick_generate,
                                                                                  capsys):
    out = tmp_path / "o"
    args = ["generate", "--prompt", "a red circle", "--model", str(bundle), "--until", "decoder", "--steps", FAST,
            "--num-images", "2", "--seed", "4", "--out", str(out), "--quiet"]
    assert main(args) == 0
    first = capsys.readouterr().out.split()
    assert [Path(p).name for p in first] == [f"a-red-circle-s4-{n}.png" for n in ("00", "01", "grid")]
    before = {p: Path(p).read_bytes() for p in first}
    for (p, data) in before.items():
        Path(p).write_bytes(data + b"mark")  # so a rewrite would show
    assert main(args) == 0
    second = capsys.readouterr().out.split()
    assert [Path(p).name for p in second] == [f"a-red-circle-s4-2-{n}.png" for n in ("00", "01", "grid")]
    assert all(Path(p).read_bytes() == data + b"mark" for p, data in before.items())
    assert main(args) == 0
    assert Path(capsys.readouterr().out.split()[-1]).name == "a-red-circle-s4-3-grid.png"
    # One leftover name of a set is enough to move the next set on; --overwrite writes the plain names.
    (out / "a-red-circle-s4-4-01.png").write_bytes(b"x")
    assert main(args) == 0
    assert Path(capsys.readouterr().out.split()[0]).name == "a-red-circle-s4-5-00.png"
    assert main(args + ["--overwrite"]) == 0
    assert capsys.readouterr().out.split() == first
    assert np.array_equal(np.asarray(Image.open(first[0])), np.asarray(Image.open(second[0])))
    assert Path(first[0]).read_bytes() != before[first[0]] + b"mark"


# ---------------------------------------------------------------------------------------------- messages
def test_a_file_given_as_model_and_a_directory_given_as_image_say_so(bundle, image, tmp_path, capsys):
    notes = tmp_path / "some_file.txt"
    notes.write_text("hello")
    assert main(["generate", "--prompt", "a cat", "--model", str(notes), "--out", str(tmp_path / "o")]) == 2
    assert f"{notes} is a file, not a model bundle" in _error(capsys)
    assert main(["generate", "--prompt", "a cat", "--model", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert f"model bundle not found: {tmp_path / 'nope'} does not exist" in _error(capsys)
    folder = tmp_path / "some_dir"
    folder.mkdir()
    assert main(["vary", "--image", str(folder), "--model", str(bundle), "--out", str(tmp_path / "o")]) == 2
    assert f"{folder} is a directory, not an image file" in _error(capsys)
    assert main(["vary", "--image", str(tmp_path / "no.png"), "--model", str(bundle)]) == 2
    assert "image not found" in _error(capsys)


# ---------------------------------------------------------------------------------------------- default model
def test_without_model_the_demo_bundle_is_used_and_named(bundle, tmp_path, monkeypatch, quick_generate, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CASCADE_MODEL", raising=False)
    args = ["generate", "--prompt", "a red circle", "--until", "decoder", "--steps", FAST, "--num-images", "1",
            "--quiet"]
    assert main(args) == 2
    err = _error(capsys)
    assert "no --model given" in err and "make demo-quick" in err
    (tmp_path / "bundles").mkdir()
    for name in ("quick", "tiny"):  # the quick demo's bundle, until the full demo has built the tiny one
        shutil.copytree(bundle, tmp_path / "bundles" / name)
        assert main(args) == 0
        out, err = capsys.readouterr()
        assert err.startswith(f"cascade: using model bundles/{name} (") and len(err.splitlines()) == 1
        with Image.open(out.split()[0]) as im:
            assert im.text["model"] == f"bundles/{name}"
    monkeypatch.setenv("CASCADE_MODEL", str(bundle))
    assert main(args) == 0
    assert f"using model {bundle} (from $CASCADE_MODEL)" in capsys.readouterr().err


def test_without_model_the_imagen_style_demo_bundle_comes_first_but_vary_takes_an_unclip_one(bundle, tmp_path,
                                                                                                 monkeypatch, capsys):
    """The demo's default system is Imagen-style (bundles/<plan>-imagen); the commands that need CLIP image
    embeddings (vary, interpolate, textdiff) pass over it to an unCLIP bundle, or say how to make one."""
    import json

    from cascade.cli import resolve_model
    from cascade.errors import UserError

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CASCADE_MODEL", raising=False)
    imagen = tmp_path / "bundles" / "tiny-imagen"
    shutil.copytree(bundle, imagen)
    config = json.loads((imagen / "decoder" / "config.json").read_text())
    config["config"]["conditioning"] = "imagen"
    (imagen / "decoder" / "config.json").write_text(json.dumps(config))

    def resolved(command):
        args = argparse.Namespace(model=None, command=command)
        resolve_model(args)
        return args.model

    assert resolved("generate") == "bundles/tiny-imagen"
    for command in EMBEDDING_JOBS:
        with pytest.raises(UserError, match=f"{command} works on CLIP image embeddings.*make demo-quick-unclip"):
            resolved(command)
    shutil.copytree(bundle, tmp_path / "bundles" / "quick")  # the unCLIP quick demo's bundle
    assert resolved("generate") == "bundles/tiny-imagen" and resolved("inpaint") == "bundles/tiny-imagen"
    assert resolved("vary") == resolved("interpolate") == resolved("textdiff") == "bundles/quick"
    capsys.readouterr()
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    shutil.rmtree(tmp_path / "bundles" / "quick")
    assert main(["vary", "--image", str(image), "--out", str(tmp_path / "o")]) == 2  # one line, no traceback
    assert "Imagen-style, which has none" in _error(capsys)


# ---------------------------------------------------------------------------------------------- stages loaded
def test_a_corrupt_later_stage_does_not_block_an_earlier_until(bundle, image, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    for stage in ("sr256", "sr1024"):
        (broken / stage / "model.safetensors").write_bytes(b"garbage")
    common = ["--model", str(broken), "--steps", FAST, "--out", str(tmp_path / "o"), "--quiet"]
    assert main(["generate", "--prompt", "a red circle", "--num-images", "1", "--until", "decoder", *common]) == 0
    assert main(["generate", "--prompt", "a red circle", "--num-images", "1", "--until", "sr256", *common]) == 2
    assert "sr256/model.safetensors" in _error(capsys)
    # vary, interpolate and textdiff start from an image embedding: they never need the prior.
    (broken / "prior" / "model.safetensors").write_bytes(b"garbage")
    for command in _commands(image)[1:]:
        num = ["--frames", "2"] if command[0] != "vary" else ["--num-images", "1"]
        assert main([*command, *num, "--until", "decoder", *common]) == 0


def test_embedding_jobs_are_commands_pipeline_methods_and_studio_tabs(capsys):
    """One list (cascade.registry.EMBEDDING_JOBS) says which jobs need an unCLIP bundle: the CLI's default-bundle
    lookup, the pipeline's refusal and the studio's disabled tabs all read it, so each must be all three."""
    html = (Path(__file__).parents[1] / "cascade" / "serve" / "static" / "index.html").read_text()
    assert set(EMBEDDING_JOBS) == {"vary", "interpolate", "textdiff"}
    for job in EMBEDDING_JOBS:
        with pytest.raises(SystemExit) as done:
            build_parser().parse_args([job, "--help"])
        assert done.value.code == 0 and f"usage: cascade {job}" in capsys.readouterr().out
        assert callable(getattr(Cascade, job))
        assert f'data-tab="{job}"' in html


@pytest.mark.parametrize("argv,option", [
    (["generate", "--prompt", "a red star", "--prompt", "a blue circle"], "--prompt"),
    (["generate", "--prompt", "a red star", "--negative-prompt", "red", "--negative-prompt", "blue"],
     "--negative-prompt"),
    (["img2img", "--image", "x.png", "--prompt", "a", "--prompt", "b"], "--prompt"),
    (["textdiff", "--image", "x.png", "--from", "a", "--to", "b", "--to", "c"], "--to"),
])
def test_a_text_option_given_twice_is_an_error_not_a_silently_dropped_prompt(argv, option, no_loading, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert f"error: argument {option}: given twice" in capsys.readouterr().err


@pytest.mark.parametrize("count,size,grid", [(1, 512, False), (2, 512, True), (1, 64, True)])
def test_a_grid_is_written_unless_it_would_copy_one_image(tmp_path, count, size, grid, capsys):
    """A grid of one image over 256 px has no caption, so it would be the image again: only the image is
    written. Two images, or one small enough to carry its caption, get their grid."""
    from cascade.cli import _write

    images = torch.linspace(-1, 1, count * 3 * size * size).reshape(count, 3, size, size)
    result = Result({"sr1024": images}, None)
    args = argparse.Namespace(out=str(tmp_path), overwrite=False)
    paths = _write(result, args, "p", {"prompt": "p"}, ["p"] * count)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([f"p-{i:02d}.png" for i in range(count)] + ["p-grid.png"] * grid)
    assert [p.name for p in paths] == [f"p-{i:02d}.png" for i in range(count)] + ["p-grid.png"] * grid
    assert np.asarray(Image.open(tmp_path / "p-00.png")).shape == (size, size, 3)
    again = _write(result, args, "p", {"prompt": "p"}, ["p"] * count)  # the next set moves on, grid or not
    assert again[0].name == "p-2-00.png"
