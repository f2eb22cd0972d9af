"""Stage: what a finished cache holds: statistics, an integrity check and charts.

    python run_pipeline.py inspect runs/demo/cache
    python run_pipeline.py inspect runs/demo/cache --verify --plots runs/demo/plots --max-tokens 500000

The statistics are computed in cache/stats.py (definitions: docs/inspect.md); this file
prints them as an aligned table and draws the charts (matplotlib, Agg, no display needed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cache.reader import CacheReader
from cache.schema import CacheError
from cache.stats import cache_stats

DEFAULT_MAX_TOKENS = 2_000_000


def inspect(cache_dir: str | Path, max_tokens: int = DEFAULT_MAX_TOKENS, verify: bool = True) -> dict:
    """The statistics dict of a finished cache (CacheError for a missing, incomplete or damaged one)."""
    reader = CacheReader(cache_dir, verify=verify)  # verify: each shard read is hashed first
    try:
        return cache_stats(reader, max_tokens)
    finally:
        reader.close()


def verify_shards(cache_dir: str | Path) -> int:
    """Re-check every shard's checksum; the number checked, or a CacheError naming the bad ones."""
    reader = CacheReader(cache_dir)
    bad = reader.verify()
    if bad:
        what = [f"{name} ({'missing' if not reader.location.exists(name) else 'checksum mismatch'})"
                for name in bad]
        raise CacheError(f"{len(bad)} of {len(reader.shards)} shards of {cache_dir} fail verification: "
                         f"{', '.join(what)}; the cache is damaged, re-create it with "
                         f"`run_pipeline.py cache --force` (sets the old cache aside)")
    return len(reader.shards)


def main(cache_dir: str, verify: bool = False, plots: str = "", max_tokens: int = DEFAULT_MAX_TOKENS) -> dict:
    checked = verify_shards(cache_dir) if verify else None  # first: a damaged shard could break the statistics
    stats = inspect(cache_dir, max_tokens, verify=checked is None)  # --verify hashed every shard already
    print(format_report(cache_dir, stats), flush=True)
    if checked is not None:
        print(f"\nverify: all {checked} shards match their checksums", flush=True)
    if plots:
        written = write_plots(stats, Path(plots))
        print(f"\nplots: {', '.join(str(p) for p in written)}", flush=True)
    return stats


# --- the printed report ---------------------------------------------------------------------


