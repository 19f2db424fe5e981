"""The package's boundary: the names other stages code against, and nothing imported but torch."""
import inspect
import subprocess
import sys

import cascade.diffusion as diffusion


def test_public_names_exist():
    missing = [name for name in diffusion.__all__ if not hasattr(diffusion, name)]
    assert missing == []
    params = inspect.signature(diffusion.sample).parameters
    assert list(params)[:2] == ["denoise", "shape"]
    for name in ("schedule", "sampler", "steps", "eta", "guidance", "threshold", "generator", "x_T",
                 "callback", "progress"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["eta"].default == 0.0 and params["guidance"].default is None


def test_importing_diffusion_pulls_in_torch_only():
    code = ("import sys, torch; before = set(sys.modules); import cascade.diffusion; "
            "print(sorted(m for m in set(sys.modules) - before "
            "if not m.startswith(('torch', 'cascade.diffusion')) and m not in ('cascade', 'cascade.errors')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
