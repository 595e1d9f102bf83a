"""Datasets: the built-in `shapes`, class folders, caption lists and tar shards, with one sample interface."""

from .captions import CaptionFileDataset
from .folder import ImageFolderDataset
from .loader import SampleCollator, build_dataloader, build_dataset, describe_source, iter_samples
from .sample import (
    BAD_REASONS,
    BadDataError,
    BadSampleCounter,
    ClassificationTask,
    StreamTracker,
    bad_marker,
    is_bad,
)
from .shapes import (
    SHAPES_TASKS,
    ShapesConfig,
    ShapesDataset,
    generate_shapes_sample,
    held_out_combinations,
    shapes_attributes,
    shapes_tasks,
)
from .shards import ShardDataset, ShardWriter, expand_braces, list_shards

__all__ = [
    "BAD_REASONS",
    "SHAPES_TASKS",
    "BadDataError",
    "BadSampleCounter",
    "CaptionFileDataset",
    "ClassificationTask",
    "ImageFolderDataset",
    "SampleCollator",
    "ShapesConfig",
    "ShapesDataset",
    "ShardDataset",
    "ShardWriter",
    "StreamTracker",
    "bad_marker",
    "build_dataloader",
    "build_dataset",
    "describe_source",
    "expand_braces",
    "generate_shapes_sample",
    "held_out_combinations",
    "is_bad",
    "iter_samples",
    "list_shards",
    "shapes_attributes",
    "shapes_tasks",
]
