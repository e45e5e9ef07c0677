"""Pretty-print one `offramp generate --json` result: the text, who decided each token, and the statistics."""

import json
import sys


def main() -> None:
    result = json.load(sys.stdin)
    stats = result["stats"]
    print(f"\n{result['text']}\n")
    marks = {"edge": ".", "cloud": "C", "edge-fallback": "F"}
    print("token sources (C confirmed or decided by the cloud, . exited at the edge, F edge-fallback):",
          "".join(marks[s] for s in result["sources"]))
    kind = " lossless" if result.get("lossless") else " exit mode" if result["mode"] == "collaborative" else ""
    print(f"mode {result['mode']}{kind}, exit layer {result['exit_layer']}, edge graph {result.get('edge_precision', '-')}, "
          f"codec {result.get('codec', '-')}")
    rule = result.get("exit_rule")
    if rule:
        print(f"exit head {rule['head']}, rule {rule['rule']}, threshold {rule['threshold']:.3f} ({rule['threshold_source']})")
    rows = [
        ("tokens", stats["tokens"]),
        ("edge exits", f"{stats['edge_exits']} ({stats['edge_exits'] / max(stats['tokens'], 1):.0%})"),
        ("cloud tokens", stats["escalations"]),
        ("fallback tokens", stats["fallback_tokens"]),
        ("edge drafts", f"{stats['accepted_drafts']} accepted, {stats['rejected_drafts']} rejected "
         f"(acceptance {stats['accepted_drafts'] / max(stats['accepted_drafts'] + stats['rejected_drafts'], 1):.0%})"),
        ("round trips", f"{stats['round_trips']} ({stats['tokens'] / max(stats['round_trips'], 1):.2f} tokens each; "
         f"{stats['stale_requests']} stale)"),
        ("bytes up / down", f"{stats['bytes_up']} / {stats['bytes_down']}"),
        ("cloud layer-tokens", f"{stats['cloud_layer_tokens']} of {stats['full_layer_tokens']} "
         f"({stats['cloud_layer_tokens'] / max(stats['full_layer_tokens'], 1):.0%} of cloud-only)"),
        ("time to first token", f"{stats['ttft_s'] * 1000:.0f} ms"),
        ("wall time", f"{stats['wall_s']:.2f} s ({stats['tokens'] / max(stats['wall_s'], 1e-9):.1f} tok/s)"),
    ]
    for name, value in rows:
        print(f"  {name:<20} {value}")


if __name__ == "__main__":
    main()
