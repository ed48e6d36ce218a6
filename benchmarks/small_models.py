"""`make bench-small` (`python -m benchmarks.small_models [--techniques prune,distill]
[--out benchmarks/small-models]`): every
training-time technique on the small models of tests/small_models.py (a few thousand weights,
540 training images; issue 22), with the settings measured on the default CNN taken as given
(`size_to_data` off, no retries, the student from scratch) against today's defaults (sized to
the model and the data, back-off on the validation split, the student from the teacher's
weights). Prints a markdown table of test accuracies and deltas to float32 (and writes it to
OUT.md, the rows to OUT.json); one base model per small model, trained once and shared by both
columns. About 6 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

TECHNIQUES = ("prune", "cluster", "qat", "qat4", "distill")
SETTINGS = {
    "fixed": {"size_to_data": False, "technique_retries": 0, "student_init": "scratch"},
    "sized": {},
}


def run(models: list[str], techniques: list[str]) -> list[dict]:
    from pipeline.config import PipelineConfig
    from pipeline.techniques.recipes import apply_recipe
    from tests.small_models import train_small_model

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in models:
            data, base, accuracy = train_small_model(name, Path(scratch) / name)
            print(f"{name}: float32 {accuracy:.3f}", file=sys.stderr, flush=True)
            for technique in techniques:
                row = {"model": name, "technique": technique, "float32": accuracy}
                for label, changes in SETTINGS.items():
                    config = PipelineConfig(seed=3, **changes)
                    started = time.monotonic()
                    result = apply_recipe(technique, base, data, config,
                                          Path(scratch) / name / label / technique)
                    row[label] = {
                        "test_accuracy": result["keras_test_accuracy"],
                        "delta_pts": (result["keras_test_accuracy"] - accuracy) * 100,
                        "attempts": len(result["attempts"][technique]),
                        "fits_budget": result["fits_budget"],
                        "seconds": time.monotonic() - started,
                    }
                    print(f"  {technique} {label}: {row[label]}", file=sys.stderr, flush=True)
                rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | technique | float32 | epochs and batch as given, no retry, student "
             "from scratch | delta | "
             "sized + back-off | delta | attempts | fits the budget |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        fixed, sized = row["fixed"], row["sized"]
        lines.append(
            f"| {row['model']} | {row['technique']} | {row['float32']:.3f} | "
            f"{fixed['test_accuracy']:.3f} | {fixed['delta_pts']:+.1f} | "
            f"{sized['test_accuracy']:.3f} | {sized['delta_pts']:+.1f} | {sized['attempts']} | "
            f"{'yes' if sized['fits_budget'] else 'no'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from tests.small_models import MODELS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--techniques", default=",".join(TECHNIQUES))
    parser.add_argument("--out", help="also write the table to OUT.md and the rows to OUT.json")
    args = parser.parse_args(argv)
    rows = run(args.models.split(","), args.techniques.split(","))
    table = markdown(rows)
    if args.out:
        Path(f"{args.out}.json").write_text(json.dumps(rows, indent=1) + "\n")
        Path(f"{args.out}.md").write_text(
            "# Training-time techniques on small models (issue 22)\n\n"
            f"`make bench-small ARGS=\"--out {args.out}\"`: {os.cpu_count()} cores, "
            f"{time.strftime('%Y-%m-%d')}. Test accuracy on 100 images per class; delta in "
            f"points against the float32 model.\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
