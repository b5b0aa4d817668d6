"""The figures as pictures, drawn from results.json's dictionary (matplotlib, Agg backend).

* ``scaling.png``: freeze latency, thaw latency and hold overhead (rows) against the
  number of targets, per database (columns), quiesce beside the baseline, medians with
  the p95 as a thin line above;
* ``rehearsal.png``: per host and database, the writers' wait in one host cycle split
  into quiesce's parts and the host's parts.
"""

from __future__ import annotations

from pathlib import Path

from report import KIND_LABEL, KIND_ORDER
from rehearsal import PARTS

METRICS = (("freeze_ms", "freeze latency"), ("thaw_ms", "thaw latency"),
           ("hold_overhead_ms", "hold overhead"))
SCALING = "scaling.png"
REHEARSAL = "rehearsal.png"


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt
    return plt


def _series(r: dict, kind: str, variant: str, metric: str) -> tuple[list, list, list]:
    figs = sorted((f for f in r["figures"] if f["kind"] == kind and f["variant"] == variant
                   and f.get(metric)), key=lambda f: f["targets"])
    return ([f["targets"] for f in figs], [f[metric]["median"] for f in figs],
            [f[metric]["p95"] for f in figs])


def scaling(r: dict, out_dir: Path) -> str | None:
    """Draw scaling.png; its file name, or None when there is nothing to draw."""
    kinds = [k for k in KIND_ORDER if any(f["kind"] == k for f in r["figures"])]
    if not kinds:
        return None
    plt = _pyplot()
    from matplotlib import ticker
    fig, axes = plt.subplots(len(METRICS), len(kinds), figsize=(4 * len(kinds), 9),
                             squeeze=False)
    for col, kind in enumerate(kinds):
        variants = sorted({(f["tool"] != "baseline", f["variant"], f["label"])
                           for f in r["figures"] if f["kind"] == kind})
        for row, (metric, name) in enumerate(METRICS):
            ax = axes[row][col]
            for i, (_, variant, label) in enumerate(variants):
                ns, med, p95 = _series(r, kind, variant, metric)
                if not ns:
                    continue
                base = variant == "baseline"
                color = "black" if base else f"C{i}"
                ax.plot(ns, med, "--" if base else "-", color=color, marker="o", label=label)
                ax.plot(ns, p95, "--" if base else "-", color=color, alpha=0.3, linewidth=1)
            if not ax.lines:
                ax.text(0.5, 0.5, "n/a: never blocks writers", ha="center", va="center",
                        transform=ax.transAxes)
            ax.set_xscale("log", base=2)  # N doubles; ms stay linear (they can be ≤ 0)
            ax.xaxis.set_minor_locator(ticker.NullLocator())
            ax.set_xticks(r["settings"]["targets"], [str(n) for n in r["settings"]["targets"]])
            ax.set_title(f"{KIND_LABEL[kind]}: {name}", fontsize=10)
            ax.set_xlabel("targets")
            ax.set_ylabel("ms (median; p95 faint)")
            ax.set_ylim(bottom=min(0, ax.get_ylim()[0]))
            ax.grid(True, alpha=0.3)
            if row == 0:
                ax.legend(fontsize=8)
    fig.suptitle(f"quiesce against the shell baseline ({r['mode']} run, {r['date'][:10]}, "
                 f"{r['machine']['cpus']} CPUs)")
    fig.tight_layout()
    fig.savefig(out_dir / SCALING, dpi=90)
    plt.close(fig)
    return SCALING


def rehearsals(r: dict, out_dir: Path) -> str | None:
    """Draw rehearsal.png (stacked bars, one per host and database), or None."""
    found = [h for h in r.get("rehearsals") or [] if h.get("median_ms")]
    if not found:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 2.2 + 0.6 * len(found)))
    labels = [f"{h['host']} (poll {h.get('poll_s', '?')} s), {KIND_LABEL[h['kind']]}, "
              f"N={h['targets']}" for h in found]
    left = [0.0] * len(found)
    for key, label in PARTS:
        widths = [h["median_ms"][key] for h in found]
        ax.barh(labels, widths, left=left, label=label,
                hatch="//" if key.startswith("quiesce") else None)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_xlabel("ms writers are blocked in one host cycle (medians)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=2)
    fig.tight_layout()
    fig.savefig(out_dir / REHEARSAL, dpi=90)
    plt.close(fig)
    return REHEARSAL


def draw(r: dict, out_dir: Path) -> dict:
    """Every picture; what was drawn, or the one-line reason it could not be."""
    try:
        return {"scaling": scaling(r, out_dir), "rehearsal": rehearsals(r, out_dir)}
    except ImportError as e:
        return {"error": f"no plot: {e} (install the bench extra: pip install -e '.[bench]')"}


def section(r: dict) -> list[str]:
    """RESULTS.md's pictures."""
    plots = r.get("plots") or {}
    lines = ["## Scaling curves", ""]
    if plots.get("error"):
        return lines + [plots["error"], ""]
    if plots.get("scaling"):
        lines += [f"![freeze latency, thaw latency and hold overhead against the number of "
                  f"targets]({plots['scaling']})", ""]
    if plots.get("rehearsal"):
        lines += [f"![whose part of the writers' wait in one host cycle]({plots['rehearsal']})",
                  ""]
    return lines
