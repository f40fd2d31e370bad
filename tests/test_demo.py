"""`gateway demo` end to end: the real command in a child process, and the commands it prints, run
as printed from another directory."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from gateway.settings import environment
from gateway.testing import Speech, free_port

GATEWAY = str(Path(sys.executable).parent / "gateway")


def printed_commands(lines: list[str]) -> dict[str, list[str]]:
    """The commands the demo printed (indented lines), by what they do."""
    commands = [shlex.split(line.strip().split(": ", 1)[1] if line.strip().startswith("or ") else line.strip())
                for line in lines if line.startswith("   ")]
    found = {}
    for command in commands:
        text = " ".join(command)
        if " simulate " in text and "--carrier twilio" in text:
            found["simulate"] = command
        elif "/twilio/inbound" in text:
            found["inbound"] = command
        elif "-X POST" in text:
            found["dial"] = command
        elif text.endswith("/v1/calls"):
            found["calls"] = command
    return found


# The stand-in agent speaks, and the printed simulate command plays the caller, this many times
# faster than real time: the same conversation in a quarter of the time.
PACE = 4


@pytest.fixture
def demo(tmp_path):
    """`gateway demo` started as a user would, in an environment without the gateway's variables."""
    environ = {name: value for name, value in os.environ.items() if name not in environment()}
    process = subprocess.Popen([GATEWAY, "demo", "--port", str(free_port()), "--pace", str(PACE)], cwd=tmp_path, env=environ,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    errors: list[str] = []
    threading.Thread(target=lambda: errors.extend(process.stderr), daemon=True).start()
    for line in process.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith("Stop with Ctrl-C"):
            break
    else:
        process.wait(10)
        pytest.fail("gateway demo stopped before printing its commands:\n" + "".join(errors))
    yield process, lines, errors
    if process.poll() is None:
        process.kill()
        process.wait()


def run(command: list[str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def test_demo_prints_commands_that_work_as_printed(demo, tmp_path):
    process, lines, errors = demo
    commands = printed_commands(lines)
    assert set(commands) == {"simulate", "inbound", "dial", "calls"}, lines
    assert commands["simulate"][commands["simulate"].index("--pace") + 1] == str(PACE)
    config = Path(commands["simulate"][commands["simulate"].index("--config") + 1])
    assert config.is_file() and "gateway-demo-" in str(config.parent)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    # 1. The simulate line, from another directory: the agent's greeting, then its answer.
    simulated = run(commands["simulate"], elsewhere)
    assert simulated.returncode == 0, simulated.stderr
    with wave.open(str(elsewhere / "agent.wav"), "rb") as written:
        rate = written.getframerate()
        agent = np.frombuffer(written.readframes(written.getnframes()), dtype="<i2").astype(np.float64)
    greeting = np.frombuffer(Speech.shipped("greeting").at(rate), dtype="<i2").astype(np.float64)
    answer = np.frombuffer(Speech.shipped("answer").at(rate), dtype="<i2").astype(np.float64)
    assert abs(len(agent) - len(greeting) - len(answer)) < rate // 10, "the agent said its greeting and its answer"
    # It is that speech (through Twilio's mu-law), not noise of the right length.
    spoken = np.concatenate([greeting, answer])
    correlation = np.dot(agent[: len(spoken)], spoken[: len(agent)]) / (
        np.linalg.norm(agent[: len(spoken)]) * np.linalg.norm(spoken[: len(agent)]))
    assert correlation > 0.9

    # 2. The signed inbound webhook: the direct route's answer connects the call to Ultravox.
    inbound = run(commands["inbound"], elsewhere)
    assert inbound.returncode == 0 and "<Connect><Stream url=" in inbound.stdout, inbound.stdout + inbound.stderr

    # 3. The dialer API: the call is placed, and the fake callee picks it up.
    dialled = run(commands["dial"], elsewhere)
    call = json.loads(dialled.stdout)
    assert call["status"] == "queued" and call["route"] == "demo-direct", dialled.stdout
    for _ in range(200):
        calls = {c["id"]: c for c in json.loads(run(commands["calls"], elsewhere).stdout)["calls"]}
        if calls[call["id"]]["status"] in ("in-progress", "completed"):
            break
        time.sleep(0.05)
    assert calls[call["id"]]["ultravox_call_id"], calls[call["id"]]
    bridged = [c for c in calls.values() if c["route"] == "demo-bridge"]
    assert [c["status"] for c in bridged] == ["completed"] and bridged[0]["recording_parts"] == 1

    # Stopped, it leaves nothing behind.
    process.send_signal(signal.SIGTERM)
    assert process.wait(15) == 0, "".join(errors)
    assert not config.parent.exists()
    assert "Traceback" not in "".join(errors)


def test_demo_on_a_taken_port_says_so(tmp_path):
    taken = subprocess.Popen([GATEWAY, "demo", "--port", str(port := free_port())], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert taken.stdout is not None
        for line in taken.stdout:
            if line.startswith("Stop with Ctrl-C"):
                break
        second = run([GATEWAY, "demo", "--port", str(port)], tmp_path, timeout=30)
        assert second.returncode == 2
        assert f"cannot listen on 127.0.0.1:{port}" in second.stderr and "--port" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        taken.send_signal(signal.SIGTERM)
        taken.wait(15)
