"""The TRELM model: a Hugging Face masked LM (or decoder) plus knowledge injection and memory-bank mixing.

Shapes: B sequences of n tokens, hidden size d, KG embedding size k, T target spans, P target
positions (the tokens of all target spans), N_ent entities, N_rel relations.

- `build_mlm(model_cfg)`: the LM of the directory's family (`BertForMaskedLM`, `RobertaForMaskedLM`,
  ..., the decoders' `GPT2LMHeadModel` and `LlamaForCausalLM`: every family with an adapter in
  `trelm_fast.models`) from a local directory (pre-trained weights; a missing MLM head is created
  and tied to the word embeddings) or randomly initialised from that directory's config.json with
  size overrides.
- `TrelmModel` wraps the LM. At the positions of each target span (row, start, end, e) with KG
  triple (h, r, e), the word embedding is replaced by (paper eqs. 2 and 7)

      h_e = W_inj (E[h] + R[r]) + b_inj            (frozen TransE E [N_ent, k], R [N_rel, k])
      I_p = (1 - lambda) h_e + lambda / 2 (M_local[e] + M_global[e])   (when the bank is on)

  and position/token-type embeddings and LayerNorm follow as in the stock model. In the
  no-injection ablation (bank on), h_e is the [MASK] word embedding, so the span must still be
  decoded from context; with neither injection nor bank the input is the stock one. After the forward, `update_bank` folds the final hidden states of every linked
  mention into the bank (no gradient).
- Decoders (`TrelmModel.causal`): the same injection at the span, whose tokens are then predicted
  from the state one position earlier, and the bank's global memory reads the last real token
  (`context_positions`); docs/models.md "Decoders in the trainer".
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trelm_fast.config import Config, ModelConfig, resolve_model_path
from trelm_fast.losses import MLMHead, negative_distribution
from trelm_fast.models import adapter_for


@contextlib.contextmanager
def _quiet_transformers():
    """Silence the load report and progress bar transformers prints for the expected missing head."""
    from transformers.utils import logging

    level, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bar:
            logging.enable_progress_bar()


def build_mlm(mcfg: ModelConfig) -> nn.Module:
    """The LM of the directory's model family (`FamilyAdapter.mlm_class`), its output embedding tied
    to the word embeddings, except in a pre-trained decoder whose checkpoint has its own (`lm_head`
    untied, as many Llama checkpoints: replacing it would discard trained weights).

    ``init``: pretrained (weights of ``path``), random (its config.json with the size overrides)
    or auto (random if any size is overridden, else pretrained).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig

    from trelm_fast.models import adapter_for_type

    path = resolve_model_path(mcfg.path)
    hf_cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    adapter = adapter_for_type(hf_cfg.model_type, f"model.path {path}")
    cls = adapter.mlm_class
    if mcfg.dropout is not None:
        adapter.set_dropout(hf_cfg, mcfg.dropout)
    overridden = [f for f in adapter.size_attrs if getattr(mcfg, f) is not None]
    init = mcfg.init if mcfg.init != "auto" else ("random" if overridden else "pretrained")
    if not (adapter.causal and init == "pretrained"):
        hf_cfg.tie_word_embeddings = True
    if init == "pretrained":
        if overridden:
            raise ValueError(f"model.init=pretrained loads the sizes of {path}; set model.{overridden[0]} "
                             "to null or use model.init=random")
        with _quiet_transformers():
            model = cls.from_pretrained(str(path), config=hf_cfg, local_files_only=True)
    else:
        adapter.set_sizes(hf_cfg, {field: getattr(mcfg, field) for field in overridden})
        if hf_cfg.hidden_size % hf_cfg.num_attention_heads:
            raise ValueError(f"model.hidden_size {hf_cfg.hidden_size} is not a multiple of "
                             f"model.num_heads {hf_cfg.num_attention_heads}")
        model = cls(hf_cfg)
    head = MLMHead.from_model(model)
    if hf_cfg.tie_word_embeddings and head.weight is not model.get_input_embeddings().weight:
        raise RuntimeError(f"{path}: the MLM decoder is not tied to the word embeddings")
    return model


def read_dataset_arrays(dataset_dir) -> dict:
    """What the model reads from a built dataset: KG embeddings and entity names/frequencies.

    Returns {"entity" [N_ent, k], "relation" [N_rel, k] float32, "name_tokens" [total] and
    "name_offsets" [N_ent + 1] int64, "entity_freq" [N_ent] int64 or None}.
    """
    from trelm_fast.data.formats import read_kg_embeddings
    from trelm_fast.data.loader import load_entity_tokens

    d = Path(dataset_dir)
    for name in ("kg_embeddings.safetensors", "entity_tokens.npy", "entity_token_offsets.npy"):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d / name} does not exist (is {d} a built dataset?)")
    entity, relation = read_kg_embeddings(d / "kg_embeddings.safetensors")
    if entity.dim() != 2 or relation.dim() != 2 or entity.shape[1] != relation.shape[1]:
        raise ValueError(f"{d / 'kg_embeddings.safetensors'}: entity {tuple(entity.shape)} and relation "
                         f"{tuple(relation.shape)} must be 2-d with the same width")
    tokens, offsets = load_entity_tokens(d)
    if offsets.shape[0] - 1 != entity.shape[0]:
        raise ValueError(f"{d}: entity_token_offsets.npy describes {offsets.shape[0] - 1} entities, "
                         f"kg_embeddings.safetensors {entity.shape[0]}")
    freq = np.load(d / "entity_freq.npy") if (d / "entity_freq.npy").is_file() else None
    return {"entity": entity.float(), "relation": relation.float(),
            "name_tokens": torch.from_numpy(tokens.astype(np.int64)),
            "name_offsets": torch.from_numpy(offsets.astype(np.int64)),
            "entity_freq": None if freq is None else torch.from_numpy(freq.astype(np.int64))}


