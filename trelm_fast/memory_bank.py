"""`KnowledgeMemoryBank`: the knowledge-augmented memory bank of paper section 3.2 (eqs. 4-8).

Per entity (one row per entity, rows assigned by the C++ `EntityTable`):
- local memory  M_local [N, d]: initialized from the encoder's embedding of the entity's name
  tokens, then an EMA of window means of final-layer states around the entity's mentions:
  M_local <- (1 - gamma) * M_local + gamma * mean(h[max(l - k, 0) : min(r + k, len)])  (eqs. 4, 5)
  with the span [l, r) end-exclusive and len the number of real tokens of the sequence.
  gamma is the weight of the new observation (paper eq. 5).
- global memory M_global [N, d]: the running mean of the final-layer [CLS] state (decoders: the
  state of the last real token, `context_at`) over every context (sequence) that contained the
  entity, a context counting once however often it mentions the entity (eq. 6). Stored as the mean itself plus counts [N] (not as a sum), so that bf16/fp16
  storage stays accurate: a bf16 sum stops growing once it is large.
- read (eq. 7): (1 - lam) * h_e + lam / 2 * (M_local + M_global), lam = lambda0 / beta**epoch (eq. 8).
  An entity whose count is 0 has no global memory yet; M_global := M_local is used for it.

Duplicates in one update: spans are applied one at a time in span order (sequential EMA); under
DDP the spans of all ranks are applied in rank order. Every rank therefore holds the same bank.
Updates run under no_grad; `read` is differentiable w.r.t. h_e only.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from trelm_fast.distributed import is_distributed
from trelm_fast.entity_table import EntityTable
from trelm_fast.kernels.kmb_update import kmb_update, window_mean_ref

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _storage_dtype(dtype: torch.dtype | str) -> torch.dtype:
    dtype = _DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype not in _DTYPES.values():
        raise ValueError(f"KnowledgeMemoryBank: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return dtype


def check_spans(spans: torch.Tensor, lengths: torch.Tensor, where: str = "KnowledgeMemoryBank.update") -> None:
    """ValueError naming the first span of spans int64 [E, 4] (row, start, end, entity_id) that is
    not inside its sequence of ``lengths`` [B] real tokens (or has a negative id)."""
    if not isinstance(spans, torch.Tensor) or spans.dtype != torch.int64 or spans.dim() != 2 or spans.shape[1] != 4:
        shape = tuple(spans.shape) if isinstance(spans, torch.Tensor) else type(spans).__name__
        dtype = spans.dtype if isinstance(spans, torch.Tensor) else ""
        raise TypeError(f"{where}: spans must be an int64 tensor [E, 4] (row, start, end, entity_id), "
                        f"got {dtype} {shape}")
    row, start, end, ent = spans.unbind(1)
    bad_row = (row < 0) | (row >= lengths.numel())
    seq_len = lengths[row.clamp(0, max(lengths.numel() - 1, 0))]
    bad = bad_row | (start < 0) | (end <= start) | (end > seq_len) | (ent < 0)
    if bad.any():
        i = int(torch.nonzero(bad)[0])
        why = "row out of range" if bad_row[i] else ("negative entity id" if ent[i] < 0 else "span outside the sequence")
        raise ValueError(f"{where}: span {i} = {spans[i].tolist()} is invalid ({why}; batch size {lengths.numel()}, "
                         "need 0 <= start < end <= length)")


def right_padded_lengths(attention_mask: torch.Tensor, where: str = "KnowledgeMemoryBank.update") -> torch.Tensor:
    """Real tokens per row [B] of a right-padded attention mask [B, n] (1s then 0s), or a ValueError."""
    mask = attention_mask != 0
    lengths = mask.sum(1)
    if not torch.equal(mask, torch.arange(mask.shape[1], device=mask.device) < lengths[:, None]):
        raise ValueError(f"{where}: attention_mask must be right-padded (1s then 0s)")
    return lengths


def first_in_context_and_rank(entity_ids: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For E spans (entity id, batch row): (first [E] bool: the first span of its (entity, row) pair, in
    span order; rank [E]: how many earlier spans have the same entity). Uses torch.unique (a host
    sync on CUDA): the data loader computes both on the host (`trelm_fast.data.prepare`)."""
    e = entity_ids.numel()
    pos = torch.arange(e, device=entity_ids.device)
    if e == 0:
        return pos.bool(), pos
    _, pair = torch.unique(entity_ids * (int(rows.max()) + 1) + rows, return_inverse=True)
    first_pos = torch.full_like(pos, e).scatter_reduce(0, pair, pos, "amin")
    _, by_entity = torch.unique(entity_ids, return_inverse=True)
    sorted_groups, order = torch.sort(by_entity, stable=True)
    rank = torch.empty_like(pos).scatter_(0, order, pos - torch.searchsorted(sorted_groups, sorted_groups))
    return first_pos[pair] == pos, rank


