"""`summary.md` and the PNG plots of a run, from its results (nothing here measures anything).

Ratios are within one run: `wall ratio` = variant wall_ms / baseline wall_ms (lower is better) and
`speedup` = its inverse; convergence compares time_to_target_s the same way.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from harness import METRICS, SUITES, Results

BASELINES = {"step": "hf_dense", "convergence": "dense"}
"""Baseline variant per suite; kernels cases use `kernel_baseline`."""

PREFERRED_VARIANT_ORDER = [
    "hf_dense", "dense_opt", "frozen_dense", "trelm_naive", "trelm_fast",
    "dense", "sparse", "naive", "fused",
    "python_dict", "torch_searchsorted", "entity_table",
    "trelm", "kmb_only", "routing_only", "no_injection",
]


def kernel_baseline(case: str) -> str | None:
    if case == "entity_table":
        return "python_dict"
    if case.startswith("sparse_ffn"):
        return "dense"
    if case.startswith("attribution-"):
        return "naive"
    return None


def baseline_for(suite: str, case: str) -> str | None:
    return kernel_baseline(case) if suite == "kernels" else BASELINES.get(suite)


def fmt(value: float, metric: str) -> str:
    """Human units: FLOP as G, rates with SI prefixes, shares as fractions."""
    if metric in ("flops",):
        return f"{value / 1e9:.2f} G"
    if metric in ("flops_per_s", "bytes_per_s", "lookups_per_s", "tokens_per_s"):
        for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(value) >= scale:
                return f"{value / scale:.2f} {prefix}"
        return f"{value:.1f}"
    if metric in ("max_rel_err",):
        return f"{value:.1e}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def _variant_key(variant: str):
    order = PREFERRED_VARIANT_ORDER
    return (order.index(variant) if variant in order else len(order), variant)


def suite_table(results: Results, suite: str) -> list[str]:
    """A markdown table: one row per (case, variant), one column per metric, plus the ratios."""
    rows: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for r in results.records:
        if r["suite"] == suite:
            rows[(r["case"], r["variant"])][r["metric"]] = r["value"]
    if not rows:
        return []
    metrics = [m for m in METRICS if any(m in v for v in rows.values())]
    ratio_metric = "time_to_target_s" if suite == "convergence" else "wall_ms"
    with_ratio = any(baseline_for(suite, case) for case, _ in rows)
    header = ["case", "variant"] + [f"{m} ({METRICS[m]})" for m in metrics]
    if with_ratio:
        header += [f"{ratio_metric} ratio", "speedup"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    cases = list(dict.fromkeys(case for case, _ in rows))
    for case in cases:
        variants = sorted((v for c, v in rows if c == case), key=_variant_key)
        base = baseline_for(suite, case)
        base_value = rows.get((case, base), {}).get(ratio_metric) if base else None
        for variant in variants:
            values = rows[(case, variant)]
            cells = [case, variant] + [fmt(values[m], m) if m in values else "" for m in metrics]
            if with_ratio:
                value = values.get(ratio_metric)
                if base_value and value:
                    cells += [f"{value / base_value:.3f}", f"{base_value / value:.2f}x"]
                else:
                    cells += ["", ""]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _with_spread(record: dict) -> str:
    """`median [min, max]` of a record carrying the per-seed spread tags, else the value (4 digits)."""
    text = f"{record['value']:.4g}"
    if "min" in record:
        text += f" [{float(record['min']):.4g}, {float(record['max']):.4g}]"
    return text


def convergence_table(results: Results) -> list[str]:
    """A markdown table of the convergence records: per (case, variant) the final figure and the
    time to dense's target, each `median [min, max]` over seeds, and the time ratio to dense."""
    rows: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    for r in results.records:
        if r["suite"] == "convergence":
            rows[(r["case"], r["variant"])][r["metric"]] = r
    if not rows:
        return []
    lines = ["| case | variant | final (median [min, max]) | time to target s (median [min, max]) | seeds reaching "
             "| time ratio to dense | speedup |", "|---|---|---|---|---|---|---|"]
    for case in dict.fromkeys(c for c, _ in rows):
        for variant in sorted((v for c, v in rows if c == case), key=_variant_key):
            got = rows[(case, variant)]
            final = got.get("final_p_at_1") or got.get("final_loss")
            target, base = got.get("time_to_target_s"), rows.get((case, "dense"), {}).get("time_to_target_s")
            seeds = final.get("seeds", "") if final else ""
            cells = [case, variant, _with_spread(final) if final else "",
                     _with_spread(target) if target else ("not reached" if "/sweep" not in case else ""),
                     (f"{target['seeds']} of {seeds}" if target else (f"0 of {seeds}" if seeds else "")),
                     f"{target['value'] / base['value']:.3f}" if target and base else "",
                     f"{base['value'] / target['value']:.2f}x" if target and base else ""]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def ratio(results: Results, suite: str, case: str, variant: str, base: str, metric: str = "wall_ms",
          base_case: str | None = None) -> float | None:
    """`metric` of (case, variant) over `metric` of (base_case, or case if None, base); None if either
    is missing."""
    value, ref = results.get(suite, case, variant, metric), results.get(suite, base_case or case, base, metric)
    return value / ref if value is not None and ref else None


