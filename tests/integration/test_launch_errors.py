"""Bad input to the launcher: one clear error line, exit status 2, no traceback, no process left."""

import subprocess
import sys

import pytest

PROG = [sys.executable, "-m", "sgl_elastic.launch_server"]


def launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*PROG, *args], capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize(
    "args,needle",
    [
        ((), "the following arguments are required: --model-path"),
        (("--model-path", "/nonexistent/model"), "--model-path /nonexistent/model: no such file or directory"),
        (("--model-path", "{model}", "--no-such-flag"), "unrecognized arguments: --no-such-flag"),
        (("--model-path", "{model}", "--tp", "2", "--elastic-tp-widths", "1,1,1"),
         "gives 3 widths (1,1,1) but --tp-size is 2"),
        (("--model-path", "{model}", "--elastic-tp-widths", "2,zero"), "expected comma-separated integers"),
        (("--model-path", "{model}", "--elastic-width-policy", "random"), "invalid choice: 'random'"),
        (("--model-path", "{model}", "--elastic-daemon", "--radix-cache-backend", "other"),
         "--elastic-daemon keeps the prefix cache in the daemon: drop --radix-cache-backend"),
        (("--model-path", "{model}", "--elastic-daemon", "--load-format", "dummy"),
         "the state daemon reads safetensors checkpoints (got --load-format dummy)"),
    ],
    ids=["no-model-path", "missing-model", "bad-flag", "widths-count", "widths-syntax", "bad-policy",
         "daemon-radix-backend", "daemon-load-format"],
)
def test_bad_input(args, needle, tiny_models):
    args = [a.replace("{model}", str(tiny_models["qwen3-moe"])) for a in args]
    r = launch(*args)
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert needle in r.stderr
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    assert len(r.stderr.strip().splitlines()) <= 3, r.stderr  # no usage wall
