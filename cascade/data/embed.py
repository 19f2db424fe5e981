"""`cascade data embed`: store each sample's CLIP embeddings in its shard, once.

DALL·E 2's prior and decoder condition on CLIP's image embedding, text embedding and text token
states. Computing them once here means their training never runs the CLIP towers. Each shard is
rewritten with four more members per sample (the contract of `cascade.data.reader`):

  clip_image.npy (D,) float32 and clip_text.npy (D,) float32, both L2-normalised,
  clip_tokens.npy (L, Dt) float16, clip_mask.npy (L,) bool.

Shards are rewritten under a temporary name and renamed when complete. `DIR/embeddings.json` records
the CLIP's identity and the shards done, so an interrupted run resumes at the first shard not done,
and a run with another CLIP embeds everything again (replacing the old members).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from cascade.data.reader import EMBEDDING_FIELDS, image_to_tensor
from cascade.data.shards import SPLITS, npy_bytes, split_member
from cascade.errors import UserError

STATE_FILE = "embeddings.json"
OWN_FIELDS = tuple(f"{name}.npy" for name in EMBEDDING_FIELDS)


def _samples(tar: tarfile.TarFile) -> Iterator[tuple[str, list[tuple[tarfile.TarInfo, bytes]]]]:
    """(key, [(member, bytes)]) per sample, in shard order, leaving out earlier embedding members."""
    key, members = None, []
    for info in tar:
        if not info.isfile():
            continue
        member_key, field = split_member(info.name)
        if member_key != key and members:
            yield key, members
            members = []
        key = member_key
        if field not in OWN_FIELDS:
            members.append((info, tar.extractfile(info).read()))
    if members:
        yield key, members


def _image_field(fields: list[str], want: int) -> str:
    """The `<size>.png` closest to the tower's input size, preferring one at least that large."""
    sizes = sorted(int(f.split(".")[0]) for f in fields if f.endswith(".png") and f.split(".")[0].isdigit())
    if not sizes:
        raise UserError(f"no <size>.png member among {fields}")
    larger = [s for s in sizes if s >= want]
    return f"{larger[0] if larger else sizes[-1]}.png"


def _add_member(tar: tarfile.TarFile, template: tarfile.TarInfo, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), template.mtime, template.mode
    info.uid, info.gid, info.uname, info.gname = template.uid, template.gid, template.uname, template.gname
    tar.addfile(info, io.BytesIO(data))


@torch.no_grad()
def _embed_batch(encoder, batch: list[tuple[str, list[tuple[tarfile.TarInfo, bytes]]]]) -> list[dict[str, bytes]]:
    images, texts = [], []
    for key, members in batch:
        fields = {split_member(info.name)[1]: data for info, data in members}
        if "txt" not in fields:
            raise UserError(f"sample {key} has no txt member")
        with Image.open(io.BytesIO(fields[_image_field(list(fields), encoder.image_size)])) as image:
            images.append(image_to_tensor(image))
        texts.append(fields["txt"].decode("utf-8"))
    device = encoder.image_mean.device
    z_i = encoder.encode_image(torch.stack(images).to(device)).float().cpu().numpy()  # (B, D)
    z_t, tokens, mask = encoder.encode_text(texts)  # (B, D), (B, L, Dt), (B, L)
    z_t, tokens, mask = z_t.float().cpu().numpy(), tokens.cpu().numpy(), mask.cpu().numpy()
    return [{"clip_image.npy": npy_bytes(z_i[i]), "clip_text.npy": npy_bytes(z_t[i]),
             "clip_tokens.npy": npy_bytes(tokens[i].astype(np.float16)),
             "clip_mask.npy": npy_bytes(mask[i].astype(bool))} for i in range(len(batch))]


def embed_shard(encoder, shard: Path, batch_size: int, progress: tqdm | None = None) -> int:
    """Rewrite one shard with embedding members; returns its number of samples."""
    tmp = shard.with_name(f".{shard.name}.embedding")
    count = 0
    with tarfile.open(shard) as src, tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as dst:
        pending: list = []

        def flush() -> None:
            for (key, members), extra in zip(pending, _embed_batch(encoder, pending)):
                for info, data in members:
                    dst.addfile(info, io.BytesIO(data))
                for field, data in extra.items():
                    _add_member(dst, members[0][0], f"{key}.{field}", data)
            if progress is not None:
                progress.update(len(pending))
            pending.clear()

        for sample in _samples(src):
            pending.append(sample)
            count += 1
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
    os.replace(tmp, shard)
    return count


def _read_state(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}  # a state we cannot read is redone, never trusted


def _write_state(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    os.replace(tmp, path)


def embed_dataset(data_dir: str | Path, clip: str | Path, batch_size: int = 64,
                  device: str = "cpu") -> dict[str, int]:
    """Embed every shard of `data_dir` not yet embedded by this CLIP; returns counts of samples per outcome."""
    from cascade.encoders import load_encoder

    data_dir = Path(data_dir)
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    shards = sorted(p for split in SPLITS for p in (data_dir / split).glob("*.tar"))
    if not shards:
        raise UserError(f"no shards (*.tar) under {data_dir}/{{{','.join(SPLITS)}}}")
    encoder = load_encoder(clip, device=device)
    state_path = data_dir / STATE_FILE
    state = _read_state(state_path)
    identity = getattr(encoder, "identity", str(clip))
    if state.get("clip") != identity:
        state = {"clip": identity, "source": str(clip), "embed_dim": encoder.embed_dim,
                 "token_dim": encoder.token_dim, "max_text_len": encoder.max_text_len, "shards": {}}
    todo = [s for s in shards if str(s.relative_to(data_dir)) not in state["shards"]]
    done = sum(state["shards"].values())
    if not todo:
        return {"embedded": 0, "skipped": done}
    total = sum(_count_samples(s) for s in todo)
    embedded = 0
    with tqdm(total=total, unit="sample", desc="embed") as progress:
        for shard in todo:
            n = embed_shard(encoder, shard, batch_size, progress)
            state["shards"][str(shard.relative_to(data_dir))] = n
            _write_state(state_path, state)
            embedded += n
    return {"embedded": embedded, "skipped": done}


def _count_samples(shard: Path) -> int:
    with tarfile.open(shard) as tar:
        return len({split_member(info.name)[0] for info in tar if info.isfile()})


def add_parser(data_subparsers: argparse._SubParsersAction) -> None:
    parser = data_subparsers.add_parser(
        "embed", help="store CLIP image/text embeddings and token states in each shard (resumable)",
        description="Add each sample's CLIP image and text embeddings and text token states to its shard "
                    "(clip_image.npy, clip_text.npy, clip_tokens.npy, clip_mask.npy), which the prior and "
                    "decoder train on. Shards already embedded by the same CLIP are skipped, so an "
                    "interrupted run resumes.")
    parser.add_argument("--data", required=True, help="a dataset directory with train/ and val/ shards")
    parser.add_argument("--clip", required=True,
                        help="a CLIP stage folder (e.g. BUNDLE/clip) or an open_clip name[:pretrained]")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="samples per CLIP forward pass (default: %(default)s)")
    parser.add_argument("--device", default="auto", metavar="DEVICE",
                        help="auto, cpu, cuda or cuda:N (default: auto, the first GPU if there is one)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from cascade.devices import resolve_device

    counts = embed_dataset(args.data, args.clip, batch_size=args.batch_size, device=resolve_device(args.device))
    print(f"embedded {counts['embedded']} samples; {counts['skipped']} already embedded by this CLIP")
    return 0
