"""torch.save's checkpoint format (what dictionary_learning's `ae.pt` is), read and written with
numpy alone: a dictionary of tensors, no torch and no arbitrary unpickling.

A checkpoint is a zip archive whose records sit under one folder `<archive>/`:

  data.pkl    a pickle of the object; each tensor is a call of torch._utils._rebuild_tensor_v2
              (storage, offset, size, stride, requires_grad, hooks), whose storage is a persistent
              id ('storage', torch.<Type>Storage, key, device, numel) naming record data/<key>
  data/<key>  the storage's raw elements, in the byte order of record `byteorder` (little if absent)
  version     the format version; torch.save also writes .format_version, .storage_alignment and
              .data/serialization_id, which loading does not need

Reading unpickles with an allow-list (`_ALLOWED`): the few globals a state dict uses, everything
else refused before it is looked up, so a hostile file cannot run code. Every index a tensor view
makes into its storage is bounds-checked. Writing emits the pickle opcodes by hand (the subset
torch.load(weights_only=True) accepts) and stores every record uncompressed, data records starting
on 64-byte boundaries as torch's own writer puts them (so torch can map them from the file).
The files torch wrote before version 1.6 (not zip archives) are refused with the way to convert.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import sys
import zipfile
import zlib
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from jaxsae.errors import ConfigError

__all__ = ['DTYPES', 'load', 'save']

# torch's typed-storage class names (how data.pkl names a storage's element type) -> numpy.
_STORAGE_DTYPES = {
    'FloatStorage': np.dtype(np.float32),
    'DoubleStorage': np.dtype(np.float64),
    'HalfStorage': np.dtype(np.float16),
    'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
    'LongStorage': np.dtype(np.int64),
    'IntStorage': np.dtype(np.int32),
    'ShortStorage': np.dtype(np.int16),
    'CharStorage': np.dtype(np.int8),
    'ByteStorage': np.dtype(np.uint8),
    'BoolStorage': np.dtype(np.bool_),
}
DTYPES = frozenset(_STORAGE_DTYPES.values())  # what `save` writes and `load` returns
_STORAGE_NAMES = {dtype: name for name, dtype in _STORAGE_DTYPES.items()}
_ALIGNMENT = 64
_RESAVE = (
    're-save it with a current torch: python -c "import torch; '
    "torch.save(torch.load('{path}', weights_only=True), '{path}')\""
)


class _StorageType:
  """What a torch.<X>Storage global unpickles to: only its element type."""

  def __init__(self, dtype: np.dtype):
    self.dtype = dtype


class _Storage:
  """A storage read from its data record: a flat array of its elements."""

  def __init__(self, array: np.ndarray):
    self.array = array


def load(path: str) -> dict[str, np.ndarray]:
  """The tensors of torch checkpoint `path` (a dict of tensors, such as a state dict), as numpy
  arrays; a ConfigError naming the file for anything else, a damaged file, or a legacy one."""
  with open(path, 'rb') as f:
    head = f.read(4)
  if head != b'PK\x03\x04':
    raise ConfigError(_not_a_zip(path, head))
  try:
    with zipfile.ZipFile(path) as zf:
      return _load_archive(zf, path)
  except (zipfile.BadZipFile, EOFError, OSError, struct.error) as e:
    raise ConfigError(
        f'{path} cannot be read as a torch checkpoint ({e}): the file is truncated or corrupt. '
        'Copy it again from where it came from.'
    ) from None


def _not_a_zip(path: str, head: bytes) -> str:
  if not head:
    return f'{path} is empty: copy it again from where it came from.'
  if head[:1] == b'\x80':  # a bare pickle: torch < 1.6, or _use_new_zipfile_serialization=False
    return (
        f'{path} is a torch checkpoint in the legacy format (torch < 1.6), which jaxsae does not '
        f'read; {_RESAVE.format(path=path)}'
    )
  return f'{path} is not a torch checkpoint (a zip archive written by torch.save).'


def _load_archive(zf: zipfile.ZipFile, path: str) -> dict[str, np.ndarray]:
  pickles = [n for n in zf.namelist() if n.count('/') == 1 and n.endswith('/data.pkl')]
  if len(pickles) != 1:
    raise ConfigError(
        f'{path} is a zip archive but not a torch checkpoint: expected one <archive>/data.pkl, '
        f'found {pickles or "none"}. Save the state dict with torch.save.'
    )
  prefix = pickles[0][: -len('data.pkl')]
  byteorder = 'little'
  if prefix + 'byteorder' in zf.namelist():
    byteorder = zf.read(prefix + 'byteorder').decode('ascii', 'replace')
    if byteorder not in ('little', 'big'):
      raise ConfigError(f'{path}: byteorder record is {byteorder!r}; expected little or big.')
  unpickler = _Unpickler(io.BytesIO(zf.read(pickles[0])), zf, prefix, byteorder, path)
  try:
    obj = unpickler.load()
  except (ConfigError, zipfile.BadZipFile, EOFError, OSError):
    raise  # named already, or a damaged record that `load` names
  except Exception as e:  # pylint: disable=broad-except  # what a malformed pickle raises varies
    raise ConfigError(
        f'{path}: its data.pkl cannot be unpickled as a dict of tensors '
        f'({type(e).__name__}: {e}); the file is corrupt or not a state dict.'
    ) from None
  if not isinstance(obj, dict) or not all(
      isinstance(k, str) and isinstance(v, np.ndarray) and v.dtype in DTYPES for k, v in obj.items()
  ):
    raise ConfigError(
        f'{path} holds a {type(obj).__name__} that is not a dict of tensors by name; jaxsae reads '
        'state dicts (torch.save(model.state_dict(), path)).'
    )
  return dict(obj)


class _Unpickler(pickle.Unpickler):
  """data.pkl's reader: globals from the allow-list only, storages from the archive's records."""

  def __init__(self, file, zf: zipfile.ZipFile, prefix: str, byteorder: str, path: str):
    super().__init__(file)
    self.zf, self.prefix, self.byteorder, self.path = zf, prefix, byteorder, path
    self.storages: dict[str, _Storage] = {}

  def find_class(self, module: str, name: str) -> Any:
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(_STORAGE_DTYPES[name])
    found = _ALLOWED.get((module, name))
    if found is None:
      raise ConfigError(
          f'{self.path} refers to the global {module}.{name}, which a dict of tensors does not '
          'need; refused, nothing of it was run. Load only checkpoints you trust, and save state '
          'dicts (torch.save(model.state_dict(), path)).'
      )
    return found

  def persistent_load(self, pid: Any) -> _Storage:
    if not (
        isinstance(pid, tuple)
        and len(pid) == 5
        and pid[0] == 'storage'
        and isinstance(pid[1], _StorageType)
        and isinstance(pid[2], str)
        and _is_int(pid[4])
    ):
      raise ConfigError(f'{self.path}: data.pkl names a storage as {pid!r}; expected a tensor.')
    _, kind, key, _, numel = pid  # the device it was saved from does not matter here
    if key not in self.storages:
      self.storages[key] = _Storage(self._read_storage(key, kind.dtype, numel))
    return self.storages[key]

  def _read_storage(self, key: str, dtype: np.dtype, numel: int) -> np.ndarray:
    name = f'{self.prefix}data/{key}'
    try:
      info = self.zf.getinfo(name)
    except KeyError:
      raise ConfigError(f'{self.path} lacks record {name}, which data.pkl refers to.') from None
    if numel < 0 or info.file_size != numel * dtype.itemsize:
      raise ConfigError(
          f'{self.path}: record {name} holds {info.file_size} bytes; expected {numel} x '
          f'{dtype.itemsize} bytes. The file is corrupt.'
      )
    raw = _read_record(self.zf, info, self.path)
    if self.byteorder != sys.byteorder and dtype.itemsize > 1:
      raw = raw.view(f'u{dtype.itemsize}').byteswap().view(np.uint8)
    return raw.view(dtype)


def _read_record(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: str) -> np.ndarray:
  """A record's bytes, checked against its CRC-32. Stored records (torch stores all) are read
  straight from the file into the array: zipfile would first hold a second copy of a GiB tensor."""
  if info.compress_type != zipfile.ZIP_STORED:
    return np.frombuffer(zf.read(info), np.uint8).copy()
  raw = np.empty(info.file_size, np.uint8)
  with open(path, 'rb') as f:
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) < 30 or header[:4] != b'PK\x03\x04':
      raise zipfile.BadZipFile(f'no local header for record {info.filename}')
    name_len, extra_len = struct.unpack('<HH', header[26:30])
    f.seek(info.header_offset + 30 + name_len + extra_len)
    if f.readinto(memoryview(raw)) != len(raw):
      raise EOFError(f'record {info.filename} ends early')
  if zlib.crc32(raw) != info.CRC:
    raise zipfile.BadZipFile(f'bad CRC-32 for record {info.filename}')
  return raw


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, *metadata):
  """torch._utils._rebuild_tensor_v2: the view (offset, size, stride) of a storage, as an array."""
  del requires_grad, hooks, metadata  # autograd state and tensor flags: nothing numpy keeps
  ok = (
      isinstance(storage, _Storage)
      and _is_int(offset)
      and isinstance(size, tuple)
      and isinstance(stride, tuple)
      and len(size) == len(stride)
      and all(_is_int(n) and n >= 0 for n in size + stride + (offset,))
  )
  if not ok:
    raise pickle.UnpicklingError(
        f'a tensor with offset {offset!r}, size {size!r}, stride {stride!r}'
    )
  flat = storage.array
  if 0 in size:
    return np.zeros(size, flat.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= flat.size:
    raise pickle.UnpicklingError(
        f'a tensor view (offset {offset}, size {size}, stride {stride}) reaches element {last} of '
        f'a storage of {flat.size}'
    )
  if offset == 0 and stride == _c_strides(size) and math.prod(size) == flat.size:
    return flat.reshape(size)  # the whole storage, in order: no copy (shared as torch shares it)
  strides = tuple(s * flat.itemsize for s in stride)
  return np.lib.stride_tricks.as_strided(flat[offset:], size, strides, writeable=False).copy()


def _c_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
  """A C-contiguous tensor's strides, in elements (as torch counts them)."""
  return tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))


