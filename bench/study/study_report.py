"""The quality study's report and plot, built from its records alone (bench/results/study.json)."""

from __future__ import annotations

import statistics
from pathlib import Path

from matplotlib.figure import Figure

from bench.study.rows import (
    ABLATION_TARGET,
    ABLATIONS,
    CRITERION_BY_SCHEDULE,
    EQUAL_RECOVERY,
    LORA,
    MAIN,
    NO_RECOVERY,
    ROWS,
)

SECTION = "## Quality: APT against other pruners at equal recovery"


def targets(results: dict) -> list[float]:
    """The pruning targets the records hold (parts of a study may have run different ones), largest first."""
    return sorted({run["target"] for run in results["runs"] if run["method"] != LORA}, reverse=True)


def seeds(results: dict) -> list[int]:
    return sorted({run["seed"] for run in results["runs"]})


def runs_of(results: dict, method: str, target: float) -> list[dict]:
    return [run for run in results["runs"] if run["method"] == method and run["target"] == target]


def summary(results: dict, method: str, target: float) -> dict | None:
    """Mean and sample std of the perplexity over seeds, mean achieved fraction, seed count; None if not run."""
    runs = runs_of(results, method, target)
    if not runs:
        return None
    values = [run["perplexity"] for run in runs]
    dense = results["dense"]["params"]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "fraction": statistics.fmean(run["params"] / dense for run in runs)}


def mean_spread(stat: dict) -> str:
    """"mean ± std" over seeds; the mean alone for one seed, which has no spread."""
    return f"{stat['mean']:.2f}" + (f" ± {stat['std']:.2f}" if stat["n"] > 1 else "")


def best_method(results: dict, target: float, methods=MAIN) -> str | None:
    means = {m: stat["mean"] for m in methods if (stat := summary(results, m, target)) is not None}
    return min(means, key=means.get) if means else None


def per_seed_change(results: dict, method: str, other: str, target: float, key: str = "perplexity") -> list[float]:
    """100 · (method / other − 1) of `key`, per seed both ran."""
    mine = {run["seed"]: run[key] for run in runs_of(results, method, target)}
    theirs = {run["seed"]: run[key] for run in runs_of(results, other, target)}
    return [100 * (mine[seed] / theirs[seed] - 1) for seed in sorted(mine) if seed in theirs]


def apt_margin(results: dict, target: float) -> tuple[str, bool | None]:
    """APT against the best equal-recovery row: the per-seed change, mean ± std, and whether APT is lower by more
    than the spread (None where it cannot be said: no rival, or one seed, which has no spread)."""
    rival = best_method(results, target, EQUAL_RECOVERY)
    diffs = per_seed_change(results, "apt", rival, target) if rival else []
    if not diffs:
        return "–", None
    if len(diffs) == 1:
        return f"{spread_text(diffs, PERCENT)} vs {rival}", None
    mean, spread = statistics.fmean(diffs), statistics.stdev(diffs)
    return f"{spread_text(diffs, PERCENT)} vs {rival} ({len(diffs)} seeds)", (mean < 0 and -mean > spread)


PERCENT = "{:+.1f}%"


def spread_text(values: list[float], form: str) -> str:
    """Per-seed values as "mean ± std" in `form` (e.g. PERCENT); one seed has no spread and says so."""
    if len(values) == 1:
        return f"{form.format(values[0])} (one seed)"
    return f"{form.format(statistics.fmean(values))} ± {form.format(statistics.stdev(values)).lstrip('+')}"


def quality_table(results: dict) -> str:
    dense = results["dense"]
    header = "| target | " + " | ".join(ROWS[m].label for m in MAIN) + " | APT vs best equal-recovery row |"
    lines = [header, "|---:|" + "---:|" * len(MAIN) + "---|",
             f"| 1.0 (dense) | {dense['perplexity']:.2f} |" + " |" * (len(MAIN) - 1) + " – |"]
    for target in targets(results):
        cells = []
        for method in MAIN:
            stat = summary(results, method, target)
            cells.append("–" if stat is None else f"{mean_spread(stat)} ({stat['fraction']:.3f})")
        if any(cell != "–" for cell in cells):
            lines.append(f"| {target} | " + " | ".join(cells) + f" | {apt_margin(results, target)[0]} |")
    return "\n".join(lines)


