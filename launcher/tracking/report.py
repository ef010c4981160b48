"""``gptforge report <run.dir>``: one PNG of a run from its metrics.jsonl — train and validation
loss, learning rate, and throughput against step (matplotlib, no display needed). The logging
rank also writes it at the end of a run with MLflow on and logs it as an artifact.
"""

from __future__ import annotations

from pathlib import Path

from gptforge.common.metrics_file import read_records, step_records

REPORT = "report.png"


def read_series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """step → value for each plotted key; a resumed run's repeated steps keep the newest."""
    series: dict[str, dict[int, float]] = {k: {} for k in ("loss", "val_loss", "lr",
                                                           "tokens_per_s")}
    for record in step_records(read_records(run_dir)):
        for key, values in series.items():
            if isinstance(record.get(key), (int, float)):
                values[int(record["step"])] = float(record[key])
    return {k: sorted(v.items()) for k, v in series.items()}


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """Write the PNG (default ``<run.dir>/report.png``); None when nothing was logged yet."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    series = read_series(run_dir)
    if not series["loss"]:
        return None
    fig = Figure(figsize=(12, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_lr, ax_tp = fig.subplots(1, 3)
    ax_loss.plot(*zip(*series["loss"]), label="train loss", lw=1.2)
    if series["val_loss"]:
        ax_loss.plot(*zip(*series["val_loss"]), "o-", label="validation loss", lw=1.2)
    ax_loss.set_title("loss")
    ax_loss.legend()
    if series["lr"]:
        ax_lr.plot(*zip(*series["lr"]), color="tab:green", lw=1.2)
    ax_lr.set_title("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if series["tokens_per_s"]:
        ax_tp.plot(*zip(*series["tokens_per_s"]), color="tab:red", lw=1.2)
    ax_tp.set_title("throughput (tokens/s)")
    for ax in (ax_loss, ax_lr, ax_tp):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    where = run_dir.resolve()
    fig.suptitle(f"{where.parent.name}/{where.name}")
    fig.tight_layout()
    path = Path(out) if out else run_dir / REPORT
    fig.savefig(path)
    return path
