"""The user's path through a real browser (headless Chromium, driven by Playwright): log in to
the Airflow UI, open `model_compression`'s trigger form, set a small configuration in its
fields, trigger, wait for success, then open the run in the MLflow UI: the parent run with the
summary as its description, a child run's confusion matrix, and the registered version's model
card.

Screenshots of every step go to test-artifacts/browser/ (the README shows three of them, copied
to docs/images/). The browser is Debian's chromium
(`make chromium` installs it; see conftest_stack.chromium); Playwright never
downloads one. The stack is shared with test_stack.py (see conftest_stack.py).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest_stack import DAG_ID, ROOT, chromium

pytestmark = [pytest.mark.browser, pytest.mark.stack]

SHOTS = ROOT / "test-artifacts" / "browser"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# What the form's fields are set to (the rest keep the DAG's defaults); the variants, a
# multi-select, keep only VARIANT.
FORM = {"epochs": "1", "train_limit": "600", "test_limit": "200", "finetune_epochs": "1",
        "experiment": "stack-browser"}
VARIANT = "float32"


@pytest.fixture(scope="module")
def page():
    executable = chromium()
    from playwright.sync_api import sync_playwright
    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob("*.png"):
        old.unlink()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(90_000)  # a shared 2-core machine renders slowly at times
        try:
            yield page
        finally:
            browser.close()


def shot(page, name: str) -> Path:
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def show_section_of(field) -> None:
    """Open the trigger form's section (an accordion item, one open at a time) holding `field`:
    a field of a closed section is not visible, so it cannot be filled."""
    trigger = field.locator("xpath=ancestor::*[@data-part='item'][1]/*[@data-part='item-trigger']")
    if trigger.get_attribute("aria-expanded") != "true":
        trigger.click()
    field.first.wait_for()


def close_assistant(page) -> None:
    """MLflow 3.17's assistant panel covers a third of the page when it is first shown: closed
    (for the rest of the visit) so that the screenshots show the run."""
    close = page.locator("button[aria-label=Close]")
    if close.count():
        close.first.click()


def test_trigger_from_the_airflow_ui_and_see_the_run_in_mlflow(stack, page):
    stack.wait_for_dag()  # the dag-processor has parsed dags/
    if stack.request("GET", f"/api/v2/dags/{DAG_ID}")[1]["is_paused"]:
        stack.unpause()
    runs_before = {r["dag_run_id"] for r in stack.dag_runs()}

    # A visit without a session lands on the login page. The UI's client-side redirect can abort
    # the first navigation (net::ERR_ABORTED, seen once in CI): visit again, at most twice more.
    from playwright.sync_api import Error as PlaywrightError
    for attempt in range(3):
        try:
            page.goto(f"{stack.airflow_url}/dags/{DAG_ID}")
            page.wait_for_url(re.compile(r"/auth/login"))
            break
        except PlaywrightError as error:
            if "ERR_ABORTED" not in str(error) or attempt == 2:
                raise
    page.locator("input[name=username]").wait_for()
    shot(page, "01-login")
    page.locator("input[name=username]").fill("admin")
    page.locator("input[name=password]").fill(stack.password)
    page.locator("button[type=submit]").click()
    page.wait_for_url(re.compile(rf"/dags/{DAG_ID}$"))
    trigger = page.get_by_role("button", name="Trigger").first
    trigger.wait_for()
    shot(page, "02-dag-page")

    # The trigger form: the DAG's Params as fields.
    trigger.click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text(f"Trigger Dag - {DAG_ID}").wait_for()
    shot(page, "03-trigger-form")
    for name, value in FORM.items():
        field = dialog.locator(f"[name=element_{name}]")
        show_section_of(field)
        field.fill(value)
        field.press("Tab")  # number fields commit their value on blur
    for name, value in FORM.items():
        assert dialog.locator(f"[name=element_{name}]").input_value() == value, name
    show_section_of(dialog.locator("#element_variants"))
    others = dialog.locator(f"[aria-label^='Remove ']:not([aria-label='Remove {VARIANT}'])")
    while others.count():  # the chips of the default variants, but one
        others.last.click()
    chosen = dialog.locator("input[name=element_variants]")
    assert [chosen.nth(i).input_value() for i in range(chosen.count())] == [VARIANT]
    shot(page, "04-form-filled")
    dialog.get_by_role("button", name="Trigger").last.click()
    dialog.wait_for(state="hidden")
    shot(page, "05-triggered")

    new_runs = [r for r in stack.dag_runs() if r["dag_run_id"] not in runs_before]
    assert len(new_runs) == 1, f"expected one new DAG run, got {new_runs}"
    run = new_runs[0]
    conf = run["conf"]
    assert conf["epochs"] == 1 and conf["train_limit"] == 600 and conf["test_limit"] == 200
    assert conf["variants"] == [VARIANT] and conf["experiment"] == "stack-browser"
    assert conf["finetune_epochs"] == 1

    run_id = run["dag_run_id"]
    stack.wait_for_run(run_id)
    page.goto(f"{stack.airflow_url}/dags/{DAG_ID}/runs/{run_id}")
    page.get_by_text(run_id).first.wait_for()
    page.get_by_text(re.compile(r"^success$", re.IGNORECASE)).first.wait_for()
    shot(page, "06-run-succeeded")

    # The run in the MLflow UI: its name and a metric the pipeline logged.
    parent = stack.parent_run("stack-browser", run_id)
    assert parent.data.tags.get("airflow_run_id") == run_id
    page.goto(f"{stack.mlflow_url}/#/experiments/{parent.info.experiment_id}"
              f"/runs/{parent.info.run_id}")
    page.get_by_text(parent.info.run_name).first.wait_for()
    metric = next(iter(sorted(parent.data.metrics)))
    page.get_by_text(metric).first.wait_for()
    summary = page.get_by_role("heading", name="Model compression summary")  # its description
    summary.wait_for()
    close_assistant(page)
    page.get_by_role("button", name="Expand description").click()
    summary.evaluate("heading => heading.scrollIntoView({block: 'start'})")
    shot(page, "07-mlflow-run")
    assert page.title()

    # The variant's child run: its verdict, and its confusion matrix among the artifacts.
    client = stack.mlflow_client()
    child = client.search_runs([parent.info.experiment_id], filter_string=(
        f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.variant = '{VARIANT}'"))[0]
    assert child.data.tags["mlflow.note.content"].startswith("passed the gates; champion")
    assert "accuracy_class_trouser" in child.data.metrics
    page.goto(f"{stack.mlflow_url}/#/experiments/{parent.info.experiment_id}"
              f"/runs/{child.info.run_id}/artifacts/confusion_matrix.png")
    image = page.locator("img[alt='confusion_matrix.png']").first
    image.wait_for()
    page.wait_for_function("image => image.complete && image.naturalWidth > 0",
                           arg=image.element_handle())
    shot(page, "08-mlflow-confusion-matrix")

    # The registered version's page shows its model card.
    name = "fashion-mnist-classifier"
    version = client.get_run(parent.info.run_id).data.tags["registered_version"]
    page.goto(f"{stack.mlflow_url}/#/models/{name}/versions/{version}")
    page.get_by_text(f"{VARIANT}: version {version} of {name}").first.wait_for()
    page.get_by_text(f"make serve MODEL=models:/{name}/{version}").first.wait_for()
    shot(page, "09-mlflow-model-card")
