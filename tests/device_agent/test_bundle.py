"""Bundles are verified (signature, then every file's size and hash) before anything is used."""

import io
import tarfile
from pathlib import Path

import pytest

from device_agent.bundle import BundleReader
from device_agent.bundle.signing import trusted_keys
from device_agent.errors import BundleError, IntegrityError, SignatureError
from tests.conftest import MODELS


def rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy bundle *src* to *dst*, passing each (TarInfo, bytes) member through *edit*."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as tout:
        for member in tin.getmembers():
            data = tin.extractfile(member).read()
            for info, payload in edit(member, data):
                info.size = len(payload)
                tout.addfile(info, io.BytesIO(payload))
    return dst


def test_valid_bundle_verifies_and_extracts_every_file(make_bundle, keys, tmp_path):
    bundle = make_bundle(compress=False)
    with BundleReader(bundle) as reader:
        verified = reader.verify(trusted_keys([keys["pub"]]), extract_to=tmp_path / "out")
    assert verified.manifest.name == "digits-cnn" and verified.manifest.version == "1.0.0"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["digits_cnn.onnx", "sample.npz"]
    assert verified.key_id in trusted_keys([keys["pub"]])


def test_bundle_signed_by_an_untrusted_key_is_refused(make_bundle, keys):
    bundle = make_bundle(key=keys["rogue_key"])
    with BundleReader(bundle) as reader, pytest.raises(SignatureError, match="does not trust"):
        reader.verify(trusted_keys([keys["pub"]]))


def test_a_changed_manifest_breaks_the_signature(make_bundle, keys, tmp_path):
    def edit(info, data):
        if info.name == "manifest.json":
            data = data.replace(b'"version":"1.0.0"', b'"version":"9.0.0"')
        yield info, data
    bad = rewrite(make_bundle(compress=False), tmp_path / "bad.efb", edit)
    with BundleReader(bad) as reader, pytest.raises(SignatureError, match="does not match"):
        reader.verify(trusted_keys([keys["pub"]]))


def test_a_flipped_bit_in_the_model_is_caught_and_nothing_is_left_extracted(make_bundle, keys, tmp_path):
    def edit(info, data):
        if info.name.endswith(".onnx"):
            data = bytearray(data)
            data[len(data) // 2] ^= 0x01
            data = bytes(data)
        yield info, data
    bad = rewrite(make_bundle(compress=False), tmp_path / "bad.efb", edit)
    out = tmp_path / "out"
    with BundleReader(bad) as reader, pytest.raises(IntegrityError, match="SHA-256"):
        reader.verify(trusted_keys([keys["pub"]]), extract_to=out)
    assert not out.exists()


def test_a_member_not_in_the_manifest_is_refused(make_bundle, keys, tmp_path):
    def edit(info, data):
        yield info, data
        if info.name == "sample.npz":
            yield tarfile.TarInfo("../../evil.sh"), b"#!/bin/sh\n"
    bad = rewrite(make_bundle(compress=False), tmp_path / "bad.efb", edit)
    with BundleReader(bad) as reader, pytest.raises(IntegrityError, match="unexpected"):
        reader.verify(trusted_keys([keys["pub"]]), extract_to=tmp_path / "out")
    assert not (tmp_path / "evil.sh").exists()


def test_symlink_members_are_refused(make_bundle, tmp_path):
    def edit(info, data):
        if info.name.endswith(".onnx"):
            link = tarfile.TarInfo(info.name)
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            yield link, b""
        else:
            yield info, data
    bad = rewrite(make_bundle(compress=False), tmp_path / "bad.efb", edit)
    with pytest.raises(IntegrityError, match="not a regular file"):
        BundleReader(bad)


@pytest.mark.parametrize("content", [b"", b"hello", b"\0" * 2048])
def test_files_that_are_not_bundles_get_a_bundle_error(tmp_path, content):
    path = tmp_path / "x.efb"
    path.write_bytes(content)
    with pytest.raises(BundleError):
        BundleReader(path)


def test_truncated_bundle_is_refused(make_bundle, tmp_path):
    data = make_bundle(compress=False).read_bytes()
    path = tmp_path / "short.efb"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError):
        with BundleReader(path) as reader:
            reader.verify({})


@pytest.mark.parametrize("kind", [tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE,
                                  tarfile.DIRTYPE], ids=["hardlink", "char-device", "block-device", "fifo", "dir"])
