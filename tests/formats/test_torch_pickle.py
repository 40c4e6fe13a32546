"""torch.save's format without torch: what torch writes, jaxsae.formats.torch_pickle reads exactly
(every dtype, 0-d, views into shared storages, big-endian files); what it writes, torch.load
(weights_only=True) reads exactly; a pickle asking for anything but tensors is refused unrun."""

import os
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from jaxsae.config import ConfigError
from jaxsae.formats import torch_pickle

DTYPES = ['float32', 'float16', 'bfloat16', 'int32', 'int64', 'float64', 'int8', 'uint8', 'bool']


def _np_dtype(name):
  return np.dtype(ml_dtypes.bfloat16) if name == 'bfloat16' else np.dtype(name)


def _arrays(seed=0):
  """One array per dtype, of several shapes: 0-d, empty, 1-d, 3-d."""
  rng = np.random.default_rng(seed)
  shapes = [(), (0, 3), (5,), (2, 3, 4)]
  out = {}
  for i, name in enumerate(DTYPES):
    shape = shapes[i % len(shapes)]
    value = rng.standard_normal(shape) * 100
    out[f'{name}_{i}'] = np.asarray(
        (value > 0) if name == 'bool' else value.astype(_np_dtype(name))
    )
  return out


def _to_numpy(t):
  import torch  # pylint: disable=import-outside-toplevel

  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def _from_numpy(a):
  import torch  # pylint: disable=import-outside-toplevel

  if a.dtype == ml_dtypes.bfloat16:
    return torch.from_numpy(np.array(a).view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(np.array(a))  # a C-ordered copy (0-d stays 0-d)


def _assert_same(got, want):
  assert list(got) == list(want)
  for name, a in want.items():
    assert got[name].dtype == a.dtype and got[name].shape == a.shape, name
    np.testing.assert_array_equal(got[name], a, err_msg=name)


@pytest.mark.torch
def test_reads_what_torch_saves(tmp_path):
  """Every dtype and shape, a state dict (OrderedDict with _metadata), an nn.Parameter, and views
  sharing one storage: transposed, offset, strided, as torch.save writes them."""
  import torch  # pylint: disable=import-outside-toplevel

  want = _arrays()
  tensors = {name: _from_numpy(a) for name, a in want.items()}
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  views = {'base': base, 'T': base.T, 'offset': base[1:, 2:], 'strided': base[::2, ::3]}
  tensors.update(views)
  want.update({name: v.numpy().copy() for name, v in views.items()})
  tensors['param'] = torch.nn.Parameter(torch.linspace(0, 1, 5))
  want['param'] = np.linspace(0, 1, 5, dtype=np.float32)
  path = str(tmp_path / 'ae.pt')
  torch.save(tensors, path)
  got = torch_pickle.load(path)
  _assert_same(got, want)
  for name, a in got.items():
    assert a.flags.writeable and a.flags.c_contiguous, name

  module = torch.nn.Linear(3, 2)
  torch.save(module.state_dict(), path)  # an OrderedDict with a _metadata attribute
  got = torch_pickle.load(path)
  _assert_same(got, {n: p.detach().numpy() for n, p in module.state_dict().items()})


@pytest.mark.torch
def test_reads_a_big_endian_file(tmp_path):
  """A file saved on a big-endian machine: its byteorder record says so and its storages are
  big-endian. torch reads the rewritten file as the original; so does torch_pickle."""
  import torch  # pylint: disable=import-outside-toplevel

  want = {'w': np.arange(6, dtype=np.float32).reshape(2, 3) / 7, 'k': np.array(4, np.int64)}
  little, big = str(tmp_path / 'little.pt'), str(tmp_path / 'big.pt')
  torch.save({n: torch.from_numpy(a) for n, a in want.items()}, little)
  sizes = {'0': 4, '1': 8}  # storage key -> element size (w, then k)
  with zipfile.ZipFile(little) as src, zipfile.ZipFile(big, 'w') as dst:
    for info in src.infolist():
      data = src.read(info)
      key = info.filename.rpartition('data/')[2]
      if info.filename.endswith('/byteorder'):
        data = b'big'
      elif '/data/' in info.filename and key in sizes:
        data = np.frombuffer(data, f'u{sizes[key]}').byteswap().tobytes()
      dst.writestr(info, data)
  _assert_same(torch_pickle.load(big), want)
  back = torch.load(big, weights_only=True)
  _assert_same({n: t.numpy() for n, t in back.items()}, want)


@pytest.mark.torch
def test_torch_reads_what_it_saves(tmp_path):
  """torch.load(weights_only=True) gives back every tensor exactly (dtype, shape, values), from
  non-contiguous and big-endian inputs too; memory-mapped loading works (data records aligned)."""
  import torch  # pylint: disable=import-outside-toplevel

  want = _arrays(1)
  inputs = dict(want)
  inputs['T'] = np.arange(12, dtype=np.float32).reshape(3, 4).T  # a non-contiguous view
  inputs['big_endian'] = np.arange(5, dtype='>i8')
  want.update(T=inputs['T'].copy(), big_endian=np.arange(5, dtype=np.int64))
  path = str(tmp_path / 'ae.pt')
  torch_pickle.save(path, inputs)
  for mmap in (False, True):
    back = torch.load(path, weights_only=True, mmap=mmap)
    assert type(back) is dict
    _assert_same({n: _to_numpy(t) for n, t in back.items()}, want)
  _assert_same(torch_pickle.load(path), want)
  # Every record is stored uncompressed and starts on a 64-byte boundary, as torch writes them.
  with zipfile.ZipFile(path) as zf, open(path, 'rb') as f:
    for info in zf.infolist():
      assert info.compress_type == zipfile.ZIP_STORED
      f.seek(info.header_offset)
      name_len, extra_len = struct.unpack('<HH', f.read(30)[26:30])
      assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename
      assert info.filename.startswith('ae/')


@pytest.mark.torch
def test_records_past_4_gib_stay_aligned(tmp_path, monkeypatch):
  """Zip64 headers (records past zipfile.ZIP64_LIMIT, exercised by lowering the limit) carry 20
  bytes more: the padding accounts for them and torch still reads the file."""
  import torch  # pylint: disable=import-outside-toplevel

  monkeypatch.setattr(zipfile, 'ZIP64_LIMIT', 1000)
  want = {'big': np.arange(600, dtype=np.float32), 'small': np.arange(3, dtype=np.int32)}
  path = str(tmp_path / 'ae.pt')
  torch_pickle.save(path, want)
  monkeypatch.undo()
  back = torch.load(path, weights_only=True, mmap=True)
  _assert_same({n: t.numpy() for n, t in back.items()}, want)
  _assert_same(torch_pickle.load(path), want)


def test_round_trip_without_torch(tmp_path):
  want = _arrays(2)
  path = str(tmp_path / 'x.pt')
  torch_pickle.save(path, want)
  _assert_same(torch_pickle.load(path), want)
  with pytest.raises(ConfigError, match=r"tensor 'c' has dtype complex64"):
    torch_pickle.save(path, {'c': np.zeros(2, np.complex64)})


def _checkpoint(path, data_pkl, records=()):
  """A zip laid out as torch.save's: archive/data.pkl and archive/data/<key> records."""
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('archive/data.pkl', data_pkl)
    for key, data in records:
      zf.writestr(f'archive/data/{key}', data)
    zf.writestr('archive/version', b'3\n')
  return str(path)


def _tensor_pkl(size, stride, offset=0, numel=4):
  """data.pkl of {'w': a float32 tensor (size, stride, offset) of storage '0' of `numel`}, written
  opcode by opcode (protocol 2)."""

  def s(text):
    return b'X' + struct.pack('<I', len(text)) + text.encode()

  def tup(xs):
    return b'(' + b''.join(b'J' + struct.pack('<i', x) for x in xs) + b't'

  return (
      b'\x80\x02}' + s('w') + b'ctorch._utils\n_rebuild_tensor_v2\n('
      b'(' + s('storage') + b'ctorch\nFloatStorage\n' + s('0') + s('cpu') + tup([numel])[1:-1]
      + b'tQ' + tup([offset])[1:-1] + tup(size) + tup(stride)
      + b'\x89ccollections\nOrderedDict\n)RtRs.'
  )  # fmt: skip


def test_a_hand_written_checkpoint_reads(tmp_path):
  """The hand-written pickle below is a valid checkpoint (so the refusals after it are real)."""
  data = np.arange(4, dtype=np.float32).tobytes()
  path = _checkpoint(tmp_path / 'ok.pt', _tensor_pkl((2,), (2,), 1), [('0', data)])
  np.testing.assert_array_equal(torch_pickle.load(path)['w'], [1.0, 3.0])


class _Evil:
  """Pickles as a call of os.system: what a hostile checkpoint holds."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


@pytest.mark.parametrize('protocol', [2, 4])
def test_a_malicious_global_is_refused_without_running(tmp_path, protocol):
  import pickle  # pylint: disable=import-outside-toplevel

  marker = tmp_path / 'ran'
  payload = pickle.dumps({'W_enc': _Evil(f'touch {marker}')}, protocol=protocol)
  path = _checkpoint(tmp_path / 'evil.pt', payload)
  with pytest.raises(
      ConfigError, match=rf'{path} refers to the global (posix|os)\.system.*refused'
  ):
    torch_pickle.load(path)
  assert not marker.exists()
  # Any other global too, also where a tensor's pieces would be.
  for module, name in [('builtins', 'eval'), ('torch', 'load'), ('numpy', 'frombuffer')]:
    pkl = b'\x80\x02c' + f'{module}\n{name}\n.'.encode()  # PROTO 2, GLOBAL, STOP
    with pytest.raises(ConfigError, match=rf'the global {module}\.{name}, which a dict of tensors'):
      torch_pickle.load(_checkpoint(tmp_path / 'g.pt', pkl))


def test_views_outside_their_storage_are_refused(tmp_path):
  """A view that would read past its storage (size, stride or offset too large, negative, or a
  record of the wrong length) is a ConfigError, never a read of stray memory."""
  data = np.arange(4, dtype=np.float32).tobytes()
  bad = [
      (_tensor_pkl((5,), (1,)), data, 'reaches element 4 of a storage of 4'),
      (_tensor_pkl((2,), (3,), 1), data, 'reaches element 4'),
      (_tensor_pkl((2,), (-1,), 1), data, r'stride \(-1,\)'),
      (_tensor_pkl((2,), (1,), -1), data, 'offset -1'),
      (_tensor_pkl((2, 2), (2,)), data, r'size \(2, 2\), stride \(2,\)'),
      (_tensor_pkl((4,), (1,)), data[:12], 'holds 12 bytes; expected 4 x 4'),
  ]
  for pkl, record, message in bad:
    path = _checkpoint(tmp_path / 'bad.pt', pkl, [('0', record)])
    with pytest.raises(ConfigError, match=message):
      torch_pickle.load(path)
  path = _checkpoint(tmp_path / 'missing.pt', _tensor_pkl((4,), (1,)))
  with pytest.raises(ConfigError, match=r'lacks record archive/data/0, which data.pkl refers to'):
    torch_pickle.load(path)


def test_truncated_and_corrupt_files_are_named(tmp_path):
  path = str(tmp_path / 'ae.pt')
  torch_pickle.save(path, {'W': np.ones((64, 64), np.float32)})
  data = open(path, 'rb').read()
  for cut in (10, len(data) // 2, len(data) - 30):
    open(path, 'wb').write(data[:cut])
    with pytest.raises(
        ConfigError, match=rf'{path} cannot be read as a torch checkpoint .*truncated or corrupt'
    ):
      torch_pickle.load(path)
  flipped = bytearray(data)
  flipped[len(data) // 2] ^= 1  # inside W's record: its CRC no longer matches
  open(path, 'wb').write(bytes(flipped))
  with pytest.raises(ConfigError, match='truncated or corrupt'):
    torch_pickle.load(path)
  open(path, 'wb').write(b'')
  with pytest.raises(ConfigError, match=f'{path} is empty'):
    torch_pickle.load(path)
  open(path, 'wb').write(b'{"W": [1, 2]}')
  with pytest.raises(ConfigError, match='is not a torch checkpoint'):
    torch_pickle.load(path)
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('weights.npy', b'')
  with pytest.raises(ConfigError, match=r'a zip archive but not a torch checkpoint.*data.pkl'):
    torch_pickle.load(path)


@pytest.mark.torch
def test_legacy_and_non_tensor_checkpoints_are_refused(tmp_path):
  import torch  # pylint: disable=import-outside-toplevel

  path = str(tmp_path / 'old.pt')
  torch.save({'W': torch.ones(2)}, path, _use_new_zipfile_serialization=False)
  with pytest.raises(
      ConfigError, match=r'old.pt is a torch checkpoint in the legacy format .*re-save it with'
  ):
    torch_pickle.load(path)
  for value in ([torch.ones(2)], {'W': torch.ones(2), 'step': 3}, {3: torch.ones(2)}):
    torch.save(value, path)
    with pytest.raises(ConfigError, match='is not a dict of tensors by name'):
      torch_pickle.load(path)
