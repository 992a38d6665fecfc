"""--jobs: the packages compile in worker processes. The session's tiny_artifact is exported with --jobs 2, so every
test that compares it with diffusers checks the packages the workers built; here: the option's checks, a worker's
death, Ctrl-C, and what the workers leave behind (nothing)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import assert_export_refused, export

from fastdiff.runtime import FastDiffError, read_manifest


@pytest.mark.parametrize(
    ("jobs", "phrase"), [("0", "--jobs must be at least 1, got 0"), ("four", "--jobs must be a number or auto")]
)
def test_jobs_option_is_checked(exports: Path, jobs: str, phrase: str) -> None:
    proc, seconds = export("tiny-sdxl", "--res", "64", "--device", "cpu", "--out", str(exports / "a"), "--jobs", jobs)
    assert_export_refused(proc, seconds, exports, phrase)
    assert list(exports.iterdir()) == []


def test_auto_is_one_worker_per_four_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from fastdiff.exporter.jobs import default_jobs

    for cores, jobs in [(1, 1), (2, 1), (8, 2), (16, 4), (128, 4)]:
        monkeypatch.setattr(os, "cpu_count", lambda n=cores: n)
        assert default_jobs() == jobs


def test_the_workers_leave_nothing_in_the_artifact(tiny_artifact: Path) -> None:
    assert not (tiny_artifact / "programs.tmp").exists()
    assert not [rel for rel in read_manifest(tiny_artifact).files if "program" in rel]


class TwoLayers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_a_dead_worker_is_one_clear_error(tmp_path: Path) -> None:
    """A worker killed mid-compile (the kernel's out-of-memory killer, say): the package's result says so in one
    error, and the program files go with the compiler."""
    from fastdiff.exporter.compile import export_program
    from fastdiff.exporter.jobs import PackageCompiler, package_of

    program = export_program(TwoLayers(), (torch.randn(2, 8),), None)
    scratch = tmp_path / "programs.tmp"
    others = set(multiprocessing.active_children())  # not this compiler's to kill
    with pytest.raises(FastDiffError) as raised:
        with PackageCompiler(2, scratch) as compiler:
            compiling = compiler.compile(program, tmp_path / "a.pt2", {}, torch.device("cpu"), "default", "a.pt2", None)
            workers = set(multiprocessing.active_children()) - others
            assert workers
            for worker in workers:
                os.kill(worker.pid, signal.SIGKILL)
            package_of(compiling, "a.pt2")
    assert "a compile worker process died while a.pt2 compiled" in raised.value.problem
    assert "--jobs 1" in raised.value.fix
    assert not scratch.exists() and not (tmp_path / "a.pt2").exists()


def test_a_program_torch_cannot_save_compiles_in_the_exporting_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from fastdiff.exporter.compile import export_program
    from fastdiff.exporter.jobs import PackageCompiler, package_of

    def refuse(program: torch.export.ExportedProgram, path: Path) -> None:
        Path(path).write_bytes(b"half")
        raise RuntimeError("cannot serialize a tensor subclass")

    monkeypatch.setattr(torch.export, "save", refuse)
    model, example = TwoLayers(), torch.randn(2, 8)
    others = set(multiprocessing.active_children())
    with PackageCompiler(2, tmp_path / "programs.tmp") as compiler:
        program = export_program(model, (example,), None)
        compiling = compiler.compile(program, tmp_path / "a.pt2", {}, torch.device("cpu"), "default", "a.pt2", None)
        assert compiling.done() and set(multiprocessing.active_children()) == others  # no worker was started
        assert list((tmp_path / "programs.tmp").iterdir()) == []
    assert "a.pt2: torch.export.save cannot write its program (RuntimeError" in capsys.readouterr().err
    package = torch._inductor.aoti_load_package(str(package_of(compiling, "a.pt2")))
    package.load_constants(dict(model.state_dict()), check_full_update=True)
    assert torch.allclose(package(example), model(example))


def children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(child) for child in (task / "children").read_text().split()}
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


@pytest.mark.slow  # fastdiff-export runs until its workers compile
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the process tree from Linux's /proc")
def test_ctrl_c_ends_the_workers_and_leaves_nothing(exports: Path) -> None:
    """Ctrl-C reaches the terminal's whole process group: the export and its workers. The workers leave it to the
    exporting process, which ends them, removes its partial folder and says so in one line."""
    code = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "  # as a foreground process
    code += "import sys; from fastdiff.exporter.cli import main; sys.argv[0] = 'fastdiff-export'; main()"
    args = ["tiny-sdxl", "--res", "64", "--device", "cpu", "--jobs", "2", "--out", str(exports / "a")]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while not list(exports.glob("*.partial-*/programs.tmp")) or len(children(proc.pid)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "the export never started its workers"
        time.sleep(0.2)
    time.sleep(2)  # the first program handed over and compiling
    workers = children(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert "interrupted: nothing was written" in stderr, stderr
    assert list(exports.iterdir()) == []
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers):
        assert time.monotonic() < deadline, "a compile worker outlived the export"
        time.sleep(0.2)
