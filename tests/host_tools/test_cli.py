"""Bad input gets one clear line on stderr and a non-zero exit, never a traceback."""

import io
import json
import subprocess
import sys
import tarfile
import time

import pytest

from host_tools.cli.base import EXTRA_OF_MODULE
from tests.conftest import FIXTURES, edgefleet


def assert_one_line_error(result, *fragments, code=1):
    assert result.returncode == code, result
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_missing_model_file(tmp_path, keys):
    result = edgefleet("bundle", "build", tmp_path / "missing.onnx", "--name", "m", "--version", "1.0.0",
                       "--key", keys["key"], "-o", tmp_path / "b.efb")
    assert_one_line_error(result, "error:", "missing.onnx", "does not exist")


def test_bundle_with_a_signature_from_an_untrusted_key(make_bundle, keys):
    result = edgefleet("bundle", "verify", make_bundle(key=keys["rogue_key"]), "--key", keys["pub"])
    assert_one_line_error(result, "error:", "does not trust")


def test_unreachable_broker(make_bundle):
    result = edgefleet("deploy", make_bundle(), "--device", "pi-01", "--broker", "127.0.0.1:1", "--timeout", "5")
    assert_one_line_error(result, "error:", "127.0.0.1:1")


def test_not_a_bundle(tmp_path):
    path = tmp_path / "x.efb"
    path.write_text("hello")
    assert_one_line_error(edgefleet("bundle", "inspect", path), "error:", "not a")


def test_bad_broker_address_is_a_usage_level_error(make_bundle):
    result = edgefleet("deploy", make_bundle(), "--device", "pi-01", "--broker", "localhost:notaport")
    assert_one_line_error(result, "HOST:PORT")


