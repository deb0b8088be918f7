"""CI: open napari with every AFFMAE widget from the installed wheel (no source tree on the path)."""

import napari
import napari_affmae
from npe2 import PluginManager

assert "site-packages" in napari_affmae.__file__, napari_affmae.__file__
viewer = napari.Viewer(show=True)
manager = PluginManager.instance()
manager.discover()
manifest = manager.get_manifest("napari-affmae")
names = [w.display_name for w in manifest.contributions.widgets]
for name in names:
    viewer.window.add_plugin_dock_widget("napari-affmae", name)
print("opened", names, "with", napari.__version__)
viewer.close()
