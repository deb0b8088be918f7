"""Re-create the screenshots of docs/user-guide.md: each AFFMAE widget docked beside real EM.

Runs every job for real (CPU is fine, a few minutes) on a 2-slice crop of the VNC stack from the
shared data folder, and writes PNGs to docs/images/. Needs a display; on a headless machine:

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python docs/make_screenshots.py

Options: ``--data DIR`` (default $AFFMAE_DATA or ../shared/data next to the project),
``--out DIR`` (default docs/images), ``--pretrain-steps N``, ``--finetune-steps N``,
``--live-only`` (only the Live preview screenshot: a full 1024 x 1024 VNC slice, strokes of the
mitochondria benchmark's sparse regime, filter features; about a minute).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WINDOW = (1560, 960)  # width, height of the napari window in the screenshots
MAX_BYTES = 300_000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("AFFMAE_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    parser.add_argument("--pretrain-steps", type=int, default=20)
    parser.add_argument("--finetune-steps", type=int, default=60)
    parser.add_argument("--live-only", action="store_true", help="only make live-preview.png")
    return parser.parse_args()


def load_em(data: Path) -> tuple[np.ndarray, np.ndarray]:
    """Slices 0-1, rows/columns 0-511 of VNC stack 1 and its classes remapped to
    1 membrane, 2 mitochondrion, 3 cytoplasm (synapse/glia left out)."""
    import tifffile

    raw = tifffile.imread(data / "vnc" / "stack1_raw.tif", key=range(2))[:, :512, :512]
    classes = tifffile.imread(data / "vnc" / "stack1_classes.tif", key=range(2))[:, :512, :512]
    remapped = np.zeros_like(classes)
    remapped[classes == 1] = 1
    remapped[classes == 2] = 2
    remapped[classes == 5] = 3
    return np.ascontiguousarray(raw), remapped


def settle(app, seconds: float = 0.5) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.02)


def wait(app, widget, timeout: float = 1800.0) -> None:
    end = time.perf_counter() + timeout
    while widget.is_running:
        if time.perf_counter() > end:
            raise TimeoutError(f"{type(widget).__name__} did not finish within {timeout} s")
        app.processEvents()
        time.sleep(0.05)
    outcome = widget.last_outcome
    if outcome is not None and outcome.error is not None:
        raise RuntimeError(f"{type(widget).__name__} failed: {outcome.error}")


def palette_for(rgb: np.ndarray, grays: int) -> list[int]:
    """A 256-entry palette: ``grays`` grey levels (the EM image) plus the main colours of the coloured
    pixels (labels, widgets), so that rare but saturated label colours survive the reduction."""
    from PIL import Image

    pixels = rgb.reshape(-1, 3).astype(np.int16)
    coloured = pixels[(pixels.max(axis=1) - pixels.min(axis=1)) > 24].astype(np.uint8)
    n_colours = 256 - grays
    palette = [int(v) for level in np.linspace(0, 255, grays).round() for v in (level, level, level)]
    if len(coloured):
        strip = Image.fromarray(coloured[None, :, :])
        reduced = strip.quantize(colors=n_colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        palette += reduced.getpalette()[: 3 * n_colours]
    return (palette + [0] * 768)[:768]


def save_png(viewer, path: Path) -> None:
    """Screenshot of the whole window as a palette PNG (grey ramp + label colours) under MAX_BYTES."""
    from PIL import Image

    shot = viewer.screenshot(canvas_only=False, flash=False)[..., :3]  # [H, W, 3] uint8
    for scale in (1.0, 0.85, 0.7):
        image = Image.fromarray(shot)
        if scale != 1.0:
            image = image.resize((int(image.width * scale), int(image.height * scale)), Image.Resampling.LANCZOS)
        pixels = np.asarray(image)
        for grays in (192, 128, 96):
            target = Image.new("P", (1, 1))
            target.putpalette(palette_for(pixels, grays))
            image.quantize(palette=target, dither=Image.Dither.NONE).save(path, optimize=True)
            if path.stat().st_size <= MAX_BYTES:
                break
        if path.stat().st_size <= MAX_BYTES:
            break
    print(f"wrote {path} ({path.stat().st_size // 1024} KB)", flush=True)


def dock_only(viewer, widget, name: str, docks: list) -> None:
    for dock in docks:
        viewer.window.remove_dock_widget(dock)
    docks.clear()
    docks.append(viewer.window.add_dock_widget(widget, name=name, area="right"))


def live_preview(args: argparse.Namespace) -> None:
    """live-preview.png: the Fine-tune widget in Live preview mode on slices 0-1 of VNC stack 1 (1024 x 1024),
    strokes of the few-strokes benchmark (mitochondria, sparse regime, slice 0), filter features only.
    Prints the update times and the longest event-loop stall while the preview was computed."""
    import napari
    import tifffile
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_affmae.bench.em_protocol import training_labels
    from napari_affmae.widgets import FinetuneWidget

    import napari._qt.qt_main_window as qt_main_window

    qt_main_window.SHOW_QT_WARNING = False  # no "PyQt5 is deprecated" toast over the screenshot
    raw = np.ascontiguousarray(tifffile.imread(args.data / "vnc" / "stack1_raw.tif", key=range(2)))
    truth = tifffile.imread(args.data / "vnc" / "stack1_mito.tif", key=range(2)) > 0
    viewer = napari.Viewer(title="napari-affmae", show=True)
    viewer.window._qt_window.resize(*WINDOW)  # noqa: SLF001 - fixed size for reproducible screenshots
    app = QApplication.instance()
    viewer.add_image(raw, name="vnc stack1", scale=(50.0, 4.6, 4.6), units=("nm", "nm", "nm"), colormap="gray")
    viewer.scale_bar.visible = True
    fine = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(fine, name="Fine-tune", area="right")
    fine.start_from.setCurrentText("From scratch")  # no package: the live preview uses filter features
    fine.classes.set_names(["background", "mitochondrion"])
    strokes_layer = fine.add_labels_layer()
    strokes_layer.data = training_labels(truth.astype(np.uint8), [0], "sparse", seed=0)
    strokes_layer.opacity = 1.0
    viewer.dims.set_current_step(0, 0)
    settle(app)

    gaps: list[float] = []
    long_gaps: list[tuple[float, float]] = []  # (seconds after the toggle, gap) for gaps > 0.1 s
    last = [time.perf_counter()]

    def tick() -> None:
        now = time.perf_counter()
        gaps.append(now - last[0])
        if gaps[-1] > 0.1:
            long_gaps.append((round(last[0] - started, 2), round(gaps[-1], 3)))
        last[0] = now

    meter = QTimer()
    meter.setInterval(10)
    meter.timeout.connect(tick)
    started = time.perf_counter()
    meter.start()

    def wait_preview(count: int, timeout: float = 600.0) -> None:
        end = time.perf_counter() + timeout
        live = fine.live
        while live.updates < count or live.busy or live._timer.isActive():  # noqa: SLF001
            if time.perf_counter() > end:
                raise TimeoutError(f"no live preview within {timeout} s: {live.status.text()}")
            app.processEvents()
            time.sleep(0.01)

    fine.live.toggle.setChecked(True)
    wait_preview(1)
    first = time.perf_counter() - started
    shown = [round(first, 2)]
    timings = [fine.live.last_result.timings]
    # a correction: one more mitochondrion stroke (from the truth of the same slice), then the update
    rows, cols = np.nonzero(truth[0] & (strokes_layer.data[0] == 0))
    pick = len(rows) // 2
    strokes_layer.selected_label = 2
    strokes_layer.brush_size = 5
    for dx in range(0, 12, 3):
        strokes_layer.paint((0, int(rows[pick]), int(min(cols[pick] + dx, raw.shape[2] - 1))), 2)
    painted = time.perf_counter()
    wait_preview(2)
    second = time.perf_counter() - painted
    shown.append(round(time.perf_counter() - started, 2))
    timings.append(fine.live.last_result.timings)
    meter.stop()
    viewer.layers["vnc stack1 live preview"].opacity = 0.4
    viewer.layers.selection.active = strokes_layer
    settle(app)
    save_png(viewer, args.out / "live-preview.png")
    print(f"live preview on a {raw.shape[1]} x {raw.shape[2]} slice: first preview {first:.2f} s after the toggle, "
          f"update {second:.2f} s after the stroke (debounce included); engine timings {timings}; longest "
          f"event-loop stall {max(gaps) * 1000:.0f} ms (gaps > 0.1 s at (s, gap): {long_gaps}; previews shown at "
          f"{shown} s); cache {fine.live.preview.cache_bytes / 2**20:.0f} MB",
          flush=True)
    fine.live.toggle.setChecked(False)
    while fine.live.busy:
        app.processEvents()
        time.sleep(0.01)
    viewer.close()


def main() -> int:
    args = parse_args()
    if not (args.data / "vnc" / "stack1_raw.tif").exists():
        print(f"EM data not found under {args.data} (set AFFMAE_DATA or --data)", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    if args.live_only:
        live_preview(args)
        return 0

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_affmae.data import CLASS_NAMES, sparse_strokes
    from napari_affmae.io import write_ome_zarr_image
    from napari_affmae.widgets import BatchWidget, FinetuneWidget, PretrainWidget, SegmentWidget

    import napari._qt.qt_main_window as qt_main_window

    qt_main_window.SHOW_QT_WARNING = False  # no "PyQt5 is deprecated" toast over the screenshots
    raw, classes = load_em(args.data)
    work = Path(tempfile.mkdtemp(prefix="affmae-screens-"))
    viewer = napari.Viewer(title="napari-affmae", show=True)
    viewer.window._qt_window.resize(*WINDOW)  # noqa: SLF001 - fixed size for reproducible screenshots
    app = QApplication.instance()
    viewer.add_image(raw, name="vnc stack1", scale=(50.0, 4.6, 4.6), units=("nm", "nm", "nm"), colormap="gray")
    viewer.scale_bar.visible = True
    docks: list = []

    # 1. Pretrain: screenshot while it runs (Cancel button, ETA, live loss curve)
    pre = PretrainWidget(viewer)
    dock_only(viewer, pre, "Pretrain", docks)
    pre.crop_h.setValue(128)
    pre.crop_w.setValue(128)
    pre.steps.setValue(args.pretrain_steps)
    pre.batch_size.setValue(4)
    pre.output.set_text(work / "vnc-pretrain", by_user=True)
    pre.start()
    while pre.is_running and (pre.progress.last_event is None or pre.progress.last_event.step < args.pretrain_steps * 2 // 3):
        app.processEvents()
        time.sleep(0.05)
    settle(app)
    save_png(viewer, args.out / "pretrain.png")
    wait(app, pre)
    settle(app)
    save_png(viewer, args.out / "pretrain-done.png")

    # 2. Fine-tune: strokes painted on slice 0, then fine-tune and the slice segmented
    fine = FinetuneWidget(viewer)
    dock_only(viewer, fine, "Fine-tune", docks)
    fine.add_labels_layer()
    strokes_layer = viewer.layers["vnc stack1 strokes"]
    strokes_layer.data = sparse_strokes(classes, fraction=0.03, seed=0, slices=[0], stroke_width=7)
    strokes_layer.opacity = 1.0
    fine.classes.set_names(list(CLASS_NAMES))
    fine.crop_h.setValue(128)
    fine.crop_w.setValue(128)
    fine.steps.setValue(args.finetune_steps)
    fine.batch_size.setValue(4)
    fine.output.set_text(work / "vnc-finetune", by_user=True)
    viewer.dims.set_current_step(0, 0)
    settle(app)
    save_png(viewer, args.out / "painting.png")
    fine.start()
    wait(app, fine)
    while fine.is_running or "vnc stack1 segmentation" not in viewer.layers:
        app.processEvents()
        time.sleep(0.05)
    wait(app, fine)
    viewer.layers["vnc stack1 segmentation"].opacity = 0.45
    viewer.layers.selection.active = strokes_layer
    settle(app)
    save_png(viewer, args.out / "finetune.png")

    # 3. Segment: the whole 2-slice stack, Advanced open
    seg = SegmentWidget(viewer)
    dock_only(viewer, seg, "Segment", docks)
    seg.tile_h.setValue(128)
    seg.tile_w.setValue(128)
    seg.advanced.expand(animate=False)
    strokes_layer.visible = False
    viewer.dims.set_current_step(0, 1)
    seg.start()
    wait(app, seg)
    settle(app)
    save_png(viewer, args.out / "segment.png")

    # 4. Batch: two OME-Zarr datasets cut from the stack, one opened by double-click
    datasets = work / "datasets"
    datasets.mkdir()
    write_ome_zarr_image(datasets / "vnc-left.zarr", raw[:, :, :256], "zyx", pixel_size={"z": 50, "y": 4.6, "x": 4.6})
    write_ome_zarr_image(datasets / "vnc-right.zarr", raw[:, :, 256:], "zyx", pixel_size={"z": 50, "y": 4.6, "x": 4.6})
    batch = BatchWidget(viewer)
    dock_only(viewer, batch, "Batch OME-Zarr", docks)
    batch.add_paths([datasets])
    batch.tile_h.setValue(128)
    batch.tile_w.setValue(128)
    batch.start()
    wait(app, batch)
    for layer in list(viewer.layers):
        viewer.layers.remove(layer)
    batch.open_dataset(1)
    settle(app, 1.0)
    save_png(viewer, args.out / "batch.png")
    viewer.close()
    live_preview(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
