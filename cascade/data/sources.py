"""Which set a sample came from: the shard reader puts `source_of(sample json)` in every sample's
`source` column, which `cascade.batches.balanced_batch` and the per-source evaluations group by."""
from __future__ import annotations


def source_of(scene: dict) -> str:
    """"shapes" for a procedural scene, "emoji" for a Fluent / OpenMoji render, "other" otherwise."""
    source = scene.get("source", "") if isinstance(scene, dict) else ""
    return "shapes" if source == "shapes" else "emoji" if source in ("fluent-emoji-3d", "openmoji") else "other"
