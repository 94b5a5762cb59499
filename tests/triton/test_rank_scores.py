"""Triton rank_scores (every matrix in one launch) against reference.rank_scores."""
from __future__ import annotations

import pytest
import torch

from elalora_kernels import reference

triton_backend = pytest.importorskip("elalora_kernels.triton")


@pytest.mark.parametrize("r_max", [1, 7, 16, 32])
def test_matches_reference(device, r_max):
    gen = torch.Generator().manual_seed(r_max)
    dims = [(33, 70), (150, 40), (7, 300), (1, 1), (67, 67)]
    ipt, unc = [], []
    for o, i in dims:
        ipt.append(tuple(torch.rand(s, generator=gen).to(device) for s in ((o, r_max), (r_max,), (r_max, i))))
        unc.append(tuple(torch.rand(s, generator=gen).to(device) for s in ((o, r_max), (r_max,), (r_max, i))))
    want = reference.rank_scores(ipt, unc)
    got = triton_backend.rank_scores(ipt, unc)
    assert got.dtype == torch.float32 and got.shape == (len(dims), r_max)
    # same formula, only the order of the fp32 sums differs: a few ulps
    torch.testing.assert_close(got, want, rtol=4e-7 * 8, atol=0)


def test_views_of_flat_buffers(device):
    """EMAs as the allocator holds them: views into one flat buffer per kind."""
    r, dims = 5, [(9, 4), (3, 11)]
    sizes = [n for o, i in dims for n in (o * r, r, r * i)]
    flat_i = torch.rand(sum(sizes), device=device)
    flat_u = torch.rand(sum(sizes), device=device)
    ipt, unc, off = [], [], 0
    for o, i in dims:
        shapes = ((o, r), (r,), (r, i))
        vi, vu = [], []
        for s in shapes:
            n = torch.Size(s).numel()
            vi.append(flat_i[off : off + n].view(s))
            vu.append(flat_u[off : off + n].view(s))
            off += n
        ipt.append(tuple(vi))
        unc.append(tuple(vu))
    torch.testing.assert_close(triton_backend.rank_scores(ipt, unc), reference.rank_scores(ipt, unc), rtol=4e-6, atol=0)
