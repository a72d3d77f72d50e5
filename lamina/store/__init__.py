"""The feature store: streaming, resumable per-layer arrays on disk."""

from .store import FeatureStore, StoreWriter, read_manifest, sha256_file

__all__ = ["FeatureStore", "StoreWriter", "read_manifest", "sha256_file"]
