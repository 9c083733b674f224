"""Read and write PyTorch ``.pth`` checkpoints without torch and without running the file.

Formats read by :func:`load_pth`:

* **zip** (``torch.save`` since PyTorch 1.6): a zip archive with one top-level folder
  ``<prefix>/`` holding ``data.pkl`` (a pickle), ``data/<key>`` (the raw bytes of each storage)
  and ``byteorder`` (``little`` or ``big``; absent in early files, meaning little). In the
  pickle a storage is a persistent id ``('storage', storage_type, key, location, numel)``.
* **legacy** (``torch.save`` before 1.6, e.g. the PyTorch 1.1 the official MPRNet used): pickles
  back to back: a magic number, a protocol version (1001), a dict of system info, the main
  object (persistent ids ``('storage', storage_type, root_key, location, numel, view)``), the
  list of storage keys; then, for each key in that order, an 8-byte little-endian element
  count followed by the storage's bytes. Older tar-based files are refused.

A checkpoint is untrusted input: a pickle can name any importable callable and call it. Here
``find_class`` maps an allow-list of names (tensor rebuild functions, storage and dtype names,
``collections.OrderedDict``) to local stand-ins and refuses every other name, so nothing is ever
imported or called from outside this module. Tensors come back as C-contiguous numpy arrays,
OrderedDicts as plain dicts (order kept).

:func:`save_pth` writes the zip format that ``torch.load(path, weights_only=True)`` accepts.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import pickletools
import struct
import zipfile
from pathlib import Path

import numpy as np

try:  # bfloat16 has no numpy dtype; ml_dtypes (a jax dependency) provides one.
  from ml_dtypes import bfloat16 as _BF16
except ImportError:  # pragma: no cover
  _BF16 = None

__all__ = ["CheckpointError", "load_pth", "save_pth"]

from mprnet_jax.errors import CheckpointError  # noqa: E402  (re-exported here, as before)
from mprnet_jax.files import atomic_output, require_regular_file  # noqa: E402

# Storage class names and dtype names -> numpy dtype. None = unsupported here.
_STORAGES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": _BF16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
    "UntypedStorage": np.uint8,
}
_DTYPES = {
    "float64": np.float64,
    "double": np.float64,
    "float32": np.float32,
    "float": np.float32,
    "float16": np.float16,
    "half": np.float16,
    "bfloat16": _BF16,
    "int64": np.int64,
    "long": np.int64,
    "int32": np.int32,
    "int": np.int32,
    "int16": np.int16,
    "short": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
    "bool": np.bool_,
    "complex64": np.complex64,
    "complex128": np.complex128,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_ALIGN = 64  # torch aligns storage bytes to 64 in the zip so the file can be memory-mapped
# Memory budget for an untrusted file. torch.save stores every zip entry uncompressed, so the
# bytes expanded from the archive may not exceed the archive's own size. The tensors built from
# the storages may not exceed twice the storages' real bytes plus this slack: a state dict's
# tensors are views that cover their storages about once, while stride-0 ("expanded") tensors
# would otherwise let a 16-byte storage ask for gigabytes.
_TENSOR_SLACK_BYTES = 64 << 20


class _Sealed:
  """Base of the stand-ins below: a pickle's BUILD opcode must not rewrite their fields."""

  __slots__ = ()

  def __setstate__(self, state):
    raise TypeError(f"BUILD on a {type(self).__name__} is not allowed")


class _OrderedDict(dict):
  """Stand-in for collections.OrderedDict. torch sets a `_metadata` attribute (module
    versions) on state_dicts through BUILD; it means nothing here and is dropped."""

  def __setstate__(self, state):
    pass


class _DType(_Sealed):
  """Stand-in for a torch storage class or dtype found in a pickle: only carries a dtype."""

  __slots__ = ("name", "dtype")

  def __init__(self, name, dtype):
    self.name, self.dtype = name, dtype

  def __repr__(self):
    return f"torch.{self.name}"


class _StorageRef(_Sealed):
  __slots__ = ("key", "dtype", "numel", "view")

  def __init__(self, key, dtype, numel, view):
    self.key, self.dtype, self.numel, self.view = key, dtype, numel, view


