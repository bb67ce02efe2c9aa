"""The ``simsearch`` command: a thin typer layer over :class:`simsearch.Engine`.

Exit codes: 0 success, 1 some inputs could not be read (each reported, the rest done) or the
index could not be used, 2 usage error.
"""

from __future__ import annotations

import contextlib
import enum
import gc
import json
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Local, offline audio similarity search: index a folder, query a clip, teach a category.")

IndexOpt = typer.Option(None, "--index", envvar="SIMSEARCH_INDEX", help="Index directory [default: ./index].",
                        show_default=False)
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bar or summary.")
JsonOpt = typer.Option(False, "--json", help="Machine-readable output (see README for the schema).")


def _err(message: str) -> None:
    typer.echo(message, err=True)


@contextlib.contextmanager
def _engine(index: Optional[Path], encoder: Optional[str] = None):
    from .engine import Engine
    from .errors import EncoderMismatchError, SimsearchError, UsageError

    try:
        with Engine(index, encoder=encoder) as engine:
            yield engine
    except (UsageError, EncoderMismatchError) as e:
        _err(f"Error: {e}")
        raise typer.Exit(2)
    except SimsearchError as e:
        _err(f"Error: {e}")
        raise typer.Exit(1)


@contextlib.contextmanager
def _progress(description: str, enabled: bool):
    """A rich progress bar with count and ETA; yields a ``progress(done, total)`` callback."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=True, console=None) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _report_failures(failed) -> int:
    for path, reason in failed:
        _err(f"skipped {path}: {reason}")
    return 1 if failed else 0


@app.command()
def index(paths: list[Path] = typer.Argument(..., help="Audio files or folders (searched recursively)."),
          label_from_folders: bool = typer.Option(False, "--label-from-folders", help="Parent folder name is the label."),
          label_regex: Optional[str] = typer.Option(None, "--label-regex", help="Label = group 1 of this regex over the file name."),
          prune: bool = typer.Option(False, "--prune", help="Delete indexed files under PATHS that no longer exist."),
          encoder: Optional[str] = typer.Option(None, "--encoder", help="Encoder for a new index: cnn (default) or features."),
          index: Optional[Path] = IndexOpt, quiet: bool = QuietOpt, as_json: bool = JsonOpt):
    """Index audio files; re-running picks up only new, changed and moved files."""
    if label_from_folders and label_regex:
        _err("Error: use --label-from-folders or --label-regex, not both")
        raise typer.Exit(2)
    with _engine(index, encoder) as engine, _progress("indexing", not (quiet or as_json)) as progress:
        report = engine.index(paths, label_from_folders=label_from_folders, label_regex=label_regex, prune=prune,
                              progress=progress)
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
    elif not quiet:
        typer.echo(f"{len(report.added)} added, {len(report.moved)} moved, {len(report.unchanged)} unchanged, "
                   f"{len(report.pruned)} pruned, {len(report.failed)} failed")
    raise typer.Exit(_report_failures(report.failed))


@app.command()
def query(clips: list[Path] = typer.Argument(..., help="Clips (or folders of clips) to look up."),
          k: int = typer.Option(5, "-k", min=1, help="How many neighbours to return."),
          include: list[str] = typer.Option([], "--include", help="Only neighbours whose path matches this glob (repeatable)."),
          exclude: list[str] = typer.Option([], "--exclude", help="No neighbours whose path matches this glob (repeatable)."),
          unknown_threshold: Optional[float] = typer.Option(None, "--unknown-threshold",
                                                             help="Answer 'unknown' below this similarity [default: the encoder's]."),
          plot: Optional[Path] = typer.Option(None, "--plot", help="Draw the query beside its neighbours to this PNG "
                                                                   "(several clips: NAME-1.png, NAME-2.png ...)."),
          index: Optional[Path] = IndexOpt, quiet: bool = QuietOpt, as_json: bool = JsonOpt):
    """Find the most similar indexed clips and categorise each clip by a neighbour vote."""
    errors: list = []
    with _engine(index) as engine:
        results = engine.query(clips, k=k, include=include, exclude=exclude, unknown_threshold=unknown_threshold,
                               errors=errors)
    if plot:
        from .plots import query_figure

        for i, result in enumerate(results, 1):
            query_figure(result.to_dict(), plot if len(results) == 1 else plot.with_stem(f"{plot.stem}-{i}"))
    for result in results:
        if as_json:
            typer.echo(json.dumps(result.to_dict()))
            continue
        category = (f"{result.category.label} (confidence {result.category.confidence:.2f})"
                    if result.category else "unknown")
        typer.echo(f"{result.path}\n  category: {category}")
        for n, neighbour in enumerate(result.neighbours, 1):
            span = f" [{neighbour.start:.1f}-{neighbour.end:.1f} s]" if neighbour.end - neighbour.start else ""
            typer.echo(f"  {n:>2}. {neighbour.score:.3f}  {neighbour.path}{span}"
                       + (f"  ({neighbour.label})" if neighbour.label else ""))
    raise typer.Exit(_report_failures(errors))


@app.command()
def label(name: str = typer.Argument(..., help="The category to give."),
          clips: list[Path] = typer.Argument(..., help="Clips (indexed or not) that are examples of it."),
          index: Optional[Path] = IndexOpt, quiet: bool = QuietOpt, as_json: bool = JsonOpt):
    """Teach a category from a few examples; clips not yet indexed are added."""
    with _engine(index) as engine, _progress("labelling", not (quiet or as_json)) as progress:
        report = engine.label(name, clips, progress=progress)
        count = engine.labels().get(name, 0)
    if as_json:
        typer.echo(json.dumps({"label": name, "files": count, **report.to_dict()}))
    elif not quiet:
        typer.echo(f"{name}: {count} labelled files ({len(report.added)} newly indexed)")
    raise typer.Exit(_report_failures(report.failed))


@app.command()
def unlabel(clips: list[Path] = typer.Argument(...), index: Optional[Path] = IndexOpt):
    """Remove the label of indexed clips (they stay searchable)."""
    with _engine(index) as engine:
        typer.echo(f"{engine.unlabel(clips)} labels removed")


@app.command()
def labels(index: Optional[Path] = IndexOpt, as_json: bool = JsonOpt):
    """List categories and how many files carry each."""
    with _engine(index) as engine:
        counts = engine.labels()
    if as_json:
        typer.echo(json.dumps(counts))
    else:
        for name, count in counts.items():
            typer.echo(f"{count:>7}  {name}")


@app.command()
def remove(paths: list[Path] = typer.Argument(..., help="Indexed files or folders to delete from the index."),
           index: Optional[Path] = IndexOpt, quiet: bool = QuietOpt):
    """Delete files from the index (SQLite and FAISS); the audio files are not touched."""
    with _engine(index) as engine:
        removed = engine.remove(paths)
    if not quiet:
        typer.echo(f"{len(removed)} files removed")


@app.command()
def info(index: Optional[Path] = IndexOpt, as_json: bool = JsonOpt):
    """Counts, encoder, FAISS index type and size on disk."""
    with _engine(index) as engine:
        data = engine.info()
        failures = len(engine.failures())
    if as_json:
        typer.echo(json.dumps(data))
        return
    for key in ("files", "segments", "encoder", "index_type", "bytes"):
        typer.echo(f"{key:>10}: {data[key]}")
    typer.echo(f"{'labels':>10}: " + (", ".join(f"{k} ({v})" for k, v in data["labels"].items()) or "none"))
    if failures:
        typer.echo(f"{'unreadable':>10}: {failures} files (see `simsearch failures`)")


@app.command()
def failures(index: Optional[Path] = IndexOpt):
    """Files that could not be read, with the reason."""
    with _engine(index) as engine:
        for path, reason in engine.failures():
            typer.echo(f"{path}: {reason}")


@app.command()
def reembed(encoder: str = typer.Option(..., "--encoder", help="Encoder to re-embed every indexed file with."),
            index: Optional[Path] = IndexOpt, quiet: bool = QuietOpt):
    """Re-embed the whole index with another encoder (labels kept; atomic)."""
    with _engine(index) as engine, _progress("re-embedding", not quiet) as progress:
        report = engine.reembed(encoder, progress=progress)
    if not quiet:
        typer.echo(f"{len(report.added)} files re-embedded with {encoder}, {len(report.failed)} failed")
    raise typer.Exit(_report_failures(report.failed))


class Augmentation(str, enum.Enum):
    light = "light"
    full = "full"


AugmentOpt = typer.Option(Augmentation.light, "--augment",
                          help="light: crops with speed/pitch jitter; full: also noise, reverb, mixing, "
                               "band-limiting, SpecAugment (for recordings that vary more than your labels show).")


@app.command()
def train(epochs: int = typer.Option(6, "--epochs", min=1, help="Passes over the labelled clips."),
          seed: int = typer.Option(0, "--seed", help="Same seed, same labels: the same adapted model."),
          augment: Augmentation = AugmentOpt,
          index: Optional[Path] = IndexOpt, quiet: bool = QuietOpt, as_json: bool = JsonOpt):
    """Adapt the CNN to this index's labels, re-embed everything, switch atomically when done."""
    from .adapt import AdaptConfig

    with _engine(index) as engine, _staged_progress(not (quiet or as_json)) as progress:
        config = AdaptConfig(epochs=epochs, seed=seed, augmentation=augment.value)
        summary = engine.train(config=config, progress=progress)
    if as_json:
        typer.echo(json.dumps(summary))
    elif not quiet:
        typer.echo(f"now using {summary['encoder']}: trained on {summary['trained_on']} labelled files "
                   f"({len(summary['labels'])} labels), re-embedded {summary['reembedded']} files")
    raise typer.Exit(_report_failures(summary["failed"]))


