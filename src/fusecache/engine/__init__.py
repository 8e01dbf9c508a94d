"""The engine: turns reads of byte ranges into cached chunks, fetching each once.

Its parts, each with one job, dependencies pointing down this list:

- `facade.Engine`: what the FUSE adapter calls; wires the parts.
- `reader.Reader`: one read: chunks verified, then the reply from the cache (or the source).
- `direct.CompleteFile`: a file complete and checked at open, whose reads the session's reader
  threads serve themselves, off the trio thread (each asks it whether the cache file is unchanged).
- `window.SequentialWindow`: which chunks to fetch ahead of a sequential reader.
- `streams.StreamScheduler`: whole files streamed in (readahead, prefetch); one `StreamRecord`
  per path says where it stands.
- `fill.FillController`: how many stream reads run at once node-wide, by what the source delivers.
- `shards.CheckpointPolicy`: which files an open streams, siblings in checkpoint index order.
- `fetcher.Fetcher`: single-flight fetches on lanes (threads + a fixed pool of buffers).
- `evictor.Evictor`: the size limit (LRU), pins, a full cache filesystem.
- `files.OpenFiles`: the open-file table (ref, idle, retire) and the descriptor budget, with
  `shares.UidShares`, what one uid's open files may pin of it. `files.Handle` is what the
  adapter holds of an open file, and asks its questions of (path, version, complete?, the
  cache file for the kernel); nothing outside the engine names the `TrackedFile` behind it.
- `keyed_lock.KeyedLock`, `tasks.Tasks`, `errors`: a lock per path, the background nursery
  and worker threads, the exceptions.

The evictor and the open-file table need each other (an open that finds the cache filesystem
full evicts; evicting closes tracked files): the table depends on nothing above it and is told
what to call (`on_disk_full`, `on_version_gone`), which the facade wires.

Everything runs on the trio thread except the blocking calls handed to worker threads, and
what `direct.CompleteFile` is asked by the session's reader threads.
"""

from .errors import CacheFull, ReadError, VersionReplaced
from .facade import Engine
from .files import Handle, TrackedFile

__all__ = ["CacheFull", "Engine", "Handle", "ReadError", "TrackedFile", "VersionReplaced"]
