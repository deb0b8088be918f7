"""Live-tensor profile: the storages alive at a call's peak, with the op and module that made them."""
from __future__ import annotations

import torch
import torch.nn as nn

from napari_affmae.bench.tensor_profile import profile_live_tensors


class _Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Linear(8, 256 * 1024)  # output [1, 256 Ki] float32: 1 MiB per row of x
        self.small = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.big(x)  # 2 MiB
        z = y.view(2, -1).sum(1)  # a view shares the storage; a temporary that dies before the peak
        del y
        keep = self.small(x).repeat(1, 64 * 1024)  # 2 x 512 Ki float32 = 4 MiB, alive at the end
        return keep + z[:, None]  # another 4 MiB


def test_profile_finds_the_peak_and_its_owners():
    torch.manual_seed(0)
    model = _Two()
    x = torch.randn(2, 8)
    with torch.no_grad():
        profile = profile_live_tensors(lambda: model(x), model)
    mib = 2**20
    assert 8 * mib <= profile.peak_bytes < 9 * mib  # keep + the sum, not the freed 2 MiB of big
    rows = profile.grouped()
    assert rows[0][3] == 4 * mib and rows[1][3] == 4 * mib
    assert {r[0] for r in rows[:2]} == {"(top level)"}
    assert "repeat" in " ".join(r[1] for r in rows[:2])
    peaks = dict(profile.peaks_by_module(1))
    assert 2 * mib <= peaks["big"] < 3 * mib
