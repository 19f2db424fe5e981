"""Files and directories that appear complete or not at all: write under a temporary name, then rename;
and files whose mode follows the umask, as open() gives them, where a writer makes them 0600."""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def umask() -> int:
    """The process's umask: from /proc/self/status on Linux, where reading it changes nothing; elsewhere
    by setting it and setting it back (os.umask has no read-only form)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def use_umask_mode(path: str | Path) -> None:
    """Give `path` the mode open() would have: 0666 less the umask (safetensors writes its files 0600,
    unlike every other file a run writes)."""
    os.chmod(path, 0o666 & ~umask())


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished directory `tmp` to `final`, replacing an older `final` if there is one."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
