"""Reading micro-batches from the cache one draw ahead.

Each micro-batch's latents and caption embeddings are files on disk (`fewstep.data.cache`), read when drawn. Read on
the training thread, they would be read while the GPU waits: the host reaches the next draw only after this step's
work is queued, and it often waits for the GPU before that (DeepSpeed's gradient reduction at the end of a backward,
the optimizer step). So while this micro-batch trains, the next one is read in background threads.

The draw itself stays on the training thread: the data order peeks at its next micro-batch without moving
(`DataOrder.peek_items`), and a draw that is not the one read ahead (a Glance phase that starts its order again) is
read then. A run reads the same tensors in the same order as without the reader, and a checkpoint's order state is
untouched by it.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional

Picks = list[tuple[int, int]]  # (dataset index, caption variant) per sample, as DataOrder.next_items draws them


class BatchReader:
    def __init__(self, dataset: Any, threads: int = 4):
        self.dataset = dataset
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="fewstep-read")
        self._ahead: Optional[tuple[Picks, list[Future]]] = None

    def read(self, picks: Picks, upcoming: Optional[Picks] = None) -> list:
        """The items of `picks` (`dataset.item` of each), read ahead if they were the last call's `upcoming`; then
        starts reading `upcoming` in the background. A read's error is raised by the call that needs its items."""
        if self._ahead is not None and self._ahead[0] == picks:
            items = [f.result() for f in self._ahead[1]]
        else:
            items = [self._item(i, v) for i, v in picks]
        self._ahead = (upcoming, [self._pool.submit(self._item, i, v) for i, v in upcoming]) if upcoming else None
        return items

    def _item(self, i: int, variant: int):
        return self.dataset.item(i, variant) if variant else self.dataset.item(i)
