"""`python -m generation report`: figures and a Markdown summary of one extracted dataset.

The report measures two things in a dataset directory: does the model follow the instruction
(how often it writes exactly the requested count), and can a linear probe read the number of tokens
left from each layer's hidden states. matplotlib, scikit-learn and scipy come from the optional
`report` extra and are imported only when a report is made.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from length_probe import (
    ALL_LAYERS,
    CONFIG_NAMES,
    DEFAULT_SPLIT_SEED,
    DEFAULT_VALIDATION_FRACTION,
    METADATA_FILE,
    build_dataset,
    load_manifest,
    read_json,
)

from .probes import (
    LOG_TARGET,
    RAW_TARGET,
    TARGETS,
    ReportError,
    check_finite,
    fit_probes,
    probe_targets,
    read_layer,
    require_report_extras,
)

logger = logging.getLogger(__name__)

# NOTE: a starting point, not a tuned value. With standardised features and thousands of rows it
# regularises lightly, so sweep --alpha before reading much into small differences between layers.
DEFAULT_ALPHA = 1.0
REPORT_FILE = "report.md"
# Below this many validation samples the report warns that its scores are unreliable. The number is a
# judgement, not a measured limit.
FEW_VALIDATION_SAMPLES = 10
FIGURE_DPI = 120
PRODUCED_COUNT_DEFINITION = (
    "the number of whitespace-separated words in `completion_text` (the decoded completion without its end token)"
)
TARGET_DESCRIPTIONS = {
    RAW_TARGET: "`remaining_tokens`, scored in tokens",
    LOG_TARGET: "`log(remaining_tokens + 1)`, scored on that log scale",
}
FIGURES = {
    "remaining_tokens": "remaining_tokens.png",
    "completion_lengths": "completion_lengths.png",
    "requested_vs_produced": "requested_vs_produced.png",
    "layer_norms": "layer_norms.png",
    "probe_scores": "probe_scores.png",
}


# ---------------------------------------------------------------- command line


def add_report_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write figures and a Markdown summary of an extracted dataset",
        description="Load a dataset directory through the length_probe builder, measure how often the model "
        "wrote exactly the requested count, and fit one ridge probe per layer that predicts remaining_tokens "
        f"and log(remaining_tokens + 1). Writes PNG figures and {REPORT_FILE} to --output-dir. "
        'Needs the report extra: pip install -e ".[report]".',
    )
    parser.add_argument("--data-dir", type=Path, required=True, help="a directory written by `python -m generation extract`")
    parser.add_argument("--output-dir", type=Path, required=True, help=f"directory for the figures and {REPORT_FILE}")
    parser.add_argument("--config", default=ALL_LAYERS, choices=CONFIG_NAMES,
                        help=f"which hidden states to probe (default: {ALL_LAYERS})")
    parser.add_argument("--cache-dir", default=None,
                        help="cache directory of the datasets library (default: $HF_DATASETS_CACHE or ~/.cache/huggingface/datasets)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SPLIT_SEED,
                        help=f"seed of the train/validation split of samples (default: {DEFAULT_SPLIT_SEED})")
    parser.add_argument("--validation-fraction", type=_fraction, default=DEFAULT_VALIDATION_FRACTION,
                        help=f"share of samples, not rows, held out for scoring (default: {DEFAULT_VALIDATION_FRACTION})")
    parser.add_argument("--alpha", type=_positive_float, default=DEFAULT_ALPHA,
                        help=f"ridge regularisation strength on standardised features (default: {DEFAULT_ALPHA})")
    parser.set_defaults(handler=run_report)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"invalid fraction {text!r}: expected a number between 0 and 1, e.g. 0.1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0.0):
        raise argparse.ArgumentTypeError(f"invalid alpha {text!r}: expected a finite number above 0, e.g. 1.0")
    return value


def run_report(args) -> int:
    try:
        result = write_report(
            args.data_dir,
            args.output_dir,
            config_name=args.config,
            cache_dir=args.cache_dir,
            seed=args.seed,
            validation_fraction=args.validation_fraction,
            alpha=args.alpha,
        )
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(result["report"])
    for path in result["figures"].values():
        print(path)
    return 0


# ---------------------------------------------------------------- the report


def write_report(
    data_dir: str | Path,
    output_dir: str | Path,
    *,
    config_name: str = ALL_LAYERS,
    cache_dir: str | None = None,
    seed: int = DEFAULT_SPLIT_SEED,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    alpha: float = DEFAULT_ALPHA,
) -> dict:
    """Write the figures and report.md for one config of a dataset directory, and return the numbers.

    The returned dict contains the exact-count rate and the mean hidden-state norm per layer. It also
    contains the validation R², MAE and Spearman correlation of a ridge probe per layer and target,
    keyed by the layer numbers of metadata.json (1 is the first decoder layer). Rows of truncated completions are left out
    of the probes, the norms and the remaining_tokens histogram, because their remaining_tokens is only
    a lower bound. Raises DatasetIntegrityError for a missing or damaged directory and ReportError for
    missing libraries or too few rows.
    """
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"invalid alpha {alpha!r}: expected a finite number above 0, e.g. 1.0")
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise ReportError(f"output path {str(output_dir)!r} is a file; pass a directory to --output-dir")
    require_report_extras()
    started = time.perf_counter()
    data_dir, output_dir = Path(data_dir), Path(output_dir)

    # ---- data: the manifest first, because its error names the extract command
    manifest = load_manifest(data_dir)
    dataset = build_dataset(
        config_name, data_dir, cache_dir=cache_dir, seed=seed, validation_fraction=validation_fraction
    )
    metadata = read_json(data_dir / config_name / METADATA_FILE)
    layers = [int(layer) for layer in metadata["layers"]]
    hidden_size = int(metadata["hidden_size"])
    if metadata["values_per_row"] != len(layers) * hidden_size:
        raise ReportError(
            f"{data_dir / config_name / METADATA_FILE}: values_per_row is {metadata['values_per_row']}, not "
            f"{len(layers)} layers x {hidden_size}; re-run the extraction"
        )
    train, validation = dataset["train"], dataset["validation"]
    train_labels, validation_labels = RowLabels.read(train), RowLabels.read(validation)
    validation_samples = len(validation.unique("sample_id"))
    if validation_samples < FEW_VALIDATION_SAMPLES:
        logger.warning(
            "The validation split has only %d sample(s), so its probe scores are unreliable; extract more "
            "prompts, or raise --validation-fraction", validation_samples,
        )

    # ---- instruction following, from every sample in the manifest
    following = InstructionFollowing.from_samples(manifest["samples"])

    # ---- probes and norms, one layer at a time to bound memory
    train_targets = probe_targets(train_labels.remaining[train_labels.usable])
    validation_targets = probe_targets(validation_labels.remaining[validation_labels.usable])
    layer_norms, probes = {}, {}
    for position, layer in enumerate(tqdm(layers, desc="Probing layers", unit="layer")):
        shape = {"layer_count": len(layers), "hidden_size": hidden_size}
        train_features = read_layer(train, position, rows=train_labels.usable, **shape)
        validation_features = read_layer(validation, position, rows=validation_labels.usable, **shape)
        check_finite(train_features, layer)
        check_finite(validation_features, layer)
        layer_norms[layer] = _mean_norm(train_features, validation_features)
        scores = fit_probes(train_features, train_targets, validation_features, validation_targets, alpha=alpha)
        probes[layer] = {target: score.as_dict() for target, score in zip(TARGETS, scores)}
        del train_features, validation_features

    # The prompt's count and the token's position are known without any hidden state, and
    # remaining_tokens is close to a linear function of them when the model follows the instruction.
    baseline_scores = fit_probes(
        train_labels.prompt_features()[train_labels.usable],
        train_targets,
        validation_labels.prompt_features()[validation_labels.usable],
        validation_targets,
        alpha=alpha,
    )

    result = {
        "data_dir": str(data_dir),
        "config_name": config_name,
        "model": metadata.get("model"),
        "layers": layers,
        "hidden_size": hidden_size,
        "alpha": alpha,
        "seed": seed,
        "validation_fraction": validation_fraction,
        "rows": {
            "train": int(train_labels.usable.sum()),
            "validation": int(validation_labels.usable.sum()),
            "validation_samples": validation_samples,
            "truncated_left_out": int((~train_labels.usable).sum() + (~validation_labels.usable).sum()),
        },
        **following.summary(),
        "layer_norms": layer_norms,
        "probes": probes,
        "baseline": {target: score.as_dict() for target, score in zip(TARGETS, baseline_scores)},
        "best_layer": _best_layer(probes),
        "last_layer": layers[-1],
    }

    # ---- figures and report.md
    output_dir.mkdir(parents=True, exist_ok=True)
    remaining = np.concatenate([train_labels.remaining[train_labels.usable], validation_labels.remaining[validation_labels.usable]])
    result["figures"] = _draw_figures(output_dir, result, remaining, following)
    report_path = output_dir / REPORT_FILE
    report_path.write_text(render_markdown(result), encoding="utf-8")
    result["report"] = str(report_path)
    result["seconds"] = round(time.perf_counter() - started, 2)
    _log_summary(result)
    return result


@dataclasses.dataclass
class RowLabels:
    """The per-row columns of one split that the report needs, without the hidden states."""

    remaining: np.ndarray
    step: np.ndarray
    count: np.ndarray
    usable: np.ndarray  # rows of completions that ended, whose remaining_tokens is exact

    @classmethod
    def read(cls, split) -> "RowLabels":
        columns = split.with_format("numpy", columns=["remaining_tokens", "step", "count", "is_truncated"])[:]
        return cls(
            remaining=np.asarray(columns["remaining_tokens"], dtype=np.int64),
            step=np.asarray(columns["step"], dtype=np.int64),
            count=np.asarray(columns["count"], dtype=np.int64),
            usable=~np.asarray(columns["is_truncated"], dtype=bool),
        )

    def prompt_features(self) -> np.ndarray:
        return np.column_stack([self.step, self.count]).astype(np.float32)


@dataclasses.dataclass
class InstructionFollowing:
    """Requested and produced counts per sample, from the manifest, truncated samples included."""

    requested: np.ndarray
    produced: np.ndarray
    completion_length: np.ndarray
    is_exact: np.ndarray
    is_truncated: np.ndarray

    @classmethod
    def from_samples(cls, samples: list[dict]) -> "InstructionFollowing":
        if not samples:
            raise ReportError("the manifest lists no samples; re-run the extraction with a non-empty prompt set")
        return cls(
            requested=np.array([sample["count"] for sample in samples]),
            produced=np.array([len(sample["completion_text"].split()) for sample in samples]),
            completion_length=np.array([sample["completion_length"] for sample in samples]),
            is_exact=np.array([bool(sample["is_exact_count"]) for sample in samples]),
            is_truncated=np.array([bool(sample["is_truncated"]) for sample in samples]),
        )

    def summary(self) -> dict:
        exact = int(self.is_exact.sum())
        return {
            "samples": len(self.is_exact),
            "exact_count_samples": exact,
            "exact_count_rate": exact / len(self.is_exact),
            "truncated_samples": int(self.is_truncated.sum()),
            "mean_count_error": float(np.mean(self.produced - self.requested)),
        }


def _mean_norm(*parts: np.ndarray) -> float:
    norms = np.concatenate([np.linalg.norm(part, axis=1) for part in parts])
    return float(norms.mean()) if len(norms) else math.nan


def _best_layer(probes: dict[int, dict]) -> int | None:
    """Return the layer whose raw-target probe has the highest validation R², or None when none is finite."""
    finite = {layer: scores[RAW_TARGET]["r2"] for layer, scores in probes.items() if math.isfinite(scores[RAW_TARGET]["r2"])}
    return max(finite, key=finite.__getitem__) if finite else None


# ---------------------------------------------------------------- figures


def _draw_figures(output_dir: Path, result: dict, remaining: np.ndarray, following: InstructionFollowing) -> dict:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    drawers = {
        "remaining_tokens": lambda figure: _draw_remaining(figure, remaining),
        "completion_lengths": lambda figure: _draw_completion_lengths(figure, following),
        "requested_vs_produced": lambda figure: _draw_requested_vs_produced(figure, following),
        "layer_norms": lambda figure: _draw_layer_norms(figure, result),
        "probe_scores": lambda figure: _draw_probe_scores(figure, result),
    }
    paths = {}
    for name, draw in drawers.items():
        # A Figure on its own Agg canvas uses no pyplot state, so repeated reports leave no open figures.
        figure = Figure(figsize=(12, 4) if name == "probe_scores" else (6, 4), layout="constrained")
        FigureCanvasAgg(figure)
        draw(figure)
        path = output_dir / FIGURES[name]
        figure.savefig(path, dpi=FIGURE_DPI)
        paths[name] = str(path)
    return paths


def _integer_bins(values: np.ndarray):
    """Return one bin per integer when the values span at most 200, so each bar is one value, else numpy's "auto"."""
    if len(values) and values.max() - values.min() <= 200:
        return np.arange(values.min(), values.max() + 2) - 0.5
    return "auto"