def _difference(results: Results, suite: str, case: str, variant: str, base: str, metric: str) -> float | None:
    value, ref = results.get(suite, case, variant, metric), results.get(suite, case, base, metric)
    return value - ref if value is not None and ref is not None else None


TARGETS = [
    # (what, how it is computed from the records, comparison, threshold)
    ("step minilm: trelm_fast wall / hf_dense", lambda r: ratio(r, "step", "minilm", "trelm_fast", "hf_dense"), "<=", 0.5),
    ("step minilm: trelm_fast wall / dense_opt", lambda r: ratio(r, "step", "minilm", "trelm_fast", "dense_opt"), "<", 1.0),
    ("step minilm: trelm_fast wall / frozen_dense (routing + sparse gradients)",
     lambda r: ratio(r, "step", "minilm", "trelm_fast", "frozen_dense"), "<", 1.0),
    ("step minilm: trelm_fast attribution_share", lambda r: r.get("step", "minilm", "trelm_fast", "attribution_share"), "<=", 0.10),
    ("kernels: attribution naive wall / fused wall", lambda r: ratio(r, "kernels", "attribution-minilm", "naive", "fused"), ">=", 2.0),
    ("kernels: default routing path_jaccard", lambda r: r.get("kernels", "attribution-minilm", "default", "path_jaccard"), ">=", 0.9),
    ("kernels: python_dict wall / entity_table wall", lambda r: ratio(r, "kernels", "entity_table", "python_dict", "entity_table"), ">=", 30.0),
    ("kernels: sparse FFN weight-gradient wall / dense at 10% (minilm)",
     lambda r: ratio(r, "kernels", "sparse_ffn_wgrad-minilm-p10", "sparse", "dense"), "<=", 0.15),
    ("kernels: sparse FFN fwd+bwd wall / dense at 100% (minilm)",
     lambda r: ratio(r, "kernels", "sparse_ffn-minilm-p100", "sparse", "dense"), "<=", 1.10),
    *[(f"convergence {ds}: trelm / dense median time to the {what} target",
       lambda r, case=f"{ds}/{measure}": ratio(r, "convergence", case, "trelm", "dense", "time_to_target_s"), "<=", 0.5)
      for ds in ("wiki-geo", "small") for measure, what in (("p_at_1_stated", "stated-fact P@1"),
                                                            ("p_at_1_heldout", "held-out P@1"))],
    *[(f"convergence {ds}: trelm - dense median final {what} P@1 at equal wall-clock",
       lambda r, case=f"{ds}/p_at_1_{what}": _difference(r, "convergence", case, "trelm", "dense", "final_p_at_1"),
       ">=", 0.0)
      for ds in ("wiki-geo", "small") for what in ("stated", "heldout")],
]
"""Issue 7's targets (and issue 4's sparse FFN ones, issue 12's frozen_dense one, issue 13's convergence
ones); the report states each figure, met or not."""

_COMPARE = {"<=": lambda a, b: a <= b, "<": lambda a, b: a < b, ">=": lambda a, b: a >= b}


def targets_table(results: Results, targets: list = TARGETS) -> list[str]:
    """Markdown rows: target, measured figure, met / missed / not measured in this run (`targets` as
    TARGETS: what, how it is computed from the records, comparison, threshold)."""
    lines = ["| target | measured | met |", "|---|---|---|"]
    for what, compute, op, threshold in targets:
        value = compute(results)
        if value is None:
            lines.append(f"| {what} {op} {threshold:g} | not measured (or target not reached) | - |")
        else:
            lines.append(f"| {what} {op} {threshold:g} | {value:.3g} | {'yes' if _COMPARE[op](value, threshold) else 'no'} |")
    return lines


