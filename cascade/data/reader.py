"""Reading shards into training batches: a webdataset pipeline that is deterministic and resumable.

The stream for one consumer (a rank, or one DataLoader worker of a rank) is, per epoch:

  shard list (shuffled by (seed, epoch)) -> this consumer's shards -> tar members (only the fields
  asked for) -> [this consumer's samples, when there are fewer shards than consumers] -> shuffle
  buffer seeded by (seed, epoch, consumer) -> decode -> preprocess -> batch.

Every consumer sees a disjoint part of the data, so ranks never train on the same sample in an
epoch. Epochs follow each other inside the stream when `infinite`, so batches never stall at an
epoch end, and `skip_batches=n` drops exactly the samples the first n batches would have held
(before decoding, so resuming is cheap). Preprocessing draws from a generator seeded per sample by
(seed, epoch, key), which makes its randomness independent of order and of skipping.

A corrupt shard or sample is logged and counted in `loader.skipped` (shared with the workers)
instead of stopping training.

Finite, ordered iteration for evaluation: `make_val_batches(...)` (batches) or
`read_samples(...)` (a list of decoded samples).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import random
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from cascade.errors import UserError
from cascade.data.shards import split_member
from cascade.data.sources import source_of

log = logging.getLogger("cascade.data")

EMBEDDING_FIELDS = ("clip_image", "clip_text", "clip_tokens", "clip_mask")
Preprocess = Callable[[dict[str, Any], torch.Generator], dict[str, Any]]
Select = Callable[[dict[str, Any]], bool]  # a sample's json -> whether the stage reads it


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha1(repr(parts).encode()).digest()[:8], "big") >> 1


def find_shards(data_dir: str | Path, split: str) -> list[str]:
    directory = Path(data_dir) / split
    shards = sorted(str(p) for p in directory.glob("*.tar"))
    if not shards:
        raise UserError(f"no shards (*.tar) found in {directory}")
    return shards


def check_fields(data_dir: str | Path, split: str, stage: str, image_sizes: Sequence[int], embeddings: bool) -> None:
    """A one-line UserError unless the first sample of every `split` shard carries what `stage` trains on:
    a `<size>.png` for each of `image_sizes` (`cascade data build --sizes`) and, where `embeddings`, the
    CLIP embeddings (`cascade data embed`). Found before a run writes anything, rather than one "skipping"
    line per sample and then "no usable samples"."""
    import tarfile

    wanted = {f"{name}.npy" for name in EMBEDDING_FIELDS} if embeddings else set()
    for shard in find_shards(data_dir, split):
        first, fields = None, set()
        try:
            with tarfile.open(shard) as tar:
                for info in tar:
                    key, field = split_member(info.name)
                    if first is not None and key != first:
                        break
                    first = key
                    fields.add(field)
        except (OSError, tarfile.TarError):
            continue  # a broken shard is the reader's to skip and report
        if first is None:
            continue
        missing = [size for size in image_sizes if f"{size}.png" not in fields]
        if missing:
            held = sorted(int(f[:-4]) for f in fields if f.endswith(".png") and f[:-4].isdigit())
            raise UserError(f"{shard} holds images at {_sizes(held) or 'no size'} px, and the {stage} stage needs "
                            f"{_sizes(image_sizes)}: build a set with `cascade data build ... --sizes "
                            f"{','.join(str(s) for s in image_sizes)}`")
        if not wanted <= fields:
            raise UserError(f"{shard} holds no CLIP embeddings, and the {stage} stage needs them: run "
                            f"`cascade data embed --data {data_dir} --clip BUNDLE/clip` first")


def _sizes(sizes: Sequence[int]) -> str:
    return ", ".join(str(s) for s in sizes)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB -> (3, H, W) float in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def decode_sample(raw: dict[str, Any], image_sizes: Sequence[int], with_embeddings: bool) -> dict[str, Any]:
    """Raw tar members -> the sample contract of `cascade.stage`; raises on anything missing or broken."""
    sample: dict[str, Any] = {"key": raw["__key__"]}
    for size in image_sizes:
        field = f"{size}.png"
        if field not in raw:
            raise KeyError(f"no {field}")
        with Image.open(io.BytesIO(raw[field])) as image:
            image.load()
            if image.size != (size, size):
                raise ValueError(f"{field} is {image.size[0]}x{image.size[1]}")
            sample[f"image_{size}"] = image_to_tensor(image)
    sample["txt"] = raw["txt"].decode("utf-8")
    sample["json"] = json.loads(raw["json"]) if "json" in raw else {}
    sample["source"] = source_of(sample["json"])
    if with_embeddings:
        for name in EMBEDDING_FIELDS:
            field = f"{name}.npy"
            if field not in raw:
                raise KeyError(f"no {field} (run `cascade data embed` first)")
            array = np.load(io.BytesIO(raw[field]), allow_pickle=False)
            sample[name] = torch.from_numpy(array) if array.dtype == np.bool_ else torch.from_numpy(
                array.astype(np.float32))
    return sample


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, keep everything else (key, txt, json, source) as lists."""
    batch: dict[str, Any] = {}
    for name in samples[0]:
        values = [s[name] for s in samples]
        batch[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


class ShardLoader:
    """Iterable of batches over `data_dir/<split>/*.tar`; see the module docstring."""

    def __init__(self, shards: list[str], *, image_sizes: Sequence[int], with_embeddings: bool,
                 batch_size: int, preprocess: Preprocess | None, shuffle: bool, seed: int, epoch: int,
                 rank: int, world_size: int, num_workers: int, infinite: bool, skip_batches: int,
                 drop_last: bool, shuffle_buffer: int = 500, select: Select | None = None):
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world_size {world_size}")
        self.shards = shards
        self.image_sizes = tuple(int(s) for s in image_sizes)
        self.with_embeddings = with_embeddings
        self.batch_size = batch_size
        self.preprocess = preprocess
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.infinite = infinite
        self.skip_batches = skip_batches
        self.drop_last = drop_last
        self.shuffle_buffer = shuffle_buffer
        self.select = select
        wanted = {f"{s}.png" for s in self.image_sizes} | {"txt", "json"}
        if with_embeddings:
            wanted |= {f"{n}.npy" for n in EMBEDDING_FIELDS}
        self._wanted = frozenset(wanted)
        # A shared counter so that skips inside DataLoader workers are visible here.
        self._skipped = multiprocessing.get_context().Value("q", 0)

    @property
    def skipped(self) -> int:
        """How many corrupt samples or shards were skipped so far."""
        return int(self._skipped.value)

    def _count_skip(self, what: str) -> None:
        with self._skipped.get_lock():
            self._skipped.value += 1
        log.warning("skipping %s", what)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.num_workers == 0:
            yield from self.batches(0, 1)
            return
        loader = torch.utils.data.DataLoader(_WorkerStream(self), batch_size=None,
                                             num_workers=self.num_workers, persistent_workers=False)
        yield from loader

    # -- the per-consumer stream ------------------------------------------------------------------

    def _select(self, name: str) -> bool:
        return name.split(".", 1)[-1] in self._wanted if "." in name else False

    def _selected(self, raw: dict[str, Any]) -> bool:
        try:
            meta = json.loads(raw.get("json") or b"{}")
        except ValueError:
            return True  # a broken json fails in decode_sample, which counts and reports it
        return bool(self.select(meta if isinstance(meta, dict) else {}))

    def _on_error(self, exc: Exception) -> bool:
        self._count_skip(f"corrupt shard data ({type(exc).__name__}: {exc})")
        return True  # keep going with the next shard

    def _raw_epoch(self, epoch: int, consumer: int, consumers: int) -> Iterator[dict[str, Any]]:
        shards = list(self.shards)
        if self.shuffle:
            random.Random(_seed("shards", self.seed, epoch)).shuffle(shards)
        by_shard = len(shards) >= consumers
        mine = shards[consumer::consumers] if by_shard else shards
        stages: list[Any] = [wds.SimpleShardList(mine),
                             wds.tarfile_to_samples(handler=self._on_error, select_files=self._select)]
        if not by_shard:
            stages.append(_every_nth(consumer, consumers))
        if self.shuffle:
            stages.append(_buffer_shuffle(self.shuffle_buffer, _seed("samples", self.seed, epoch, consumer)))
        return iter(wds.DataPipeline(*stages))

    def _samples(self, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        consumers = self.world_size * workers
        consumer = self.rank * workers + worker
        # Batches are dealt to workers in turn, so this worker held every `workers`-th of the first n.
        mine = max(0, (self.skip_batches - worker + workers - 1) // workers)
        to_skip = mine * self.batch_size
        generator = torch.Generator()
        epoch = self.epoch
        while True:
            produced = resumed_past = passed_over = 0
            for raw in self._raw_epoch(epoch, consumer, consumers):
                if self.select is not None and not self._selected(raw):
                    passed_over += 1
                    continue  # before the resume count: skip_batches counts the samples this stage reads
                if to_skip:
                    to_skip -= 1
                    resumed_past += 1
                    continue
                try:
                    sample = decode_sample(raw, self.image_sizes, self.with_embeddings)
                except Exception as exc:  # noqa: BLE001 - any broken sample is skipped, not fatal
                    self._count_skip(f"sample {raw.get('__key__')} in {raw.get('__url__')} "
                                     f"({type(exc).__name__}: {exc})")
                    continue
                if self.preprocess is not None:
                    generator.manual_seed(_seed("preprocess", self.seed, epoch, sample["key"]))
                    sample = self.preprocess(sample, generator)
                produced += 1
                yield sample
            if not self.infinite:
                return
            # An epoch consumed entirely by `skip_batches` (a resume at an epoch boundary) is fine;
            # one with nothing in it, or nothing decodable, would loop forever.
            if produced == 0 and resumed_past == 0 and passed_over:
                raise UserError(f"none of the {passed_over} samples in {Path(self.shards[0]).parent} is one this "
                                "stage reads (an upsampler reads only images with real detail at its output "
                                "size, not ones upscaled from a smaller original, e.g. Fluent Emoji 3D's "
                                "256x256 files for sr1024)")
            if produced == 0 and resumed_past == 0:
                raise UserError(f"no usable samples in {Path(self.shards[0]).parent} for rank "
                                f"{self.rank}/{self.world_size}, worker {worker}/{workers}")
            epoch += 1

    def batches(self, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        pending: list[dict[str, Any]] = []
        for sample in self._samples(worker, workers):
            pending.append(sample)
            if len(pending) == self.batch_size:
                yield collate(pending)
                pending = []
        if pending and not self.drop_last:
            yield collate(pending)


class _WorkerStream(torch.utils.data.IterableDataset):
    def __init__(self, loader: ShardLoader):
        super().__init__()
        self.loader = loader

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self.loader.batches(worker, workers)


def _every_nth(offset: int, step: int) -> Callable[[Iterable], Iterator]:
    def stage(src: Iterable) -> Iterator:
        for i, item in enumerate(src):
            if i % step == offset:
                yield item
    return stage


def _buffer_shuffle(size: int, seed: int) -> Callable[[Iterable], Iterator]:
    """A shuffle buffer driven by its own seeded RNG (webdataset's draws from global state)."""
    def stage(src: Iterable) -> Iterator:
        rng = random.Random(seed)
        buffer: list = []
        for item in src:
            if len(buffer) < size:
                buffer.append(item)
                continue
            i = rng.randrange(size)
            buffer[i], item = item, buffer[i]
            yield item
        rng.shuffle(buffer)
        yield from buffer
    return stage


def make_loader(data_dir: str | Path, split: str = "train", *, image_sizes: Sequence[int] = (64,),
                with_embeddings: bool = False, batch_size: int = 16, preprocess: Preprocess | None = None,
                shuffle: bool = True, seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1,
                num_workers: int = 0, infinite: bool = True, skip_batches: int = 0,
                drop_last: bool = True, select: Select | None = None) -> ShardLoader:
    """Batches from `data_dir/<split>/*.tar` (see the module docstring for the guarantees). `select(json)`,
    when given, keeps only the samples whose json it accepts (a stage's `keeps`), before anything is
    decoded."""
    return ShardLoader(find_shards(data_dir, split), image_sizes=image_sizes,
                       with_embeddings=with_embeddings, batch_size=batch_size, preprocess=preprocess,
                       shuffle=shuffle, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                       num_workers=num_workers, infinite=infinite, skip_batches=skip_batches,
                       drop_last=drop_last, select=select)


def make_val_batches(data_dir: str | Path, *, image_sizes: Sequence[int] = (64,),
                     with_embeddings: bool = False, batch_size: int = 16,
                     preprocess: Preprocess | None = None, seed: int = 0, rank: int = 0,
                     world_size: int = 1, split: str = "val", select: Select | None = None) -> ShardLoader:
    """One ordered pass over a split, keeping the last short batch; the same batches every call."""
    return make_loader(data_dir, split, image_sizes=image_sizes, with_embeddings=with_embeddings,
                       batch_size=batch_size, preprocess=preprocess, shuffle=False, seed=seed,
                       rank=rank, world_size=world_size, infinite=False, drop_last=False, select=select)


def read_samples(data_dir: str | Path, split: str = "val", *, image_sizes: Sequence[int] = (64,),
                 with_embeddings: bool = False, limit: int | None = None) -> list[dict[str, Any]]:
    """Every sample of a split decoded into memory, in shard order (for evaluation)."""
    loader = make_loader(data_dir, split, image_sizes=image_sizes, with_embeddings=with_embeddings,
                         batch_size=1, shuffle=False, infinite=False, drop_last=False)
    samples = []
    for sample in loader._samples(0, 1):
        samples.append(sample)
        if limit is not None and len(samples) >= limit:
            break
    return samples
