"""Tests of `python -m generation report` on datasets with planted values whose right results are known.

The synthetic directories are written by the extractor's own writers (`shard_table`, `write_shard`,
`build_manifest`, `config_metadata`) from numpy arrays, so the builder reads them exactly as it reads a
real extraction.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
pytest.importorskip("scipy")

from matplotlib.image import imread  # noqa: E402

from generation import ExtractionConfig, run_extraction  # noqa: E402
from generation.probes import ReportError, read_layer, require_report_extras  # noqa: E402
from generation.report import FIGURES, REPORT_FILE, render_markdown, write_report  # noqa: E402
from generation.shards import build_manifest, config_metadata, shard_table, write_json_atomically, write_shard  # noqa: E402
from length_probe import ALL_LAYERS, LAST_LAYER, MANIFEST_FILE, METADATA_FILE, PARTS_DIR, RUN_FILE, sample_id_for  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
import tiny_models  # noqa: E402

LAYER_COUNT = 4
HIDDEN_SIZE = 16
SIGNAL_LAYER = 3  # layer numbers start at 1, as in metadata.json
WORDS = ("hello", "cat")
COUNTS = range(5, 25)  # 2 words x 20 counts = 40 samples
MAX_NEW_TOKENS = 40
# E||x|| for x ~ N(0, I_16), the chi distribution's mean with 16 degrees of freedom.
NOISE_NORM = 3.9380


@dataclasses.dataclass
class PlantedDataset:
    """A synthetic dataset directory and the values planted in it."""

    directory: Path
    exact_count_rate: float
    truncated_rows: int
    remaining: np.ndarray  # remaining_tokens of every row, in writing order


def plant_outcome(index: int) -> str:
    """Pick a sample's outcome: 30 of 40 exact, 8 too long, 2 truncated."""
    if index % 4 != 3:
        return "exact"
    return "truncated" if index in (3, 23) else "too_long"


def write_planted_dataset(directory: Path, *, keep_truncated: bool = False, seed: int = 0) -> PlantedDataset:
    """Write a dataset directory in which layer SIGNAL_LAYER is remaining_tokens along one direction plus small noise.

    Every other layer is standard normal noise. Samples are written in two parts, as two batches of
    an extraction would be.
    """
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=HIDDEN_SIZE)
    direction /= np.linalg.norm(direction)
    samples = [(word, count) for word in WORDS for count in COUNTS]

    config = ExtractionConfig(
        model="synthetic", words=WORDS, min_count=COUNTS[0], max_count=COUNTS[-1], max_new_tokens=MAX_NEW_TOKENS,
        output_dir=directory, storage_dtype="float16", keep_truncated=keep_truncated,
    )
    run = {
        "format_version": 1,
        "resume_key": config.resume_key(resolved_dtype="float32", chat_template_sha256="0" * 64),
        "model": {"model": "synthetic", "architecture": "None", "num_hidden_layers": LAYER_COUNT,
                  "hidden_size": HIDDEN_SIZE, "vocab_size": 10},
        "layers": {
            LAST_LAYER: {"layers": [LAYER_COUNT], "hidden_size": HIDDEN_SIZE, "values_per_row": HIDDEN_SIZE},
            ALL_LAYERS: {"layers": list(range(1, LAYER_COUNT + 1)), "hidden_size": HIDDEN_SIZE,
                         "values_per_row": HIDDEN_SIZE * LAYER_COUNT},
        },
        "captured_layers": list(range(1, LAYER_COUNT + 1)),
        "end_token_ids": [0],
    }
    for name in [PARTS_DIR, LAST_LAYER, ALL_LAYERS]:
        (directory / name).mkdir(parents=True, exist_ok=True)
    write_json_atomically(directory / RUN_FILE, run)

    sample_records, part_records, all_remaining = [], [], []
    truncated_rows = 0
    exact_count = 0
    halves = [list(enumerate(samples))[:20], list(enumerate(samples))[20:]]
    for part_index, half in enumerate(halves):
        part = f"part-r00000-s{part_index:05d}"
        columns = {key: [] for key in ("sample_id", "word", "count", "step", "token_id", "token_text",
                                       "remaining_tokens", "completion_length", "is_exact_count", "is_truncated")}
        states, locations, records, row = [], [], [], 0
        for index, (word, count) in half:
            outcome = plant_outcome(index)
            words_written = {"exact": count, "too_long": count + 2, "truncated": MAX_NEW_TOKENS}[outcome]
            truncated = outcome == "truncated"
            length = words_written if truncated else words_written + 1  # the end token counts
            exact_count += outcome == "exact"
            kept_rows = length if (keep_truncated or not truncated) else 0
            records.append({
                "sample_id": sample_id_for(word, count), "word": word, "count": count, "prompt": f"{word} {count}",
                "completion_text": " ".join([word] * words_written), "completion_token_ids": [1] * length,
                "completion_length": length, "is_truncated": truncated, "is_exact_count": outcome == "exact",
                "rows": kept_rows, "clipped_values": 0, "part": part,
            })
            if not kept_rows:
                continue
            truncated_rows += kept_rows if truncated else 0
            locations.append([sample_id_for(word, count), row, kept_rows])
            row += kept_rows
            remaining = length - 1 - np.arange(kept_rows)
            all_remaining.append(remaining)
            layer_states = rng.normal(size=(kept_rows, LAYER_COUNT, HIDDEN_SIZE))
            layer_states[:, SIGNAL_LAYER - 1, :] = np.outer(remaining, direction) + rng.normal(
                scale=0.05, size=(kept_rows, HIDDEN_SIZE)
            )
            states.append(layer_states)
            for step in range(kept_rows):
                for key, value in (("sample_id", sample_id_for(word, count)), ("word", word), ("count", count),
                                   ("step", step), ("token_id", 1), ("token_text", word),
                                   ("remaining_tokens", int(remaining[step])), ("completion_length", length),
                                   ("is_exact_count", outcome == "exact"), ("is_truncated", truncated)):
                    columns[key].append(value)
        stacked = np.concatenate(states).astype(np.float16)
        files = {}
        for name, values in ((LAST_LAYER, stacked[:, -1, :]), (ALL_LAYERS, stacked.reshape(len(stacked), -1))):
            relative = f"{name}/{part}.arrow"
            written = write_shard(directory / relative, shard_table(columns, values, "float16"))
            files[name] = {"file": relative, "rows": row, **written, "samples": locations}
        record = {"part": part, "rank": 0, "samples": records, "files": files}
        write_json_atomically(directory / PARTS_DIR / f"{part}.json", record)
        part_records.append(record)
        sample_records += records

    summary = {"samples": len(sample_records), "rows": sum(s["rows"] for s in sample_records)}
    manifest = build_manifest(run, sample_records, part_records, summary)
    for name, entry in manifest["configs"].items():
        write_json_atomically(directory / name / METADATA_FILE, config_metadata(run, name, entry["rows"]))
    write_json_atomically(directory / MANIFEST_FILE, manifest)
    return PlantedDataset(directory, exact_count / len(samples), truncated_rows, np.concatenate(all_remaining))


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> PlantedDataset:
    return write_planted_dataset(tmp_path_factory.mktemp("planted"))


