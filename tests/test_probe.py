"""LAMA-style probing: file validation, batched P@1 against a direct per-fact computation, the CLI."""
import json

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertTokenizer

from trelm_fast.data.formats import Probe
from trelm_fast.probe import evaluate_probes, main, relation_prior

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "capital", "of", "is", "in", "city",
         "located", "france", "paris", "rome", "italy", "spain", "madrid", "new", "york", "usa", "."]
FACTS = [
    {"relation": "capital", "template": "the capital of [X] is [Y] .", "subject": "france", "object": "paris"},
    {"relation": "capital", "template": "the capital of [X] is [Y] .", "subject": "italy", "object": "rome"},
    {"relation": "capital", "template": "the capital of [X] is [Y] .", "subject": "spain", "object": "madrid"},
    {"relation": "located", "template": "[X] is located in [Y] .", "subject": "paris", "object": "france"},
    {"relation": "located", "template": "the city [X] is located in [Y]", "subject": "new york", "object": "usa"},
    {"relation": "located", "template": "[X] is in [Y] .", "subject": "madrid", "object": "new york"},  # 2 tokens
]


def tiny_tokenizer():
    return BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})


def tiny_mlm(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=23, max_position_embeddings=32)
    return BertForMaskedLM(cfg)


def write_probes(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def direct_p_at_1(model, tok, facts):
    """One fact at a time, no padding: the oracle for the batched evaluation."""
    hits = {}
    with torch.no_grad():
        for f in facts:
            obj = tok(" " + f.object, add_special_tokens=False)["input_ids"]
            if len(obj) != 1:
                continue
            ids = tok(f.template.replace("[X]", f.subject).replace("[Y]", "[MASK]"), return_tensors="pt")["input_ids"]
            logits = model(input_ids=ids).logits[0]
            pos = (ids[0] == tok.mask_token_id).nonzero().item()
            hits.setdefault(f.relation, []).append(int(logits[pos].argmax()) == obj[0])
    return {r: sum(h) / len(h) for r, h in hits.items()}


def test_batched_evaluation_matches_direct_computation():
    tok, facts = tiny_tokenizer(), [Probe(**r) for r in FACTS]
    for seed in range(3):
        model = tiny_mlm(seed).train()
        result = evaluate_probes(model, tok, facts, batch_size=2)  # padding across differing lengths
        assert model.training  # mode restored
        model.eval()
        expected = direct_p_at_1(model, tok, facts)
        assert result.p_at_1 == pytest.approx(expected)
        assert result.counts == {"capital": 3, "located": 2} and result.skipped == 1
        assert result.macro_p_at_1 == pytest.approx(sum(expected.values()) / 2)


def test_p_at_1_counts_argmax_over_vocabulary():
    tok, facts = tiny_tokenizer(), [Probe(**r) for r in FACTS]
    model = tiny_mlm()
    with torch.no_grad():  # make 'paris' the argmax everywhere, 'france' the runner-up
        model.cls.predictions.bias[WORDS.index("paris")] += 1e4
        model.cls.predictions.bias[WORDS.index("france")] += 5e3
    result = evaluate_probes(model, tok, facts)
    assert result.p_at_1 == {"capital": pytest.approx(1 / 3), "located": 0.0}
    assert result.macro_p_at_1 == pytest.approx(1 / 6)
    assert {pred for _, pred in result.predictions} == {"paris"}
    assert "macro" in result.format() and "1 facts skipped" in result.format()


def test_cli_prints_per_relation_and_macro(tmp_path, capsys):
    model_dir = tmp_path / "model"
    model = tiny_mlm()
    with torch.no_grad():
        model.cls.predictions.bias[WORDS.index("france")] += 1e4
    model.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    probes = write_probes(tmp_path / "p.jsonl", FACTS)
    assert main(["--model", str(model_dir), "--probes", str(probes), "--batch-size", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in out if line and not line.startswith("(")}
    assert rows["capital"] == ["3", "0.000"] and rows["located"] == ["2", "0.500"]
    assert rows["macro"] == ["5", "0.250"]


def test_cli_bad_paths(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "missing"), "--probes", str(tmp_path / "p.jsonl")])
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "m").mkdir()
    bad = write_probes(tmp_path / "p.jsonl", [FACTS[0], '{"relation": "r", "template": "[X] is", "subject": "a", "object": "b"}'])
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "m"), "--probes", str(bad)])
    assert "p.jsonl:2: field 'template'" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "m"), "--probes", str(tmp_path / "empty.jsonl")])
    assert "holds no facts" in capsys.readouterr().err


def test_relation_prior_answers_each_relations_most_common_known_object():
    tok = tiny_tokenizer()
    fact = lambda rel, subj, obj: Probe(rel, "[X] is in [Y] .", subj, obj)  # noqa: E731
    known = [fact("located", "paris", "france"), fact("located", "rome", "italy"), fact("located", "nice", "france"),
             fact("located", "a", "new york"), fact("located", "b", "new york"), fact("located", "c", "new york"),
             fact("capital", "france", "paris")]  # "new york" is 2 tokens: not a scored answer
    facts = [fact("located", "lyon", "france"), fact("located", "milan", "italy"), fact("capital", "italy", "rome"),
             fact("capital", "spain", "paris"), fact("capital", "usa", "new york"), fact("born", "x", "spain")]
    prior = relation_prior(known, facts, tok)
    assert prior.p_at_1 == {"located": 0.5, "capital": 0.5, "born": 0.0}  # born: no known fact, never right
    assert prior.counts == {"located": 2, "capital": 2, "born": 1} and prior.skipped == 1
    assert prior.macro_p_at_1 == pytest.approx(1 / 3)