class _TensorRef(_Sealed):
  """Placeholder made while unpickling; replaced by an ndarray once storages are read
    (legacy files store the bytes after the pickle, so this cannot happen earlier)."""

  __slots__ = ("storage", "offset", "size", "stride", "dtype")

  def __init__(self, storage, offset, size, stride, dtype=None):
    if not isinstance(storage, _StorageRef):
      raise TypeError("tensor rebuilt from something that is not a storage")
    for v in (offset, *size, *stride):
      if type(v) is not int or v < 0:
        raise TypeError(f"bad tensor geometry {offset!r} {size!r} {stride!r}")
    if len(size) != len(stride):
      raise TypeError(f"tensor size {size} and stride {stride} differ in length")
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)
    self.dtype = storage.dtype if dtype is None else dtype


def _rebuild_tensor(storage, offset, size, stride, *_):  # _rebuild_tensor and _v2
  return _TensorRef(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *_):
  if not isinstance(dtype, _DType) or dtype.dtype is None:
    raise TypeError(f"unsupported tensor dtype {dtype!r}")
  return _TensorRef(storage, offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, *_):  # an nn.Parameter is its tensor, for our purposes
  return data


_ALLOWED = {("collections", "OrderedDict"): _OrderedDict, ("torch", "Size"): tuple}
for _f, _names in [(_rebuild_tensor, ("_rebuild_tensor", "_rebuild_tensor_v2")),
                   (_rebuild_tensor_v3, ("_rebuild_tensor_v3",)),
                   (_rebuild_parameter, ("_rebuild_parameter", "_rebuild_parameter_with_state"))]:
  _ALLOWED.update({("torch._utils", n): _f for n in _names})
for _n, _dt in _STORAGES.items():
  _ALLOWED[("torch", _n)] = _ALLOWED[("torch.storage", _n)] = _DType(_n, _dt)
_ALLOWED.update({("torch", _n): _DType(_n, _dt) for _n, _dt in _DTYPES.items()})


def _check_memo(f, name):
  """Walks the pickle at `f`'s position opcode by opcode (nothing is built) and refuses a memo
    index beyond the number of opcodes read so far; then rewinds. A pickler numbers its memo
    entries 0, 1, 2, ..., while CPython's unpickler sizes its memo table to the largest index
    it sees, so a LONG_BINPUT of 0x20000000 would allocate gigabytes from a few bytes."""
  start = f.tell()
  try:
    for count, (op, arg, _) in enumerate(pickletools.genops(f)):
      if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and (type(arg) is not int or arg > count):
        raise CheckpointError(f"{name}: pickle memo index {arg!r} at opcode {count} is out of "
                              "range (a corrupt or hostile file)")
  except ValueError as e:  # genops' word for an unknown opcode or a stream that ends early
    if isinstance(e, CheckpointError):
      raise
    raise CheckpointError(f"{name}: truncated or corrupt pickle ({e})") from None
  f.seek(start)


class _Capped(io.RawIOBase):
  """Read-only view of a file that never returns (or asks the OS for) more bytes than the file
    has left: a pickle opcode declaring a 4 GiB string would otherwise allocate 4 GiB first."""

  def __init__(self, f, size):
    super().__init__()
    self.f, self.size = f, size

  def readable(self):
    return True

  def seekable(self):
    return True

  def tell(self):
    return self.f.tell()

  def seek(self, offset, whence=io.SEEK_SET):
    return self.f.seek(offset, whence)

  def read(self, n=-1):
    left = max(self.size - self.f.tell(), 0)
    return self.f.read(left if n is None or n < 0 or n > left else n)

  def readinto(self, buffer):
    data = self.read(len(buffer))
    buffer[:len(data)] = data
    return len(data)

  def readline(self, limit=-1):
    return self.f.readline(limit)


