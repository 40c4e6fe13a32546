"""Chat-completion clients for the explainer and scorer LLMs (standard library only).

`OpenAIChat` speaks the OpenAI chat-completions protocol, which OpenAI, vLLM, llama.cpp and most
hosted providers serve, so one small client covers them all without a new dependency. The local
transformers model lives in `jaxsae.bridge.local_llm` (the bridge is the only place torch may be
imported). The API key is read from the environment variable *named* in the config at each request
and is never stored on the client, logged, or put into an error message.

Redirects are never followed. A chat-completions POST that gets a 3xx would be resent as a GET
(urllib's rule for 301-303), so it could not succeed even on the same server, and following one to
another origin would hand that host the `Authorization` header and accept its answer. Any 3xx is
therefore an `LLMConfigError` naming both URLs (the key went only to the configured one). A
plain-http base URL to a host other than loopback gets one warning: the key travels unencrypted.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Protocol

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 409, 429})  # plus every 5xx
CONFIG_STATUSES = frozenset({401, 403, 404})  # wrong key, URL or model: no request can succeed
_WARNED: set[str] = set()  # plain-http URLs already warned about (once per process)
_WARNED_LOCK = threading.Lock()
_PORTS = {'http': 80, 'https': 443}


class LLMError(RuntimeError):
  """A request that failed for good: retries exhausted, or a status that retrying cannot fix."""

  def __init__(self, message: str, status: int | None = None):
    super().__init__(message)
    self.status = status


class LLMConfigError(LLMError):
  """The server refused the key, URL or model (401/403/404): every request would fail alike."""


class ChatModel(Protocol):
  """What the explain/score stages need from an LLM; `name` is recorded with each result."""

  name: str

  def complete(self, messages: list[dict], *, max_tokens: int, temperature: float) -> str:
    ...


def _retry_after(value: str | None) -> float | None:
  """Seconds from a Retry-After header (the HTTP-date form is ignored: backoff applies)."""
  if not value:
    return None
  try:
    seconds = float(value)
  except ValueError:
    return None
  return max(seconds, 0.0)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
  """Hands every 3xx back as an HTTPError instead of following it (see the module docstring)."""

  def redirect_request(self, req, fp, code, msg, headers, newurl):
    return None


_OPENER = urllib.request.build_opener(_NoRedirect)  # shared: it holds no per-request state


def origin(url: str) -> tuple[str, str, int | None]:
  """(scheme, host, port) with the scheme's default port filled in: what "same origin" compares."""
  p = urllib.parse.urlsplit(url)
  try:
    port = p.port
  except ValueError:  # a malformed port (in a server's Location, say): no origin matches it
    return p.scheme.lower(), p.netloc.lower(), -1
  return p.scheme.lower(), (p.hostname or '').lower(), port or _PORTS.get(p.scheme.lower())


def is_loopback(host: str) -> bool:
  """localhost or a loopback address (no DNS lookup)."""
  if host == 'localhost' or host.endswith('.localhost'):
    return True
  try:
    return ipaddress.ip_address(host.strip('[]')).is_loopback
  except ValueError:
    return False


def _warn_plain_http(url: str, api_key_env: str) -> None:
  scheme, host, _ = origin(url)
  if scheme != 'http' or is_loopback(host):
    return
  with _WARNED_LOCK:
    if url in _WARNED:
      return
    _WARNED.add(url)
  log.warning(
      'interpret.llm.base_url %s is plain http to %s, not loopback: the API key in $%s and the '
      'prompts travel unencrypted. Use https, or an SSH tunnel to localhost.',
      url,
      host,
      api_key_env,
  )


def _server_message(body: bytes) -> str:
  """The error text a server sent: OpenAI's {"error": {"message"}} when present, else the body."""
  text = body.decode('utf-8', 'replace').strip()
  try:
    data = json.loads(text)
  except ValueError:
    return text[:500]
  if isinstance(data, dict):
    err = data.get('error', data)
    if isinstance(err, dict) and err.get('message'):
      return str(err['message'])[:500]
    if isinstance(err, str):
      return err[:500]
  return text[:500]


