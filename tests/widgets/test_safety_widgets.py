"""Issue 13 in the widgets: they call the same engine, so a folder in use by another run (CLI or another
napari) is refused with the running pid, and nothing of that run is touched."""
from __future__ import annotations

import subprocess
import sys

import pytest
from qtpy.QtCore import Qt

from napari_affmae.engine.training import LOCK_NAME
from napari_affmae.widgets import PretrainWidget

from .conftest import messages, set_training_options, wait_done

pytestmark = pytest.mark.gui


def test_pretrain_widget_refuses_a_folder_in_use_by_another_run(
        make_napari_viewer, qtbot, dock, tmp_path, em_stack, notifications):
    viewer = make_napari_viewer()
    viewer.add_image(em_stack[0], name="em")
    widget = dock(viewer, PretrainWidget)
    folder = tmp_path / "run"
    folder.mkdir()
    holder = ("import sys, time; from napari_affmae.engine.training import RunLock; RunLock(sys.argv[1]).acquire(); "
              "print('held', flush=True); time.sleep(120)")
    other = subprocess.Popen([sys.executable, "-c", holder, str(folder)], stdout=subprocess.PIPE, text=True)
    try:  # the "running" run: another process holding the folder's lock
        assert other.stdout.readline().strip() == "held"
        set_training_options(widget, folder, steps=2)
        qtbot.mouseClick(widget.button, Qt.LeftButton)
        wait_done(qtbot, widget)
        errors = messages(notifications, "error")
        assert errors and f"in use by another run (pid {other.pid}" in errors[-1], errors
        assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME]  # nothing written, the lock kept
    finally:
        other.kill()
        other.wait()
