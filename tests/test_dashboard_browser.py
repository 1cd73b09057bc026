"""The dashboard in a real browser: headless Chromium (Debian's, driven by Playwright) against a
live server with an embedded worker and the tiny random Llama as a base. Sign in, upload data
(bad lines shown next to the file), start a training from the form, watch the chart draw,
see it succeed with its samples and evaluation, download the weights, and compare the tuned
and base versions in the playground. Screenshots land in test-artifacts/dashboard/.

Needs /usr/bin/chromium (scripts/browser.sh installs it) and the playwright package (dev extras).
"""

from __future__ import annotations

import io
import re
import threading
import zipfile
from pathlib import Path

import pytest

from conftest import write_jsonl
from test_api_support import LiveServer
from tunery.worker.runner import Attempt

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium: run scripts/browser.sh"
)
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="needs the playwright package: pip install -e '.[dev]'"
)

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "dashboard"
FLAGS = [
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STEPS = 12
PROMPT = "Item: the red cat.\nAnimal:"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    live = LiveServer(tmp_path_factory.mktemp("dashboard-browser"), start_workers=True)
    live.store.ensure_base_models([("tiny", "a tiny random Llama", str(tiny_model_dir))])
    yield live
    live.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),  # a fresh --user-data-dir
            executable_path=str(CHROMIUM),
            headless=True,
            args=FLAGS,
            viewport={"width": 1360, "height": 900},
            accept_downloads=True,
        )
        yield context
        context.close()


@pytest.fixture
def page(browser):
    page = browser.new_page()
    page.set_default_timeout(60_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # Console errors include CSP violations; the API's 4xx answers the tests provoke are expected.
    page.on(
        "console",
        lambda msg: (
            msg.type == "error" and "Failed to load resource" not in msg.text and errors.append(msg.text)
        ),
    )
    yield page
    page.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def sign_in(page, server, owner: str = "alice") -> None:
    page.goto(server.url + "/")
    page.fill("#token", server.store.create_token(owner))
    page.click("button[type=submit]")
    page.wait_for_selector(f"[data-owner={owner}]")


def wait_or_explain(page, server, training_id: str, condition: str, timeout: int = 240_000) -> None:
    """Wait for `condition` in the page; when it does not come, fail with what the server and the
    page show of the training (status, error, the end of its logs) rather than a bare timeout."""
    try:
        page.wait_for_function(condition, timeout=timeout)
    except sync_api.TimeoutError:
        with server.client("alice") as client:
            training = client.get(f"/v1/trainings/{training_id}").json()
        shown = page.evaluate(
            """() => [document.querySelector('[data-status]')?.dataset.status,
                      document.querySelector('[data-chart=loss]')?.dataset.points,
                      document.querySelector('[role=alert]')?.textContent]"""
        )
        raise AssertionError(
            f"the page never met {condition!r}: the server says status {training['status']!r}, "
            f"error {training['error']!r}, {len(training['metrics'].get('history') or [])} history points; "
            f"the page shows (status, loss points, alert) {shown}; logs end:\n{training['logs'][-2000:]}"
        ) from None


def test_sign_in_keeps_the_token_in_the_tab_only(page, server):
    page.goto(server.url + "/")
    shot(page, "0-sign-in")
    page.fill("#token", "not-a-token")
    page.click("button[type=submit]")
    page.wait_for_selector("text=That token was not accepted.")

    sign_in(page, server, "carol")
    assert page.evaluate("sessionStorage.getItem('tunery.token')")
    assert page.evaluate("localStorage.length") == 0
    page.wait_for_selector("text=No trainings yet")
    page.click("text=Sign out")
    page.wait_for_selector("#token")
    assert page.evaluate("sessionStorage.getItem('tunery.token')") is None


def test_the_form_shows_bad_lines_and_bad_inputs_where_they_are(page, server, tmp_path, qa_rows):
    sign_in(page, server, "dave")
    page.click("[data-nav=new]")
    page.wait_for_selector("#base option[value='tunery/tiny']", state="attached")
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        ['{"prompt": "a", "completion": " b"}', '{"prompt": "a", "completion": 3}', "oops"],
    )
    page.set_input_files("#file-train_data", str(bad))
    status = page.wait_for_selector("[data-file-status=train_data] [data-valid=false]")
    errors = page.inner_text("[data-file-status=train_data] .line-errors")
    assert "line 2" in errors and "completion" in errors and "line 3" in errors, errors
    assert "2 of 3 lines" in status.inner_text()
    shot(page, "1-upload-errors")

    # A good file; then what only the whole request can tell, shown next to the input concerned.
    page.set_input_files("#file-train_data", str(write_jsonl(tmp_path / "good.jsonl", qa_rows)))
    page.wait_for_selector("[data-file-status=train_data] [data-valid=true]")
    split = "[data-field=num_validation_samples] .field-error"
    assert "leave none to train on" in page.inner_text(split)  # 50 validation rows of 24
    page.fill("#in-num_validation_samples", "4")
    assert page.inner_text(split) == ""
    page.select_option("#destination", "__new__")
    page.fill("#destination-name", "broken")
    page.fill("#in-train_batch_size", "3")
    page.fill("#in-micro_batch_size", "2")
    page.click("#start")
    error = page.wait_for_selector("[data-field=micro_batch_size] .field-error:not(:empty)")
    assert "must divide train_batch_size" in error.inner_text()
    assert page.url.endswith("#/new")


