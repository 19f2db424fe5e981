"""`cascade serve` through its HTTP API, on the small untrained bundle: every endpoint, the jobs' images
against the pipeline's own, the text chunks, the queue's places, cancel, a closed page, bad requests and
bad uploads (each a one-line JSON error, after which the server still answers). The page itself is driven
in Chromium by test_serve_browser.py."""
from __future__ import annotations

import http.client
import json
import threading
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from PIL import Image

from bundle_helpers import CONFIG_STEPS
from cascade.images import from_pil, to_pil
from cascade.pipeline import Settings
from serve_helpers import call, call_json, open_png, png, running, wait_for_job

PROMPT = "a red circle at the top left"


def studio_for(cascade, bundle, **options):
    from cascade.serve.studio import Studio

    return Studio(cascade, str(bundle), **options)


@pytest.fixture
def base(cascade, bundle):
    with running(studio_for(cascade, bundle, eval_text="# eval\n| stage | metric |\n")) as url:
        yield url


class Gated:
    """The cascade, but each job waits for `gate` after its first progress report, so a test can hold one
    job running while it looks at the queue behind it."""

    def __init__(self, cascade):
        self._cascade = cascade
        self.gate = threading.Event()

    def __getattr__(self, name):
        return getattr(self._cascade, name)

    def generate(self, prompts, *, progress, **options):
        progress("prior", 0, 1)
        assert self.gate.wait(30), "the test never opened the gate"
        return self._cascade.generate(prompts, progress=progress, **options)


def submit(base, **body):
    body = {"kind": "generate", "prompt": PROMPT, "until": "decoder", "num_images": 1, "seed": 0, **body}
    return call_json(f"{base}/api/jobs", body=body)


def upload(base, image: Image.Image, name="in.png", kind="image"):
    return call_json(f"{base}/api/uploads?name={name}&kind={kind}", body=png(image), content_type="image/png")


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(open_png(data).convert("RGB"))


def expected(tensor: torch.Tensor) -> np.ndarray:
    return np.asarray(to_pil(tensor))


def fetch_image(base, item_id) -> bytes:
    status, headers, data = call(f"{base}/api/images/{item_id}.png")
    assert status == 200 and headers["content-type"] == "image/png"
    return data


