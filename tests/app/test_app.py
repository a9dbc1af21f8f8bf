"""The web app's routes, served for real: the page answers, bad input is the command line's own one-line error with
the field it names, a created run is a config the command line reads, a trained run is read from what the trainer
wrote, its checkpoints and result are tried beside the base, and a push reaches the Hub (a stand-in) with the
environment's token only. The whole app in a browser: test_ui_browser.py (`make test-ui`)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from difftune.app import ui
from difftune.core.config import from_values, parse, to_dict
from difftune.core.errors import UserError
from difftune.core.paths import embedded_base
from difftune.finetune import hub
from difftune.finetune.config import LoraTrainConfig
from difftune.finetune.loop import train
from difftune.finetune.tasks import LORA

BASE = str(embedded_base("tiny_shapes"))
FAKE_TOKEN = "hf_FAKEtokenDoNotLeak0123456789"


def form(name: str, data: Path, **values) -> dict:
    return {"name": name, "preset": "", "extra": "", "values": {"pretrained_model_name_or_path": BASE,
                                                                "train_data_dir": str(data), **values}}  # fmt: skip


def cli_error(argv: list[str]) -> str:
    with pytest.raises(UserError) as err:
        parse(LoraTrainConfig, ["--pretrained_model_name_or_path", BASE, *argv])
    return str(err.value)


def test_the_page_answers_and_bad_input_is_the_command_lines_error_beside_its_field(serve, http, app_data, tmp_path):
    with serve(tmp_path / "runs") as (url, _):
        status, page = http(url + "/")
        assert status == 200 and "<title>difftune</title>" in page
        cases = [  # form change -> (the command line's flags for the same input, the field named)
            ({"values": {"resolution": "abc"}}, ["--resolution", "abc"], "resolution"),
            ({"values": {"mixed_precision": "fp8"}}, ["--mixed_precision", "fp8"], "mixed_precision"),
            ({"values": {"learning_rate": "nan"}}, ["--learning_rate", "nan"], "learning_rate"),
            ({"extra": "lr_scheduler: cosin"}, ["--lr_scheduler", "cosin"], "extra"),
        ]
        for change, argv, field in cases:
            body = form("r1", app_data)
            body["values"].update(change.pop("values", {}))
            status, answer = http(url + "/api/config", {**body, **change})
            assert status == 400 and answer == {"error": cli_error(argv), "field": field}, argv
        for change, error, field in [
            ({"extra": "learning_rte: 1e-4"}, "more settings: unknown key 'learning_rte'; did you mean", "extra"),
            ({"extra": "a: [1"}, "more settings: not valid YAML", "extra"),
            ({"preset": "gpu-7gb"}, "--config gpu-7gb: no such file (nor a shipped preset", "preset"),
            ({"name": "../x"}, "--name '../x': use letters, digits", "name"),
        ]:
            status, answer = http(url + "/api/config", {**form("r1", app_data), **change})
            assert status == 400 and answer["error"].startswith(error) and answer["field"] == field, answer
        assert not (tmp_path / "runs" / "r1").exists()  # checking writes nothing


def test_the_form_shows_the_memory_planners_prediction(serve, http, app_data, tmp_path):
    with serve(tmp_path / "runs") as (url, _):
        status, answer = http(url + "/api/plan", form("r1", app_data, resolution="64", train_batch_size="2"))
        assert status == 200 and re.fullmatch(r"\d+\.\d\d GiB at its peak, during .+ \(memory planner, CUDA\)",
                                              answer["memory"]), answer  # fmt: skip
        status, answer = http(url + "/api/plan", form("r1", app_data, pretrained_model_name_or_path=str(tmp_path)))
        assert status == 400 and "model_index.json" in answer["error"], answer
    assert not (tmp_path / "runs" / "planned").exists()  # planning writes nothing


def test_a_created_run_is_a_config_the_command_line_reads(serve, http, app_data, tmp_path):
    body = {**form("r1", app_data, resolution="64", validation_prompt=["a red circle", "a blue square"]),
            "preset": "cpu", "extra": "lr_scheduler: cosine\nhub_token: secret"}  # fmt: skip
    with serve(tmp_path / "runs") as (url, _):
        status, made = http(url + "/api/runs", body)
        assert status == 200 and made["name"] == "r1"
        config = tmp_path / "runs" / "r1" / "config.yaml"
        assert made["command"] == f"python -m difftune.finetune.finetune_lora --config {config}"
        status, again = http(url + "/api/runs", body)
        assert status == 400 and again["field"] == "name" and "exists" in again["error"]
        status, runs = http(url + "/api/runs")
        assert [(r["name"], r["status"], r["weights"]) for r in runs] == [("r1", "new", [])]
    written = yaml.safe_load(config.read_text())
    assert "hub_token" not in written and "secret" not in config.read_text()  # secrets are never written
    assert written["cache_latents"] is True and written["resolution"] == 64  # the preset folded in, typed values
    cfg = parse(LoraTrainConfig, ["--config", str(config)])
    assert cfg.validation.validation_prompt == ["a red circle", "a blue square"]
    assert cfg.optim.lr_scheduler == "cosine" and cfg.training.output_dir == str(config.parent.resolve())


def test_the_data_check_counts_what_training_reads_and_names_a_bad_folder(serve, http, app_data, tmp_path):
    (app_data / "blue_circle_0000.png").write_bytes(b"not a png")
    with serve(tmp_path / "runs") as (url, _):
        status, report = http(url + "/api/data", {"train_data_dir": str(app_data)})
        assert (
            status == 200 and report["images"] == 11 and report["skipped"] == [str(app_data / "blue_circle_0000.png")]
        )
        assert len(report["thumbnails"]) == 11 and report["thumbnails"][0]["caption"] == "a red circle"
        assert report["thumbnails"][0]["src"].startswith("data:image/png;base64,")
        status, answer = http(url + "/api/data", {"train_data_dir": str(tmp_path / "nowhere")})
        assert status == 400 and answer == {"error": f"--train_data_dir {tmp_path / 'nowhere'} is not a folder",
                                            "field": "train_data_dir"}  # fmt: skip


def test_a_token_is_required_when_given_and_files_stay_inside_the_output_root(serve, http, tmp_path):
    (tmp_path / "secret.txt").write_text("outside")
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "a.txt").write_text("inside")
    with serve(tmp_path / "runs", token="s3cret") as (url, _):
        assert http(url + "/")[0] == 401 and http(url + "/api/runs", token="wrong")[0] == 401
        assert http(url + "/?token=s3cret")[0] == 200 and http(url + "/api/runs", token="s3cret") == (200, [])
        assert http(url + "/files/r/a.txt?token=s3cret") == (200, "inside")
        assert http(url + "/files/../secret.txt?token=s3cret")[0] == 404
        assert http(url + "/files/%2E%2E/secret.txt?token=s3cret")[0] == 404


def test_the_command_checks_its_flags_and_a_token_guards_other_addresses(monkeypatch, tmp_path, capsys):
    with pytest.raises(UserError, match=r"--port 70000 must be within 0..65535"):
        ui.main(["--port", "70000", "--output_root", str(tmp_path)])
    served = []
    monkeypatch.setattr("uvicorn.run", lambda app, host, port, **kw: served.append((host, port)))
    monkeypatch.setenv(ui.TOKEN_ENV, "mine")
    ui.main(["--host", "0.0.0.0", "--port", "8000", "--output_root", str(tmp_path / "ui")])
    assert (
        served == [("0.0.0.0", 8000)]
        and "open http://0.0.0.0:8000/?token=$DIFFTUNE_UI_TOKEN" in capsys.readouterr().out
    )
    monkeypatch.delenv(ui.TOKEN_ENV)
    ui.main(["--output_root", str(tmp_path / "ui")])
    assert "open http://127.0.0.1:7860/\n" in capsys.readouterr().out  # loopback: no token


def test_a_trained_run_is_read_tried_beside_the_base_and_pushed(serve, http, app_data, tmp_path, monkeypatch):
    root = tmp_path / "runs"
    settings = dict(resolution=64, train_batch_size=4, max_train_steps=4, checkpointing_steps=2, learning_rate=1e-3,
                    validation_prompt=["a red circle"], validation_steps=2, num_validation_images=1,
                    validation_inference_steps=2, validation_split=0.25, keep_best_by="validation_loss")  # fmt: skip
    with serve(root) as (url, _):
        assert http(url + "/api/runs", form("r1", app_data, **settings))[0] == 200
        config = root / "r1" / "config.yaml"
        train(parse(LoraTrainConfig, ["--config", str(config)]), LORA)  # what the app's Start runs, in this process

        status, page = http(url + "/api/runs/r1")
        assert status == 200 and page["status"] == "finished" and (page["step"], page["max_steps"]) == (4, 4)
        assert [s for s, _ in page["loss_curve"]] == [1, 2, 3, 4] and [s for s, _ in page["validation_curve"]] == [
            2,
            4,
        ]
        assert page["loss"] == page["loss_curve"][-1][1] and page["best_step"] in (2, 4)
        assert [v["step"] for v in page["validation_images"]] == [4, 2]
        assert http(f"{url}/files/r1/{page['validation_images'][0]['grid']}")[0] == 200
        assert [c["name"] for c in page["checkpoints"]] == ["checkpoint-2", "checkpoint-4", "best"]
        assert page["checkpoints"][0]["validation_loss"] == page["validation_curve"][0][1]
        assert page["weights"] == ["result", "best", "checkpoint-4", "checkpoint-2"]

        tried = {"prompt": "a red circle", "steps": "2", "seed": "3", "sampler": "", "guidance_scale": "7.5",
                 "columns": [{"run": "r1", "weights": "checkpoint-4"}, {"run": "r1"}, {"run": "r1", "base": True}]}  # fmt: skip
        status, answer = http(url + "/api/generate", tried)
        assert status == 200, answer
        images = [(root / c["image"]).read_bytes() for c in answer["columns"]]
        assert images[0] == images[1] != images[2]  # the last checkpoint is the result; the base differs
        assert (root / "r1" / "exports" / "checkpoint-4" / "pytorch_lora_weights.safetensors").is_file()
        assert [c["label"] for c in answer["columns"]] == ["r1 (checkpoint-4)", "r1 (result)", "r1 (base)"]
        status, answer = http(url + "/api/generate", {**tried, "steps": "0"})
        assert status == 400 and answer == {"error": "--steps must be at least 1, got 0", "field": "steps"}

        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setattr(hub, "get_token", lambda: None)  # no login on this machine
        status, answer = http(url + "/api/runs/r1/push", {"hub_model_id": "me/r1"})
        assert status == 400 and answer["error"].startswith("--push_to_hub needs a Hugging Face token")
        api = FakeHfApi()
        monkeypatch.setattr(hub, "HfApi", lambda: api)
        monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
        monkeypatch.setattr(hub, "get_token", lambda: FAKE_TOKEN)
        status, answer = http(url + "/api/runs/r1/push", {"hub_model_id": "me/r1", "private": True})
        assert status == 200 and answer == {"repo_id": "me/r1", "url": "https://huggingface.co/me/r1"}
        assert api.uploads == [("me/r1", FAKE_TOKEN)] and api.private == [True]
        assert FAKE_TOKEN not in json.dumps(answer) and FAKE_TOKEN not in config.read_text()


def test_a_trainer_an_earlier_app_started_is_seen_training_and_stopped(serve, http, app_data, tmp_path):
    root = tmp_path / "runs"
    with serve(root) as (url, _):
        assert http(url + "/api/runs", form("r1", app_data))[0] == 200
    config = root / "r1" / "config.yaml"
    # stands in for the trainer: a process whose command line names the run's config, as `train_command` does
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "--config", str(config)])
    (root / "r1" / "train.pid").write_text(str(process.pid))
    try:
        with serve(root) as (url, _):  # a new app: it did not start the process
            assert http(url + "/api/runs")[1][0]["status"] == "training"
            assert http(url + "/api/runs/r1/resume", {})[1]["error"] == "run r1 is already training"
            assert http(url + "/api/runs/r1/stop", {})[0] == 200
            assert process.wait(timeout=30) != 0  # SIGINT: KeyboardInterrupt in the sleeping process
            assert http(url + "/api/runs")[1][0]["status"] == "new"  # stopped before it wrote anything
    finally:
        process.kill()


class FakeHfApi:
    """Records the repository and token `push_to_hub` hands to `HfApi`."""

    def __init__(self):
        self.uploads, self.private = [], []

    def create_repo(self, repo_id, *, token=None, private=None, exist_ok=False):
        self.private.append(private)
        return type("Repo", (), {"repo_id": repo_id})()

    def upload_folder(self, *, repo_id, folder_path, token=None, **kw):
        self.uploads.append((repo_id, token))


def test_the_loop_writes_its_progress_for_a_watcher(app_data, tmp_path):
    out = tmp_path / "run"
    cfg = from_values(LoraTrainConfig, dict(pretrained_model_name_or_path=BASE, train_data_dir=str(app_data),
                                            output_dir=str(out), resolution=64, train_batch_size=4,
                                            max_train_steps=3, report_to="none"))  # fmt: skip
    result = train(cfg, LORA)
    progress = json.loads((out / "progress.json").read_text())
    assert progress == {"step": 3, "max_steps": 3, "loss": result.losses[-1], "seconds_left": 0.0}
    assert to_dict(cfg)["max_train_steps"] == 3 and not list(out.glob(".*.tmp"))
