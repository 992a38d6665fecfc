"""The checkpoint's diffusers scheduler, imported for a fast cold start: diffusers' first import does work that a
runtime which compiles nothing and runs one scheduler does not need."""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.metadata
import importlib.util
import inspect
import json
import sys
import threading
import types
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from .errors import FastDiffError


def load_scheduler(path: Path):
    """The checkpoint's own scheduler class and config."""
    try:
        config = json.loads((path / "scheduler_config.json").read_text())
        name = config["_class_name"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FastDiffError(f"cannot read the scheduler config in {path}: {e}", "export the model again") from None
    if not isinstance(name, str) or not name.isidentifier() or not name.endswith("Scheduler"):
        raise FastDiffError(
            f"the scheduler config in {path} names {name!r:.80} as its class, which is no diffusers scheduler",
            "export the model again",
        )
    scheduler_class = import_scheduler_class(name, needs_scipy=bool(config.get("use_beta_sigmas")))
    # Built as from_pretrained builds it, from the class's own keys, with the other keys kept in its config (for a
    # swap to another scheduler class), but without importing every compatible scheduler class to sort the keys (13
    # modules and scipy.integrate: half a second).
    params = inspect.signature(scheduler_class.__init__).parameters
    own = {k: v for k, v in config.items() if k in params and k != "self"}
    try:
        scheduler = scheduler_class(**own)
        scheduler.register_to_config(**{k: v for k, v in config.items() if k not in own and not k.startswith("_")})
        return scheduler
    except Exception as e:  # diffusers raises several types for a config it cannot use
        raise FastDiffError(f"cannot load scheduler {name} from {path}: {e}", "export the model again") from None


def import_scheduler_class(name: str, needs_scipy: bool = False) -> type:
    """diffusers' scheduler class `name`, imported without torch._dynamo where possible, without scipy.stats unless
    `needs_scipy` (the config uses beta sigmas), and without scanning every installed distribution's metadata.

    diffusers.utils imports torch._dynamo when it is first imported (all of dynamo: seconds, the largest part of a
    cold start once the weights are in the page cache) for a torch.compile decorator that its schedulers never use,
    and falls back to a no-op decorator when that import fails. The runtime compiles nothing, so on a first import
    it lets that import fail: dynamo is blocked in the importing thread for the duration of the import only (other
    threads, such as a profiler started during the load, import it as usual), and imports normally afterwards; the
    decorator diffusers' model classes get from that module (allow_in_graph) is put back, so that models imported
    later in the process compile as they would have.

    The Euler-family scheduler modules import scipy.stats (about half of the scheduler's import) for beta sigmas
    alone. While they import, a stand-in takes its place; once it is removed, `scipy.stats` (through
    scipy's lazy submodules) and `import scipy.stats` give the real module, imported on first use.

    diffusers.utils also maps every installed package to its distributions when first imported
    (importlib.metadata.packages_distributions: the metadata of every distribution read) and consults the map only
    if optimum, flashinfer or modelopt is installed (most of a second on an image with many packages). During the
    import that map is made on first use instead.
    """
    with _import_lock:  # what it patches for the import is process-wide: one import at a time
        return _import_scheduler_class(name, needs_scipy)


_import_lock = threading.Lock()


def _import_scheduler_class(name: str, needs_scipy: bool) -> type:
    first = "diffusers" not in sys.modules
    block = _RefusedInThisThread("torch._dynamo") if first and "torch._dynamo" not in sys.modules else None
    if block:
        sys.meta_path.insert(0, block)
    stand_in = None
    if not needs_scipy and "scipy.stats" not in sys.modules and importlib.util.find_spec("scipy") is not None:
        stand_in = sys.modules["scipy.stats"] = _StandIn("scipy.stats")
    scan = importlib.metadata.packages_distributions
    if first:
        importlib.metadata.packages_distributions = functools.partial(_LazyDistributions, scan)
    try:
        import diffusers.schedulers

        scheduler_class = getattr(diffusers.schedulers, name, None)  # imports the class's own module (lazily)
    except ImportError as e:
        raise FastDiffError(f"the runtime needs diffusers for its schedulers: {e}", "pip install diffusers") from None
    finally:
        importlib.metadata.packages_distributions = scan
        if block:
            sys.meta_path.remove(block)
        if block and block.refused:
            torch_utils = sys.modules.get("diffusers.utils.torch_utils")
            if torch_utils is not None:  # its no-op fallback would stay for diffusers' models imported later
                torch_utils.maybe_allow_in_graph = _allow_in_graph
        if stand_in is not None and sys.modules.get("scipy.stats") is stand_in:
            del sys.modules["scipy.stats"]
    if scheduler_class is None:
        raise FastDiffError(
            f"the artifact's scheduler {name} is not in the installed diffusers {diffusers.__version__}",
            "install the diffusers version the artifact was exported with (fastdiff-inspect shows it)",
        )
    if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, diffusers.schedulers.SchedulerMixin)):
        raise FastDiffError(f"{name} in diffusers is not a scheduler class", "export the model again")
    return scheduler_class


def _allow_in_graph(cls: type) -> type:
    """diffusers' maybe_allow_in_graph as it is where dynamo imports, importing dynamo when first applied (by a
    diffusers model module, which the runtime never imports)."""
    from torch._dynamo import allow_in_graph

    return allow_in_graph(cls)


class _RefusedInThisThread(importlib.abc.MetaPathFinder):
    """An import finder that fails imports of one module in the thread that made it, and lets every other thread
    import it as usual."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.thread = threading.get_ident()
        self.refused = False

    def find_spec(self, fullname: str, path, target=None) -> None:
        if fullname == self.name and threading.get_ident() == self.thread:
            self.refused = True
            raise ModuleNotFoundError(f"No module named {fullname!r} (not imported by fastdiff)", name=fullname)
        return None


class _StandIn(types.ModuleType):
    """Holds a module's place in sys.modules; the real module is imported when one of its attributes is used."""

    def __getattr__(self, attr: str):
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), attr)


class _LazyDistributions(Mapping):
    """packages_distributions()'s mapping (package name -> distribution names), made when first read."""

    def __init__(self, scan: Callable[[], Mapping[str, list[str]]]) -> None:
        self._scan = functools.cache(scan)

    def __getitem__(self, package: str) -> list[str]:
        return self._scan()[package]

    def __iter__(self) -> Iterator[str]:
        return iter(self._scan())

    def __len__(self) -> int:
        return len(self._scan())