class _Unpickler(pickle.Unpickler):

  def __init__(self, file, name, legacy):
    _check_memo(file, name)
    super().__init__(file)
    self.name, self.legacy, self.storages = name, legacy, {}

  def find_class(self, module, name):
    # Every GLOBAL / STACK_GLOBAL / INST / OBJ / EXT opcode comes through here, so
    # refusing here means a non-allowed callable can never reach REDUCE or BUILD.
    obj = _ALLOWED.get((module, name))
    if obj is None:
      raise CheckpointError(
          f"{self.name}: refuses to load '{module}.{name}': only tensors, storages, "
          "ordered dicts and plain containers are allowed")
    return obj

  def persistent_load(self, pid):
    n = 6 if self.legacy else 5
    if not (isinstance(pid, tuple) and len(pid) == n and pid[0] == "storage"):
      raise CheckpointError(f"{self.name}: refuses persistent id {str(pid)[:80]!r}: "
                            "only storages are allowed")
    _, stype, key, _location, numel = pid[:5]
    view = pid[5] if self.legacy else None
    if not isinstance(stype, _DType) or not isinstance(key, str) or type(numel) is not int:
      raise CheckpointError(f"{self.name}: malformed storage id {str(pid)[:80]!r}")
    if stype.dtype is None:
      raise CheckpointError(f"{self.name}: storage type {stype.name} is not supported")
    if view is not None:
      ok = (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str) and
            all(type(v) is int and v >= 0 for v in view[1:]))
      if not ok:
        raise CheckpointError(f"{self.name}: malformed storage view {str(view)[:80]!r}")
    ref = _StorageRef(key, np.dtype(stype.dtype), numel, view)
    self.storages.setdefault(key, ref)
    return ref


def _materialise(obj, arrays, name):
  """Replace every _TensorRef in the unpickled tree by its array (lists/dicts in place).
    `seen` maps id -> (original, result): shared objects stay shared, cycles terminate, and
    keeping the original alive stops its id being reused while we walk. The tensors together
    may not take more than the memory budget (see _TENSOR_SLACK_BYTES), checked before each
    one is allocated."""
  seen = {}
  storage_bytes = sum(a.nbytes for a in arrays.values())
  budget = {
      "left": 2 * storage_bytes + _TENSOR_SLACK_BYTES,
      "limit": 2 * storage_bytes + _TENSOR_SLACK_BYTES
  }

  def walk(x):
    if id(x) in seen:
      return seen[id(x)][1]
    if isinstance(x, _TensorRef):
      if x.storage.key not in arrays:
        raise CheckpointError(f"{name}: storage {x.storage.key} has no data in the file")
      seen[id(x)] = (x, _tensor(x, arrays[x.storage.key], name, budget))
    elif isinstance(x, list):
      seen[id(x)] = (x, x)
      x[:] = [walk(v) for v in x]
    elif isinstance(x, dict):
      d = {} if type(x) is _OrderedDict else x
      seen[id(x)] = (x, d)
      for k in list(x):
        d[k] = walk(x[k])
    elif isinstance(x, tuple):
      seen[id(x)] = (x, x)  # a cycle back into this tuple sees the original
      seen[id(x)] = (x, tuple(walk(v) for v in x))
    elif isinstance(x, (_StorageRef, _DType)):
      raise CheckpointError(f"{name}: a bare storage or dtype outside a tensor is not supported")
    elif x is None or isinstance(x, (bool, int, float, complex, str, bytes)):
      return x
    else:
      raise CheckpointError(f"{name}: unexpected object of type {type(x).__name__}")
    return seen[id(x)][1]

  return walk(obj)


def _tensor(t, storage, name, budget):
  order = ">" if storage.dtype.byteorder == ">" else "<"
  dt = np.dtype(t.dtype).newbyteorder(order)
  s = storage if dt == storage.dtype else storage.view(dt)  # untyped storage + v3 dtype
  if t.storage.view is not None:  # legacy: a storage that is a slice of its root storage
    _, off, n = t.storage.view
    if off + n > s.size:
      raise CheckpointError(f"{name}: storage view {t.storage.view} is outside "
                            f"storage {t.storage.key}")
    s = s[off:off + n]
  count = math.prod(t.size)  # Python ints: an int64 product of hostile sizes could wrap
  last = t.offset + sum((n - 1) * st for n, st in zip(t.size, t.stride)) if count else 0
  if count and last >= s.size:
    raise CheckpointError(f"{name}: tensor of size {t.size} stride {t.stride} offset "
                          f"{t.offset} is outside its storage {t.storage.key} ({s.size} elements)")
  native = dt.newbyteorder("=")
  nbytes = count * native.itemsize
  if nbytes > budget["left"]:
    raise CheckpointError(f"{name}: tensor of size {t.size} ({nbytes} bytes) would take the "
                          f"file's tensors past their limit of {budget['limit']} bytes (twice "
                          "its storages plus 64 MiB; stride-0 tensors expand beyond their data)")
  budget["left"] -= nbytes
  if count == 0:
    return np.zeros(t.size, native)
  # Bounds were checked above, so as_strided never reads outside the storage's buffer.
  view = np.lib.stride_tricks.as_strided(s[t.offset:], t.size, [st * s.itemsize for st in t.stride],
                                         writeable=False)
  return np.array(view, dtype=native, order="C")  # one copy (ascontiguousarray makes 0-d 1-d)