def test_train_from_the_form_watch_it_and_try_it(page, server, tmp_path, qa_rows, monkeypatch):
    # The worker holds the training's end (its status stays processing, every step's metrics
    # written) until the page has shown the running chart: 12 tiny steps can finish between two
    # of the page's polls on a fast machine.
    seen_running = threading.Event()
    finish = Attempt._finish

    def finish_when_seen(attempt, *args, **kwargs):
        seen_running.wait(300)
        return finish(attempt, *args, **kwargs)

    monkeypatch.setattr(Attempt, "_finish", finish_when_seen)
    sign_in(page, server)
    page.click("[data-nav=new]")
    page.wait_for_selector("#base option[value='tunery/tiny']", state="attached")
    page.select_option("#base", "tunery/tiny")
    # The inputs come from the version's TrainingInput schema: defaults and help text included.
    assert page.input_value("#in-lora_rank") == "8"
    assert "Rank of the LoRA matrices" in page.inner_text("[data-field=lora_rank]")

    page.set_input_files("#file-train_data", str(write_jsonl(tmp_path / "train.jsonl", qa_rows)))
    page.wait_for_selector("[data-file-status=train_data] [data-valid=true]")
    assert "24 prompt/completion rows" in page.inner_text("[data-file-status=train_data]")
    page.set_input_files("#file-validation_data", str(write_jsonl(tmp_path / "val.jsonl", qa_rows[:4])))
    page.wait_for_selector("[data-file-status=validation_data] [data-valid=true]")

    page.select_option("#destination", "__new__")
    page.fill("#destination-name", "animals")
    for name, value in {
        "train_batch_size": "2",
        "micro_batch_size": "2",
        "num_validation_samples": "4",
        "chunk_size": "64",
        "learning_rate": "0.001",
        "validation_prompt": PROMPT.replace("\n", " "),
    }.items():
        page.fill(f"#in-{name}", value)
    page.click("text=More options")
    page.fill("#in-max_steps", str(STEPS))
    page.fill("#in-eval_steps", "6")
    shot(page, "2-new-training")
    page.click("#start")

    page.wait_for_url(re.compile(r"#/trainings/\w+$"))
    training_id = page.url.rsplit("/", 1)[1]
    # Live: the chart draws points while the training is still running, without a reload.
    try:
        wait_or_explain(
            page,
            server,
            training_id,
            """() => document.querySelector('[data-status]')?.dataset.status === 'processing'
                  && Number(document.querySelector('[data-chart=loss]').dataset.points) >= 2""",
        )
    finally:
        seen_running.set()
    shot(page, "3-training-running")
    page.click("[data-nav=trainings]")
    row = page.wait_for_selector(f"tr[data-training='{training_id}']")
    if row.get_attribute("data-status") == "processing":
        assert f"/{STEPS}" in row.inner_text()
        shot(page, "3b-trainings-running")
    row.click()
    wait_or_explain(page, server, training_id, "() => !!document.querySelector('.title [data-status=succeeded]')")
    page.wait_for_selector("[data-section=eval]")
    page.wait_for_timeout(300)  # let the charts finish their last draw
    shot(page, "4-training-succeeded")

    points = int(page.get_attribute("[data-chart=loss]", "data-points"))
    assert points >= STEPS + 1, points  # every step's loss, plus validation losses
    assert int(page.get_attribute("[data-chart=lr]", "data-points")) == STEPS
    # a supervised training's token accuracy: every step's, plus the validations'
    assert page.is_visible("[data-chart=token_accuracy]")
    assert int(page.get_attribute("[data-chart=token_accuracy]", "data-points")) >= STEPS + 1
    assert page.inner_text("[data-stat=step] .stat-value") == f"{STEPS} / {STEPS}"
    assert page.locator("[data-section=samples] li").count() >= 2  # steps 6 and 12
    data = page.inner_text("[data-section=data]")
    assert "24 train, 4 validation" in data, data
    eval_table = page.inner_text("[data-section=eval]").lower()
    assert "loss" in eval_table and "base" in eval_table and "tuned" in eval_table
    assert f"trained {STEPS} steps" in page.inner_text("[data-section=logs]")

    # The weights need the token, so the page fetches them as a blob and saves that.
    with page.expect_download() as download:
        page.click("[data-action=download]")
    archive = zipfile.ZipFile(io.BytesIO(Path(download.value.path()).read_bytes()))
    assert "manifest.json" in archive.namelist()

    # Exports: merged weights made by the server, then downloaded from the page.
    page.click("[data-export=merged]")
    page.wait_for_selector("[data-download-export=merged-bf16]", timeout=120_000)
    shot(page, "4b-exported")
    with page.expect_download() as download:
        page.click("[data-download-export=merged-bf16]")
    merged = zipfile.ZipFile(io.BytesIO(Path(download.value.path()).read_bytes()))
    assert {"merged-bf16/config.json", "merged-bf16/model.safetensors"} <= set(merged.namelist())

    page.click("[data-nav=trainings]")
    row = page.wait_for_selector(f"tr[data-training='{training_id}'][data-status=succeeded]")
    assert "alice/animals" in row.inner_text() and f"{STEPS}/{STEPS}" in row.inner_text()
    shot(page, "5-trainings")

    # Playground: the tuned version against its base, side by side, streamed.
    row.click()
    page.click("[data-action=playground]")
    page.wait_for_selector("#version-a")
    assert page.is_checked("#compare")
    assert page.input_value("#version-a").startswith("alice/animals:")
    assert page.input_value("#version-b").startswith("tunery/tiny:")
    page.fill("#prompt", PROMPT)
    page.fill("#in-max_new_tokens", "8")
    page.fill("#in-temperature", "0")
    page.click("#run")
    page.wait_for_selector("[data-pane=a][data-state=succeeded]", timeout=120_000)
    page.wait_for_selector("[data-pane=b][data-state=succeeded]", timeout=120_000)
    tuned = page.inner_text("[data-output=a]")
    assert tuned.strip(), "the tuned version streamed nothing"
    assert "pieces" in page.inner_text("[data-pane=a] .pane-stats")
    shot(page, "6-playground")
