"""longside: long-term memory for a frozen, 4-bit quantized causal LM.

The frozen backbone encodes past text into a FAISS-backed memory of cached keys/values;
a narrow residual side network retrieves and reads them.

    from longside import load_model, generate
    model, info = load_model()                    # the shipped SmolLM2-135M checkpoint
    model.memorize("book.txt")                    # into memory
    print(generate(model, "Who is Mr. Darcy?", chat=True, max_new_tokens=60))
"""

__version__ = "0.1.0"

from longside.config import SideNetConfig  # noqa: E402
from longside.errors import BackboneError, CheckpointError, DataError, LongsideError, MemoryBankError, SessionError  # noqa: E402
from longside.inference.chat import ChatSession  # noqa: E402
from longside.inference.generate import generate, stream  # noqa: E402
from longside.inference.sampling import GenerationConfig  # noqa: E402
from longside.loading import load_model  # noqa: E402
from longside.memory import Memory  # noqa: E402
from longside.model import LongSideModel  # noqa: E402

__all__ = ["BackboneError", "ChatSession", "CheckpointError", "DataError", "GenerationConfig", "LongSideModel",
           "LongsideError", "Memory", "MemoryBankError", "SessionError", "SideNetConfig", "__version__", "generate",
           "load_model", "stream"]
