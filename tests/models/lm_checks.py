"""Checks shared by the model-family tests (GLA, Hyena)."""

from __future__ import annotations

import torch


def training_losses(model, batch: torch.LongTensor, steps: int = 5, lr: float = 3e-3) -> list[float]:
    """AdamW next-token training on ``batch`` for ``steps`` steps; asserts every gradient exists and is finite."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(batch, labels=batch, use_cache=False).loss
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def greedy_by_recomputation(model, prompt: torch.LongTensor, new_tokens: int) -> torch.LongTensor:
    """``prompt`` plus ``new_tokens`` greedy tokens, each from a fresh full forward (no cache)."""
    tokens = prompt
    for _ in range(new_tokens):
        step = model(tokens, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, step], dim=1)
    return tokens
