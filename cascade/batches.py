"""Even picks over the groups of a mixed split: a split whose shards sort one source first (emoji
renders before shapes scenes) would show or score only that source in "the first N samples".

Rows are grouped by the `source` column the shard reader adds to every sample (`cascade.data.sources`
names the sources); a batch without that column is one group.
"""
from __future__ import annotations

import itertools
from typing import Any, Iterable

import torch


def balanced(groups: dict[str, list], limit: int) -> list[tuple[str, Any]]:
    """Up to `limit` items taken round-robin over the groups (in name order), so each group gets an
    even share and a short group's share goes to the others."""
    picked: list[tuple[str, Any]] = []
    for i in itertools.count():
        row = [(name, items[i]) for name, items in sorted(groups.items()) if i < len(items)]
        if not row or len(picked) >= limit:
            break
        picked.extend(row[: limit - len(picked)])
    return picked


def balanced_batch(batches: Iterable[dict[str, Any]], limit: int, max_batches: int | None = 64
                   ) -> dict[str, Any] | None:
    """One collated batch of up to `limit` rows spread evenly over the sources in `batches` (read until
    every source seen has `limit` rows, or `max_batches` were read; None: no cap), or None when there
    are no rows. Rows are copied out, so the (possibly large) batches they came from are not kept."""
    kept: dict[str, list[dict[str, Any]]] = {}
    for n, batch in enumerate(batches, 1):
        size = next(len(v) for v in batch.values() if isinstance(v, (torch.Tensor, list)))
        sources = batch.get("source") or [""] * size
        for i in range(size):
            group = kept.setdefault(sources[i], [])
            if len(group) < limit:
                group.append({k: v[i].clone() if isinstance(v, torch.Tensor) else v[i]
                              for k, v in batch.items() if isinstance(v, (torch.Tensor, list))})
        if (max_batches is not None and n >= max_batches) or (
                len(kept) > 1 and all(len(g) >= limit for g in kept.values())):
            break
    rows = [row for _, row in balanced(kept, limit)]
    if not rows:
        return None
    return {k: torch.stack([r[k] for r in rows]) if isinstance(v, torch.Tensor) else [r[k] for r in rows]
            for k, v in rows[0].items()}
