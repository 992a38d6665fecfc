"""Artifacts a production runtime can trust: tampered and nonsense artifacts, each made consistent (the manifest
rewritten to match every change), are refused by `fastdiff-run` in a process of its own with one clear error (exit
1 or 2, never a signal or a traceback, no image written), and no code from outside the artifact runs. Pinned digests,
verified packages, weights checked against what the compiled code declares, pipelines shared by threads, loads that
see one artifact whole."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from helpers import assert_clean_error, copy_artifact, reseal
from safetensors.torch import load_file, save_file

from fastdiff.runtime import FastDiffError, load_pipeline
from fastdiff.runtime import loader as loader_module
from fastdiff.runtime import packages as packages_module
from fastdiff.runtime.format import artifact_digest, confined_path
from fastdiff.runtime.packages import EXTRACTION_PREFIX, process_start


def refused(artifact: Path, tmp_path: Path, *phrases: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """fastdiff-run on `artifact` in a fresh process: exit 1 or 2 with one error naming `phrases`, no image."""
    out = tmp_path / "out.png"
    args = (str(artifact), "-p", "a cat", "--steps", "1", "--res", "64", "--device", "cpu", "-q", "--out", str(out))
    proc = run_cli("fastdiff-run", *args, env=env, timeout=300)
    assert proc.returncode in (1, 2), f"exit {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert_clean_error(proc, *phrases)
    assert not out.exists()
    return proc


def rewrite_weights(path: Path, change: Callable[[dict[str, torch.Tensor]], object]) -> None:
    tensors = load_file(path)
    change(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)


def scaled_in_place(path: Path, factor: float) -> bytes:
    """The safetensors file's bytes with every float32 tensor scaled by `factor`, its header and size unchanged."""
    import numpy as np

    data = bytearray(path.read_bytes())
    length = int.from_bytes(data[:8], "little")
    base = 8 + length
    for name, info in json.loads(data[8:base]).items():
        if name != "__metadata__" and info["dtype"] == "F32":
            start, end = (base + o for o in info["data_offsets"])
            values = np.frombuffer(bytes(data[start:end]), dtype=np.float32) * np.float32(factor)
            data[start:end] = values.tobytes()
    return bytes(data)


def relabel_dtype(path: Path, name: str, dtype: str) -> None:
    """The safetensors file with tensor `name`'s dtype renamed (its bytes kept): F32 read as I32, say."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header[name]["dtype"] = dtype
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data[8 + length :])


@pytest.fixture(scope="module")
def planted_library(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A shared library that writes a marker file when it is loaded: (library, marker)."""
    folder = tmp_path_factory.mktemp("planted")
    marker, source, library = folder / "ran", folder / "planted.c", folder / "planted.so"
    source.write_text(
        "#include <stdio.h>\n"
        f'__attribute__((constructor)) static void planted(void) {{ FILE *f = fopen("{marker}", "w"); '
        'if (f) { fputs("foreign code ran", f); fclose(f); } }\n'
    )
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("needs a C compiler to build the planted library")
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return library, marker


def test_a_member_that_leaves_the_package_runs_no_code(tiny_artifact: Path, tmp_path: Path, planted_library) -> None:
    """A package whose library member is named .../model/../../<outside>/x.so, where such a library waits: refused
    before anything is extracted or opened, by either runner; the outside library never runs."""
    library, marker = planted_library
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(library, outside / "x.so")
    art = copy_artifact(tiny_artifact, tmp_path)
    package = art / "vae_decoder" / "64x64.pt2"
    original = package.with_suffix(".orig")
    package.rename(original)
    with zipfile.ZipFile(original) as src, zipfile.ZipFile(package, "w") as dst:
        for info in src.infolist():
            name = info.filename
            if name.endswith(".so"):
                top = name.split("/")[0]
                name = f"{top}/data/aotinductor/model/" + "../" * 12 + f"{str(outside).lstrip('/')}/x.so"
            dst.writestr(name, src.read(info))
    original.unlink()
    reseal(art)
    for runner in ("capi", "torch"):
        refused(art, tmp_path, "holds a member named", "leaves its folder", env={"FASTDIFF_PACKAGE_RUNNER": runner})
    assert not marker.exists()


