"""Staged rollouts: a bundle goes to a fleet in stages (e.g. 10% → 50% → 100%), and a stage that
goes badly stops the rollout before the rest of the fleet sees the bundle.

A stage deploys to its share of the eligible devices (the registry's devices matching the
selector whose hardware the bundle's target allows), waits for each device's outcome, then
watches them for a health window before the next stage (the last stage is judged on what has
come in by the time its devices finish; a device's own trial period before it commits still
rolls back a crash or a crash loop after that). It is judged on what the devices report:

- the update lifecycle's outcomes: the share of the stage that failed or rolled back, against
  ``max_failure_rate``;
- model behaviour after activation, read from the telemetry in the fleet database (so `edgefleet
  monitor` must be running): the share of inference calls that failed on the new version against
  the previous version's on the same devices, against ``max_error_rate``; and each updated device's
  p99 latency in the window against its own p99 on the previous version before the rollout, against
  ``max_p99_ratio`` (the median over the stage's devices).

Crossing a threshold halts the rollout; with ``rollback_on_halt`` every device it updated is rolled
back then, else when the operator says (`edgefleet rollout rollback`). Devices that do not answer
(offline) are reported as pending: the command waits in their persistent session and runs when
they return. The rollout's state is kept in the fleet database (tables ``rollouts`` and
``rollout_devices``), so `edgefleet rollout status` reads it from anywhere and `edgefleet rollout
resume` carries on after the host restarts.
"""

from __future__ import annotations

import json
import math
import statistics
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from device_agent.bundle import BundleReader
from device_agent.errors import ConfigError
from device_agent.protocol.chunks import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE
from host_tools.deploy import Deployment, incompatible, run_rollback
from host_tools.fleet.store import FleetStore
from host_tools.fleet.view import matching
from host_tools.serve import BundleServer
from host_tools.terminal import listed

SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    rollout_id TEXT PRIMARY KEY,
    created    REAL NOT NULL,
    plan       TEXT NOT NULL,    -- RolloutPlan as JSON
    state      TEXT NOT NULL,    -- running, paused, halted, aborted, pending, done
    stage      INTEGER NOT NULL, -- the stage under way (0-based)
    reason     TEXT
);
CREATE TABLE IF NOT EXISTS rollout_devices (
    rollout_id TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    stage      INTEGER NOT NULL,
    state      TEXT NOT NULL,    -- queued, active, already_installed, failed, rolled_back, pending, skipped
    reason     TEXT,
    PRIMARY KEY (rollout_id, device_id)
);
"""
SUCCESS = ("active", "already_installed")
MIN_SAMPLES = 3  # telemetry samples per device and version before latency is compared
FAILURE = ("failed", "rolled_back")


def unfinished(state: str) -> bool:
    """Sent, with no outcome yet: queued, or in one of the device's update states (downloading,
    verifying, activating…) as last reported; after a host restart such a device is sent again."""
    return state not in SUCCESS + FAILURE + ("pending", "skipped")


def outstanding(state: str) -> bool:
    """Still owed an outcome after its stage: pending (did not answer in time) or unfinished."""
    return state == "pending" or unfinished(state)


@dataclass
class RolloutPlan:
    bundle: str                       # path of the bundle file
    selectors: list[str]              # NAME=VALUE label selectors (a group is group=NAME)
    stages: list[float] = field(default_factory=lambda: [10.0, 50.0, 100.0])  # cumulative % of the fleet
    window_s: float = 60.0            # health window after each stage
    stage_timeout_s: float = 300.0    # how long a stage waits for its devices' outcomes
    max_failure_rate: float = 0.1
    max_p99_ratio: float | None = 1.5
    max_error_rate: float | None = 0.02  # the new version's inference error share may exceed the old's by this
    rollback_on_halt: bool = False
    pending_timeout_s: float = 600.0  # after the last stage, how long to wait for devices that were offline
    max_in_flight: int | None = None  # devices updating at once within a stage (waves); None: the whole stage
    devices: list[str] = field(default_factory=list)  # explicit device ids, instead of selectors
    chunk_size: int = DEFAULT_CHUNK_SIZE  # transfer chunk size offered to devices (the broker's packet limit)

    def __post_init__(self) -> None:
        if not self.stages or any(not 0 < s <= 100 for s in self.stages) or self.stages != sorted(self.stages):
            raise ConfigError("stages are increasing percentages of the fleet, the last one at most 100")
        if self.stages[-1] != 100:
            self.stages = [*self.stages, 100.0]
        if not 0 <= self.max_failure_rate <= 1:
            raise ConfigError("max failure rate is a fraction between 0 and 1")
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ConfigError("max in flight is at least 1 device")
        if not MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise ConfigError("chunk size is 1 KiB to 1 MiB")


class RolloutStore:
    def __init__(self, store: FleetStore) -> None:
        self.fleet = store  # one database: the registry, telemetry and rollouts
        store.ensure_schema(SCHEMA)

    def _execute(self, sql: str, args: tuple = ()) -> list[tuple]:
        return self.fleet.run(sql, args)

    def create(self, plan: RolloutPlan) -> str:
        rollout_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        self._execute("INSERT INTO rollouts VALUES (?,?,?,?,?,?)",
                      (rollout_id, time.time(), json.dumps(asdict(plan)), "running", 0, None))
        return rollout_id

    def get(self, rollout_id: str) -> dict[str, Any]:
        rows = self._execute("SELECT rollout_id, created, plan, state, stage, reason FROM rollouts WHERE rollout_id=?",
                             (rollout_id,))
        if not rows:
            raise ConfigError(f"no rollout {rollout_id!r}")
        r = rows[0]
        devices = self._execute("SELECT device_id, stage, state, reason FROM rollout_devices WHERE rollout_id=? "
                                "ORDER BY stage, device_id", (rollout_id,))
        return {"rollout_id": r[0], "created": r[1], "plan": json.loads(r[2]), "state": r[3], "stage": r[4],
                "reason": r[5], "devices": [{"device_id": d[0], "stage": d[1], "state": d[2], "reason": d[3]}
                                            for d in devices]}

    def all(self) -> list[dict[str, Any]]:
        ids = self._execute("SELECT rollout_id FROM rollouts ORDER BY created")
        return [self.get(i) for (i,) in ids]

    def set_state(self, rollout_id: str, state: str, *, stage: int | None = None, reason: str | None = None) -> None:
        self._execute("UPDATE rollouts SET state=?, stage=COALESCE(?, stage), reason=? WHERE rollout_id=?",
                      (state, stage, reason, rollout_id))

    def set_plan(self, rollout_id: str, plan: RolloutPlan) -> None:
        self._execute("UPDATE rollouts SET plan=? WHERE rollout_id=?", (json.dumps(asdict(plan)), rollout_id))

    def set_device(self, rollout_id: str, device: str, stage: int, state: str, reason: str | None = None) -> None:
        self.set_devices(rollout_id, stage, {device: (state, reason)})

    def set_devices(self, rollout_id: str, stage: int, states: dict[str, tuple[str, str | None]]) -> None:
        """{device: (state, reason)} of one stage, in one transaction."""
        self.fleet.run_many("INSERT OR REPLACE INTO rollout_devices VALUES (?,?,?,?,?)",
                            [(rollout_id, d, stage, state, why) for d, (state, why) in states.items()])

    def updated(self, rollout_id: str) -> dict[str, int]:
        """{device: its stage} of the devices this rollout left on its version."""
        return {d["device_id"]: d["stage"] for d in self.get(rollout_id)["devices"]
                if d["state"] in SUCCESS and d["stage"] >= 0}

    def rolled_back(self, rollout_id: str, updated: dict[str, int], results: dict, why: str) -> None:
        """Record the outcomes (*results*: DeviceProgress by device) of rolling back *updated*."""
        for device, p in results.items():
            back = p.state == "rolled_back"
            self.set_device(rollout_id, device, updated[device], "rolled_back" if back else "pending",
                            f"rolled back: {why}" if back else p.reason)


class _Subset:
    """Some of a deployment's devices, followed like a deployment."""

    def __init__(self, deployment: Deployment, devices: list[str]) -> None:
        self._deployment, self.devices, self.progress = deployment, devices, deployment.progress

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not all(self.progress[d].done for d in self.devices) and time.monotonic() < deadline:
            self._deployment.wait(min(0.5, deadline - time.monotonic()))


