"""DataSync: keep DuckDB analytics copies of PostgreSQL tables in sync.

The public surface is small; everything else is internal and may change.
"""

from datasync.engine.syncing import Options, Result, run
from datasync.errors import DataSyncError, SourceError, TargetError

__all__ = ["DataSyncError", "Options", "Result", "SourceError", "TargetError", "run"]
__version__ = "0.1.0"
