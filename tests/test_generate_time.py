"""benchmarks/generate_time.py: its bundle variants change only what the setting names, and the whole
benchmark runs on a small bundle (slow: it starts `cascade generate` processes)."""
import json

import pytest
import torch

from benchmarks.generate_time import bundle_variant, main


def test_the_tiles_variant_changes_sr1024s_config_and_keeps_its_weights(bundle, tmp_path):
    from cascade.bundle import load_stage, saved_config

    variant = bundle_variant(str(bundle), "tiles", {"sr1024": {"stream_rows": None}}, tmp_path)
    assert saved_config(bundle / "sr1024").stream_rows == 32  # the original is untouched
    assert saved_config(f"{variant}/sr1024").stream_rows is None
    assert saved_config(f"{variant}/sr1024").tile_size == saved_config(bundle / "sr1024").tile_size
    ours, theirs = load_stage(f"{variant}/sr1024"), load_stage(bundle / "sr1024")
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), name
    for stage in ("clip", "prior", "decoder", "sr256"):  # the stages it does not change are the bundle's own
        assert (tmp_path / "bundle-tiles" / stage).resolve() == (bundle / stage).resolve()
    assert bundle_variant(str(bundle), "default", {}, tmp_path) == str(bundle)


@pytest.mark.slow
def test_the_benchmark_times_streamed_and_tiled_generation_on_a_small_bundle(capsys):
    assert main(["--smoke", "--settings", "default,tiles", "--loads", "quiet"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["bench"] == "generate_time"
    assert set(result["default"]) == set(result["tiles"]) == {"quiet_s"}
    assert 0 < result["default"]["quiet_s"] < 120 and 0 < result["tiles"]["quiet_s"] < 120


def test_the_intel_openmp_settings_need_the_library(tmp_path, capsys):
    for settings in ("default,iomp", "iomp_blocktime200"):
        with pytest.raises(SystemExit) as exit_:
            main(["--smoke", "--settings", settings])
        assert exit_.value.code == 2
        assert "need --intel-openmp LIB" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--smoke", "--settings", "iomp", "--intel-openmp", str(tmp_path / "missing.so")])