def test_members_that_are_not_regular_files_are_refused(make_bundle, tmp_path, kind):
    def edit(info, data):
        if info.name.endswith(".onnx"):
            odd = tarfile.TarInfo(info.name)
            odd.type = kind
            if kind == tarfile.LNKTYPE:
                odd.linkname = "manifest.json"
            yield odd, b""
        else:
            yield info, data
    bad = rewrite(make_bundle(compress=False), tmp_path / "bad.efb", edit)
    with pytest.raises(IntegrityError, match="not a regular file"):
        BundleReader(bad)


@pytest.mark.parametrize("name", ["/etc/cron.d/evil", "../evil.onnx", "files/../../evil", "sample.npz"])
def test_extra_members_with_escaping_or_duplicate_names_are_refused_and_nothing_escapes(
        make_bundle, keys, tmp_path, name):
    def edit(info, data):
        yield info, data
        if info.name == "sample.npz":
            yield tarfile.TarInfo(name), b"payload"
    bad = rewrite(make_bundle(compress=False), tmp_path / "bad.efb", edit)
    out = tmp_path / "deep" / "out"
    with BundleReader(bad) as reader, pytest.raises(IntegrityError, match="differ from the manifest"):
        reader.verify(trusted_keys([keys["pub"]]), extract_to=out)
    assert not out.exists() and not (tmp_path / "deep" / "evil.onnx").exists()


