"""`worldmodels report`: one page per run — the results table, learning curves and pictures.

`report.md` links the images beside it; `report.html` embeds them (base64), so the one file can
be mailed or attached. Missing parts (a stage not run yet) are reported as missing, not guessed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from worldmodels.config import option
from worldmodels.errors import UserError
from worldmodels.html_page import markdown_to_html
from worldmodels.io import atomic_write_text
from worldmodels.layout import RunDir
from worldmodels.metrics import read_metrics
from worldmodels.provenance import stale_stages
from worldmodels.search import describe_finalist, kept_finalist
from worldmodels.viz import new_figure, plot_metrics, plot_search, save_figure

REFERENCE = {
    "vae_sse": 19.5,
    "mdn_nll": 36.0,
    "best_generation": 881,
    "eval": "325 (5 episodes, 500-step cap)",
}


@dataclass
class ReportConfig:
    run_dir: Path = option(Path("runs/default"), "run directory to report on")


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _fmt(value, digits: int = 1) -> str:
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return "—" if value is None else str(value)


def _plot_curves(layout: RunDir, out: Path) -> Path | None:
    """Three panels: VAE losses, MDN-RNN losses, CMA-ES best/mean per generation (+σ)."""
    vae = read_metrics(layout.vae / "metrics.jsonl")
    mdn = read_metrics(layout.mdnrnn / "metrics.jsonl")
    ctrl = read_metrics(layout.controller / "metrics.jsonl")
    if not (vae or mdn or ctrl):
        return None
    fig, axes = new_figure(1, 3, (15, 4))
    plot_metrics(axes[0], vae, "epoch", ["train_sse", "val_sse"], "V: summed squared error / image")
    plot_metrics(axes[1], mdn, "epoch", ["train_nll", "val_nll"], "M: NLL per latent dim")
    kept = _json(layout.controller / "selection.json")
    plot_search(axes[2], ctrl, kept["generation"] if kept else None)
    return save_figure(fig, out)


def collect_figures(layout: RunDir) -> dict:
    vae_meta = _json(layout.vae / "model.json") or {}
    mdn_rows = [r for r in read_metrics(layout.mdnrnn / "metrics.jsonl") if "val_nll" in r]
    mdn_last = mdn_rows[-1] if mdn_rows else {}
    ctrl = read_metrics(layout.controller / "metrics.jsonl")
    evaluation = _json(layout.eval / "eval.json") or {}
    run_meta = _json(layout.root / "run.json") or {}
    return {
        "vae_sse": vae_meta.get("val_sse"),
        "vae_mse": vae_meta.get("val_mse"),
        "mdn_nll": mdn_last.get("val_nll"),
        "mdn_nll_sum": mdn_last.get("val_nll_sum"),
        "best_generation": max((r["best"] for r in ctrl), default=None),
        "selection": _json(layout.controller / "selection.json"),
        "generations": len(ctrl),
        "eval": evaluation,
        "dreamed": _json(layout.eval / "dream.json"),
        "stages": run_meta.get("stages", {}),
        "rates": stage_rates(layout, evaluation),
        "preset": run_meta.get("preset"),
        "round": run_meta.get("round"),
    }


def results_table(fig: dict) -> str:
    ev = fig["eval"]
    proto = ev.get("protocol", {})
    eval_cell = (
        f"**{ev['mean']:.1f} ± {ev['std']:.1f}** over {proto['episodes']} official tracks "
        f"(seeds {proto['seeds'][0]}–{proto['seeds'][1]}, {proto['max_steps']}-step limit)"
        if ev
        else "—"
    )
    rows = [
        (
            "VAE: summed squared error per image (held-out)",
            _fmt(fig["vae_sse"], 2),
            REFERENCE["vae_sse"],
        ),
        ("VAE: per-pixel MSE (held-out)", _fmt(fig["vae_mse"], 5), "—"),
        ("MDN-RNN: NLL per latent dim (held-out)", _fmt(fig["mdn_nll"], 3), "—"),
        (
            "MDN-RNN: NLL summed over z (held-out)",
            _fmt(fig["mdn_nll_sum"], 2),
            REFERENCE["mdn_nll"],
        ),
        (
            f"Controller: best generation return ({fig['generations']} generations)",
            _fmt(fig["best_generation"]),
            REFERENCE["best_generation"],
        ),
        ("Controller kept", _kept_cell(fig), "—"),
        ("Evaluation mean ± std", eval_cell, REFERENCE["eval"]),
        ("Fraction of tracks ≥ 900", _fmt(ev.get("fraction_solved"), 2) if ev else "—", "—"),
        ("The same controller in M's dream (its predicted return)", _dreamed_cell(fig), "—"),
        ("M's reward head along the real drives (the dream's reward)", _m_reward_cell(fig), "—"),
    ]
    lines = ["| figure | this run | reference |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def _dreamed_cell(fig: dict) -> str:
    dreamed = fig["dreamed"]
    if not dreamed:
        return "—"
    return (
        f"{dreamed['mean']:.1f} ± {dreamed['std']:.1f} over {len(dreamed['returns'])} dreams "
        f"(τ = {dreamed['temperature']:g}), against {fig['eval'].get('mean', float('nan')):.1f} "
        "on real tracks"
    )


def _m_reward_cell(fig: dict) -> str:
    quality = fig["eval"].get("m_reward")
    if not quality:
        return "—"
    corr = quality["correlation"]
    return (
        f"predicts {quality['mean_expected']:.1f} per track where the drives earned "
        f"{quality['mean_real']:.1f}; correlation over tracks "
        + ("—" if corr is None else f"{corr:.2f}")
    )


def _kept_cell(fig: dict) -> str:
    """Which CMA-ES mean was evaluated, and how it won the final selection."""
    kept = fig["selection"]
    if not kept:
        return "the last CMA-ES mean" if fig["generations"] else "—"
    won, official = kept_finalist(kept), fig["eval"].get("mean")
    gap = (
        "" if official is None else f" ({official - won['select_mean']:+.1f} on the official ones)"
    )
    return (
        f"{describe_finalist(won)}: {won['select_mean']:.1f} ± "
        f"{won['select_std']:.1f} on {kept['episodes']} held-out training-backend tracks{gap}, "
        f"best of {len(kept['finalists'])} finalists"
    )


def _mean_of(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if key in r]
    return sum(values) / len(values) if values else None


def stage_rates(layout: RunDir, evaluation: dict) -> dict[str, str]:
    """A throughput per stage, from what each stage logged."""
    vae = _mean_of(read_metrics(layout.vae / "metrics.jsonl"), "img_per_s")
    mdn = _mean_of(read_metrics(layout.mdnrnn / "metrics.jsonl")[1:], "seq_per_s")
    ctrl = _mean_of(read_metrics(layout.controller / "metrics.jsonl"), "steps_per_s")
    units = {"vae": (vae, "img/s"), "mdnrnn": (mdn, "seq/s"), "controller": (ctrl, "env steps/s")}
    units["evaluate"] = (evaluation.get("steps_per_s"), "env steps/s")
    return {key: f"{rate:,.0f} {unit}" for key, (rate, unit) in units.items() if rate}


def stage_table(stages: dict, rates: dict[str, str]) -> str:
    if not stages:
        return "_No stage timings (run `worldmodels run` to record them)._"
    lines = ["| stage | wall time | throughput |", "|---|---|---|"]
    for name, info in stages.items():
        cut = (
            f" (the run's budget left it {info['budget_min']:g} min)"
            if "budget_min" in info
            else ""
        )
        wall = f"{info.get('wall_s', 0) / 60:.1f} min{cut}"
        lines.append(f"| {name} | {wall} | {rates.get(name, '—')} |")
    total = sum(info.get("wall_s", 0) for info in stages.values())
    lines.append(f"| **total** | **{total / 60:.1f} min** | |")
    return "\n".join(lines)


def failure_analysis(fig: dict, worst: int = 5) -> str:
    """How the laps ended: finished, timed out with tiles missed, or off the playfield; the worst
    tracks; and the kept agent's score on training-backend (envpool) tracks beside the official."""
    ev = fig["eval"]
    episodes = ev.get("episodes", [])
    if not episodes or ev.get("fraction_laps") is None:
        return "_Needs an evaluation on the official env (`worldmodels evaluate`)._"
    ends = [e["end"] for e in episodes]
    lines = [
        f"- Laps finished: **{ev['fraction_laps']:.0%}** of {len(episodes)} tracks"
        + (f", in {ev['lap_steps_mean']:.0f} steps on average" if ev["lap_steps_mean"] else ""),
        f"- Timed out with tiles missed: {ends.count('timeout')}; off the playfield: "
        f"{ends.count('off_playfield')}; tiles missed per track: {ev['tiles_missed_mean']:.1f} "
        "on average",
        f"- Tracks below 600: {ev['fraction_below_600']:.0%}",
    ]
    if kept := fig["selection"]:
        won = kept_finalist(kept)
        lines.append(
            f"- Kept agent on {kept['episodes']} held-out training-backend tracks: "
            f"{won['select_mean']:.1f}; on the official tracks: {ev['mean']:.1f} "
            f"(gap {ev['mean'] - won['select_mean']:+.1f})"
        )
    lines += [
        "",
        "| worst tracks: seed | return | steps | end | tiles missed |",
        "|---|---|---|---|---|",
    ]
    for e in sorted(episodes, key=lambda e: e["return"])[:worst]:
        lines.append(
            f"| {e['seed']} | {e['return']:.1f} | {e['steps']} | {e['end']} | "
            f"{e['tiles_missed']} of {e['tiles']} |"
        )
    return "\n".join(lines)


