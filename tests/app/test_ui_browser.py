"""The web app end to end in a real headless browser (Debian's chromium driven by selenium): a run on the embedded
base is set up, checked, started, watched (curve and validation image), stopped, resumed to the end and tried
beside the base. A screenshot of each page is kept: `$UI_SCREENSHOTS`, else tests/artifacts/ui/ (ignored by git).

Run by `make test-ui` (the `ui` marker); it needs `apt-get install chromium chromium-driver`, and is skipped
without them except under CI, where .ci/run installs them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from difftune.core.config import parse
from difftune.core.errors import UserError
from difftune.core.paths import embedded_base
from difftune.finetune.config import LoraTrainConfig

pytestmark = pytest.mark.ui
ROOT = Path(__file__).resolve().parents[2]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver are missing: .ci/run installs them")
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1500"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


class Page:
    """The page as a user works it: fields by id, buttons, waits on what appears, a screenshot per step."""

    def __init__(self, driver, shots: Path):
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.shots, self.wait = driver, shots, WebDriverWait
        shots.mkdir(parents=True, exist_ok=True)

    def el(self, id_: str):
        return self.driver.find_element("id", id_)

    def fill(self, id_: str, value: str) -> None:
        field = self.el(id_)
        field.clear()
        field.send_keys(value)

    def click(self, id_: str) -> None:
        self.el(id_).click()

    def until(self, check, timeout: float = 60, what: str = ""):
        return self.wait(self.driver, timeout, poll_frequency=0.25).until(lambda d: check(), what)

    def text(self, id_: str) -> str:
        return self.el(id_).text

    def js(self, script: str):
        return self.driver.execute_script(script)

    def shot(self, name: str) -> None:
        height = self.js("window.scrollTo(0, 0); return document.body.scrollHeight")
        self.driver.set_window_size(1200, max(900, height + 40))
        self.driver.save_screenshot(str(self.shots / f"{name}.png"))


def command_line_error(argv: list[str]) -> str:
    with pytest.raises(UserError) as err:
        parse(LoraTrainConfig, argv)
    return str(err.value)


def test_a_run_set_up_watched_stopped_resumed_and_tried_in_the_browser(browser, serve, app_data, tmp_path):
    shots = Path(os.environ.get("UI_SCREENSHOTS") or ROOT / "tests" / "artifacts" / "ui")
    base = str(embedded_base("tiny_shapes"))
    with serve(tmp_path / "runs") as (url, app):
        page = Page(browser, shots)
        browser.get(url + "/")
        page.until(lambda: page.el("new-resolution"), what="the form")
        page.fill("new-name", "shapes-lora")
        page.fill("new-pretrained_model_name_or_path", base)
        page.fill("new-train_data_dir", str(app_data))
        page.click("check-data")
        page.until(lambda: "12 images" in page.text("data-report"), what="the data check")
        assert len(browser.find_elements("css selector", "#data-report .thumbs img")) == 12

        # bad input: the command line's one-line error, beside the field it names
        page.fill("new-resolution", "abc")
        page.click("check-config")
        page.until(lambda: page.text("new-err-resolution"), what="the error beside --resolution")
        expected = command_line_error(["--pretrained_model_name_or_path", base, "--resolution", "abc"])
        assert page.text("new-err-resolution") == expected == "--resolution must be an integer, got 'abc'"
        page.shot("1-new-run-bad-input")

        settings = {"resolution": "64", "train_batch_size": "4", "max_train_steps": "120", "learning_rate": "1e-3",
                    "checkpointing_steps": "10", "validation_prompt": "a red circle", "validation_steps": "10",
                    "num_validation_images": "2", "validation_split": "0.25"}  # fmt: skip
        for name, value in settings.items():
            page.fill(f"new-{name}", value)
        page.fill("new-extra", "validation_inference_steps: 4")
        page.click("check-config")
        page.until(lambda: "max_train_steps: 120" in page.text("config-yaml"), what="the checked config")
        page.until(lambda: "GiB at its peak" in page.text("config-memory"), what="the memory planner's prediction")
        assert page.text("new-err-resolution") == ""
        page.shot("2-new-run-checked")
        page.click("create-run")
        page.until(lambda: page.text("run-name") == "shapes-lora", what="the run's page")
        config = tmp_path / "runs" / "shapes-lora" / "config.yaml"
        assert parse(LoraTrainConfig, ["--config", str(config)]).training.max_train_steps == 120  # the CLI reads it

        page.click("run-start")
        page.until(lambda: page.text("run-status") == "training", what="training")
        page.until(lambda: browser.find_elements("css selector", "circle.val-point"), 120, "a validation loss point")
        page.until(lambda: page.js("const i = document.querySelector('img.val-grid'); return i && i.naturalWidth > 0"),
                   30, "a validation image")  # fmt: skip
        assert page.js("return document.getElementById('loss-line').points.numberOfItems") >= 2
        page.shot("3-run-training")
        page.click("run-stop")
        page.until(lambda: page.text("run-status") == "stopped", 60, "the stop")
        stopped_at = [row.text for row in browser.find_elements("css selector", "#checkpoints tr")][1:]
        assert stopped_at and all(row.startswith(("checkpoint-", "best")) for row in stopped_at)
        assert "interrupted" in page.text("run-log")
        page.shot("4-run-stopped")

        page.click("run-resume")
        page.until(lambda: page.text("run-status") == "finished", 180, "the resumed run's end")
        page.until(lambda: "step 120 of 120" in page.text("run-facts"), 10, "the last step")
        assert "resumed from" in (tmp_path / "runs" / "shapes-lora" / "train.log").read_text()
        page.shot("5-run-finished")

        browser.find_element("css selector", "nav button[data-tab=runs]").click()
        page.until(lambda: "finished" in page.text("runs-table"), 10, "the runs table")
        page.shot("6-runs")

        browser.find_element("css selector", "nav button[data-tab=try]").click()
        page.until(lambda: page.el("try-a").get_attribute("value") == "shapes-lora", 10, "the run to try")
        page.fill("try-steps", "4")
        page.click("generate")
        page.until(lambda: page.js("return [...document.querySelectorAll('img.try-image')]"
                                   ".filter(i => i.naturalWidth > 0).length") == 2, 120, "the two images")  # fmt: skip
        labels = [f.text for f in browser.find_elements("css selector", "#try-results figcaption")]
        assert labels == ["shapes-lora (result)", "shapes-lora (base)"]
        tries = sorted((tmp_path / "runs" / ".tries").glob("*/*/*_seed0.png"))
        assert len(tries) == 2 and tries[0].read_bytes() != tries[1].read_bytes()  # the LoRA changed the image
        page.shot("7-try-it")