class OpenAIChat:
  """An OpenAI-protocol chat-completions client with retries; safe to share between threads.

  It holds no mutable state besides its settings, and each request opens its own connection.
  """

  def __init__(
      self,
      base_url: str,
      model: str,
      api_key_env: str = 'OPENAI_API_KEY',
      timeout_s: float = 60.0,
      max_retries: int = 5,
      backoff_s: float = 1.0,
      max_backoff_s: float = 60.0,
  ):
    if not isinstance(base_url, str) or not base_url.startswith(('http://', 'https://')):
      raise ValueError(
          f'interpret.llm.base_url={base_url!r} must be an http(s) URL such as '
          "'https://api.openai.com/v1' or 'http://localhost:8000/v1'."
      )
    if not model:
      raise ValueError(
          'interpret.llm.model is empty; set it to the served model name '
          "(e.g. 'gpt-4o-mini', or the name a vLLM server was started with)."
      )
    if timeout_s <= 0 or max_retries < 0 or backoff_s < 0 or max_backoff_s < 0:
      raise ValueError(
          f'need timeout_s > 0 and max_retries, backoff_s, max_backoff_s >= 0; got '
          f'timeout_s={timeout_s}, max_retries={max_retries}, backoff_s={backoff_s}, '
          f'max_backoff_s={max_backoff_s}.'
      )
    base = base_url.rstrip('/')
    self.url = base if base.endswith('/chat/completions') else base + '/chat/completions'
    self.model = model
    self.api_key_env = api_key_env
    self.timeout_s = float(timeout_s)
    self.max_retries = int(max_retries)
    self.backoff_s = float(backoff_s)
    self.max_backoff_s = float(max_backoff_s)
    self.name = f'openai:{model}'
    _warn_plain_http(self.url, api_key_env)

  def __repr__(self) -> str:
    return f'OpenAIChat(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})'

  def _key(self) -> str | None:
    return (os.environ.get(self.api_key_env) or None) if self.api_key_env else None

  def _delay(self, attempt: int, retry_after: float | None) -> float:
    """Exponential backoff with jitter, or the server's Retry-After; both capped."""
    if retry_after is not None:
      return min(retry_after, self.max_backoff_s)
    return min(self.backoff_s * 2**attempt, self.max_backoff_s) * (0.5 + 0.5 * random.random())

  def _redact(self, text: str, key: str | None) -> str:
    return text.replace(key, '<redacted>') if key else text

  def complete(self, messages: list[dict], *, max_tokens: int, temperature: float) -> str:
    """The assistant's reply text ('' when the server returned no content)."""
    key = self._key()
    headers = {
        'Content-Type': 'application/json',
        'Accept': 'application/json',
        'User-Agent': 'jaxsae',
    }
    if key:
      headers['Authorization'] = f'Bearer {key}'
    body = json.dumps(
        {
            'model': self.model,
            'messages': messages,
            'max_tokens': int(max_tokens),
            'temperature': float(temperature),
        }
    ).encode()
    attempts = self.max_retries + 1
    last = 'no attempt'
    for attempt in range(attempts):
      retry_after = None
      request = urllib.request.Request(self.url, data=body, headers=headers, method='POST')
      try:
        with _OPENER.open(request, timeout=self.timeout_s) as response:
          raw = response.read()
        return self._content(raw, key)
      except urllib.error.HTTPError as e:
        status = e.code
        if 300 <= status < 400:
          raise self._redirected(status, e.headers, key) from None
        try:
          detail = self._redact(_server_message(e.read()), key)
        except (OSError, http.client.HTTPException):
          detail = ''
        if not (status in RETRY_STATUSES or status >= 500):
          cls = LLMConfigError if status in CONFIG_STATUSES else LLMError
          raise cls(
              f'{self.url} answered HTTP {status}: {detail or e.reason}. Check '
              f'interpret.llm.base_url, interpret.llm.model ({self.model!r}) and the API key in '
              f'${self.api_key_env} ({"set" if key else "unset"}).',
              status,
          ) from None
        retry_after = _retry_after(e.headers.get('Retry-After') if e.headers else None)
        last = f'HTTP {status}' + (f': {detail}' if detail else '')
      except (OSError, http.client.HTTPException) as e:  # URLError, time-outs, resets, TLS
        reason = getattr(e, 'reason', e)
        if isinstance(reason, TimeoutError) or isinstance(e, TimeoutError):
          last = f'timed out after {self.timeout_s:g}s'
        else:
          last = f'{type(reason).__name__}: {reason}'
        last = self._redact(last, key)
      if attempt + 1 < attempts:
        delay = self._delay(attempt, retry_after)
        log.warning(
            '%s: %s; retry %d/%d in %.2fs', self.url, last, attempt + 1, self.max_retries, delay
        )
        time.sleep(delay)
    raise LLMError(
        f'{self.url}: no answer after {attempts} attempt(s); last: {last}. Is the '
        'server up and the model served? Raise interpret.llm.max_retries or '
        'interpret.llm.timeout_s, or lower interpret.llm.concurrency if rate-limited.',
        None,
    )

  def _redirected(self, status: int, headers, key: str | None) -> LLMConfigError:
    """The error for a 3xx: never followed, with the key or without it."""
    location = headers.get('Location') if headers else None
    if not location:
      return LLMConfigError(
          f'{self.url} answered HTTP {status} (a redirect) without a Location; '
          'redirects are not followed. Check interpret.llm.base_url.',
          status,
      )
    target = self._redact(urllib.parse.urljoin(self.url, location), key)
    if origin(target) != origin(self.url):
      why = (
          'to another origin (scheme, host or port differ); it was not followed and the API '
          f'key in ${self.api_key_env} was not sent there'
      )
    else:
      why = 'on the same server; it was not followed (a POST redirected would arrive as a GET)'
    return LLMConfigError(
        f'{self.url} answered HTTP {status}, redirecting to {target} {why}. If you trust '
        f'{target}, set interpret.llm.base_url to it.',
        status,
    )

  def _content(self, raw: bytes, key: str | None) -> str:
    try:
      data = json.loads(raw)
      if isinstance(data, dict) and 'error' in data and 'choices' not in data:
        raise LLMError(
            f'{self.url} returned an error: ' f'{self._redact(_server_message(raw), key)}'
        )
      content = data['choices'][0]['message'].get('content')
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
      raise LLMError(
          f'{self.url} sent a reply without choices[0].message.content: '
          f'{self._redact(raw[:300].decode("utf-8", "replace"), key)!r}. Is '
          'interpret.llm.base_url an OpenAI-compatible /v1 endpoint?'
      ) from None
    return content if isinstance(content, str) else ''
