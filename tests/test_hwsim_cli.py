"""hwsim's command line: run/stop cleanly, faults from outside, scenarios, clear errors on bad input."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import SimPod, start_pod, stop_pod

HWSIM = [sys.executable, "-m", "hwsim.cli"]


def hwsim(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HWSIM, *args], capture_output=True, text=True, timeout=timeout)


def test_fault_and_status_from_the_command_line(tiny_pod: SimPod) -> None:
    manifest = str(tiny_pod.run_dir / "manifest.json")
    res = hwsim("fault", "chiller-trip", "--manifest", manifest)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"fault": "chiller-trip", "device": "chiller-1", "active": True}
    status = json.loads(hwsim("status", "--manifest", manifest).stdout)
    assert status["faults"][0]["fault"] == "chiller-trip"
    assert tiny_pod.state()["chillers"][0]["tripped"] is True
    res = hwsim("fault", "chiller-trip", "--clear", "--manifest", manifest)
    assert json.loads(res.stdout)["active"] is False
    assert tiny_pod.state()["chillers"][0]["tripped"] is False
    bad = hwsim("fault", "gpu-lost", "--device", "pdu-a", "--manifest", manifest)
    assert bad.returncode == 1 and "not a GPU" in bad.stderr


def test_manifest_lists_every_endpoint(tiny_pod: SimPod) -> None:
    m = tiny_pod.manifest
    assert {e["device"] for e in m["snmp"]} == {"pdu-a", "pdu-b"}
    assert {e["device"] for e in m["modbus"]} == {"cdu-1", "chiller-1", "meter-1"}
    rtu = [e for e in m["modbus"] if "serial" in e]
    assert len(rtu) == 2 and rtu[0]["serial"] == rtu[1]["serial"]  # two units share one line
    assert Path(m["nvml"]["state"]).exists() and m["nvml"]["gpus"] == 8
    v3 = next(e for e in m["snmp"] if e["version"] == "3")
    assert v3["user"] and v3["auth_key"] and v3["priv_key"]


def test_sigterm_stops_cleanly_with_no_leftover_ports(tmp_path: Path) -> None:
    pod = start_pod(tmp_path / "p")
    ports = [e["port"] for e in pod.manifest["snmp"]] + [
        e["port"] for e in pod.manifest["modbus"] if "port" in e
    ]
    pod.proc.send_signal(signal.SIGTERM)
    assert pod.proc.wait(15) == 0
    for port in ports:  # every port can be bound again at once
        proto = socket.SOCK_DGRAM if port in [e["port"] for e in pod.manifest["snmp"]] else socket.SOCK_STREAM
        with socket.socket(socket.AF_INET, proto) as s:
            s.bind(("127.0.0.1", port))
    assert not (tmp_path / "p" / "manifest.json").exists()
    assert not (tmp_path / "p" / "control.sock").exists()
    assert not Path(pod.manifest["nvml"]["state"]).exists()
    procs = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    assert not [p for p in procs if p.startswith("socat") and str(tmp_path) in p]  # no orphan pty pair


def test_unknown_pod_is_one_clear_line() -> None:
    res = hwsim("run", "--pod", "enormous")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "hwsim: unknown pod 'enormous': not one of tiny, demo, full and no such file enormous"
    ]


def test_malformed_scenario_is_one_clear_line(tmp_path: Path) -> None:
    bad = tmp_path / "s.toml"
    bad.write_text('[[step]]\nat_s = 5\nfault = "meteor-strike"\n')
    res = hwsim("run", "--pod", "tiny", "--run-dir", str(tmp_path / "r"), "--scenario", str(bad))
    assert res.returncode == 2
    (line,) = res.stderr.strip().splitlines()
    assert str(bad) in line and "step.0" in line and "meteor-strike" in line


def test_port_in_use_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        pod_file = tmp_path / "pod.toml"
        text = (Path(__file__).resolve().parent.parent / "hwsim" / "pods" / "tiny.toml").read_text()
        pod_file.write_text(
            text.replace(
                'snmp = { version = "2c", community = "public" }',
                f'snmp = {{ version = "2c", community = "public", port = {port} }}',
            )
        )
        res = hwsim("run", "--pod", str(pod_file), "--run-dir", str(tmp_path / "r"))
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("hwsim:")]
    assert len(lines) == 1 and str(port) in lines[0] and "in use" in lines[0]


def test_scenario_timeline_runs_in_simulated_time(tmp_path: Path) -> None:
    scenario = tmp_path / "s.toml"
    scenario.write_text(
        'name = "trip and clear"\n[[step]]\nat_s = 1\nfault = "chiller-trip"\n'
        '[[step]]\nat_s = 6\nfault = "chiller-trip"\nclear = true\n'
        '[[step]]\nat_s = 2\nworkload = "idle"\n'
    )
    pod = start_pod(tmp_path / "p", speed=5.0, extra=["--scenario", str(scenario)])
    try:
        seen_trip = False
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status = pod.request(cmd="status")
            if status["faults"]:
                seen_trip = True
            if status["sim_time_s"] > 7:
                break
            time.sleep(0.05)
        assert seen_trip
        status = pod.request(cmd="status")
        assert status["faults"] == [] and status["workload"] == "idle"
        assert status["sim_time_s"] > 7  # 5x real time
    finally:
        stop_pod(pod)


@pytest.mark.parametrize("cmd", [["snmpget", "-v2c", "-c", "public", "-t", "1", "-r", "0"]])
def test_real_net_snmp_reads_the_running_pod(tiny_pod: SimPod, cmd: list[str]) -> None:
    entry = next(e for e in tiny_pod.manifest["snmp"] if e["version"] == "2c")
    # rPDU2 phase 1 current (tenths of A), as a real APC PDU serves it.
    res = subprocess.run(
        [*cmd, f"127.0.0.1:{entry['port']}", "1.3.6.1.4.1.318.1.1.26.6.3.1.5.1"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert res.returncode == 0 and "INTEGER" in res.stdout, res.stdout + res.stderr
