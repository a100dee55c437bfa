"""kdjax.storage: tensorstore arrays, atomic manifests, shard ledgers and writer locks.

Shared by the token store (kdjax.data) and the teacher store (kdjax.teacher).
"""

from kdjax.storage.arrays import (
    array_spec,
    check_array,
    create_array,
    open_array,
    read_rows,
    write_rows,
)
from kdjax.storage.dtypes import cast_checked, id_dtype, smallest_uint
from kdjax.storage.errors import (
    StoreCorruptError,
    StoreError,
    StoreIncompleteError,
    StoreLockedError,
    StoreMismatchError,
)
from kdjax.storage.fingerprint import (
    canonical_json,
    fingerprint_bytes,
    fingerprint_dir,
    fingerprint_file,
    fingerprint_files,
    fingerprint_json,
)
from kdjax.storage.ledger import ShardLedger
from kdjax.storage.lock import WriterLock
from kdjax.storage.manifest import (
    MANIFEST_NAME,
    read_json,
    read_manifest,
    write_json_atomic,
    write_manifest,
)
from kdjax.storage.rowstore import RowStore, RowStoreWriter, open_row_store

__all__ = [
    "MANIFEST_NAME", "RowStore", "RowStoreWriter", "ShardLedger", "StoreCorruptError",
    "StoreError", "StoreIncompleteError", "StoreLockedError", "StoreMismatchError",
    "WriterLock", "array_spec", "canonical_json", "cast_checked", "check_array",
    "create_array", "fingerprint_bytes", "fingerprint_dir", "fingerprint_file",
    "fingerprint_files", "fingerprint_json", "id_dtype", "open_array", "open_row_store",
    "read_json", "read_manifest", "read_rows", "smallest_uint", "write_json_atomic",
    "write_manifest", "write_rows",
]