def _check_ids(entity_ids: torch.Tensor, name: str) -> None:
    if not isinstance(entity_ids, torch.Tensor):
        raise TypeError(f"KnowledgeMemoryBank: {name} must be a torch tensor, got {type(entity_ids).__name__}")
    if entity_ids.dtype != torch.int64 or entity_ids.dim() != 1:
        raise TypeError(
            f"KnowledgeMemoryBank: {name} must be a 1-D int64 tensor, got {entity_ids.dtype} of shape "
            f"{tuple(entity_ids.shape)}"
        )


class KnowledgeMemoryBank:
    """Local and global memories of N entities in tensors on `device` (see the module docstring).

    Args: hidden_size d; lambda0, beta (eq. 8); gamma, the EMA weight of a new window mean (eq. 5);
    window k, the half window of eq. 4; dtype, the storage dtype of the memories (float32, bfloat16
    or float16; arithmetic is fp32); capacity, rows allocated up front (the bank grows by doubling);
    process_group, the DDP group whose updates are merged (default: the world, when initialized).
    """

    def __init__(
        self,
        hidden_size: int,
        lambda0: float = 0.5,
        beta: float = 2.0,
        gamma: float = 0.1,
        window: int = 16,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str = "cpu",
        capacity: int = 1024,
        process_group=None,
    ):
        if hidden_size < 1:
            raise ValueError(f"KnowledgeMemoryBank: hidden_size must be >= 1, got {hidden_size}")
        if not 0.0 <= lambda0 <= 1.0:
            raise ValueError(f"KnowledgeMemoryBank: lambda0 must be in [0, 1], got {lambda0}")
        if beta < 1.0:
            raise ValueError(f"KnowledgeMemoryBank: beta must be >= 1, got {beta}")
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"KnowledgeMemoryBank: gamma must be in (0, 1], got {gamma}")
        if window < 0:
            raise ValueError(f"KnowledgeMemoryBank: window must be >= 0, got {window}")
        self.hidden_size, self.lambda0, self.beta, self.gamma, self.window = hidden_size, lambda0, beta, gamma, window
        self.dtype = _storage_dtype(dtype)
        self.device = torch.device(device)
        self.process_group = process_group
        self.table = EntityTable(capacity)
        self._identity = True  # entity id i has row i for every id in the table (see `slots`)
        self._local = torch.zeros(max(capacity, 1), hidden_size, dtype=self.dtype, device=self.device)
        self._gmean = torch.zeros_like(self._local)
        self._counts = torch.zeros(max(capacity, 1), dtype=torch.int64, device=self.device)

    # ----------------------------------------------------------------------------------- storage
    def __len__(self) -> int:
        return len(self.table)

    @property
    def local(self) -> torch.Tensor:
        """M_local, [N, d] in the storage dtype (a view)."""
        return self._local[: len(self)]

    @property
    def global_mean(self) -> torch.Tensor:
        """Running mean of [CLS] states, [N, d] (a view); rows with count 0 are zero."""
        return self._gmean[: len(self)]

    @property
    def counts(self) -> torch.Tensor:
        """Number of contexts folded into the global memory, int64 [N] (a view)."""
        return self._counts[: len(self)]

    def _reserve(self, rows: int) -> None:
        have = self._local.shape[0]
        if rows <= have:
            return
        extra = max(rows, 2 * have) - have
        self._local = torch.cat([self._local, self._local.new_zeros(extra, self.hidden_size)])
        self._gmean = torch.cat([self._gmean, self._gmean.new_zeros(extra, self.hidden_size)])
        self._counts = torch.cat([self._counts, self._counts.new_zeros(extra)])

    # ------------------------------------------------------------------------------------ entities
    def contains(self, entity_ids: torch.Tensor) -> torch.Tensor:
        """bool [T] on the ids' device: whether each id has a row in the bank."""
        _check_ids(entity_ids, "entity_ids")
        return self.table.lookup(entity_ids) >= 0

    def slots(self, entity_ids: torch.Tensor) -> torch.Tensor:
        """Bank rows of `entity_ids` (int64 [T]) as int64 [T] on the bank's device; unknown ids raise.

        While every entity id equals its row (the bank `build_model` makes: ids 0..N-1 added in
        order) the ids are the rows: no table lookup and no host sync; an id outside [0, N) fails a
        device-side assertion (`torch._assert_async`: a RuntimeError, asynchronous on CUDA).
        """
        _check_ids(entity_ids, "entity_ids")
        if self._identity:
            if len(self) == 0 and entity_ids.numel():
                raise ValueError("KnowledgeMemoryBank: the bank is empty; add the entities with add_entities() first")
            ids = entity_ids.to(self.device, non_blocking=True)
            torch._assert_async((ids.clamp(0, len(self) - 1) == ids).all(),  # every id in [0, N)
                                "KnowledgeMemoryBank: an entity id is not in the bank")
            return ids
        slots = torch.from_numpy(self.table.lookup(entity_ids.cpu().numpy())).to(torch.int64)
        missing = torch.nonzero(slots < 0).squeeze(1)
        if missing.numel():
            bad = entity_ids.cpu()[missing[:5]].tolist()
            raise ValueError(
                f"KnowledgeMemoryBank: {missing.numel()} of {slots.numel()} entity ids are not in the bank "
                f"(first: {bad}); add them with add_entities() first"
            )
        return slots.to(self.device, non_blocking=True)

    def add_entities(self, entity_ids: torch.Tensor, init_local: torch.Tensor) -> torch.Tensor:
        """Add new entities with M_local = init_local [N, d] (global memory empty, count 0).

        Ids must be new and distinct; returns their rows (int64 [N], consecutive).
        """
        _check_ids(entity_ids, "entity_ids")
        if init_local.shape != (entity_ids.numel(), self.hidden_size) or not init_local.is_floating_point():
            raise ValueError(
                f"KnowledgeMemoryBank.add_entities: init_local must be a float tensor of shape "
                f"({entity_ids.numel()}, {self.hidden_size}), got {init_local.dtype} {tuple(init_local.shape)}"
            )
        ids = entity_ids.cpu().numpy()
        uniq, repeats = np.unique(ids, return_counts=True)
        if (repeats > 1).any():
            raise ValueError(f"KnowledgeMemoryBank.add_entities: duplicate entity id {int(uniq[repeats > 1][0])}")
        present = self.table.lookup(ids) >= 0
        if present.any():
            raise ValueError(
                f"KnowledgeMemoryBank.add_entities: entity id {int(ids[present][0])} is already in the bank "
                f"({int(present.sum())} of {len(ids)} ids are)"
            )
        start = len(self)
        self._identity = self._identity and bool((ids == np.arange(start, start + len(ids))).all())
        self._reserve(start + len(ids))
        slots = torch.from_numpy(self.table.insert(ids)).to(torch.int64)
        with torch.no_grad():
            self._local[start : start + len(ids)] = init_local.detach().to(self.device, self.dtype)
        return slots.to(self.device)

    @staticmethod
    def name_embeddings(embedding: torch.Tensor, token_ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Mean word embedding per entity name: [N, d] from embedding [V, d], ragged token ids.

        Entity i's tokens are token_ids[offsets[i]:offsets[i + 1]] (offsets int64 [N + 1], offsets[0] = 0,
        offsets[-1] = len(token_ids), every name non-empty).
        """
        _check_ids(token_ids, "token_ids")
        _check_ids(offsets, "offsets")
        if offsets.numel() == 0 or int(offsets[0]) != 0 or int(offsets[-1]) != token_ids.numel():
            raise ValueError(
                f"KnowledgeMemoryBank.name_embeddings: offsets must start at 0 and end at len(token_ids)="
                f"{token_ids.numel()}, got {offsets[:1].tolist()}...{offsets[-1:].tolist()}"
            )
        empty = torch.nonzero(offsets[1:] <= offsets[:-1]).squeeze(1)
        if empty.numel():
            raise ValueError(f"KnowledgeMemoryBank.name_embeddings: entity {int(empty[0])} has no tokens")
        if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= embedding.shape[0]):
            raise ValueError(
                f"KnowledgeMemoryBank.name_embeddings: token ids must be in [0, {embedding.shape[0]})"
            )
        dev = embedding.device
        with torch.no_grad():
            return F.embedding_bag(
                token_ids.to(dev), embedding.float(), offsets.to(dev), mode="mean", include_last_offset=True
            )

    # ------------------------------------------------------------------------------------- reading
    def lam(self, epoch: float | torch.Tensor) -> float | torch.Tensor:
        """Eq. 8: lambda0 / beta**epoch (epoch >= 0, fractional epochs allowed); a 0-dim tensor for a
        0-dim tensor ``epoch`` (read on the device: a CUDA graph's step, `trelm_fast.graphs`)."""
        if not isinstance(epoch, torch.Tensor) and epoch < 0:
            raise ValueError(f"KnowledgeMemoryBank.lam: epoch must be >= 0, got {epoch}")
        return self.lambda0 / self.beta**epoch

    def memory(self, entity_ids: torch.Tensor) -> torch.Tensor:
        """(M_local + M_global) / 2 for each id, fp32 [T, d]; M_global := M_local where count is 0."""
        slots = self.slots(entity_ids)
        local = self._local[slots].float()
        gmean = torch.where((self._counts[slots] > 0)[:, None], self._gmean[slots].float(), local)
        return torch.lerp(local, gmean, 0.5)

    def read(self, entity_ids: torch.Tensor, h_e: torch.Tensor, epoch: float | torch.Tensor) -> torch.Tensor:
        """Eq. 7: (1 - lam) h_e + lam/2 (M_local + M_global); [T, d] in h_e's dtype, grad flows to h_e only.

        entity_ids int64 [T] and h_e [T, d] pair up row by row (T spans or T token positions).
        """
        _check_ids(entity_ids, "entity_ids")
        if h_e.shape != (entity_ids.numel(), self.hidden_size):
            raise ValueError(
                f"KnowledgeMemoryBank.read: h_e must have shape ({entity_ids.numel()}, {self.hidden_size}), "
                f"got {tuple(h_e.shape)}"
            )
        lam = self.lam(epoch)
        mem = self.memory(entity_ids).to(h_e.device, h_e.dtype)
        return torch.lerp(h_e, mem, lam.to(h_e.dtype) if isinstance(lam, torch.Tensor) else lam)

    # ------------------------------------------------------------------------------------ updating
    def _lengths(self, final_hidden, attention_mask, lengths) -> torch.Tensor:
        b, n, _ = final_hidden.shape
        if attention_mask is not None and lengths is not None:
            raise ValueError("KnowledgeMemoryBank.update: pass attention_mask or lengths, not both")
        if attention_mask is not None:
            if attention_mask.shape != (b, n):
                raise ValueError(
                    f"KnowledgeMemoryBank.update: attention_mask must have shape ({b}, {n}), got "
                    f"{tuple(attention_mask.shape)}"
                )
            lengths = right_padded_lengths(attention_mask)
        elif lengths is None:
            return torch.full((b,), n, dtype=torch.int64)
        if lengths.shape != (b,) or lengths.is_floating_point():
            raise ValueError(f"KnowledgeMemoryBank.update: lengths must be an integer tensor of shape ({b},)")
        return lengths.to("cpu", torch.int64)

    @torch.no_grad()
    def update(
        self,
        final_hidden: torch.Tensor,
        spans: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        context_at: torch.Tensor | None = None,
    ) -> None:
        """Fold one batch into the bank (eqs. 4-6), after the forward pass.

        final_hidden [B, n, d] final-layer states ([CLS] at position 0); spans int64 [E, 4] rows of
        (row, start, end_exclusive, entity_id); attention_mask [B, n] (right-padded) or lengths [B]
        gives each sequence's real tokens (default: all n); context_at [B]: the position of each
        sequence's context state for the global memory (default 0, the [CLS] state; a decoder's is
        its last real token). Every entity must be in the bank.
        Validates everything (host syncs on CUDA); the training step calls `apply` with what the
        data loader validated and computed on the host.
        """
        if final_hidden.dim() != 3 or final_hidden.shape[-1] != self.hidden_size or not final_hidden.is_floating_point():
            raise ValueError(
                f"KnowledgeMemoryBank.update: final_hidden must be a float [B, n, {self.hidden_size}] tensor, "
                f"got {final_hidden.dtype} {tuple(final_hidden.shape)}"
            )
        lengths = self._lengths(final_hidden, attention_mask, lengths)
        check_spans(spans, lengths.to(spans.device))
        at = None if context_at is None else context_at.cpu()
        if at is not None and (at.shape != lengths.shape or bool(((at < 0) | (at >= lengths)).any())):
            raise ValueError(f"KnowledgeMemoryBank.update: context_at must hold one position per sequence, "
                             f"inside its real tokens; got {context_at.tolist()} for lengths {lengths.tolist()}")
        if not self._identity:
            self.slots(spans[:, 3])  # unknown ids raise before anything changes
        first, rank = first_in_context_and_rank(spans[:, 3].cpu(), spans[:, 0].cpu())
        self.apply(final_hidden, spans, lengths, first, int(rank.max()) + 1 if rank.numel() else 0,
                   context_at=context_at)

    @torch.no_grad()
    def apply(self, final_hidden: torch.Tensor, spans: torch.Tensor, lengths: torch.Tensor, first: torch.Tensor,
              rounds: int, skip: torch.Tensor | None = None, context_at: torch.Tensor | None = None,
              padded: bool = False) -> None:
        """`update` without its checks, and without a host sync on a bank whose ids are its rows.

        spans [E, 4] valid for ``lengths`` [B], or with ``padded`` also empty ones (start == end: the
        padding of `trelm_fast.data.prepare.pad_static`, after every real span, with ``first`` False),
        which change nothing;
        first [E] bool and rounds (1 + the largest rank of the real spans) from
        `first_in_context_and_rank`; skip: a bool scalar tensor, true to leave the bank unchanged;
        context_at [B]: as in `update` (None: position 0).
        """
        distributed = self._world_size() > 1
        if spans.shape[0] == 0 and not distributed:  # under DDP every rank joins the gather
            return
        hidden = final_hidden.detach().to(self.device).contiguous()
        spans, first = spans.to(self.device), first.to(self.device)
        row, start, end, ent = spans.unbind(1)
        lo = (start - self.window).clamp(min=0)
        hi = torch.minimum(end + self.window, lengths.to(self.device)[row])
        if padded:  # an empty span (padding) gets an empty window: it folds in nothing
            hi = torch.where(end > start, hi, lo)
        context = hidden[:, 0] if context_at is None else \
            hidden[torch.arange(hidden.shape[0], device=self.device), context_at.to(self.device)]
        if distributed:
            self._update_distributed(hidden, context, row, lo, hi, ent, first, skip)
            return
        cls_index = torch.where(first, row, -1)
        kmb_update(hidden, row, lo, hi, self.slots(ent), context, cls_index, self._local, self._gmean,
                   self._counts, self.gamma, rounds, skip)

    def _world_size(self) -> int:
        return dist.get_world_size(self.process_group) if is_distributed(self.process_group) else 1

    def _update_distributed(self, hidden, context, row, lo, hi, ent, first, skip) -> None:
        """Gather (entity id, first-in-context, window mean, context state [CLS]) of all ranks, apply in
        rank order."""
        means = window_mean_ref(hidden, row, lo, hi)
        ints = torch.stack([ent, first.long(), (hi > lo).long()], 1)
        floats = torch.cat([means, context[row].float()], 1)
        ints, floats = self._all_gather_rows(ints), self._all_gather_rows(floats)
        slots = self.slots(ints[:, 0])
        d = self.hidden_size
        cls_index = torch.where(ints[:, 1] > 0, torch.arange(slots.numel(), device=slots.device), -1)
        means, cls = floats[:, :d], floats[:, d:]
        zero = torch.zeros_like(slots)  # each gathered mean is a window of length 1 (0 for padding)
        kmb_update(means[:, None], torch.arange(slots.numel(), device=slots.device), zero, ints[:, 2], slots, cls,
                   cls_index, self._local, self._gmean, self._counts, self.gamma, skip=skip)

    def _all_gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate x [E_r, ...] of all ranks in rank order (padded to the largest E_r for the collective)."""
        world = self._world_size()
        count = torch.tensor([x.shape[0]], device=x.device)
        counts = [torch.zeros_like(count) for _ in range(world)]
        dist.all_gather(counts, count, group=self.process_group)
        most = int(max(c.item() for c in counts))
        padded = torch.cat([x, x.new_zeros(most - x.shape[0], *x.shape[1:])])
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=self.process_group)
        return torch.cat([p[: int(c.item())] for p, c in zip(parts, counts)])

    # ---------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        """Tensors of the bank (CPU copies) and its table; `load_state_dict` restores it exactly."""
        table = self.table.state_dict()
        return {
            "hidden_size": self.hidden_size,
            "entity_ids": table["ids"],
            "entity_counts": table["counts"],
            "local": self.local.cpu().clone(),
            "global_mean": self.global_mean.cpu().clone(),
            "counts": self.counts.cpu().clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Replace the bank with `state` (from `state_dict`); memories are cast to this bank's dtype."""
        missing = {"hidden_size", "entity_ids", "entity_counts", "local", "global_mean", "counts"} - set(state)
        if missing:
            raise KeyError(f"KnowledgeMemoryBank.load_state_dict: state lacks {sorted(missing)}")
        if state["hidden_size"] != self.hidden_size:
            raise ValueError(
                f"KnowledgeMemoryBank.load_state_dict: the state has hidden size {state['hidden_size']}, "
                f"this bank {self.hidden_size}"
            )
        n = state["entity_ids"].numel()
        for key, shape in (("local", (n, self.hidden_size)), ("global_mean", (n, self.hidden_size)), ("counts", (n,))):
            if tuple(state[key].shape) != shape:
                raise ValueError(
                    f"KnowledgeMemoryBank.load_state_dict: state[{key!r}] has shape {tuple(state[key].shape)}, "
                    f"expected {shape}"
                )
        table = EntityTable()
        table.load_state_dict({"ids": state["entity_ids"], "counts": state["entity_counts"]})
        self.table = table
        self._identity = torch.equal(state["entity_ids"].cpu(), torch.arange(n))
        rows = max(n, 1)
        self._local = torch.zeros(rows, self.hidden_size, dtype=self.dtype, device=self.device)
        self._gmean = torch.zeros_like(self._local)
        self._counts = torch.zeros(rows, dtype=torch.int64, device=self.device)
        self._local[:n] = state["local"].to(self.device, self.dtype)
        self._gmean[:n] = state["global_mean"].to(self.device, self.dtype)
        self._counts[:n] = state["counts"].to(self.device, torch.int64)
