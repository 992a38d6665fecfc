"""The export's AOTInductor compiles: one after another in the exporting process, or beside each other in worker
processes (--jobs N). A compile is mostly single-threaded (lowering, code generation, the C++ wrapper's build), so
the packages of several resolutions and components compile in about the time of the slowest one.

A worker gets its program through a file (torch.export.save: the graph and its constants), saved just before a
worker is free to take it and deleted once loaded, so that at most N programs' weights are on disk at a time; the
worker exports it again from its graph (with the same dynamic batch) and compiles that.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from fastdiff.runtime.format import FastDiffError

from .attention import attention_backend
from .compile import compile_package, export_program
from .progress import log, phase


def default_jobs() -> int:
    """Worker processes for --jobs auto: one per four cores (each compile also runs Triton's and g++'s compilers in
    threads and processes of its own), at most four."""
    return max(1, min(4, (os.cpu_count() or 1) // 4))


class PackageCompiler:
    """Compiles exported programs to packages: inline when jobs is 1, else in `jobs` spawned worker processes while
    the caller exports the next programs. compile() returns a future of the package's path; leaving the `with` block
    on an error stops the workers."""

    def __init__(self, jobs: int, scratch: Path) -> None:
        self._scratch = scratch  # a folder of its own, made here and removed on exit (with jobs > 1)
        self._slots = threading.BoundedSemaphore(jobs)
        self._saved = 0
        self._pool: ProcessPoolExecutor | None = None
        if jobs > 1:
            scratch.mkdir()
            threads = max(1, (os.cpu_count() or 1) // jobs)
            self._pool = ProcessPoolExecutor(
                jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker, initargs=(threads,)
            )

    def compile(
        self,
        program: torch.export.ExportedProgram,
        path: Path,
        configs: dict[str, Any],
        device: torch.device,
        attention: str,
        label: str,
        dynamic_shapes: dict[str, Any] | None,
    ) -> Future[Path]:
        """Compile `program` to the package `path` with Inductor's `configs` and the SDPA backend `attention`; in a
        worker, from its graph exported again with `dynamic_shapes` (the batch dimension the program has)."""
        if self._pool is not None:
            self._slots.acquire()  # a worker is free (or about to be): only then is the program written out
            try:
                saved = self._save(program, label)
                if saved is not None:
                    start = time.perf_counter()
                    with _sigint_held():  # the pool starts its workers in submit
                        future = self._pool.submit(
                            _compile_saved, str(saved), str(path), configs, str(device), attention, dynamic_shapes
                        )
                    log(f"AOTInductor compile {label} ... (in a worker process)")
                    future.add_done_callback(lambda f: self._finished(f, label, start))
                    return future
            except BaseException:
                self._slots.release()
                raise
            self._slots.release()
        done: Future[Path] = Future()
        with phase(f"AOTInductor compile {label}"), attention_backend(attention):
            done.set_result(compile_package(program, path, configs, device))
        return done

    def _save(self, program: torch.export.ExportedProgram, label: str) -> Path | None:
        """The program in a file for a worker; None (said in the log) where torch.export cannot save it: then it
        compiles in this process, as with --jobs 1."""
        self._saved += 1
        saved = self._scratch / f"program-{self._saved}.pt2"
        try:
            torch.export.save(program, saved)
        except Exception as e:  # whatever torch's serializer cannot take, the compile still can (a full disk: there)
            saved.unlink(missing_ok=True)
            log(f"{label}: torch.export.save cannot write its program ({type(e).__name__}: {e}); compiled here")
            return None
        return saved

    def _finished(self, future: Future[Path], label: str, start: float) -> None:
        self._slots.release()
        if not future.cancelled() and future.exception() is None:
            log(f"AOTInductor compile {label}: done in {time.perf_counter() - start:.1f} s")

    def __enter__(self) -> PackageCompiler:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: Any) -> None:
        if self._pool is None:
            return
        try:
            if kind is not None:
                self._stop_workers()
            self._pool.shutdown(wait=True, cancel_futures=True)
        finally:
            shutil.rmtree(self._scratch, ignore_errors=True)  # a program a dead worker did not take

    def _stop_workers(self) -> None:
        """End the running compiles now (an error elsewhere, or Ctrl-C): waiting would take minutes."""
        terminate = getattr(self._pool, "terminate_workers", None)  # Python 3.14+
        if terminate is not None:
            terminate()
            return
        for process in list((getattr(self._pool, "_processes", None) or {}).values()):
            process.terminate()


def package_of(future: Future[Path], label: str) -> Path:
    """The compiled package's path, or the compile's error (a worker's death said as one)."""
    try:
        return future.result()
    except BrokenProcessPool:
        raise FastDiffError(
            f"a compile worker process died while {label} compiled (out of memory, or killed)",
            "export with --jobs 1 (one compile at a time, in the exporting process), or free memory",
        ) from None


@contextmanager
def _sigint_held() -> Iterator[None]:
    """SIGINT blocked while workers start. A terminal's Ctrl-C reaches the whole process group: a worker, which
    inherits the mask, never sees it (not even in its imports, before _start_worker runs); the exporting process gets
    it once the mask is restored, and ends the workers."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _start_worker(threads: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # and a Ctrl-C held back meanwhile is dropped
    torch._inductor.config.compile_threads = threads  # the workers share the cores


def _compile_saved(
    saved: str, path: str, configs: dict[str, Any], device: str, attention: str, dynamic_shapes: dict[str, Any] | None
) -> Path:
    loaded = torch.export.load(saved)
    os.unlink(saved)
    args, _ = loaded.example_inputs
    with attention_backend(attention):
        # Compiled as loaded, a program can come out specialized to its example batch (CLIP's text encoder, torch
        # 2.13: the batch became a constant in its kernels); exported again from its graph, the batch stays dynamic.
        program = export_program(loaded.module(), args, dynamic_shapes)
        return compile_package(program, Path(path), configs, torch.device(device))
