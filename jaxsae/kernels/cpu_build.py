"""Compiling and loading the native CPU kernels (`csrc/cpu_kernels.cc`, used by `kernels.cpu`).

The C++ is compiled on first use with the machine's C++ compiler (`CXX`, else c++/g++) into a
cache keyed by the source, jaxlib, compiler and CPU (`JAXSAE_KERNEL_CACHE`, default
~/.cache/jaxsae); `tools/install.sh` builds it ahead. `available()` says whether it built, and
`kernels.resolve('auto')` takes the 'xla' path when it did not.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jaxlib

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'csrc', 'cpu_kernels.cc')
FLAGS = (
    '-O3',
    '-march=native',
    '-std=c++17',
    '-shared',
    '-fPIC',
    '-fopenmp-simd',
    '-fno-math-errno',
)
_TARGETS = {
    'jaxsae_select': 'JaxsaeSelect',
    'jaxsae_aux_select': 'JaxsaeAuxSelect',
    'jaxsae_l2_grads': 'JaxsaeL2Grads',
    'jaxsae_decode_groups': 'JaxsaeDecodeGroups',
    'jaxsae_project_rows': 'JaxsaeProjectRows',
    'jaxsae_adam': 'JaxsaeAdam',
}


class KernelBuildError(RuntimeError):
  """The native kernels could not be compiled or loaded; the message says why and what to do."""


def _compiler() -> str:
  for name in (os.environ.get('CXX'), 'c++', 'g++', 'clang++'):
    if name and shutil.which(name):
      return shutil.which(name)
  raise KernelBuildError(
      "sae.kernel='cpu' needs a C++17 compiler (set CXX, or install g++: "
      "'apt-get install g++'); sae.kernel='xla' runs without one."
  )


def _cpu_flags() -> str:
  """-march=native builds for this CPU: its feature flags belong in the cache key."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith(('flags', 'Features')):
          return line
  except OSError:
    pass
  return platform.processor()


def cache_dir() -> str:
  root = os.environ.get('JAXSAE_KERNEL_CACHE') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'jaxsae'
  )
  return os.path.join(root, 'kernels')


def library_path() -> str:
  """Where the shared library for this source, jaxlib, compiler and CPU lives (built or not)."""
  with open(SOURCE, 'rb') as f:
    key = hashlib.sha256(f.read())
  compiler = _compiler()
  key.update(
      '\0'.join(
          (jaxlib.__version__, compiler, ' '.join(FLAGS), platform.machine(), _cpu_flags())
      ).encode()
  )
  return os.path.join(cache_dir(), f'cpu_kernels-{key.hexdigest()[:16]}.so')


def build() -> str:
  """Compile the kernels if this machine has no current build; returns the library's path.

  Written to a temporary file and renamed into place, so concurrent processes never load a
  half-written library."""
  path = library_path()
  if os.path.exists(path):
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=os.path.dirname(path))
  os.close(fd)
  cmd = [_compiler(), *FLAGS, '-I', jax.ffi.include_dir(), SOURCE, '-o', tmp]
  try:
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
      # The FFI headers warn at length even in a good build: lead with the errors.
      errors = [line for line in r.stderr.splitlines() if 'error' in line][:20]
      raise KernelBuildError(
          f'compiling {SOURCE} failed ({" ".join(cmd)}):\n'
          + '\n'.join(errors or r.stderr.splitlines()[-40:])
      )
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


@functools.cache
def register() -> None:
  lib = ctypes.cdll.LoadLibrary(build())
  for target, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform='cpu')


@functools.cache
def available() -> bool:
  """Whether the native kernels are built and registered here (building them if needed; a
  failure is logged once, not retried on every call)."""
  try:
    register()
    return True
  except (KernelBuildError, OSError) as e:
    logging.warning('native CPU kernels unavailable (%s)', str(e).splitlines()[0])
    return False