def verdict(results: dict) -> str:
    """Where APT is lowest against the equal-recovery rows by more than the seed spread, where not, and where one
    seed cannot tell."""
    found = {True: [], False: [], None: []}
    for target in targets(results):
        text, clear = apt_margin(results, target)
        if text != "–":
            found[clear].append(f"{target} ({text})")
    return (f"APT is lower than every equal-recovery row by more than the seed spread at: "
            f"{', '.join(found[True]) or 'none'}; not at: {', '.join(found[False]) or 'none'}; one seed so far, "
            f"no spread to judge by: {', '.join(found[None]) or 'none'}.")


def ingredients_table(results: dict) -> str:
    """What each row's recovery consisted of (from its first run's record)."""
    lines = ["| row | criterion | salience gradient | schedule | layers (pruning.depth) | distillation | rank growth | "
             "shape search | steps | training tokens | teacher forwards | one-shot calibration batches |",
             "|---|---|---|---|---|---|---|---|---:|---:|---:|---:|"]
    for method in (*MAIN, *ABLATIONS, LORA):
        run = next((r for r in results["runs"] if r["method"] == method), None)
        if run is not None:
            i = run["ingredients"]
            # Records before the option existed were all before_mask, the default then as now.
            gradient, depth = i.get("salience_gradient", "before_mask"), i.get("depth", "off")
            if i.get("depth_unit", "layer") == "sublayer":
                depth = f"{depth}, sublayers"
            lines.append(f"| {ROWS[method].label} | {i['criterion']} | {gradient} | {i['schedule']} | {depth} | "
                         f"{yes(i['distill'])} | {yes(i['grow'])} | {i['shape_search']} | {i['steps']} | "
                         f"{i['tokens']:,} | {i['teacher_forwards']} | {i['calibration_batches']} |")
    return "\n".join(lines)


def yes(flag: bool) -> str:
    return "yes" if flag else "no"


def cost_table(results: dict) -> str:
    """Finetune wall and CPU seconds per row (mean over its runs), and APT's against LoRA's per seed."""
    lines = ["| row | runs | finetune wall s (mean ± std) | finetune CPU s | whole pipeline s |",
             "|---|---:|---:|---:|---:|"]
    for method in (*MAIN, LORA):
        runs = [r for r in results["runs"] if r["method"] == method]
        if runs:
            wall = [r["finetune_wall_seconds"] for r in runs]
            lines.append(f"| {ROWS[method].label} | {len(runs)} | {statistics.fmean(wall):.1f} ± "
                         f"{statistics.stdev(wall) if len(wall) > 1 else 0.0:.1f} | "
                         f"{statistics.fmean(r['finetune_cpu_seconds'] for r in runs):.1f} | "
                         f"{statistics.fmean(r['pipeline_seconds'] for r in runs):.1f} |")
    return "\n".join(lines)


def lora_ratio(results: dict) -> str:
    """APT's finetune wall time over LoRA's on the dense model, per seed (at each target)."""
    lora = {r["seed"]: r["finetune_wall_seconds"] for r in results["runs"] if r["method"] == LORA}
    parts = []
    for target in targets(results):
        ratios = [r["finetune_wall_seconds"] / lora[r["seed"]] for r in runs_of(results, "apt", target)
                  if r["seed"] in lora]
        if ratios:
            parts.append(f"{spread_text(ratios, '{:.2f}×')} at {target}")
    return ("APT's finetune time relative to LoRA on the dense model with the same steps (per seed, mean ± std): "
            + (", ".join(parts) if parts else "not measured") + " (the APT paper reports 1.06× on LLaMA-2-7B).")


