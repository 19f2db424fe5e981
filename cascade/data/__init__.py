"""Datasets as webdataset shards: building them (`cascade data build`), reading them into batches
(`cascade.data.reader.make_loader`) and judging images of the built-in shapes set
(`cascade.data.shapes_scorer`).

Layout of a built set: `DIR/train/shard-000000.tar`, ..., `DIR/val/...` (split by a hash of each
sample's key); each sample holds `<size>.png` for every requested size, `txt` (caption) and `json`
(source, licence and, for shapes, the ground-truth attributes).
"""
