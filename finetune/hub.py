"""Uploading a finished result to the Hugging Face Hub: the adapter or pipeline, its model card and sample grid.

Uses `huggingface_hub.HfApi` (`create_repo`, `upload_folder`). The repository is created (or found) before
training starts, as diffusers' example scripts do, so that an unreachable Hub, a bad repository id or a token that
may not write stops the run before any model loads rather than after hours of training; a push that still fails
after training says where the result is and the command that uploads it later. Only the result goes up: an allow-list of its
files, with checkpoints, caches, logs and temporary folders also excluded by pattern (diffusers' example
scripts miss `checkpoint-*`). The token comes from `--hub_token` or the cached login (`hf auth login`,
`HF_TOKEN`); it is handed to `HfApi` only, never printed, logged or written to a file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HTTPError

from difftune.core.config import PASSIVE, option
from difftune.core.errors import UserError

logger = logging.getLogger(__name__)

IGNORE_PATTERNS = ["checkpoint-*", "**/checkpoint-*", ".cache", ".cache/", "**/.cache/", "logs", "logs/", "*.tmp",
                   "*.tmp/", "validation/"]  # fmt: skip


@dataclass
class HubConfig:
    """Uploading the result to the Hugging Face Hub."""

    push_to_hub: bool = option("Upload the final result to the Hugging Face Hub.", default=False, resume=PASSIVE,
                               card=False)  # fmt: skip
    hub_model_id: str | None = option("Hub repository id; default: the output folder's name.", default=None,
                                      resume=PASSIVE, card=False)  # fmt: skip
    hub_token: str | None = option("Hub token; default: the cached login. Never logged or saved.", default=None,
                                   resume=PASSIVE, card=False, secret=True)  # fmt: skip
    hub_private: bool = option("Create the Hub repository as private.", default=False, resume=PASSIVE, card=False)

    def validate(self) -> None:
        if self.push_to_hub:
            resolve_token(self)


def resolve_token(cfg: HubConfig) -> str:
    """--hub_token, else the cached login; a UserError saying how to log in when there is neither."""
    token = cfg.hub_token or get_token()
    if not token:
        raise UserError(
            "--push_to_hub needs a Hugging Face token: run `hf auth login`, set HF_TOKEN or pass --hub_token"
        )
    return token


def prepare_repo(cfg: HubConfig, output_dir: Path, api: HfApi | None = None) -> str:
    """Creates (or finds) the repository before training; returns its id. One line when the Hub cannot be reached
    or the token may not create or write it."""
    token = resolve_token(cfg)
    name = repo_name(Path(output_dir), cfg)
    try:
        repo_id = (api or HfApi()).create_repo(name, token=token, private=cfg.hub_private, exist_ok=True).repo_id
    except (OSError, ValueError, HTTPError) as err:  # network, offline mode, HTTP status, invalid repo id
        raise UserError(
            f"--push_to_hub: cannot create or reach the Hub repository {name!r} ({_one_line(err, token)}); nothing "
            "was trained. Check the network, --hub_model_id and that the token may write, or drop --push_to_hub"
        ) from None
    logger.info("results will be pushed to https://huggingface.co/%s", repo_id)
    return repo_id


def repo_name(output_dir: Path, cfg: HubConfig) -> str:
    """--hub_model_id, else the output folder's name (the Hub puts it under the token's user). The model card's
    usage snippet names the result this way until the Hub gives its repository id."""
    return cfg.hub_model_id or Path(output_dir).resolve().name


def result_patterns(output_dir: Path) -> list[str]:
    """The files that make up the result: a pipeline folder's components, or the LoRA files; card and samples."""
    from difftune.finetune.export import CARD_FILE, KOHYA_FILE, LORA_FILE, SAMPLES_FILE
    from difftune.pipelines.loading import peft_folders

    output_dir = Path(output_dir)
    index = output_dir / "model_index.json"
    if index.exists():
        components = [k for k, v in json.loads(index.read_text()).items()
                      if not k.startswith("_") and isinstance(v, list) and v[0] is not None]  # fmt: skip
        weights = ["model_index.json", *(f"{name}/" for name in components)]
    elif (output_dir / LORA_FILE).exists():
        weights = [LORA_FILE, KOHYA_FILE]
    elif peft_folders(str(output_dir)):  # LoHa/LoKr: peft's layout, one folder per component
        weights = [f"{name}/" for name in peft_folders(str(output_dir))]
    else:
        raise UserError(f"--push_to_hub: {output_dir} holds no result ({LORA_FILE} or model_index.json)")
    return [*weights, CARD_FILE, SAMPLES_FILE]


def _one_line(err: Exception, token: str) -> str:
    text = (str(err).strip().splitlines() or [""])[0].replace(token, "***")
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


def upload_command(repo_id: str, output_dir: Path, allow: list[str]) -> str:
    """The `hf upload` command that sends the result later: the same files `push_to_hub` sends."""
    includes = " ".join(f"--include '{p}'" for p in allow)
    return f"hf upload {repo_id} {output_dir} . {includes}"


def push_to_hub(output_dir: Path, cfg: HubConfig, api: HfApi | None = None, repo_id: str | None = None) -> str:
    """Uploads the result into `repo_id` (created first when not given); returns the repository id."""
    from difftune.finetune.export import CARD_FILE

    output_dir = Path(output_dir)
    token = resolve_token(cfg)
    allow = result_patterns(output_dir)
    api = api or HfApi()
    name = repo_id or repo_name(output_dir, cfg)
    try:
        if repo_id is None:
            repo_id = api.create_repo(name, token=token, private=cfg.hub_private, exist_ok=True).repo_id
        card = output_dir / CARD_FILE
        local_ref = repo_name(output_dir, cfg)
        if card.exists() and local_ref != repo_id:  # point the usage snippet at the repository
            card.write_text(card.read_text().replace(f'"{local_ref}"', f'"{repo_id}"'))
        api.upload_folder(
            repo_id=repo_id, folder_path=output_dir, allow_patterns=allow, ignore_patterns=IGNORE_PATTERNS,
            token=token, commit_message="Upload difftune result",
        )  # fmt: skip
    except (OSError, ValueError, HTTPError) as err:  # network, offline mode, HTTP status, invalid repo id
        raise UserError(
            f"--push_to_hub: could not upload to {name!r} ({_one_line(err, token)}); the result is saved in "
            f"{output_dir}: check the network, --hub_model_id and that the token may write, then upload it with "
            f"`{upload_command(repo_id or name, output_dir, allow)}`"
        ) from None
    logger.info("uploaded %s to https://huggingface.co/%s", output_dir, repo_id)
    return repo_id