def _draw_remaining(figure, remaining: np.ndarray) -> None:
    axes = figure.subplots()
    axes.hist(remaining, bins=_integer_bins(remaining), color="tab:blue")
    axes.set_xlabel("remaining_tokens")
    axes.set_ylabel("rows")
    axes.yaxis.get_major_locator().set_params(integer=True)
    axes.set_title(f"Tokens left to write, {len(remaining)} rows")


def _draw_completion_lengths(figure, following: InstructionFollowing) -> None:
    axes = figure.subplots()
    lengths = following.completion_length
    axes.hist(
        [lengths[~following.is_truncated], lengths[following.is_truncated]],
        bins=_integer_bins(lengths),
        stacked=True,
        color=["tab:blue", "tab:red"],
        label=["ended", "truncated (no end token)"],
    )
    axes.set_xlabel("completion length in tokens, end token included")
    axes.set_ylabel("samples")
    axes.yaxis.get_major_locator().set_params(integer=True)
    axes.set_title(f"Completion lengths, {len(lengths)} samples")
    axes.legend()


def _draw_requested_vs_produced(figure, following: InstructionFollowing) -> None:
    axes = figure.subplots()
    groups = [
        (following.is_exact, "exact count", "tab:green"),
        (~following.is_exact & ~following.is_truncated, "other", "tab:orange"),
        (following.is_truncated, "truncated", "tab:red"),
    ]
    for mask, label, color in groups:
        axes.scatter(following.requested[mask], following.produced[mask], s=14, alpha=0.6, color=color,
                     label=f"{label} ({int(mask.sum())})")
    low = min(following.requested.min(), following.produced.min())
    high = max(following.requested.max(), following.produced.max())
    axes.plot([low, high], [low, high], color="black", linewidth=1, linestyle="--", label="produced = requested")
    axes.set_xlabel("requested count")
    axes.set_ylabel("produced count (whitespace-separated words)")
    axes.set_title("Instruction following")
    axes.legend(fontsize="small")


