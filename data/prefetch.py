"""An iterator run ahead of its reader in a background thread (`osp-data encode` reads and decodes the next batch
while the VAE encodes this one)."""

import queue
import threading
from collections.abc import Iterator


class Prefetcher:
    """Runs an iterator in a background thread ahead of the reader; a context manager.

    At most `depth` finished items wait in the queue (plus the one the thread is making). Items come out in the
    iterator's order; an exception raised in the thread is raised again by the reader; leaving the `with` block
    (normally or by an exception) stops the thread and waits for it.
    """

    _END = object()

    def __init__(self, items: Iterator, depth: int = 1):
        self._items, self._queue, self._stop = items, queue.Queue(maxsize=depth), threading.Event()
        self._thread = threading.Thread(target=self._produce, name="osp-data-encode-prefetch", daemon=True)

    def __enter__(self) -> "Prefetcher":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def __iter__(self) -> Iterator:
        while True:
            failed, item = self._queue.get()
            if failed:
                raise item
            if item is self._END:
                return
            yield item

    def _produce(self) -> None:
        try:
            for item in self._items:
                if not self._put((False, item)):
                    return
            self._put((False, self._END))
        except BaseException as exc:  # handed to the reader, which raises it
            self._put((True, exc))
        finally:
            close = getattr(self._items, "close", None)
            if close is not None:  # a generator left early closes its shard file here, in its own thread
                close()

    def _put(self, entry) -> bool:
        """Queue `entry` unless the reader has left; False once it has."""
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False
