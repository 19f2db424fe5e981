"""The torchvision shim: open_clip and timm must import beside the CPU torch wheel."""
import subprocess
import sys


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_open_clip_and_timm_import_after_the_shim():
    out = _run(
        "from cascade._torchvision_compat import ensure_torchvision\n"
        "ensure_torchvision(); ensure_torchvision()\n"  # idempotent
        "import torch, open_clip, timm\n"
        "from torchvision.transforms import functional as F\n"
        "x = torch.rand(3, 8, 8)\n"
        "assert torch.equal(F.hflip(F.hflip(x)), x)\n"
        "m = timm.create_model('efficientnet_lite0', pretrained=False, num_classes=0)\n"
        "print(m(torch.rand(1, 3, 64, 64)).shape[-1])\n"
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "1280"


def test_shim_leaves_other_import_errors_alone():
    # A RuntimeError that is not about torchvision's missing operators must propagate unchanged.
    out = _run(
        "import builtins\n"
        "real = builtins.__import__\n"
        "def fake(name, *a, **k):\n"
        "    if name == 'torchvision': raise RuntimeError('something else broke')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = fake\n"
        "from cascade._torchvision_compat import ensure_torchvision\n"
        "try:\n"
        "    ensure_torchvision()\n"
        "except RuntimeError as e:\n"
        "    print('propagated:', e)\n"
    )
    assert "propagated: something else broke" in out.stdout, out.stderr[-2000:]
