"""A small TransE (Bordes et al., 2013) for the dataset's KG embeddings.

Score of a triple (h, r, t): d = ||E[h] + R[r] - E[t]||_p. Training minimizes the margin ranking
loss  max(0, margin + d(h, r, t) - d(h', r, t'))  where (h', r, t') replaces the head or the tail
(with probability 1/2 each) by a uniformly drawn entity. Entity rows are renormalized to unit L2
norm before each epoch, as in the original algorithm. Entities in no triple keep their random
unit-norm initialization. Deterministic given ``seed`` (CPU).

PyKEEN would do this too but is a heavy dependency for a few-thousand-triple KG.
"""
from __future__ import annotations

import torch
from tqdm import tqdm


def transe_distance(E: torch.Tensor, R: torch.Tensor, triples: torch.Tensor, p: int = 2) -> torch.Tensor:
    """triples int64 [T, 3] (h, r, t) -> distances [T]."""
    return (E[triples[:, 0]] + R[triples[:, 1]] - E[triples[:, 2]]).norm(p=p, dim=-1)


def train_transe(triples: torch.Tensor, n_entities: int, n_relations: int, dim: int = 64, epochs: int = 100,
                 batch_size: int = 1024, lr: float = 0.01, margin: float = 1.0, p: int = 2, seed: int = 0,
                 progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Train TransE on ``triples`` int64 [T, 3]; returns (entity [N_ent, dim], relation [N_rel, dim], stats).

    stats: ``{"final_loss", "epochs", "dim"}`` (mean margin loss over the last epoch). Runs on one
    thread (restored afterwards): the batches are too small for intra-op threads to pay off.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(triples, n_entities, n_relations, dim, epochs, batch_size, lr, margin, p, seed, progress)
    finally:
        torch.set_num_threads(threads)


def _train(triples, n_entities, n_relations, dim, epochs, batch_size, lr, margin, p, seed, progress):
    if triples.dim() != 2 or triples.shape[1] != 3:
        raise ValueError(f"triples must be [T, 3], got {tuple(triples.shape)}")
    g = torch.Generator().manual_seed(seed)
    bound = 6.0 / dim ** 0.5
    E = torch.nn.Parameter((torch.rand(n_entities, dim, generator=g) * 2 - 1) * bound)
    R = torch.nn.Parameter((torch.rand(n_relations, dim, generator=g) * 2 - 1) * bound)
    with torch.no_grad():
        R.div_(R.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    opt = torch.optim.Adam([E, R], lr=lr)
    loss_sum, T = torch.tensor(0.0), triples.shape[0]
    for _ in tqdm(range(epochs if T else 0), desc="TransE", unit="epoch", disable=not progress):
        with torch.no_grad():
            E.div_(E.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        perm = torch.randperm(T, generator=g)
        loss_sum = torch.tensor(0.0)
        for b in range(0, T, batch_size):
            pos = triples[perm[b:b + batch_size]]
            neg = pos.clone()
            corrupt_head = torch.rand(len(pos), generator=g) < 0.5
            rand_ent = torch.randint(n_entities, (len(pos),), generator=g)
            neg[:, 0] = torch.where(corrupt_head, rand_ent, pos[:, 0])
            neg[:, 2] = torch.where(corrupt_head, pos[:, 2], rand_ent)
            loss = torch.relu(margin + transe_distance(E, R, pos, p) - transe_distance(E, R, neg, p)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
    with torch.no_grad():
        E.div_(E.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    stats = {"final_loss": round(float(loss_sum) / max(T, 1), 4), "epochs": epochs, "dim": dim}
    return E.detach().clone(), R.detach().clone(), stats