def _rebuild_parameter(data, requires_grad=False, hooks=None, *state):
  """torch._utils._rebuild_parameter(_with_state): an nn.Parameter is its data here."""
  del requires_grad, hooks, state
  if not isinstance(data, np.ndarray):
    raise pickle.UnpicklingError(f'a parameter of {type(data).__name__}')
  return data


_ALLOWED = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
}


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def save(path: str, tensors: Mapping[str, np.ndarray]) -> None:
  """Write `tensors` (names -> arrays of a dtype in DTYPES) to `path` as torch.save writes a dict
  of CPU tensors, which torch.load(path, weights_only=True) reads back. Not atomic by itself:
  jaxsae.formats.weights writes it inside a folder that is renamed into place."""
  arrays = {}
  for name, value in tensors.items():
    a = np.asarray(value)
    if a.dtype.newbyteorder('=') not in DTYPES:
      raise ConfigError(
          f'{path}: tensor {name!r} has dtype {a.dtype}; a torch checkpoint here holds '
          f'{sorted(str(d) for d in DTYPES)}. Convert it first.'
      )
    arrays[str(name)] = np.asarray(a, a.dtype.newbyteorder('='), order='C')  # keeps 0-d
  archive = os.path.splitext(os.path.basename(path))[0] or 'archive'
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as zf:
    _add(zf, f'{archive}/data.pkl', _pickle(arrays))
    _add(zf, f'{archive}/.format_version', b'1')
    _add(zf, f'{archive}/.storage_alignment', str(_ALIGNMENT).encode())
    _add(zf, f'{archive}/byteorder', sys.byteorder.encode())
    for key, a in enumerate(arrays.values()):
      _add(zf, f'{archive}/data/{key}', a)
    _add(zf, f'{archive}/version', b'3\n')


