"""Score against budget, one line per method and a dashed line for the full cache, as kvpress's leaderboard draws it.
A perplexity panel draws perplexity on its own axis."""

from __future__ import annotations

from pathlib import Path

from kvtier.errors import InvalidArgumentError
from kvtier.eval.harness import AGREEMENT, FULL
from kvtier.eval.perplexity import PERPLEXITY

YLABELS = {AGREEMENT: "top-1 agreement", PERPLEXITY: "perplexity (lower is better)"}  # any other task: "accuracy"


def plot_scores(results: list[dict], path: str | Path) -> Path:
    """A panel per task (rows) and context length (columns) of ``kvtier eval`` results (several runs may be given): each
    method's score at each budget, and the full cache's. Needs matplotlib (``pip install kvtier[train]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InvalidArgumentError("plot_out", "needs matplotlib: pip install 'kvtier[train]' or matplotlib") from None
    cells = [c for r in results for c in r["cells"]]
    tasks = list(dict.fromkeys(c["task"] for c in cells))
    contexts = list(dict.fromkeys(c["context_tokens"] for c in cells))
    fig, axes = plt.subplots(len(tasks), len(contexts), figsize=(6.5 * len(contexts), 3.2 * len(tasks)), squeeze=False)
    for ax, (task, context) in zip(axes.flat, [(t, n) for t in tasks for n in contexts]):
        here = [c for c in cells if (c["task"], c["context_tokens"]) == (task, context)]
        if not here:
            ax.set_axis_off()
            continue
        value = "perplexity" if task == PERPLEXITY else "accuracy"
        full = next(c[value] for c in here if c["method"] == FULL)
        ax.axhline(full, color="black", linestyle="--", label=FULL)
        lines: dict[str, list[tuple[float, float]]] = {}
        for c in here:
            if c["method"] != FULL:
                name, budget = c["method"].rsplit(" @ ", 1)
                lines.setdefault(name, []).append((float(budget), c[value]))
        for i, (name, points) in enumerate(lines.items()):  # past ten lines the colours repeat: dotted then
            ax.plot(*zip(*sorted(points)), marker="o", color=f"C{i % 10}", linestyle="-" if i < 10 else ":", label=name)
        ax.set(title=f"{task}, {context} tokens", xlabel="budget (kept)", ylabel=YLABELS.get(task, "accuracy"))
        if task != PERPLEXITY:
            ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the panel, never over the lines
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