class Rollout:
    """Runs one rollout to its end (done, halted, aborted) or until paused; safe to run again."""

    def __init__(self, store: RolloutStore, rollout_id: str, client, signer,
                 log: Callable[[str], None] = lambda line: None,
                 progress: Callable[[int, Counter], None] = lambda stage, counts: None) -> None:
        self.store, self.rollout_id, self.client, self.signer = store, rollout_id, client, signer
        self.log, self.progress = log, progress  # progress: (stage, devices per state) as they change
        self._deployments: list[Deployment] = []
        self.server: BundleServer | None = None
        self._p99_before: dict[str, float] = {}  # the previous version's, measured when run() starts
        self._errors_before: tuple[float | None, int] = (None, 0)
        doc = store.get(rollout_id)
        self.plan = RolloutPlan(**doc["plan"])
        with BundleReader(Path(self.plan.bundle)) as reader:
            self.manifest = reader.manifest

    def eligible(self) -> tuple[list[str], dict[str, str]]:
        """(devices this rollout is for, {device: why skipped}) from the registry, in a stable order."""
        rows = self.store.fleet.devices()
        if self.plan.devices:
            rows = [r for r in rows if r.device_id in self.plan.devices]
            unknown = sorted(set(self.plan.devices) - {r.device_id for r in rows})
        else:
            rows, unknown = matching(rows, self.plan.selectors), []
        skipped = incompatible([r.device_id for r in rows], self.manifest.target,
                               {r.device_id: r.hardware for r in rows})
        skipped.update({d: "skipped: not in the registry (never connected)" for d in unknown})
        return sorted(r.device_id for r in rows if r.device_id not in skipped), skipped

    def run(self) -> dict[str, Any]:
        doc = self.store.get(self.rollout_id)
        if doc["state"] not in ("running",):
            return doc
        devices, skipped = self.eligible()
        for device, why in skipped.items():
            self.store.set_device(self.rollout_id, device, -1, "skipped", why)
        if not devices:
            self.store.set_state(self.rollout_id, "halted", reason="no eligible device")
            return self.store.get(self.rollout_id)
        # the version before, on the same devices, in its last ten minutes
        before = self._inference(devices, time.time() - 600, exclude=self.manifest.label)
        self._p99_before, self._errors_before = _p99(before, last=10), _error_rate(before)
        server = self.server = BundleServer(self.client, chunk_size=self.plan.chunk_size)  # its stats stay readable
        server.start()
        try:
            for stage in range(doc["stage"], len(self.plan.stages)):
                state = self.store.get(self.rollout_id)["state"]
                if state != "running":  # paused or aborted from another terminal
                    self.log(f"rollout {state}; stopping before stage {stage + 1}")
                    return self.store.get(self.rollout_id)
                self.store.set_state(self.rollout_id, "running", stage=stage)
                verdict = self._stage(stage, devices, server)
                if verdict:
                    self.store.set_state(self.rollout_id, "halted", reason=verdict)
                    self.log(f"halted at stage {stage + 1}: {verdict}")
                    if self.plan.rollback_on_halt:
                        self._roll_back()
                    elif updated := self.store.updated(self.rollout_id):
                        self.log(f"{len(updated)} device(s) stay on {self.manifest.label}; `edgefleet rollout "
                                 f"rollback {self.rollout_id}` takes them back")
                    return self.store.get(self.rollout_id)
            waiting = self._wait_for_pending(server)
            if waiting:
                self.store.set_state(self.rollout_id, "pending", stage=len(self.plan.stages) - 1,
                                     reason=f"{waiting} device(s) have not answered; `edgefleet rollout resume "
                                            f"{self.rollout_id}` sends them the bundle again")
            else:
                self.store.set_state(self.rollout_id, "done", stage=len(self.plan.stages) - 1)
            return self.store.get(self.rollout_id)
        finally:
            server.stop()

    # -- one stage ------------------------------------------------------------------------
    def _stage(self, stage: int, devices: list[str], server: BundleServer) -> str | None:
        """Deploy to this stage's devices and judge them; returns why to halt, or None."""
        started = time.time()
        rows = self.store.get(self.rollout_id)["devices"]
        # queued or mid-update when the host stopped, with no outcome recorded: they are sent
        # again (a device that already has the bundle answers already_installed)
        requeued = [d["device_id"] for d in rows if d["stage"] == stage and unfinished(d["state"])]
        done = {d["device_id"] for d in rows if d["stage"] >= 0}
        want = math.ceil(len(devices) * self.plan.stages[stage] / 100)
        batch = requeued + [d for d in devices if d not in done][:max(0, want - len(done))]
        self.log(f"stage {stage + 1}/{len(self.plan.stages)} ({self.plan.stages[stage]:g}%): {len(batch)} device(s)")
        # At most max_in_flight devices updating at once: waves, each followed to its outcomes and
        # judged before the next is sent
        size = self.plan.max_in_flight or max(1, len(batch))
        finished: Counter = Counter()
        for first in range(0, max(1, len(batch)), size):
            if wave := batch[first:first + size]:
                self.store.set_devices(self.rollout_id, stage, {d: ("queued", None) for d in wave})
                finished += self._follow(self._deploy(server, wave), stage, self.plan.stage_timeout_s, finished)
            verdict = self._failure_verdict(stage)
            if verdict:
                return verdict
        stage_rows = [d for d in self.store.get(self.rollout_id)["devices"] if d["stage"] == stage]
        last = stage == len(self.plan.stages) - 1  # no stage after it to hold back: not watched
        if self.plan.window_s > 0 and not last:
            self.log(f"watching stage {stage + 1} for {self.plan.window_s:g}s")
            time.sleep(self.plan.window_s)
        updated = [d["device_id"] for d in stage_rows if d["state"] == "active"]
        after = self._inference(updated, started, only=self.manifest.label)
        return self._error_verdict(after) or self._latency_verdict(updated, after, watched=not last)

    def _failure_verdict(self, stage: int) -> str | None:
        answered = [d for d in self.store.get(self.rollout_id)["devices"]
                    if d["stage"] == stage and d["state"] in SUCCESS + FAILURE]
        failed = [d for d in answered if d["state"] in FAILURE]
        if answered and len(failed) / len(answered) > self.plan.max_failure_rate:
            return (f"{len(failed)} of {len(answered)} devices in the stage failed "
                    f"(more than {self.plan.max_failure_rate:.0%}): {_by_reason(failed)}")
        return None

    def _deploy(self, server: BundleServer, devices: list[str]) -> Deployment:
        deployment = Deployment(self.client, server, Path(self.plan.bundle), devices, self.signer)
        deployment.start()
        self._deployments.append(deployment)
        return deployment

    def _follow(self, deployment: Deployment, stage: int, timeout: float, earlier: Counter | None = None) -> Counter:
        """Record the devices' states as they change (so `rollout status` is live from anywhere)
        until each has an outcome or *timeout* passes; those without one are pending. Returns
        their final states' counts (*earlier*: the stage's earlier waves', for the progress line)."""
        deadline = time.monotonic() + timeout
        recorded: dict[str, tuple[str, str | None]] = {}
        while True:
            remaining = deadline - time.monotonic()
            deployment.wait(max(0.0, min(1.0, remaining)))
            now = {d: deployment.progress[d] for d in deployment.devices}  # as reported so far
            last = all(p.done for p in now.values()) or remaining <= 1.0
            changed = {}
            for device, p in now.items():
                # no outcome yet: still queued (no event) or in its update state, pending at the end
                state = p.state if p.done else "pending" if last else "queued" if p.state == "pending" else p.state
                if recorded.get(device) != (state, p.reason):
                    changed[device] = recorded[device] = (state, p.reason)
            if changed:
                self.store.set_devices(self.rollout_id, stage, changed)
                self.progress(stage, Counter(st for st, _ in recorded.values()) + (earlier or Counter()))
            if last:
                return Counter(st for st, _ in recorded.values())

    def _wait_for_pending(self, server: BundleServer) -> int:
        """After the last stage: wait up to pending_timeout_s for the devices that had not answered
        in their stage (offline ones get the command from their persistent session when they
        return); devices this process did not send it to (a resumed rollout) are sent it again.
        Returns how many are still pending."""
        rows = [d for d in self.store.get(self.rollout_id)["devices"] if outstanding(d["state"])]
        if not rows or self.plan.pending_timeout_s <= 0:
            return len(rows)
        self.log(f"waiting for {len(rows)} pending device(s), up to {self.plan.pending_timeout_s:g}s")
        followed = {d for dep in self._deployments for d in dep.devices}
        stage_of = {d["device_id"]: d["stage"] for d in rows}
        resend = [d for d in stage_of if d not in followed]
        if resend:
            self._deploy(server, resend)
        deadline = time.monotonic() + self.plan.pending_timeout_s
        for deployment in self._deployments:
            mine = [d for d in deployment.devices if d in stage_of]
            for stage in sorted({stage_of[d] for d in mine}):
                # one stage's devices at a time, so each is recorded under its own stage
                self._follow(_Subset(deployment, [d for d in mine if stage_of[d] == stage]), stage,
                             max(0.0, deadline - time.monotonic()))
        return sum(outstanding(d["state"]) for d in self.store.get(self.rollout_id)["devices"])

    def _inference(self, devices: list[str], since: float, *, only: str | None = None,
                   exclude: str | None = None) -> dict[str, list[dict]]:
        """Each device's inference readings since *since*, oldest first, from the version *only*
        (or any version but *exclude*): one read of the telemetry for every verdict."""
        return {device: [r["inference"] for _, bundle, r in self.store.fleet.series(device, since)
                         if (only is None or bundle == only) and (exclude is None or bundle != exclude)
                         and isinstance(r.get("inference"), dict)]
                for device in devices}

    def _error_verdict(self, after: dict[str, list[dict]]) -> str | None:
        if self.plan.max_error_rate is None or not after:
            return None
        rate, calls = _error_rate(after)
        before = self._errors_before[0] or 0.0  # no calls before: judged against none failing
        if rate is not None and calls >= MIN_SAMPLES and rate - before > self.plan.max_error_rate:
            return (f"{rate:.1%} of inference calls on the new version failed ({calls} calls), against "
                    f"{before:.1%} on the previous version (limit +{self.plan.max_error_rate:.1%})")
        return None

    def _latency_verdict(self, updated: list[str], after: dict[str, list[dict]], *, watched: bool) -> str | None:
        """*watched*: the stage had its window (every stage but the last), so a longer one would have
        given the new version more time to report."""
        if self.plan.max_p99_ratio is None or not updated:
            return None
        baseline, now = self._p99_before, _p99(after)
        ratios = [now[d] / baseline[d] for d in updated if d in now and baseline.get(d)]
        if not ratios:
            why = ("a longer --window gives the new version time to report" if watched else
                   "the last stage is not watched: no later stage waits on it")
            self.log(f"fewer than {MIN_SAMPLES} latency samples from before and after on the same devices "
                     f"(before: {len(baseline)} devices, after: {len(now)} of {len(updated)}): judged on outcomes "
                     f"only ({why})")
            return None
        ratio = statistics.median(ratios)
        if ratio > self.plan.max_p99_ratio:
            return (f"p99 latency is {ratio:.2f}x the previous version's on the same devices "
                    f"(limit {self.plan.max_p99_ratio:g}x)")
        return None

    def _roll_back(self) -> None:
        """Take every device this rollout updated back to its previous version."""
        updated = self.store.updated(self.rollout_id)
        if not updated:
            return
        self.log(f"rolling back {len(updated)} device(s)")
        results = run_rollback(self.client, list(updated), signer=self.signer, timeout=self.plan.stage_timeout_s)
        self.store.rolled_back(self.rollout_id, updated, results, "the rollout halted")


