"""``--profile``: sample the gateway with py-spy during an extra (unmeasured) load run.

py-spy samples from outside the process (``--nonblocking``: it never pauses the gateway), so
the gateway runs its normal code. The output per scenario is the folded stacks
(``profile-<scenario>.folded``, for flame graph tools and speedscope) and a summary of the
hottest functions by self and inclusive time (``profile-<scenario>.txt``). Time spent inside
C calls (a socket send, uvloop's epoll loop) shows as self time of the Python line that made
the call; /proc's user/sys split in the results says how much of it is the kernel.
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from pathlib import Path


def find_py_spy() -> str | None:
    return shutil.which("py-spy")


def start(binary: str, pid: int, duration: int, folded: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            binary, "record", "--pid", str(pid), "--duration", str(duration), "--rate", "250",
            "--nonblocking", "--format", "raw", "--output", str(folded),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip


def summarise(folded: Path, header: str = "", top: int = 30) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        return "no samples\n"
    lines = [header] if header else []
    lines += [f"{total} samples", "", "self time (the line itself, including C calls it makes):"]
    lines += [f"{100 * n / total:6.1f}%  {f}" for f, n in own.most_common(top)]
    lines += ["", "inclusive time:"]
    lines += [f"{100 * n / total:6.1f}%  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(lines) + "\n"
