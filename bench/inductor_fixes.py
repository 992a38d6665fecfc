"""Lets torch.compile reuse the coordinate-descent picks in its cache (the seed recipe's Inductor flags turn that
tuning on), where torch 2.11 and triton 3.6 tune every Triton kernel again on each compile however warm the cache.
speed.py applies it to its compile baselines that tune that way (step times are what it measures) and records that
it did; coldstart.py does not (it measures the compile users get).

Two places drop a cached pick's `found_by_coordesc` flag, which `CachingAutotuner.run()` checks before tuning:
- `triton.Config.__setstate__` restores only Config's own fields, so a pick that a compile worker found in the cache
  loses the flag when the kernel is unpickled in the main process;
- `CachingAutotuner.recheck_autotune_cache` (kernels from the FX graph cache) skips the cache when one config was
  compiled and does not mark the config it matches (pytorch/pytorch#172819).
"""

from __future__ import annotations

import inspect
import pickle


def keep_coordinate_descent_picks() -> list[str]:
    """Installs the fixes this torch and triton need (none where they keep the flag); returns what it patched."""
    import triton
    from torch._inductor.runtime import triton_heuristics

    patched = []
    probe = triton.Config({})
    probe.found_by_coordesc = True
    if not getattr(pickle.loads(pickle.dumps(probe)), "found_by_coordesc", False):
        _keep_flag_through_pickle(triton.Config)
        patched.append("triton.Config.__setstate__")
    autotuner = triton_heuristics.CachingAutotuner
    if "found_by_coordesc = " not in inspect.getsource(autotuner.recheck_autotune_cache):
        _recheck_marks_pick(autotuner, triton_heuristics)
        patched.append("CachingAutotuner.recheck_autotune_cache")
    return patched


def _keep_flag_through_pickle(config_class) -> None:
    setstate = config_class.__setstate__

    def __setstate__(self, state: dict) -> None:
        setstate(self, state)
        if state.get("found_by_coordesc"):
            self.found_by_coordesc = True

    config_class.__setstate__ = __setstate__


def _recheck_marks_pick(autotuner, triton_heuristics) -> None:
    recheck = autotuner.recheck_autotune_cache

    def recheck_autotune_cache(self, reload_kernel_from_src) -> None:
        compiled = list(self.compile_results)
        recheck(self, reload_kernel_from_src)
        cached, _, _ = triton_heuristics.check_autotune_cache(
            [result.config for result in compiled], self.filename, self.inductor_meta
        )
        if len(cached) != 1 or not getattr(cached[0], "found_by_coordesc", False):
            return
        pick = triton_heuristics.triton_config_to_hashable(cached[0])
        for result in [*self.compile_results, *compiled]:
            if triton_heuristics.triton_config_to_hashable(result.config) == pick:
                result.config.found_by_coordesc = True
                self.compile_results = [result]
                return
        if self.fn.fn is None:
            self.fn = reload_kernel_from_src().fn
        self.compile_results = [self._precompile_config(cached[0])]

    autotuner.recheck_autotune_cache = recheck_autotune_cache
