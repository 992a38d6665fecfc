# The inline script that produced the torch.compile UNet-step numbers in README.md of this folder, as it was run on
# the H200 (python3 - <<EOF ... EOF, with PYTHONPATH holding diffusers 0.42.1); the same code, reformatted.
# Output seen: compile default first call s 105.2 / torch.compile default UNet step ms 36.09 /
# compile reduce-overhead first calls s 100.5 / torch.compile reduce-overhead UNet step ms 34.7 /
# 2.11.0+cu130 NVIDIA H200 (the eager line was cut from the captured output; eager is in speed.md)
import statistics
import time

import torch
from diffusers import UNet2DConditionModel

u = UNet2DConditionModel.from_pretrained("/tmp/cache/sdxl-random", subfolder="unet", torch_dtype=torch.bfloat16)
u = u.cuda().eval()
g = torch.Generator().manual_seed(0)
x = (
    torch.randn(2, 4, 128, 128, generator=g).cuda().bfloat16(),
    torch.tensor(500.0, device="cuda"),
    torch.randn(2, 77, 2048, generator=g).cuda().bfloat16(),
)
cond = {
    "text_embeds": torch.randn(2, 1280, generator=g).cuda().bfloat16(),
    "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * 2, device="cuda").bfloat16(),
}


def t(f, n=30):
    for _ in range(5):
        f()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record()
        f()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


with torch.no_grad():
    print("eager bf16 UNet step ms", round(t(lambda: u(*x, added_cond_kwargs=cond)), 2))
    c = torch.compile(u, fullgraph=True)
    t0 = time.time()
    c(*x, added_cond_kwargs=cond)
    torch.cuda.synchronize()
    print("compile default first call s", round(time.time() - t0, 1))
    print("torch.compile default UNet step ms", round(t(lambda: c(*x, added_cond_kwargs=cond)), 2))
    r = torch.compile(u, mode="reduce-overhead", fullgraph=True)
    t0 = time.time()
    r(*x, added_cond_kwargs=cond)
    r(*x, added_cond_kwargs=cond)
    torch.cuda.synchronize()
    print("compile reduce-overhead first calls s", round(time.time() - t0, 1))
    print("torch.compile reduce-overhead UNet step ms", round(t(lambda: r(*x, added_cond_kwargs=cond)), 2))
print(torch.__version__, torch.cuda.get_device_name())
