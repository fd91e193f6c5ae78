"""``hwsim nodes``: a node agent per simulated server behind a proxy, and the node faults
(node-partition, node-kill, node-hang) as the controller and the nodes see them."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agent.config import load_config
from agent.interlocks.service import InterlockService
from tests.agent_helpers import running_agent
from tests.conftest import ROOT, SimPod
from tests.test_node_e2e import (
    CONTROLLER_EXTRA,
    FAILSAFE_W,
    duo,
    fresh,
    gpu_ids,
    still_polled,
    until_agent,
    until_truth,
)


def hwsim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hwsim.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@contextmanager
def hwsim_nodes(pod: SimPod) -> Iterator[dict[str, Any]]:
    manifest = str(pod.run_dir / "manifest.json")
    log = (pod.run_dir / "nodes.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hwsim.cli",
            "nodes",
            "--manifest",
            manifest,
            "--poll-interval",
            "1.0",
            "--lost-after",
            "3",
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    path = pod.run_dir / "nodes.json"
    try:
        deadline = time.monotonic() + 30
        while not path.exists():
            assert proc.poll() is None, (pod.run_dir / "nodes.log").read_text()
            assert time.monotonic() < deadline, "hwsim nodes wrote no nodes.json"
            time.sleep(0.05)
        nodes = json.loads(path.read_text())
        for n in nodes["nodes"]:  # armed: first NVML poll done
            log_path = Path(n["log"])
            while "node interlocks armed" not in (log_path.read_text() if log_path.exists() else ""):
                assert time.monotonic() < deadline, f"{n['id']} not armed"
                time.sleep(0.05)
        yield nodes
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def node_fault(pod: SimPod, name: str, device: str, *, clear: bool = False) -> None:
    args = ["fault", name, "--device", device, "--manifest", str(pod.run_dir / "manifest.json")]
    done = hwsim(*args, *(["--clear"] if clear else []))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["fault"] == {**json.loads(done.stdout)["fault"], "active": not clear}


async def test_node_faults_through_hwsim_nodes(tmp_path: Path) -> None:
    with duo(tmp_path) as pod, hwsim_nodes(pod) as nodes:
        assert [n["id"] for n in nodes["nodes"]] == ["srv-0", "srv-1"]
        out = hwsim(
            "agent-config",
            "--manifest",
            str(pod.run_dir / "manifest.json"),
            "--nodes",
            "--state-dir",
            str(tmp_path / "st"),
        )
        assert out.returncode == 0, out.stderr
        # Wiring by server; each node device says how many GPUs its server has.
        assert out.stdout.count('servers = ["srv-0", "srv-1"]') >= 2 and "gpus = 4" in out.stdout
        assert "srv-0-gpu" not in out.stdout
        node_cfg = hwsim("agent-config", "--manifest", str(pod.run_dir / "manifest.json"), "--node", "srv-1")
        assert 'id = "srv-1"' in node_cfg.stdout and "hwsim_server = 1" in node_cfg.stdout
        path = tmp_path / "ctl.toml"
        path.write_text(
            out.stdout.replace("[paths]", CONTROLLER_EXTRA + "\n[prometheus]\nenabled = false\n\n[paths]", 1)
        )
        assert [d.kind for d in load_config(path).device].count("node") == 2
        service = InterlockService(load_config(path).interlocks)
        async with running_agent(path, services=[service]) as agent:
            everything = [g for s in (0, 1) for g in gpu_ids(s)]
            await until_agent(
                agent, lambda: all(fresh(agent, g) for g in everything), within=20, what="fresh"
            )

            # Partition: the controller loses srv-1's GPUs, srv-1 loses its controller (fail-safe).
            node_fault(pod, "node-partition", "srv-1")
            await until_agent(
                agent, lambda: not any(fresh(agent, g) for g in gpu_ids(1)), within=10, what="srv-1 stale"
            )
            await still_polled(agent, gpu_ids(0))
            await until_truth(
                pod, lambda lim: lim[4:] == [FAILSAFE_W] * 4, within=15, what="srv-1 at its fail-safe"
            )
            # srv-0 is still under its controller (it says so in its metrics, via the controller).
            assert agent.store.value("srv-0", "node_controller_lost") == 0.0
            assert agent.store.value("srv-0", "node_lease_hold") == 0.0
            node_fault(pod, "node-partition", "srv-1", clear=True)
            await until_agent(
                agent, lambda: all(fresh(agent, g) for g in gpu_ids(1)), within=15, what="srv-1 back"
            )

            # Kill and hang: stale on the controller, back after the clear.
            for fault in ("node-kill", "node-hang"):
                node_fault(pod, fault, "srv-0")
                await until_agent(
                    agent,
                    lambda: not any(fresh(agent, g) for g in gpu_ids(0)),
                    within=10,
                    what=f"{fault}: stale",
                )
                await still_polled(agent, gpu_ids(1))
                node_fault(pod, fault, "srv-0", clear=True)
                await until_agent(
                    agent, lambda: all(fresh(agent, g) for g in gpu_ids(0)), within=20, what=f"{fault}: back"
                )
        await asyncio.sleep(0)
