"""`cascade serve`: a local web studio over one model bundle.

The page generates, varies, redraws (img2img), interpolates, edits by text differences and inpaints,
with a live progress bar per stage, a queue that runs one job at a time, and a gallery whose PNGs carry
the CLI's text chunks. `jobs` is the queue, `gallery` the images in memory, `uploads` the checks on what
a page sends, `forms` the checks on a job request, `studio` ties them to a loaded cascade and `app` is
the HTTP face (Starlette, served by uvicorn; the page is plain HTML and JS in `static/`). Why not
gradio: docs/serve.md.
"""
from __future__ import annotations

import argparse
import signal
import socket
import sys
import textwrap
from pathlib import Path

from cascade.errors import UserError

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="a local web studio: generate and edit in the browser",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill("Start a web page for a model bundle: generate (prompt, negative prompt, seed or "
                    "'random', number of images, per-stage steps and guidance, sampler, last stage), vary, "
                    "img2img, interpolate, text diffs and inpainting (a mask drawn on the image), with a "
                    "progress bar per stage, a queue (one job at a time; the others show their place), cancel, "
                    "and a gallery whose downloads are PNGs with the same text chunks as `cascade generate` "
                    "writes. It listens on 127.0.0.1 only unless --host says otherwise; Ctrl-C stops it.", 100),
        epilog="example:\n  cascade serve --model bundles/quick-imagen   # then open http://127.0.0.1:7860\n"
               "  cascade serve --model bundles/tiny --port 8000 --device cuda   # unCLIP: vary, interpolate, textdiff")
    p.add_argument("--model", default=None,
                   help="model bundle directory (default: $CASCADE_MODEL if set, else the bundle the demo built: "
                        "bundles/tiny-imagen, tiny, quick-imagen or quick, the first found)")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help="address to listen on (default: %(default)s, this machine only; 0.0.0.0 lets every "
                        "machine that can reach this one use the studio and its CPU)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s; 0 picks a free one)")
    p.add_argument("--device", default="auto", metavar="DEVICE",
                   help="auto, cpu, cuda or cuda:N (default: auto, the first GPU if there is one, else the CPU)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="the diffusion stages' weights (default: auto, bfloat16 on a GPU that has it, else float32)")
    p.add_argument("--eval", default=None, metavar="EVAL_MD",
                   help="an evaluation summary to show on the page (default: BUNDLE/eval.md if it exists; "
                        "`cascade eval --out DIR` writes DIR/eval.md)")
    p.add_argument("--max-queued", type=int, default=16,
                   help="jobs that may wait behind the running one (default: %(default)s)")
    p.add_argument("--max-upload-mb", type=float, default=16,
                   help="largest upload in MB (default: %(default)s); images are also limited to 4096x4096 pixels")
    p.set_defaults(func=cmd_serve)


def _listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket, so that a taken port is a one-line error before the model loads."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: must be between 0 and 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise UserError(f"--host {host}: not an address of this machine ({err.strerror})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror}); pass another --port") from None
    sock.listen(64)
    return sock


def server(app, on_exit=None):
    """A uvicorn server for `app` (run it with `.run(sockets=[sock])`; `.should_exit` or a signal stops it).
    `on_exit()` runs when a signal asks it to stop, before it waits for open connections: the studio ends
    its event streams there, which would otherwise hold the shutdown until its timeout."""
    import uvicorn

    class Server(uvicorn.Server):
        interrupted = False  # a Ctrl-C stopped it (uvicorn's re-raised SIGINT can be lost in asyncio's runner)

        def handle_exit(self, sig, frame):
            self.interrupted = self.interrupted or sig == signal.SIGINT
            if on_exit is not None:
                on_exit()
            super().handle_exit(sig, frame)

    return Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))


def cmd_serve(args) -> int:
    from importlib.util import find_spec

    from cascade.cli import resolve_model

    if find_spec("starlette") is None or find_spec("uvicorn") is None:
        raise UserError("cascade serve needs starlette and uvicorn: pip install -e '.[serve]' (make install "
                        "installs them)") from None
    if args.max_queued < 1 or args.max_upload_mb <= 0:
        raise UserError("--max-queued must be at least 1 and --max-upload-mb above 0")
    resolve_model(args)
    eval_path = Path(args.eval) if args.eval else Path(args.model) / "eval.md"
    if args.eval and not eval_path.is_file():
        raise UserError(f"--eval {eval_path}: no such file")
    sock = _listen(args.host, args.port)

    from cascade.devices import resolve_device, resolve_dtype
    from cascade.pipeline import Cascade
    from cascade.serve.app import create_app
    from cascade.serve.studio import Studio

    device = resolve_device(args.device)
    cascade = Cascade.from_bundle(args.model, device=device, dtype=resolve_dtype(args.dtype, device))
    studio = Studio(cascade, str(args.model), eval_text=eval_path.read_text() if eval_path.is_file() else None,
                    max_queued=args.max_queued, max_upload_bytes=int(args.max_upload_mb * 2**20)).start()
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"cascade serve: {args.model} on {device}; open http://{shown}:{port}/ (Ctrl-C stops)",
          file=sys.stderr, flush=True)
    running = server(create_app(studio), on_exit=studio.closing.set)
    try:
        running.run(sockets=[sock])
    finally:
        studio.stop()
    if running.interrupted:
        raise KeyboardInterrupt  # exit 130 with one line, whether or not asyncio raised it already
    return 0
