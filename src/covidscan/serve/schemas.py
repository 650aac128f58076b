"""The service's response types (Pydantic): what each endpoint returns, as the OpenAPI schema and ``/docs`` show it."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Health(BaseModel):
    status: str = Field(description="ok when the model is loaded")
    task: str
    classes: list[str]
    backbone: str
    weights_source: str


class ModelInfo(BaseModel):
    task: str
    classes: list[str]
    backbone: str
    head: str
    description: str = ""
    weights_source: str
    image_size: int = Field(description="input side in pixels")
    train_counts: dict = Field(description="images per split and class")
    sources: list[str]
    split_protocol: str | None = None
    epoch: int | None = Field(None, description="the epoch whose weights were kept")
    val_metrics: dict
    threshold: dict | None = Field(None, description="the calibrated operating threshold (covidscan calibrate), if any")
    versions: dict[str, str]
    studies: bool = Field(description="true for a CT model: POST /predict_study takes whole studies")


class Decision(BaseModel):
    cls: str = Field(alias="class", description="the class the threshold is for")
    threshold: float
    positive: bool


class Heatmap(BaseModel):
    cls: str = Field(alias="class", description="the class the map explains")
    method: str = Field(description="Grad-CAM or Grad-CAM++")
    png_base64: str | None = Field(None, description="the scan with the map blended over it (PNG); null when withheld")
    map_png_base64: str | None = Field(None, description="the map alone, RGBA (PNG), to lay over the scan")
    warning: str | None = Field(None, description="why the map was withheld or should be read with care")


class Prediction(BaseModel):
    source: str = Field(description="the uploaded file's name")
    label: str = Field(description="the most probable class")
    probabilities: dict[str, float]
    warnings: list[str]
    out_of_distribution: bool = Field(description="the scan is unlike what the model was trained on: not a finding")
    decision: Decision | None = Field(None, description="positive / negative at the calibrated threshold, if any")
    heatmap: Heatmap | None = None
    original_png_base64: str | None = Field(None, description="the decoded scan, gray PNG (with preview=true or heatmap=true)")


class FileError(BaseModel):
    source: str
    error: str = Field(description="why this file could not be scored; the batch's other files are")


class Batch(BaseModel):
    results: list[Prediction | FileError] = Field(description="one entry per uploaded file, in upload order")


class SliceView(BaseModel):
    index: int
    position_mm: float
    probability: float
    png_base64: str = Field(description="the slice in the model's lung window (PNG)")
    map_png_base64: str | None = Field(None, description="its Grad-CAM map, RGBA (PNG)")


class Study(BaseModel):
    study: str
    probability: float | None = Field(description="study COVID probability; null when no lung slice was scored")
    label: str = Field(description="covid, normal or undetermined (no lung slice found)")
    positive_class: str
    rule: str = Field(description="how slice probabilities were aggregated")
    n_slices: int
    n_scored: int
    volume: str
    warnings: list[str]
    spread: dict = Field(description="the scored slices' probabilities: p10, median, p90, share at or above the threshold")
    slices: list[dict] = Field(description="per slice: index, name, position_mm, lung_area, scored, probability")
    plot_png_base64: str
    slice_views: list[SliceView] | None = Field(None, description="with slices=true: every scored slice for review")
