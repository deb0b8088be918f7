"""Training and inference jobs. No Qt, no napari imports: widgets and CLI are front ends."""
