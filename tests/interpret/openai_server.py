"""A loopback OpenAI-protocol server for the tests: deterministic answers, injectable failures.

Explainer requests (the user turn lists "Examples where the feature activates") are answered
"Explanation: the word W." with W the most frequent <<marked>> span; scorer requests ("Explanation:
..." then "Example i: ...") get a JSON list with 1 for the examples containing W, so a perfect
scorer's balanced accuracy is known exactly. Other scorer behaviours and permanent failures come
from `make_responder`; transient ones (429 with Retry-After, 5xx, a reply slower than the client's
time-out) from `fail` / `slow`; redirects (302 to another server, say) from `redirect`. The server
records every POST (path, headers, body) in `requests`, any GET (what a followed redirect of a POST
arrives as) in `gets`, and the largest number of requests it was serving at once.
"""

from __future__ import annotations

import collections
import http.server
import json
import re
import threading
import time
from typing import Callable

Responder = Callable[[list[dict]], 'str | int | dict']


def _word(messages: list[dict]) -> str | None:
  """The explained word in a scorer prompt."""
  m = re.search(r'^Explanation: the word (\w+)', messages[-1]['content'], re.M)
  return m.group(1) if m else None


def make_responder(
    scorer: str = 'perfect', fail_word: str | None = None, also_positive: str | None = None
) -> Responder:
  """Answers for explain.run's prompts.

  scorer: 'perfect' (1 iff the example contains the explained word, or `also_positive`),
  'all1', 'garbage' (no list), 'short' (one answer too few).
  fail_word: requests mentioning it always get HTTP 500 (a permanently failing feature).
  """

  def respond(messages):
    text = '\n'.join(m['content'] for m in messages)
    if fail_word and fail_word in text:
      return 500
    user = messages[-1]['content']
    if 'Examples where the feature activates' in user:
      spans = re.findall(r'<<(.+?)>>', user)
      if not spans:
        return ''
      word = collections.Counter(s.lower() for s in spans).most_common(1)[0][0]
      return f'Explanation: the word {word}.'
    examples = re.findall(r'^Example \d+: (.*)$', user, re.M)
    if scorer == 'garbage':
      return 'I cannot tell which of these activate.'
    if scorer == 'all1':
      return json.dumps([1] * len(examples))
    positive = {_word(messages), also_positive} - {None}
    bits = [int(bool(positive & set(ex.lower().split()))) for ex in examples]
    if scorer == 'short':
      bits = bits[:-1]
    return json.dumps(bits)

  return respond


class FakeOpenAI:
  """Start with `with FakeOpenAI() as server:`; `server.url` is the client's base_url."""

  def __init__(self, responder: Responder | None = None, delay_s: float = 0.0):
    self.responder = responder or make_responder()
    self.delay_s = delay_s
    self.requests: list[dict] = []
    self.gets: list[dict] = []
    self.max_concurrent = 0
    self._active = 0
    self._lock = threading.Lock()
    self._faults: collections.deque = collections.deque()
    self._httpd: http.server.ThreadingHTTPServer | None = None

  # -- fault injection -----------------------------------------------------------------------------

  def fail(
      self,
      status: int,
      n: int = 1,
      retry_after: str | None = None,
      message: str = 'injected failure',
      echo_auth: bool = False,
  ) -> None:
    """The next `n` requests get `status` (echo_auth: the error text repeats the Authorization
    header, like a careless server, to test that clients redact the key)."""
    with self._lock:
      self._faults.extend([('status', status, retry_after, message, echo_auth)] * n)

  def redirect(self, location: str, status: int = 302, n: int = 1) -> None:
    """The next `n` requests are answered `status` with `Location: location` (any URL, e.g.
    another FakeOpenAI's, to test that the client neither follows it nor sends its key there)."""
    with self._lock:
      self._faults.extend([('redirect', status, location)] * n)

  def slow(self, seconds: float, n: int = 1) -> None:
    """The next `n` requests are answered only after `seconds` (past the client's time-out)."""
    with self._lock:
      self._faults.extend([('slow', seconds)] * n)

  # -- lifecycle -----------------------------------------------------------------------------------

  @property
  def url(self) -> str:
    return f'http://127.0.0.1:{self._httpd.server_address[1]}/v1'

  def start(self) -> 'FakeOpenAI':
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = 'HTTP/1.1'

      def log_message(self, *args):  # keep test output quiet
        pass

      def do_POST(self):  # pylint: disable=invalid-name
        body = json.loads(self.rfile.read(int(self.headers.get('Content-Length', 0))) or b'{}')
        with server._lock:
          server.requests.append({'path': self.path, 'headers': dict(self.headers), 'body': body})
          server._active += 1
          server.max_concurrent = max(server.max_concurrent, server._active)
          fault = server._faults.popleft() if server._faults else None
        self._left = False
        try:
          self._answer(body, fault)
        except (BrokenPipeError, ConnectionResetError):
          pass  # the client gave up (time-out test)
        finally:
          self._leave()

      def do_GET(self):  # pylint: disable=invalid-name
        with server._lock:
          server.gets.append({'path': self.path, 'headers': dict(self.headers)})
        self._left = True  # never counted as active
        self._send(405, {'error': {'message': 'chat completions take POST'}})

      def _leave(self):
        """No longer serving this request: called before the reply goes out, since the client
        may send its next request as soon as it has read the reply."""
        if not self._left:
          self._left = True
          with server._lock:
            server._active -= 1

      def _answer(self, body, fault):
        if fault and fault[0] == 'slow':
          time.sleep(fault[1])
        elif fault and fault[0] == 'redirect':
          self._send(fault[1], {'error': {'message': 'moved'}}, {'Location': fault[2]})
          return
        elif fault:
          _, status, retry_after, message, echo = fault
          if echo:
            message += f' (you sent Authorization: {self.headers.get("Authorization")})'
          self._send(
              status,
              {'error': {'message': message}},
              {'Retry-After': retry_after} if retry_after is not None else {},
          )
          return
        if self.path != '/v1/chat/completions':
          self._send(404, {'error': {'message': f'no route {self.path}'}})
          return
        time.sleep(server.delay_s)
        answer = server.responder(body['messages'])
        if isinstance(answer, int):
          self._send(answer, {'error': {'message': f'responder failed with {answer}'}})
        elif isinstance(answer, dict):
          self._send(200, answer)
        else:
          self._send(
              200,
              {
                  'choices': [
                      {
                          'index': 0,
                          'finish_reason': 'stop',
                          'message': {'role': 'assistant', 'content': answer},
                      }
                  ]
              },
          )

      def _send(self, status, payload, headers=None):
        data = json.dumps(payload).encode()
        self._leave()
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(data)))
        for k, v in (headers or {}).items():
          self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    self._httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self._httpd.daemon_threads = True
    self._httpd.block_on_close = False
    threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True).start()
    return self

  def close(self) -> None:
    if self._httpd is not None:
      self._httpd.shutdown()
      self._httpd.server_close()

  def __enter__(self) -> 'FakeOpenAI':
    return self.start()

  def __exit__(self, *exc) -> None:
    self.close()

  def bodies(self, kind: str) -> list[dict]:
    """Bodies of 'explain' or 'score' requests seen so far."""
    key = 'Examples where the feature activates'
    with self._lock:
      return [
          r['body']
          for r in self.requests
          if (key in r['body']['messages'][-1]['content']) == (kind == 'explain')
      ]