def ablation_table(results: dict) -> str:
    """APT's variants at ABLATION_TARGET: perplexity over seeds, and the change against APT on the same seed."""
    lines = [f"| variant (target {ABLATION_TARGET}) | seeds | perplexity (mean ± std) | remaining | steps at final "
             "structure | vs APT, per seed (mean ± std) |", "|---|---:|---:|---:|---:|---:|"]
    for method in ("apt", *ABLATIONS):
        stat = summary(results, method, ABLATION_TARGET)
        if stat is None:
            continue
        runs = runs_of(results, method, ABLATION_TARGET)
        diffs = per_seed_change(results, method, "apt", ABLATION_TARGET) if method != "apt" else []
        change = spread_text(diffs, PERCENT) if diffs else "–"
        steps = statistics.fmean(run["final_structure_steps"] for run in runs)
        lines.append(f"| {ROWS[method].label} | {stat['n']} | {mean_spread(stat)} | "
                     f"{stat['fraction']:.3f} | {steps:.0f} | {change} |")
    return "\n".join(lines)


def criterion_schedule_table(results: dict) -> str:
    """Perplexity of each (criterion, schedule) pair at every target, with the same recovery."""
    pairs = list(CRITERION_BY_SCHEDULE.items())
    lines = ["| target | " + " | ".join(f"{criterion}, {schedule}" for (criterion, schedule), _ in pairs) + " |",
             "|---:|" + "---:|" * len(pairs)]
    for target in targets(results):
        cells = [mean_spread(stat) if (stat := summary(results, method, target)) else "–" for _, method in pairs]
        if any(cell != "–" for cell in cells):
            lines.append(f"| {target} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def no_recovery_table(results: dict) -> str:
    """Each criterion's one-shot cut of the dense model as cut (first seed), beside its row after recovery."""
    after = {"apt-raw": "apt", **{f"{c}-raw": c for c in EQUAL_RECOVERY}}
    lines = ["| target | " + " | ".join(ROWS[m].label for m in NO_RECOVERY) + " |",
             "|---:|" + "---:|" * len(NO_RECOVERY)]
    for target in targets(results):
        cells = []
        for method in NO_RECOVERY:
            raw, recovered = summary(results, method, target), summary(results, after[method], target)
            cells.append("–" if raw is None else f"{raw['mean']:.1f}" + ("" if recovered is None else
                                                                          f" → {recovered['mean']:.2f}"))
        if any(cell != "–" for cell in cells):
            lines.append(f"| {target} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def detail_table(results: dict) -> str:
    """Every run: size and shape, steps at its final structure, perplexity, finetune time."""
    lines = ["| target | row | seed | parameters | remaining | hidden / heads (KV) / neurons per layer × layers | "
             "steps at final structure | perplexity | finetune s |", "|---:|---|---:|---:|---:|---|---:|---:|---:|"]
    order = [*MAIN, *ABLATIONS, *NO_RECOVERY, LORA]
    dense_layers = results["settings"]["pretrain"]["num_layers"]  # records before depth pruning lack "layers"
    for run in sorted(results["runs"], key=lambda r: (-r["target"], order.index(r["method"]), r["seed"])):
        kept = run["kept"]
        lines.append(f"| {run['target']} | {ROWS[run['method']].label} | {run['seed']} | {run['params']:,} | "
                     f"{run['params'] / results['dense']['params']:.4f} | {kept['hidden']} / {kept['heads']} "
                     f"({kept['kv_heads']}) / {kept['neurons']} × {kept.get('layers', dense_layers)} | "
                     f"{run['final_structure_steps']} | "
                     f"{run['perplexity']:.2f} | {run['finetune_wall_seconds']:.1f} |")
    return "\n".join(lines)


def opt_in_line(parts: list[dict]) -> str:
    """How the wall time splits between the default study's parts and those that ran only opt-in rows."""
    opt_in = sum(part["wall_seconds"] for part in parts if part.get("opt_in"))
    if not opt_in:
        return ""
    default = sum(part["wall_seconds"] for part in parts) - opt_in
    return f"; the default study's parts {default / 60:.1f} min, the opt-in rows' (`--methods`) {opt_in / 60:.1f} min"


def setting_lines(results: dict) -> list[str]:
    settings, data, dense = results["settings"], results["data"], results["dense"]
    model, recovery = settings["pretrain"], settings["recovery"]
    parts = results.get("parts") or [{"command": results.get("command", "?"), "wall_seconds": results["wall_seconds"]}]
    return [
        *results["environment"],
        f"- wall time: **{sum(part['wall_seconds'] for part in parts) / 60:.1f} min** in {len(parts)} part(s) "
        f"({results['jobs']} pipelines at once, {results['threads']} torch thread each): "
        + "; ".join(f"`{part['command']}` {part['wall_seconds'] / 60:.1f} min" for part in parts)
        + f"; the runs' pipelines took {sum(run['pipeline_seconds'] for run in results['runs']) / 60:.1f} min in all "
        f"(one after another; a part that found a run's record reused it){opt_in_line(parts)}",
        f"- data: SentencePiece BPE (vocabulary {data['vocab_size']}) on `data/python-docs.jsonl`, seq_len "
        f"{data['seq_len']}: {data['train_blocks']} train blocks, {data['validation_blocks']} validation blocks",
        f"- model: LlamaForCausalLM, hidden {model['hidden_size']}, {model['num_layers']} layers, {model['num_heads']} "
        f"heads / {model['num_kv_heads']} KV heads, intermediate {model['intermediate_size']}: {dense['params']:,} "
        f"parameters ({dense['embedding_share']:.1%} in the embeddings and LM head), pretrained "
        f"{model['steps']} steps; dense held-out perplexity {dense['perplexity']:.2f}",
        f"- every row: the whole pipeline on one DeepSpeed rank (ZeRO-2, CPU, fp32), {recovery['steps']} steps × "
        f"{recovery['micro_batch_size']} sequences, adapters rank {recovery['rank']} on "
        f"{', '.join(recovery['adapter_targets'])}, lr {recovery['lr']}; the rows differ only as the ingredients "
        f"table says; seeds {', '.join(map(str, seeds(results)))} (run.seed: data order, adapter init, random "
        f"scores)",
        "- every export is scored by one function (token-weighted perplexity over all validation blocks); remaining "
        "= parameters of the exported model / dense parameters",
    ]


def report(results: dict, json_path: str, plot_path: str) -> str:
    return "\n".join([
        SECTION, "", *setting_lines(results), "",
        "What each row's recovery consisted of:", "", ingredients_table(results), "",
        "Held-out perplexity after recovery, mean ± std over seeds (mean remaining fraction); the last column is "
        "APT's perplexity relative to the best equal-recovery row, per seed, mean ± std (negative: APT lower):", "",
        quality_table(results), "", verdict(results), "",
        "Each criterion's cut before any recovery (one-shot scores of the dense model, one seed; → the row after its "
        "recovery, mean over seeds; APT's own row prunes gradually):", "", no_recovery_table(results), "",
        "Cost:", "", cost_table(results), "", lora_ratio(results), "",
        "Ablations of APT's defaults:", "", ablation_table(results), "",
        "Criterion or schedule: APT's salience and activation scores, each pruned gradually (APT's schedule) and "
        "one-shot, with the same recovery (mean ± std over seeds):", "", criterion_schedule_table(results), "",
        f"Every run (records: `{json_path}`; rebuilt by `python -m bench.study.run_study --from-results "
        f"{json_path}`):", "", detail_table(results), "", f"Plot: `{plot_path}`.", "",
    ])


def plot(results: dict, path: Path) -> None:
    """Mean held-out perplexity (± std over seeds) against the achieved remaining fraction, one line per row."""
    figure = Figure(figsize=(6.5, 4.2))  # no pyplot: no global state, no display
    axis = figure.subplots()
    for index, method in enumerate(MAIN):
        stats = [s for t in targets(results) if (s := summary(results, method, t)) is not None]
        if stats:
            stats.sort(key=lambda s: s["fraction"])
            axis.errorbar([s["fraction"] for s in stats], [s["mean"] for s in stats], yerr=[s["std"] for s in stats],
                          fmt="os^Dvx"[index] + "-", color=f"C{index}", capsize=3, label=ROWS[method].label)
    dense = results["dense"]["perplexity"]
    axis.axhline(dense, color="gray", linestyle=":")
    axis.plot([1.0], [dense], "*", color="black", markersize=10, label="dense")
    axis.set_xlabel("remaining parameters (fraction of the dense model)")
    axis.set_ylabel("held-out perplexity after recovery (lower is better)")
    axis.set_title(f"Pruning a {results['dense']['params'] / 1e6:.1f} M-parameter GQA LLaMA, every row through the "
                   f"pipeline (mean ± std over seeds)", fontsize=8)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
