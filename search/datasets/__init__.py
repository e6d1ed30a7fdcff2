"""Datasets for cnnsearch: a registry name -> loader; one module per dataset kind.

Every dataset loads as whole uint8 tensors with a fixed validation split (`load_dataset`,
`dataset_for`), and says its input shape and class count before loading (`describe`):

    >>> describe("digits")
    ((1, 8, 8), 10)
    >>> load_dataset("digits").in_shape
    (1, 8, 8)
"""

from search.errors import DataError, DatasetNotFound

from ._common import (
    Dataset,
    choose_data_dir,
    clear_cache,
    dataset_for,
    describe,
    load_dataset,
    missing_files,
    resolve_data_dir,
    resolve_folder_path,
    split_val,
    to_device,
)
from ._registry import REQUIRED, DatasetInfo, get_dataset_info, names, register_dataset

# Importing a kind registers it; the order here is the order error messages list them in.
from . import digits, synthetic, mnist, cifar10, folder  # noqa: F401  isort: skip
from .folder import FolderData, FolderError, FolderListing, list_folder, load_folder

DATASETS = names()  # the built-in datasets; names() also sees ones registered later

__all__ = [
    "DATASETS",
    "REQUIRED",
    "DataError",
    "Dataset",
    "DatasetInfo",
    "DatasetNotFound",
    "FolderData",
    "FolderError",
    "FolderListing",
    "choose_data_dir",
    "clear_cache",
    "dataset_for",
    "describe",
    "get_dataset_info",
    "list_folder",
    "load_dataset",
    "load_folder",
    "missing_files",
    "names",
    "register_dataset",
    "resolve_data_dir",
    "resolve_folder_path",
    "split_val",
    "to_device",
]
