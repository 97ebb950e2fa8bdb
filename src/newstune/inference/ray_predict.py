"""Batch scoring of many files on Ray: Ray Data hands pieces of the inputs to a pool of model actors (one per
worker); each piece becomes one output shard, written under a temporary name and renamed when complete, so a re-run
skips the finished shards and no row is lost or written twice.

A piece is a fixed range of rows of one input file, read with newstune's own reader (`predict.read_chunks`), not with
Ray Data's: that reader keeps every bad row with its line number and error, as local predict does.
"""

from __future__ import annotations

import fcntl
import glob
import itertools
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from newstune.data.files import JsonlRow
from newstune.distributed.cluster import check_workers, cluster_cpus, ray_session, require_ray, root_cause
from newstune.errors import Interrupted, NewstuneError
from newstune.inference.predict import CHUNK_ROWS, OutputWriter, _predict_chunks, file_kind, read_chunks
from newstune.rundir.run import LoadedRun, load_run, require_run

MANIFEST = "_newstune_predict.json"
LOCK = ".lock"
OWN_FILES = (LOCK, f".{MANIFEST}.tmp")  # what a run killed before its manifest was written may have left
DEFAULT_SHARD_ROWS = 8192
MAX_ERRORS_SHOWN = 20  # per shard on the driver's stderr; every bad row stays in its shard with its error


@dataclass
class Piece:
    source: str
    index: int
    start: int
    rows: int
    shard: str


def expand_inputs(pattern: str) -> list[Path]:
    paths = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True) if Path(p).is_file())
    if not paths:
        raise NewstuneError(f"--input {pattern}: no files match; check the pattern and quote it "
                            "(--input 'archive/*.jsonl.gz') so the shell does not expand it")
    for path in paths:
        file_kind(path)
    return [p.resolve() for p in paths]


def shard_name(source: Path, root: Path, index: int) -> str:
    """One name per (input file, piece): the input's path under the common folder, then the piece number."""
    flat = str(source.relative_to(root)).replace(os.sep, "__")
    return f"{flat}.part-{index:05d}.{file_kind(source)}"


def count_rows(path: Path) -> int:
    return sum(len(chunk) for chunk in read_chunks(path))


def plan_pieces(inputs: list[Path], shard_rows: int, known: dict) -> tuple[list[Piece], dict]:
    """Every input's rows (from the manifest when the file is unchanged, else counted) cut into pieces."""
    root = Path(os.path.commonpath([p.parent for p in inputs]))
    pieces, files = [], {}
    for path in tqdm(inputs, desc="count rows", unit="file", disable=len(inputs) < 2):
        stat = path.stat()
        facts = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        earlier = known.get(str(path))
        if earlier is not None and {k: earlier[k] for k in facts} != facts:
            raise NewstuneError(f"input {path} changed since the earlier predict into this --output; "
                                "choose another --output")
        rows = earlier["rows"] if earlier else count_rows(path)
        if rows == 0:
            print(f"{path}: no data rows; skipped", file=sys.stderr)
        files[str(path)] = {**facts, "rows": rows}
        for index, start in enumerate(range(0, rows, shard_rows)):
            pieces.append(Piece(str(path), index, start, min(shard_rows, rows - start),
                                shard_name(path, root, index)))
    return pieces, files


def open_output(out_dir: Path, run_dir: Path, shard_rows: int) -> dict:
    """The output folder, new or holding an earlier predict of the same run and shard size (a resume);
    returns the earlier manifest's inputs. Anything else in the way is refused: earlier results stay."""
    if out_dir.exists() and not out_dir.is_dir():
        raise NewstuneError(f"--output {out_dir} is a file; with --engine ray --output is a folder for the shards")
    manifest = out_dir / MANIFEST
    if not manifest.is_file():
        if out_dir.is_dir() and any(p.name not in OWN_FILES for p in out_dir.iterdir()):
            raise NewstuneError(f"output folder {out_dir} is not empty and holds no newstune predict shards; "
                                "choose another --output")
        out_dir.mkdir(parents=True, exist_ok=True)
        return {}
    earlier = json.loads(manifest.read_text())
    if earlier["run"] != str(run_dir) or earlier["shard_rows"] != shard_rows:
        raise NewstuneError(f"output folder {out_dir} holds predictions of {earlier['run']} in shards of "
                            f"{earlier['shard_rows']} rows; choose another --output (or rerun with that run and "
                            "--shard-rows to resume it)")
    return earlier["inputs"]


def write_manifest(out_dir: Path, run_dir: Path, shard_rows: int, files: dict) -> None:
    tmp = out_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"run": str(run_dir), "shard_rows": shard_rows, "inputs": files}, indent=1))
    tmp.replace(out_dir / MANIFEST)


def remove_stale_partials(out_dir: Path) -> None:
    """Temporary shards of a killed earlier run (this folder is locked: no live run is writing them)."""
    for partial in out_dir.glob(".*.partial"):
        partial.unlink(missing_ok=True)


def piece_chunks(path: Path, start: int, rows: int) -> Iterator[list[JsonlRow]]:
    """Rows start .. start+rows of the file, CHUNK_ROWS at a time, with their own line numbers and errors."""
    flat = itertools.islice(itertools.chain.from_iterable(read_chunks(path)), start, start + rows)
    while chunk := list(itertools.islice(flat, CHUNK_ROWS)):
        yield chunk


