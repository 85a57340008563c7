"""Regenerations: the same tenant sending the same prompt again within a window.

A user who asks again, or presses "regenerate", did not like the answer: a quality
signal no judge sees. Prompts are never stored: each is reduced to a keyed BLAKE2b
digest of its token ids (the key is random per process, so a digest is useless
outside it) and kept with the tenant and the time it was last seen, at most
``max_entries`` of them, oldest evicted first. Seen per API server process: a
retry routed to another replica is not counted.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections import OrderedDict
from collections.abc import Sequence


class RegenerationTracker:
    """Remembers (tenant, prompt digest) -> last seen, for ``window_s`` seconds."""

    def __init__(self, window_s: float, max_entries: int = 65536) -> None:
        self.window_ns = int(window_s * 1e9)
        self.max_entries = max_entries
        self._key = os.urandom(16)
        self._seen: OrderedDict[tuple[str, bytes], int] = OrderedDict()

    def digest(self, token_ids: Sequence[int]) -> bytes:
        data = array("q", token_ids).tobytes()
        return hashlib.blake2b(data, digest_size=16, key=self._key).digest()

    def seen(self, tenant: str, token_ids: Sequence[int] | None, now_ns: int) -> bool:
        """True if ``tenant`` sent these prompt tokens within the window; notes this one.

        One thread (the builder) calls it; nothing here is shared with the serving path.
        """
        if not token_ids or self.window_ns <= 0:
            return False
        key = (tenant, self.digest(token_ids))
        last = self._seen.pop(key, None)
        self._seen[key] = now_ns
        while len(self._seen) > self.max_entries:
            self._seen.popitem(last=False)
        return last is not None and 0 <= now_ns - last <= self.window_ns
