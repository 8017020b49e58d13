"""Data: where it comes from (sources), how it lands on disk (download, normalize), how it is batched."""
