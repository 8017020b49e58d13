"""The processes of tests/registry/test_lock.py, run in a pipeline's folder (its params.yaml), each
recording when it held the registry lock: one JSON line per hold in INTERVALS, its start taken
once the process knows it holds the lock, its end before it gives it back.

    python lock_children.py INTERVALS hold             take the lock, print "held", sleep until killed
    python lock_children.py INTERVALS promote GO ARGS...
                                                       print "ready", then when the file GO appears,
                                                       `imgclf promote ARGS...`
    python lock_children.py INTERVALS wait GO          when the file GO appears, take the lock and
                                                       print how long that took (JSON)
    python lock_children.py INTERVALS score MODE GO ARGS...
        `imgclf promote ARGS...`, touching GO when the champion's scoring starts (MODE new), or once
        it holds the lock around the scoring, as imgclf did before its critical section was made
        short (MODE old); prints how long the scoring took (JSON)
"""

import json
import os
import sys
import time
from pathlib import Path

from imgclf import cli
from imgclf.registry import flows
from imgclf.registry.client import Registry
from imgclf.registry.lock import RegistryLock


def record_holds(intervals: Path) -> None:
    enter, leave = RegistryLock.__enter__, RegistryLock.__exit__

    def entered(self):
        held = enter(self)
        self.held_since = time.time()
        return held

    def left(self, *exc):
        line = {"pid": os.getpid(), "purpose": self.purpose, "start": self.held_since, "end": time.time()}
        with intervals.open("a") as f:
            f.write(json.dumps(line) + "\n")
        return leave(self, *exc)

    RegistryLock.__enter__, RegistryLock.__exit__ = entered, left


def hold(intervals: Path) -> None:
    lock = RegistryLock(Registry(cli.registry_config([])), "promote --to champion")
    lock.__enter__()
    with intervals.open("a") as f:
        f.write(json.dumps({"pid": os.getpid(), "purpose": lock.purpose, "start": time.time()}) + "\n")
    print("held", flush=True)
    time.sleep(3600)


def wait_for(go: Path) -> None:
    while not go.exists():
        time.sleep(0.01)


def wait(go: Path) -> None:
    registry = Registry(cli.registry_config([]))
    assert registry.client  # MLflow's client, which the lock writes with, imported before the wait
    wait_for(go)
    asked = time.time()
    with RegistryLock(registry, "promote --to challenger"):
        waited = time.time() - asked
    print(json.dumps({"waited_s": waited}), flush=True)


def score(mode: str, go: Path, args: list[str]) -> None:
    real = flows.champion_evidence

    def timed(registry, *rest):
        started = time.time()
        if mode == "old":
            with RegistryLock(registry, "promote (scoring inside the lock, as before)"):
                go.touch()
                evidence = real(registry, *rest)
        else:
            go.touch()
            evidence = real(registry, *rest)
        print(json.dumps({"scoring_s": time.time() - started}), flush=True)
        return evidence

    flows.champion_evidence = timed
    cli.main(["promote", *args])


if __name__ == "__main__":
    intervals, command, *rest = sys.argv[1:]
    record_holds(Path(intervals))
    if command == "hold":
        hold(Path(intervals))
    elif command == "promote":
        print("ready", flush=True)
        wait_for(Path(rest[0]))
        cli.main(["promote", *rest[1:]])
    elif command == "wait":
        wait(Path(rest[0]))
    else:
        score(rest[0], Path(rest[1]), rest[2:])
