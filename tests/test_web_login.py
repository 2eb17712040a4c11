"""Hardening of the web login, through FastAPI's TestClient over a real database: failed logins
are throttled per client address and server-wide (429 with Retry-After, the token not even
compared), on an injected monotonic clock so no test sleeps; `cai web` refuses a short
CAI_WEB_TOKEN with exit 2; cookies carry Secure whenever the browser came over HTTPS, directly or
through a proxy that says so in X-Forwarded-Proto."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cai.errors import BadInput
from cai.web.app import create_app
from cai.web.security import Guard, LoginThrottle, client_key
from tests.conftest import Cli
from tests.test_web import TOKEN, csrf_of, problems


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def compared(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every token the server compares against the real one, in order."""
    seen: list[str] = []
    original = Guard.token_matches

    def spy(self: Guard, given: str) -> bool:
        seen.append(given)
        return original(self, given)

    monkeypatch.setattr(Guard, "token_matches", spy)
    return seen


def make_app(db_url: str, clock: Clock, per_client: int = 5, overall: int = 100) -> FastAPI:
    return create_app(db_url, TOKEN, LoginThrottle(per_client, overall, window=60, clock=clock))


@pytest.fixture
def browsers(db_url: str) -> Iterator[Any]:
    """Opens TestClients from given addresses onto an app; closes them all afterwards."""
    opened: list[TestClient] = []

    def open_browser(app: FastAPI, host: str = "198.51.100.7", **kwargs: Any) -> TestClient:
        browser = TestClient(app, client=(host, 50000), **kwargs)
        browser.__enter__()
        opened.append(browser)
        return browser

    yield open_browser
    for browser in opened:
        browser.__exit__(None, None, None)


def attempt(browser: TestClient, token: str, **kwargs: Any) -> Any:  # the client's response
    browser.cookies.clear()  # a fresh form each time, as a guessing script would fetch
    csrf = csrf_of(browser.get("/login").text)
    return browser.post("/login", data={"token": token, "csrf": csrf}, follow_redirects=False, **kwargs)


# --- throttling --------------------------------------------------------------------------------


def test_one_client_guessing_is_throttled_until_the_window_passes(
    db_url: str, clock: Clock, compared: list[str], browsers: Any
) -> None:
    app = make_app(db_url, clock)
    guesser = browsers(app, "198.51.100.7")
    codes = [attempt(guesser, f"guess-number-{i:04d}-of-forty").status_code for i in range(40)]
    assert codes == [403] * 5 + [429] * 35
    assert len(compared) == 5  # a throttled attempt never reaches the comparison

    clock.now += 30
    refused = attempt(guesser, TOKEN)  # even the right token, while locked out
    assert refused.status_code == 429 and refused.headers["retry-after"] == "30"
    assert "Too many failed logins from your address" in problems(refused.text)
    assert "30 seconds" in problems(refused.text) and "cai_auth" not in refused.cookies
    assert len(compared) == 5

    # Another address is not held back by this one's lockout.
    other = browsers(app, "203.0.113.9")
    assert attempt(other, "another-wrong-guess-here").status_code == 403
    assert attempt(other, TOKEN).status_code == 303

    clock.now += 29
    assert attempt(guesser, TOKEN).headers["retry-after"] == "1"
    clock.now += 1  # the first failures leave the window
    done = attempt(guesser, TOKEN)
    assert done.status_code == 303 and "cai_auth" in done.cookies
    assert "can write" in guesser.get("/").text


def test_the_retry_after_follows_the_sliding_window(db_url: str, clock: Clock, browsers: Any) -> None:
    guesser = browsers(make_app(db_url, clock, per_client=3))
    for _ in range(3):
        assert attempt(guesser, "wrong-token-wrong-token").status_code == 403
        clock.now += 10
    # Failures at t=0, 10, 20 and now t=30: the oldest leaves the window at t=60.
    assert attempt(guesser, "wrong-token-wrong-token").headers["retry-after"] == "30"
    clock.now += 30
    assert attempt(guesser, "wrong-token-wrong-token").status_code == 403  # one slot free again
    assert attempt(guesser, "wrong-token-wrong-token").headers["retry-after"] == "10"


def test_the_global_cap_bounds_guesses_from_many_addresses(
    db_url: str, clock: Clock, compared: list[str], browsers: Any
) -> None:
    app = make_app(db_url, clock, per_client=3, overall=10)
    codes = []
    for n in range(1, 6):  # five addresses, each staying under its own limit of 3
        guesser = browsers(app, f"192.0.2.{n}")
        codes += [attempt(guesser, f"distributed-guess-{n}-{i}").status_code for i in range(3)]
        clock.now += 1
    assert codes == [403] * 10 + [429] * 5
    assert len(compared) == 10

    fresh = browsers(app, "192.0.2.200")
    refused = attempt(fresh, TOKEN)
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "55"  # the first failure was at t=0, now is t=5
    assert "from all addresses" in problems(refused.text)
    assert len(compared) == 10
    clock.now += 55
    assert attempt(fresh, TOKEN).status_code == 303


def test_successful_logins_are_not_throttled(
    db_url: str, clock: Clock, compared: list[str], browsers: Any
) -> None:
    user = browsers(make_app(db_url, clock, per_client=3, overall=4))
    assert [attempt(user, TOKEN).status_code for _ in range(20)] == [303] * 20
    # A success forgets this address's failures: typos between logins never add up to a lockout...
    for _ in range(3):
        assert attempt(user, "a-typo-in-the-token-x").status_code == 403
        assert attempt(user, TOKEN).status_code == 303
    # ...but the server-wide count keeps them (and successes never used it up).
    assert attempt(user, "a-typo-in-the-token-x").status_code == 403
    refused = attempt(user, TOKEN)
    assert refused.status_code == 429 and "from all addresses" in problems(refused.text)
    assert len(compared) == 27


