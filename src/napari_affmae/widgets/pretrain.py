"""Pretrain widget: self-supervised AFFMAE pretraining on the open image ("Pretrain on this image")."""
from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import QComboBox, QDoubleSpinBox, QLabel, QWidget

from ..engine import PretrainConfig, pretrain
from ..engine.settings import default_of
from ..models import list_models
from ._base import Job
from ._jobs import JobOutcome
from ._layers import image_data
from ._panels import form_label
from ._training import TrainingWidget

class PretrainWidget(TrainingWidget):
    """Image layer -> masked-autoencoder pretraining -> ``pretrained.affmae`` (remembered for Fine-tune)."""

    job_title = "Pretraining"
    button_label = "Pretrain on this image"
    run_suffix = "pretrain"
    config_class = PretrainConfig

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)
        intro = QLabel("Self-supervised pretraining on the chosen image: the model learns to fill in masked "
                       "patches. No labels needed.")
        intro.setWordWrap(True)
        self.main_layout.addWidget(intro)
        self.model = QComboBox()
        self.model.addItems(list_models(task="mae"))
        self.model.setCurrentText(default_of(PretrainConfig, "model"))
        self.model.setToolTip("affmae_tiny suits a CPU; affmae_small / affmae_base want a GPU. The other "
                              "names are baselines (ViT-MAE, UM-MAE, GreenMIM)")
        self.mask_ratio = QDoubleSpinBox()
        self.mask_ratio.setRange(0.05, 0.95)
        self.mask_ratio.setSingleStep(0.05)
        self.show_family_mask()
        self.model.currentTextChanged.connect(self.show_family_mask)
        form = self.form()
        form.addRow(form_label("Image"), self.image_picker)
        form.addRow(form_label("Model"), self.model)
        form.addRow(form_label("Mask ratio"), self.mask_ratio)
        self.add_training_rows(form)
        self.add_run_section()

    def show_family_mask(self, *_: Any) -> None:
        """Show the chosen model's default mask ratio (`PretrainConfig.mask_spec` with the form's model); UM-MAE's
        uniform sampling has a fixed ratio, so the box is then read-only."""
        spec = PretrainConfig(model=self.model.currentText()).mask_spec()
        self.ratio_fixed = spec.fixed_ratio
        self.mask_ratio.setValue(spec.ratio)
        self.mask_ratio.setEnabled(not self.ratio_fixed)
        self.mask_ratio.setToolTip(f"fraction of 8 x 8 patches hidden from the encoder ({spec.kind} masks; "
                                   f"{self.model.currentText()}'s default: {spec.ratio:g})")

    def config(self) -> PretrainConfig:
        """The engine config for the current form values (raises ValueError for bad values)."""
        folder, _ = self.output_folder()
        steps = int(self.steps.value())
        return PretrainConfig(
            model=self.model.currentText(), crop_size=self.crop_size(), batch_size=int(self.batch_size.value()),
            steps=steps, mask_ratio=None if self.ratio_fixed else float(self.mask_ratio.value()),
            device=self.device.currentText(),
            output_dir=folder, resume=self.resume.isChecked(), checkpoint_every=min(100, max(10, steps // 5)),
            warmup_steps=min(50, max(steps // 10, 0)),
        )

    def prepare(self) -> Job:
        layer = self.image_picker.layer()
        data = image_data(layer)
        config = self.config()
        self.prepare_plot()
        self.result_label.setText("")

        def work(progress, cancel):  # worker thread: no Qt here
            return pretrain(data, config, progress=progress, cancel=cancel)

        return f"Pretraining on '{layer.name}'", work

    def job_finished(self, outcome: JobOutcome) -> None:
        package = self.training_finished(outcome, "pretrained package")
        if package is not None:
            self.state.pretrained_package = package
