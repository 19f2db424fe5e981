"""Retrieval metrics for a CLIP, and the ridge-regression baseline it must beat.

Recall@K (as in CLIP, Radford et al. 2021, and LiT, Zhai et al. 2022): for every query i, is its own
pair (key i) among the K keys scored highest? Ties count in the pair's favour only if no other key
scores strictly higher.

Baseline: ridge regression (Hoerl & Kennard 1970) from frozen image features to frozen text embeddings,
W = (XᵀX + λI)⁻¹ XᵀY on standardised features with an unpenalised bias; λ is picked on a held-out fifth
of the train pairs, then W is refit on all of them. Retrieval then compares XW with the text embeddings
by cosine similarity, exactly as a CLIP compares its two embeddings.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

KS = (1, 5, 10)
LAMBDAS = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)


def recall_at_k(queries: torch.Tensor, keys: torch.Tensor, ks: Sequence[int] = KS) -> dict[int, float]:
    """Fraction of queries (N, D) whose key (row i of keys (N, D)) ranks within the top k by dot product."""
    scores = queries.double() @ keys.double().T  # (N, N)
    own = scores.diagonal().unsqueeze(1)  # (N, 1)
    rank = (scores > own).sum(dim=1)  # 0 when the pair scores highest
    return {k: (rank < k).double().mean().item() for k in ks}


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """Image->text and text->image recall@1/5/10 between paired rows, after L2 normalisation."""
    image_emb, text_emb = F.normalize(image_emb.double(), dim=-1), F.normalize(text_emb.double(), dim=-1)
    metrics = {}
    for direction, (q, k) in {"i2t": (image_emb, text_emb), "t2i": (text_emb, image_emb)}.items():
        for kk, value in recall_at_k(q, k).items():
            metrics[f"{prefix}{direction}_r{kk}"] = value
    return metrics


def fit_ridge(x: torch.Tensor, y: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, std, W (F+1, D)) so that predict(x) = [(x - mean) / std, 1] @ W minimises the ridge loss."""
    x, y = x.double(), y.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    z = torch.cat([(x - mean) / std, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)  # (N, F+1)
    penalty = torch.eye(z.shape[1], dtype=x.dtype) * lam
    penalty[-1, -1] = 0.0  # the bias is not shrunk
    w = torch.linalg.solve(z.T @ z + penalty, z.T @ y)
    return mean, std, w


def predict_ridge(model: tuple[torch.Tensor, torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    mean, std, w = model
    z = torch.cat([(x.double() - mean) / std, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    return z @ w


def ridge_baseline(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                   lambdas: Sequence[float] = LAMBDAS, prefix: str = "ridge_") -> dict[str, float]:
    """Recall of ridge(train_x -> train_y) on the val pairs; λ chosen by image->text R@1 on a train holdout."""
    n = len(train_x)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    held, fit = order[: max(1, n // 5)], order[max(1, n // 5):]

    def holdout_score(lam: float) -> float:
        model = fit_ridge(train_x[fit], train_y[fit], lam)
        return recall_at_k(F.normalize(predict_ridge(model, train_x[held]), dim=-1),
                           F.normalize(train_y[held].double(), dim=-1), ks=(1,))[1]

    best = max(lambdas, key=holdout_score)
    model = fit_ridge(train_x, train_y, best)
    metrics = retrieval_metrics(predict_ridge(model, val_x), val_y, prefix=prefix)
    metrics[f"{prefix}lambda"] = float(best)
    return metrics