def cka_negative_distribution(arrays: dict, vocab_size: int, kind: str = "entity_tokens") -> Tensor:
    """Q(y) of eq. 2 over the vocabulary [V].

    ``entity_tokens``: tokens of entity names, each name counted once per corpus mention (entity
    frequency; once per entity when the dataset has no frequencies). ``uniform``: every token.
    """
    if kind == "uniform":
        return torch.full((vocab_size,), 1.0 / vocab_size)
    if kind != "entity_tokens":
        raise ValueError(f"loss.negatives must be entity_tokens or uniform, got {kind!r}")
    offsets = arrays["name_offsets"]
    lengths = offsets[1:] - offsets[:-1]
    freq = arrays["entity_freq"]
    weight = torch.ones_like(lengths) if freq is None else freq.clamp(min=0)
    if int(weight.sum()) == 0:
        weight = torch.ones_like(lengths)
    owner = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    return negative_distribution(torch.repeat_interleave(arrays["name_tokens"], weight[owner]), vocab_size)


def span_positions(spans: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Expand spans [S, 4] (row, start, end, id) into their token positions.

    Returns (span index [P], row [P], column [P]) for P = sum(end - start), in span order.
    """
    if spans.dim() != 2 or spans.shape[1] != 4:
        raise ValueError(f"spans must be [S, 4] (row, start, end, entity_id), got {tuple(spans.shape)}")
    lengths = spans[:, 2] - spans[:, 1]
    if bool((lengths <= 0).any()):
        raise ValueError("spans must have end > start")
    idx = torch.repeat_interleave(torch.arange(spans.shape[0], device=spans.device), lengths)
    first = torch.cumsum(lengths, 0) - lengths
    cols = spans[idx, 1] + torch.arange(idx.numel(), device=spans.device) - first[idx]
    return idx, spans[idx, 0], cols


class TrelmModel(nn.Module):
    """A masked LM (or decoder) with knowledge injection and memory-bank mixing at target spans.

    ``mlm``: an LM of a supported family (`trelm_fast.models`); ``kg_entity`` [N_ent, k] and ``kg_relation``
    [N_rel, k]: frozen TransE embeddings (buffers, not saved: they belong to the dataset);
    ``bank``: a KnowledgeMemoryBank or None (ablation); ``inject``: False for the no-injection
    ablation; ``mask_token_id``: the tokenizer's mask id (used without injection); ``negative_q``
    [V]: Q(y), the CKA negative-sampling distribution (default uniform).
    """

    def __init__(self, mlm: nn.Module, kg_entity: Tensor, kg_relation: Tensor, bank=None,
                 inject: bool = True, mask_token_id: Optional[int] = None,
                 negative_q: Optional[Tensor] = None):
        super().__init__()
        vocab = mlm.config.vocab_size
        if negative_q is None:
            negative_q = torch.full((vocab,), 1.0 / vocab)
        if negative_q.shape != (vocab,):
            raise ValueError(f"TrelmModel: negative_q must be [{vocab}], got {tuple(negative_q.shape)}")
        self.register_buffer("negative_q", negative_q.float(), persistent=False)
        self.mlm = mlm
        self.adapter = adapter_for(mlm, "TrelmModel")
        self.bank = bank
        self.inject = inject
        self.register_buffer("kg_entity", kg_entity.float(), persistent=False)
        self.register_buffer("kg_relation", kg_relation.float(), persistent=False)
        d = mlm.config.hidden_size
        self.injection = nn.Linear(kg_entity.shape[1], d)
        if not inject:
            self.injection.requires_grad_(False)
            if mask_token_id is None:
                raise ValueError("TrelmModel(inject=False) needs mask_token_id")
        self.mask_token_id = mask_token_id

    @property
    def causal(self) -> bool:
        """A decoder: the state at t - 1 predicts the token at t (docs/models.md)."""
        return self.adapter.causal

    @property
    def encoder_model(self) -> nn.Module:
        """The base model (`mlm.bert`, `mlm.roberta`, ..., a decoder's `mlm.transformer` / `mlm.model`)."""
        return getattr(self.mlm, self.mlm.base_model_prefix)

    @property
    def head(self) -> MLMHead:
        return self.adapter.mlm_head(self.mlm)

    def injection_embeddings(self, target_triples: Tensor) -> Tensor:
        """h_e = W_inj (E[h] + R[r]) + b_inj for (head, relation) pairs [T, 2] -> [T, d]."""
        return self.injection(self.kg_entity[target_triples[:, 0]] + self.kg_relation[target_triples[:, 1]])

    def input_embeddings(self, batch: dict, epoch: float = 0.0) -> Tensor:
        """Word embeddings [B, n, d] with eq. 7 applied at every target-span position (in a batch
        with static shapes, not at the padding positions, `trelm_fast.data.prepare.pad_static`)."""
        ids = batch["input_ids"]
        words = self.mlm.get_input_embeddings()
        emb = words(ids)
        spans = batch["target_spans"]
        if spans.numel() == 0 or (not self.inject and self.bank is None):
            return emb
        which, rows, cols = batch["target_positions"] if "target_positions" in batch else span_positions(spans)
        if self.inject:
            h = self.injection_embeddings(batch["target_triples"])[which]  # [P, d]
        else:
            h = words.weight[self.mask_token_id].expand(which.numel(), -1)
        if self.bank is not None:
            h = self.bank.read(spans[which, 3], h, epoch)
        if batch.get("static_shapes"):  # padding positions are row B: a scratch row, written then dropped
            b, n, d = emb.shape
            flat = F.pad(emb.reshape(b * n, d), (0, 0, 0, 1))
            return flat.index_put((batch["target_flat"],), h.to(emb.dtype))[: b * n].view(b, n, d)
        return emb.index_put((rows, cols), h.to(emb.dtype))

    def embedding_output(self, batch: dict, epoch: float = 0.0) -> Tensor:
        """Output of the embeddings layer [B, n, d] (what the first Transformer layer reads)."""
        return self.adapter.embedding_output(self.mlm, self.input_embeddings(batch, epoch), batch["attention_mask"])

    def forward(self, batch: dict, epoch: float = 0.0) -> Tensor:
        """Final-layer hidden states [B, n, d]."""
        out = self.encoder_model(inputs_embeds=self.input_embeddings(batch, epoch),
                                 attention_mask=batch["attention_mask"])
        return out.last_hidden_state

    def context_positions(self, lengths: Tensor) -> Optional[Tensor]:
        """[B] position of the state that sums up each sequence of ``lengths`` real tokens, for the
        bank's global memory (eq. 6): None, the [CLS] state at 0, for encoders; for decoders the last
        real token, the only state that has read the whole sequence."""
        return lengths - 1 if self.causal else None

    @torch.no_grad()
    def update_bank(self, final_hidden: Tensor, batch: dict) -> None:
        """Fold the final hidden states of every linked mention into the bank (eqs. 4-6)."""
        if self.bank is not None and batch["entity_spans"].numel():
            lengths = batch["attention_mask"].sum(1)
            self.bank.update(final_hidden.detach(), batch["entity_spans"], batch["attention_mask"],
                             context_at=self.context_positions(lengths))


def build_model(cfg: Config, dataset_dir, inject: bool = True, use_bank: bool = True,
                swap: bool = True, device="cpu") -> TrelmModel:
    """The TrelmModel for ``cfg`` over a built dataset, on ``device``.

    Reads the dataset's KG embeddings and entity names; the bank (when ``use_bank``) holds every
    entity, its local memory initialised to the mean word embedding of the entity's name tokens.
    ``swap``: replace every FFN with `TrelmFFN` (needed for knowledge paths).
    """
    from trelm_fast.data.base_model import load_tokenizer

    mlm = build_mlm(cfg.model)
    d, d_emb = mlm.config.hidden_size, mlm.get_input_embeddings().embedding_dim
    if d_emb != d and (inject or use_bank):
        raise ValueError(f"model.path {cfg.model.path}: its word embeddings are {d_emb} wide and its hidden states "
                         f"{d}; the knowledge injection and the memory bank put hidden-size vectors into the "
                         "word-embedding stream, so they need equal widths (ELECTRA: embedding_size == hidden_size)")
    if swap:
        from trelm_fast.ffn import swap_ffn

        swap_ffn(mlm)
    arrays = read_dataset_arrays(dataset_dir)
    n_ent = arrays["entity"].shape[0]
    bank = None
    if use_bank:
        from trelm_fast.memory_bank import KnowledgeMemoryBank

        init = KnowledgeMemoryBank.name_embeddings(mlm.get_input_embeddings().weight,
                                                   arrays["name_tokens"], arrays["name_offsets"])
        bank = KnowledgeMemoryBank(mlm.config.hidden_size, lambda0=cfg.kmb.lambda0, beta=cfg.kmb.beta,
                                   gamma=cfg.kmb.gamma, window=cfg.kmb.window, dtype=cfg.kmb.dtype,
                                   device=device, capacity=n_ent)
        bank.add_entities(torch.arange(n_ent, dtype=torch.long), init)
    q = cka_negative_distribution(arrays, mlm.config.vocab_size, cfg.loss.negatives)
    mask_id = load_tokenizer(str(resolve_model_path(cfg.model.path))).mask_token_id
    model = TrelmModel(mlm, arrays["entity"], arrays["relation"], bank=bank, inject=inject,
                       mask_token_id=mask_id, negative_q=q)
    return model.to(device)
