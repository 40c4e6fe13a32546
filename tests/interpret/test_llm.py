"""The OpenAI-protocol client against a loopback server: retries, errors, the key, concurrency."""

import concurrent.futures as cf
import logging
import socket
import time
import traceback

import pytest

from jaxsae.interpret import llm
from openai_server import FakeOpenAI

KEY_ENV = 'JAXSAE_TEST_LLM_KEY'
SECRET = 'sk-test-SECRET-0123456789'
MESSAGES = [
    {'role': 'system', 'content': 'Be brief.'},
    {
        'role': 'user',
        'content': 'Examples where the feature activates:\n\n' 'Example 1: a <<cat>> sat',
    },
]


def client(server, **kw):
  args = dict(
      model='test-model',
      api_key_env=KEY_ENV,
      timeout_s=5.0,
      max_retries=3,
      backoff_s=0.001,
      max_backoff_s=1.0,
  )
  return llm.OpenAIChat(server.url, **{**args, **kw})


def ask(chat):
  return chat.complete(MESSAGES, max_tokens=32, temperature=0.0)


@pytest.fixture(autouse=True)
def no_key(monkeypatch):
  monkeypatch.delenv(KEY_ENV, raising=False)


@pytest.fixture
def server():
  with FakeOpenAI() as s:
    yield s


def test_success_sends_the_openai_request_and_no_auth_without_key(server):
  chat = client(server)
  assert chat.name == 'openai:test-model'
  assert ask(chat) == 'Explanation: the word cat.'
  (req,) = server.requests
  assert req['path'] == '/v1/chat/completions'
  assert req['body'] == {
      'model': 'test-model',
      'messages': MESSAGES,
      'max_tokens': 32,
      'temperature': 0.0,
  }
  assert 'Authorization' not in req['headers']


def test_base_url_may_name_the_endpoint_itself(server):
  chat = llm.OpenAIChat(server.url + '/chat/completions/', 'test-model', api_key_env=KEY_ENV)
  assert ask(chat) == 'Explanation: the word cat.'


def test_429_honours_retry_after_then_succeeds(server):
  server.fail(429, n=2, retry_after='0.25')
  t = time.monotonic()
  assert ask(client(server)) == 'Explanation: the word cat.'
  assert time.monotonic() - t >= 0.5  # two waits of Retry-After, not the 1 ms backoff
  assert len(server.requests) == 3


def test_retry_after_is_capped_by_max_backoff(server):
  server.fail(429, n=1, retry_after='30')
  t = time.monotonic()
  assert ask(client(server, max_backoff_s=0.05)) == 'Explanation: the word cat.'
  assert time.monotonic() - t < 3


def test_500s_are_retried_with_backoff(server):
  server.fail(500, n=2)
  server.fail(503, n=1)
  t = time.monotonic()
  assert ask(client(server, backoff_s=0.05)) == 'Explanation: the word cat.'
  assert len(server.requests) == 4
  assert time.monotonic() - t >= 0.5 * (0.05 + 0.1 + 0.2)  # jitter keeps at least half


def test_time_out_is_retried(server):
  server.slow(1.5)
  t = time.monotonic()
  assert ask(client(server, timeout_s=0.3)) == 'Explanation: the word cat.'
  assert len(server.requests) == 2
  assert 0.3 <= time.monotonic() - t < 1.5


def test_400_fails_at_once_with_the_server_message(server):
  server.fail(400, message='max_tokens is too large for this model')
  with pytest.raises(llm.LLMError) as e:
    ask(client(server))
  msg = str(e.value)
  assert len(server.requests) == 1
  assert e.value.status == 400 and not isinstance(e.value, llm.LLMConfigError)
  for part in (
      'HTTP 400',
      'max_tokens is too large',
      server.url,
      'interpret.llm.model',
      'test-model',
      KEY_ENV,
      'unset',
  ):
    assert part in msg, (part, msg)


def test_401_is_a_config_error(server):
  server.fail(401, message='invalid api key')
  with pytest.raises(llm.LLMConfigError, match='HTTP 401: invalid api key'):
    ask(client(server))


def test_retries_exhausted_names_url_attempts_and_last_status(server):
  server.fail(503, n=10, message='overloaded')
  with pytest.raises(llm.LLMError) as e:
    ask(client(server, max_retries=2))
  assert len(server.requests) == 3
  msg = str(e.value)
  assert server.url in msg and '3 attempt(s)' in msg and 'HTTP 503: overloaded' in msg


def test_connection_refused_is_retried_then_reported():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]  # closed once the block ends: nothing listens there
  chat = llm.OpenAIChat(
      f'http://127.0.0.1:{port}/v1', 'm', api_key_env=KEY_ENV, max_retries=1, backoff_s=0.001
  )
  with pytest.raises(llm.LLMError, match=rf'127.0.0.1:{port}.*2 attempt\(s\).*Refused'):
    ask(chat)


