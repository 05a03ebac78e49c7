"""What a preparation run reports: the end-of-run table on the command line and the Prefect artifact."""

from __future__ import annotations

from pipelines.dataset.layout import MANIFEST_PATH


def summary_text(summary: dict) -> str:
    """The end-of-run report printed on the command line."""
    lines = [f"prepared dataset: {summary['output']}",
             f"  {'clips requested':<22}{summary['requested']:>6}",
             f"  {'ok':<22}{summary['ok']:>6}  ({summary['ok_seconds']:.1f} s of video)",
             f"  {'failed':<22}{summary['failed']:>6}"]
    lines += [f"    {name:<20}{count:>6}" for name, count in summary["by_failure_class"].items()]
    lines += [f"  {f'shards[{split}]':<22}{count:>6}" for split, count in summary["shards"].items()]
    lines.append(f"  manifest: {summary['output'].rstrip('/')}/{MANIFEST_PATH}")
    return "\n".join(lines)


def summary_markdown(summary: dict) -> str:
    """The same report as a Prefect artifact."""
    rows = ["| status / failure class | clips |", "|---|---:|",
            f"| ok | {summary['ok']} |", f"| failed | {summary['failed']} |"]
    rows += [f"| failed: `{name}` | {count} |" for name, count in summary["by_failure_class"].items()]
    shards = ", ".join(f"{split}: {n}" for split, n in summary["shards"].items()) or "none"
    return (f"## Dataset preparation\n\nOutput `{summary['output']}`; {summary['ok_seconds']:.1f} s of "
            f"prepared video; shards {shards}.\n\n" + "\n".join(rows))