@contextlib.contextmanager
def _staged_progress(enabled: bool):
    """Like :func:`_progress` for several stages: yields ``progress(stage, done, total)``."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=True) as bar:
        tasks = {}

        def update(stage, done, total):
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield update


@app.command()
def show(clip: Path = typer.Argument(..., help="An audio file."),
         plot: Path = typer.Option(..., "--plot", help="PNG to write: mel spectrogram, chroma, spectral contrast.")):
    """Draw what the handcrafted strategy sees in a clip (mel spectrogram, chroma, spectral contrast)."""
    from . import audio
    from .errors import AudioReadError
    from .plots import features_figure

    try:
        decoded = audio.load(clip, sample_rate=16000)
    except AudioReadError as e:
        _err(f"Error: {e}")
        raise typer.Exit(1)
    features_figure(str(clip), decoded.samples, plot, sample_rate=decoded.sample_rate)
    typer.echo(f"wrote {plot}")


@app.command()
def evaluate(paths: list[Path] = typer.Argument(..., help="A labelled library (files or folders)."),
             label_regex: Optional[str] = typer.Option(None, "--label-regex", help="Label = group 1 of this regex over the file name."),
             label_from_folders: bool = typer.Option(False, "--label-from-folders", help="Parent folder name is the label."),
             group_regex: Optional[str] = typer.Option(None, "--group-regex",
                                                       help="Group = group 1 over the file name; leave one group out."),
             folds: Optional[int] = typer.Option(None, "--folds", min=2, help="K stratified folds (default 5 without groups)."),
             encoder: str = typer.Option("cnn,features", "--encoder", help="Comma-separated strategies to compare."),
             k: int = typer.Option(10, "-k", min=1, help="Neighbours in the vote."),
             seed: int = typer.Option(0, "--seed"),
             shots: Optional[str] = typer.Option(None, "--shots", help="Few-shot curve, e.g. 1,5,10 examples per class."),
             unknown: int = typer.Option(0, "--unknown", min=0, help="Hide this many classes; measure 'unknown' rejection."),
             repeats: int = typer.Option(5, "--repeats", min=1, help="Seeded repeats for --shots and --unknown (--unknown: rounds per fold, "
                                                          "each hiding other classes; with --adapt each trains a model)."),
             adapt: bool = typer.Option(False, "--adapt", help="Also adapt the CNN inside each fold (its labelled part only)."),
             epochs: int = typer.Option(6, "--epochs", min=1, help="Adaptation epochs for --adapt."),
             augment: Augmentation = AugmentOpt,
             plot: Optional[Path] = typer.Option(None, "--plot", help="Write confusion matrices to this PNG "
                                                                      "(and the few-shot curve to NAME-fewshot.png)."),
             quiet: bool = QuietOpt, as_json: bool = JsonOpt):
    """Measure strategies side by side: top-1, k-NN vote accuracy and macro-F1, per class."""
    from .adapt import AdaptConfig
    from .config import VoteConfig
    from .errors import SimsearchError
    from . import evaluate as evaluation

    try:
        with _progress("embedding", not (quiet or as_json)) as progress:
            result = evaluation.evaluate(paths, encoders=[e.strip() for e in encoder.split(",") if e.strip()],
                                         label_regex=label_regex, label_from_folders=label_from_folders,
                                         group_regex=group_regex, folds=folds, seed=seed, vote_config=VoteConfig(k=k),
                                         shots=[int(n) for n in shots.split(",")] if shots else (), unknown=unknown,
                                         repeats=repeats, adapt=adapt,
                                         adapt_config=AdaptConfig(epochs=epochs, seed=seed, augmentation=augment.value),
                                         progress=progress)
    except SimsearchError as e:
        _err(f"Error: {e}")
        raise typer.Exit(2)
    if plot:
        from .plots import confusion_matrices

        confusion_matrices(result["strategies"], plot)
        curves = {name: r["few_shot"] for name, r in result["strategies"].items() if "few_shot" in r}
        if curves:
            from .plots import few_shot_curve

            few_shot_curve(curves, plot.with_stem(f"{plot.stem}-fewshot"))
    if as_json:
        typer.echo(json.dumps(result))
    else:
        _print_evaluation(result)
    failed = [f for r in result["strategies"].values() for f in r["failed"]]
    raise typer.Exit(_report_failures(sorted({(f["path"], f["reason"]) for f in failed})))


def _print_evaluation(result: dict) -> None:
    typer.echo(f"{result['files']} files, {result['labels']} labels, {result['folds']} folds ({result['split']})\n")
    typer.echo(f"{'strategy':<16}{'top-1':>8}{'vote':>8}{'macro-F1':>10}{'embed s':>9}")
    for r in result["strategies"].values():
        typer.echo(f"{r['encoder']:<16}{r['top1']:>8.3f}{r['vote']:>8.3f}{r['macro_f1']:>10.3f}{r['embed_seconds']:>9.1f}")
    names = list(result["strategies"])
    typer.echo("\nper fold (top-1): " + ", ".join(names))
    for i, fold in enumerate(result["strategies"][names[0]]["folds"]):
        values = "  ".join(f"{result['strategies'][n]['folds'][i]['top1']:.3f}" for n in names)
        typer.echo(f"  {fold['group']:<14}{fold['files']:>6}  {values}")
    typer.echo("\nper class (vote F1): " + ", ".join(names))
    for label in result["strategies"][names[0]]["per_class"]:
        values = "  ".join(f"{result['strategies'][n]['per_class'][label]['f1']:.3f}" for n in names)
        typer.echo(f"  {label:<20}{values}")
    with_shots = {n: r["few_shot"] for n, r in result["strategies"].items() if "few_shot" in r}
    if with_shots:
        typer.echo("\nfew-shot (vote accuracy by labelled examples per class):")
        for name, curve in with_shots.items():
            typer.echo(f"  {name:<14}" + "  ".join(f"{n}-shot {acc:.3f}" for n, acc in curve.items()))
    with_unknown = {n: r["unknown"] for n, r in result["strategies"].items() if "unknown" in r}
    if with_unknown:
        typer.echo("\nunknown rejection:")
        for name, u in with_unknown.items():
            if u["auroc"] is None:
                typer.echo(f"  {name:<14}not measured (no known or no unknown queries)")
                continue
            per_round = [r["auroc"] for r in u["rounds"] if r["auroc"] is not None]
            spread = (f"mean of {len(per_round)} rounds {u['auroc_per_round']:.3f}, "
                      f"{min(per_round):.2f}-{max(per_round):.2f}") if per_round else "no round has both kinds"
            typer.echo(f"  {name:<14}AUROC {u['auroc']:.3f} ({spread})  "
                       f"at threshold {u['threshold']:.2f}: decision acc "
                       f"{u['decision_accuracy']:.3f}, balanced {u['balanced_accuracy']:.3f}, open-set acc "
                       f"{u['open_set_accuracy']:.3f}  (best balanced at {u['best_threshold']:.2f}: "
                       f"{u['balanced_accuracy_at_best']:.3f})")


def main() -> None:
    """The console entry point: run one command, then leave without a final collection.

    When a command has finished (its index closed, its output written), the interpreter's
    teardown would still run a full garbage collection over everything typer, torch, FAISS
    and the index loaded: about 0.4 s, a quarter of a cold ``simsearch query``
    (``bench/cold_cli.py``). ``gc.freeze()`` moves those objects out of the collector's
    reach, so the teardown skips that pass; everything else still happens as usual (atexit
    handlers, objects released by reference counting, buffered files flushed and closed).
    ``os._exit`` was as fast but would skip all of that, so a missed close could lose data.
    """
    try:
        app(prog_name="simsearch")
    finally:
        gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
