"""BERT (`model_type` "bert"): post-LayerNorm layers `attention` -> `intermediate` -> `output`.

FFN: W1 = `layer.intermediate.dense` [I, d], act = `intermediate.intermediate_act_fn`, W2 =
`layer.output.dense` [d, I]; the layer output is `output.LayerNorm(W2 v + b2 + a)` with a the
attention block's output. MLM head: `cls.predictions` (transform, decoder tied to the word
embeddings, bias). RoBERTa, XLM-RoBERTa and ELECTRA share this layer layout and subclass
`BertAdapter`.

Fast path of the fused attribution, for the HF SDPA self-attention (q/k/v Linears, `scaling`,
`attention_head_size`, `config._attn_implementation == "sdpa"`): `attention_at` runs the queries,
the output projection and its LayerNorm only at the target positions. Any other attention
implementation runs the whole `layer.attention`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import BertForMaskedLM
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.bert.modeling_bert import BertLayer

from trelm_fast.losses import MLMHead
from trelm_fast.models.base import FamilyAdapter, FFNSite, Positions, Site, register


@register
class BertAdapter(FamilyAdapter):
    family = "bert"
    model_types = ("bert",)
    layer_classes = (BertLayer,)
    mlm_class = BertForMaskedLM

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        return self.base(model).encoder.layer

    def ffn_site(self, layer: nn.Module) -> FFNSite:
        return FFNSite(Site(layer.intermediate, "dense"), Site(layer.output, "dense"),
                       layer.intermediate.intermediate_act_fn)

    def layer_context(self, model: nn.Module, mask2d: Tensor, like: Tensor):
        """The layer attention mask HF builds for a [B, n] padding mask (None, 4D tensor or block mask)."""
        return create_bidirectional_mask(config=model.config, inputs_embeds=like, attention_mask=mask2d)

    def attention(self, layer: nn.Module, h: Tensor, ctx) -> Tensor:
        return layer.attention(h, ctx)[0]

    def layer_output(self, layer: nn.Module, f: Tensor, a: Tensor) -> Tensor:
        return layer.output.LayerNorm(f + a)

    def parameter_group(self, parts: list[str]) -> str | None:
        """BERT-style names: `cls.*` / `lm_head.*` (head; the decoder weight, the word-embedding
        matrix when tied, is embeddings: XLM-RoBERTa names the tied matrix `lm_head.decoder.weight`),
        `*.embeddings.*`, `*.pooler.*`, and in `encoder.layer.{i}`: LayerNorms, `attention.*`,
        `intermediate.*` + `output.dense.weight` (ffn), `output.dense.bias` (ffn_out_bias)."""
        if parts[0] == "cls" or parts[:2] in (["lm_head", "dense"], ["lm_head", "layer_norm"], ["lm_head", "decoder"],
                                               ["lm_head", "bias"]):
            return "embeddings" if parts[-2:] == ["decoder", "weight"] else "head"
        if "embeddings" in parts:
            return "embeddings"
        if "pooler" in parts:
            return "pooler"
        if "encoder" in parts and "layer" in parts:
            if "LayerNorm" in parts:
                return "layernorm"
            if "attention" in parts:
                return "attention"
            if "intermediate" in parts or parts[-3:] == ["output", "dense", "weight"]:
                return "ffn"
            if parts[-3:] == ["output", "dense", "bias"]:
                return "ffn_out_bias"
        return None

    def mlm_head(self, model: nn.Module) -> MLMHead:
        predictions = getattr(getattr(model, "cls", None), "predictions", None)
        if predictions is None:
            raise TypeError(f"trelm_fast.models.{self.family}: {type(model).__name__} has no MLM head "
                            f"(`cls.predictions`); use {self.mlm_class.__name__}")
        return MLMHead(predictions.transform, predictions.decoder, predictions.bias)

    # ------------------------------------------------------------------ SDPA fast path

    @staticmethod
    def _plain_sdpa(layer: nn.Module, mask) -> bool:
        """Whether the layer's self-attention is HF's q/k/v Linear + SDPA with a tensor mask (or none)."""
        sa = layer.attention.self
        return (getattr(sa.config, "_attn_implementation", None) == "sdpa"
                and all(isinstance(getattr(sa, name, None), nn.Linear) for name in ("query", "key", "value"))
                and (mask is None or isinstance(mask, Tensor)))

    def attention_at(self, layer: nn.Module, h: Tensor, ctx, at: Positions) -> Tensor:
        """The attention output at the positions `at` only, [N, d]: queries only there (padded to
        `at.per_row` per sequence) under SDPA; otherwise the self-attention runs in full and the
        output projection and LayerNorm (per position) only there."""
        attn, rows, cols = layer.attention, at.rows, at.cols
        if not self._plain_sdpa(layer, ctx):
            return attn.output(attn.self(h, attention_mask=ctx)[0][rows, cols], h[rows, cols])
        sa, mask = attn.self, ctx
        C, n, d = h.shape
        hd = sa.attention_head_size
        h_t = h[rows, cols]
        q_t = sa.query(h_t)
        q = q_t.new_zeros(C, at.per_row, d).index_put((rows, at.slot), q_t).view(C, at.per_row, -1, hd).transpose(1, 2)
        k = sa.key(h).view(C, n, -1, hd).transpose(1, 2)
        v = sa.value(h).view(C, n, -1, hd).transpose(1, 2)
        if mask is not None:
            qcols = torch.zeros(C, at.per_row, dtype=torch.long, device=rows.device).index_put((rows, at.slot), cols)
            full = mask.expand(C, mask.shape[1], n, n)
            mask = full[torch.arange(C, device=rows.device)[:, None], :, qcols].transpose(1, 2)  # [C, h, per_row, n]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=sa.scaling)
        return attn.output(out.transpose(1, 2).reshape(C, at.per_row, d)[rows, at.slot], h_t)