def _storage_array(ref, data, byteorder, name):
  dt = ref.dtype.newbyteorder("<" if byteorder == "little" else ">")
  need = ref.numel * dt.itemsize
  if len(data) < need:
    raise CheckpointError(f"{name}: truncated (storage {ref.key} needs {need} bytes, "
                          f"file has {len(data)})")
  return np.frombuffer(data, dt, ref.numel)


def _load_zip(f, name):
  with zipfile.ZipFile(f) as zf:
    pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
      raise CheckpointError(f"{name}: zip archive without a <prefix>/data.pkl: "
                            "not a torch.save checkpoint")
    prefix = pkls[0][:-len("data.pkl")]
    names = set(zf.namelist())
    archive_bytes = f.seek(0, io.SEEK_END)
    left = [archive_bytes]

    def read(entry, what):
      # torch.save stores entries uncompressed, so together they cannot be larger than the
      # file; an entry that would take the total past it is refused before it is expanded
      # (zipfile stops expanding at the size the entry declares).
      expanded = zf.getinfo(entry).file_size
      if expanded > left[0]:
        raise CheckpointError(f"{name}: {what} would expand the {archive_bytes}-byte file past "
                              f"its own size ({expanded} bytes more; limit: the file's size, as "
                              "torch.save does not compress)")
      left[0] -= expanded
      return zf.read(entry)

    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = read(prefix + "byteorder", "byteorder").decode("ascii", "replace").strip()
      if byteorder not in ("little", "big"):
        raise CheckpointError(f"{name}: unknown byteorder {byteorder[:20]!r}")
    up = _Unpickler(io.BytesIO(read(pkls[0], "data.pkl")), name, legacy=False)
    obj = up.load()
    arrays = {}
    for key, ref in up.storages.items():  # each storage read once, however many tensors use it
      entry = f"{prefix}data/{key}"
      if entry not in names:
        raise CheckpointError(f"{name}: storage {key} missing from the archive")
      arrays[key] = _storage_array(ref, read(entry, f"storage {key}"), byteorder, name)
    return _materialise(obj, arrays, name)


def _load_legacy(f, name, size):
  f = _Capped(f, size)

  class _Plain(_Unpickler):  # header pickles and the key list: no globals, no storages

    def find_class(self, module, attr):
      raise CheckpointError(f"{name}: refuses to load '{module}.{attr}' in a legacy header")

    def persistent_load(self, pid):
      raise CheckpointError(f"{name}: unexpected persistent id in a legacy header")

  if _Plain(f, name, True).load() != _LEGACY_MAGIC:
    raise CheckpointError(f"{name}: not a PyTorch checkpoint (legacy magic number missing)")
  if _Plain(f, name, True).load() != 1001:
    raise CheckpointError(f"{name}: unsupported legacy protocol version")
  info = _Plain(f, name, True).load()
  little = info.get("little_endian", True) if isinstance(info, dict) else True
  up = _Unpickler(f, name, legacy=True)
  obj = up.load()
  keys = _Plain(f, name, True).load()
  if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
    raise CheckpointError(f"{name}: malformed legacy storage key list")
  arrays = {}
  for key in keys:  # the storages' bytes follow, in the order of this list
    ref = up.storages.get(key)
    if ref is None:
      raise CheckpointError(f"{name}: legacy storage {key} is not used by any tensor")
    head = f.read(8)
    if len(head) < 8:
      raise CheckpointError(f"{name}: truncated (storage {key} header missing)")
    (count,) = struct.unpack("<q" if little else ">q", head)
    need = count * ref.dtype.itemsize
    left = size - f.tell()
    if count < 0 or need > left:
      raise CheckpointError(f"{name}: truncated (storage {key} needs {need} bytes, "
                            f"file has {max(left, 0)})")
    ref.numel = count
    arrays[key] = _storage_array(ref, f.read(need), "little" if little else "big", name)
  return _materialise(obj, arrays, name)


