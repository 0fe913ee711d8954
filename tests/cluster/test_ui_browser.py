"""Integration: the web UI at /ui/ in headless Chromium, over 3 real agents with traffic.

a0 calls ``web`` through its outbound listener (as ``api``) and serves the page, with an
API token; a1 and a2 serve ``web`` behind inbound listeners, and a2 carries a tag of
HTML and script. The page must show the members, the service and its instances, the
policies (one published through a1, one forged and refused by a0), the edge api → web
with a non-zero rate and, once the token is pasted, a live tap of it; a2 killed with
``kill -9`` must turn failed in the page without a reload, as soon as a0 itself holds
it failed; its suspicion timeline is one click away. The hostile tag must show as text
and run nothing.

Needs selenium (the ``test`` extra), chromium and chromedriver (Debian: chromium,
chromium-driver); skipped with the reason where one is missing. Screenshots go to
$RUMOR_TEST_ARTIFACTS if set, else the test's tmp dir; the path is printed.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..agents import Agent, AgentCluster, rumor, wait_for
from ..backends import Backend
from ..ports import free_port

HOST = "127.0.0.1"
HOSTILE = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
TOKEN = "ui-t0k-" + "z" * 25
ACCESS = """kind = "access"
name = "{name}"
version = 1
destination = "ledger"
default = "deny"
allow = ["api"]
"""


def _browser_paths() -> tuple[str, str]:
    """(chromium, chromedriver), or skip saying which is missing."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[test]')")
    browser = next(filter(None, (shutil.which(n) for n in
                                 ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        missing = " and ".join(n for n, p in (("chromium", browser), ("chromedriver", driver))
                               if p is None)
        pytest.skip(f"{missing} not found (Debian: apt-get install chromium chromium-driver)")
    return browser, driver


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    browser, driver = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,2200", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium's sandbox refuses to run as root
    d = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield d
    finally:
        d.quit()


class Traffic:
    """GETs of ``web`` through a0's outbound listener, ~50/s, until stopped."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        c = http.client.HTTPConnection(HOST, self.port, timeout=5)
        while not self._stop.is_set():
            try:
                c.request("GET", f"/ui-test/{self.sent}", headers={"host": "web"})
                c.getresponse().read()
                self.sent += 1
            except (OSError, http.client.HTTPException):
                c.close()
                c = http.client.HTTPConnection(HOST, self.port, timeout=5)
            self._stop.wait(0.02)
        c.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def _artifacts(tmp_path: Path) -> Path:
    root = Path(os.environ.get("RUMOR_TEST_ARTIFACTS") or tmp_path) / "ui-browser"
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.mark.alone
def test_the_ui_follows_a_live_cluster(tmp_path: Path) -> None:
    _browser_paths()  # skip before starting anything
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    shots = _artifacts(tmp_path)
    print(f"ui screenshots: {shots}")
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    for key in ("ops", "mallory"):
        rumor("keygen", "--out", str(tmp_path / key))
    trust = ["--trust-key", str(tmp_path / "ops.pub")]
    backends = [Backend("b1"), Backend("b2")]
    out_port = free_port()
    specs = [
        ["--outbound", f"{HOST}:{out_port}", "--identity", "api",
         "--api-token-file", str(token)],
        ["--inbound", f"{HOST}:{free_port()}",
         "--service", f"name=web,id=web-1,port={backends[0].port}"],
        ["--inbound", f"{HOST}:{free_port()}", "--tag", f"label={HOSTILE}",
         "--service", f"name=web,id=web-2,port={backends[1].port}"],
    ]
    cluster = AgentCluster(tmp_path)
    traffic: Traffic | None = None
    try:
        for i, extra in enumerate(specs):
            a = Agent(f"a{i}", tmp_path, [*extra, *trust])
            a.start(cluster.agents[0] if cluster.agents else None)
            cluster.agents.append(a)
            if i == 0:
                wait_for(a.members, 20, "the seed's API")
        a0, a1, a2 = cluster.agents
        wait_for(lambda: cluster.converged(3), 30, "3 agents to converge")
        # The edge needs a whole 5 s bucket of traffic: start it first.
        traffic = Traffic(out_port)
        with chromium() as d:
            waiter = WebDriverWait(d, 20, poll_frequency=0.05)

            def wait(cond: Any) -> None:
                waiter.until(cond)

            def js(script: str) -> Any:
                return d.execute_script(script)

            def count(css: str) -> int:
                return int(js(f"return document.querySelectorAll({css!r}).length"))

            t0 = time.monotonic()
            d.get(f"http://{a0.api}/ui")  # redirected to /ui/
            wait(lambda _: count("tr[data-member]") == 3)
            load = time.monotonic() - t0
            assert d.current_url.endswith("/ui/")
            js("window.__sameLoad = true")  # a reload would forget it
            assert count("tr[data-member][data-status=alive]") == 3
            wait(lambda _: count("[data-service=web] [data-instance][data-health=passing]")
                 == 2)
            assert {e.get_attribute("data-instance") for e in d.find_elements(
                By.CSS_SELECTOR, "[data-service=web] [data-instance]")} == {"web-1", "web-2"}

            # The hostile tag is shown literally and nothing of it became markup or ran.
            row = d.find_element(By.CSS_SELECTOR, "tr[data-member=a2]")
            assert f"label={HOSTILE}" in row.text
            assert count("main img, main script, tbody iframe") == 0
            assert js("return window.__pwned") is None

            # A policy published through a1 arrives by gossip; a forged one is refused.
            doc = tmp_path / "ledger.toml"
            doc.write_text(ACCESS.format(name="ledger-access"))
            rumor("policy", "publish", str(doc), "--key", str(tmp_path / "ops.key"),
                  "--api", a1.api)
            forged = tmp_path / "forged.toml"
            forged.write_text(ACCESS.format(name="forged-access"))
            res = rumor("policy", "publish", str(forged), "--key",
                        str(tmp_path / "mallory.key"), "--api", a0.api, "--token-file",
                        str(token), check=False)
            assert res.returncode == 1, res.stdout + res.stderr
            wait(lambda _: count("tr[data-policy=ledger-access][data-kind=access]") == 1)
            wait(lambda _: count("tr[data-rejection=untrusted]") == 1)
            assert "forged-access" in d.find_element(
                By.CSS_SELECTOR, "tr[data-rejection=untrusted]").text

            # The edge api -> web with a rate, from the golden metrics.
            edge = "g.edge[data-source=api][data-service=web]"
            wait(lambda _: count(edge) == 1 and float(
                d.find_element(By.CSS_SELECTOR, edge).get_attribute("data-rps") or 0) > 0)
            assert d.find_element(By.CSS_SELECTOR, edge).get_attribute("class").split()[1] \
                == "ok"
            d.save_screenshot(str(shots / "1-cluster.png"))

            # The tap of that edge needs a0's token: asked for, pasted, then live.
            d.find_element(By.CSS_SELECTOR, f"{edge} text.label").click()
            wait(lambda _: d.find_element(By.ID, "token-box").is_displayed())
            assert "API token" in d.find_element(By.ID, "token-why").text
            d.find_element(By.ID, "token").send_keys(TOKEN)
            d.find_element(By.ID, "token-save").click()
            wait(lambda _: count("#tap-events tbody tr") > 0)
            assert "/ui-test/" in d.find_element(By.CSS_SELECTOR, "#tap-events tbody tr").text
            d.save_screenshot(str(shots / "2-tap.png"))
            d.find_element(By.ID, "tap-close").click()

            # kill -9 a2: failed in the page, without a reload, once a0 holds it failed.
            assert a2.proc is not None
            killed = time.monotonic()
            os.kill(a2.proc.pid, signal.SIGKILL)
            seen: dict[str, float] = {}
            deadline = killed + 20
            while len(seen) < 2 and time.monotonic() < deadline:
                now = time.monotonic() - killed
                if "api" not in seen and a0.status_of("a2") == "failed":
                    seen["api"] = now
                if "page" not in seen and count("tr[data-member=a2][data-status=failed]"):
                    seen["page"] = now
                time.sleep(0.05)
            assert set(seen) == {"api", "page"}, f"after 20 s only {seen}"
            print(f"ui: page loaded in {load:.2f}s; a2 failed after {seen['api']:.2f}s "
                  f"in a0's API, {seen['page']:.2f}s in the page")
            assert seen["page"] - seen["api"] < 1.5  # a blocking read, not a slow poll
            assert count("tr[data-member]") == 3
            d.save_screenshot(str(shots / "3-failed.png"))

            # Its suspicion timeline, one click away (the token is kept for the tab).
            d.find_element(By.CSS_SELECTOR, "tr[data-member=a2]").click()
            wait(lambda _: d.find_element(By.ID, "explain").get_attribute("data-loaded")
                 == "1")
            kinds = {e.get_attribute("data-kind") for e in d.find_elements(
                By.CSS_SELECTOR, "#explain-timeline li")}
            assert kinds & {"suspect_raised", "declared_dead", "dead_heard"}, kinds
            assert "declared failed by" in d.find_element(By.ID, "explain-story").text
            d.save_screenshot(str(shots / "4-explain.png"))

            # Still nothing ran, and the page itself never tripped its own CSP.
            assert js("return window.__pwned") is None
            assert js("return document.body.dataset.cspViolations || null") is None
            assert js("return window.__sameLoad") is True  # never reloaded
    finally:
        if traffic is not None:
            traffic.stop()
        cluster.close()
        for b in backends:
            b.close()
