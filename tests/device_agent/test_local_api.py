"""The local inference API in-process: formats, clear errors, and sockets it must not steal."""

import shutil
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from device_agent.bundle.signing import trusted_keys
from device_agent.errors import ConfigError, ModelError
from device_agent.local_api import InferenceClient, LocalApi
from device_agent.local_api import framing
from device_agent.serving import ModelSlot
from device_agent.store import BundleStore
from device_agent.telemetry.histogram import LatencyHistogram
from device_agent.runtime import RuntimeOptions, load_runtime
from device_agent.update.health import health_check


@pytest.fixture
def socket_dir():
    d = Path(tempfile.mkdtemp(prefix="ef-api-", dir="/tmp"))  # pytest's tmp paths can be too long
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def served(make_bundle, keys, tmp_path, socket_dir):
    store = BundleStore(tmp_path)
    bundle = store.install(make_bundle("1.0.0"), trusted_keys([keys["pub"]]))
    latency = LatencyHistogram()
    slot = ModelSlot(latency)
    slot.swap(bundle, *health_check(bundle, RuntimeOptions()))
    api = LocalApi(socket_dir / "inference.sock", slot, spin_us=200)  # the agent's default on 2+ cores
    api.start()
    yield api, latency
    api.stop()


@pytest.mark.parametrize("fmt", ["raw", "npz", "npy", "json"])
def test_every_format_gives_the_models_outputs(served, heldout, reference_model, fmt):
    api, latency = served
    x = heldout[0][:3]
    want = load_runtime("onnxruntime", reference_model).run({"image": x})["logits"]
    with InferenceClient(api.path) as model:
        got = model.infer(x if fmt == "npy" else {"image": x}, format=fmt)
    np.testing.assert_allclose(got["logits"], want, rtol=1e-5, atol=1e-5)
    assert latency.snapshot_and_reset().count == 1  # the request's latency feeds the telemetry


def test_describe_names_the_bundle_and_its_tensors(served):
    with InferenceClient(served[0].path) as model:
        d = model.describe()
    assert d["bundle"] == "digits-cnn 1.0.0" and d["runtime"] == "onnxruntime"
    assert d["inputs"] == [{"name": "image", "shape": ["batch", 1, 8, 8], "dtype": "float32"}]


@pytest.mark.parametrize("inputs, message", [
    ({"pixels": np.zeros((1, 1, 8, 8), np.float32)}, r"missing input\(s\) image"),
    ({"image": np.zeros((1, 8, 8), np.float32)}, "inference failed"),
])
def test_bad_inputs_get_one_clear_error_and_the_connection_stays_usable(served, inputs, message):
    with InferenceClient(served[0].path) as model:
        with pytest.raises(ModelError, match=message):
            model.infer(inputs)
        assert model.infer({"image": np.zeros((1, 1, 8, 8), np.float32)})["logits"].shape == (1, 10)


@pytest.mark.parametrize("payload", [b"\x00\x00\x00\x02[]junk", b"\x00\x00\x00\x20[[\"image\",\"<f4\",[1,1,8,8]]]",
                                     b"\x00\x00\x00\x1d[[\"image\",\"|O\",[1]]]\x00" + b"\x00" * 7])
def test_raw_tensors_that_do_not_match_their_header_are_refused(served, payload):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(served[0].path))
        framing.send_frame(s, framing.RAW, payload)
        kind, reply = framing.recv_frame(s)
    assert kind == framing.ERROR and b"cannot decode the raw tensors" in reply


def test_a_spinning_reader_gets_every_frame_and_sleeps_once_its_window_is_over():
    a, b = socket.socketpair()
    reader = framing.FrameReader(b, spin=0.05)
    frame = struct.pack(">I", 6) + b"thello"

    a.sendall(frame)  # already there
    assert reader.read() == (b"t", b"hello")
    threading.Timer(0.01, a.sendall, [frame]).start()  # arrives while the reader polls
    assert reader.read() == (b"t", b"hello")
    threading.Timer(0.01, a.sendall, [frame[:3]]).start()  # split across the window's end
    threading.Timer(0.2, a.sendall, [frame[3:] + frame]).start()
    assert reader.read() == (b"t", b"hello") and reader.read() == (b"t", b"hello")

    # Idle: the reader polls for its 50 ms, then blocks without using the CPU.
    threading.Timer(0.6, a.sendall, [frame]).start()
    cpu = time.thread_time()
    assert reader.read() == (b"t", b"hello")
    assert time.thread_time() - cpu < 0.2
    a.close()  # EOF while polling is a clean end, not an error
    assert reader.read() is None


