"""report.md and the PNG plots, from results.json alone (so a report can be re-made from old results).

`offramp bench report bench-results/<timestamp>` rewrites report.md and the plots of that run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

META_KEYS = ("meta", "clients", "edge_step")


def profiles_of(results: dict) -> list[str]:
    return [k for k in results if k not in META_KEYS]


def _f(value, fmt: str = "{:.2f}", none: str = "–") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return none
    return fmt.format(value)


def _pct(value) -> str:
    return _f(value, "{:.1%}")


def mode_table(rows: list[dict]) -> list[str]:
    head = ("| mode | K | thr | codec | edge | loop | latency p50 / p90 (s) | TTFT p50 / p90 (s) | tok/s | latency × cloud-only"
            " | cloud layer-tokens × | cloud CPU s (×) | up B/tok | down B/tok | up B/position | exit rate | agreement | exact | errors"
            " | tok / round trip | drafts verified / kept / rejected | acceptance |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in rows:
        cpu = "–" if r.get("cloud_cpu_s") is None else f"{r['cloud_cpu_s']:.1f} ({_f(r.get('cloud_cpu_ratio'))})"
        lines.append(
            f"| {r['mode']} | {_f(r['exit_layer'], '{}')} | {_f(r['threshold'], '{:g}')} | {r['codec'] or '–'} | {r.get('edge_precision') or '–'}"
            f" | {r.get('loop') or '–'}"
            f" | {r['latency_p50_s']:.2f} / {r['latency_p90_s']:.2f} | {r['ttft_p50_s']:.3f} / {r['ttft_p90_s']:.3f}"
            f" | {r['tokens_per_s']:.1f} | {_f(r.get('latency_ratio'))} | {_f(r.get('cloud_compute_ratio'))} | {cpu}"
            f" | {r['bytes_up_per_token']:.0f} | {r['bytes_down_per_token']:.0f} | {_f(r.get('bytes_up_per_position'), '{:.0f}')}"
            f" | {_pct(r['exit_rate'])} | {_pct(r['agreement'])} | {_pct(r['exact_match'])} | {r['errors']}"
            f" | {_f(r.get('tokens_per_round_trip'))} | {_drafts(r)} | {_pct(r.get('acceptance_rate'))} |"
        )
    return lines


def _drafts(r: dict) -> str:
    if r["mode"] != "collaborative":
        return "–"
    return f"{r.get('drafted_tokens', 0)} / {r.get('accepted_drafts', 0)} / {r.get('rejected_drafts', 0)}"


def best_per_loop(rows: list[dict], min_agreement: float = 0.98) -> list[dict]:
    """cloud-only, edge-only, then per decode loop (lossless-fixed4 and -fixed8 are one loop) its fastest row at
    >= `min_agreement`, or where none gets there its most faithful one."""
    best: dict[str, dict] = {}

    def rank(r: dict) -> tuple:
        return (r["agreement"] < min_agreement, -r["agreement"] if r["agreement"] < min_agreement else 0.0, r["latency_p50_s"])

    for r in rows:
        if r["mode"] == "collaborative" and not r["errors"]:
            kind = "".join(c for c in r.get("loop") or "" if not c.isdigit())
            if kind not in best or rank(r) < rank(best[kind]):
                best[kind] = r
    return [r for r in rows if r["mode"] != "collaborative"] + sorted(best.values(), key=rank)


def headline_table(results: dict) -> list[str]:
    """Per profile, the default collaborative mode at each K and exit mode, against cloud-only in the same run."""
    lines = ["| profile | setting | latency × | TTFT × | tokens / round trip | acceptance | agreement | exact | cloud compute × | cloud CPU × | up B/token | fallback |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in profiles_of(results):
        for h in results[p].get("headline_rows") or []:
            lines.append(
                f"| {p} | {h['setting']} | {_f(h['latency_ratio'])} | {_f(h['ttft_ratio'])} | {_f(h['tokens_per_round_trip'])}"
                f" | {_pct(h['acceptance_rate'])} | {_pct(h['agreement'])} | {_pct(h['exact_match'])} | {_f(h['cloud_compute_ratio'])}"
                f" | {_f(h.get('cloud_cpu_ratio'))} | {_f(h['bytes_up_per_token'], '{:.0f}')} | {h['fallback_tokens']} |")
    return lines


def _cores(meta: dict) -> str:
    cores = meta.get("cores")
    if isinstance(cores, dict):
        return (f"**Edge and cloud pinned to different cores** (edge {cores.get('edge (this process)')}, cloud servers "
                f"{cores.get('cloud servers')}, link emulator {cores.get('link emulator')}), as different machines would be")
    return f"**Cloud and edge share this machine's {meta['cpu_count']} CPU cores**"


def summary_table(results: dict) -> list[str]:
    lines = ["| profile | K | thr | codec | edge | loop | agreement | latency × | cloud layer-tokens × | cloud CPU × | up B/token | up B/position (codec B; hidden size) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in profiles_of(results):
        s = results[p]["summary"]
        if s.get("exit_layer") is None:
            lines.append(f"| {p} | – | – | – | – | – | – | – | – | – | – | {s.get('note', '')} |")
            continue
        lines.append(
            f"| {p} | {s['exit_layer']} | {s['threshold']:g} | {s['codec']} | {s.get('edge_precision')} | {s.get('loop')}"
            f" | {_pct(s['agreement'])} | {_f(s['latency_ratio'])}"
            f" | {_f(s['cloud_compute_ratio'])} | {_f(s.get('cloud_cpu_ratio'))} | {_f(s['bytes_up_per_token'], '{:.0f}')}"
            f" | {_f(s.get('bytes_up_per_position'), '{:.0f}')} ({s.get('codec_bytes_per_position')}; {s.get('hidden_size')}) |"
        )
    return lines


def clients_table(clients: list[dict]) -> list[str]:
    lines = ["| clients | mode | requests | throughput tok/s | latency p50 (s) | latency p99 (s) | cloud CPU s | errors |",
             "|---|---|---|---|---|---|---|---|"]
    for c in clients:
        lines.append(f"| {c['clients']} | {c['mode']} | {c['requests']} | {c['throughput_tok_s']:.1f} | {_f(c['latency_p50_s'])}"
                     f" | {_f(c['latency_p99_s'])} | {_f(c.get('cloud_cpu_s'), '{:.1f}')} | {c['errors']} |")
    return lines


def edge_step_lines(edge_step: dict) -> list[str]:
    if not edge_step:
        return ["(not run)"]
    lines = [f"source: {edge_step.get('source')}" + (f" — {edge_step['note']}" if edge_step.get("note") else ""), ""]
    rows = edge_step.get("rows") or edge_step.get("results") or []
    if rows and isinstance(rows, list) and isinstance(rows[0], dict):
        keys = list(rows[0].keys())
        lines += ["| " + " | ".join(keys) + " |", "|" + "|".join(["---"] * len(keys)) + "|"]
        for r in rows:
            lines.append("| " + " | ".join(_f(r.get(k), "{:.3g}") if isinstance(r.get(k), float) else str(r.get(k)) for k in keys) + " |")
    else:
        lines += ["```", json.dumps({k: v for k, v in edge_step.items() if k != "source"}, indent=1)[:3000], "```"]
    return lines


def _load_samples(meta: dict) -> str:
    phases = meta.get("phases") or []
    return " (by phase: " + ", ".join(f"{p['phase']} {p['load1']:.1f} at {p['end_s']:.0f} s" for p in phases) + ")" if phases else ""


def write_report(results: dict, out: Path) -> None:
    meta = results["meta"]
    cfg = meta["config"]
    lines = [
        f"# offramp bench — {meta['created']}",
        "",
        f"Command: `{meta['command']}` (git {meta['git']}, {meta['elapsed_s']:.0f} s).",
        f"Model {meta['model']} ({meta['num_layers']} layers, hidden size {meta['hidden_size']}); "
        f"{len(meta['prompts'])} prompts ({meta['prompt_origin']}), {cfg['max_new_tokens']} new tokens, greedy.",
        f"Cloud: {meta['cloud']}. Edge runtime per K: {meta['edge_precision']}; exit rule: {meta['exit_rule']}.",
        *[f"Note: {n}" for n in meta.get("notes", [])],
        _cores(meta) + " (one intra-op thread per process, "
        f"for every mode); other work on the machine: load average {meta['loadavg_start'][0]:.1f} at start, "
        f"{meta['loadavg_end'][0]:.1f} at the end" + _load_samples(meta) + ". Links emulated in user space (offramp.bench.link_emulator).",
        f"Agreement is {meta['agreement_definition']}; exact = share of prompts whose whole output is the full model's greedy output.",
        "Ratios (×) are against cloud-only on the same profile in this run, per generated token; bytes are wire bytes",
        "through the emulator. Cloud layer-tokens count every position the cloud ran (prompt catch-up and re-uploads",
        "included); cloud CPU seconds are the server process's utime + stime, read from /proc around each request.",
        "`loop` (offramp.edge.decode_loop): `losslessN` emits nothing the cloud has not confirmed, speculating up to N",
        "drafts ahead with several verifications in flight (the controller picks the depth; `-fixedN` pins it);",
        "`exit` lets confident drafts exit at the threshold (`--no-lossless`), `exit-eager` uploads their states at once.",
        "tokens / round trip: emitted tokens per request the cloud answered; acceptance: checked drafts the cloud kept.",
        "",
        "## Headline: the default collaborative mode (lossless) at K ≤ N/2, and exit mode",
        "",
        *headline_table(results),
        "",
        "Targets on `wan` at K=15: latency ≤ 0.75× cloud-only, ≥ 2.5 tokens per round trip, ≥ 99.5% agreement (default codec).",
        "",
        "## Summary: best collaborative setting at ≥ 98% agreement",
        "",
        *summary_table(results),
        "",
        "Targets on `wan`: latency ≤ 0.75×, cloud compute ≤ 0.15×, bytes up per escalated position ≤ 1.1 × hidden size (int8).",
        "",
    ]
    for p in profiles_of(results):
        lines += [f"## Profile `{p}`", "", "Before and after: the baselines and each decode loop's fastest setting at ≥ 98% agreement (its most faithful one where none gets there).", "",
                  *mode_table(best_per_loop(results[p]["rows"])), "", "Every setting:", "", *mode_table(results[p]["rows"]), ""]
    if results.get("clients"):
        lines += [f"## Concurrent clients (profile `{cfg['clients_profile']}`)", "",
                  "Collaborative clients replay recorded edge traces (same uploads, edge compute slept): N edges are N devices,",
                  "so only the cloud's work lands on this machine. Cloud-only clients are streaming HTTP clients.", "",
                  *clients_table(results["clients"]), ""]
    lines += ["## Edge step micro-benchmark", "", *edge_step_lines(results.get("edge_step", {})), ""]
    plots = make_plots(results, out)
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    (out / "report.md").write_text("\n".join(lines))


def make_plots(results: dict, out: Path) -> list[Path]:
    """Latency vs agreement (Pareto) per profile, cloud compute saved, scaling with clients."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    profiles = profiles_of(results)
    fig, axes = plt.subplots(1, len(profiles), figsize=(5 * len(profiles), 4), squeeze=False)
    for ax, p in zip(axes[0], profiles):
        rows = results[p]["rows"]
        for r in rows:
            if r.get("latency_ratio") is None:
                continue
            marker = {"cloud-only": "s", "edge-only": "^"}.get(r["mode"], "o")
            ax.scatter(r["agreement"], r["latency_ratio"], marker=marker, label=r["key"] if r["mode"] != "collaborative" else None)
            if r["mode"] == "collaborative":
                ax.annotate(r["key"], (r["agreement"], r["latency_ratio"]), fontsize=6)
        ax.axvline(0.98, ls="--", c="gray", lw=0.8)
        ax.axhline(0.75, ls=":", c="red", lw=0.8)
        ax.set_title(f"{p}: latency vs agreement")
        ax.set_xlabel("agreement with full model")
        ax.set_ylabel("latency p50 × cloud-only")
        ax.legend(fontsize=7)
    fig.tight_layout()
    made.append(_save(fig, out / "pareto.png", plt))

    fig, ax = plt.subplots(figsize=(8, 4))
    p0 = "wan" if "wan" in profiles else profiles[0]
    collab = [r for r in results[p0]["rows"] if r["mode"] == "collaborative"]
    if collab:
        keys = [r["key"] for r in collab]
        ax.bar(range(len(collab)), [1 - (r.get("cloud_compute_ratio") or 0) for r in collab], label="layer-tokens saved")
        ax.plot(range(len(collab)), [1 - (r.get("cloud_cpu_ratio") or 0) for r in collab], "k.", label="cloud CPU seconds saved")
        ax.axhline(0.85, ls=":", c="red", lw=0.8)
        ax.set_xticks(range(len(collab)), keys, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("share of cloud-only compute saved")
        ax.set_title(f"cloud compute saved ({p0})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    made.append(_save(fig, out / "cloud_compute_saved.png", plt))

    clients = results.get("clients") or []
    if clients:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for mode in ("cloud-only", "collaborative"):
            rows = [c for c in clients if c["mode"] == mode]
            if not rows:
                continue
            xs = [c["clients"] for c in rows]
            a1.plot(xs, [c["throughput_tok_s"] for c in rows], "o-", label=mode)
            a2.plot(xs, [c["latency_p50_s"] for c in rows], "o-", label=f"{mode} p50")
            a2.plot(xs, [c["latency_p99_s"] for c in rows], "x--", label=f"{mode} p99")
        for a, t in ((a1, "throughput (tok/s)"), (a2, "request latency (s)")):
            a.set_xscale("log", base=2)
            a.set_xlabel("concurrent clients")
            a.set_ylabel(t)
            a.legend(fontsize=7)
        fig.tight_layout()
        made.append(_save(fig, out / "scaling.png", plt))
    return made


def _save(fig, path: Path, plt) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="offramp bench report", description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path, help="a run of the bench: bench-results/<timestamp> (holds results.json)")
    run_dir = p.parse_args(argv).run_dir
    write_report(json.loads((run_dir / "results.json").read_text()), run_dir)
    print(f"wrote {run_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