def _draw_layer_norms(figure, result: dict) -> None:
    axes = figure.subplots()
    layers = result["layers"]
    axes.plot(layers, [result["layer_norms"][layer] for layer in layers], marker="o")
    axes.set_xlabel("layer")
    axes.set_ylabel("mean L2 norm of the hidden state")
    axes.set_title(f"Hidden-state norms, {result['config_name']}")
    axes.set_xticks(_layer_ticks(layers))


def _draw_probe_scores(figure, result: dict) -> None:
    layers = result["layers"]
    r2_axes, mae_axes, spearman_axes = figure.subplots(1, 3)
    styles = {RAW_TARGET: ("tab:blue", "remaining_tokens"), LOG_TARGET: ("tab:purple", "log(remaining + 1)")}

    for target, (color, label) in styles.items():
        r2 = [result["probes"][layer][target]["r2"] for layer in layers]
        spearman = [result["probes"][layer][target]["spearman"] for layer in layers]
        r2_axes.plot(layers, r2, marker="o", color=color, label=label)
        r2_axes.axhline(result["baseline"][target]["r2"], color=color, linestyle=":", linewidth=1,
                        label=f"{label}, step + count baseline")
        spearman_axes.plot(layers, spearman, marker="o", color=color, label=label)

    # The two targets' MAE are in different units, so each gets its own y axis.
    log_axes = mae_axes.twinx()
    mae_axes.plot(layers, [result["probes"][layer][RAW_TARGET]["mae"] for layer in layers], marker="o",
                  color=styles[RAW_TARGET][0])
    log_axes.plot(layers, [result["probes"][layer][LOG_TARGET]["mae"] for layer in layers], marker="o",
                  color=styles[LOG_TARGET][0])
    mae_axes.set_ylabel("MAE in tokens", color=styles[RAW_TARGET][0])
    log_axes.set_ylabel("MAE of log(remaining + 1)", color=styles[LOG_TARGET][0])

    for axes, title in ((r2_axes, "R²"), (mae_axes, "MAE"), (spearman_axes, "Spearman correlation")):
        axes.set_xlabel("layer")
        axes.set_title(f"Validation {title}")
        axes.set_xticks(_layer_ticks(layers))
    r2_axes.legend(fontsize="small")
    spearman_axes.legend(fontsize="small")
    figure.suptitle(f"Ridge probes (alpha={result['alpha']:g}) for the tokens remaining, {result['config_name']}")


