"""`difftune-ui`: a local web app to set up, start, watch and compare LoRA training runs, and try and push results.

    difftune-ui --output_root outputs/ui        # then open http://127.0.0.1:7860/

Bound to 127.0.0.1 by default. Bound to any other address, every request needs a token: `DIFFTUNE_UI_TOKEN`, or
one generated at start and printed in the address to open. The app (`app.server`) needs the `ui` extra
(`pip install "difftune[ui]"`: FastAPI and uvicorn).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from difftune.core.config import option, parse
from difftune.core.errors import UserError, command
from difftune.core.paths import check_output_dir

PROG = "difftune-ui"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
TOKEN_ENV = "DIFFTUNE_UI_TOKEN"


@dataclass
class UiConfig:
    """`difftune-ui`: where it listens and where its runs live."""

    host: str = option(f"Address to listen on; any but {', '.join(LOCAL_HOSTS)} requires a token.", "127.0.0.1")
    port: int = option("Port to listen on.", 7860)
    output_root: str = option("Folder of the runs, one sub-folder each.", "outputs/ui")

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port {self.port} must be within 0..65535")
        check_output_dir(self.output_root, "--output_root")


def address(cfg: UiConfig, token: str | None) -> str:
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    return f"http://{host}:{cfg.port}/" + (f"?token={token}" if token else "")


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse(UiConfig, argv, __doc__.split("\n\n")[0], prog=PROG)
    try:
        import uvicorn

        from difftune.app.server import create_app
    except ImportError as err:
        raise UserError(f'{PROG} needs the ui extra ({err.name} is missing): pip install "difftune[ui]"') from None
    token = shown = None
    if cfg.host not in LOCAL_HOSTS:  # a token the user set is theirs to keep: only a generated one is printed
        token = os.environ.get(TOKEN_ENV)
        shown = f"${TOKEN_ENV}" if token else None
        token = token or secrets.token_urlsafe(16)
    root = Path(cfg.output_root)
    root.mkdir(parents=True, exist_ok=True)
    print(f"{PROG}: runs in {root.resolve()}; open {address(cfg, shown or token)}", flush=True)
    uvicorn.run(create_app(root, token), host=cfg.host, port=cfg.port, log_level="warning")


def cli() -> None:
    """The `difftune-ui` command."""
    command(main)


if __name__ == "__main__":
    cli()
