"""Masks and the clustering that builds neighbourhoods, checked against brute force."""
from __future__ import annotations

import pytest
import torch

from affmae_kernels import reference
from napari_affmae.models.clustering import Clusters, build_neighborhood, curve_order, hilbert_key, relative_features
from napari_affmae.models.masking import blob_mask, make_mask, random_mask, visible_count


@pytest.mark.parametrize("kind", ["blob", "random"])
def test_masks_have_equal_visible_count(kind):
    mask = make_mask(kind, 5, 12, 20, 0.5, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (5, 12, 20)
    assert ((~mask).flatten(1).sum(1) == visible_count(12, 20, 0.5)).all()


def _same_neighbour_fraction(mask):
    horiz = (mask[:, :, 1:] == mask[:, :, :-1]).float().mean()
    vert = (mask[:, 1:, :] == mask[:, :-1, :]).float().mean()
    return float((horiz + vert) / 2)


def test_blob_masks_are_spatially_coherent_and_grow_with_scale():
    gen = torch.Generator().manual_seed(0)
    rand = random_mask(8, 32, 32, 0.5, generator=gen)
    assert _same_neighbour_fraction(rand) < 0.6
    coherence = [_same_neighbour_fraction(blob_mask(4, 32, 32, 0.5, generator=gen, cells=(cell,)))
                 for cell in (1, 2, 4, 8)]  # 8, 16, 32, 64-pixel blobs
    assert coherence == sorted(coherence)
    assert coherence[2] > 0.85 and coherence[3] > 0.9


def test_hilbert_curve_visits_each_cell_once_in_unit_steps():
    ys, xs = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    pos = torch.stack([ys.reshape(-1), xs.reshape(-1)], -1)
    key = hilbert_key(pos)
    assert sorted(key.tolist()) == list(range(256))
    walk = pos[torch.argsort(key)]
    steps = (walk[1:] - walk[:-1]).abs().sum(-1)
    assert (steps == 1).all()


def test_knn_centroids_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 30, (2, 50, 2), generator=gen).float()
    c = torch.rand(2, 13, 2, generator=gen) * 30
    got = reference.knn_centroids(q, c, 5, chunk=7)
    d = ((q[:, :, None] - c[:, None]) ** 2).sum(-1)
    for b in range(2):
        for i in range(50):
            expected = sorted(range(13), key=lambda j: (float(d[b, i, j]), j))[:5]
            assert got[b, i].tolist() == expected


@pytest.mark.parametrize("mode", ["token", "cluster"])
def test_neighbourhoods_are_members_of_nearest_clusters(mode):
    gen = torch.Generator().manual_seed(0)
    mask = random_mask(2, 10, 13, 0.5, generator=gen)  # 65 visible: last cluster is short
    pos = torch.stack([torch.nonzero(~m) for m in mask])  # [B, N, 2]
    pos = torch.gather(pos, 1, curve_order(pos)[..., None].expand(-1, -1, 2))
    clusters = Clusters.from_sorted(pos, 8)
    assert clusters.num_clusters == 9
    torch.testing.assert_close(clusters.centroids[:, -1], pos[:, 64].float())  # one-member cluster
    nb = build_neighborhood(clusters, clusters, 8, mode)
    rows = 65 if mode == "token" else 9
    assert nb.idx.shape == (2, rows, 64) and nb.idx.dtype == torch.int32
    assert nb.valid.sum(-1).max() == 64 and nb.valid.sum(-1).min() == 57  # 7 pads of the short cluster
    assert nb.rel.shape == (2, 65, 64, 2)
    for b in range(2):
        for qi in range(65):
            row = qi if mode == "token" else qi // 8
            members = nb.idx[b, row][nb.valid[b, row]].long()
            assert len(set(members.tolist())) == len(members)
            expected_rel = pos[b, members].float() - pos[b, qi].float()
            torch.testing.assert_close(nb.rel[b, qi][nb.valid[b, qi if mode == "token" else row]], expected_rel)
    feats = relative_features(torch.tensor([[0.0, 0.0], [3.0, 4.0]]), scale=1.0)
    torch.testing.assert_close(feats, torch.tensor([[0, 0, 0, 0, 0], [3, 4, 5, 0.6, 0.8]]))
