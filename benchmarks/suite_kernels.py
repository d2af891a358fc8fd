"""`kernels` suite: the entity table, the sparse FFN gradient and the fused attribution.

Cases (issue 7's names):
- `entity_table`: `lookups` random present ids in a table of `size` int64 ids; variants
  `entity_table` (the C++ table), `python_dict` (a dict lookup per id over `ids.tolist()`, back to
  an int32 array) and `torch_searchsorted` (sorted keys + slot permutation). All three must agree.
- `sparse_ffn-<shape>-p<percent>`: one FFN forward + backward (`trelm_fast.ffn.trelm_ffn`, GELU)
  on --batch-size x --seq-len tokens (default 8 x 128), fp32; `sparse`: knowledge path of percent% of I (random sorted neurons), slice
  gradients + exact dX, b2 frozen (the TRELM default); `dense`: autograd over W1, b1, W2, b2 + dX.
  `sparse_ffn_wgrad-<shape>-p<percent>`: the weight-gradient part of that backward alone, on the
  same tensors cast to --precision's dtype: `sparse` = the two `kernels.sparse_ffn` calls TrelmFFN
  makes (`gathered_tn_matmul`: dW1[S], db1[S] from dPre; `column_slice_grad`: dW2[:, S] from A[:, S]
  kept by the forward), as dispatched; on CUDA also `triton` and `gather_cublas`, the two paths the
  dispatch chooses between, each forced; `dense` = dPre^T X, sum_t dPre, dY^T A. `max_rel_err`:
  slice gradients and dX against dense autograd restricted to S.
- `attribution-minilm`: see `attribution_case`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from harness import Results, Settings, measure_heavy, measure_many, rel_err, require, time_many

SUITE = "kernels"
WGRAD_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Operand dtype of the sparse_ffn_wgrad cases per --precision (what autocast hands the backward)."""
CHOICES = (("riemann", 4, 0), ("gauss_legendre", 4, 0), ("gauss_legendre", 8, 0), ("riemann", 20, 4), ("riemann", 20, 2))
"""Attribution settings measured one at a time: (quadrature, m, sequences; 0 = all)."""


def entity_table_case(settings: Settings, results: Results) -> None:
    """Lookups per second of the three id -> slot maps; the answers are checked to agree."""
    EntityTable = require("trelm_fast.entity_table", "EntityTable")
    size, lookups = (300_000, 100_000) if settings.quick else (3_000_000, 1_000_000)
    rng = np.random.default_rng(0)
    ids = np.unique(rng.integers(0, 2**62, size=size, dtype=np.int64))
    rng.shuffle(ids)
    queries = ids[rng.integers(0, len(ids), size=lookups)]

    table = EntityTable(capacity=len(ids))
    table.insert(ids)
    as_dict = {int(i): s for s, i in enumerate(ids.tolist())}
    keys_t = torch.from_numpy(ids)
    sorted_keys, order = torch.sort(keys_t)
    order = order.to(torch.int32)
    queries_t = torch.from_numpy(queries)

    def by_table() -> np.ndarray:
        return table.lookup(queries)

    def by_dict() -> np.ndarray:
        return np.fromiter((as_dict.get(i, -1) for i in queries.tolist()), dtype=np.int32, count=len(queries))

    def by_searchsorted() -> torch.Tensor:
        pos = torch.searchsorted(sorted_keys, queries_t).clamp_(max=len(sorted_keys) - 1)
        found = sorted_keys[pos] == queries_t
        return torch.where(found, order[pos], torch.tensor(-1, dtype=torch.int32))

    expected = by_dict()
    if not (np.array_equal(by_table(), expected) and np.array_equal(by_searchsorted().numpy(), expected)):
        raise AssertionError("entity_table: the three lookups disagree")
    walls = time_many({"entity_table": by_table, "python_dict": by_dict, "torch_searchsorted": by_searchsorted}, settings)
    for variant, ms in walls.items():
        results.add(SUITE, "entity_table", variant, "wall_ms", ms)
        results.add(SUITE, "entity_table", variant, "lookups_per_s", lookups / (ms / 1e3))
    results.note(SUITE, f"entity_table: {lookups:,} lookups of present ids in a table of {len(ids):,} int64 ids (CPU)")


def add_all(results: Results, case: str, measured: dict[str, dict[str, float]]) -> None:
    """Records from {variant: {metric: value}}."""
    for variant, values in measured.items():
        for metric, value in values.items():
            results.add(SUITE, case, variant, metric, value)