class ShardWriter(OutputWriter):
    """Local predict's writer, with the source file in front of each row and the bad rows kept for the driver."""

    def __init__(self, path: Path, label_names: list[str], kind: str, source: str) -> None:
        super().__init__(path, label_names, kind)
        self.source = source
        self.bad: list[str] = []

    def write(self, record: dict) -> None:
        if record.get("error"):
            self.bad.append(f"{self.source}:{record['line']}: {record['error']}")
        super().write({"source_file": self.source, **record})


def score_piece(run: LoadedRun, piece: Piece, out_dir: Path, batch_size: int) -> dict:
    """Scores one piece into its shard: written under a temporary name, renamed once every row is in."""
    path = out_dir / piece.shard
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        writer = ShardWriter(partial, run.label_names, file_kind(path), piece.source)
        try:
            # local predict's per-row stderr lines and bar stay out of worker logs; the driver shows the errors
            with open(os.devnull, "w") as quiet, redirect_stderr(quiet):
                counts = _predict_chunks(run, piece_chunks(Path(piece.source), piece.start, piece.rows), writer,
                                         Path(piece.source), batch_size)
        finally:
            writer.close()
        if counts["rows"] != piece.rows:
            raise NewstuneError(f"{piece.source} changed while predicting: {counts['rows']} rows from line "
                                f"range of piece {piece.index}, {piece.rows} expected")
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return {**counts, "shard": piece.shard, "bad": json.dumps(writer.bad[:MAX_ERRORS_SHOWN])}


class PieceScorer:
    """A Ray actor holding one loaded run; called with a batch of pieces, returns one summary row per piece."""

    def __init__(self, run_dir: str, out_dir: str, batch_size: int, threads: int, backend: str | None) -> None:
        import torch

        torch.set_num_threads(threads)
        self.run = load_run(Path(run_dir), **({"backend": backend} if backend else {}))
        self.out_dir, self.batch_size = Path(out_dir), batch_size

    def __call__(self, batch: dict) -> dict:
        pieces = [Piece(str(source), int(index), int(start), int(rows), str(shard)) for source, index, start, rows,
                  shard in zip(*(batch[k] for k in Piece.__dataclass_fields__))]
        summaries = [score_piece(self.run, piece, self.out_dir, self.batch_size) for piece in pieces]
        return {key: [s[key] for s in summaries] for key in summaries[0]}


def predict_files(run_dir: Path, pattern: str, out_dir: Path, batch_size: int = 64, workers: int | None = None,
                  address: str | None = None, shard_rows: int = DEFAULT_SHARD_ROWS,
                  backend: str | None = None) -> dict:
    """Scores every file matching `pattern` into shards in out_dir on a Ray cluster; resumes an earlier run."""
    if shard_rows < 1:
        raise NewstuneError(f"--shard-rows {shard_rows}: give a positive number of rows")
    require_ray()  # before any output folder exists
    run_dir = require_run(Path(run_dir)).resolve()
    inputs = expand_inputs(pattern)
    out_dir = out_dir.resolve()
    known = open_output(out_dir, run_dir, shard_rows)
    with _locked(out_dir):
        pieces, files = plan_pieces(inputs, shard_rows, known)
        write_manifest(out_dir, run_dir, shard_rows, {**known, **files})
        remove_stale_partials(out_dir)
        todo = [p for p in pieces if not (out_dir / p.shard).is_file()]
        counts = {"rows": 0, "predicted": 0, "errors": 0, "shards": len(todo),
                  "skipped_shards": len(pieces) - len(todo), "skipped_rows": sum(p.rows for p in pieces) -
                  sum(p.rows for p in todo)}
        if todo:
            _run_pieces(todo, run_dir, out_dir, batch_size, workers, address, backend, counts)
    return counts


def _run_pieces(todo: list[Piece], run_dir: Path, out_dir: Path, batch_size: int, workers: int | None,
                address: str | None, backend: str | None, counts: dict) -> None:
    with ray_session(address) as ray:
        workers = workers or cluster_cpus(ray)
        check_workers(ray, workers)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        items = ray.data.from_items([asdict(p) for p in todo], override_num_blocks=len(todo))
        scored = items.map_batches(
            PieceScorer, batch_size=1, num_cpus=1,
            compute=ray.data.ActorPoolStrategy(size=min(workers, len(todo)), max_tasks_in_flight_per_actor=1),
            fn_constructor_kwargs=dict(run_dir=str(run_dir), out_dir=str(out_dir), batch_size=batch_size, threads=1,
                                       backend=backend))
        try:
            _collect(scored, sum(p.rows for p in todo), workers, counts)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted; {counts['rows']} rows are in complete shards in {out_dir}. Rerun the "
                              "same command to finish the rest") from None
        except Exception as err:
            if "NewstuneError" not in str(err):
                raise
            raise NewstuneError(root_cause(err)) from None


def _collect(scored, total: int, workers: int, counts: dict) -> None:
    """Adds up the shards' summaries as they finish; shows their bad rows as local predict does."""
    with tqdm(total=total, desc=f"predict on ray ({workers} workers)", unit="rows") as bar:
        for summary in scored.iter_rows():
            for line in json.loads(summary["bad"]):
                tqdm.write(line, file=sys.stderr)
            for key in ("rows", "predicted", "errors"):
                counts[key] += int(summary[key])
            bar.update(int(summary["rows"]))


@contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    """One predict at a time writes into a folder (flock on a file inside it)."""
    with (out_dir / LOCK).open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise NewstuneError(f"another predict is writing into {out_dir}; wait for it to finish or "
                                "choose another --output") from None
        yield
