"""Weights streamed through staging buffers (the GPU path of load_weights) are byte for byte what safetensors reads,
whatever the chunking; damaged files get a clear error."""

from __future__ import annotations

import gc
import json
import os
import threading
from concurrent.futures import CancelledError
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastdiff.runtime import weights as weights_module
from fastdiff.runtime.errors import FastDiffError
from fastdiff.runtime.packages import load_module
from fastdiff.runtime.weights import DTYPES, Weights, load_weights, stream_weights


def assert_same_bytes(streamed: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert streamed.keys() == reference.keys()
    for name, ref in reference.items():
        out = streamed[name].cpu()
        assert (out.dtype, out.shape) == (ref.dtype, ref.shape), name
        assert torch.equal(out.view(-1).view(torch.uint8), ref.view(-1).view(torch.uint8)), name


@pytest.fixture(scope="module")
def every_dtype(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tensor of each safetensors dtype, of awkward sizes, plus a scalar and an empty tensor."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        f"{name.lower()}_{i}": (torch.randn(3 + 17 * i, 5, generator=g) * 4).to(dtype)
        for i, (name, dtype) in enumerate(DTYPES.items())
    }
    tensors.update(scalar=torch.tensor(2.5), empty=torch.zeros(0, 3), last=torch.arange(11))
    path = tmp_path_factory.mktemp("weights") / "every_dtype.safetensors"
    save_file(tensors, path)
    return path


@pytest.mark.parametrize(("chunk_bytes", "buffers"), [(7, 1), (7, 3), (100, 2), (1 << 20, 4)])
def test_streamed_like_safetensors(every_dtype: Path, chunk_bytes: int, buffers: int) -> None:
    """Chunks smaller than a tensor, chunks holding many tensors, and one buffer reused for every chunk."""
    streamed = stream_weights(every_dtype, torch.device("cpu"), chunk_bytes=chunk_bytes, buffers=buffers)
    assert_same_bytes(streamed, load_file(every_dtype))


def test_stopped_stream_reads_no_further(every_dtype: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once its `stop` is set (load_pipeline's main thread failed), the stream reads no further chunk."""
    stop, reads = threading.Event(), []
    preadv = os.preadv

    def counted(fd, buffers, offset):
        reads.append(offset)
        if len(reads) == 3:
            stop.set()
        return preadv(fd, buffers, offset)

    monkeypatch.setattr(weights_module.os, "preadv", counted)
    with pytest.raises(CancelledError, match="every_dtype.safetensors was stopped"):
        stream_weights(every_dtype, torch.device("cpu"), chunk_bytes=7, buffers=1, stop=stop)
    assert len(reads) == 3  # of the file's 100 or so chunks


@pytest.mark.parametrize(("chunk_bytes", "buffers"), [(4099, 3), (32 << 20, 4)])
def test_artifact_weights_streamed_like_safetensors(tiny_artifact: Path, chunk_bytes: int, buffers: int) -> None:
    files = sorted(tiny_artifact.glob("*/weights.safetensors"))
    assert len(files) == 4  # UNet, VAE decoder, two text encoders
    for path in files:
        streamed = stream_weights(path, torch.device("cpu"), chunk_bytes=chunk_bytes, buffers=buffers)
        assert_same_bytes(streamed, load_file(path))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pinned buffers, asynchronous copies)")
def test_streamed_to_the_gpu(every_dtype: Path, tiny_artifact: Path) -> None:
    for path in [every_dtype, tiny_artifact / "unet" / "weights.safetensors"]:
        streamed = load_weights(path, torch.device("cuda"))
        assert all(t.is_cuda for t in streamed.values())
        assert_same_bytes(streamed, load_file(path))
        assert_same_bytes(stream_weights(path, torch.device("cuda"), chunk_bytes=999, buffers=2), load_file(path))


def rewrite_header(src: Path, dst: Path, edit) -> Path:
    data = src.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    dst.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])
    return dst


def first_tensor(header: dict) -> dict:
    return next(v for k, v in header.items() if k != "__metadata__")


DAMAGES = {
    "header length past the end": (lambda data: (10**12).to_bytes(8, "little") + data[8:], "header length"),
    "header not JSON": (lambda data: data[:8] + b"#" * 32 + data[40:], "not JSON"),
    "shorter than its header says": (lambda data: data[: len(data) - 100], "do not fit"),
    "four bytes": (lambda data: data[:4], "header length"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_file(every_dtype: Path, tmp_path: Path, damage: str) -> None:
    mangle, phrase = DAMAGES[damage]
    path = tmp_path / "w.safetensors"
    path.write_bytes(mangle(every_dtype.read_bytes()))
    with pytest.raises(ValueError, match=phrase):
        stream_weights(path, torch.device("cpu"))


@pytest.mark.parametrize(
    ("edit", "phrase"),
    [
        (lambda h: first_tensor(h).update(dtype="F128"), "invalid entry"),
        (lambda h: first_tensor(h).update(shape=[10**6, 3]), "do not fit"),
        (lambda h: first_tensor(h).update(data_offsets=[0]), "invalid entry"),
        (lambda h: h.update(broken="not an entry"), "invalid entry"),
    ],
)
def test_damaged_header_entry(every_dtype: Path, tmp_path: Path, edit, phrase: str) -> None:
    path = rewrite_header(every_dtype, tmp_path / "w.safetensors", edit)
    with pytest.raises(ValueError, match=phrase):
        stream_weights(path, torch.device("cpu"))


def test_damage_is_a_clear_error_on_the_streaming_path(every_dtype: Path, tmp_path: Path) -> None:
    """load_weights streams to every device but the CPU (the meta device stands in for a GPU here)."""
    path = tmp_path / "w.safetensors"
    path.write_bytes(every_dtype.read_bytes()[:-100])
    with pytest.raises(FastDiffError, match="cannot read weights .* do not fit") as err:
        load_weights(path, torch.device("meta"))
    assert "export the model again" in err.value.fix


def test_weights_released_when_their_last_package_goes(tiny_artifact: Path) -> None:
    """A package keeps a reference to every user-managed constant it is given, after it is gone
    (pytorch/pytorch#194480); the weights' memory is released anyway when their Weights goes."""
    folder = tiny_artifact / "vae_decoder"
    weights = Weights(stream_weights(folder / "weights.safetensors", torch.device("cpu")))
    module = load_module(next(folder.glob("*.pt2")), weights, torch.device("cpu"))
    storages = [t.untyped_storage() for t in weights.values()]
    assert min(s.nbytes() for s in storages) > 0
    del module
    gc.collect()
    assert min(s.nbytes() for s in storages) > 0  # still in use by the Weights
    del weights
    gc.collect()
    assert max(s.nbytes() for s in storages) == 0


def test_overlapping_loads_restore_the_switch_interval() -> None:
    """Loads in two threads overlap (A starts, B starts, A ends, B ends): the short interval lasts until the last
    one ends, and the process's own interval comes back (B used to restore A's short one)."""
    import sys

    from fastdiff.runtime.loader import LOAD_SWITCH_INTERVAL, _short_switch_interval

    own = sys.getswitchinterval()
    a, b = _short_switch_interval(), _short_switch_interval()
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    assert sys.getswitchinterval() == LOAD_SWITCH_INTERVAL
    b.__exit__(None, None, None)
    assert sys.getswitchinterval() == own