def sparse_ffn_cases(settings: Settings, results: Results) -> None:
    """Sparse vs dense FFN forward + backward, and the weight-gradient part alone (module docstring)."""
    from workload import SHAPES

    shapes = settings.model_shapes()
    percents = (5, 10, 25, 50, 100)
    wanted = [(s, p) for s in shapes for p in percents
              if settings.wants(f"sparse_ffn-{s}-p{p}") or settings.wants(f"sparse_ffn_wgrad-{s}-p{p}")]
    if not wanted:
        return
    FFNSlices, gather_index, trelm_ffn = require("trelm_fast.ffn", "FFNSlices", "gather_index", "trelm_ffn")
    column_slice_grad, gather_columns, gathered_tn_matmul = require(
        "trelm_fast.kernels.sparse_ffn", "column_slice_grad", "gather_columns", "gathered_tn_matmul")
    kernel_backend = require("trelm_fast.kernels", "kernel_backend")
    dev, (batch, seq_len) = settings.device, (settings.batch_size or 8, settings.seq_len)
    tokens, wdtype = batch * seq_len, WGRAD_DTYPES[settings.precision]
    for shape in dict.fromkeys(s for s, _ in wanted):
        d, inter = SHAPES[shape]["hidden_size"], SHAPES[shape]["intermediate_size"]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, seq_len, d, generator=g).to(dev).requires_grad_(True)
        w1 = (torch.randn(inter, d, generator=g) * d**-0.5).to(dev)
        b1 = (torch.randn(inter, generator=g) * 0.1).to(dev)
        w2 = (torch.randn(d, inter, generator=g) * inter**-0.5).to(dev)
        b2 = (torch.randn(d, generator=g) * 0.1).to(dev)
        dy = torch.randn(batch, seq_len, d, generator=g).to(dev)
        dense_params = [p.clone().requires_grad_(True) for p in (w1, b1, w2, b2)]

        def dense_step():
            x.grad = None
            for p in dense_params:
                p.grad = None
            trelm_ffn(x, *dense_params, F.gelu).backward(dy)

        dense_step()
        dense_grads = [x.grad.clone()] + [p.grad.clone() for p in dense_params[:3]]
        # the weight-gradient inputs, once: X, A = gelu(pre), dY and dPre = (dY W2) * gelu'(pre)
        xf, dyf = x.detach().reshape(tokens, d), dy.reshape(tokens, d)
        pre = (xf @ w1.t() + b1).requires_grad_(True)
        act = F.gelu(pre)
        (d_pre,) = torch.autograd.grad(act, pre, dyf @ w2)
        xf, dyf, d_pre, act = (t.detach().to(wdtype) for t in (xf, dyf, d_pre, act))

        def dense_wgrad():
            return d_pre.t() @ xf, d_pre.sum(0), dyf.t() @ act

        for percent in (p for s, p in wanted if s == shape):
            k = max(1, round(inter * percent / 100))
            path = torch.randperm(inter, generator=g)[:k].sort().values.to(dev)
            slices = FFNSlices(*(torch.zeros(size, device=dev, requires_grad=True) for size in ((k, d), (k,), (d, k))))

            def sparse_step():
                x.grad = None
                for leaf in slices:
                    leaf.grad = None
                trelm_ffn(x, w1, b1, w2, b2, F.gelu, path=path, slices=slices).backward(dy)

            idx = gather_index(path, inter)  # as TrelmFFN passes it: None (no gather) for all I neurons
            act_s = act if idx is None else gather_columns(act, idx)  # what the forward keeps for dW2[:, S]

            def sparse_wgrad():
                return gathered_tn_matmul(d_pre, xf, a_idx=idx, colsum=True), column_slice_grad(dyf, act_s)

            def sparse_wgrad_on(backend: str):
                def run():
                    with kernel_backend(backend):
                        return sparse_wgrad()
                return run

            wgrad = {"sparse": sparse_wgrad, "dense": dense_wgrad}
            if dev.type == "cuda":  # both paths the dispatch chooses between, each forced
                wgrad |= {"triton": sparse_wgrad_on("triton"), "gather_cublas": sparse_wgrad_on("reference")}

            case, wcase = f"sparse_ffn-{shape}-p{percent}", f"sparse_ffn_wgrad-{shape}-p{percent}"
            if settings.wants(case):
                sparse_step()
                results.add(SUITE, case, "sparse", "max_rel_err", max(
                    rel_err(x.grad, dense_grads[0]),
                    rel_err(slices.w1.grad, dense_grads[1][path]),
                    rel_err(slices.b1.grad, dense_grads[2][path]),
                    rel_err(slices.w2.grad, dense_grads[3][:, path]),
                ))
                add_all(results, case, measure_many(settings, {"sparse": sparse_step, "dense": dense_step}, tokens))
            if settings.wants(wcase):
                add_all(results, wcase, measure_many(settings, wgrad, memory=False))
        results.note(SUITE, f"sparse_ffn-{shape}: d={d}, I={inter}, {batch} x {seq_len} tokens, fp32, GELU "
                            f"(sparse_ffn_wgrad: {settings.precision} operands); sparse and dense timed "
                            "interleaved in every row")


