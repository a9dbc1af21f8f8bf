"""Hub upload with a stand-in for `HfApi`: exactly the result is uploaded, the token is never written or logged."""

import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import constants
from huggingface_hub.utils import filter_repo_objects
from PIL import Image

from difftune.core.config import compose
from difftune.core.errors import UserError, run_main
from difftune.finetune import hub
from difftune.finetune.config import FullTrainConfig, LoraTrainConfig
from difftune.finetune.export import CARD_FILE, KOHYA_FILE, LORA_FILE, SAMPLES_FILE, write_model_card
from difftune.finetune.loop import train
from difftune.finetune.tasks import LORA
from difftune.pipelines.families import StableDiffusion1

FAKE_TOKEN = "hf_FAKEtokenDoNotLeak0123456789"


class FakeHfApi:
    """Records what `HfApi` would be asked; lists the files `upload_folder` would send, with the Hub's own filter."""

    def __init__(self):
        self.created, self.uploads = [], []

    def create_repo(self, repo_id, *, token=None, private=None, exist_ok=False):
        self.created.append(dict(repo_id=repo_id, token=token, private=private, exist_ok=exist_ok))
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"someone/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, token=None, **kw):
        files = sorted(p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file())
        sent = set(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        self.uploads.append(dict(repo_id=repo_id, files=sent, token=token))


def every_file_bytes(folder: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in folder.rglob("*") if p.is_file()]


def test_lora_run_uploads_only_the_result_and_never_writes_or_logs_the_token(
    tiny_sd1, shapes_dir, tmp_path, monkeypatch, caplog, capsys
):
    api = FakeHfApi()
    monkeypatch.setattr(hub, "HfApi", lambda: api)
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "my-lora"
    out.mkdir()
    (out / "notes.txt").write_text("not part of the result")
    cfg = compose(LoraTrainConfig, dict(
        pretrained_model_name_or_path=str(tiny_sd1), train_data_dir=str(shapes_dir), output_dir=str(out),
        resolution=32, center_crop=True, train_batch_size=4, max_train_steps=2, checkpointing_steps=1, seed=0,
        rank=4, lora_alpha=8, validation_prompt=["a red circle"], validation_steps=2, num_validation_images=1,
        validation_inference_steps=2, output_kohya_format=True, push_to_hub=True, hub_token=FAKE_TOKEN,
    ))  # fmt: skip
    train(cfg, LORA)

    assert [c["repo_id"] for c in api.created] == ["my-lora"]  # default: the output folder's name
    assert api.created[0]["exist_ok"] and api.created[0]["private"] is False
    (upload,) = api.uploads
    assert upload["repo_id"] == "someone/my-lora" and upload["token"] == FAKE_TOKEN
    assert upload["files"] == {LORA_FILE, KOHYA_FILE, CARD_FILE, SAMPLES_FILE}
    present = {p.relative_to(out).parts[0] for p in out.rglob("*") if p.is_file()}
    assert {"checkpoint-1", "checkpoint-2", ".cache", "logs", "validation", "notes.txt"} <= present
    assert 'load_lora_weights("someone/my-lora")' in (out / CARD_FILE).read_text()

    leaks = [str(p) for p, data in every_file_bytes(out) if FAKE_TOKEN.encode() in data]
    assert leaks == []
    captured = capsys.readouterr()
    assert caplog.text and FAKE_TOKEN not in caplog.text
    assert FAKE_TOKEN not in captured.out + captured.err


def test_pipeline_folder_upload_list_and_hub_flags(tiny_sd1, tmp_path):
    out = tmp_path / "full-run"
    shutil.copytree(tiny_sd1, out)
    pipeline_files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    junk = ["checkpoint-3/trainable.safetensors", "checkpoint-4.tmp/state.json", ".cache/latents/0.safetensors",
            "logs/difftune/events.out.tfevents.1", "unet/checkpoint-9/x.bin", "unet/weights.tmp", "notes.txt"]  # fmt: skip
    for name in junk:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")
    (out / "validation" / "step-3").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(out / "validation" / "step-3" / "grid.png")
    cfg = compose(
        FullTrainConfig,
        dict(
            pretrained_model_name_or_path="base",
            output_dir=str(out),
            hub_model_id="org/sd-shapes",
            hub_private=True,
            hub_token=FAKE_TOKEN,
        ),
    )
    write_model_card(out, cfg, "full", StableDiffusion1)
    api = FakeHfApi()

    assert hub.push_to_hub(out, cfg.hub, api=api) == "org/sd-shapes"
    assert api.created[0]["repo_id"] == "org/sd-shapes" and api.created[0]["private"] is True
    assert api.uploads[0]["files"] == pipeline_files | {CARD_FILE, SAMPLES_FILE}
    assert 'from_pretrained("org/sd-shapes")' in (out / CARD_FILE).read_text()


def test_no_token_is_one_clear_line_and_nothing_is_contacted(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    (tmp_path / LORA_FILE).write_bytes(b"")
    api = FakeHfApi()
    with pytest.raises(SystemExit) as exit_:
        run_main(
            lambda argv: hub.push_to_hub(
                tmp_path,
                compose(FullTrainConfig, dict(pretrained_model_name_or_path="base", output_dir=str(tmp_path))).hub,
                api=api,
            )
        )
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --push_to_hub needs a Hugging Face token") and err.count("\n") == 1
    assert api.created == [] and api.uploads == []


def test_no_network_is_one_clear_line_without_the_token(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the real HfApi, refused before any request
    (tmp_path / LORA_FILE).write_bytes(b"")
    cfg = compose(
        FullTrainConfig,
        dict(
            pretrained_model_name_or_path="base",
            output_dir=str(tmp_path),
            hub_model_id="someone/x",
            hub_token=FAKE_TOKEN,
        ),
    )
    with pytest.raises(UserError) as err:
        hub.push_to_hub(tmp_path, cfg.hub)
    message = str(err.value)
    assert "could not upload to 'someone/x'" in message and "network" in message
    assert "\n" not in message and FAKE_TOKEN not in message


def test_folder_without_a_result_is_refused(tmp_path):
    cfg = compose(
        FullTrainConfig, dict(pretrained_model_name_or_path="base", output_dir=str(tmp_path), hub_token=FAKE_TOKEN)
    )
    with pytest.raises(UserError, match="holds no result"):
        hub.push_to_hub(tmp_path, cfg.hub, api=FakeHfApi())