def test_signing_key_is_never_overwritten(tmp_path):
    assert edgefleet("keys", "gen", "--out", tmp_path, "--name", "k").returncode == 0
    before = (tmp_path / "k.key").read_bytes()
    assert_one_line_error(edgefleet("keys", "gen", "--out", tmp_path, "--name", "k"), "refusing to overwrite")
    assert (tmp_path / "k.key").read_bytes() == before
    assert oct((tmp_path / "k.key").stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("name", ["../outside", "a/b", ".hidden", ""])
def test_a_key_name_that_is_not_a_plain_file_name_is_refused(tmp_path, name):
    keys = tmp_path / "keys"
    assert_one_line_error(edgefleet("keys", "gen", "--out", keys, "--name", name), "key name")
    assert not any(tmp_path.rglob("*.key")) and not any(tmp_path.rglob("*.pub"))


def test_output_paths_the_system_refuses_are_one_line(tmp_path, keys, reference_model):
    """A folder where a file is wanted and the reverse: said in one line, not an OSError's traceback."""
    (tmp_path / "a-file").write_text("")
    build = ("bundle", "build", reference_model, "--name", "m", "--version", "1.0.0", "--key", keys["key"])
    assert_one_line_error(edgefleet(*build, "-o", tmp_path), f"-o {tmp_path} is a folder", "m-1.0.0.efb")
    assert_one_line_error(edgefleet(*build, "-o", tmp_path / "a-file" / "m.efb"),
                          f"error: {tmp_path / 'a-file'} is a file, where a folder is needed")
    assert_one_line_error(edgefleet("keys", "gen", "--out", tmp_path / "a-file"),
                          f"--out {tmp_path / 'a-file'} is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_sample_the_model_answers_with_nan_is_refused_before_a_bundle_exists(tmp_path, keys, reference_model):
    """NaN equals nothing: every device's health check of such a bundle would fail, and roll it back."""
    import numpy as np

    np.savez(tmp_path / "nan.npz", image=np.full((1, 1, 8, 8), np.nan, np.float32))
    result = edgefleet("bundle", "build", reference_model, "--name", "m", "--version", "1.0.0", "--key", keys["key"],
                       "--sample", tmp_path / "nan.npz", "-o", tmp_path / "m.efb")
    assert_one_line_error(result, "output 'logits' on the sample input is NaN", "health check would fail")
    assert not (tmp_path / "m.efb").exists()


def test_a_sample_of_one_array_is_a_one_input_models_whatever_its_name(tmp_path, keys):
    """A TFLite converter names the input "serving_default_input_2:0": a file of one array feeds a model
    of one input, as compress's data does. One call's input the model cannot take (200 samples where it
    was converted for one) is refused naming the shapes, and no bundle is written."""
    import numpy as np

    model = FIXTURES / "keras2_lstm.tflite"
    images = np.random.default_rng(0).random((200, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "one.npz", x=images[:1])
    np.savez(tmp_path / "all.npz", x=images)
    build = ("bundle", "build", model, "--name", "kws", "--version", "1.0.0", "--key", keys["key"])
    result = edgefleet(*build, "--sample", tmp_path / "one.npz", "-o", tmp_path / "kws.efb")
    assert result.returncode == 0 and result.stderr == "", result.stderr  # (no TFLite banner either)
    result = edgefleet(*build, "--sample", tmp_path / "all.npz", "-o", tmp_path / "all.efb")
    assert_one_line_error(result, "input 'serving_default_input_2:0' is [200, 8, 8], the model takes [1, 8, 8] and "
                          "does not run at that shape")
    assert not (tmp_path / "all.efb").exists()


def test_a_float32_sample_is_given_to_a_float16_model_in_its_width(tmp_path, keys, reference_model):
    """A model published in float16 (inputs too), and a sample from a float32 pipeline: the bundle's
    sample is stored float16, what the model and every device's health check feed it (it stopped in
    ONNX Runtime's "Unexpected input data type"). A sample of another kind (integers for a float
    input) is refused naming both types, and no bundle is written."""
    import numpy as np
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from device_agent.bundle import BundleReader
    from device_agent.bundle.signing import trusted_keys

    half = tmp_path / "half.onnx"
    onnx.save(convert_float_to_float16(onnx.load(str(reference_model)), keep_io_types=False), str(half))
    np.savez(tmp_path / "float32.npz", image=np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32))
    np.savez(tmp_path / "ints.npz", image=np.zeros((1, 1, 8, 8), np.int32))
    build = ("bundle", "build", half, "--name", "m", "--version", "1.0.0", "--key", keys["key"])
    result = edgefleet(*build, "--sample", tmp_path / "float32.npz", "-o", tmp_path / "m.efb")
    assert result.returncode == 0, result.stderr
    with BundleReader(tmp_path / "m.efb") as reader:
        reader.verify(trusted_keys([keys["pub"]]), extract_to=tmp_path / "m")
    sample = np.load(tmp_path / "m" / "sample.npz")
    assert {sample[k].dtype for k in sample.files} == {np.dtype(np.float16)}
    result = edgefleet(*build, "--sample", tmp_path / "ints.npz", "-o", tmp_path / "i.efb")
    assert_one_line_error(result, "sample input 'image' is float16 in the model, int32 in the file")
    assert not (tmp_path / "i.efb").exists()


def test_a_sample_file_that_is_not_an_npz_is_one_line(tmp_path, keys, reference_model):
    (tmp_path / "sample.npz").write_bytes(bytes(range(256)))  # NumPy alone would call it pickled data
    result = edgefleet("bundle", "build", reference_model, "--name", "m", "--version", "1.0.0", "--key", keys["key"],
                       "--sample", tmp_path / "sample.npz", "-o", tmp_path / "m.efb")
    assert_one_line_error(result, f"cannot read sample file {tmp_path / 'sample.npz'}: not a NumPy .npz archive")
    assert not (tmp_path / "m.efb").exists()


@pytest.mark.parametrize("text, says", [
    ("[" * 100_000, "cannot read compression report"),  # nested past the JSON parser's recursion limit
    ("{not json", "cannot read compression report"),
    ('{"steps": []}', "is not a report written by `edgefleet compress --report`"),
])
def test_a_compression_report_that_is_not_one_is_one_line(tmp_path, keys, reference_model, text, says):
    (tmp_path / "report.json").write_text(text)
    result = edgefleet("bundle", "build", reference_model, "--name", "m", "--version", "1.0.0", "--key", keys["key"],
                       "--compression-report", tmp_path / "report.json", "-o", tmp_path / "m.efb")
    assert_one_line_error(result, says)
    assert not (tmp_path / "m.efb").exists()


def test_fleet_status_without_a_database(tmp_path):
    assert_one_line_error(edgefleet("fleet", "status", "--db", tmp_path / "none.db"), "edgefleet monitor")


def test_inspect_shows_what_devices_check_before_download(tmp_path, keys, reference_model):
    out = tmp_path / "b.efb"
    built = edgefleet("bundle", "build", reference_model, "--name", "digits-cnn", "--version", "2.1.0",
                      "--key", keys["key"], "-o", out, "--release", 7, "--expires-in-days", 30,
                      "--arch", "aarch64", "--min-ram-mb", 512)
    assert built.returncode == 0, built.stderr
    shown = edgefleet("bundle", "inspect", out).stdout.splitlines()
    key_id = json.loads(edgefleet("bundle", "verify", out, "--key", keys["pub"], "--json").stdout)["key_id"]
    expires = json.loads(edgefleet("bundle", "inspect", out, "--json").stdout)["expires_at"]
    assert 29.9 < (expires - time.time()) / 86400 <= 30
    when = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(expires))
    assert shown[1].split() == ["release", "7", "expires", when, "target", "arch", "aarch64,", "RAM", ">=", "512", "MB"]
    assert f"signed by key {key_id} (not checked here" in shown[2]

    forged = tmp_path / "forged.efb"  # inspect shows a bundle whose signature it cannot read, and says so
    with tarfile.open(out) as tin, tarfile.open(forged, "w") as tout:
        for info in tin.getmembers():
            data = b"{}" if info.name == "manifest.sig" else tin.extractfile(info).read()
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    listing = edgefleet("bundle", "inspect", forged)
    assert listing.returncode == 0 and "signature unreadable: malformed signature document" in listing.stdout
    assert "release 7" in listing.stdout


def test_build_inspect_verify_round_trip_in_json(tmp_path, keys, reference_model):
    out = tmp_path / "b.efb"
    built = edgefleet("bundle", "build", reference_model, "--name", "digits-cnn", "--version", "2.1.0",
                      "--key", keys["key"], "-o", out, "--json")
    assert built.returncode == 0, built.stderr
    assert json.loads(built.stdout)["manifest"]["version"] == "2.1.0"
    inspected = json.loads(edgefleet("bundle", "inspect", out, "--json").stdout)
    assert {f["path"] for f in inspected["files"]} == {"digits_cnn.onnx", "sample.npz"}
    verified = edgefleet("bundle", "verify", out, "--key", keys["pub"], "--json")
    assert verified.returncode == 0 and json.loads(verified.stdout)["valid"] is True


@pytest.mark.parametrize("args", [["bundle", "build"], ["deploy"], ["nonsense"]])
def test_usage_errors_exit_2(args):
    assert edgefleet(*args).returncode == 2


@pytest.mark.parametrize("args", [
    # click's FloatRange lets nan through (every comparison with it is false): a bundle or command
    # that never expires, or a wait that never ends
    ["bundle", "build", "m.onnx", "--name", "m", "--version", "1.0.0", "--key", "k", "--expires-in-days", "nan"],
    ["rollback", "--device", "d", "--expires-in", "nan"],
    ["deploy", "b.efb", "--device", "d", "--timeout", "nan"],
    ["device", "status", "d", "--timeout", "-1"],
    ["rollout", "start", "b.efb", "--group", "g", "--window", "inf"],
    ["device", "config", "d", "--set", "telemetry_interval=nan"],
])
def test_a_number_that_is_not_finite_or_in_range_is_a_usage_error(args):
    result = edgefleet(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert ("not a finite number" in result.stderr or "not in the range" in result.stderr
            or "NAME=NUMBER" in result.stderr), result.stderr


NEVER_CONNECTED = ("has never connected to this broker: not installed yet, or a wrong device id? (the broker "
                   "keeps commands only for devices it has seen)")


def test_asking_a_device_that_never_connected_says_so_at_once(mosquitto, make_bundle):
    # No agent has ever connected as ghost-7, so the broker keeps no session (and no status) for it:
    # the command is lost, and waiting out the 60 s would tell the user nothing more.
    started = time.monotonic()
    result = edgefleet("device", "status", "ghost-7", "--broker", mosquitto, "--timeout", "60")
    assert_one_line_error(result, f"error: ghost-7 {NEVER_CONNECTED}")
    result = edgefleet("bench", make_bundle(), "--device", "ghost-7", "--broker", mosquitto, "--timeout", "60")
    assert result.returncode == 1 and "Traceback" not in result.stderr  # after its "benchmarking..." line
    assert result.stderr.strip().splitlines()[-1] == f"error: ghost-7 {NEVER_CONNECTED}"
    assert time.monotonic() - started < 50


def test_rolling_back_a_device_that_never_connected_ends_at_once_and_says_why(mosquitto, keys):
    started = time.monotonic()
    result = edgefleet("rollback", "--device", "ghost-8", "--broker", mosquitto, "--timeout", "60", "--json")
    outcome = json.loads(result.stdout)["ghost-8"]
    assert result.returncode == 1 and outcome["state"] == "unreachable"
    assert outcome["reason"] == "never connected to this broker: not installed yet, or a wrong device id? (the " \
                                "broker keeps commands only for devices it has seen)"
    assert time.monotonic() - started < 50
    # two of them, into a pipe: a line each, and on stderr nothing (no bar, no "waiting" for them)
    two = edgefleet("rollback", "--device", "ghost-8", "--device", "ghost-9", "--broker", mosquitto, "--timeout", "60")
    assert two.returncode == 1 and two.stderr == ""
    assert [line.split(" (")[0] for line in two.stdout.splitlines()] == ["ghost-8: unreachable", "ghost-9: unreachable"]


def test_bench_of_a_missing_or_broken_bundle_is_one_line(mosquitto, tmp_path, keys):
    result = edgefleet("bench", tmp_path / "nope.efb", "--device", "pi-1", "--broker", mosquitto)
    assert_one_line_error(result, "error:", "nope.efb does not exist")
    (tmp_path / "model.onnx").write_bytes(b"not a bundle")
    broken = edgefleet("bench", tmp_path / "model.onnx", "--device", "pi-1", "--broker", mosquitto)
    assert_one_line_error(broken, "error:", "model.onnx is not a readable bundle")
    assert "benchmarking" not in broken.stderr


@pytest.mark.parametrize("command", ["deploy", "bench"])
def test_sending_a_command_without_a_signing_key_is_one_line(mosquitto, make_bundle, tmp_path, command):
    result = edgefleet(command, make_bundle(), "--device", "pi-1", "--broker", mosquitto,
                       "--key", tmp_path / "none.key")
    assert_one_line_error(result, "error:", "no signing key at", "edgefleet keys gen")


def edgefleet_on_a_device_only_install(*args) -> subprocess.CompletedProcess:
    """The `edgefleet` command as `pip install edgefleet` (no extras) leaves it: no extra's modules
    can be imported (a stand-in for their absence: this environment has them)."""
    code = (f"import sys\nfor name in {sorted(EXTRA_OF_MODULE)!r}: sys.modules[name] = None\n"
            "from host_tools.cli import main\nsys.argv[0] = 'edgefleet'\nmain()")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=60)


def test_a_command_that_needs_the_host_extra_names_it_on_a_device_only_install(tmp_path, reference_model):
    result = edgefleet_on_a_device_only_install("compress", reference_model, "--recipe", "int8-dynamic",
                                                "-o", tmp_path / "out.onnx")
    assert_one_line_error(result, "`edgefleet compress` needs the host extra", "pip install 'edgefleet[host]'")
    assert not (tmp_path / "out.onnx").exists()


def test_keys_and_bundles_work_on_a_device_only_install(tmp_path, reference_model):
    assert edgefleet_on_a_device_only_install("keys", "gen", "--out", tmp_path).returncode == 0
    result = edgefleet_on_a_device_only_install("bundle", "build", reference_model, "--name", "m", "--version",
                                                "1.0.0", "--key", tmp_path / "release.key", "-o", tmp_path / "m.efb")
    assert result.returncode == 0, result.stderr
    assert edgefleet("bundle", "verify", tmp_path / "m.efb", "--key", tmp_path / "release.pub").returncode == 0
    # a model whose weights are in a file beside it: found without the onnx package, and bundled too
    import onnx

    split = tmp_path / "split" / "m.onnx"
    split.parent.mkdir()
    onnx.save(onnx.load(str(reference_model)), str(split), save_as_external_data=True, location="m.weights",
              size_threshold=256)
    result = edgefleet_on_a_device_only_install("bundle", "build", split, "--name", "m", "--version", "1.0.1",
                                                "--key", tmp_path / "release.key", "-o", tmp_path / "split.efb")
    assert result.returncode == 0, result.stderr
    listing = edgefleet("bundle", "inspect", tmp_path / "split.efb")
    assert "m.weights" in listing.stdout, listing.stdout