def test_garbage_on_the_socket_does_not_take_the_server_down(served):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(served[0].path))
        s.sendall(struct.pack(">I", 5) + b"zjunk")
        kind, payload = framing.recv_frame(s)
        assert kind == framing.ERROR and b"cannot decode" in payload
        s.sendall(struct.pack(">I", 0xFFFFFFFF))  # an absurd length: the server hangs up
        assert s.recv(10) == b""
    with InferenceClient(served[0].path) as model:
        assert model.describe()["bundle"] == "digits-cnn 1.0.0"


def test_a_second_agent_does_not_steal_a_live_socket_but_replaces_a_stale_one(served, socket_dir):
    api, _ = served
    with pytest.raises(ConfigError, match="another agent is already serving"):
        LocalApi(api.path, api.slot).start()
    stale = socket_dir / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # the file stays, nobody listens: what a SIGKILLed agent leaves
    replacement = LocalApi(stale, api.slot)
    replacement.start()
    with InferenceClient(stale) as model:
        assert model.describe()["bundle"] == "digits-cnn 1.0.0"
    replacement.stop()


def test_a_socket_path_too_long_for_unix_sockets_is_a_config_error(served):
    with pytest.raises(ConfigError, match="longer than 107 bytes"):
        LocalApi("/tmp/" + "x" * 120, served[0].slot)


def test_no_active_model_is_an_error_not_a_hang(socket_dir):
    api = LocalApi(socket_dir / "empty.sock", ModelSlot(LatencyHistogram()))
    api.start()
    try:
        with InferenceClient(api.path) as model:
            with pytest.raises(ModelError, match="no model is active"):
                model.infer({"image": np.zeros((1, 1, 8, 8), np.float32)})
    finally:
        api.stop()


@pytest.fixture
def http_api(served):
    from device_agent.local_api.http import HttpApi

    api = HttpApi(0, served[0].slot)
    port = api.start()
    yield f"http://127.0.0.1:{port}"
    api.stop()


def http(url, body=None, content_type=None):
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type} if content_type else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def test_http_serves_the_model_description_and_json_and_npz_inference(http_api, heldout, reference_model):
    import io
    import json

    want = load_runtime("onnxruntime", reference_model).run({"image": heldout[0][:2]})["logits"]
    status, _, body = http(http_api + "/v1/model")
    assert status == 200 and json.loads(body)["bundle"] == "digits-cnn 1.0.0"
    doc = json.dumps({"inputs": {"image": heldout[0][:2].tolist()}}).encode()
    status, kind, body = http(http_api + "/v1/infer", doc, "application/json")
    assert status == 200 and kind == "application/json"
    np.testing.assert_allclose(json.loads(body)["outputs"]["logits"], want, rtol=1e-5, atol=1e-5)
    buf = io.BytesIO()
    np.savez(buf, image=heldout[0][:2])
    status, kind, body = http(http_api + "/v1/infer", buf.getvalue(), "application/x-npz")
    assert status == 200 and kind == "application/x-npz"
    np.testing.assert_allclose(np.load(io.BytesIO(body))["logits"], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("body, content_type, status, message", [
    (b"{}", "text/plain", 415, "send application/json"),
    (b'{"inputs": {"pixels": [1]}}', "application/json", 400, "missing input(s) image"),
    (b"not json", "application/json", 400, "cannot decode"),
    (b"PK\x03\x04cut short", "application/x-npz", 400, "cannot decode the 'z' payload: File is not a zip file"),
    (b"\x80\x04 not npz", "application/x-npz", 400, "cannot decode the 'z' payload: not a NumPy .npz archive"),
    (b"\x80\x04 not npy", "application/x-npy", 400, "not a NumPy .npy file"),
])
def test_http_bad_requests_get_a_status_and_one_clear_message(http_api, body, content_type, status, message):
    import json

    got_status, _, reply = http(http_api + "/v1/infer", body, content_type)
    assert got_status == status and message in json.loads(reply)["error"]