@pytest.fixture(scope="module")
def report(planted, tmp_path_factory) -> dict:
    output_dir = tmp_path_factory.mktemp("report")
    return write_report(planted.directory, output_dir, cache_dir=str(tmp_path_factory.mktemp("cache")),
                        validation_fraction=0.25)


# ---------------------------------------------------------------- probes


def test_read_layer_chunks_and_mask():
    values = np.arange(10 * 3 * 2, dtype=np.float16).reshape(10, 3, 2)
    batches = [
        pa.record_batch([pa.FixedSizeListArray.from_arrays(pa.array(part.reshape(-1)), 6)],
                             names=["hidden_states"])
        for part in (values[:4], values[4:])
    ]
    dataset = datasets.Dataset(pa.Table.from_batches(batches))
    rows = np.array([True, False] * 5)

    # Slices of 3 rows cross the table's chunk boundary at row 4.
    features = read_layer(dataset, 1, layer_count=3, hidden_size=2, rows=rows, chunk_rows=3)

    assert features.dtype == np.float32
    np.testing.assert_array_equal(features, values[rows, 1, :].astype(np.float32))


def test_signal_layer_r2_high(report):
    assert report["probes"][SIGNAL_LAYER]["remaining_tokens"]["r2"] > 0.95


def test_signal_layer_log_spearman_high(report):
    # log1p is monotonic, so the rank correlation of a good linear probe stays high on the log target.
    assert report["probes"][SIGNAL_LAYER]["log_remaining_tokens"]["spearman"] > 0.9


def test_noise_layers_r2_low(report):
    for layer in (1, 2, 4):
        assert report["probes"][layer]["remaining_tokens"]["r2"] < 0.3, layer
        assert report["probes"][layer]["log_remaining_tokens"]["r2"] < 0.3, layer


def test_best_layer_is_signal_layer(report):
    assert report["best_layer"] == SIGNAL_LAYER
    assert report["last_layer"] == LAYER_COUNT