def test_a_model_from_another_bundle_under_this_manifest_is_refused(make_bundle, keys, tmp_path, reference_model):
    other = make_bundle("9.9.9", model=MODELS / "digits_cnn.tflite", input_name="serving_default_args_0",
                        compress=False)
    with tarfile.open(other) as t:
        foreign = t.extractfile("digits_cnn.tflite").read()

    def edit(info, data):  # mix and match: bundle A's manifest and signature, bundle B's model bytes
        yield info, (foreign[:info.size].ljust(info.size, b"\0") if info.name.endswith(".onnx") else data)
    bad = rewrite(make_bundle(compress=False), tmp_path / "mixed.efb", edit)
    with BundleReader(bad) as reader, pytest.raises(IntegrityError, match="SHA-256 does not match"):
        reader.verify(trusted_keys([keys["pub"]]), extract_to=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_more_data_than_the_manifest_declares_is_refused(make_bundle, keys, tmp_path):
    def edit(info, data):
        yield info, data + b"\0" * 4096 if info.name.endswith(".onnx") else data
    bad = rewrite(make_bundle(compress=False), tmp_path / "long.efb", edit)
    with BundleReader(bad) as reader, pytest.raises(IntegrityError, match="manifest says"):
        reader.verify(trusted_keys([keys["pub"]]), extract_to=tmp_path / "out")


def test_an_unsigned_bundle_is_not_a_bundle(make_bundle, tmp_path):
    def edit(info, data):
        if info.name != "manifest.sig":
            yield info, data
    bad = rewrite(make_bundle(compress=False), tmp_path / "unsigned.efb", edit)
    with pytest.raises(BundleError, match="manifest.sig"):
        BundleReader(bad)


# --- zstd-compressed members: the manifest describes the file, never the compressed bytes -----------

def zstd(data: bytes) -> bytes:
    import zstandard
    return zstandard.ZstdCompressor(level=3).compress(data)


def test_a_compressed_bundle_is_smaller_and_extracts_the_exact_model(make_bundle, keys, tmp_path, reference_model):
    packed, plain = make_bundle(), make_bundle(compress=False)
    with tarfile.open(packed) as t:
        assert "digits_cnn.onnx.zst" in t.getnames() and "digits_cnn.onnx" not in t.getnames()
    assert packed.stat().st_size < 0.97 * plain.stat().st_size
    with BundleReader(packed) as reader:
        reader.verify(trusted_keys([keys["pub"]]), extract_to=tmp_path / "out")
    assert (tmp_path / "out" / "digits_cnn.onnx").read_bytes() == reference_model.read_bytes()


def test_a_flipped_bit_in_a_compressed_member_is_caught(make_bundle, keys, tmp_path):
    def edit(info, data):
        if info.name.endswith(".zst"):
            data = bytearray(data)
            data[len(data) // 2] ^= 0x01
        yield info, bytes(data)
    bad = rewrite(make_bundle(), tmp_path / "bad.efb", edit)
    with BundleReader(bad) as reader, pytest.raises(IntegrityError, match="SHA-256|decompress|bytes"):
        reader.verify(trusted_keys([keys["pub"]]), extract_to=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_compressed_member_that_expands_past_the_signed_size_is_cut_off(make_bundle, keys, tmp_path):
    """A zstd bomb: a few KiB that decompress to 64 MiB. Nothing past the declared size is written."""
    def edit(info, data):
        yield info, (zstd(b"\0" * (64 << 20)) if info.name.endswith(".zst") else data)
    bad = rewrite(make_bundle(), tmp_path / "bomb.efb", edit)
    with BundleReader(bad) as reader, pytest.raises(IntegrityError, match="more data than"):
        reader.verify(trusted_keys([keys["pub"]]), extract_to=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_compressed_member_that_needs_more_memory_than_a_device_allows_is_refused(make_bundle, keys, tmp_path,
                                                                                  reference_model):
    """zstd lets a frame ask for a 128 MiB window, allocated before the member's hash can be checked;
    a device decompresses with at most MAX_WINDOW."""
    import zstandard

    from device_agent.bundle.archive import MAX_WINDOW

    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=(2 * MAX_WINDOW).bit_length() - 1)
    packer = zstandard.ZstdCompressor(compression_params=params).compressobj()
    hungry = packer.compress(reference_model.read_bytes()) + packer.flush()
    assert zstandard.get_frame_parameters(hungry).window_size == 2 * MAX_WINDOW

    def edit(info, data):
        yield info, (hungry if info.name.endswith(".zst") else data)
    bad = rewrite(make_bundle(), tmp_path / "hungry.efb", edit)
    with BundleReader(bad) as reader, pytest.raises(IntegrityError, match="cannot decompress.*memory"):
        reader.verify(trusted_keys([keys["pub"]]), extract_to=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_big_model_is_packed_with_a_1_mib_zstd_window(tmp_path):
    """What a device must hold while it decompresses a member, however big the model."""
    import numpy as np
    import zstandard

    from device_agent.bundle.archive import _zstd_file

    weights = tmp_path / "weights.bin"
    weights.write_bytes(np.random.default_rng(0).standard_normal(2**20).astype(np.float32).tobytes())  # 4 MiB
    packed = _zstd_file(weights, tmp_path / "bundle")
    assert zstandard.get_frame_parameters(packed.read_bytes()[:18]).window_size == 1 << 20
    assert zstandard.ZstdDecompressor().decompress(packed.read_bytes(), max_output_size=8 << 20) == \
        weights.read_bytes()


def test_another_bundles_model_compressed_under_this_manifest_is_refused(make_bundle, keys, tmp_path):
    with tarfile.open(make_bundle("9.9.9", model=MODELS / "digits_cnn.tflite",
                                  input_name="serving_default_args_0", compress=False)) as t:
        foreign = t.extractfile("digits_cnn.tflite").read()

    def edit(info, data):
        yield info, (zstd(foreign) if info.name.endswith(".zst") else data)
    bad = rewrite(make_bundle(), tmp_path / "mixed.efb", edit)
    with BundleReader(bad) as reader, pytest.raises(IntegrityError):
        reader.verify(trusted_keys([keys["pub"]]), extract_to=tmp_path / "out")


def test_a_file_stored_both_plain_and_compressed_is_refused(make_bundle, keys, tmp_path, reference_model):
    def edit(info, data):
        yield info, data
        if info.name.endswith(".zst"):
            yield tarfile.TarInfo("digits_cnn.onnx"), reference_model.read_bytes()
    bad = rewrite(make_bundle(), tmp_path / "twice.efb", edit)
    with BundleReader(bad) as reader, pytest.raises(IntegrityError, match="differ from the manifest"):
        reader.verify(trusted_keys([keys["pub"]]), extract_to=tmp_path / "out")


def test_a_bundle_that_cannot_be_written_leaves_no_partial_file(keys, tmp_path, reference_model, heldout):
    """The bundle is written beside its name and renamed into place; when that fails (here a folder
    has the name), the partial file goes too."""
    from host_tools.packaging import build_bundle

    taken = tmp_path / "m-1.0.0.efb"
    taken.mkdir()
    with pytest.raises(IsADirectoryError):
        build_bundle(reference_model, name="m", version="1.0.0", key=keys["key"], out=taken,
                     sample={"image": heldout[0][:1]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-1.0.0.efb"] and not any(taken.iterdir())