def test_a_forwarded_for_header_does_not_pick_the_bucket(db_url: str, clock: Clock, browsers: Any) -> None:
    guesser = browsers(make_app(db_url, clock, per_client=3))
    codes = [
        attempt(guesser, "wrong-token-wrong-token", headers={"X-Forwarded-For": f"10.9.8.{i}"}).status_code
        for i in range(6)
    ]
    assert codes == [403] * 3 + [429] * 3


def test_ipv6_clients_share_their_slash_64(db_url: str, clock: Clock, browsers: Any) -> None:
    app = make_app(db_url, clock, per_client=3)
    for n in range(3):
        assert (
            attempt(browsers(app, f"2001:db8:1:2::{n + 1:x}"), "wrong-token-wrong-token").status_code == 403
        )
    assert attempt(browsers(app, "2001:db8:1:2:ffff::9"), TOKEN).status_code == 429
    assert attempt(browsers(app, "2001:db8:1:3::1"), TOKEN).status_code == 303  # the next /64
    assert client_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert client_key("2001:db8:1:2:abcd::1") == "2001:db8:1:2::/64"
    assert client_key("testclient") == "testclient" and client_key(None) == "unknown"


# --- the write token ---------------------------------------------------------------------------


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[FastAPI]:
    """Apps `cai web` would have served: uvicorn.run records instead of listening."""
    import uvicorn

    apps: list[FastAPI] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: apps.append(app))
    return apps


@pytest.mark.parametrize("token", ["x", "fifteen-chars-x"])
def test_cai_web_refuses_a_short_token(
    cli: Cli, served: list[FastAPI], monkeypatch: pytest.MonkeyPatch, token: str
) -> None:
    monkeypatch.setenv("CAI_WEB_TOKEN", token)
    result: Any = cli("web", expect=2)
    assert f"CAI_WEB_TOKEN is {len(token)} character" in result.stderr
    assert "at least 16" in result.stderr
    assert served == []  # nothing listened


@pytest.mark.parametrize("token", ["sixteen-chars-xx", ""])
def test_cai_web_serves_a_long_enough_token_or_none(
    cli: Cli, served: list[FastAPI], monkeypatch: pytest.MonkeyPatch, token: str
) -> None:
    monkeypatch.setenv("CAI_WEB_TOKEN", token)
    result: Any = cli("web")
    assert len(served) == 1
    assert ("read-only" in result.stderr) == (token == "")


def test_create_app_refuses_a_short_token(db_url: str) -> None:
    with pytest.raises(BadInput, match="CAI_WEB_TOKEN"):
        create_app(db_url, "short")


# --- cookies over HTTPS ------------------------------------------------------------------------


def cookie_lines(response: Any) -> dict[str, str]:
    lines = response.headers.get_list("set-cookie")
    return {line.split("=", 1)[0]: line.lower() for line in lines}


def test_cookies_are_secure_over_https_or_behind_a_proxy_that_says_so(
    db_url: str, clock: Clock, browsers: Any
) -> None:
    app = make_app(db_url, clock)
    plain = browsers(app)

    def session_cookie(**headers: str) -> str:
        plain.cookies.clear()  # a new browser, so that it is sent a session cookie
        return cookie_lines(plain.get("/", headers=headers))["cai_session"]

    assert "secure" not in session_cookie()
    assert "secure" not in session_cookie(**{"X-Forwarded-Proto": "http"})
    for proto in ("https", "HTTPS", "https, http"):
        cookie = session_cookie(**{"X-Forwarded-Proto": proto})
        assert "secure" in cookie and "httponly" in cookie and "samesite=strict" in cookie, proto

    # Logging in behind the proxy: both the new session and the login cookie are Secure. (The
    # client's cookie jar would not send a Secure cookie over http, so the cookie goes by hand.)
    proxied = {"X-Forwarded-Proto": "https"}
    form = plain.get("/login", headers=proxied)
    sid = form.cookies["cai_session"]
    plain.cookies.clear()
    done = plain.post(
        "/login",
        data={"token": TOKEN, "csrf": csrf_of(form.text)},
        headers={**proxied, "Cookie": f"cai_session={sid}"},
        follow_redirects=False,
    )
    assert done.status_code == 303
    cookies = cookie_lines(done)
    assert "secure" in cookies["cai_session"] and "secure" in cookies["cai_auth"]

    direct = attempt(browsers(app, base_url="https://testserver"), TOKEN)  # TLS to the app itself
    assert direct.status_code == 303 and "secure" in cookie_lines(direct)["cai_auth"]
    login = attempt(plain, TOKEN)
    assert login.status_code == 303 and "secure" not in cookie_lines(login)["cai_auth"]


def test_concurrent_guesses_cannot_slip_past_the_limit(clock: Clock) -> None:
    """An attempt is counted before its token is compared, so a burst of parallel guesses gets
    no more comparisons than the limit allows."""
    from concurrent.futures import ThreadPoolExecutor

    throttle = LoginThrottle(per_client=5, overall=100, window=60, clock=clock)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: throttle.attempt("198.51.100.7"), range(40)))
    assert sum(result.allowed for result in results) == 5
    assert {result.retry_after for result in results if not result.allowed} == {60}
