"""The ctypes binding of libpregate.so (see adapters/include/pregate.h for the rules)."""

from __future__ import annotations

import ctypes
import os
import threading
from ctypes import POINTER, c_char_p, c_double, c_int32, c_uint32, c_uint64, c_void_p
from pathlib import Path

#: The ABI version this binding was written for (`PREGATE_ABI_VERSION`).
ABI_VERSION = 1

#: Environment variable naming a libpregate.so to load instead of the bundled one.
LIB_ENV = "PREGATE_LIB"

#: Status codes (pregate's ErrorCode numbers).
STATUS_NAMES = {
    1: "INVALID_ARGUMENT",
    2: "NOT_FOUND",
    3: "UNAVAILABLE",
    4: "STATE",
    5: "DEVICE",
    6: "MODEL_DATA",
    7: "IO",
    8: "INTERNAL",
}

F32, BF16, F16 = 0, 1, 2
POLICIES = {"lru": 0, "lfu": 1, "random": 2, "belady": 3, "belady-decay": 4}


class PregateError(RuntimeError):
    """A failure of libpregate.so, or of finding and loading it.

    `code` is the status name (`"INVALID_ARGUMENT"`, ...; `"LOAD"` when the library could not be
    loaded), `path` the library tried.
    """

    def __init__(self, code: str, message: str, path: Path | None = None) -> None:
        self.code = code
        self.message = message
        self.path = path
        where = f" (library {path})" if path is not None else ""
        super().__init__(f"{code}: {message}{where}")


class MoeConfig(ctypes.Structure):
    """`PregateMoeConfig`."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("num_layers", c_uint32),
        ("num_experts", c_uint32),
        ("top_k", c_uint32),
        ("hidden", c_uint32),
        ("inter", c_uint32),
        ("dtype", c_int32),
        ("device", c_int32),
        ("cache_slots", c_uint64),
        ("layer_quota", c_uint32),
        ("policy", c_int32),
        ("max_tokens", c_uint32),
        ("shard_kind", c_uint32),
        ("shard_rank", c_uint32),
        ("shard_size", c_uint32),
        ("seed", c_uint64),
    ]


class MoeStats(ctypes.Structure):
    """`PregateMoeStats`."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("reserved", c_uint32),
        ("hits", c_uint64),
        ("misses", c_uint64),
        ("evictions", c_uint64),
        ("bytes_loaded", c_uint64),
        ("prefetches", c_uint64),
        ("layer_calls", c_uint64),
        ("waves", c_uint64),
        ("stall_s", c_double),
    ]


