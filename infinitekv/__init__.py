"""InfiniteKV: long-context memory for open-weight LLMs.

Hot tier: sink tokens and the most recent tokens stay exact on the device. Cold tier: every older token becomes a
fixed-size record (int8 key whose sign bits are its signature, 4-bit value) in append-only memory-mapped shard files.
Each decode step (and each prefill block) scans the signatures, reranks a shortlist with the dequantised keys and
attends over sinks + retrieved + window, with far tokens squeezed inside the trained window.
"""

__version__ = "0.1.0"

from infinitekv.attention import RetrievalConfig  # noqa: E402
from infinitekv.cache import InfiniteKVCache  # noqa: E402
from infinitekv.engine import Session, enable, open_session  # noqa: E402

__all__ = ["InfiniteKVCache", "RetrievalConfig", "Session", "enable", "open_session", "__version__"]
