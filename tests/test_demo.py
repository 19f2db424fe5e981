"""The demo's plans: every stage's config, with the plan's changes, is a valid config, and a stage that
is already exported is not trained again."""
from pathlib import Path

import pytest

from cascade import demo
from cascade.training.config import load_run_config


@pytest.mark.parametrize("plan", [demo.FULL, demo.QUICK], ids=lambda p: p.name)
@pytest.mark.parametrize("stage", demo.STAGES)
def test_plan_configs_validate_with_their_changes(plan, stage, tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(demo, "run", lambda cmd, part=None: commands.append(cmd))
    demo.train(stage, plan, tmp_path / "data", tmp_path / "runs", tmp_path / "bundle")
    (cmd,) = commands
    config = Path(cmd[cmd.index("--config") + 1])
    rc = load_run_config(config, stage)  # a mistyped override key fails here, naming the key
    assert cmd[cmd.index("--max-steps") + 1] == str(plan.steps[stage])
    for section, values in plan.overrides.get(stage, {}).items():
        parsed = getattr(rc, section)
        for key, value in values.items():
            assert getattr(parsed, key) == value, (section, key)
    assert rc.train.eval_at_end is False  # every stage is evaluated once, by `cascade eval` at the end


def test_an_exported_stage_is_not_trained_again(tmp_path, monkeypatch, capsys):
    (tmp_path / "bundle" / "prior").mkdir(parents=True)
    (tmp_path / "bundle" / "prior" / "model.safetensors").write_bytes(b"")
    commands = []
    monkeypatch.setattr(demo, "run", lambda cmd, part=None: commands.append(cmd))
    demo.train("prior", demo.QUICK, tmp_path / "data", tmp_path / "runs", tmp_path / "bundle")
    assert commands == [] and "prior: already trained" in capsys.readouterr().out


def test_the_decoder_trains_after_prior_and_sr256_and_previews_through_them(tmp_path, monkeypatch):
    """The unCLIP demo's order puts every stage a preview needs (clip, prior, sr256) in the bundle before the
    decoder trains, and the decoder's command asks for previews of the three prompts into out/<plan>/progress."""
    commands = []
    monkeypatch.setattr(demo, "run", lambda cmd, part=None: commands.append(cmd))
    (tmp_path / "out" / "quick" / "eval").mkdir(parents=True)
    assert demo.demo(demo.QUICK, tmp_path, unclip=True) == 0
    trained = [cmd[cmd.index("--stage") + 1] for cmd in commands if "--stage" in cmd]
    assert sorted(trained) == sorted(demo.STAGES)
    assert trained.index("decoder") > max(trained.index("clip"), trained.index("prior"), trained.index("sr256"))
    (decoder,) = [cmd for cmd in commands if "--stage" in cmd and cmd[cmd.index("--stage") + 1] == "decoder"]
    assert decoder[decoder.index("--preview-bundle") + 1] == str(tmp_path / "bundles" / "quick")
    assert decoder[decoder.index("--preview-out") + 1] == str(tmp_path / "out" / "quick" / "progress")
    prompts = [decoder[i + 1] for i, x in enumerate(decoder) if x == "--preview-prompt"]
    assert prompts == list(demo.PROMPTS)
    from train_stage import build_parser

    build_parser().parse_args(decoder[2:])  # every option the demo passes is one train_stage.py takes


def test_source_view_links_only_the_named_parts_of_the_mixed_set(tmp_path):
    mixed = tmp_path / "mixed"
    for split in ("train", "val"):
        (mixed / split).mkdir(parents=True)
        for name in ("shapes-single-shard-000000.tar", "emoji-shard-000000.tar"):
            (mixed / split / name).write_bytes(name.encode())
    assert demo.source_view(mixed, ()) == mixed
    view = demo.source_view(mixed, ("shapes",))
    assert view == tmp_path / "mixed-shapes" and demo.source_view(mixed, ("shapes",)) == view  # again: no error
    for split in ("train", "val"):
        (link,) = (view / split).iterdir()
        assert link.name == "shapes-single-shard-000000.tar" and link.read_bytes() == link.name.encode()
        (mixed / split / link.name).write_bytes(b"re-embedded")  # embed rewrites the mixed set in place
        assert link.read_bytes() == b"re-embedded"


def test_the_quick_plan_trains_its_decoder_on_one_object_shapes_scenes(tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(demo, "run", lambda cmd, part=None: commands.append(cmd))
    (tmp_path / "out" / "quick-imagen" / "eval").mkdir(parents=True)
    demo.demo(demo.QUICK, tmp_path)
    (build,) = [cmd for cmd in commands if "build" in cmd and "shapes:single" in cmd]
    assert build[build.index("--count") + 1] == str(demo.QUICK.shapes)
    (decoder,) = [cmd for cmd in commands if "--stage" in cmd and cmd[cmd.index("--stage") + 1] == "decoder"]
    assert decoder[decoder.index("--data") + 1] == str(tmp_path / "data" / "quick" / "mixed-shapes")


def _stage_folder(bundle: Path, stage: str, weights: bytes) -> None:
    (bundle / stage).mkdir(parents=True)
    (bundle / stage / "model.safetensors").write_bytes(weights)
    (bundle / stage / "config.json").write_text("{}")


def test_the_default_demo_is_imagen_style_trains_no_clip_or_prior_and_shares_the_upsamplers(tmp_path, monkeypatch):
    """No option: the Imagen-style system (issue #25: the binding benchmark's winner is the demo's default),
    with the plan's data, the Imagen-style decoder config, no clip / embed / prior, its own bundle; the
    unCLIP bundle's exported SR stages are copied in, not trained again."""
    commands = []
    monkeypatch.setattr(demo, "run", lambda cmd, part=None: commands.append(cmd))
    _stage_folder(tmp_path / "bundles" / "quick", "sr256", b"weights")
    (tmp_path / "out" / "quick-imagen" / "eval").mkdir(parents=True)
    monkeypatch.setattr("cascade.bundle.write_manifest", lambda bundle: None)
    assert demo.demo(demo.QUICK, tmp_path) == 0
    trained = [cmd[cmd.index("--stage") + 1] for cmd in commands if "--stage" in cmd]
    assert trained == ["decoder", "sr1024"]  # sr256 came from the unCLIP bundle
    assert not any("embed" in cmd for cmd in commands)
    shared = tmp_path / "bundles" / "quick-imagen" / "sr256" / "model.safetensors"
    assert shared.read_bytes() == b"weights"
    (decoder,) = [cmd for cmd in commands if "--stage" in cmd and cmd[cmd.index("--stage") + 1] == "decoder"]
    rc = load_run_config(Path(decoder[decoder.index("--config") + 1]), "decoder")
    assert rc.model.conditioning == "imagen" and rc.model.steps == 25  # the quick plan's change, applied
    full = load_run_config(demo.IMAGEN_DECODER, "decoder").model
    assert rc.model.guidance == 3.0 != full.guidance
    assert rc.model.grounding_loss == 0.0 < full.grounding_loss  # grounding: the full demo's only
    assert decoder[decoder.index("--export") + 1] == str(tmp_path / "bundles" / "quick-imagen")
    data = Path(decoder[decoder.index("--data") + 1])
    assert data.parent == tmp_path / "data" / "quick"  # the plan's data, shared with the unCLIP run
    generate = [cmd for cmd in commands if "generate" in cmd]
    assert len(generate) == len(demo.PROMPTS)
    assert all(cmd[cmd.index("--model") + 1] == str(tmp_path / "bundles" / "quick-imagen") for cmd in generate)


def test_the_unclip_demo_shares_the_imagen_style_bundles_upsamplers(tmp_path, monkeypatch):
    """--unclip after the default demo: clip, embed, prior and the unCLIP decoder train into bundles/<plan>;
    the SR stages the Imagen-style run exported are copied in, not trained again."""
    commands = []
    monkeypatch.setattr(demo, "run", lambda cmd, part=None: commands.append(cmd))
    for stage in ("sr256", "sr1024"):
        _stage_folder(tmp_path / "bundles" / "quick-imagen", stage, stage.encode())
    (tmp_path / "out" / "quick" / "eval").mkdir(parents=True)
    monkeypatch.setattr("cascade.bundle.write_manifest", lambda bundle: None)
    assert demo.demo(demo.QUICK, tmp_path, unclip=True) == 0
    trained = [cmd[cmd.index("--stage") + 1] for cmd in commands if "--stage" in cmd]
    assert trained == ["clip", "prior", "decoder"]
    assert sum("embed" in cmd for cmd in commands) == 1
    for stage in ("sr256", "sr1024"):
        assert (tmp_path / "bundles" / "quick" / stage / "model.safetensors").read_bytes() == stage.encode()
    (decoder,) = [cmd for cmd in commands if "--stage" in cmd and cmd[cmd.index("--stage") + 1] == "decoder"]
    rc = load_run_config(Path(decoder[decoder.index("--config") + 1]), "decoder")
    assert rc.model.conditioning == "unclip"
    assert decoder[decoder.index("--export") + 1] == str(tmp_path / "bundles" / "quick")


def test_the_demo_command_line_picks_the_system(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(demo, "demo", lambda plan, root, *, unclip=False: calls.append((plan.name, unclip)) or 0)
    assert demo.main(["--quick"]) == 0 and demo.main(["--unclip"]) == 0 and demo.main(["--imagen"]) == 0
    assert calls == [("quick", False), ("tiny", True), ("tiny", False)]
    with pytest.raises(SystemExit) as stop:
        demo.main(["--unclip", "--imagen"])
    assert stop.value.code == 2 and "give one" in capsys.readouterr().err


def test_the_demo_evaluates_again_only_when_the_bundles_weights_changed(tmp_path, monkeypatch):
    """A demo run again after a finished one does not evaluate the same weights twice; after a stage was trained
    again (here: the decoder's weights rewritten), it does, instead of keeping the old weights' scores."""
    import os

    commands = []
    monkeypatch.setattr(demo, "run", lambda cmd, part=None: commands.append(cmd))
    monkeypatch.setattr("cascade.bundle.write_manifest", lambda bundle: None)
    bundle = tmp_path / "bundles" / "quick-imagen"
    for stage in demo.IMAGEN_ORDER:
        _stage_folder(bundle, stage, stage.encode())
    (tmp_path / "out" / "quick-imagen" / "eval").mkdir(parents=True)

    def evaluations() -> int:
        commands.clear()
        assert demo.demo(demo.QUICK, tmp_path) == 0
        assert not any("--stage" in cmd for cmd in commands)  # every stage exported: nothing trains
        return sum("eval" in cmd for cmd in commands)

    assert evaluations() == 1
    assert evaluations() == 0
    weights = bundle / "decoder" / "model.safetensors"
    weights.write_bytes(b"trained again")
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert evaluations() == 1
    assert evaluations() == 0