def test_api_key_is_sent_as_bearer_and_never_leaks(server, monkeypatch, caplog):
  monkeypatch.setenv(KEY_ENV, SECRET)
  chat = client(server, max_retries=2)
  assert ask(chat)
  assert server.requests[0]['headers']['Authorization'] == f'Bearer {SECRET}'
  assert SECRET not in repr(chat) and SECRET not in str(vars(chat))
  caplog.set_level(logging.DEBUG)
  server.fail(401, echo_auth=True)  # a server that repeats the header in its error
  with pytest.raises(llm.LLMError) as e401:
    ask(chat)
  server.fail(500, n=3, echo_auth=True)
  with pytest.raises(llm.LLMError) as e500:
    ask(chat)
  for e in (e401, e500):
    text = ''.join(traceback.format_exception(e.value))
    assert 'you sent Authorization: Bearer <redacted>' in str(e.value)
    assert SECRET not in text
  assert 'HTTP 500' in caplog.text and SECRET not in caplog.text
  assert 'set)' in str(e401.value)  # says the key variable is set, not what it holds


def test_concurrent_calls_share_one_client(server):
  server.delay_s = 0.1
  chat = client(server)
  with cf.ThreadPoolExecutor(3) as pool:
    answers = list(pool.map(lambda _: ask(chat), range(9)))
  assert answers == ['Explanation: the word cat.'] * 9
  assert 2 <= server.max_concurrent <= 3


def test_malformed_reply_is_a_clear_error(server):
  server.responder = lambda messages: {'object': 'list', 'data': []}
  with pytest.raises(llm.LLMError, match='without choices'):
    ask(client(server))


@pytest.mark.parametrize(
    'kw, match',
    [
        (dict(base_url='localhost:8000/v1'), 'base_url'),
        (dict(model=''), 'interpret.llm.model'),
        (dict(timeout_s=0), 'timeout_s'),
    ],
)
def test_bad_settings_name_the_key(kw, match):
  args = {'base_url': 'http://localhost:8000/v1', 'model': 'm', **kw}
  with pytest.raises(ValueError, match=match):
    llm.OpenAIChat(**args)


@pytest.mark.parametrize('status', [301, 302, 303, 307, 308])
def test_cross_origin_redirect_is_refused_and_gets_no_key(server, monkeypatch, status):
  """A redirect to another port is another origin: no request (so no key) reaches it, and the
  error names both URLs."""
  monkeypatch.setenv(KEY_ENV, SECRET)
  with FakeOpenAI() as other:
    target = other.url + '/chat/completions'
    server.redirect(target, status=status)
    with pytest.raises(llm.LLMConfigError) as e:
      ask(client(server))
    assert not other.requests and not other.gets
  msg = str(e.value)
  assert len(server.requests) == 1 and e.value.status == status
  assert server.url in msg and target in msg and 'another origin' in msg
  assert f'${KEY_ENV} was not sent there' in msg and SECRET not in msg


def test_same_origin_redirect_is_refused_too(server):
  """A POST redirected would arrive as a GET: no redirect can work, so none is followed."""
  server.redirect('/v2/chat/completions', status=302)
  with pytest.raises(llm.LLMConfigError, match='same server') as e:
    ask(client(server))
  assert server.url.replace('/v1', '/v2/chat/completions') in str(e.value)
  assert len(server.requests) == 1 and not server.gets


def test_plain_http_beyond_loopback_warns_once(caplog):
  caplog.set_level(logging.WARNING, logger='jaxsae.interpret.llm')
  for url in ('http://localhost:8000/v1', 'http://127.0.0.2:8000/v1', 'http://[::1]:8/v1'):
    llm.OpenAIChat(url, 'm', api_key_env=KEY_ENV)
  llm.OpenAIChat('https://llm.example.org/v1', 'm', api_key_env=KEY_ENV)
  assert not caplog.records  # loopback and https are quiet
  for _ in range(3):
    llm.OpenAIChat('http://llm-test-plain.example.org:8000/v1', 'm', api_key_env=KEY_ENV)
  (record,) = caplog.records
  assert 'plain http' in record.message and 'llm-test-plain.example.org' in record.message
  assert f'${KEY_ENV}' in record.message and 'https' in record.message


def test_redirect_to_a_malformed_url_is_refused_cleanly(server):
  server.redirect('http://127.0.0.1:notaport/v1/chat/completions', status=307)
  with pytest.raises(llm.LLMConfigError, match='another origin.*notaport'):
    ask(client(server))
  server.redirect('', status=302)
  with pytest.raises(llm.LLMConfigError, match='without a Location'):
    ask(client(server))