def _layer_ticks(layers: list[int]) -> list[int]:
    step = max(1, math.ceil(len(layers) / 14))
    return layers[::step]


# ---------------------------------------------------------------- report.md


def _number(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"


def _scores_text(scores: dict) -> str:
    return f"R² {_number(scores['r2'])}, MAE {_number(scores['mae'])}, Spearman {_number(scores['spearman'])}"


def render_markdown(result: dict) -> str:
    """Render the report's Markdown from the numbers that write_report returns."""
    figures = {name: Path(path).name for name, path in result["figures"].items()}
    rows = result["rows"]
    rows_line = (
        f"Rows: {rows['train']} train, {rows['validation']} validation (whole samples split with seed "
        f"{result['seed']}, validation fraction {result['validation_fraction']:g}; "
        f"{rows['validation_samples']} validation samples)."
    )
    if rows["validation_samples"] < FEW_VALIDATION_SAMPLES:
        rows_line += f" **Only {rows['validation_samples']} validation sample(s), so the probe scores are unreliable.**"
    lines = [
        "# Length-probe report",
        "",
        f"Model `{result['model']}`, config `{result['config_name']}` ({len(result['layers'])} layer(s) of "
        f"{result['hidden_size']} values), data `{result['data_dir']}`.",
        rows_line,
        f"Rows of truncated completions left out of the probes, norms and remaining_tokens histogram, because their "
        f"remaining_tokens is only a lower bound: {rows['truncated_left_out']}.",
        "",
        "## Lengths",
        "",
        f"![remaining_tokens per row]({figures['remaining_tokens']})",
        "",
        f"![completion lengths per sample]({figures['completion_lengths']})",
        "",
        "## Instruction following",
        "",
        f"Exact-count rate: **{result['exact_count_rate']:.3f}** ({result['exact_count_samples']} of "
        f"{result['samples']} samples wrote exactly the requested count of the word, then the end token; "
        f"{result['truncated_samples']} samples were truncated).",
        f"Produced count is {PRODUCED_COUNT_DEFINITION}. "
        f"Mean of produced minus requested over all samples, truncated ones included: "
        f"{_number(result['mean_count_error'], 2)}.",
        "",
        f"![requested vs produced count]({figures['requested_vs_produced']})",
        "",
        "## Hidden-state norms",
        "",
        f"![mean L2 norm per layer]({figures['layer_norms']})",
        "",
        "## Linear probes",
        "",
        f"One ridge regression (alpha={result['alpha']:g}) per layer on standardised hidden states, fitted on "
        "train and scored on validation. Targets: " + "; ".join(TARGET_DESCRIPTIONS[t] for t in TARGETS) + ".",
        f"Baseline without hidden states, the same ridge on the token's step and the requested count: "
        f"{_scores_text(result['baseline'][RAW_TARGET])}; log target {_scores_text(result['baseline'][LOG_TARGET])}.",
        "",
        _best_and_last_line(result),
        _baseline_comparison_line(result),
        "",
        "| layer | mean norm | R² | MAE (tokens) | Spearman | R² (log) | MAE (log) | Spearman (log) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for layer in result["layers"]:
        raw, log = result["probes"][layer][RAW_TARGET], result["probes"][layer][LOG_TARGET]
        cells = [str(layer), _number(result["layer_norms"][layer], 2)]
        cells += [_number(raw["r2"]), _number(raw["mae"]), _number(raw["spearman"])]
        cells += [_number(log["r2"]), _number(log["mae"]), _number(log["spearman"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"![probe scores per layer]({figures['probe_scores']})", ""]
    return "\n".join(lines)


def _baseline_comparison_line(result: dict) -> str:
    """Say whether the best layer's probe beats the step + count baseline, so a high R² is not over-read."""
    best = result["probes"][result["best_layer"]][RAW_TARGET]["r2"]
    baseline = result["baseline"][RAW_TARGET]["r2"]
    if best > baseline:
        return f"The best layer's R² {best:.3f} is above the step + count baseline's {baseline:.3f}."
    return (
        f"The best layer's R² {best:.3f} does not beat the step + count baseline's {baseline:.3f}: on this data "
        "the remaining count is readable without hidden states, so the probe scores alone show little."
    )


def _best_and_last_line(result: dict) -> str:
    last = result["last_layer"]
    last_scores = result["probes"][last]
    last_text = (
        f"Last layer ({last}): {_scores_text(last_scores[RAW_TARGET])}; "
        f"log target {_scores_text(last_scores[LOG_TARGET])}."
    )
    best = result["best_layer"]
    if best is None:
        return f"No layer has a finite validation R² (too few validation rows). {last_text}"
    return (
        f"Best layer by validation R² on remaining_tokens: **layer {best}** "
        f"({_scores_text(result['probes'][best][RAW_TARGET])}). {last_text}"
    )


def _log_summary(result: dict) -> None:
    best = result["best_layer"]
    best_r2 = result["probes"][best][RAW_TARGET]["r2"] if best is not None else math.nan
    logger.info(
        "Report written to %s in %.1f s: exact-count rate %.3f (%d of %d samples), best layer %s (R² %.3f), "
        "last layer %d (R² %.3f), step + count baseline R² %.3f",
        result["report"], result["seconds"], result["exact_count_rate"], result["exact_count_samples"],
        result["samples"], best, best_r2, result["last_layer"],
        result["probes"][result["last_layer"]][RAW_TARGET]["r2"], result["baseline"][RAW_TARGET]["r2"],
    )
