"""usercouch: a private CouchDB-compatible server for every user, app and test.

>>> from usercouch import UserCouch           # doctest: +SKIP
>>> env = UserCouch('/some/dir').bootstrap()  # doctest: +SKIP
"""

from .config import credentialed_url
from .couch import UserCouch
from .errors import (
    ConfigError,
    EngineNotFound,
    LockError,
    StartError,
    StateError,
    UserCouchError,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "EngineNotFound",
    "LockError",
    "StartError",
    "StateError",
    "UserCouch",
    "UserCouchError",
    "__version__",
    "credentialed_url",
]