def _p99(readings: dict[str, list[dict]], last: int | None = None) -> dict[str, float]:
    """Each device's median p99 over its readings (with *last*, its newest *last*), for devices with
    at least MIN_SAMPLES of them (one interval's p99 is too noisy to halt a rollout on)."""
    out = {}
    for device, inference in readings.items():
        values = [i["p99_ms"] for i in inference if i.get("p99_ms") is not None]
        values = values[-last:] if last else values
        if len(values) >= MIN_SAMPLES:
            out[device] = statistics.median(values)
    return out


def _error_rate(readings: dict[str, list[dict]]) -> tuple[float | None, int]:
    """(share of inference calls that failed, calls) over all *readings*; (None, 0) without calls."""
    errors = calls = 0
    for inference in readings.values():
        for i in inference:
            errors += i.get("errors") or 0
            calls += (i.get("count") or 0) + (i.get("errors") or 0)
    return (errors / calls if calls else None), calls


def _by_reason(failed: list[dict], reasons: int = 3, devices: int = 3) -> str:
    """The failed devices grouped by why, the commonest reason first: a fleet's failures are mostly
    one fault, said once with the devices it hit ("… (sim-0004, sim-0009 and 12 more)")."""
    groups: dict[str, list[str]] = {}
    for d in failed:
        groups.setdefault(d["reason"] or "no reason given", []).append(d["device_id"])
    ranked = sorted(groups.items(), key=lambda item: -len(item[1]))
    said = [f"{reason} ({listed(ids, devices)})" for reason, ids in ranked[:reasons]]
    others = sum(len(ids) for _, ids in ranked[reasons:])
    return "; ".join(said) + (f"; {others} more for other reasons" if others else "")