@pytest.mark.parametrize(
    ("tamper", "phrase"),
    [
        ("parent-path", "leaves the artifact folder"),
        ("absolute-path", "leaves the artifact folder"),
        ("link-out", "outside the artifact folder"),
        ("dtype-relabelled", "the weight file holds torch.int32"),
        ("tensor-shrunk", "the weight file holds torch.float32 of"),
        ("tokens-beyond-vocabulary", "its text encoder embeds only 526"),
        ("pad-id-beyond-vocabulary", "the tokenizer gave token id 999; its text encoder embeds 526"),
        ("embedding-reshaped", "embeds 1052 tokens; its package was compiled for 526"),
        ("unlisted-tokenizer-file", "tokenizer/added_tokens.json: not listed in the manifest"),
        ("scheduler-config-rewritten", "scheduler/scheduler_config.json: sha256 differs from the manifest"),
        ("vae-scale-factor-0", "vae_scale_factor 0 is not a power of two"),
        ("negative-latent-channels", "latent_channels -4 is not positive"),
        ("max-batch-0", "max_batch 0 does not fit batch_size 2"),
        ("scheduler-class-a-list", "which is no diffusers scheduler"),
        ("package-byte-flipped", "does not match the sha256 in its manifest"),
        ("nan-weights", "NaN or infinite values"),
        ("latent-channels-rewritten", "takes sample of shape [4, 8, 8] per row; the model facts make it [8, 8, 8]"),
        ("dtype-rewritten", "unet takes float32 sample; the manifest's dtype makes them bf16"),
        ("input-shapes-malformed", "unet.input_shapes['64x64'] is not a shape per input"),
        ("pooled-width-rewritten-with-its-shape", "takes text_embeds as torch.float32 [1..4, 64]; this call gives"),
    ],
)
def test_tampered_and_nonsense_artifacts_are_refused(
    tiny_artifact: Path, tmp_path: Path, tamper: str, phrase: str
) -> None:
    art = copy_artifact(tiny_artifact, tmp_path)
    vae_weights = art / "vae_decoder" / "weights.safetensors"
    if tamper == "parent-path":
        shutil.move(vae_weights, tmp_path / "x.safetensors")

        def point_out(m: dict) -> None:
            m["vae_decoder"]["weights"] = "../x.safetensors"
            m["files"]["../x.safetensors"] = m["files"].pop("vae_decoder/weights.safetensors")

        reseal(art, point_out)
    elif tamper == "absolute-path":
        shutil.copy(vae_weights, tmp_path / "x.safetensors")

        def absolute(m: dict) -> None:
            m["vae_decoder"]["weights"] = str(tmp_path / "x.safetensors")
            m["files"][str(tmp_path / "x.safetensors")] = m["files"].pop("vae_decoder/weights.safetensors")

        reseal(art, absolute)
    elif tamper == "link-out":
        shutil.move(vae_weights, tmp_path / "x.safetensors")
        vae_weights.symlink_to(tmp_path / "x.safetensors")
    elif tamper == "dtype-relabelled":
        relabel_dtype(vae_weights, "decoder.conv_out.weight", "I32")
        reseal(art)
    elif tamper == "tensor-shrunk":
        rewrite_weights(vae_weights, lambda t: t.update({"decoder.conv_out.weight": t["decoder.conv_out.weight"][:2]}))
        reseal(art)
    elif tamper == "tokens-beyond-vocabulary":
        from tokenizers import Tokenizer

        path = art / "tokenizer" / "tokenizer.json"
        tokenizer = Tokenizer.from_file(str(path))
        tokenizer.add_tokens([f"<extra{i}>" for i in range(8)])
        tokenizer.save(str(path))
        reseal(art)
    elif tamper == "pad-id-beyond-vocabulary":  # the same vocabulary, an id past it
        path = art / "tokenizer" / "tokenizer.json"
        path.write_text(path.read_text().replace('"pad_id": 525', '"pad_id": 999'))
        reseal(art)
    elif tamper == "embedding-reshaped":  # the same bytes read as twice the rows: only the manifest's record tells
        key = "encoder.embeddings.token_embedding.weight"
        rewrite_weights(art / "text_encoder" / "weights.safetensors", lambda t: t.update({key: t[key].view(1052, 16)}))
        reseal(art)
    elif tamper == "unlisted-tokenizer-file":  # a file the manifest does not vouch for, which transformers would read
        (art / "tokenizer" / "added_tokens.json").write_text('{"<x>": 600}')
    elif tamper == "scheduler-config-rewritten":  # not resealed: small files are hashed on every load
        path = art / "scheduler" / "scheduler_config.json"
        path.write_text(path.read_text().replace('"epsilon"', '"abcdefg"'))
    elif tamper == "vae-scale-factor-0":
        reseal(art, lambda m: m["model"].update(vae_scale_factor=0))
    elif tamper == "negative-latent-channels":
        reseal(art, lambda m: m["model"].update(latent_channels=-4))
    elif tamper == "max-batch-0":
        reseal(art, lambda m: m["unet"].update(max_batch=0))
    elif tamper == "scheduler-class-a-list":
        path = art / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "_class_name": ["EulerDiscreteScheduler"]}))
        reseal(art)
    elif tamper == "package-byte-flipped":  # not resealed: the manifest still has the package's hash
        package = art / "unet" / "64x64.pt2"
        data = bytearray(package.read_bytes())
        data[len(data) // 2] ^= 0xFF
        package.write_bytes(bytes(data))
    elif tamper == "nan-weights":
        rewrite_weights(vae_weights, lambda t: t["post_quant_conv.weight"].fill_(float("nan")))
        reseal(art)
    elif tamper == "latent-channels-rewritten":  # the packages take 4: latents of 8 would be read as 4
        reseal(art, lambda m: m["model"].update(latent_channels=8))
    elif tamper == "dtype-rewritten":  # float32 read as bf16: half the bytes the compiled code reads
        reseal(art, lambda m: m.update(dtype="bf16"))
    elif tamper == "input-shapes-malformed":
        reseal(art, lambda m: m["unet"]["input_shapes"].update({"64x64": [[0]]}))
    elif tamper == "pooled-width-rewritten-with-its-shape":  # the record agrees; the text encoder's output does not

        def pooled(m: dict) -> None:
            m["model"]["pooled_dim"] = 64
            for shapes in m["unet"]["input_shapes"].values():
                shapes[3] = [None, 64]

        reseal(art, pooled)
    refused(art, tmp_path, phrase)


def test_inspect_prints_the_digest_and_run_pins_it(tiny_artifact: Path, tmp_path: Path) -> None:
    digest = artifact_digest(tiny_artifact)
    proc = run_cli("fastdiff-inspect", str(tiny_artifact))
    assert proc.returncode == 0, proc.stderr
    assert f"digest        {digest}" in proc.stdout
    out = tmp_path / "pinned.png"
    args = [str(tiny_artifact), "-p", "a cat", "--steps", "1", "--res", "64", "-q", "--out", str(out)]
    assert run_cli("fastdiff-run", *args, "--expect-digest", digest).returncode == 0 and out.is_file()
    other = "sha256:" + "0" * 64
    proc = run_cli("fastdiff-run", *args, "--overwrite", "--expect-digest", other)
    assert_clean_error(proc, f"has digest {digest}, not the expected {other}")
    proc = run_cli("fastdiff-run", *args, "--overwrite", "--expect-digest", "md5:abc")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "is not an artifact digest" in proc.stderr


def test_a_resealed_artifact_has_another_digest(tiny_artifact: Path, tmp_path: Path) -> None:
    """A consistent tamper passes every check that needs no pin; the pinned digest is what refuses it."""
    art = copy_artifact(tiny_artifact, tmp_path)
    rewrite_weights(art / "unet" / "weights.safetensors", lambda t: next(iter(t.values())).mul_(1.5))
    reseal(art)
    assert artifact_digest(art) != artifact_digest(tiny_artifact)
    with pytest.raises(FastDiffError, match="not the expected"):
        load_pipeline(art, device="cpu", expected_digest=artifact_digest(tiny_artifact))
    assert load_pipeline(art, device="cpu").digest == artifact_digest(art)


def test_four_threads_on_one_pipeline_get_what_they_get_alone(tiny_pipeline) -> None:
    def generate(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return tiny_pipeline(
            f"a cat number {seed}", num_inference_steps=2, height=64, width=64, generator=generator, output_type="np"
        ).images

    alone = [generate(seed) for seed in range(4)]
    together: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            together[seed] = generate(seed)
        except BaseException as e:  # reported below: a thread's exception would otherwise vanish
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for seed in range(4):
        torch.testing.assert_close(torch.as_tensor(together[seed]), torch.as_tensor(alone[seed]), rtol=0, atol=0)


def _latents(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe("a cat", num_inference_steps=1, height=64, width=64, generator=generator, output_type="latent").images


@pytest.mark.parametrize("how", ["new-files", "rewritten-in-place"])
def test_a_replaced_artifact_is_not_served_from_the_weights_cache(
    tiny_artifact: Path, tmp_path: Path, how: str
) -> None:
    """An artifact replaced at the same path by one whose files have the same sizes and modification times: a new
    load gets the new weights, although a live pipeline still holds the old ones."""
    art = copy_artifact(tiny_artifact, tmp_path)
    first = load_pipeline(art, device="cpu")
    before = _latents(first)
    unet = art / "unet" / "weights.safetensors"
    stat = unet.stat()
    scaled = scaled_in_place(unet, 0.5)
    if how == "new-files":
        replacement = copy_artifact(tiny_artifact, tmp_path / "replacement")
        (replacement / "unet" / "weights.safetensors").write_bytes(scaled)
        reseal(replacement)
        os.utime(replacement / "unet" / "weights.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns))
        shutil.rmtree(art)
        replacement.rename(art)
    else:
        before = before.clone()  # the CPU pipeline's weights are the file's own pages (memory-mapped)
        with open(unet, "r+b") as f:  # same inode
            f.write(scaled)
        os.utime(unet, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        reseal(art)
    assert (unet.stat().st_size, unet.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    second = load_pipeline(art, device="cpu")
    assert second.unets["64x64"].weights is not first.unets["64x64"].weights  # read again, not the live copy
    after = _latents(second)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, _latents(load_pipeline(copy_artifact(art, tmp_path / "fresh"), device="cpu")))
    del first


def test_a_load_sees_one_artifact_whole(tiny_artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another artifact renamed onto the path while a load runs (what an --overwrite export does): the load reads the
    folder it opened, whole. A manifest rewritten in place meanwhile: the load is refused."""
    art = copy_artifact(tiny_artifact, tmp_path)
    other = copy_artifact(tiny_artifact, tmp_path / "other")
    rewrite_weights(other / "unet" / "weights.safetensors", lambda t: [v.mul_(0.5) for v in t.values()])
    reseal(other)
    expected = _latents(load_pipeline(copy_artifact(art, tmp_path / "reference"), device="cpu"))
    shared_weights, swapped = loader_module.shared_weights, []

    def swapping(path, *args, **kwargs):
        if not swapped:  # after the load opened the folder and read the manifest, before the weights
            swapped.append(True)
            art.rename(tmp_path / "moved-aside")
            other.rename(art)
        return shared_weights(path, *args, **kwargs)

    monkeypatch.setattr(loader_module, "shared_weights", swapping)
    pipe = load_pipeline(art, device="cpu")
    assert swapped and pipe.digest == artifact_digest(tmp_path / "moved-aside")
    torch.testing.assert_close(_latents(pipe), expected, rtol=0, atol=0)

    monkeypatch.setattr(loader_module, "shared_weights", shared_weights)
    target, rewritten = tmp_path / "moved-aside", []

    def rewriting(path, *args, **kwargs):
        if not rewritten:
            rewritten.append(True)
            reseal(target, lambda m: m.update(created="later"))
        return shared_weights(path, *args, **kwargs)

    monkeypatch.setattr(loader_module, "shared_weights", rewriting)
    with pytest.raises(FastDiffError, match="changed while it was loading"):
        load_pipeline(target, device="cpu")


@pytest.mark.fast
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="folders held through /proc/self/fd")
def test_a_folder_renamed_while_its_paths_are_checked_stays_confined(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The folder renamed between resolving the folder and resolving the file (a load's checks run on a thread while
    an export renames): the file is still inside it. A link out of the folder is still refused."""
    folder = tmp_path / "art"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "weights.safetensors").write_bytes(b"x")
    (folder / "out").symlink_to(tmp_path)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    root, realpath, renamed = Path(f"/proc/self/fd/{fd}"), os.path.realpath, []

    def renaming(path, *args, **kwargs):
        resolved = realpath(path, *args, **kwargs)
        if not renamed:
            renamed.append(True)
            folder.rename(tmp_path / "moved-aside")
        return resolved

    try:
        monkeypatch.setattr(os.path, "realpath", renaming)
        assert confined_path(root, "unet/weights.safetensors").read_bytes() == b"x"
        assert renamed
        with pytest.raises(FastDiffError, match="outside the artifact folder"):
            confined_path(root, "out/x")
    finally:
        os.close(fd)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_childs_exit_leaves_the_parents_packages(tiny_artifact: Path, tmp_path: Path) -> None:
    """A child forked after a load (a pre-fork server's worker) that exits: the parent's extracted packages stay."""
    script = f"""
import os, sys, tempfile
from fastdiff.runtime import load_pipeline
pipe = load_pipeline({str(tiny_artifact)!r}, device="cpu")
prefix = "{EXTRACTION_PREFIX}{{}}-".format(os.getpid())
mine = lambda: sorted(n for n in os.listdir(tempfile.gettempdir()) if n.startswith(prefix))
before = mine()
child = os.fork()
if child == 0:
    sys.exit(0)  # runs the exit handlers it inherited
os.waitpid(child, 0)
pipe("a cat", num_inference_steps=2)
print(len(before), len(mine()))
"""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, after = map(int, proc.stdout.split()[-2:])
    assert before > 0 and after == before


def test_stale_extraction_folders_of_dead_processes_go(tiny_artifact: Path, tmp_path: Path) -> None:
    """A process killed outright leaves its packages' folders in the temp folder; the next load removes those of
    processes that are gone, and keeps those of live ones and folders it did not name."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    me = os.getpid()
    dead = tmp / f"{EXTRACTION_PREFIX}999999999-1-abc"
    reused = tmp / f"{EXTRACTION_PREFIX}{me}-{process_start(me) + 1}-abc"  # this pid, but a process started later
    live = tmp / f"{EXTRACTION_PREFIX}{me}-{process_start(me)}-abc"
    foreign = tmp / f"{EXTRACTION_PREFIX}abc"
    for folder in (dead, reused, live, foreign):
        folder.mkdir()
        (folder / "x.so").write_bytes(b"x")
    code = f"from fastdiff.runtime import load_pipeline; load_pipeline({str(tiny_artifact)!r}, device='cpu')"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "TMPDIR": str(tmp)}
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith(EXTRACTION_PREFIX)) == sorted(
        [live.name, foreign.name] if Path("/proc/self/stat").exists() else [reused.name, live.name, foreign.name]
    )


def test_a_full_temp_folder_is_one_clear_error(tiny_artifact: Path, tmp_path: Path, monkeypatch) -> None:
    from conftest import invoke_cli

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(packages_module, "extract_model", full)
    monkeypatch.setattr("fastdiff.runtime.capi.extract_model", full)
    proc = invoke_cli(
        "fastdiff-run", str(tiny_artifact), "-p", "a cat", "--steps", "1", "--out", str(tmp_path / "a.png")
    )
    assert_clean_error(proc, "cannot extract compiled package", "No space left on device", "TMPDIR")
    assert proc.stderr.count("error:") == 1 and not (tmp_path / "a.png").exists()


def test_out_of_device_memory_is_one_clear_error(tiny_artifact: Path, tmp_path: Path, monkeypatch) -> None:
    from conftest import invoke_cli

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 5.00 GiB")

    monkeypatch.setattr(loader_module, "shared_weights", out_of_memory)
    proc = invoke_cli(
        "fastdiff-run", str(tiny_artifact), "-p", "a cat", "--steps", "1", "--out", str(tmp_path / "a.png")
    )
    assert_clean_error(proc, "out of memory on the device", "Tried to allocate 5.00 GiB")
    assert proc.stderr.count("error:") == 1


def test_a_full_disk_during_an_export_is_one_clear_error(tmp_path: Path, monkeypatch) -> None:
    """The disk fills while a package is written: one error line, and nothing of the export is left."""
    from conftest import invoke_cli

    def full(program, package_path, inductor_configs):
        Path(package_path).write_bytes(b"partial")
        raise OSError(28, "No space left on device", package_path)

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", full)
    exports = tmp_path / "exports"
    exports.mkdir()
    proc = invoke_cli("fastdiff-export", "tiny-sdxl", "--res", "64", "--device", "cpu", "--out", str(exports / "a"))
    assert_clean_error(proc, "No space left on device", "free space")
    assert proc.stderr.count("error:") == 1
    assert list(exports.iterdir()) == []
