"""The study's summary from whatever runs have finished: ``summary.json``, ``tables.md`` and the PNG plots.

``write_report(OUT)`` reads ``OUT/study.json`` and every ``OUT/runs/*/result.json`` and computes, per setting, the
mean, standard deviation and 95% t-interval over seeds (:mod:`morphcache.study.stats`) of k-NN and linear-probe
top-1 and of training wall time; per comparison of the plan, the paired differences over the seeds both
settings have finished. Q1 adds the cost of each cache (its share of the extraction, ``V`` views per image, plus
training) against the live teacher's training. ``morphcache study report --out OUT`` calls it.
"""

from __future__ import annotations

import json
from pathlib import Path

from morphcache.errors import ConfigError
from morphcache.study.stats import describe, format_interval, paired_difference

METRICS = ("knn_top1", "linear_top1")
METRIC_NAMES = {"knn_top1": "k-NN top-1 %", "linear_top1": "linear top-1 %"}
REFERENCES = {"teacher": "the teacher itself", "random": "random-weight student"}


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def load_results(out: Path) -> list[dict]:
    """Every finished run's ``result.json`` under ``out/runs``, with ``step_seconds_min`` / ``_median`` added from
    its ``metrics.jsonl`` (first step excluded: it pays the warm-up). On a machine shared with other jobs the
    fastest steps estimate the uncontended cost far better than the run's wall time."""
    import numpy as np

    results = []
    for p in sorted((out / "runs").glob("*/result.json")):
        r = json.loads(p.read_text())
        m = p.parent / "metrics.jsonl"
        steps = [json.loads(line)["step_s"] for line in m.read_text().splitlines()[1:] if line.strip()] if m.is_file() else []
        if steps:
            r["step_seconds_min"], r["step_seconds_median"] = float(np.min(steps)), float(np.median(steps))
        results.append(r)
    return results


def _by_setting(results: list[dict]) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = {}
    for r in results:
        out.setdefault(r["setting"]["key"], {})[int(r["seed"])] = r
    return out


def summarize(out: str | Path) -> dict:
    """The summary dict (see the module doc); raises ConfigError if ``out`` holds no study."""
    out = Path(out)
    study = _read(out / "study.json")
    if study is None:
        raise ConfigError(f"{out}: no study.json; run `morphcache study run --out {out}` first")
    results = load_results(out)
    runs = _by_setting(results)
    settings = {}
    for key, meta in study["settings"].items():
        seeds = runs.get(key, {})
        entry = {"label": meta["label"], "setting": meta, "seeds": sorted(seeds)}
        if seeds:
            for m in METRICS:
                entry[m] = describe([seeds[s][m] for s in sorted(seeds)])
            entry["train_seconds"] = describe([seeds[s]["train"]["wall_seconds"] for s in sorted(seeds)])
            fastest = [seeds[s].get("step_seconds_min") for s in sorted(seeds)]
            if all(f is not None for f in fastest):
                entry["step_seconds_min"] = describe(fastest)
            cpu = [seeds[s].get("train_cpu_seconds") for s in sorted(seeds)]
            if all(c is not None for c in cpu):
                entry["train_cpu_seconds"] = describe(cpu)
            entry["steps"] = max(seeds[s]["train"]["final_step"] for s in seeds)
        settings[key] = entry
    comparisons = []
    for c in study["comparisons"]:
        a, b = runs.get(c["a"], {}), runs.get(c["b"], {})
        row = dict(c)
        if set(a) & set(b):
            for m in METRICS:
                row[m] = paired_difference({s: a[s][m] for s in a}, {s: b[s][m] for s in b})
        comparisons.append(row)
    stores = {p.stem: json.loads(p.read_text()) for p in sorted((out / "stores").glob("*.json"))}
    summary = {"study": {k: study[k] for k in ("sizes", "data", "eval_dataset", "teacher", "student")},
               "finished_runs": len(results), "planned_runs": len(study["runs"]),
               "settings": settings, "comparisons": comparisons, "stores": stores,
               "noise": _read(out / "noise.json"), "q1": _q1(study, settings, comparisons, stores, runs)}
    for name in REFERENCES:
        ref = _read(out / f"{name}.json")
        summary[name] = {m: ref[m] for m in METRICS} if ref is not None else None
    return summary


