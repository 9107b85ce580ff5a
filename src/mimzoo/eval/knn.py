"""Weighted kNN classification on frozen features (DINO/iBOT protocol: cosine similarity,
``k`` neighbours voting with weight ``exp(sim / T)``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def extract_features(model, loader, device) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised ``features(images)`` and labels over a whole loader."""
    feats, labels = [], []
    for images, y in loader:
        feats.append(F.normalize(model.features(images.to(device)).float(), dim=1).cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_predict(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores ``[Q, C]`` for L2-normalised ``queries`` against a normalised feature ``bank``."""
    k = min(k, bank.shape[0])
    scores = []
    for q in queries.split(chunk):
        sim, idx = (q @ bank.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, bank_labels[idx], weights)
        scores.append(votes)
    return torch.cat(scores)