def summary_markdown(results: Results, meta: dict) -> str:
    lines = [
        "# trelm-fast benchmarks",
        "",
        f"- device: {meta['device']}" + (" (CPU figures)" if meta["device_type"] == "cpu" else ""),
        f"- 1-minute load average at start / end: {meta['load_average_1m_at_start']:.1f} / "
        f"{meta['load_average_1m']:.1f} (other processes sharing the CPU slow every figure)",
        f"- command: `{meta['command']}`",
        f"- commit: {meta['commit']}{' (dirty)' if meta['dirty'] else ''}, date: {meta['date']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- timing: {meta['timing']} ({meta['warmup']} warm-up, {meta['repeats']} timed on CPU); "
        f"peak memory: {meta['peak_mem']}",
    ]
    if meta["quick"]:
        lines.append("- **--quick**: smallest sizes and fewer repeats; not the reference figures")
    if results.errors:
        lines += ["", "## Failures", ""]
        lines += [f"- **{suite}**: {msg.strip().splitlines()[-1]}" for suite, msg in results.errors.items()]
    lines += ["", "## Targets", ""] + targets_table(results)
    for suite in SUITES:
        table = convergence_table(results) if suite == "convergence" else suite_table(results, suite)
        if not table and suite not in results.notes:
            continue
        lines += ["", f"## {suite}", ""]
        lines += [f"- {note}" for note in results.notes.get(suite, [])]
        if table:
            lines += [""] + table
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)


def plot_step_throughput(results: Results, path: Path) -> bool:
    """Grouped bars of tokens/s per step variant and case; False when there is nothing to plot."""
    data = [r for r in results.records if r["suite"] == "step" and r["metric"] == "tokens_per_s"]
    if not data:
        return False
    cases = list(dict.fromkeys(r["case"] for r in data))
    variants = sorted({r["variant"] for r in data}, key=_variant_key)
    fig, ax = _pyplot().subplots(figsize=(7, 4))
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        heights = [results.get("step", c, variant, "tokens_per_s") or 0.0 for c in cases]
        ax.bar([j + i * width for j in range(len(cases))], heights, width, label=variant)
    ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(cases))], cases)
    ax.set_ylabel("tokens / s (training step)")
    ax.legend()
    _save(fig, path)
    return True


def plot_convergence(curves: dict[str, dict[str, list[float]]], path: Path) -> bool:
    """Per dataset (rows): validation MLM loss and the probe P@1 of each split (columns) against each
    run's own wall-clock; one colour per variant, one line per seed. Curves are keyed
    `<dataset>/<variant>/seed<k>`."""
    if not curves:
        return False
    keys = [k.split("/") for k in curves]
    datasets = list(dict.fromkeys(ds for ds, _, _ in keys))
    variants = sorted({v for _, v, _ in keys}, key=_variant_key)
    measures = ["valid_mlm_loss"] + sorted({m for c in curves.values() for m in c if m.startswith("p_at_1_")})
    plt = _pyplot()
    fig, axes = plt.subplots(len(datasets), len(measures), figsize=(4.2 * len(measures), 3.4 * len(datasets)),
                             squeeze=False)
    colours = {v: f"C{i}" for i, v in enumerate(variants)}
    for (ds, variant, _), curve in zip(keys, curves.values()):
        row = datasets.index(ds)
        for col, measure in enumerate(measures):
            if measure in curve:
                axes[row][col].plot(curve["probe_wall_s"], curve[measure], marker=".", linewidth=1, alpha=0.8,
                                    color=colours[variant])
    for row, ds in enumerate(datasets):
        for col, measure in enumerate(measures):
            ax = axes[row][col]
            ax.set_title(f"{ds}: " + ("valid MLM loss" if measure == "valid_mlm_loss"
                                      else f"P@1 ({measure.removeprefix('p_at_1_')} facts)"), fontsize=9)
            ax.set_xlabel("wall-clock of the run's training steps (s)", fontsize=8)
    handles = [plt.Line2D([], [], color=colours[v], label=v) for v in variants]
    fig.legend(handles=handles, loc="upper center", ncol=len(variants), fontsize=8, bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