def table(rows: list[tuple]) -> list[str]:
    """Rows of cells → lines: the first column left-aligned, the others right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells if i < len(row)) for i in range(max(map(len, cells)))]
    return ["  " + "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)).rstrip()
            for row in cells]


def header_lines(cache_dir, s: dict) -> list[str]:
    head = f"cache {cache_dir}  (store {s['store']}, targets {s['targets']}, k {s['k']}, vocab {s['vocab_size']:,})"
    sample = (f"  statistics below over {s['sampled_tokens']:,} tokens: {s['sampled_sequences']:,} whole sequences "
              f"from the first {s['sampled_shards']} of {s['shards']} shards (--max-tokens)")
    return [head, *table([("tokens", f"{s['tokens']:,}"), ("sequences", f"{s['sequences']:,}"),
                          ("shards", f"{s['shards']:,}")]), sample]


def storage_lines(s: dict) -> list[str]:
    rows = [("field", "bytes/token", "compression")]
    rows += [(name, f"{f['bytes_per_token']:.2f}", f"{f['compression_ratio']:.2f}x") for name, f in s["fields"].items()]
    rows += [("all arrays", f"{s['bytes_per_token']:.2f}", f"{s['compression_ratio']:.2f}x"),
             ("on disk (with metadata)", f"{s['disk_bytes_per_token']:.2f}", "")]
    return ["storage, all shards (stored size per array as the store reports it; compression = raw / stored)",
            *table(rows)]


def teacher_lines(s: dict) -> list[str]:
    rows = [("", "value/mean", "p5", "p50"),
            ("trained positions (loss_mask 1)", f"{s['trained_positions']:,}", "", ""),
            ("teacher NLL of the target, nats", f"{s['teacher_nll']:.3f}", "", "")]
    if "topk_mass_mean" in s:
        rows += [(f"top-{s['k']} probability mass", f"{s['topk_mass_mean']:.3f}", f"{s['topk_mass_p5']:.3f}",
                  f"{s['topk_mass_p50']:.3f}"),
                 ("entropy lower bound (tail as 1 bucket), nats", f"{s['entropy_lower_mean']:.3f}", "",
                  f"{s['entropy_lower_p50']:.3f}"),
                 ("entropy upper bound (tail uniform), nats", f"{s['entropy_upper_mean']:.3f}", "", ""),
                 ("target in top-k (trained positions)", f"{s['target_in_topk']:.1%}", "", "")]
    if "draws_unique_mean" in s:
        rows += [("draws per position (counts summed)", f"{s['draws_per_position']:.2f}", "", ""),
                 ("unique draws per position", f"{s['draws_unique_mean']:.2f}", "", ""),
                 ("unique draws drawn once", f"{s['draws_singleton_share']:.1%}", "", ""),
                 ("teacher mass of the unique draws", f"{s['draw_mass_mean']:.3f}", "", f"{s['draw_mass_p50']:.3f}"),
                 ("target among draws (trained positions)", f"{s['target_in_draws']:.1%}", "", "")]
    return ["teacher signal", *table(rows)]


def codec_lines(s: dict) -> list[str]:
    c = s["codec"]
    bits = lambda b: "float32" if b == 32 else f"{b}-bit"
    rows = [("preset", c["preset"]),
            ("top-k / draw log-probs", f"{bits(c['logprob_bits'])}, |error| <= {c['logprob_error_bound']:.2g} nats"),
            ("target log-prob", f"{bits(32 if c['logprob_bits'] == 32 else 16)}, |error| <= {c['target_error_bound']:.2g} nats"),
            ("router probabilities", f"{bits(c['router_bits'])}, |error of log p| <= {c['router_log_error_bound']:.2g}"),
            ("vocabulary ranked by frequency", f"{c['vocab_ranked']:,} ids (the rest in id order)")]
    if "router" in s and "router_mass_gap" in s["router"]:
        rows.append(("router |1 - sum p| (all experts stored), mean", f"{float(np.mean(s['router']['router_mass_gap'])):.2g}"))
    return ["codec (bounds hold for log p above the quantiser's floor, docs/cache_format.md)", *table(rows)]


def router_lines(s: dict) -> list[str]:
    r = s["router"]
    has_entropy = "router_entropy" in r
    rows = [("MoE layer", "load CV", "min share", "max share", *(("router entropy",) if has_entropy else ()))]
    for i, layer in enumerate(r["layers"]):
        shares = r["load_shares"][i]
        rows.append((str(layer), f"{r['load_cv'][i]:.3f}", f"{shares.min():.3f}", f"{shares.max():.3f}",
                     *((f"{r['router_entropy'][i]:.3f}",) if has_entropy else ())))
    bound = "" if not has_entropy else ("exact" if r["router_entropy_exact"] else "lower bound, tail = 1 bucket")
    notes = [f"  load weighting: {r['load_weighting']}",
             f"  uniform share 1/E = {1 / r['num_experts']:.3f}" + (f"; entropy in nats ({bound}), "
                                                                     f"max log E = {np.log(r['num_experts']):.3f}"
                                                                     if has_entropy else "")]
    title = (f"router ({len(r['layers'])} of the teacher's {len(r['teacher_layers'])} MoE layers stored, "
             f"{r['num_experts']} experts, {r['router_topk']} stored per token)")
    return [title, *table(rows), *notes]


def format_report(cache_dir, stats: dict) -> str:
    sections = [header_lines(cache_dir, stats), storage_lines(stats), teacher_lines(stats), codec_lines(stats)]
    if "router" in stats:
        sections.append(router_lines(stats))
    return "\n\n".join("\n".join(lines) for lines in sections)


# --- charts -----------------------------------------------------------------------------------


def new_figure(width: float = 6.4, height: float = 4.0):
    from matplotlib.figure import Figure  # the object API: no pyplot state, no display backend

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots()


def histogram(values, title: str, xlabel: str, marks: dict[str, float], path: Path) -> Path:
    fig, ax = new_figure()
    ax.hist(values, bins=50, color="#4c72b0")
    for (label, x), style in zip(marks.items(), ("-", "--", ":")):
        ax.axvline(x, color="#c44e52", linestyle=style, label=f"{label} {x:.3f}")
    ax.set(title=title, xlabel=xlabel, ylabel="positions")
    ax.legend()
    fig.savefig(path, dpi=110)
    return path


def load_heatmap(router: dict, path: Path) -> Path:
    shares_LE = router["load_shares"]
    fig, ax = new_figure(max(6.4, 0.12 * shares_LE.shape[1] + 2), max(3.0, 0.35 * shares_LE.shape[0] + 1.5))
    image = ax.imshow(shares_LE, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set(xlabel="expert", ylabel="decoder layer", yticks=range(len(router["layers"])),
           yticklabels=[str(x) for x in router["layers"]])
    fig.suptitle("expert load share per MoE layer")
    ax.set_title(f"weighting: {router['load_weighting']}", fontsize=7)
    fig.colorbar(image, ax=ax, label=f"share (uniform = {1 / shares_LE.shape[1]:.3f})")
    fig.savefig(path, dpi=110)
    return path


def bytes_chart(stats: dict, path: Path) -> Path:
    names = list(stats["fields"])
    values = [stats["fields"][n]["bytes_per_token"] for n in names]
    fig, ax = new_figure(6.4, 0.35 * len(names) + 1.5)
    bars = ax.barh(names, values, color="#55a868")
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.invert_yaxis()
    ax.margins(x=0.12)  # room for the labels of the longest bars
    ax.set(title=f"stored bytes per token (all arrays {stats['bytes_per_token']:.2f})", xlabel="bytes / token")
    fig.savefig(path, dpi=110)
    return path


def write_plots(stats: dict, out_dir: Path) -> list[Path]:
    """PNG charts; router charts only for caches with router data."""
    out_dir.mkdir(parents=True, exist_ok=True)
    per_pos, written = stats["per_position"], [bytes_chart(stats, out_dir / "bytes_per_token.png")]
    if "topk_mass" in per_pos:
        marks = {name: stats[f"topk_mass_{name}"] for name in ("mean", "p5", "p50")}
        written.append(histogram(per_pos["topk_mass"], f"teacher probability mass in the top-{stats['k']}",
                                 "sum of exp(top-k log-probs)", marks, out_dir / "topk_mass.png"))
        written.append(histogram(per_pos["entropy_lower"], "teacher entropy, lower bound (tail mass as one bucket)",
                                 "nats", {"mean": stats["entropy_lower_mean"], "p50": stats["entropy_lower_p50"]},
                                 out_dir / "teacher_entropy.png"))
    if "router" in stats:
        written.append(load_heatmap(stats["router"], out_dir / "expert_load.png"))
    return written
