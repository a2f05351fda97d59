"""CPU time of a process tree from /proc, in microseconds.

    cpu = TreeCpu(pid); before = cpu.sample(); ...; used_us = cpu.sample() - before

utime+stime of the process and of all its live descendants (each /proc/PID/stat
counts all the threads of that process), plus cutime+cstime (children already
reaped). A descendant that exits between two samples loses its last ticks unless
its parent reaps it; the bench's servers keep their children alive, so that is fine.
Resolution is one clock tick (10 ms at USER_HZ=100): runs of seconds with
thousands of calls give figures good to a few percent.
"""

from __future__ import annotations

import os
import time

TICK_US = 1_000_000 / os.sysconf("SC_CLK_TCK")


def _stat(pid: int | str, task: str | None = None) -> list[str] | None:
    path = f"/proc/{pid}/task/{task}/stat" if task else f"/proc/{pid}/stat"
    try:
        with open(path, "rb") as f:
            raw = f.read().decode()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # the comm field is in parentheses and may hold spaces: split after the last ')'
    rparen = raw.rfind(")")
    return [raw[: raw.find("(")].strip(), raw[raw.find("(") + 1 : rparen], *raw[rparen + 2 :].split()]


# fields after (pid, comm): state=2, ppid=3, ..., utime=13, stime=14, cutime=15, cstime=16


def descendants(root: int) -> list[int]:
    """root and every live descendant."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = _stat(name)
        if st is None:
            continue
        children.setdefault(int(st[3]), []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def process_cpu_us(pid: int, reaped: bool = True) -> float:
    st = _stat(pid)
    if st is None:
        return 0.0
    ticks = int(st[13]) + int(st[14])
    if reaped:
        ticks += int(st[15]) + int(st[16])
    return ticks * TICK_US


def tree_cpu_us(root: int) -> float:
    return sum(process_cpu_us(p) for p in descendants(root))


def thread_cpu_us(pid: int) -> dict[str, float]:
    """CPU per thread of one process, keyed 'TID comm' (the main thread's TID is the PID)."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tids:
        st = _stat(pid, tid)
        if st is not None:
            out[f"{tid} {st[1]}"] = (int(st[13]) + int(st[14])) * TICK_US
    return out


class TreeCpu:
    """Samples of one process tree: total and the root's main thread (its event loop)."""

    def __init__(self, root: int) -> None:
        self.root = root

    def sample(self) -> dict[str, float]:
        main = _stat(self.root, str(self.root))
        return {
            "tree_us": tree_cpu_us(self.root),
            "main_thread_us": (int(main[13]) + int(main[14])) * TICK_US if main else 0.0,
            "t": time.monotonic(),
        }

    @staticmethod
    def delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        return {k: b[k] - a[k] for k in a}

    def settle(self, idle_s: float = 0.3, limit_s: float = 5.0) -> dict[str, float]:
        """Wait until the tree uses (almost) no CPU for idle_s (its consumers caught up), or limit_s."""
        deadline = time.monotonic() + limit_s
        last = self.sample()
        while time.monotonic() < deadline:
            time.sleep(idle_s)
            cur = self.sample()
            if cur["tree_us"] - last["tree_us"] <= 2 * TICK_US:
                return cur
            last = cur
        return last


if __name__ == "__main__":
    import sys

    for arg in sys.argv[1:]:
        pid = int(arg)
        print(pid, f"tree {tree_cpu_us(pid):,.0f} us", descendants(pid))
        for name, us in sorted(thread_cpu_us(pid).items(), key=lambda kv: -kv[1])[:10]:
            print(f"  {name:<30} {us:>14,.0f} us")
