"""dashboards/ against the real thing: promtool checks and unit-tests the alert rules; a real
Prometheus (Debian's, on a free port, temp storage, 1 s scrapes) scrapes a running `podagent run`
against hwsim's demo pod and must find data for every PromQL expression of the Grafana dashboard;
and a PDU that stops answering has its series vanish within two scrapes (no sample timestamps)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.publish.metrics_catalog import KNOWN, PLANNED
from tests.conftest import ROOT, SimPod, start_pod, stop_pod
from tests.conftest_mqtt import free_port
from tests.prom_helpers import get, parse

DASHBOARDS = ROOT / "dashboards"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(
    PROMTOOL is None or PROMETHEUS is None, reason="Debian package prometheus not installed"
)
# Dashboard expressions allowed to return nothing against the simulated pod, and why.
NO_DATA_OK = {
    'podagent_interlock_active{instance=~".*"} == 1': "series exist only while an interlock is tripped",
    'sum(podagent_node_up{instance=~".*"})': "no node agents in this stack (test_node_identity.py has them)",
}
RATE_WINDOW = "5s"  # $__rate_interval at a 1 s scrape interval


def dashboard_exprs() -> list[str]:
    dash = json.loads((DASHBOARDS / "podagent-pod.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    return [e.replace("$instance", ".*").replace("$__rate_interval", RATE_WINDOW) for e in exprs]


@needs_prometheus
def test_alert_rules_check_and_unit_tests() -> None:
    assert PROMTOOL is not None
    check = subprocess.run(
        [PROMTOOL, "check", "rules", "podagent-alerts.yml"], cwd=DASHBOARDS, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(
        [PROMTOOL, "test", "rules", "podagent-alerts.test.yml"],
        cwd=DASHBOARDS,
        capture_output=True,
        text=True,
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_dashboard_is_grafana_json_with_expressions() -> None:
    dash = json.loads((DASHBOARDS / "podagent-pod.json").read_text())
    assert dash["uid"] and dash["schemaVersion"] >= 36
    titles = {p["title"] for p in dash["panels"] if p["type"] == "row"}
    for part in ("Power", "Cooling", "Interlocks", "PDUs", "GPUs", "Link and spool"):
        assert any(part in t for t in titles), part
    assert len(dashboard_exprs()) >= 30


@dataclass
class Stack:
    pod: SimPod
    agent: subprocess.Popen[bytes]
    agent_url: str
    prom: subprocess.Popen[bytes]
    prom_url: str
    run_dir: Path

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
        body = json.loads(get(f"{self.prom_url}/api/v1/query?{urllib.parse.urlencode(params)}"))
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def metrics(self) -> str:
        return get(f"{self.agent_url}/metrics")


def _wait(what: str, predicate: Any, timeout: float, procs: list[subprocess.Popen[bytes]]) -> None:
    """Poll an external process' HTTP state until it holds (the processes are not ours to await)."""
    deadline = time.monotonic() + timeout
    while True:
        for p in procs:
            assert p.poll() is None, f"{p.args[0]} exited {p.returncode} while waiting for {what}"
        try:
            if predicate():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if PROMETHEUS is None:
        pytest.skip("Debian package prometheus not installed")
    run_dir = Path(tmp_path_factory.mktemp("promstack", numbered=True))
    pod = start_pod(run_dir / "pod", "demo")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        agent_port, prom_port = free_port(), free_port()
        extra = (
            f'[prometheus]\nlisten = "127.0.0.1:{agent_port}"\n\n'
            '[mqtt]\nenabled = true\nbrokers = ["127.0.0.1:1883"]\n'
            f'topic_root = "podagent-test/{os.getpid()}-{agent_port}"\n\n'
            "[power]\nenabled = true\ncontrol_period_s = 0.5\nsite_limit_w = 200000.0\n"
            "ramp_limit_w_per_s = 5000.0\n"
            'battery = "bms-1"\nsite_meter = "site-meter"\n'
        )
        config = run_dir / "podagent.toml"
        # 2 s polls: the demo pod at half the load (the scrape stays at 1 s).
        config.write_text(pod.agent_config(run_dir / "state", extra=extra, poll_interval_s=2.0))
        agent_log = (run_dir / "agent.log").open("wb")
        podagent = Path(sys.executable).parent / "podagent"
        agent = subprocess.Popen(
            [str(podagent), "run", "--config", str(config)],
            stdout=agent_log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        procs.append(agent)
        agent_url = f"http://127.0.0.1:{agent_port}"
        _wait(
            "the agent's first full poll",
            lambda: "\npodagent_ready 1\n" in get(f"{agent_url}/metrics"),
            60,
            procs,
        )
        prom_config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(DASHBOARDS / "podagent-alerts.yml")],
            "scrape_configs": [
                {"job_name": "podagent", "static_configs": [{"targets": [f"127.0.0.1:{agent_port}"]}]}
            ],
        }
        (run_dir / "prometheus.yml").write_text(json.dumps(prom_config))  # JSON is YAML
        prom_log = (run_dir / "prometheus.log").open("wb")
        prom = subprocess.Popen(
            [
                str(PROMETHEUS),
                f"--config.file={run_dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={run_dir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            stdout=prom_log,
            stderr=subprocess.STDOUT,
        )
        procs.append(prom)
        s = Stack(pod, agent, agent_url, prom, f"http://127.0.0.1:{prom_port}", run_dir)
        # Enough scrapes for rate() over the dashboard's window.
        _wait(
            "6 successful scrapes",
            lambda: any(float(r["value"][1]) >= 6 for r in s.query('sum_over_time(up{job="podagent"}[1m])')),
            60,
            procs,
        )
        yield s
    finally:
        for p in reversed(procs):
            _stop(p)
        stop_pod(pod)


@needs_prometheus
def test_every_dashboard_expression_returns_data(stack: Stack) -> None:
    # Asked again until each has answered once: on a loaded machine a Modbus unit can miss its
    # staleness limit for a moment, and its values are then (rightly) not exported.
    empty = [e for e in dashboard_exprs() if e not in NO_DATA_OK]
    deadline = time.monotonic() + 45
    while empty and time.monotonic() < deadline:
        empty = [e for e in empty if not stack.query(e)]
        if empty:
            time.sleep(0.5)
    assert empty == [], f"no data for: {empty}"
    # The alert rules load and evaluate in the real server.
    rules = json.loads(get(f"{stack.prom_url}/api/v1/rules"))["data"]["groups"]
    assert rules and all(r["health"] in ("ok", "unknown") for g in rules for r in g["rules"])


@needs_prometheus
def test_alert_test_series_are_what_the_agent_exports(stack: Stack) -> None:
    live = parse(stack.metrics())
    live_labels: dict[str, set[frozenset[str]]] = {}
    for s in live.samples:
        live_labels.setdefault(live.family_of(s.name), set()).add(frozenset(k for k, _ in s.labels))
    planned = {f.name for f in PLANNED}
    spec = (DASHBOARDS / "podagent-alerts.test.yml").read_text()
    series = re.findall(r"^\s*- series: '(\w+)\{(.*)\}'$", spec, re.M)
    assert len(series) >= 10
    for name, inner in series:
        labels = set(re.findall(r'(\w+)="', inner)) - {"job", "instance"}
        if name == "up" or name in planned:
            continue
        if name in live_labels:
            assert frozenset(labels) in live_labels[name], (name, labels, live_labels[name])
        else:  # exported only in some states (an interlock tripped): the catalog says its labels
            assert name in KNOWN and set(KNOWN[name].labels) == labels, name


@needs_prometheus
def test_failed_pdu_series_vanish_within_two_scrapes(stack: Stack) -> None:
    selector = 'podagent_pdu_phase_current_amperes{device="pdu-1"}'
    assert stack.query(selector) and stack.query("podagent_pod_power_watts")
    stack.pod.fault("snmp-timeout", "pdu-1")
    try:
        _wait(
            "the agent to drop pdu-1's values",
            lambda: 'podagent_pdu_phase_current_amperes{device="pdu-1"' not in stack.metrics(),
            60,
            [stack.agent, stack.prom],
        )
        gone_from_agent = time.time()
        _wait("Prometheus to see pdu-1's series go", lambda: not stack.query(selector), 30, [stack.prom])
        gone_from_prom = time.time()
        window_ms = max(1, int((gone_from_prom - gone_from_agent) * 1000))
        scrapes = stack.query(f'count_over_time(up{{job="podagent"}}[{window_ms}ms])', at=gone_from_prom)
        assert not scrapes or float(scrapes[0]["value"][1]) <= 2, scrapes
        # The pod total went with it (it needs every PDU); the device's health series stay.
        assert not stack.query("podagent_pod_power_watts")
        assert stack.query('podagent_device_up{device="pdu-1"} == 0')
        assert stack.query('podagent_device_data_age_seconds{device="pdu-1"}')
        assert stack.query('podagent_pdu_power_watts{device="pdu-2"}')  # the others unaffected
    finally:
        stack.pod.fault("snmp-timeout", "pdu-1", clear=True)
