"""Real-size inputs for the bench and for people: folders of JPEG 'photos', a Keras 3 MobileNetV2
trained briefly on them, a small strided CNN, and the pipeline's cost as the data and the model
grow (run time, peak resident memory, time per training epoch).

    .venv/bin/python -m benchmarks.scaling photos --out DIR --count 5000 [--size 128]
    .venv/bin/python -m benchmarks.scaling mobilenet --dataset DIR --out model.keras [--size 96]
    .venv/bin/python -m benchmarks.scaling small-cnn --dataset DIR --out model.keras [--size 224]

The photos are synthetic (no download here): a noisy gradient background with clutter lines and
one shape whose kind is the class (ellipse, box, triangle, cross, ring), at a random place, size
and colour; each a JPEG at `size` x `size`. Learnable, but not by colour alone.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

CLASSES = ("ellipse", "box", "triangle", "cross", "ring")


def _photo(args: tuple[int, int, int]) -> bytes:
    """One JPEG: class `label`, `size` px, drawn from seed `seed`."""
    from PIL import Image, ImageDraw
    seed, label, size = args
    rng = np.random.default_rng(seed)
    low, high = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0, 1, size)[:, None, None]
    background = low + (high - low) * ramp + rng.normal(0, 18, (size, size, 3))
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(3):  # clutter
        points = rng.integers(0, size, 4).tolist()
        draw.line(points, fill=tuple(rng.integers(0, 256, 3).tolist()), width=max(1, size // 60))
    extent = int(size * rng.uniform(0.3, 0.6))
    x0, y0 = rng.integers(0, size - extent, 2).tolist()
    x1, y1 = x0 + extent, y0 + extent
    colour = tuple(rng.integers(0, 256, 3).tolist())
    thick = max(2, extent // 5)
    kind = CLASSES[label]
    if kind == "ellipse":
        draw.ellipse([x0, y0, x1, y1], fill=colour)
    elif kind == "box":
        draw.rectangle([x0, y0, x1, y1], fill=colour)
    elif kind == "triangle":
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=colour)
    elif kind == "cross":
        middle_x, middle_y = (x0 + x1) // 2, (y0 + y1) // 2
        draw.rectangle([middle_x - thick // 2, y0, middle_x + thick // 2, y1], fill=colour)
        draw.rectangle([x0, middle_y - thick // 2, x1, middle_y + thick // 2], fill=colour)
    else:
        draw.ellipse([x0, y0, x1, y1], outline=colour, width=thick)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def make_photos(out: Path, count: int, size: int = 128, seed: int = 0) -> Path:
    """`count` photos in class folders under `out` (skipped when it already holds them)."""
    marker = out / ".complete.json"
    wanted = {"count": count, "size": size, "seed": seed}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return out
    for name in CLASSES:
        (out / name).mkdir(parents=True, exist_ok=True)
    jobs = [(seed * 10_000_000 + i, i % len(CLASSES), size) for i in range(count)]
    with ProcessPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        for (job_seed, label, _), data in zip(jobs, pool.map(_photo, jobs, chunksize=256)):
            (out / CLASSES[label] / f"{job_seed % 10_000_000:07d}.jpg").write_bytes(data)
    marker.write_text(json.dumps(wanted))
    return out


def subset(source: Path, out: Path, count: int) -> Path:
    """The first `count` photos of `source` (round-robin over classes), hard-linked: no copy."""
    per_class = {name: sorted((source / name).glob("*.jpg")) for name in CLASSES}
    for name in CLASSES:
        (out / name).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        name = CLASSES[i % len(CLASSES)]
        src = per_class[name][i // len(CLASSES)]
        target = out / name / src.name
        if not target.exists():
            os.link(src, target)
    return out


def _training_data(dataset: Path, size: int, pixel_range: tuple[float, float], limit: int | None):
    from pipeline.sources.data import load_dataset
    return load_dataset(str(dataset), input_shape=(size, size, 3), pixel_range=pixel_range,
                        train_limit=limit)


def train_mobilenet(dataset: Path, out: Path, size: int = 96, epochs: int = 10,
                    limit: int | None = None, seed: int = 0) -> dict:
    """A Keras 3 `keras.applications.MobileNetV2` (alpha 0.35, weights=None: no download), inputs
    in [-1, 1], trained briefly on the photo folder (streamed), saved as .keras."""
    import keras
    keras.utils.set_random_seed(seed)
    data = _training_data(dataset, size, (-1.0, 1.0), limit)
    model = keras.applications.MobileNetV2(input_shape=(size, size, 3), alpha=0.35, weights=None,
                                           classes=data.num_classes)
    for layer in model.layers:  # MobileNetV2's 0.999 leaves the moving statistics unsettled
        if isinstance(layer, keras.layers.BatchNormalization):  # after a brief training
            layer.momentum = 0.9
    steps = -(-data.train_count // 64)
    schedule = keras.optimizers.schedules.CosineDecay(2e-3, decay_steps=epochs * steps, alpha=0.02)
    model.compile(optimizer=keras.optimizers.Adam(schedule),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    started = time.perf_counter()
    model.fit(data.tf_dataset("train", 64, shuffle=True, seed=seed, flips=True),
              validation_data=data.tf_dataset("val", 128), epochs=epochs, verbose=2)
    _, accuracy = model.evaluate(data.tf_dataset("test", 128), verbose=0)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(str(out))
    return {"model": str(out), "size": size, "epochs": epochs, "train_images": data.train_count,
            "test_accuracy": float(accuracy), "params": int(model.count_params()),
            "train_seconds": round(time.perf_counter() - started, 1)}


def train_small_cnn(dataset: Path, out: Path, size: int = 224, epochs: int = 2,
                    limit: int | None = None, seed: int = 0) -> dict:
    """A small Keras 3 CNN whose first convolutions stride early (cheap at 224 px), trained
    briefly: the bench's model for the data-size rows, where the data is what grows."""
    import keras
    keras.utils.set_random_seed(seed)
    data = _training_data(dataset, size, (0.0, 1.0), limit)
    layers = keras.layers
    inputs = keras.Input((size, size, 3))
    x = layers.Conv2D(16, 5, strides=4, padding="same", activation="relu")(inputs)
    x = layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.Conv2D(64, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(data.num_classes)(x)
    model = keras.Model(inputs, outputs, name="small_strided_cnn")
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(data.tf_dataset("train", 64, shuffle=True, seed=seed), epochs=epochs, verbose=2)
    _, accuracy = model.evaluate(data.tf_dataset("test", 128), verbose=0)
    model.save(str(out))
    return {"model": str(out), "size": size, "test_accuracy": float(accuracy),
            "params": int(model.count_params())}


def run_measured(command: list[str], env: dict[str, str], log: Path) -> dict:
    """Run a command; its wall time and its own peak resident memory (the kernel's ru_maxrss of
    that process, whatever its children use)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return {"returncode": process.returncode, "seconds": round(time.perf_counter() - started, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def epoch_seconds(tracking_uri: str, experiment: str) -> dict[str, float]:
    """Median seconds per epoch of every training of the experiment's last run, from the
    timestamps of its per-epoch loss (`<training>/loss`, one point per epoch)."""
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return {}
    runs = client.search_runs([found.experiment_id], "tags.run_role = 'parent'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return {}
    run = runs[0]
    seconds = {}
    for name in run.data.metrics:
        if not name.endswith("/loss"):
            continue
        stamps = sorted(m.timestamp for m in client.get_metric_history(run.info.run_id, name))
        if len(stamps) > 1:
            seconds[name[:-len("/loss")]] = float(np.median(np.diff(stamps))) / 1000.0
    return seconds


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    photos = commands.add_parser("photos", help="a folder of synthetic JPEG photos")
    photos.add_argument("--out", required=True)
    photos.add_argument("--count", type=int, default=5000)
    photos.add_argument("--size", type=int, default=128)
    photos.add_argument("--seed", type=int, default=0)
    for name, size, epochs in (("mobilenet", 96, 10), ("small-cnn", 224, 2)):
        model = commands.add_parser(name, help=f"train the bench's {name} model on a photo folder")
        model.add_argument("--dataset", required=True)
        model.add_argument("--out", required=True, help="the .keras file to write")
        model.add_argument("--size", type=int, default=size)
        model.add_argument("--epochs", type=int, default=epochs)
        model.add_argument("--limit", type=int, help="train on the first N training images")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    if args.command == "photos":
        started = time.perf_counter()
        make_photos(Path(args.out), args.count, args.size, args.seed)
        print(f"{args.count} photos at {args.size} px in {args.out} "
              f"({time.perf_counter() - started:.0f} s)")
        return 0
    train = train_mobilenet if args.command == "mobilenet" else train_small_cnn
    info = train(Path(args.dataset), Path(args.out), size=args.size, epochs=args.epochs,
                 limit=args.limit)
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ------------------------------------------------------------------------ the bench section
FULL = {"image_px": 224, "sizes": [1000, 5000, 50000], "model_images": 5000,
        "models": [("default CNN", "default", 224), ("MobileNetV2 0.35 at 96", "mobilenet", 96),
                   ("MobileNetV2 0.35 at 224", "mobilenet", 224)],
        "train_epochs": 3, "pipeline_epochs": 1, "latency_runs": 50,
        "model_variants": "float32,int8,prune-int8"}
QUICK = {"image_px": 96, "sizes": [300, 900], "model_images": 600,
         "models": [("default CNN", "default", 96), ("MobileNetV2 0.35 at 96", "mobilenet", 96)],
         "train_epochs": 1, "pipeline_epochs": 1, "latency_runs": 5,
         "model_variants": "float32,int8"}
PEAK_RSS_GOAL_MB = 3072


def section(cache: Path, runs_dir: Path, env, quick: bool, progress) -> dict:
    """Run time and peak memory against dataset size (a small model, `--variants float32,int8`,
    the same command at each size) and against model size (the same images), side by side in
    one run; time per training epoch from the runs' learning curves."""
    settings = QUICK if quick else FULL
    px, largest = settings["image_px"], max(settings["sizes"])
    photos = cache / f"photos-{px}px-{largest}"
    progress("scaling", f"{largest} synthetic JPEG photos at {px} px (made once, cached)")
    make_photos(photos, largest, px)
    folders = {n: photos if n == largest else subset(photos, cache / f"photos-{px}px-{n}", n)
               for n in settings["sizes"]}
    folders.setdefault(settings["model_images"],
                       subset(photos, cache / f"photos-{px}px-{settings['model_images']}",
                              settings["model_images"]))
    small_first = folders[min(settings["sizes"])]
    small_model = cache / f"small-cnn-{px}.keras"
    if not small_model.exists():
        progress("scaling", f"training the small strided CNN on {small_first.name}")
        train_small_cnn(small_first, small_model, size=px, epochs=settings["train_epochs"])
    # The rows measure cost, not accuracy: briefly trained models may sit under the floor.
    common = ["--set", f"latency_runs={settings['latency_runs']}", "--set", "latency_warmup=3",
              "--set", "calibration_samples=100", "--set", "min_accuracy=0"]

    def pipeline(name: str, args: list[str]) -> dict:
        progress("scaling", f"{name}: python -m pipeline run {' '.join(args)}")
        work = runs_dir / name
        measured = run_measured([sys.executable, "-m", "pipeline", "run", "--experiment",
                                 f"bench-scaling-{name}", "--registered-model-name",
                                 f"bench-scaling-{name}", *args, *common],
                                env(PIPELINE_WORK_DIR=str(work)), runs_dir / f"{name}.log")
        progress("scaling", f"{name}: exit {measured['returncode']}, {measured['seconds']:.0f} s, "
                            f"peak RSS {measured['peak_rss_mb']:.0f} MB")
        return measured

    data_rows = []
    for count in settings["sizes"]:
        measured = pipeline(f"data-{count}", ["--model", str(small_model), "--dataset",
                                              str(folders[count]), "--variants", "float32,int8"])
        data_rows.append({"images": count, "model": "small strided CNN", **measured,
                          "images_per_s": count / measured["seconds"]})
    model_rows, epoch_rows = [], []
    model_folder = folders[settings["model_images"]]
    for label, kind, size in settings["models"]:
        name = f"model-{kind}-{size}"
        args = ["--dataset", str(model_folder), "--variants", settings["model_variants"]]
        if kind == "mobilenet":
            model_path = cache / f"mobilenet-{size}-{settings['model_images']}.keras"
            if not model_path.exists():
                progress("scaling", f"training {label} on {model_folder.name}")
                train_mobilenet(model_folder, model_path, size=size,
                                epochs=settings["train_epochs"])
            args += ["--model", str(model_path), "--set", "pixel_range=-1:1"]
        else:
            args += ["--epochs", str(settings["pipeline_epochs"])]
        measured = pipeline(name, args)
        model_rows.append({"model": label, "input": f"{size}x{size}x3",
                           "images": settings["model_images"], **measured})
        uri = env()["MLFLOW_TRACKING_URI"]
        for training, seconds in sorted(epoch_seconds(uri, f"bench-scaling-{name}").items()):
            epoch_rows.append({"model": label, "training": training, "seconds_per_epoch": seconds})
    # A run that stopped early says nothing about its cost: it stays in its table with its exit
    # code (the rows that finished are still measured side by side) and fails a goal of its own.
    failed = [r for r in data_rows + model_rows if r["returncode"] != 0]
    peaks = [r["peak_rss_mb"] for r in data_rows if r["returncode"] == 0]
    flat = (max(peaks) / min(peaks)) if len(peaks) > 1 else None
    largest_row = next((r for r in data_rows if r["images"] == largest), {})
    goals = [
        {"goal": "every run finished", "target": "exit 0",
         "measured": f"{len(failed)} of {len(data_rows) + len(model_rows)} failed",
         "met": not failed,
         "note": f"logs in {runs_dir.name}/: " + ", ".join(
             f"{r.get('model')} {r.get('input', r.get('images'))}" for r in failed)
         if failed else ""},
        {"goal": "peak RSS of the largest dataset run", "target": f"< {PEAK_RSS_GOAL_MB} MB",
         "measured": f"{largest_row.get('peak_rss_mb', 0):.0f} MB",
         "met": None if quick or largest_row.get("returncode") != 0
         else largest_row["peak_rss_mb"] < PEAK_RSS_GOAL_MB,
         "note": ""},
        {"goal": "peak RSS flat in dataset size", "target": "largest / smallest <= 1.25",
         "measured": f"{flat:.2f}x" if flat else None,
         "met": None if quick or flat is None else flat <= 1.25, "note": ""},
    ]
    text = [("images", "images", "int"), ("seconds", "wall (s)", "s"),
            ("peak_rss_mb", "peak RSS (MB)", "s"), ("images_per_s", "images/s", "s"),
            ("returncode", "exit", "int")]
    return {
        "title": "Cost against dataset and model size",
        "notes": [
            f"Synthetic JPEG photos at {px} px ({', '.join(map(str, settings['sizes']))} images; "
            "`python -m benchmarks.scaling photos`), streamed from the folder: nothing is loaded "
            "whole. Each row is one `python -m pipeline run` in its own process; peak RSS is "
            "that process's own maximum resident memory (the kernel's ru_maxrss), so it bounds "
            "every stage it ran (train, optimize, quantize, evaluate, benchmark, select, "
            "register); the latency child processes are separate and small.",
            "Data rows: a small strided Keras 3 CNN trained briefly on the smallest folder, "
            "`--variants float32,int8`. Model rows: the same "
            f"{settings['model_images']} images, `--variants {settings['model_variants']}` "
            "(pruning, when listed, fine-tunes on the stream); the default CNN is trained by the pipeline "
            f"({settings['pipeline_epochs']} epoch), the MobileNetV2s are trained briefly by the "
            "bench (Keras 3, weights=None) and passed as --model.",
            "Seconds per epoch: the median time between two epochs' points of each training's "
            "learning curve in MLflow (`<training>/loss`).",
        ],
        "goals": goals,
        "tables": [
            {"id": "scaling-data", "title": "Against dataset size",
             "columns": [{"key": "model", "label": "model", "format": "text"},
                         *[{"key": k, "label": lbl, "format": f} for k, lbl, f in text]],
             "rows": data_rows},
            {"id": "scaling-models", "title": "Against model size",
             "columns": [{"key": "model", "label": "model", "format": "text"},
                         {"key": "input", "label": "input", "format": "text"},
                         *[{"key": k, "label": lbl, "format": f} for k, lbl, f in text
                           if k != "images_per_s"]],
             "rows": model_rows},
            {"id": "scaling-epochs", "title": "Seconds per training epoch",
             "columns": [{"key": "model", "label": "model", "format": "text"},
                         {"key": "training", "label": "training", "format": "code"},
                         {"key": "seconds_per_epoch", "label": "s / epoch", "format": "s"}],
             "rows": epoch_rows},
        ],
    }