def test_layers_from_metadata(report):
    assert report["layers"] == [1, 2, 3, 4]
    assert sorted(report["probes"]) == [1, 2, 3, 4]


def test_layer_norms_match_planted(report, planted):
    for layer in (1, 2, 4):
        assert report["layer_norms"][layer] == pytest.approx(NOISE_NORM, abs=0.2), layer
    assert report["layer_norms"][SIGNAL_LAYER] == pytest.approx(planted.remaining.mean(), rel=0.02)


def test_rows_split_by_sample(report, planted):
    rows = report["rows"]
    assert rows["train"] + rows["validation"] == len(planted.remaining)
    assert rows["validation"] > 0
    assert rows["truncated_left_out"] == 0
    # A quarter of the 40 samples is 10, and two of those are truncated and have no rows.
    assert rows["validation_samples"] == 8


def test_few_validation_samples_flagged(report):
    text = Path(report["report"]).read_text(encoding="utf-8")
    assert "8 validation samples). **Only 8 validation sample(s), so the probe scores are unreliable.**" in text


def test_ten_validation_samples_not_flagged(report):
    result = {**report, "rows": {**report["rows"], "validation_samples": 10}}
    text = render_markdown(result)
    assert "10 validation samples)." in text
    assert "unreliable" not in text


# ---------------------------------------------------------------- instruction following


def test_exact_count_rate_planted(report, planted):
    assert planted.exact_count_rate == 0.75
    assert report["exact_count_rate"] == planted.exact_count_rate
    assert report["exact_count_samples"] == 30
    assert report["samples"] == 40
    assert report["truncated_samples"] == 2


def test_mean_count_error_planted(report):
    # 8 samples wrote 2 words too many; the 2 truncated ones wrote MAX_NEW_TOKENS words for counts 8 and 8.
    too_long = 8 * 2
    truncated = (MAX_NEW_TOKENS - COUNTS[3]) + (MAX_NEW_TOKENS - COUNTS[3])
    assert report["mean_count_error"] == pytest.approx((too_long + truncated) / 40)


# ---------------------------------------------------------------- files


def test_figures_are_images(report):
    assert set(report["figures"]) == set(FIGURES)
    for name, path in report["figures"].items():
        image = imread(path)
        assert image.ndim == 3, name
        assert image.shape[0] > 100, (name, image.shape)
        assert image.shape[1] > 100, (name, image.shape)


def test_markdown_states_rate(report):
    text = Path(report["report"]).read_text(encoding="utf-8")
    assert "Exact-count rate: **0.750** (30 of 40 samples" in text
    assert "whitespace-separated words" in text


def test_markdown_has_table(report):
    text = Path(report["report"]).read_text(encoding="utf-8")
    assert "| layer | mean norm | R² | MAE (tokens) | Spearman | R² (log) | MAE (log) | Spearman (log) |" in text
    for layer in range(1, LAYER_COUNT + 1):
        assert f"\n| {layer} | " in text, layer
    signal_r2 = f"{report['probes'][SIGNAL_LAYER]['remaining_tokens']['r2']:.3f}"
    assert f"\n| {SIGNAL_LAYER} | {report['layer_norms'][SIGNAL_LAYER]:.2f} | {signal_r2} |" in text


def test_markdown_names_best_layer(report):
    text = Path(report["report"]).read_text(encoding="utf-8")
    assert f"Best layer by validation R² on remaining_tokens: **layer {SIGNAL_LAYER}**" in text
    assert f"Last layer ({LAYER_COUNT}): R² " in text


def test_markdown_compares_with_baseline(report):
    text = Path(report["report"]).read_text(encoding="utf-8")
    best = report["probes"][report["best_layer"]]["remaining_tokens"]["r2"]
    baseline = report["baseline"]["remaining_tokens"]["r2"]
    if best > baseline:
        assert f"The best layer's R² {best:.3f} is above the step + count baseline's {baseline:.3f}." in text
    else:
        assert "does not beat the step + count baseline" in text


def test_markdown_links_figures(report):
    text = Path(report["report"]).read_text(encoding="utf-8")
    for file_name in FIGURES.values():
        assert f"]({file_name})" in text, file_name


# ---------------------------------------------------------------- other configs and inputs


def test_last_layer_config(planted, tmp_path):
    result = write_report(planted.directory, tmp_path / "out", config_name=LAST_LAYER,
                          cache_dir=str(tmp_path / "cache"), validation_fraction=0.25)

    assert result["layers"] == [LAYER_COUNT]
    assert list(result["probes"]) == [LAYER_COUNT]
    assert result["probes"][LAYER_COUNT]["remaining_tokens"]["r2"] < 0.3
    assert result["layer_norms"][LAYER_COUNT] == pytest.approx(NOISE_NORM, abs=0.2)
    assert Path(result["report"]).is_file()