def load_pth(path) -> object:
  """Load a ``torch.save`` checkpoint (zip or legacy format) with tensors as numpy arrays.

    Raises CheckpointError (one line, naming the file) for anything that is not a readable
    checkpoint or that names a global outside the allow-list.
    """
  name = os.fspath(path)
  require_regular_file(name, CheckpointError, "checkpoint file")
  try:
    f = open(name, "rb")
  except FileNotFoundError:
    raise CheckpointError(f"{name}: no such file") from None
  except IsADirectoryError:
    raise CheckpointError(f"{name}: is a directory, not a checkpoint file") from None
  except OSError as e:
    raise CheckpointError(f"{name}: cannot open ({e.strerror or e})") from None
  with f:
    try:
      size = os.fstat(f.fileno()).st_size
      head = f.read(512)
      f.seek(0)
      if not head:
        raise CheckpointError(f"{name}: empty file")
      if head[:4] == b"PK\x03\x04":
        return _load_zip(f, name)
      if len(head) > 262 and head[257:262] == b"ustar":
        raise CheckpointError(f"{name}: a tar-based checkpoint from a very old PyTorch "
                              "(before 1.0); not supported, re-save it with torch")
      if head[:2] == b"\x80\x02":  # legacy files start with the pickled magic number
        return _load_legacy(f, name, size)
      raise CheckpointError(f"{name}: not a PyTorch checkpoint (neither a zip archive "
                            "nor a legacy pickle stream)")
    except CheckpointError:
      raise
    except zipfile.BadZipFile as e:
      raise CheckpointError(f"{name}: truncated or corrupt zip archive ({e})") from None
    except (EOFError, pickle.UnpicklingError) as e:
      raise CheckpointError(f"{name}: truncated or corrupt pickle ({e})") from None
    except (MemoryError, RecursionError) as e:
      raise CheckpointError(f"{name}: pickle too large or too deeply nested "
                            f"({type(e).__name__})") from None
    except Exception as e:  # noqa: BLE001 -- untrusted input: any parse failure is "bad file"
      msg = " ".join(str(e).split())[:200]
      raise CheckpointError(f"{name}: corrupt checkpoint ({type(e).__name__}: {msg})") from None


# ----------------------------------------------------------------------------- writing
# The pickle is written opcode by opcode (protocol 2) rather than with pickle.Pickler: the
# Pickler would import `torch` to check every global it writes, and torch is not needed here.
_STORAGE_OF = {
    np.dtype(v): k for k, v in _STORAGES.items() if v is not None and k != "UntypedStorage"
}


def _global(module, name):
  return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


_ORDERED_DICT = _global("collections", "OrderedDict") + b")R"  # OrderedDict()