def attribution_case(settings: Settings, results: Results) -> None:
    """`attribution-minilm[-<model_type>]`: fused batched IG vs the Knowledge Neurons per-layer loop, and
    the default config, for the family of --model-type (BERT by default).

    Both attribute every FFN layer of a random-init MiniLM-shape model at m = 20 (Riemann, eq. 11)
    on 8 x 128 full-length sequences (quick: 1 x 64), CKA targets and negatives as the trelm step
    draws them. `fused` = `trelm_fast.routing.attribute`, `naive` = `attribute_reference`;
    max_rel_err compares their scores. `default`: the routing section of the embedded default
    config (m, quadrature, layers, sequences); its `path_jaccard` is the mean over the attributed
    layers of the Jaccard overlap between its selected paths and those of the exact m = 20
    Riemann scores under the same selection rule. Not in --quick: one variant per entry of
    CHOICES (one setting changed from the exact attribution), with its time and path_jaccard.
    """
    case = "attribution-minilm" + (f"-{settings.model_type}" if settings.model_type != "bert" else "")
    if not settings.wants(case):
        return
    attribute, attribute_reference, select_paths, path_jaccard = require(
        "trelm_fast.routing", "attribute", "attribute_reference", "select_paths", "path_jaccard")
    sample_negatives = require("trelm_fast.losses", "sample_negatives")
    import workload

    data_dir = workload.generated_dir()
    step, model = workload.build_step("trelm", "minilm", data_dir, settings.device, model_type=settings.model_type)
    cfg = step.cfg
    batch_size, seq_len = (1, 64) if settings.quick else (8, 128)
    batch = {k: v.to(settings.device) for k, v in workload.full_batch(
        data_dir, batch_size, seq_len, causal=workload.is_causal(settings.model_type)).items()}
    with torch.no_grad():
        hidden = model.embedding_output(batch)
    targets = batch["cka_labels"][batch["cka_labels"].ne(-100)]
    negatives = sample_negatives(targets, model.negative_q, cfg.loss.num_negatives,
                                 generator=torch.Generator().manual_seed(0))
    inputs = (model.mlm, hidden, batch["attention_mask"], batch["cka_labels"], negatives)
    exact = {"m": 20, "quadrature_rule": "riemann", "layers": None, "sequences": 0, "head": model.head}
    tokens = batch_size * seq_len
    fused, values = measure_heavy(settings, lambda: attribute(*inputs, **exact), tokens)
    add_all(results, case, {"fused": values})
    naive, values = measure_heavy(settings, lambda: attribute_reference(*inputs, **exact), tokens)
    add_all(results, case, {"naive": values})
    results.add(SUITE, case, "fused", "max_rel_err", rel_err(fused.scores, naive.scores))

    r = cfg.routing
    default = {"m": r.m, "quadrature_rule": r.quadrature, "layers": r.layers, "sequences": r.sequences,
               "head": model.head}
    if default == exact:
        chosen = fused
        add_all(results, case, {"default": {m: results.get(SUITE, case, "fused", m) for m in ("flops", "wall_ms", "tokens_per_s")
                                            if results.get(SUITE, case, "fused", m) is not None}})
    else:
        chosen, values = measure_heavy(settings, lambda: attribute(*inputs, **default), tokens)
        add_all(results, case, {"default": values})

    def overlaps(attr) -> list[float]:
        """Per attributed layer: Jaccard of attr's paths with the exact m = 20 Riemann paths."""
        rows = [fused.layers.index(layer) for layer in attr.layers]
        mine = select_paths(attr.scores, r.rule, r.fraction, r.threshold)
        reference = select_paths(fused.scores[rows], r.rule, r.fraction, r.threshold)
        return [path_jaccard(a.cpu(), b.cpu()) for a, b in zip(mine, reference)]  # the paths of host tensors

    default_overlaps = overlaps(chosen)
    results.add(SUITE, case, "default", "path_jaccard", sum(default_overlaps) / len(default_overlaps))
    results.note(SUITE, f"{case}: {batch_size} x {seq_len} tokens, {fused.num_targets} target positions, "
                        f"all {len(fused.layers)} layers, m = 20 Riemann for fused/naive; default = m {r.m} "
                        f"{r.quadrature}, layers {r.layers or 'all'}, sequences {r.sequences or 'all'}, rule "
                        f"{r.rule} (fraction {r.fraction}); per-layer path Jaccard "
                        + ", ".join(f"{j:.2f}" for j in default_overlaps))
    if settings.quick:
        return
    for rule, m, sequences in CHOICES:  # each cost-cutting choice alone: its time and its path overlap
        variant = f"{rule}-m{m}" + (f"-seq{sequences}" if sequences else "")
        config = {**exact, "m": m, "quadrature_rule": rule, "sequences": sequences}
        attr, values = measure_heavy(settings, lambda: attribute(*inputs, **config), tokens, profile=False)
        layer_overlaps = overlaps(attr)
        add_all(results, case, {variant: {**values, "path_jaccard": sum(layer_overlaps) / len(layer_overlaps)}})
    results.note(SUITE, f"{case}: variants <rule>-m<m>[-seq<n>] change one setting of the exact attribution "
                        "(all layers) and give its time and the path Jaccard against the exact paths")


def run(settings: Settings, results: Results) -> None:
    if settings.wants("entity_table"):
        entity_table_case(settings, results)
    sparse_ffn_cases(settings, results)
    attribution_case(settings, results)