def _add(zf: zipfile.ZipFile, name: str, data: bytes | np.ndarray) -> None:
  """One uncompressed record whose data starts on a 64-byte boundary of the file: the local
  header's extra field pads it (a zip64 header, for records of GiBs, adds 20 bytes of its own)."""
  payload = memoryview(data) if isinstance(data, bytes) else data.reshape(-1).view(np.uint8)
  info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
  info.compress_type, info.file_size = zipfile.ZIP_STORED, len(payload)
  zip64 = info.file_size * 1.05 > zipfile.ZIP64_LIMIT  # zipfile's own rule for its header
  start = zf.fp.tell() + 30 + len(name.encode()) + 4 + (20 if zip64 else 0)
  pad = -start % _ALIGNMENT
  info.extra = struct.pack('<HH', 0x4246, pad) + b'Z' * pad  # an extra field of ID 'FB': padding
  with zf.open(info, 'w', force_zip64=zip64) as f:
    if zf.fp.tell() % _ALIGNMENT:
      raise AssertionError(f'{name} would start at {zf.fp.tell()}, not on a 64-byte boundary')
    for i in range(0, len(payload), 1 << 26):  # 64 MiB at a time
      f.write(payload[i : i + (1 << 26)])


def _pickle(arrays: Mapping[str, np.ndarray]) -> bytes:
  """data.pkl of a dict of tensors, storage i holding tensor i (protocol 2, no memo)."""
  out = [b'\x80\x02}(']  # PROTO 2, EMPTY_DICT, MARK
  for key, (name, a) in enumerate(arrays.items()):
    strides = _c_strides(a.shape)
    out += [
        _str(name),
        b'ctorch._utils\n_rebuild_tensor_v2\n(',  # GLOBAL, MARK: its arguments
        b'(' + _str('storage'),  # MARK: the persistent id
        f'ctorch\n{_STORAGE_NAMES[a.dtype]}\n'.encode(),
        _str(str(key)) + _str('cpu') + _int(a.size) + b'tQ',  # TUPLE, BINPERSID
        _int(0),  # storage offset
        _tuple(a.shape),
        _tuple(strides),
        b'\x89',  # NEWFALSE: requires_grad
        b'ccollections\nOrderedDict\n)R',  # GLOBAL, EMPTY_TUPLE, REDUCE: no backward hooks
        b'tR',  # TUPLE, REDUCE
    ]
  out.append(b'u.')  # SETITEMS, STOP
  return b''.join(out)


def _str(s: str) -> bytes:
  b = s.encode('utf-8')
  return b'X' + struct.pack('<I', len(b)) + b  # BINUNICODE


def _int(n: int) -> bytes:
  if 0 <= n < 256:
    return b'K' + bytes([n])  # BININT1
  if -(2**31) <= n < 2**31:
    return b'J' + struct.pack('<i', n)  # BININT
  b = n.to_bytes((n.bit_length() + 8) // 8, 'little', signed=True)
  return b'\x8a' + bytes([len(b)]) + b  # LONG1


def _tuple(items: tuple[int, ...]) -> bytes:
  return b'(' + b''.join(_int(int(i)) for i in items) + b't' if items else b')'