class _Writer:

  def __init__(self, name):
    self.name, self.out, self.storages, self.keys = name, [], [], {}

  def put(self, x, where):
    w = self.out.append
    if x is None:
      w(b"N")
    elif isinstance(x, (bool, np.bool_)):
      w(b"\x88" if x else b"\x89")
    elif isinstance(x, (int, np.integer)):
      x = int(x)
      if 0 <= x < 256:
        w(b"K" + bytes([x]))
      elif -(2**31) <= x < 2**31:
        w(b"J" + struct.pack("<i", x))
      else:  # LONG1: two's complement, little-endian
        b = x.to_bytes((x.bit_length() + 8) // 8, "little", signed=True)
        w(b"\x8a" + bytes([len(b)]) + b)
    elif isinstance(x, (float, np.floating)):
      w(b"G" + struct.pack(">d", float(x)))
    elif isinstance(x, str):
      b = x.encode("utf-8")  # strict: torch decodes strictly too
      w(b"X" + struct.pack("<I", len(b)) + b)
    elif isinstance(x, np.ndarray):
      self.tensor(x, where)
    elif isinstance(x, (list, tuple)):
      w(b"]" if isinstance(x, list) else b"")
      w(b"(")
      for i, v in enumerate(x):
        self.put(v, f"{where}[{i}]")
      w(b"e" if isinstance(x, list) else b"t")
    elif isinstance(x, dict):
      # torch's state_dicts are OrderedDicts; write any dict holding tensors as one.
      holds = any(isinstance(v, np.ndarray) for v in x.values())
      w(_ORDERED_DICT if holds else b"}")
      w(b"(")
      for k, v in x.items():
        if not isinstance(k, (str, int)):
          raise CheckpointError(f"{self.name}: cannot save key {k!r} at {where}")
        self.put(k, where)
        self.put(v, f"{where}[{k!r}]")
      w(b"u")
    else:
      raise CheckpointError(f"{self.name}: cannot save a {type(x).__name__} at {where}")

  def tensor(self, a, where):
    kind = _STORAGE_OF.get(a.dtype.newbyteorder("="))
    if kind is None:
      raise CheckpointError(f"{self.name}: cannot save dtype {a.dtype} at {where}")
    if id(a) not in self.keys:  # the same array object twice shares one storage, as in torch
      self.keys[id(a)] = str(len(self.storages))
      self.storages.append(a)
    stride, acc = [], 1
    for n in reversed(a.shape):  # contiguous strides, as torch computes them
      stride.insert(0, acc)
      acc *= max(n, 1)
    w = self.out.append
    w(_global("torch._utils", "_rebuild_tensor_v2") + b"((X\x07\x00\x00\x00storage")
    w(_global("torch", kind))
    self.put(self.keys[id(a)], where)
    self.put("cpu", where)
    self.put(a.size, where)
    w(b"tQ")  # the storage tuple becomes a persistent id
    for v in (0, tuple(a.shape), tuple(stride), False):  # offset, size, stride, grad
      self.put(v, where)
    w(_ORDERED_DICT + b"tR")  # backward hooks: an empty OrderedDict; close args; call


def save_pth(obj, path, *, overwrite: bool = False) -> None:
  """Write ``obj`` (dicts, lists, tuples, numbers, strings, numpy arrays) as a zip-format
    ``.pth`` that ``torch.load(path, weights_only=True)`` reads back with arrays as tensors.

    The file is written next to ``path`` under a temporary name and moved into place, so a
    failure never leaves a partial checkpoint. An existing ``path`` is refused unless
    ``overwrite=True``.
    """
  target = Path(os.fspath(path))
  name = os.fspath(path)
  if target.exists() and not overwrite:
    raise CheckpointError(f"{name}: already exists (pass overwrite=True to replace it)")
  wr = _Writer(name)
  wr.out.append(b"\x80\x02")
  try:  # everything is serialised before a file is created
    wr.put(obj, "checkpoint")
  except (UnicodeEncodeError, RecursionError) as e:
    raise CheckpointError(f"{name}: cannot save ({type(e).__name__}: {e})") from None
  wr.out.append(b".")
  prefix = "archive/"
  try:
    # Written beside the target and renamed; created with 0666 & ~umask like any other file.
    with atomic_output(target, CheckpointError) as tmp, open(tmp, "wb") as f, \
        zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
      # No `.format_version`: version 1 tells torch it may compute storage offsets by
      # assuming miniz's exact layout (data descriptors after each entry), which Python's
      # zipfile does not write; without it torch reads each entry's real offset.
      entries = [("data.pkl", b"".join(wr.out)), (".storage_alignment", str(_ALIGN).encode()),
                 ("byteorder", b"little")]
      entries += [(f"data/{i}", a) for i, a in enumerate(wr.storages)]
      entries.append(("version", b"3\n"))
      for entry, data in entries:
        if isinstance(data, np.ndarray):
          data = np.ascontiguousarray(data, data.dtype.newbyteorder("<")).tobytes()
        _write_aligned(f, zf, prefix + entry, data, name)
  except OSError as e:
    raise CheckpointError(f"{name}: cannot write ({e.strerror or e})") from None


def _write_aligned(f, zf, entry, data, name):
  """Write one uncompressed entry whose bytes start at a multiple of _ALIGN in the file,
    padding its local header with an extra field ('FB' id, as torch does)."""
  zi = zipfile.ZipInfo(entry, date_time=(1980, 1, 1, 0, 0, 0))
  zi.compress_type, zi.external_attr = zipfile.ZIP_STORED, 0o644 << 16
  header = 30 + len(entry.encode()) + 4  # fixed header + name + extra field's own header
  if len(data) * 1.05 > zipfile.ZIP64_LIMIT:  # zipfile then adds a 20-byte zip64 field
    header += 20
  pad = -(f.tell() + header) % _ALIGN
  zi.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
  zf.writestr(zi, data)
  if (f.tell() - len(data)) % _ALIGN:  # zipfile's header layout changed under us
    raise CheckpointError(f"{name}: could not align zip entry {entry}")
