"""longside: long-term memory for a frozen, 4-bit quantized causal LM.

The frozen backbone encodes past text into a FAISS-backed memory bank of cached
keys/values; a narrow residual side network retrieves and reads them.
"""

__version__ = "0.1.0"

from longside.errors import LongsideError  # noqa: E402

__all__ = ["LongsideError", "__version__"]
