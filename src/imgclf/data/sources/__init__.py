"""Data sources: the catalog (`catalog`) and one module per family, each registering its sources.

Importing this package registers every source: digits, mnist and fashion_mnist (`idx`), cifar10
and imagefolder.
"""

from imgclf.data.sources.catalog import (
    SOURCES,
    DataSource,
    RawDataset,
    get_source,
    register,
    source_summary,
)

# isort: split
# The family modules register their sources when imported; the catalog imports none of them.
from imgclf.data.sources import cifar10, digits, idx, imagefolder  # noqa: F401

__all__ = ["SOURCES", "DataSource", "RawDataset", "get_source", "register", "source_summary"]
