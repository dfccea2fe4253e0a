"""The labelling page in a real browser: Debian's chromium driven by Playwright (no browser download)."""

import os
import shutil
import socket
import threading
import time

import pytest
from conftest import CHROMIUM_ARGS

from imgsent.labelling import LabelLog, open_session


@pytest.fixture
def served(tiny_model, tmp_path):
    """The page over the tiny model's store, served by uvicorn on a thread: (url, session, labels file)."""
    import uvicorn

    from imgsent.labelserver import create_app

    out = str(tmp_path / "labels.csv")
    session = open_session(str(tiny_model.parent / "store"), out, model=str(tiny_model), annotator="ann")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(session, "tok"), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/?token=tok", session, out
    server.should_exit = True
    thread.join(10)
    session.close()
    sock.close()


def test_label_five_images_with_the_keyboard_undo_one_reload_and_resume(served):
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:
        pytest.skip("Chromium is not installed (.ci/run installs Debian's chromium)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')"
    )
    url, session, out = served
    errors = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.goto(url)

        def shown() -> str:
            page.wait_for_function(
                "() => { const i = document.getElementById('img'); return i.dataset.id && i.complete && i.naturalWidth > 0; }"
            )
            return page.get_attribute("#img", "data-id")

        def press(key: str, before: str) -> str:
            page.keyboard.press(key)
            page.wait_for_function(f"() => document.getElementById('img').dataset.id !== {before!r}")
            return shown()

        labelled = []
        current = shown()
        for _ in range(5):
            key = "2" if os.path.basename(current).startswith("pos") else "n"  # a class's number or first letter
            labelled.append(current)
            current = press(key, current)
        assert [r.id for r in LabelLog(out).rows] == labelled
        rows = LabelLog(out).rows
        assert [r.label for r in rows] == [
            "positive" if os.path.basename(i).startswith("pos") else "negative" for i in labelled
        ]
        current = press("u", current)  # undo: the last image comes back
        assert current == labelled[-1] and len(LabelLog(out).rows) == 4
        page.wait_for_function("() => document.getElementById('message').textContent.startsWith('undone')")
        page.reload()
        assert shown() == labelled[-1]  # after a reload the page resumes where it was
        page.keyboard.press("s")  # skip it this time
        page.wait_for_function(f"() => document.getElementById('img').dataset.id !== {labelled[-1]!r}")
        nxt = shown()
        assert nxt not in labelled
        page.wait_for_function("() => document.getElementById('counts').textContent.includes('skipped1')")
        page.screenshot(path=os.path.join(os.path.dirname(out), "page.png"))
        browser.close()
    rows = LabelLog(out).rows
    assert [r.id for r in rows] == labelled and rows[-1].label is None
    assert not errors, errors