def _seed_mean(seeds: dict[int, dict], use: list[int], value) -> float | None:
    """Mean of ``value(result)`` over the seeds ``use`` of one setting; None when a seed lacks the value."""
    values = [value(seeds[s]) for s in use]
    return sum(values) / len(values) if values and all(v is not None for v in values) else None


def _cost(seeds: dict[int, dict], use: list[int]) -> dict:
    """Wall, fastest-step and CPU seconds of one setting's training, means over the seeds ``use``."""
    return {"train_seconds": _seed_mean(seeds, use, lambda r: r["train"]["wall_seconds"]),
            "step_seconds_min": _seed_mean(seeds, use, lambda r: r.get("step_seconds_min")),
            "train_cpu_seconds": _seed_mean(seeds, use, lambda r: r.get("train_cpu_seconds"))}


def _q1(study: dict, settings: dict, comparisons: list[dict], stores: dict, runs: dict) -> dict | None:
    """Cost of each cache vs the live teacher, and the smallest V within noise of it.

    A cache's cost is averaged over the seeds the live teacher also ran (Q1's own pairs): a seed added for another
    question (Q2's extra V = 8 seeds, say) may have run under other load and does not enter Q1's cost."""
    if "q1" not in study["questions"]:
        return None
    live_key = next((k for k in study["questions"]["q1"] if settings[k]["setting"]["live"]), None)
    live_seeds = runs.get(live_key, {})
    live = _cost(live_seeds, sorted(live_seeds))
    per_view = stores.get("int8", {}).get("seconds_per_view")
    cpu_view = stores.get("int8", {}).get("cpu_seconds_per_view")
    n_images = study["sizes"]["images"]
    rows = []
    for key in study["questions"]["q1"]:
        seeds = runs.get(key, {})
        use = sorted(set(seeds) & set(live_seeds)) or sorted(seeds)
        if key == live_key or not use:
            continue
        cost = _cost(seeds, use)
        V = settings[key]["setting"]["views_used"]
        extract_s = per_view * n_images * V if per_view is not None else None
        total = cost["train_seconds"] + (extract_s or 0.0)
        row = {"setting": key, "views": V, "seeds": use, "train_seconds": cost["train_seconds"],
               "extract_seconds": extract_s, "total_seconds": total}
        if live["train_seconds"] is not None:
            row["live_over_cache_training"] = live["train_seconds"] / cost["train_seconds"]
            row["live_over_cache_total"] = live["train_seconds"] / total
        if cost["step_seconds_min"] is not None and live["step_seconds_min"] is not None:
            row["live_over_cache_fastest_step"] = live["step_seconds_min"] / cost["step_seconds_min"]
        if cost["train_cpu_seconds"] is not None and cpu_view is not None:
            row["train_cpu_seconds"] = cost["train_cpu_seconds"]
            row["extract_cpu_seconds"] = cpu_view * n_images * V
            row["total_cpu_seconds"] = row["train_cpu_seconds"] + row["extract_cpu_seconds"]
            if live["train_cpu_seconds"] is not None:
                row["live_over_cache_cpu_total"] = live["train_cpu_seconds"] / row["total_cpu_seconds"]
        cmp = next((c for c in comparisons if c["question"] == "q1" and c["a"] == key), None)
        if cmp is not None and all(m in cmp for m in METRICS):
            # within noise: every protocol's paired interval reaches 0 or lies above it
            row["within_noise_of_live"] = all(cmp[m]["ci_high"] is not None and cmp[m]["ci_high"] >= 0
                                              for m in METRICS)
        rows.append(row)
    within = [r["views"] for r in rows if r.get("within_noise_of_live")]
    return {"live": live_key, "live_train_seconds": live["train_seconds"],
            "live_train_cpu_seconds": live["train_cpu_seconds"], "caches": rows,
            "smallest_views_within_noise": min(within) if within else None}


