"""simsearch: local, offline audio similarity search.

>>> from simsearch import Engine
>>> engine = Engine("index")                  # doctest: +SKIP
>>> engine.index(["~/sounds"])                # doctest: +SKIP
>>> engine.query(["clip.wav"], k=5)[0].to_dict()   # doctest: +SKIP
"""

from .config import EngineConfig, SegmentConfig, VoteConfig
from .engine import Engine, IndexReport, Neighbour, QueryResult
from .errors import (AudioReadError, CorruptIndexError, EncoderMismatchError, IndexLockedError, SimsearchError,
                     UsageError)
from .vote import Category

__all__ = ["Engine", "EngineConfig", "SegmentConfig", "VoteConfig", "IndexReport", "Neighbour", "QueryResult",
           "Category", "SimsearchError", "AudioReadError", "CorruptIndexError", "EncoderMismatchError",
           "IndexLockedError", "UsageError"]
__version__ = "0.1.0"