class SpecStats(ctypes.Structure):
    """`PregateMoeSpecStats` (arrays by distance - 1)."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("depth", c_uint32),
        ("hits", c_uint64 * 4),
        ("misses", c_uint64 * 4),
        ("loads", c_uint64),
        ("used", c_uint64),
        ("wasted", c_uint64),
    ]


_SIGNATURES = {
    "pregate_abi_version": (c_uint32, []),
    "pregate_last_error": (ctypes.c_size_t, [c_char_p, ctypes.c_size_t]),
    "pregate_moe_create": (c_int32, [POINTER(MoeConfig), POINTER(c_void_p)]),
    "pregate_moe_set_expert": (
        c_int32,
        [c_void_p, c_uint32, c_uint32, c_int32, c_int32, c_void_p, c_uint64, c_uint64, c_uint64],
    ),
    "pregate_moe_device_bytes": (c_int32, [c_void_p, POINTER(c_uint64), POINTER(c_uint64)]),
    "pregate_moe_finalize": (c_int32, [c_void_p, c_void_p, c_uint64, c_void_p, c_uint64]),
    "pregate_moe_plan_step": (
        c_int32,
        [c_void_p, c_void_p, c_void_p, c_uint64, c_uint32, c_uint64, POINTER(c_uint64)],
    ),
    "pregate_moe_layer_forward": (
        c_int32,
        [
            c_void_p,
            c_uint64,
            c_uint32,
            c_void_p,
            c_uint64,
            c_void_p,
            c_void_p,
            c_uint64,
            c_void_p,
            c_uint64,
        ],
    ),
    "pregate_moe_step_end": (c_int32, [c_void_p, c_uint64, c_uint64]),
    "pregate_moe_configure_speculation": (c_int32, [c_void_p, c_uint32, c_uint32, c_uint32]),
    "pregate_moe_begin_step": (c_int32, [c_void_p, c_uint64, c_uint64, POINTER(c_uint64)]),
    "pregate_moe_layer_forward_routed": (
        c_int32,
        [
            c_void_p,
            c_uint64,
            c_uint32,
            c_void_p,
            c_uint64,
            c_void_p,
            c_void_p,
            c_uint64,
            c_uint32,
            c_void_p,
            c_uint64,
        ],
    ),
    "pregate_moe_speculate": (
        c_int32,
        [
            c_void_p,
            c_uint64,
            c_uint32,
            c_uint32,
            c_void_p,
            c_uint64,
            c_uint32,
            c_uint64,
            POINTER(c_uint32),
        ],
    ),
    "pregate_moe_speculation_stats": (c_int32, [c_void_p, POINTER(SpecStats)]),
    "pregate_moe_stats": (c_int32, [c_void_p, POINTER(MoeStats)]),
    "pregate_moe_metrics_text": (
        c_int32,
        [c_void_p, c_char_p, ctypes.c_size_t, POINTER(ctypes.c_size_t)],
    ),
    "pregate_moe_destroy": (None, [c_void_p]),
    "pregate_router_open": (c_int32, [c_char_p, POINTER(c_void_p)]),
    "pregate_router_shape": (c_int32, [c_void_p, POINTER(c_uint32), POINTER(c_uint32)]),
    "pregate_router_state_new": (c_int32, [c_void_p, c_uint32, POINTER(c_void_p)]),
    "pregate_router_route": (c_int32, [c_void_p, c_void_p, c_void_p, c_uint64, c_void_p, c_void_p]),
    "pregate_router_state_free": (None, [c_void_p]),
    "pregate_router_close": (None, [c_void_p]),
}

_lock = threading.Lock()
_loaded: tuple[ctypes.CDLL, Path] | None = None


def library_path() -> Path:
    """The library to load: `$PREGATE_LIB`, else the libpregate.so bundled beside this file."""
    override = os.environ.get(LIB_ENV)
    return Path(override) if override else Path(__file__).with_name("libpregate.so")


def load() -> ctypes.CDLL:
    """Loads libpregate.so once (checking its ABI version) and returns it."""
    global _loaded
    with _lock:
        if _loaded is not None and _loaded[1] == library_path():
            return _loaded[0]
        path = library_path()
        if not path.is_file():
            hint = f"set {LIB_ENV}, or reinstall pregate-vllm" if LIB_ENV not in os.environ else ""
            raise PregateError("LOAD", f"libpregate.so not found; {hint}".rstrip("; "), path)
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            raise PregateError("LOAD", f"cannot load libpregate.so: {e}", path) from e
        for name, (restype, argtypes) in _SIGNATURES.items():
            try:
                fn = getattr(lib, name)
            except AttributeError as e:
                raise PregateError("LOAD", f"the library lacks {name}", path) from e
            fn.restype = restype
            fn.argtypes = argtypes
        version = lib.pregate_abi_version()
        if version != ABI_VERSION:
            raise PregateError(
                "LOAD", f"ABI version {version}, this package needs {ABI_VERSION}", path
            )
        _loaded = (lib, path)
        return lib


def last_error(lib: ctypes.CDLL) -> str:
    """The calling thread's last error message."""
    n = lib.pregate_last_error(None, 0)
    buf = ctypes.create_string_buffer(n + 1)
    lib.pregate_last_error(buf, n + 1)
    return buf.value.decode("utf-8", "replace")


def check(lib: ctypes.CDLL, status: int) -> None:
    """Raises `PregateError` for a failed status."""
    if status != 0:
        raise PregateError(STATUS_NAMES.get(status, f"STATUS_{status}"), last_error(lib))
