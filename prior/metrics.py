"""Scores for predicted image embeddings: cosine to the truth and retrieval rank among the val images.

Used by the prior's `evaluate` for its samples and for the two baselines DALL-E 2 compares against
(the text embedding itself, and the image embedding of the nearest train caption).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_cosine(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Mean over rows of cos(pred_i, true_i); pred, true (N, D)."""
    return F.cosine_similarity(pred.float(), true.float(), dim=-1).mean().item()


def retrieval_ranks(query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """Rank (1 = best) of gallery[i] among all gallery rows when retrieved by query[i] with cosine.

    query, gallery (N, D) -> (N,) long. Ties count in the query's favour: only strictly more similar
    gallery rows push the true one down.
    """
    sims = F.normalize(query.float(), dim=-1) @ F.normalize(gallery.float(), dim=-1).T  # (N, N)
    return 1 + (sims > sims.diagonal()[:, None]).sum(dim=1)


def nearest_caption_images(val_text: torch.Tensor, train_text: torch.Tensor, train_image: torch.Tensor,
                           chunk: int = 1024) -> torch.Tensor:
    """The image embedding of the train sample whose text embedding is closest to each val text.

    val_text (N, D), train_text (M, D), train_image (M, D) -> (N, D).
    """
    train_text = F.normalize(train_text.float(), dim=-1)
    picks = [(F.normalize(v.float(), dim=-1) @ train_text.T).argmax(dim=1) for v in val_text.split(chunk)]
    return train_image[torch.cat(picks)].float()


def embedding_scores(prefix: str, pred: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
    """{prefix}_cos, {prefix}_mean_rank and {prefix}_r1 of predictions `pred` for images `true`."""
    ranks = retrieval_ranks(pred, true).float()
    return {
        f"{prefix}_cos": mean_cosine(pred, true),
        f"{prefix}_mean_rank": ranks.mean().item(),
        f"{prefix}_r1": (ranks == 1).float().mean().item(),
    }
