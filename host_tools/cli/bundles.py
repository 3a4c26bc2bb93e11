"""Building, inspecting and verifying bundles."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import click

from device_agent.cli import FiniteRange, fail_cleanly
from device_agent.errors import UNREADABLE_ARRAYS, ConfigError
from host_tools.cli.base import json_option, main


@main.group(help="Build, inspect and verify signed model bundles.")
def bundle() -> None:
    pass


@bundle.command("build", help="Package MODEL into a signed, versioned bundle.")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="Model name, e.g. digits-cnn.")
@click.option("--version", "version", required=True, help="Semantic version, e.g. 1.2.0.")
@click.option("--key", type=click.Path(path_type=Path), required=True, help="Private signing key (PEM).")
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Bundle file (default NAME-VERSION.efb).")
@click.option("--sample", type=click.Path(path_type=Path),
              help=".npz with one array per model input, named after it (a model of one input takes any one "
                   "array), used as the device's health-check input.")
@click.option("--atol", default=1e-3, show_default=True, help="Absolute tolerance of the sample check.")
@click.option("--latency-budget-ms", type=FiniteRange(0, min_open=True), default=None,
              help="Median sample latency a device must meet before it commits the bundle.")
@click.option("--release", type=click.IntRange(0), help="Release counter of this model name; devices refuse "
              "a lower one than they have committed [default: compare versions].")
@click.option("--expires-in-days", type=FiniteRange(min=0, min_open=True),
              help="Devices refuse the bundle after this many days [default: never].")
@click.option("--arch", multiple=True, help="CPU architecture the bundle runs on (uname -m, e.g. aarch64); repeatable.")
@click.option("--min-ram-mb", type=click.IntRange(1), help="RAM a device needs for this bundle.")
@click.option("--accelerator", type=click.Choice(["cuda", "tensorrt"]), help="Accelerator the bundle needs.")
@click.option("--compression-report", type=click.Path(path_type=Path),
              help="The JSON report of `edgefleet compress --report`: recorded in the manifest as the model's "
                   "provenance.")
@json_option
@fail_cleanly
def bundle_build(model, name, version, key, out, sample, atol, latency_budget_ms, release, expires_in_days,
                 arch, min_ram_mb, accelerator, compression_report, as_json) -> None:
    from device_agent.arrays import read_npz
    from host_tools.packaging import build_bundle

    out = out or Path(f"{name}-{version}.efb")
    if out.is_dir():
        raise ConfigError(f"-o {out} is a folder: give the bundle's file name (e.g. {out / f'{name}-{version}.efb'})")
    feeds = None
    if sample is not None:
        try:
            feeds = read_npz(sample)
        except UNREADABLE_ARRAYS as exc:
            raise ConfigError(f"cannot read sample file {sample}: {exc}") from None
    provenance = _read_report(compression_report) if compression_report else None
    target = {k: v for k, v in (("arch", list(arch)), ("min_ram_mb", min_ram_mb), ("accelerator", accelerator)) if v}
    manifest = build_bundle(model, name=name, version=version, key=key, out=out, sample=feeds, atol=atol,
                            latency_budget_ms=latency_budget_ms, release=release, target=target, compression=provenance,
                            expires_at=time.time() + expires_in_days * 86400 if expires_in_days else None)
    click.echo(json.dumps({"bundle": str(out), "manifest": manifest.to_dict()}) if as_json
               else f"wrote {out}: {manifest.label} ({out.stat().st_size} bytes)")


def _provenance_line(doc: dict) -> str:
    """One line of a compression report recorded in a manifest (the full JSON is in --json)."""
    try:
        steps = {s["label"]: s for s in doc["steps"]}
        result, original = steps[doc["result"]["label"]], doc["original"]
        fidelity = result.get("fidelity") or {}
        parts = [f"{doc['recipe']['name']} -> {result['label']}",
                 f"{result['size_bytes'] / original['size_bytes']:.2f}x size"]
        if result.get("latency_ratio") is not None:
            parts.append(f"{result['latency_ratio']:.2f}x p50")
        if fidelity.get("accuracy") is not None:  # (a detector's, on labelled boxes: its mAP50-95)
            metric = "mAP50-95" if doc.get("evaluation", {}).get("accuracy") else "accuracy"
            parts.append(f"{metric} {fidelity['accuracy'] * 100:.2f}% (drop {result.get('drop_points', 0):+.2f})")
        return ", ".join(parts)
    except (KeyError, TypeError, ZeroDivisionError):
        return json.dumps(doc)  # not written by `edgefleet compress`: show it as it is


def _when(unix: float | None) -> str:
    if unix is None:
        return "never"
    return datetime.fromtimestamp(unix, timezone.utc).isoformat(timespec="seconds") + \
        (" (expired)" if unix < time.time() else "")


def _target_line(target: dict) -> str:
    parts = [f"arch {'|'.join(target['arch'])}"] if target.get("arch") else []
    if target.get("min_ram_mb"):
        parts.append(f"RAM >= {target['min_ram_mb']} MB")
    if target.get("accelerator"):
        parts.append(target["accelerator"])
    return ", ".join(parts) or "any device"


def _read_report(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise ConfigError(f"cannot read compression report {path}: {exc}") from None
    if not isinstance(doc, dict) or "recipe" not in doc or "result" not in doc:
        raise ConfigError(f"{path} is not a report written by `edgefleet compress --report`")
    return doc


@bundle.command("inspect", help="Show a bundle's manifest (without checking its signature).")
@click.argument("bundle_path", type=click.Path(path_type=Path))
@json_option
@fail_cleanly
def bundle_inspect(bundle_path, as_json) -> None:
    from device_agent.bundle import BundleReader
    from device_agent.bundle.signing import Signature
    from device_agent.errors import SignatureError

    with BundleReader(bundle_path) as reader:
        m = reader.manifest
        try:
            signer = f"signed by key {Signature.from_json(reader.signature_bytes).key_id}"
        except SignatureError as exc:
            signer = f"signature unreadable: {exc}"
    if as_json:
        click.echo(json.dumps(m.to_dict()))
        return
    click.echo(f"{m.label}  runtime={m.runtime}  created={m.created_at}")
    click.echo(f"  release {'(by version)' if m.release is None else m.release}  expires {_when(m.expires_at)}"
               f"  target {_target_line(m.target)}")
    click.echo(f"  {signer} (not checked here; `edgefleet bundle verify` checks it)")
    for f in m.files:
        click.echo(f"  {f.path:<24} {f.size:>10} bytes  sha256 {f.sha256[:16]}…")
    for kind, specs in (("input", m.inputs), ("output", m.outputs)):
        for s in specs:
            click.echo(f"  {kind:<6} {s.name}: {s.dtype}{list(s.shape)}")
    if m.compression:
        click.echo(f"  compression: {_provenance_line(m.compression)}")
    if m.metrics:
        click.echo(f"  metrics: {json.dumps(m.metrics)}")


@bundle.command("verify", help="Check a bundle's signature and every file's hash against trusted keys.")
@click.argument("bundle_path", type=click.Path(path_type=Path))
@click.option("--key", "keys_", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Trusted public key (PEM); repeatable.")
@json_option
@fail_cleanly
def bundle_verify(bundle_path, keys_, as_json) -> None:
    from device_agent.bundle import BundleReader
    from device_agent.bundle.signing import trusted_keys

    with BundleReader(bundle_path) as reader:
        verified = reader.verify(trusted_keys(keys_))
    doc = {"bundle": str(bundle_path), "valid": True, "model": verified.manifest.label,
           "key_id": verified.key_id, "sha256": verified.sha256}
    click.echo(json.dumps(doc) if as_json else
               f"OK: {verified.manifest.label} signed by key {verified.key_id}, all files match")