def test_truncated_rows_left_out(tmp_path):
    planted = write_planted_dataset(tmp_path / "data", keep_truncated=True)
    result = write_report(planted.directory, tmp_path / "out", cache_dir=str(tmp_path / "cache"),
                          validation_fraction=0.25)

    assert planted.truncated_rows == 2 * MAX_NEW_TOKENS
    assert result["rows"]["truncated_left_out"] == planted.truncated_rows
    assert result["rows"]["train"] + result["rows"]["validation"] == len(planted.remaining) - planted.truncated_rows
    assert result["probes"][SIGNAL_LAYER]["remaining_tokens"]["r2"] > 0.95


def test_invalid_alpha(planted, tmp_path):
    with pytest.raises(ValueError, match="invalid alpha 0"):
        write_report(planted.directory, tmp_path, alpha=0)


def test_missing_extras_message(monkeypatch):
    # A None entry in sys.modules makes the import raise ImportError, as if sklearn were not installed.
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(ReportError, match=r'sklearn.*pip install -e "\.\[report\]"'):
        require_report_extras()


# ---------------------------------------------------------------- command line


def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "generation", *arguments], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )


def test_cli_writes_report(planted, tmp_path):
    output_dir = tmp_path / "out"
    completed = run_cli("report", "--data-dir", str(planted.directory), "--output-dir", str(output_dir),
                        "--cache-dir", str(tmp_path / "cache"), "--validation-fraction", "0.25", "--alpha", "2")

    assert completed.returncode == 0, completed.stderr
    assert (output_dir / REPORT_FILE).is_file()
    for file_name in FIGURES.values():
        assert (output_dir / file_name).is_file(), file_name
    assert str(output_dir / REPORT_FILE) in completed.stdout
    assert "alpha=2" in (output_dir / REPORT_FILE).read_text(encoding="utf-8")


def test_cli_missing_data_dir(tmp_path):
    completed = run_cli("report", "--data-dir", str(tmp_path / "absent"), "--output-dir", str(tmp_path / "out"))

    assert completed.returncode != 0
    assert "not found" in completed.stderr
    assert "python -m generation extract" in completed.stderr
    assert not (tmp_path / "out").exists()


def test_cli_output_path_is_file(planted, tmp_path):
    output_file = tmp_path / "afile"
    output_file.write_text("not a directory")
    completed = run_cli("report", "--data-dir", str(planted.directory), "--output-dir", str(output_file))

    assert completed.returncode == 1
    assert completed.stderr.strip().splitlines()[-1] == (
        f"error: output path {str(output_file)!r} is a file; pass a directory to --output-dir"
    )
    assert "Traceback" not in completed.stderr


def test_cli_invalid_fraction(tmp_path):
    completed = run_cli("report", "--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "out"),
                        "--validation-fraction", "1.5")

    assert completed.returncode == 2
    assert "invalid fraction '1.5'" in completed.stderr


# ---------------------------------------------------------------- end to end


def test_tiny_model_extraction(tmp_path, caplog):
    tokenizer = tiny_models.build_tokenizer(with_pad_token=True)
    tokenizer.padding_side = "left"
    model = tiny_models.build_model("qwen2", tokenizer)
    config = ExtractionConfig(model="tiny-qwen2", device="cpu", words=("hello", "cat"), min_count=1, max_count=4,
                              max_new_tokens=12, batch_size=8, output_dir=tmp_path / "data")
    run_extraction(config, model=model, tokenizer=tokenizer)

    with caplog.at_level(logging.WARNING, logger="generation.report"):
        result = write_report(tmp_path / "data", tmp_path / "out", cache_dir=str(tmp_path / "cache"),
                              validation_fraction=0.25)

    metadata = json.loads((tmp_path / "data" / ALL_LAYERS / METADATA_FILE).read_text(encoding="utf-8"))
    assert result["layers"] == metadata["layers"]
    assert result["samples"] == 8
    assert Path(result["report"]).is_file()
    assert result["rows"]["validation_samples"] == 2
    assert "Only 2 validation sample(s), so the probe scores are unreliable." in Path(result["report"]).read_text(encoding="utf-8")
    assert "The validation split has only 2 sample(s)" in caplog.text
    for path in result["figures"].values():
        assert Path(path).stat().st_size > 0, path
