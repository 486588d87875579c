"""longside.memory_bank: the FAISS-backed long-term memory of cached keys/values.

`MemoryBank` holds one sequence's memory (chunked, searchable, evicting, savable);
`BatchMemory` holds one bank per batch row. See bank.py for the layout and guarantees.
"""

from .bank import MemoryBank
from .batch import BatchMemory
from .eviction import FIFO, EvictionPolicy, KeepMostRetrieved
from .persist import FORMAT_VERSION
from .token_memory import TokenMemory

__all__ = ["MemoryBank", "BatchMemory", "EvictionPolicy", "FIFO", "KeepMostRetrieved", "FORMAT_VERSION", "TokenMemory"]