# ---------------------------------------------------------------- the page and what it is told
def test_the_page_and_its_assets_come_from_the_server_only(base):
    status, headers, html = call(f"{base}/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"cascade studio" in html and b'src="/static/studio.js"' in html
    for asset in ("studio.js", "studio.css"):
        status, _, body = call(f"{base}/static/{asset}")
        assert status == 200 and len(body) > 1000
        assert b"http://" not in body and b"https://" not in body, f"{asset} loads something from elsewhere"
    assert b"http://" not in html and b"https://" not in html


def test_info_names_the_bundle_the_stages_their_defaults_and_eval(base, bundle):
    status, info = call_json(f"{base}/api/info")
    assert status == 200
    assert info["model"] == str(bundle) and info["device"] == "cpu"
    assert list(info["stages"]) == ["prior", "decoder", "sr256", "sr1024"]
    assert {name: s["steps"] for name, s in info["stages"].items()} == CONFIG_STEPS
    assert info["image_stages"] == ["decoder", "sr256", "sr1024"]
    assert info["stages"]["decoder"]["size"] == 64 and info["stages"]["sr256"]["size"] == 256
    assert "ddim" in info["samplers"] and info["eval"].startswith("# eval")
    assert info["inpaint"] == "replace"  # the small bundle's decoder was not trained for inpainting
    assert info["text_only"] is False  # unCLIP: the page hides per-object guidance
    assert info["embedding_jobs"] == ["vary", "interpolate", "textdiff"]  # the tabs an Imagen-style bundle disables


# ---------------------------------------------------------------- jobs and their images
def test_generate_makes_the_pipelines_images_with_the_clis_text_chunks(base, cascade, bundle):
    status, job = submit(base, num_images=2, seed=5, steps={"decoder": 3}, guidance={"decoder": 2.5})
    assert status == 202 and job["state"] in ("queued", "running") and job["stages"] == ["prior", "decoder"]
    job = wait_for_job(base, job["id"])
    assert job["state"] == "done" and len(job["images"]) == 2
    assert job["progress"] == {"prior": [2, 2], "decoder": [3, 3]}  # the config's prior steps, the asked decoder's
    settings = Settings(steps={"decoder": 3}, guidance={"decoder": 2.5})
    want = cascade.generate([PROMPT] * 2, seed=5, until="decoder", settings=settings).final
    for i, item_id in enumerate(job["images"]):
        data = fetch_image(base, item_id)
        assert np.array_equal(pixels(data), expected(want[i]))
        text = open_png(data).text
        assert text == {"prompt": PROMPT, "seed": "5", "until": "decoder", "model": str(bundle),
                        "steps": json.dumps({"prior": 2, "decoder": 3}),
                        "guidance": json.dumps({"prior": 4.0, "decoder": 2.5}), "sampler": "ddim", "index": str(i)}
    status, headers, _ = call(f"{base}/api/images/{job['images'][1]}.png?download=1")
    assert headers["content-disposition"] == 'attachment; filename="a-red-circle-at-the-top-left-s5-01.png"'
    status, listing = call_json(f"{base}/api/images")
    assert [i["id"] for i in listing["images"]] == job["images"][::-1]  # newest first
    assert listing["images"][0]["text"]["seed"] == "5" and listing["images"][0]["kind"] == "result"


def test_a_random_seed_is_drawn_and_recorded(base):
    seeds = []
    for _ in range(2):
        _, job = submit(base, seed="random")
        job = wait_for_job(base, job["id"])
        seeds.append(int(open_png(fetch_image(base, job["images"][0])).text["seed"]))
        assert job["request"]["seed"] == str(seeds[-1])
    assert all(0 <= s < 2**32 for s in seeds) and seeds[0] != seeds[1]


def test_vary_img2img_interpolate_and_textdiff_run_on_uploads(base, cascade):
    from cascade.cli import INPUT_SIZE

    g = torch.Generator().manual_seed(0)
    a = to_pil(torch.rand(3, 64, 96, generator=g) * 2 - 1)  # not square: kept as its centre square
    status, item = upload(base, a, "scene.png")
    assert status == 201 and (item["width"], item["height"]) == (64, 64) and item["kind"] == "upload"
    square = to_pil(from_pil(a, 64))
    assert np.array_equal(pixels(fetch_image(base, item["id"])), np.asarray(square))
    _, b = upload(base, to_pil(torch.rand(3, 64, 64, generator=g) * 2 - 1), "other.png")

    _, job = call_json(f"{base}/api/jobs", body={"kind": "vary", "image": item["id"], "num_images": 2, "seed": 1,
                                                 "until": "decoder"})
    job = wait_for_job(base, job["id"])
    want = cascade.vary(from_pil(square, INPUT_SIZE), num_images=2, seed=1, until="decoder").final
    assert np.array_equal(pixels(fetch_image(base, job["images"][1])), expected(want[1]))
    assert open_png(fetch_image(base, job["images"][0])).text["source"] == "scene.png"

    _, job = submit(base, kind="img2img", image=item["id"], strength=0.5, seed=2)
    job = wait_for_job(base, job["id"])
    want = cascade.img2img(from_pil(square, 64), PROMPT, strength=0.5, seed=2, until="decoder").final
    data = fetch_image(base, job["images"][0])
    assert np.array_equal(pixels(data), expected(want[0])) and open_png(data).text["strength"] == "0.5"

    _, job = call_json(f"{base}/api/jobs", body={"kind": "interpolate", "image": item["id"], "image_b": b["id"],
                                                 "frames": 3, "seed": 3, "until": "decoder"})
    job = wait_for_job(base, job["id"])
    assert job["state"] == "done" and len(job["images"]) == 3 and job["labels"] == ["t=0.00", "t=0.50", "t=1.00"]
    frames = [pixels(fetch_image(base, i)) for i in job["images"]]
    strip = open_png(fetch_image(base, job["animation"]))
    there_and_back = [frames[i] for i in (0, 1, 2, 1)]  # an APNG merges a frame equal to the one before it
    want = [f for i, f in enumerate(there_and_back) if i == 0 or not np.array_equal(f, there_and_back[i - 1])]
    assert strip.n_frames == len(want)
    for index, frame in enumerate(want):
        strip.seek(index)
        assert np.array_equal(np.asarray(strip.convert("RGB")), frame)

    _, job = call_json(f"{base}/api/jobs", body={"kind": "textdiff", "image": item["id"], "from": "a red circle",
                                                 "to": "a blue circle", "frames": 2, "max_theta": 0.4,
                                                 "until": "decoder"})
    job = wait_for_job(base, job["id"])
    text = open_png(fetch_image(base, job["images"][0])).text
    assert (text["from"], text["to"], text["source"]) == ("a red circle", "a blue circle", "scene.png")
    assert job["labels"] == ["theta=0.00", "theta=0.40"] and "animation" in job


def test_inpaint_keeps_the_image_outside_the_drawn_mask(base):
    g = torch.Generator().manual_seed(4)
    source = to_pil(torch.rand(3, 64, 64, generator=g) * 2 - 1)
    _, item = upload(base, source, "photo.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    status, drawn = upload(base, mask.convert("RGBA"), "mask.png", kind="mask")
    assert status == 201 and drawn["kind"] == "mask"
    status, job = call_json(f"{base}/api/jobs", body={"kind": "inpaint", "image": item["id"], "mask": drawn["id"],
                                                      "prompt": "a green star", "seed": 0, "until": "decoder"})
    assert status == 202, job
    job = wait_for_job(base, job["id"])
    assert job["state"] == "done", job["error"]
    out = pixels(fetch_image(base, job["images"][0]))
    keep = np.asarray(mask) == 0
    assert np.array_equal(out[keep], np.asarray(source)[keep])
    assert not np.array_equal(out[~keep], np.asarray(source)[~keep])
    assert drawn["id"] not in [i["id"] for i in call_json(f"{base}/api/images")[1]["images"]]  # masks are not listed


def test_inpaint_refuses_an_empty_mask_or_says_it_is_missing(base):
    _, item = upload(base, Image.new("RGB", (64, 64), (200, 10, 10)))
    _, empty = upload(base, Image.new("L", (64, 64), 0), "mask.png", kind="mask")
    status, body = call_json(f"{base}/api/jobs", body={"kind": "inpaint", "image": item["id"], "mask": empty["id"],
                                                       "prompt": "a green star", "until": "decoder"})
    assert status == 400
    assert "the mask is empty" in body["error"]
    # the CLI's bound (cascade.cli.MAX_RESAMPLE): 30 passes it and reaches the mask's check
    for resample, error in ((51, "resample 51: must be between 1 and 50"), (0, "resample 0: must be between"),
                            (30, "the mask is empty")):
        status, body = call_json(f"{base}/api/jobs", body={"kind": "inpaint", "image": item["id"], "mask": empty["id"],
                                                           "prompt": "a", "resample": resample, "until": "decoder"})
        assert status == 400 and error in body["error"], (resample, body)


# ---------------------------------------------------------------- one job at a time: places, cancel, a closed page
def test_the_queue_shows_places_and_cancel_stops_queued_and_running_jobs(cascade, bundle):
    gated = Gated(cascade)
    with running(studio_for(gated, bundle)) as base:
        _, first = submit(base, client="page1")
        wait_for_job(base, first["id"], states=("running",))
        _, second = submit(base, client="page1")
        status, third = submit(base, client="page2")
        assert (second["position"], third["position"]) == (1, 2) and third["state"] == "queued"
        status, mine = call_json(f"{base}/api/jobs?client=page2")
        assert [j["id"] for j in mine["jobs"]] == [third["id"]] and mine["waiting"] == 2
        assert mine["running"] == first["id"]

        status, cancelled = call_json(f"{base}/api/jobs/{second['id']}/cancel", body={})
        assert status == 200 and cancelled["state"] == "cancelled"
        assert call_json(f"{base}/api/jobs/{third['id']}")[1]["position"] == 1  # moved up

        status, asked = call_json(f"{base}/api/jobs/{first['id']}/cancel", body={})
        assert asked["state"] == "running"  # stops at its next sampling step
        gated.gate.set()
        first = wait_for_job(base, first["id"])
        assert first["state"] == "cancelled" and "images" not in first
        third = wait_for_job(base, third["id"])
        assert third["state"] == "done" and len(third["images"]) == 1
        assert call_json(f"{base}/api/jobs/{second['id']}")[1]["state"] == "cancelled"


def test_a_closed_page_cancels_its_jobs_and_the_stream_showed_their_places(cascade, bundle):
    gated = Gated(cascade)
    with running(studio_for(gated, bundle)) as base:
        _, other = submit(base, client="other")
        wait_for_job(base, other["id"], states=("running",))
        queued = [submit(base, client="closing")[1] for _ in range(2)]
        host = urlparse(base)
        conn = http.client.HTTPConnection(host.hostname, host.port, timeout=10)
        conn.request("GET", "/api/events?client=closing")
        response = conn.getresponse()
        assert response.status == 200 and response.headers["content-type"].startswith("text/event-stream")
        line = response.readline().decode()
        assert line.startswith("data: ")
        snapshot = json.loads(line[len("data: "):])
        assert [(j["id"], j["position"]) for j in snapshot["jobs"]] == [(queued[0]["id"], 1), (queued[1]["id"], 2)]
        conn.close()  # the page is gone
        for job in queued:
            assert wait_for_job(base, job["id"], timeout=10)["state"] == "cancelled"
        gated.gate.set()
        assert wait_for_job(base, other["id"])["state"] == "done"  # another page's job runs on


def test_events_stream_each_stages_progress_until_done(base):
    host = urlparse(base)
    conn = http.client.HTTPConnection(host.hostname, host.port, timeout=30)
    conn.request("GET", "/api/events?client=watcher")
    response = conn.getresponse()
    _, job = submit(base, client="watcher", steps={"decoder": 60})
    seen = []
    while True:
        line = response.readline().decode()
        if not line.startswith("data: "):
            continue
        jobs = json.loads(line[len("data: "):])["jobs"]
        if jobs:
            seen.append(jobs[0])
            if jobs[0]["state"] in ("done", "failed", "cancelled"):
                break
    conn.close()
    assert seen[-1]["state"] == "done" and seen[-1]["progress"] == {"prior": [2, 2], "decoder": [60, 60]}
    decoder = [j["progress"]["decoder"][0] for j in seen if j["state"] == "running"]
    assert any(0 < done < 60 for done in decoder), decoder  # the bar moved while it ran
    assert decoder == sorted(decoder)


def test_a_full_queue_refuses_with_429(cascade, bundle):
    gated = Gated(cascade)
    with running(studio_for(gated, bundle, max_queued=1)) as base:
        _, first = submit(base)
        wait_for_job(base, first["id"], states=("running",))
        assert submit(base)[0] == 202
        status, body = submit(base)
        assert status == 429 and "the queue is full (1 jobs waiting)" in body["error"]
        gated.gate.set()


# ---------------------------------------------------------------- bad input: one line, and the server runs on
BAD_JOBS = [
    ({"kind": "paint"}, "kind must be one of generate, vary, img2img, interpolate, textdiff, inpaint"),
    ({"kind": "generate", "prompt": "  "}, "the prompt is empty"),
    ({"kind": "generate", "prompt": "x" * 301}, "at most 300 are allowed"),
    ({"kind": "generate", "prompt": "a", "seed": -1}, "seed -1 is out of range"),
    ({"kind": "generate", "prompt": "a", "seed": "abc"}, "seed must be a whole number"),
    ({"kind": "generate", "prompt": "a", "num_images": 0}, "--num-images 0: must be between 1 and 64"),
    ({"kind": "generate", "prompt": "a red star above a blue circle", "regions": 2}, "regions needs an Imagen-style"),
    ({"kind": "generate", "prompt": "a", "steps": {"decoder": 0}}, "steps must be between 1 and 1000"),
    ({"kind": "generate", "prompt": "a", "steps": {"unet": 3}}, "'unet' is not a stage"),
    ({"kind": "generate", "prompt": "a", "guidance": {"prior": 60}}, "guidance must be between 0 and 50"),
    ({"kind": "generate", "prompt": "a", "sampler": "plms"}, "sampler 'plms' is not one of"),
    ({"kind": "generate", "prompt": "a", "until": "sr2048"}, "until must be one of decoder, sr256, sr1024"),
    ({"kind": "generate", "prompt": "a", "strength": 0.5}, "generate takes no field 'strength'"),
    ({"kind": "generate", "prompt": "a", "negative_prompt": 3}, "negative_prompt must be text"),
    ({"kind": "vary"}, "vary needs an image"),
    ({"kind": "vary", "image": "img999"}, "no image 'img999' in the gallery"),
    ({"kind": "interpolate", "image": "img1", "image_b": "img1", "frames": 1}, "--frames 1: must be between 2 and 64"),
    ({"kind": "img2img", "image": "img1", "prompt": "a", "strength": 2}, "strength 2: must be between 0 and 1"),
    ({"kind": "textdiff", "image": "img1", "from": "a", "to": "b", "max_theta": 0}, "max_theta 0: must be above 0"),
    ({"kind": "img2img", "image": "img1", "prompt": "a", "strength": "NaN"}, "strength must be a finite number"),
]


def test_bad_job_requests_get_one_line_and_the_server_runs_on(base):
    _, item = upload(base, Image.new("RGB", (64, 64), "white"))
    assert item["id"] == "img1"
    for body, message in BAD_JOBS:
        status, answer = call_json(f"{base}/api/jobs", body=body)
        assert status == 400, (body, answer)
        assert message in answer["error"] and "\n" not in answer["error"] and "Traceback" not in answer["error"]
    status, _, data = call(f"{base}/api/jobs", body=b"{not json", content_type="application/json")
    assert status == 400 and json.loads(data) == {"error": "the request body is not JSON"}
    status, answer = call_json(f"{base}/api/jobs", body=b"[1, 2]")
    assert status == 400 and answer["error"] == "a job request is a JSON object"
    status, answer = call_json(f"{base}/api/jobs", body=b"x" * 70_000)
    assert status == 413
    assert call_json(f"{base}/api/jobs/job404")[0] == 400
    assert call_json(f"{base}/api/images/img404.png")[0] == 400
    status, answer = call_json(f"{base}/api/nothing-here")
    assert status == 404 and answer == {"error": "Not Found"}
    assert call_json(f"{base}/api/events")[0] == 400  # no client id
    assert call(f"{base}/api/info")[0] == 200


def test_a_refused_large_body_still_gets_its_one_line_answer(base):
    # answering 413 and closing with 2 MB unread made the kernel reset the connection, and the reset often
    # overtook the answer (11 of 50 requests); the server now drains the rest before it answers
    for _ in range(20):
        status, answer = call_json(f"{base}/api/jobs", body=b"x" * 2_000_000)
        assert status == 413 and answer["error"] == "the request is 1.9 MB; the limit is 0.0625 MB"
    assert call(f"{base}/api/info")[0] == 200


def test_uploads_are_checked_like_the_clis_images(cascade, bundle):
    with running(studio_for(cascade, bundle, max_upload_bytes=200_000)) as base:
        cases = [
            (b"", "in.png", 400, "the upload is empty"),
            (b"%PDF-1.4 not an image at all", "doc.pdf", 400, "not a readable image: doc.pdf (UnidentifiedImageError)"),
            (png(Image.new("RGB", (64, 64)))[:60], "cut.png", 400, "not a readable image: cut.png"),
            (png(Image.new("1", (5000, 5000))), "wide.png", 400, "wide.png is 5000x5000 pixels; at most 16,777,216"),
            (png(Image.new("1", (20000, 20000))), "bomb.png", 400, "a decompression bomb"),
            (png(Image.new("RGB", (8, 8)), "TIFF"), "scan.tif", 400, "scan.tif is a TIFF image; send PNG, JPEG"),
            (bytes(300_000), "big.png", 413, "the limit is 0.190735 MB"),
        ]
        for data, name, status_want, message in cases:
            status, answer = call_json(f"{base}/api/uploads?name={name}", body=data, content_type="image/png")
            assert (status, message in answer["error"]) == (status_want, True), (name, answer)
        status, answer = call_json(f"{base}/api/uploads?kind=brush", body=png(Image.new("RGB", (8, 8))))
        assert status == 400 and "not 'brush'" in answer["error"]
        rgba = Image.new("RGBA", (40, 30), (0, 0, 255, 0))  # transparent: composited onto white, as the CLI does
        status, item = call_json(f"{base}/api/uploads?name=../../etc/x.png", body=png(rgba))
        assert status == 201 and item["name"] == "x.png" and (item["width"], item["height"]) == (30, 30)
        assert (pixels(fetch_image(base, item["id"])) == 255).all()
        assert call(f"{base}/api/info")[0] == 200


def test_a_failing_job_shows_one_line_and_the_next_job_runs(cascade, bundle):
    class Broken(Gated):
        def generate(self, prompts, **options):
            if prompts[0] == "break":
                raise RuntimeError("boom\nwith a second line")
            return self._cascade.generate(prompts, **options)

    with running(studio_for(Broken(cascade), bundle)) as base:
        _, bad = submit(base, prompt="break")
        _, good = submit(base)
        assert wait_for_job(base, bad["id"])["error"] == "the job failed: RuntimeError: boom"
        assert wait_for_job(base, good["id"])["state"] == "done"


# ---------------------------------------------------------------- the command
def test_serve_help_has_an_example_and_bad_ports_are_one_line_errors(bundle, capsys):
    import socket

    from cascade.cli import build_parser, main

    text = build_parser().parse_args(["serve", "--model", "x"]).func.__module__
    assert text == "cascade.serve"
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "cascade serve --model bundles/quick" in out and "--host" in out and "127.0.0.1" in out
    assert main(["serve", "--model", str(bundle), "--port", "70000"]) == 2
    assert capsys.readouterr().err.strip() == "cascade: error: --port 70000: must be between 0 and 65535"
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        assert main(["serve", "--model", str(bundle), "--port", str(port)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"cascade: error: cannot listen on 127.0.0.1:{port}") and "\n" not in err
    finally:
        taken.close()
    assert main(["serve", "--model", str(bundle), "--eval", str(bundle / "missing.md")]) == 2
    assert "no such file" in capsys.readouterr().err

