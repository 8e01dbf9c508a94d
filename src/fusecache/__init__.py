"""fusecache: a read-only FUSE mirror of a network filesystem, served from a persistent local
cache with coordinated readahead, so many local processes can load model checkpoints fast."""

__version__ = "0.1.0"
