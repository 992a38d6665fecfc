"""Does a compiled package's call release the GIL? A spinning Python thread's rate while the main thread calls the
artifact's UNet package, against while it runs torch.mm (which does release it). One OpenMP thread, so the two
threads have a core each on a 2-core machine; a 0.1 ms switch interval, so a GIL hand-off costs little.

python bench/probe_gil.py ARTIFACT_DIR   (a CPU artifact, e.g. artifacts/tiny-sdxl)
"""

import sys
import threading
import time

import torch

from fastdiff.runtime import load_pipeline


def unet_and_inputs(pipe) -> tuple:
    """The UNet package and its inputs in a one-step generation."""
    key = next(iter(pipe.unets))
    unet, seen = pipe.unets[key], []
    pipe.unets[key] = lambda *inputs: seen.append(inputs) or unet(*inputs)
    pipe("probe", num_inference_steps=1, output_type="latent")
    pipe.unets[key] = unet
    return unet, seen[0]


def spinner_share(call, n: int = 20) -> tuple[float, float]:
    """(seconds for n calls, the share of its free rate a spinning thread kept meanwhile)."""
    count, stop = [0], threading.Event()

    def spin() -> None:
        while not stop.is_set():
            count[0] += 1

    thread = threading.Thread(target=spin)
    thread.start()
    start = count[0]
    time.sleep(1.0)
    free_rate = count[0] - start
    start, t0 = count[0], time.perf_counter()
    for _ in range(n):
        call()
    seconds = time.perf_counter() - t0
    spins = count[0] - start
    stop.set()
    thread.join()
    return seconds, spins / seconds / free_rate


def main() -> None:
    torch.set_num_threads(1)
    sys.setswitchinterval(0.0001)
    pipe = load_pipeline(sys.argv[1], device="cpu")
    pipe.set_progress_bar_config(disable=True)
    unet, inputs = unet_and_inputs(pipe)
    x = torch.randn(2048, 2048)
    for label, call in [("UNet package call", lambda: unet(*inputs)), ("torch.mm 2048²", lambda: torch.mm(x, x))]:
        call()
        seconds, share = spinner_share(call)
        print(f"{label}: 20 calls in {seconds:.3f} s; a spinning thread kept {share:.0%} of its rate meanwhile")


if __name__ == "__main__":
    main()