def stale_warning(root: Path) -> list[str]:
    """Stages whose inputs changed after they ran (V retrained, say): their results are stale."""
    stale = stale_stages(root)
    if not stale:
        return []
    which = "; ".join(f"`{cmd}` (since: {', '.join(files)})" for cmd, files in stale.items())
    return [
        f"**Out of date.** These stages ran on inputs that have changed since: {which}. "
        "Rerun `worldmodels run` with the same settings to bring them up to date.",
        "",
    ]


def _round_line(meta: dict | None) -> str:
    if not meta:
        return ""
    return (
        f" A round after `{meta['from']}`: its {meta['episodes_before']} episodes and "
        f"{meta['episodes']} its agent drove (noise {meta['agent_noise']}); its V; M, C trained again."
    )


def build_markdown(layout: RunDir, fig: dict, images: dict[str, Path]) -> str:
    parts = [f"# World Models run: `{layout.root}`", ""]
    if fig["preset"]:
        parts += [f"Preset: `{fig['preset']}`." + _round_line(fig["round"]), ""]
    parts += stale_warning(layout.root)
    parts += ["## Results", "", results_table(fig), ""]
    parts += ["## How the laps ended", "", failure_analysis(fig), ""]
    parts += ["## Wall time per stage", "", stage_table(fig["stages"], fig["rates"]), ""]
    captions = {
        "curves": "Learning curves",
        "reconstructions": "V: held-out frames (top) and reconstructions; prior samples",
        "traversal": "V: latent traversal",
        "dream": "M: real (left) vs dream (right)",
        "latent_error": "M: latent error over the dream horizon",
        "best": "C: best evaluation track",
        "worst": "C: worst evaluation track",
        "dream_drive": "C driving inside M's dream (decoded by V)",
    }
    for key, caption in captions.items():
        if key in images:
            rel = images[key].relative_to(layout.root)
            parts += [f"### {caption}", "", f"![{caption}]({rel.as_posix()})", ""]
    return "\n".join(parts)


def find_images(layout: RunDir) -> dict[str, Path]:
    candidates = {
        "reconstructions": layout.vae / "reconstructions.png",
        "traversal": layout.vae / "traversal.png",
        "dream": layout.dream / "dream.gif",
        "latent_error": layout.dream / "latent_error.png",
        "dream_drive": layout.eval / "dream_drive.gif",
    }
    images = {k: p for k, p in candidates.items() if p.exists()}
    for key in ("best", "worst"):
        if found := sorted(layout.eval.glob(f"{key}_seed*.gif")):
            images[key] = found[0]
    return images


def run(cfg: ReportConfig) -> Path:
    layout = RunDir(cfg.run_dir)
    if not layout.root.exists():
        raise UserError(f"run dir {layout.root} does not exist: run `worldmodels run` first")
    images = find_images(layout)
    curves = _plot_curves(layout, layout.root / "learning_curves.png")
    if curves is not None:
        images = {"curves": curves, **images}
    markdown = build_markdown(layout, collect_figures(layout), images)
    atomic_write_text(layout.root / "report.md", markdown)
    atomic_write_text(layout.root / "report.html", markdown_to_html(markdown, layout.root))
    return layout.root / "report.md"
