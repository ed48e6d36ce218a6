"""`python -m pipeline run ...`: the DAG's stages in one process, without Airflow.

Exit status: 0 on success, 2 on bad input (one line on stderr, no traceback), 1 on other failures.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
import uuid

from pipeline import import_tensorflow_quietly
from pipeline.errors import PipelineInputError, without_credentials


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own exit status is also 2; keep one line on stderr
        self.exit(2, f"error: {message} (see python -m pipeline run --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = commands.add_parser("run", help="train or load a model, compress it, measure, select, register")
    run.add_argument("--model", dest="model_path", help=".keras, .h5 or SavedModel dir (skips training)")
    run.add_argument("--dataset", help="fashion-mnist (default), an image folder, or an .npz")
    run.add_argument("--epochs", type=int)
    run.add_argument("--train-limit", type=int, help="use only the first N training images")
    run.add_argument("--test-limit", type=int, help="use only the first N test images")
    run.add_argument("--variants", help="comma list, e.g. float32,dynamic,prune+cluster-int8")
    run.add_argument("--experiment", help="MLflow experiment name")
    run.add_argument("--registered-model-name", help="MLflow registered model name")
    run.add_argument("--allow-unsafe-model", action="store_true", default=None,
                     help="allow Lambda layers (runs code stored in the model file)")
    run.add_argument("--verbose", action="store_true",
                     help="show the whole traceback of an unexpected error")
    run.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                     help="any other setting of pipeline.config.PipelineConfig (repeatable)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except PipelineInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if getattr(args, "verbose", False):
            raise
        from pipeline.stages import one_line
        print(f"error: {one_line(error)} (the traceback is in {_save_traceback()}; or add "
              "--verbose)", file=sys.stderr)
        return 1


def _save_traceback() -> str:
    """The current exception's traceback in the work folder's last-error.log; returns its path."""
    import traceback

    from pipeline.config import work_dir
    from pipeline.files import write_text
    return str(write_text(work_dir() / "last-error.log", traceback.format_exc()))


def settings_from_args(args) -> dict:
    """The settings the user gave: the options, then each --set NAME=VALUE (one parser for the
    command line and `make run`)."""
    values = {k: v for k, v in vars(args).items()
              if k not in ("command", "set", "verbose") and v is not None}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            raise PipelineInputError(f"--set {item!r}: expected NAME=VALUE")
        values[name.strip().replace("-", "_")] = value
    return values


def run(args) -> int:
    from pipeline.config import PipelineConfig

    values = settings_from_args(args)
    config = PipelineConfig.from_mapping(values)  # validates before anything heavy starts
    from pipeline.store import tracking
    tracking.require_server()  # one clear line, before any training, when it is not there
    import_tensorflow_quietly()
    return run_pipeline(config.to_dict(), f"cli-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}")


def run_pipeline(config_values: dict, pipeline_run_id: str) -> int:
    from pipeline.api import run_stages

    started = time.perf_counter()
    results = run_stages(config_values, pipeline_run_id, launcher="cli")
    print()
    print(results.summary_markdown)
    print(summary_footer(results.context, {"failed_variants": [
        r["variant"] for r in results.variants if r["status"] == "failed"]},
        results.registered, time.perf_counter() - started))
    return 0


def summary_footer(ctx: dict, selected: dict, outcome: dict, seconds: float | None = None) -> str:
    from pipeline.store import tracking
    lines = [""]
    if outcome.get("skipped"):
        lines.append(f"Nothing registered: {outcome['reason']}")
    else:
        lines.append(f"Registered {outcome['name']} version {outcome['version']} "
                     f"(aliases: {', '.join(outcome.get('aliases', [])) or 'none'}); "
                     f"{outcome.get('decision', '')}")
    if selected["failed_variants"]:
        lines.append(f"Failed variants: {', '.join(selected['failed_variants'])} (errors in their MLflow runs)")
    lines.append(f"MLflow: experiment '{ctx['experiment']}', parent run {ctx['parent_run_id']}, "
                 f"tracking URI {without_credentials(tracking.tracking_uri())}")
    url = tracking.run_url(ctx["parent_run_id"])
    lines.append(f"Open it: {url}" if url else "Open the MLflow UI: make mlflow-ui  (then http://127.0.0.1:5000)")
    if seconds is not None:
        lines.append(f"Pipeline time: {seconds / 60:.1f} min")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
