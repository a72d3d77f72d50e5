"""Data: labelled datasets from bundled packages, tables, image folders and arrays."""

from .dataset import Dataset, check_labels, subsample
from .loaders import BUNDLED, load_data

__all__ = ["Dataset", "load_data", "subsample", "check_labels", "BUNDLED"]