def tables_markdown(summary: dict) -> str:
    """Markdown tables: every setting (mean ± 95% half-width, n seeds) and every paired comparison."""
    lines = [f"Finished runs: {summary['finished_runs']} of {summary['planned_runs']}.", "",
             "| setting | seeds | k-NN top-1 % | linear top-1 % | train wall s |", "|---|---|---|---|---|"]
    for key, s in summary["settings"].items():
        if "knn_top1" not in s:
            lines.append(f"| {s['label']} | 0 | - | - | - |")
            continue
        lines.append(f"| {s['label']} | {len(s['seeds'])} | {format_interval(s['knn_top1'])} | "
                     f"{format_interval(s['linear_top1'])} | {format_interval(s['train_seconds'], 0)} |")
    for name, label in REFERENCES.items():
        if summary.get(name):
            t = summary[name]
            lines.append(f"| {label} (reference) | - | {t['knn_top1']:.2f} | {t['linear_top1']:.2f} | - |")
    lines += ["", "Paired differences (same seed: same data order and masks), mean ± 95% half-width, points:", "",
              "| question | comparison | pairs | k-NN | linear | interval excludes 0 (k-NN, linear) |",
              "|---|---|---|---|---|---|"]
    for c in summary["comparisons"]:
        if "knn_top1" not in c:
            lines.append(f"| {c['question']} | {c['name']} | 0 | - | - | - |")
            continue
        k, li = c["knn_top1"], c["linear_top1"]
        lines.append(f"| {c['question']} | {c['name']} | {k['n']} | {format_interval(k)} | {format_interval(li)} | "
                     f"{k['excludes_zero']}, {li['excludes_zero']} |")
    q1 = summary.get("q1")
    if q1 and q1["caches"]:
        lines += ["", "Q1 cost (wall and CPU seconds, means over the seeds the live teacher also ran; extraction share = "
                  "V views per image of the store's extraction):",
                  "", "| V | extraction share s | training s | total s | live training / cache total | "
                  "CPU total s | live / cache, CPU | live / cache, fastest training step |",
                  "|---|---|---|---|---|---|---|---|"]

        def f(r, key, fmt="{:.0f}"):
            return fmt.format(r[key]) if r.get(key) is not None else "-"

        for r in q1["caches"]:
            lines.append(f"| {r['views']} | {f(r, 'extract_seconds')} | {f(r, 'train_seconds')} | "
                         f"{f(r, 'total_seconds')} | {f(r, 'live_over_cache_total', '{:.2f}')} | "
                         f"{f(r, 'total_cpu_seconds')} | {f(r, 'live_over_cache_cpu_total', '{:.2f}')} | "
                         f"{f(r, 'live_over_cache_fastest_step', '{:.2f}')} |")
        if q1["live_train_seconds"] is not None:
            lines.append(f"\nLive teacher training: {q1['live_train_seconds']:.0f} s. Smallest V within noise of the "
                         f"live teacher: {q1['smallest_views_within_noise']}.")
    if summary.get("noise"):
        n = summary["noise"]
        snr = f"{n['snr']:.3f} ({n['snr_db']:.1f} dB)" if n.get("snr") else "-"
        lines.append(f"\nQ4 noise: sigma {n['sigma']:.4g}, SNR {snr}, neighbour cosine {n['clean_cosine']:.3f} -> "
                     f"{n['noisy_cosine']:.3f} (target {n['target_cosine']}).")
    return "\n".join(lines) + "\n"


def write_report(out: str | Path) -> dict:
    """Write ``summary.json``, ``tables.md`` and the plots into ``out``; returns the summary."""
    from morphcache.study.plots import plot_accuracy_vs_views, plot_differences, plot_wall_time

    out = Path(out)
    summary = summarize(out)
    summary["plots"] = [str(p) for p in (plot_accuracy_vs_views(summary, out / "accuracy_vs_views.png"),
                                         plot_wall_time(summary, out / "wall_time.png"),
                                         plot_differences(summary, out / "paired_differences.png")) if p]
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "tables.md").write_text(tables_markdown(summary))
    return summary
