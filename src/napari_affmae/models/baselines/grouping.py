"""Window partition and GreenMIM's Group Window Attention layout.

Tokens are an arbitrary subset of a stage grid (all cells for dense inputs, only the visible
ones when pretraining), given by their integer cells ``[N, 2]`` (y, x) shared by the batch.

1. Windows: cell (y, x) belongs to window ``((y + oy) // s, (x + ox) // s)``; shifted layers use
   ``o = s // 2`` (only along axes longer than one window). This is Swin's shifted partition
   without the cyclic roll: each token attends to exactly the tokens its masked cyclic-shift
   window would allow.
2. Windows hold unequal numbers of tokens (masking, image borders). They are packed into
   ``G`` groups of equal capacity ``g`` (greedy: each group is filled with the largest windows
   that still fit); the capacity is chosen among a few candidates to minimise the attention
   cost ``G * g**2``.
3. Inside a group, attention is block-diagonal: a query sees only keys of its own window. Empty
   slots are padding; a padding query sees only itself so softmax rows stay finite.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def window_ids(cells: torch.Tensor, grid: tuple[int, int], window: int, shifted: bool) -> torch.Tensor:
    """Raw window id of every token: cells ``[N, 2]`` -> ``[N]`` int64 (not contiguous)."""
    hs, ws = grid
    oy = window // 2 if shifted and hs > window else 0
    ox = window // 2 if shifted and ws > window else 0
    n_wx = (ws + ox + window - 1) // window
    return ((cells[:, 0] + oy) // window) * n_wx + (cells[:, 1] + ox) // window


def pack_windows(counts: list[int], capacity: int) -> list[list[int]]:
    """Pack windows (indices into ``counts``) into groups holding at most ``capacity`` tokens.

    Greedy: open a group, add the largest remaining window that fits, repeat until nothing fits.
    Every window lands in exactly one group, in ascending index order within equal counts.
    """
    if counts and max(counts) > capacity:
        raise ValueError(f"group capacity {capacity} is smaller than the largest window ({max(counts)} tokens)")
    buckets: dict[int, list[int]] = {}
    for index in sorted(range(len(counts)), key=lambda i: (counts[i], -i)):
        buckets.setdefault(counts[index], []).append(index)  # popped from the end: lowest index first
    sizes = sorted(buckets, reverse=True)
    groups: list[list[int]] = []
    left = len(counts)
    while left:
        room, group = capacity, []
        for size in sizes:
            while size <= room and buckets[size]:
                group.append(buckets[size].pop())
                room -= size
                left -= 1
        sizes = [s for s in sizes if buckets[s]]
        groups.append(group)
    return groups


def plan_groups(counts: list[int]) -> tuple[int, list[list[int]]]:
    """Choose the group capacity ``g`` and packing that minimise ``n_groups * g**2``.

    Candidates: the largest window, a few sizes up to twice it, and one group holding everything.
    Equal windows (dense inputs) are kept one per group, which is optimal for that cost.
    """
    if not counts:
        raise ValueError("no tokens to group")
    largest, total = max(counts), sum(counts)
    if min(counts) == largest:
        return largest, [[i] for i in range(len(counts))]
    step = max(1, largest // 4)
    candidates = sorted({*range(largest, min(total, 2 * largest) + 1, step), total})
    best: tuple[int, int, list[list[int]]] | None = None
    for capacity in candidates:
        groups = pack_windows(counts, capacity)
        cost = len(groups) * capacity * capacity
        if best is None or cost < best[0]:
            best = (cost, capacity, groups)
    return best[1], best[2]


@dataclass(frozen=True)
class GroupLayout:
    """Where every token sits in the ``[G, g]`` group tensor, and who may attend to whom.

    slot_token ``[G, g]``: token index per slot (``N`` marks an empty slot);
    slot_window ``[G, g]``: window index per slot (-1 for empty); token_slot ``[N]``: flat slot
    (``group * g + position``) of every token; allowed ``[G, g, g]`` bool: query slot may attend
    key slot (same window, or an empty query slot to itself).
    """

    slot_token: torch.Tensor
    slot_window: torch.Tensor
    token_slot: torch.Tensor
    allowed: torch.Tensor

    @property
    def n_groups(self) -> int:
        return self.slot_token.shape[0]

    @property
    def capacity(self) -> int:
        return self.slot_token.shape[1]

    def group(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, C] -> [B, G, g, C]`` (zeros in empty slots)."""
        b, n, c = x.shape
        padded = torch.cat([x, x.new_zeros(b, 1, c)], dim=1)  # [B, N+1, C]
        return padded[:, self.slot_token.reshape(-1)].reshape(b, self.n_groups, self.capacity, c)

    def ungroup(self, y: torch.Tensor) -> torch.Tensor:
        """``[B, G, g, C] -> [B, N, C]`` (empty slots dropped)."""
        b, c = y.shape[0], y.shape[-1]
        return y.reshape(b, -1, c)[:, self.token_slot]


def build_group_layout(window_of_token: torch.Tensor, groups: list[list[int]], capacity: int) -> GroupLayout:
    """Layout for tokens with contiguous window indices ``[N]`` packed as ``groups`` of ``capacity``."""
    device = window_of_token.device
    n = window_of_token.shape[0]
    counts = torch.bincount(window_of_token, minlength=max(max(g) for g in groups) + 1)  # [W]
    counts_list = counts.tolist()
    group_of_window = [0] * len(counts_list)
    offset_of_window = [0] * len(counts_list)
    for gi, members in enumerate(groups):
        filled = 0
        for wi in members:
            group_of_window[wi], offset_of_window[wi] = gi, filled
            filled += counts_list[wi]
    base = torch.tensor(group_of_window, device=device) * capacity + torch.tensor(offset_of_window, device=device)
    order = torch.argsort(window_of_token, stable=True)  # tokens grouped by window, original order inside
    sorted_window = window_of_token[order]
    starts = torch.cumsum(counts, 0) - counts  # [W] first sorted position of each window
    rank = torch.arange(n, device=device) - starts[sorted_window]  # position inside its window
    token_slot = torch.empty(n, dtype=torch.long, device=device)
    token_slot[order] = base[sorted_window] + rank
    total = len(groups) * capacity
    slot_token = torch.full((total,), n, dtype=torch.long, device=device)
    slot_token[token_slot] = torch.arange(n, device=device)
    slot_window = torch.full((total,), -1, dtype=torch.long, device=device)
    slot_window[token_slot] = window_of_token
    slot_window = slot_window.reshape(len(groups), capacity)
    allowed = (slot_window[:, :, None] == slot_window[:, None, :]) & (slot_window[:, None, :] >= 0)
    empty = slot_window < 0
    allowed = allowed | (torch.eye(capacity, dtype=torch.bool, device=device) & empty[:, :, None])
    return GroupLayout(slot_token.reshape(len(groups), capacity), slot_window, token_slot, allowed)


def window_group_layout(cells: torch.Tensor, grid: tuple[int, int], window: int, shifted: bool) -> GroupLayout:
    """Partition tokens at ``cells [N, 2]`` into (shifted) windows and pack them into groups."""
    raw = window_ids(cells, grid, window, shifted)  # [N] ids of a partition that may have empty windows
    occupied = torch.bincount(raw) > 0
    window_of_token = (torch.cumsum(occupied, 0) - 1)[raw]  # [N] contiguous ids, empty windows skipped
    counts = torch.bincount(window_of_token).tolist()
    capacity, groups = plan_groups(counts)
    return build_group_layout(window_of_token, groups, capacity)
