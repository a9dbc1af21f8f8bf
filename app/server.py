"""The web app's server (`difftune-ui`, `app.ui`): one page and the JSON routes behind it.

One page (`app/static/index.html`) over a small JSON API. The app has no training or data logic of its own: a
run's config is checked by the command line's loader, a run is the command line's trainer in a subprocess
(`app.runs`), generation is `difftune-generate`'s `main`, a push is `finetune.hub.push_to_hub` (`app.forms`).

Why FastAPI with one static page rather than gradio: the page needs a form whose errors sit beside their fields,
a table that refreshes, a curve and image grids; that is ~300 lines of plain HTML and JavaScript over a dozen JSON
routes, with FastAPI + uvicorn (a few pure-Python packages) as the only dependencies, whereas gradio brings a large
dependency tree and its own component model, layout and event queue for the same screens, and is harder to drive
from a browser test (generated element ids, a websocket queue).
"""

from __future__ import annotations

import secrets
import shlex
import tempfile
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import Body, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse

from difftune.app import forms
from difftune.app.runs import (
    CONFIG,
    Curves,
    Runs,
    check_name,
    checkpoints,
    log_tail,
    settings,
    shown_command,
    thinned,
    validation_images,
    write_config,
)
from difftune.core.errors import UserError
from difftune.core.paths import embedded_base

PAGE = Path(__file__).parent / "static" / "index.html"
Form = Annotated[dict, Body()]  # a JSON object of the page's form fields
TRIES = ".tries"  # <output_root>/.tries/<time>-<id>/<column>/: the images "try it" generated
generating = threading.Lock()


def failure(err: UserError, status: int = 400, extra_keys=()) -> JSONResponse:
    message = str(err)
    return JSONResponse({"error": message, "field": forms.field_of(message, extra_keys)}, status_code=status)


def create_app(output_root: Path, token: str | None = None, env: dict[str, str] | None = None) -> FastAPI:
    """The app over the runs in `output_root`; `token`: required on every request when given; `env`: the training
    processes' environment (default: this one's)."""
    root = Path(output_root).resolve()
    runs, curves = Runs(root, env), Curves()

    @asynccontextmanager
    async def lifespan(app):
        yield
        runs.stop_all()  # the app's training processes stop as Ctrl+C would stop them, checkpoints kept

    app = FastAPI(title="difftune-ui", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runs = runs

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        given = request.headers.get("x-token") or request.query_params.get("token") or ""
        if token and not secrets.compare_digest(given, token):
            return JSONResponse({"error": "a token is required: open the address difftune-ui printed"}, 401)
        return await call_next(request)

    @app.exception_handler(UserError)
    async def user_error(request: Request, err: UserError):
        return failure(err)

    @app.get("/")
    def page():
        return FileResponse(PAGE)

    @app.get("/api/options")
    def options():
        from difftune.pipelines.samplers import sampler_names

        return {"fields": forms.form_fields(), "presets": forms.presets(), "samplers": sampler_names(),
                "bases": [str(p) for p in map(embedded_base, ("tiny_shapes", "tiny_flow_shapes")) if p.is_dir()],
                "root": str(root)}  # fmt: skip

    @app.post("/api/data")
    def data(form: Form):
        return forms.check_data(form.get("train_data_dir") or None)

    @app.post("/api/config")
    def check_config(form: Form):
        return configured(form, create=False)

    @app.post("/api/runs")
    def create_run(form: Form):
        return configured(form, create=True)

    def configured(form: dict, create: bool):
        extra_keys = ()
        try:
            folder = check_name(form.get("name") or "", root)
            extra_keys = tuple(forms.yaml_keys(form.get("extra")))
            cfg, values = forms.training_config(form, folder)
        except UserError as err:
            return failure(err, extra_keys=extra_keys)
        text = forms.as_yaml(values)
        if create:
            write_config(folder, text, form.get("preset") or None)
        return {"name": folder.name, "yaml": text, "command": shown_command(folder)}

    @app.post("/api/plan")
    def plan(form: Form):
        """The memory planner's prediction for the form's run (seconds for a large model: asked for apart)."""
        extra_keys = ()
        try:
            extra_keys = tuple(forms.yaml_keys(form.get("extra")))
            cfg, _ = forms.training_config(form, root / "planned")
            return {"memory": forms.memory_prediction(cfg)}
        except UserError as err:
            return failure(err, extra_keys=extra_keys)

    @app.get("/api/runs")
    def list_runs():
        return [runs.summary(name, curves.read(root / name)) for name in runs.names()]

    @app.get("/api/runs/{name}")
    def run_page(name: str):
        folder = runs.folder(name)
        scalars = curves.read(folder)
        validation = scalars.get("validation/loss", [])
        return {**runs.summary(name, scalars), "loss_curve": thinned(scalars.get("train/loss", [])),
                "validation_curve": validation, "validation_images": validation_images(folder),
                "checkpoints": checkpoints(folder, validation), "log": log_tail(folder),
                "yaml": (folder / CONFIG).read_text(), "command": shown_command(folder)}  # fmt: skip

    @app.post("/api/runs/{name}/{action}")
    def act(name: str, action: str, form: Annotated[dict | None, Body()] = None):
        if action == "start":
            runs.start(name)
        elif action == "resume":
            runs.start(name, resume=True)
        elif action == "stop":
            runs.stop(name)
        elif action == "push":
            form = form or {}
            repo = forms.push(runs.folder(name), form.get("hub_model_id"), bool(form.get("private")))
            return {"repo_id": repo, "url": f"https://huggingface.co/{repo}"}
        else:
            return JSONResponse({"error": f"unknown action {action!r}"}, 404)
        return runs.summary(name, curves.read(root / name))

    @app.post("/api/generate")
    def try_it(form: Form):
        """One image per column (a run's result or checkpoint, or the base of a run), all with the same flags."""
        with generating:  # one at a time: each column loads a whole pipeline
            (root / TRIES).mkdir(parents=True, exist_ok=True)
            out = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=root / TRIES))
            return {"columns": [try_column(column, form, out / str(n))
                                for n, column in enumerate(form.get("columns") or [])]}  # fmt: skip

    def try_column(column: dict, form: dict, out: Path) -> dict:
        run, weights = column.get("run") or "", column.get("weights") or "result"
        argv = ["--model", settings(runs.folder(run))["pretrained_model_name_or_path"]]
        argv += [] if column.get("base") else ["--lora", str(runs.lora(run, weights))]
        argv += forms.generate_flags(form) + ["--output_dir", str(out)]
        record = forms.generate(argv)
        return {"label": f"{run} ({'base' if column.get('base') else weights})",
                "image": (out / record["images"][0]["file"]).relative_to(root).as_posix(),
                "command": shlex.join(["difftune-generate", *argv])}  # fmt: skip

    @app.get("/files/{path:path}")
    def files(path: str):
        file = (root / path).resolve()
        if not file.is_relative_to(root) or not file.is_file():
            return JSONResponse({"error": "not found"}, 404)
        return FileResponse(file)

    return app
