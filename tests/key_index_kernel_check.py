"""The Triton scoring kernels against key_index's torch path, on any device.

Run as a script (`python tests/key_index_kernel_check.py DEVICE SEED`): under
TRITON_INTERPRET=1 on the CPU, or on a GPU. Exits 0 when every index form agrees.
"""

import sys

import torch

from kvtier.config import ModelShape
from kvtier.runtime import key_index_triton as kt
from kvtier.runtime.key_index import ScalarKeys, VqKeys


def check(device: str, seed: int) -> float:
    torch.manual_seed(seed)
    shape = ModelShape(1, 8, 2, 64)
    T, P = 16, 40
    lens = [300, 17, 0, 129]
    table = torch.zeros(4, 20, dtype=torch.int32)
    perm, o = torch.randperm(P), 0
    for i, n in enumerate(lens):
        k = -(-n // T)
        table[i, :k] = perm[o:o + k].to(torch.int32)
        o += k
    table, ntok = table.to(device), torch.tensor(lens, dtype=torch.int32, device=device)
    q = torch.randn(4, 8, 64, device=device)
    keys = torch.randn(P, 2, T, 64, device=device) * torch.linspace(0.3, 2, 64, device=device)
    worst = 0.0
    for cap in (0.0, 5.0):
        forms = [ScalarKeys(shape, P, T, device, bits=b) for b in (2, 4, 8)]
        forms += [VqKeys(shape, P, T, device, groups=16, entries=64, train_tokens=256),
                  VqKeys(shape, P, T, device, groups=32, entries=300, train_tokens=256)]
        for idx in forms:
            idx.store(0, torch.arange(P), keys)
            ref = _torch_scores(idx, q, table, ntok, cap)
            got = torch.full_like(ref, float("-inf"))
            if isinstance(idx, VqKeys):
                kt.vq_scores(idx.lut(0, q), idx.codes[0], table, ntok, got, page_tokens=T, group=4, scale=0.125,
                             soft_cap=cap)
            else:
                kt.scalar_scores(q, idx.codes[0], idx.scale[0], table, ntok, got, page_tokens=T, group=4,
                                 bits=idx.bits, scale=0.125, soft_cap=cap)
            fin = torch.isfinite(ref)
            name = f"{type(idx).__name__} {getattr(idx, 'bits', '')} cap {cap}"
            assert torch.equal(fin, torch.isfinite(got)), f"{name}: the kernel scored other positions"
            err = float((got[fin] - ref[fin]).abs().max())
            assert err < 1e-4, f"{name}: max difference {err}"
            worst = max(worst, err)
    return worst


def _torch_scores(idx, q, table, ntok, cap):
    """The torch path whatever the device (the kernel would be taken on CUDA)."""
    kernel = idx._kernel
    idx._kernel = lambda layer: False
    try:
        return idx.scores(0, q, table, ntok, sm_scale=0.125, soft_cap=cap)
    finally:
        idx._kernel = kernel


if __name__ == "__main__":
    print(f"kernels match the torch path: max difference {check(sys.argv[1], int(sys.argv[2])):.2e}")
