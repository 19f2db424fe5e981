"""`--source emoji`: real captioned emoji from two npm packages, fetched once with `npm pack`.

- Fluent Emoji 3D (`@lobehub/fluent-emoji-3d`, MIT, Microsoft): RGBA 256x256 webp named by code
  point, captioned with the names and categories of `emoji-datasource-google`'s emoji.json (matched
  on the unified code point with FE0F dropped, skin-tone variants included: 3,374 of 3,391 match).
- OpenMoji (`openmoji`, CC-BY-SA-4.0): colour SVGs rendered with cairosvg directly at each size,
  captioned from the annotation and tags of data/openmoji.json.

Transparency is composited onto white. Packages are pinned so a build is reproducible; each is
extracted (only the files used) into `cache/<name>-<version>/`, and an extracted folder already in
the cache is reused without calling npm.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from PIL import Image
from tqdm import tqdm

from cascade.data.sample import Sample
from cascade.errors import UserError


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    keep: tuple[str, ...]  # paths inside the package to extract (a trailing '/' keeps a folder)

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def folder(self) -> str:
        return f"{self.name.lstrip('@').replace('/', '-')}-{self.version}"


FLUENT = Package("@lobehub/fluent-emoji-3d", "1.1.0", ("package.json", "assets/"))
DATASOURCE = Package("emoji-datasource-google", "16.0.0", ("package.json", "LICENSE", "emoji.json"))
OPENMOJI = Package("openmoji", "17.0.0", ("package.json", "LICENSE.txt", "data/openmoji.json", "color/svg/"))

WHICH = {"all": (FLUENT, DATASOURCE, OPENMOJI), "fluent": (FLUENT, DATASOURCE), "openmoji": (OPENMOJI,)}

# Fitzpatrick modifiers, named as in Unicode CLDR annotations ("waving hand: light skin tone").
SKIN_TONES = {"1f3fb": "light skin tone", "1f3fc": "medium-light skin tone", "1f3fd": "medium skin tone",
              "1f3fe": "medium-dark skin tone", "1f3ff": "dark skin tone"}

FLUENT_PHRASINGS = ("{name}", "a 3d emoji of {a_name}", "{name}, 3d emoji", "a glossy 3d render of {a_name}")
OPENMOJI_PHRASINGS = ("{name}", "a flat emoji of {a_name}", "{name}, flat vector emoji", "{name} ({tags})")


@dataclass(frozen=True)
class Entry:
    """One image before rendering: where it is and what it shows."""
    key: str
    path: Path
    txt: str
    json: dict[str, Any] = field(hash=False)


def open_source(cache: Path, sizes: tuple[int, ...], count: int | None,
                which: str) -> tuple[Iterator[Sample], int, str]:
    """(samples, their number, LICENSES text) for `--source emoji[:fluent|openmoji]`; the number is
    an upper bound, as a file the renderer cannot draw is skipped."""
    if which not in WHICH:
        raise UserError(f"unknown emoji set '{which}': choose emoji, emoji:fluent or emoji:openmoji")
    roots = {pkg: fetch(pkg, cache) for pkg in WHICH[which]}
    entries: list[Entry] = []
    if FLUENT in roots:
        entries += fluent_entries(roots[FLUENT], roots[DATASOURCE])
    if OPENMOJI in roots:
        entries += openmoji_entries(roots[OPENMOJI])
    entries.sort(key=lambda e: e.key)
    if count is not None:
        entries = evenly_spaced(entries, count)
    return rendered(entries, sizes), len(entries), licenses_text(roots)


def evenly_spaced(items: Sequence, count: int) -> list:
    """`count` items spread evenly over the sequence (all of it if it is shorter), keeping its order,
    so a capped "all" set draws from both sources in proportion: the middle item of each of `count`
    equal strides."""
    n = len(items)
    if count >= n:
        return list(items)
    return [items[(2 * i + 1) * n // (2 * count)] for i in range(count)]


# ---------------------------------------------------------------------------------------------- fetch

def fetch(pkg: Package, cache: Path) -> Path:
    """The extracted package folder in the cache, running `npm pack` the first time."""
    root = cache / pkg.folder
    if (root / "package.json").is_file():
        return root
    npm = shutil.which("npm")
    if npm is None:
        raise UserError(f"npm not found: install Node.js/npm to fetch {pkg.spec}, or put the extracted "
                        f"package in {root}")
    cache.mkdir(parents=True, exist_ok=True)
    print(f"fetching {pkg.spec} with npm pack into {cache}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
        try:
            subprocess.run([npm, "pack", pkg.spec, "--pack-destination", tmp, "--silent"],
                           check=True, capture_output=True, text=True, timeout=1800, cwd=tmp)
        except subprocess.CalledProcessError as exc:
            detail = (exc.stderr or exc.stdout or "").strip().splitlines()
            reason = detail[-1] if detail else f"exit status {exc.returncode}"
            raise UserError(f"npm pack {pkg.spec} failed: {reason}") from None
        except subprocess.TimeoutExpired:
            raise UserError(f"npm pack {pkg.spec} timed out after 30 minutes") from None
        tarballs = sorted(Path(tmp).glob("*.tgz"))
        if not tarballs:
            raise UserError(f"npm pack {pkg.spec} wrote no tarball into {tmp}")
        staging = Path(tmp) / "package"
        extract(tarballs[0], staging, pkg.keep)
        # The rename makes the folder appear complete or not at all, so a killed fetch is redone.
        staging.rename(root)
    return root


def extract(tarball: Path, dest: Path, keep: tuple[str, ...]) -> None:
    """Extract the members under `package/` that `keep` names (npm tarballs put everything there)."""
    def wanted(name: str) -> bool:
        rel = name.partition("/")[2]
        return any(rel == k or (k.endswith("/") and rel.startswith(k)) for k in keep)

    dest.mkdir(parents=True)
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            if not member.isfile() or not wanted(member.name):
                continue
            rel = Path(member.name.partition("/")[2])
            if rel.is_absolute() or ".." in rel.parts:
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)


# -------------------------------------------------------------------------------------------- listing

def _codepoints(unified: str) -> str:
    """Canonical lower-case code-point string without FE0F, for matching names across packages."""
    return "-".join(p for p in unified.lower().split("-") if p and p != "fe0f")


def _display_name(entry: dict[str, Any]) -> str:
    name = entry.get("name") or (entry.get("short_name") or "").replace("_", " ")
    # emoji.json spells Unicode names in capitals ("GRINNING FACE") but flags as "Japan Flag".
    return name.lower() if name.isupper() else name


def _article(name: str) -> str:
    if name[:1].isupper() or name[:1].isdigit() or name.startswith(("flag", "keycap")):
        return name
    return ("an " if name[:1] in "aeiou" else "a ") + name


def _phrase(key: str, phrasings: Sequence[str], **fields: str) -> str:
    """One of several caption phrasings, chosen by a hash of the key so it never depends on order."""
    usable = [p for p in phrasings if fields.get("tags") or "{tags}" not in p]
    pick = int.from_bytes(hashlib.sha1(key.encode()).digest()[:4], "big") % len(usable)
    return usable[pick].format(**fields)


def fluent_names(datasource: Path) -> dict[str, tuple[str, str]]:
    """Code points (FE0F dropped) -> (name, category) for every emoji and skin-tone variant."""
    path = datasource / "emoji.json"
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    names: dict[str, tuple[str, str]] = {}
    for entry in table:
        name, category = _display_name(entry), entry.get("category") or ""
        for unified in (entry.get("unified"), entry.get("non_qualified")):
            if unified:
                names.setdefault(_codepoints(unified), (name, category))
        for tones, variant in (entry.get("skin_variations") or {}).items():
            tone_name = ", ".join(SKIN_TONES.get(t.lower(), t) for t in tones.split("-"))
            for unified in (variant.get("unified"), variant.get("non_qualified")):
                if unified:
                    names.setdefault(_codepoints(unified), (f"{name}: {tone_name}", category))
    return names


def fluent_entries(fluent: Path, datasource: Path) -> list[Entry]:
    names = fluent_names(datasource)
    entries = []
    for path in sorted((fluent / "assets").glob("*.webp")):
        codepoint = path.stem.lower()
        match = names.get(_codepoints(codepoint))
        if match is None:  # a handful of duplicate or oddly spelled file names have no entry
            continue
        name, category = match
        key = f"fluent-{codepoint}"
        entries.append(Entry(key, path, _phrase(key, FLUENT_PHRASINGS, name=name, a_name=_article(name)),
                             {"source": "fluent-emoji-3d", "licence": "MIT", "codepoint": codepoint,
                              "name": name, "category": category}))
    return entries


def openmoji_entries(openmoji: Path) -> list[Entry]:
    path = openmoji / "data" / "openmoji.json"
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    entries = []
    for entry in table:
        hexcode, name = entry.get("hexcode") or "", (entry.get("annotation") or "").strip()
        svg = openmoji / "color" / "svg" / f"{hexcode}.svg"
        if not hexcode or not name or not svg.is_file():
            continue
        tags = [t.strip() for field_ in ("tags", "openmoji_tags")
                for t in (entry.get(field_) or "").split(",") if t.strip()]
        tags = list(dict.fromkeys(tags))  # drop repeats, keep order
        key = f"openmoji-{hexcode}"
        txt = _phrase(key, OPENMOJI_PHRASINGS, name=name, a_name=_article(name), tags=", ".join(tags[:4]))
        entries.append(Entry(key, svg, txt, {
            "source": "openmoji", "licence": "CC-BY-SA-4.0", "codepoint": hexcode, "name": name,
            "category": entry.get("group") or "", "tags": tags,
            "author": entry.get("openmoji_author") or ""}))
    return entries


# ------------------------------------------------------------------------------------------ rendering

def on_white(image: Image.Image) -> Image.Image:
    """RGB image with any transparency composited over a white background."""
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def rendered(entries: list[Entry], sizes: tuple[int, ...]) -> Iterator[Sample]:
    """The samples in order; an image the renderer cannot draw is skipped with one line. (Rendering
    in worker processes was measured slower on 2 loaded cores: 11.7 s vs 9.5 s for 48 samples at
    64,256,1024, as each sample's images are pickled back to the writer.)"""
    for entry in entries:
        result = render_or_skip(entry, sizes)
        if isinstance(result, str):
            tqdm.write(result, file=sys.stderr)
        else:
            yield result


class SvgError(Exception):
    """cairosvg failed on a file of the package (not the user's doing, so not a UserError)."""


def render_or_skip(entry: Entry, sizes: tuple[int, ...]) -> Sample | str:
    """The sample, or a one-line message when cairosvg cannot draw the SVG (a few OpenMoji files
    reference markers they do not define)."""
    try:
        return render(entry, sizes)
    except SvgError as exc:
        return f"skipping {entry.key}: {exc}"


def render(entry: Entry, sizes: tuple[int, ...]) -> Sample:
    if entry.path.suffix == ".svg":
        images = {s: render_svg(entry.path, s) for s in sizes}
    else:
        try:
            with Image.open(entry.path) as im:
                base = on_white(im)
        except OSError as exc:
            raise UserError(f"unreadable image {entry.path}: {exc}") from None
        # Composite first, then resample: resizing RGBA directly would pull colour out of
        # fully transparent pixels into the edges.
        images = {s: base if base.size == (s, s) else base.resize((s, s), Image.LANCZOS) for s in sizes}
        # a larger size is an upscale, with no detail of its own: the SR stages skip it (`native_size`)
        return Sample(entry.key, images, entry.txt, {**entry.json, "native_size": min(base.size)})
    return Sample(entry.key, images, entry.txt, dict(entry.json))


def render_svg(path: Path, size: int) -> Image.Image:
    """Rasterise directly at `size` (sharper than resizing one large render)."""
    import cairosvg

    try:
        png = cairosvg.svg2png(url=str(path), output_width=size, output_height=size)
    except Exception as exc:  # cairosvg raises many unrelated types for a malformed file
        raise SvgError(f"cairosvg cannot render {path}: {type(exc).__name__}: {exc}") from None
    with Image.open(io.BytesIO(png)) as im:
        return on_white(im)


# ------------------------------------------------------------------------------------------- licences

def licenses_text(roots: dict[Package, Path]) -> str:
    """The LICENSES file: each package, its licence and author, then its own licence text."""
    about = {
        FLUENT: ("MIT", "Microsoft Corporation (Fluent Emoji), packaged by LobeHub",
                 "images of the fluent-emoji-3d samples"),
        DATASOURCE: ("MIT", "Cal Henderson (iamcal/emoji-data)",
                     "names and categories of the fluent samples"),
        OPENMOJI: ("CC-BY-SA-4.0", "OpenMoji contributors (HfG Schwäbisch Gmünd); each sample's json names "
                   "its author", "images and captions of the openmoji samples; derived images are shared "
                   "under the same licence"),
    }
    parts = ["Third-party material in this dataset\n"]
    for pkg, root in roots.items():
        licence, author, use = about[pkg]
        parts.append(f"\n== {pkg.spec} ==\nlicence: {licence}\nauthor: {author}\nused for: {use}\n"
                     f"https://www.npmjs.com/package/{pkg.name}\n")
        for name in ("LICENSE", "LICENSE.txt"):
            if (root / name).is_file():
                text = (root / name).read_text(encoding="utf-8", errors="replace")
                parts.append("\n" + text.strip() + "\n")
    return "".join(parts)
