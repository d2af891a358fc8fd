"""LAMA-style cloze probing: P@1 per relation and macro-averaged over relations.

A probe fact is a JSON Lines record `{"relation", "template", "subject", "object"}` whose template
holds `[X]` and `[Y]` once each (read by `trelm_fast.data.formats.read_probes`). The query is the
template with `[X]` -> subject and `[Y]` -> the tokenizer's mask token; the prediction is the
argmax over the whole vocabulary of the MLM logits at the mask (a decoder's: of its LM logits at the
token before the mask, which reads the query up to [Y] only). Only facts whose object is a single token under the tokenizer are scored
(as in LAMA); the others are counted as skipped. P@1(relation) = correct / scored, and the macro
average is the unweighted mean over relations with at least one scored fact.

    python -m trelm_fast.probe --model DIR --probes FILE
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trelm_fast.data.formats import Probe, read_probes
from trelm_fast.losses import MLMHead

@dataclass
class ProbeResult:
    """P@1 per relation (`p_at_1`), scored facts per relation (`counts`), the macro average, and
    how many facts were skipped because their object is not a single token."""
    p_at_1: dict[str, float]
    counts: dict[str, int]
    macro_p_at_1: float
    skipped: int
    predictions: list[tuple[Probe, str]] = field(default_factory=list, repr=False)

    def format(self) -> str:
        width = max([len("relation")] + [len(r) for r in self.p_at_1])
        lines = [f"{'relation':<{width}}  {'facts':>6}  {'P@1':>6}"]
        for rel in sorted(self.p_at_1):
            lines.append(f"{rel:<{width}}  {self.counts[rel]:>6}  {self.p_at_1[rel]:>6.3f}")
        lines.append(f"{'macro':<{width}}  {sum(self.counts.values()):>6}  {self.macro_p_at_1:>6.3f}")
        if self.skipped:
            lines.append(f"({self.skipped} facts skipped: object is not a single token)")
        return "\n".join(lines)


def _object_token(tokenizer: Any, fact: Probe) -> int | None:
    """The object's token id as it appears at [Y] (a preceding space matters for BPE), or None."""
    before = fact.template[: fact.template.index("[Y]")]
    text = (" " if before[-1:].isspace() else "") + fact.object
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


@torch.no_grad()
def evaluate_probes(model: torch.nn.Module, tokenizer: Any, facts: list[Probe],
                    batch_size: int = 32, device: torch.device | str | None = None) -> ProbeResult:
    """P@1 of an LM of a supported family on `facts` (vocabulary logits at the mask only; a decoder's
    at the position before it).

    The model is put in eval mode for the evaluation and its previous mode restored.
    """
    if tokenizer.mask_token is None:
        raise ValueError("probes: the tokenizer has no mask token")
    if device is None:
        device = next(model.parameters()).device
    scored, skipped = [], 0
    for fact in facts:
        target = _object_token(tokenizer, fact)
        if target is None:
            skipped += 1
        else:
            scored.append((fact, target))

    from trelm_fast.models import adapter_for

    base, head = getattr(model, model.base_model_prefix), MLMHead.from_model(model)  # logits at the masks only
    shift = int(adapter_for(model, "probes").causal)  # a decoder's state before [Y] predicts it
    was_training = model.training
    model.eval()
    correct: dict[str, int] = defaultdict(int)
    counts: dict[str, int] = defaultdict(int)
    predictions = []
    try:
        for i in range(0, len(scored), batch_size):
            chunk = scored[i:i + batch_size]
            texts = [f.cloze(tokenizer.mask_token) for f, _ in chunk]
            enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True)
            input_ids = enc["input_ids"].to(device)
            is_mask = input_ids == tokenizer.mask_token_id
            if not bool((is_mask.sum(1) == 1).all()):
                bad = texts[int((is_mask.sum(1) != 1).nonzero()[0])]
                raise ValueError(f"probes: query {bad!r} does not hold exactly one mask token after tokenization")
            hidden = base(input_ids=input_ids, attention_mask=enc["attention_mask"].to(device)).last_hidden_state
            rows, cols = is_mask.nonzero(as_tuple=True)  # one mask per row, in row order
            predicted = head.logits(hidden[rows, cols - shift]).argmax(-1).tolist()
            for (fact, target), pred in zip(chunk, predicted):
                counts[fact.relation] += 1
                correct[fact.relation] += int(pred == target)
                predictions.append((fact, tokenizer.convert_ids_to_tokens(pred)))
    finally:
        model.train(was_training)

    return _result(correct, counts, skipped, predictions)


def _result(correct: dict[str, int], counts: dict[str, int], skipped: int,
            predictions: list[tuple[Probe, str]]) -> ProbeResult:
    """The ProbeResult of per-relation correct and scored counts."""
    p_at_1 = {rel: correct[rel] / n for rel, n in counts.items()}
    macro = sum(p_at_1.values()) / len(p_at_1) if p_at_1 else 0.0
    return ProbeResult(p_at_1=p_at_1, counts=dict(counts), macro_p_at_1=macro, skipped=skipped,
                       predictions=predictions)


def relation_prior(known: list[Probe], facts: list[Probe], tokenizer: Any) -> ProbeResult:
    """P@1 of the model that answers every query of a relation with the relation's most common
    object among the scored `known` facts (no text read; ties: the object seen first), scored on
    `facts` with `evaluate_probes`' rules (single-token objects only, macro over relations). A model
    whose P@1 is not above it has learned which answers are common, not the facts."""
    from collections import Counter

    seen: dict[str, Counter] = defaultdict(Counter)
    for fact in known:
        if _object_token(tokenizer, fact) is not None:
            seen[fact.relation][fact.object] += 1
    guess = {rel: objects.most_common(1)[0][0] for rel, objects in seen.items()}
    correct: dict[str, int] = defaultdict(int)
    counts: dict[str, int] = defaultdict(int)
    skipped, predictions = 0, []
    for fact in facts:
        if _object_token(tokenizer, fact) is None:
            skipped += 1
            continue
        counts[fact.relation] += 1
        correct[fact.relation] += int(guess.get(fact.relation) == fact.object)
        predictions.append((fact, guess.get(fact.relation, "")))
    return _result(correct, counts, skipped, predictions)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trelm_fast.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a transformers model directory (with tokenizer files)")
    parser.add_argument("--probes", required=True, help="probe facts, JSON Lines")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    from trelm_fast.models import adapter_for_type

    if not Path(args.model).is_dir():
        parser.error(f"--model: {args.model} is not a directory")
    try:
        facts = read_probes(args.probes)
    except (OSError, ValueError) as err:
        parser.error(f"--probes: {err}")
    if not facts:
        parser.error(f"--probes: {args.probes} holds no facts")
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    causal = adapter_for_type(AutoConfig.from_pretrained(args.model, local_files_only=True).model_type,
                              f"--model {args.model}").causal
    auto = AutoModelForCausalLM if causal else AutoModelForMaskedLM
    model = auto.from_pretrained(args.model, local_files_only=True).to(args.device)
    result = evaluate_probes(model, tokenizer, facts, batch_size=args.batch_size, device=args.device)
    print(result.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
