"""Efficiency benchmark: FLOP formulas against torch's counter and hand counts, the stand-in
counting against a full counted run, peak-memory measurement, and the benchmark end to end."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from affmae_kernels import reference
from napari_affmae.bench import flops as fl
from napari_affmae.bench import memory
from napari_affmae.bench.efficiency import FAMILIES, BenchConfig, format_table, main, notes, run_benchmark
from napari_affmae.models.registry import create_model

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------ FLOP formulas

def _na_inputs(rows: int, nq: int = 16, nk: int = 20, b: int = 2, h: int = 3, m: int = 8, d: int = 4):
    gen = torch.Generator().manual_seed(0)
    t = lambda *s: torch.randn(*s, generator=gen, requires_grad=True)  # noqa: E731
    idx = torch.randint(0, nk, (b, rows, m), generator=gen)
    valid = torch.rand(b, rows, m, generator=gen) > 0.2
    return dict(q=t(b, h, nq, d), k=t(b, h, nk, d), v=t(b, h, nk, d), idx=idx, bias=t(b, h, nq, m), valid=valid,
                blank_k=t(h, d), blank_v=t(h, d)), (b, h, nq, m, d)


@pytest.mark.parametrize("mode,rows", [("token", 16), ("cluster", 4)])
def test_neighborhood_attention_formula_equals_counter_on_reference(mode, rows):
    args, (b, h, nq, m, d) = _na_inputs(rows)
    with FlopCounterMode(display=False) as forward:
        out = reference.neighborhood_attention(**args)
    with FlopCounterMode(display=False) as backward:
        out.square().sum().backward()
    fwd, bwd, recompute = fl.neighborhood_attention_flops(b, h, nq, m, d, blank=True)
    assert forward.get_total_flops() == fwd == 2 * b * h * nq * d * (m + 1) + 2 * b * h * nq * m * d
    # the reference's chunked backward recomputes QK^T: it executes exactly the convention
    assert backward.get_total_flops() == bwd
    assert recompute == 2 * b * h * nq * d * (m + 1)


def test_weighted_merge_formula_equals_counter_on_reference():
    gen = torch.Generator().manual_seed(1)
    weights = torch.randn(2, 5, 8, 4, generator=gen, requires_grad=True)
    feat = torch.randn(2, 11, 6, generator=gen, requires_grad=True)
    idx = torch.randint(0, 11, (2, 5, 8), generator=gen)
    with FlopCounterMode(display=False) as forward:
        out = reference.weighted_merge(weights, feat, idx)
    with FlopCounterMode(display=False) as backward:
        out.sum().backward()
    fwd, bwd = fl.weighted_merge_flops(2, 5, 8, 4, 6)
    assert forward.get_total_flops() == fwd == 2 * 2 * 5 * 8 * 4 * 6
    assert backward.get_total_flops() == bwd


def test_knn_flops_counted_per_query_centroid_pair():
    query = torch.rand(2, 7, 2)
    centroids = torch.rand(2, 5, 2)
    counted = fl.count_flops(lambda: fl.dispatch.knn_centroids(query, centroids, 3))
    assert counted.by_op[fl.KNN] == 2 * 7 * 5 * 5  # 2 sub + 2 square + 1 add per pair
    exact = fl.count_flops(lambda: fl.dispatch.knn_centroids(query, centroids, 3), exact=True)
    assert exact.total == counted.total


def test_dense_attention_counted_on_cpu_in_both_modes():
    # torch's counter has no formula for the CPU flash kernel; both modes must still count it
    q = torch.randn(2, 3, 10, 8, requires_grad=True)
    k = torch.randn(2, 3, 12, 8, requires_grad=True)
    v = torch.randn(2, 3, 12, 8, requires_grad=True)
    step = lambda: F.scaled_dot_product_attention(q, k, v).sum().backward()  # noqa: E731
    forward = 4 * 2 * 3 * 10 * 12 * 8
    for exact in (False, True):
        counted = fl.count_flops(step, exact=exact)
        assert counted.total == forward + forward * 5 // 2, exact


# ------------------------------------------------------------------------- ViT by hand

def _block(n: int, c: int, mlp: float) -> int:
    hidden = int(c * mlp)
    linear = 2 * n * c * 3 * c + 2 * n * c * c + 2 * n * c * hidden * 2  # qkv, proj, fc1 + fc2
    return linear + 4 * n * n * c  # QK^T and PV over all heads


def test_vit_mae_flops_match_hand_formula():
    """ViT-MAE tiny on a 64 x 128 tile: patch embedding, blocks, decoder and heads by hand."""
    mae = create_model("vit_mae_tiny")
    seg = create_model("vit_mae_tiny", task="segmentation", num_classes=3).eval()
    cfg = mae.config
    c, dd = cfg.embed_dim, cfg.decoder_dim
    x = torch.randn(1, 1, 64, 128)
    n_all = (64 // 8) * (128 // 8)
    torch.manual_seed(0)
    mask = mae.random_mask(1, 8, 16)
    n_vis = int((~mask).sum())

    seg_hand = 2 * n_all * 64 * c + cfg.depth * _block(n_all, c, cfg.mlp_ratio) \
        + 2 * n_all * c * cfg.seg_hidden + 2 * n_all * cfg.seg_hidden * 64 * 3
    with torch.no_grad():
        assert fl.count_flops(lambda: seg(x)).total == seg_hand

    enc = 2 * n_vis * 64 * c + cfg.depth * _block(n_vis, c, cfg.mlp_ratio)
    dec = 2 * n_vis * c * dd + cfg.decoder_depth * _block(n_all, dd, cfg.decoder_mlp_ratio) + 2 * n_all * dd * 64
    with torch.no_grad():
        assert fl.count_flops(lambda: mae(x, mask=mask)).total == enc + dec

    # training step: every product twice more in the backward, except the patch embedding (its
    # input needs no gradient) and attention (2.5x, flash convention)
    attention = 4 * c * n_vis**2 * cfg.depth + 4 * dd * n_all**2 * cfg.decoder_depth
    linear = enc + dec - attention
    hand_step = 3 * linear - 2 * n_vis * 64 * c + 3.5 * attention
    step = fl.count_flops(lambda: mae(x, mask=mask)["loss"].backward())
    assert step.total == pytest.approx(hand_step, rel=1e-9)
    for exact in (False, True):  # the exact mode agrees with the hand count too
        mae.zero_grad(set_to_none=True)
        assert fl.count_flops(lambda: mae(x, mask=mask)["loss"].backward(), exact=exact).total == step.total


# ------------------------------------------------------------- stand-ins vs a counted real run

@pytest.mark.parametrize("family", ["affmae", "affmae_cluster", "vit_mae", "um_mae", "greenmim"])
def test_stand_in_count_equals_exact_count(family):
    """The cheap shape-only count (what the benchmark reports) equals a full run under the counter
    with the reference kernels, for a training step and a segmentation forward."""
    spec = FAMILIES[family]
    torch.manual_seed(0)
    mae = create_model(f"{spec.prefix}_tiny", **dict(spec.overrides))
    seg = create_model(f"{spec.prefix}_tiny", task="segmentation", num_classes=2, **dict(spec.overrides)).eval()
    x = torch.randn(1, 1, 128, 96)
    mask = mae.random_mask(1, 16, 12)
    totals = []
    for exact in (False, True):
        mae.zero_grad(set_to_none=True)
        step = fl.count_flops(lambda: mae(x, mask=mask)["loss"].backward(), exact=exact)
        with torch.no_grad():
            infer = fl.count_flops(lambda: seg(x), exact=exact)
        totals.append((step.total, infer.total))
    assert totals[0] == totals[1]
    assert totals[0][0] > 0 and totals[0][1] > 0


def test_counting_restores_the_original_ops():
    import napari_affmae.models.clustering as clustering
    import napari_affmae.models.layers as layers

    before = (layers.neighborhood_attention, clustering.knn_centroids, F.scaled_dot_product_attention)
    with pytest.raises(RuntimeError, match="boom"):
        fl.count_flops(lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert (layers.neighborhood_attention, clustering.knn_centroids, F.scaled_dot_product_attention) == before
    assert layers.neighborhood_attention is fl.dispatch.neighborhood_attention


# ----------------------------------------------------------------------------------- memory

def _allocate(mib: int) -> float:
    block = torch.ones(mib * 2**20 // 4)  # float32
    total = float(block.sum())
    return total


def test_peak_memory_sees_a_known_allocation():
    _, idle = memory.measure_peak(lambda: None, torch.device("cpu"))
    _, peak = memory.measure_peak(lambda: _allocate(64), torch.device("cpu"))
    assert 60 * 2**20 <= peak.bytes <= 72 * 2**20, peak
    assert idle.bytes < 4 * 2**20
    assert peak.method == memory.cpu_method()


def test_peak_memory_sampler_fallback(monkeypatch):
    monkeypatch.setattr(memory, "hwm_reset_available", lambda: False)

    def hold() -> None:
        block = torch.ones(48 * 2**20 // 4)
        import time
        time.sleep(0.05)
        del block

    _, peak = memory.measure_peak(hold, torch.device("cpu"))
    assert 40 * 2**20 <= peak.bytes <= 60 * 2**20, peak


# --------------------------------------------------------------------------------- end to end

def test_benchmark_end_to_end_json_page_and_plots(tmp_path, bench_script):
    page = tmp_path / "docs" / "benchmarks.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "efficiency.py"), "--resolutions", "128", "--repeats", "1",
         "--threads", "1", "--json", "--quiet", "--out", str(page)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert "FLOPs per pretraining step" in proc.stderr  # the table goes to stderr with --json
    assert [f["key"] for f in data["families"]] == list(FAMILIES)
    cells = {c["family"]: c for c in data["cells"]}
    assert set(cells) == set(FAMILIES) and all(c["resolution"] == 128 for c in cells.values())
    vit = cells["vit_mae"]
    for name, cell in cells.items():
        assert cell["flops_train"] > 0 and cell["flops_seg"] > 0
        ratios = cell["ratio_to_reference"]
        assert ratios["flops_train"] == pytest.approx(vit["flops_train"] / cell["flops_train"])
        assert ratios["flops_seg"] == pytest.approx(vit["flops_seg"] / cell["flops_seg"])
        if name == "affmae_cluster":  # FLOPs only on CPU, with the reason
            assert cell["ms_train"] is None and ratios["ms_train"] is None and cell["notes"]
            continue
        assert cell["ms_train"] > 0 and cell["ms_infer"] > 0 and cell["mem_train"] > 0
        assert ratios["ms_train"] == pytest.approx(vit["ms_train"] / cell["ms_train"])
        assert ratios["mem_infer"] == pytest.approx(vit["mem_infer"] / cell["mem_infer"])
    assert all(v == pytest.approx(1.0) for v in vit["ratio_to_reference"].values() if v is not None)
    affmae = cells["affmae"]  # CPU: memory without the reference's neighbour tensors, as a bound
    assert 0 < affmae["mem_train_fused_bound"] < affmae["mem_train"]
    # the no-grad forward runs in chunks: its neighbour tensors are a few MiB, within the RSS's noise
    assert 0 < affmae["mem_infer_fused_bound"] < affmae["mem_infer"] + 8 * 2**20
    assert affmae["ratio_to_reference"]["mem_train_fused_bound"] == pytest.approx(
        vit["mem_train"] / affmae["mem_train_fused_bound"])
    text = page.read_text()
    assert "## CPU: tiny models, fp32" in text and "Not measured on a GPU yet" in text
    assert "4 B H Nq M D" in text and "| AFFMAE (cluster nbhd) |" in text
    for metric in ("flops", "time", "memory"):
        png = tmp_path / "docs" / "images" / f"bench_cpu_tiny_fp32_{metric}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"images/{png.name}" in text
    # the saved JSON re-renders the same page without measuring again
    saved = tmp_path / "results.json"
    saved.write_text(proc.stdout)
    again = tmp_path / "again" / "benchmarks.md"
    assert bench_script("efficiency").main(["--from-json", str(saved), "--out", str(again), "--quiet"]) == 0
    assert again.read_text() == text
    # the packaged command shows the same results and keeps them as JSON, and writes no page
    kept = tmp_path / "kept" / "results.json"
    assert main(["--from-json", str(saved), "--out", str(kept), "--quiet"]) == 0
    assert json.loads(kept.read_text()) == data
    assert main(["--from-json", str(saved), "--out", str(tmp_path / "page.md"), "--quiet"]) == 2
    assert not (tmp_path / "page.md").exists()


@pytest.fixture(scope="module")
def skipped_run():
    config = BenchConfig(families=("vit_mae", "greenmim"), resolutions=(128, 256), repeats=1,
                         max_step_seconds=1e-4, threads=1)
    return run_benchmark(config)


def test_slow_runs_are_skipped_with_a_reason(skipped_run):
    vit_small, vit_big = skipped_run.cell("vit_mae", 128), skipped_run.cell("vit_mae", 256)
    assert vit_small.ms_train is not None and any("warm-up run took" in n for n in vit_small.notes)
    assert vit_big.ms_train is None and vit_big.ms_infer is None and vit_big.mem_train is None
    assert any(n.startswith("training step skipped: >") and "predicted" in n for n in vit_big.notes)
    assert vit_big.flops_train and vit_big.flops_seg  # FLOPs are counted regardless
    assert "skipped" in format_table(skipped_run)


def test_page_keeps_the_sections_of_other_devices(skipped_run, tmp_path, bench_script):
    page = tmp_path / "benchmarks.md"
    report = bench_script("efficiency")
    report.write_page(skipped_run, page, tmp_path / "images")
    first = page.read_text()
    assert "Not measured on a GPU yet" in first and "<!-- bench:cpu-tiny-fp32 -->" in first
    skipped_run.environment.update(device_type="cuda", device="NVIDIA test device")
    try:
        report.write_page(skipped_run, page, tmp_path / "images")
    finally:
        skipped_run.environment.update(device_type="cpu", device="CPU")
    both = page.read_text()
    assert "<!-- bench:cuda-tiny-fp32 -->" in both and "<!-- bench:cpu-tiny-fp32 -->" in both
    assert "Not measured on a GPU yet" not in both
    assert both.index("bench:cuda") < both.index("bench:cpu")
    cpu_block = first[first.index("<!-- bench:cpu"):]
    assert cpu_block in both  # the CPU section is kept as it was


def test_flops_only_times_nothing():
    result = run_benchmark(BenchConfig(families=("vit_mae", "um_mae"), resolutions=(128,), flops_only=True,
                                       threads=1))
    for family in ("vit_mae", "um_mae"):
        cell = result.cell(family, 128)
        assert cell.flops_train > 0 and cell.flops_seg > 0
        assert cell.ms_train is None and cell.mem_infer is None and not cell.notes
    assert result.ratio("um_mae", 128, "flops_train") == pytest.approx(
        result.cell("vit_mae", 128).flops_train / result.cell("um_mae", 128).flops_train)


def test_unet_rows_are_a_supervised_step_and_its_forward():
    """The U-Net has no pretraining: its training FLOPs are one forward + backward of the segmentation model,
    which a hand count on the same model must match (backward = 2 x forward for its convolutions)."""
    result = run_benchmark(BenchConfig(families=("unet", "vit_mae"), resolutions=(128,), repeats=1, threads=1,
                                       max_step_seconds=60))
    cell = result.cell("unet", 128)
    model = create_model("unet_tiny", task="segmentation", num_classes=2)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 1, 128, 128))
    assert cell.flops_seg == counter.get_total_flops()
    assert cell.flops_train == pytest.approx(3 * cell.flops_seg, rel=0.05)
    assert cell.ms_train > 0 and cell.ms_infer > 0 and cell.mem_train > 0
    assert any("U-Net: a segmentation model only" in line for line in notes(result))
    with pytest.raises(ValueError, match="unet has no 'base' size"):
        BenchConfig(families=("unet",), size="base")


def test_bad_input_is_reported():
    with pytest.raises(ValueError, match="multiples of 64"):
        BenchConfig(resolutions=(100,))
    with pytest.raises(ValueError, match="unknown family"):
        BenchConfig(families=("resnet",))
    assert main(["--families", "nope", "--quiet"]) == 2


def test_allocator_peak_counts_live_bytes_only():
    def calls() -> float:
        a = torch.ones(2**20)  # 4 MiB
        b = a * 2  # 8 MiB live
        del a
        c = torch.ones(3 * 2**20)  # 12 MiB: 16 MiB live with b
        del c
        return float(b[0])

    value, peak = memory.allocator_peak(calls)
    assert value == 2.0
    assert 16 * 2**20 <= peak < 17 * 2**20
