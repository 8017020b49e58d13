"""The registry lock: waiting, expiry and takeover, fencing, and a race of real processes against a
real `mlflow server` in which no two ever hold it at once."""

import itertools
import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

from imgclf.registry.client import Registry, RegistryConflict
from imgclf.registry.lock import LockLost, RegistryLock
from tests.conftest import compose_config, tool_env
from tests.registry.conftest import imgclf, set_param
from tests.registry.test_promotion import PERMISSIVE, aliases, model_name

CHILD = Path(__file__).with_name("lock_children.py")


@pytest.fixture
def registry(sqlite_store, monkeypatch):
    """A registry in a fresh sqlite store, whose lock expires after 1 s (0.25 s of margin)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_store)
    name = f"m-{uuid.uuid4().hex[:8]}"
    overrides = ("promote.lock_expiry_s=1", "promote.lock_timeout_s=0.5")
    return Registry(compose_config(f"registry.model_name={name}", *overrides))


def generations(registry: Registry) -> dict[str, dict]:
    found = registry.client.search_registered_models(f"name LIKE '{registry.name}.lock.%'")
    return {model.name.removeprefix(registry.name): model.tags for model in found}


def test_a_held_lock_makes_others_wait_then_exit_3(registry):
    with RegistryLock(registry, "promote --to champion"):
        started = time.monotonic()
        held = r"is held by .* \(imgclf promote --to champion, since"
        with pytest.raises(RegistryConflict, match=held), RegistryLock(registry, "rollback"):
            pass
        assert 0.5 <= time.monotonic() - started < 0.5 + 5
    assert generations(registry)[".lock.1"]["state"] == "released"


def test_a_takeover_fences_the_old_holder_and_its_release_leaves_the_new_one(registry, capsys):
    old = RegistryLock(registry, "promote --to champion").__enter__()
    time.sleep(1.1)
    new = RegistryLock(registry, "rollback").__enter__()
    assert "taking over the registry lock" in capsys.readouterr().out
    assert list(generations(registry)) == [".lock.2"]  # the expired generation is gone
    with pytest.raises(LockLost, match=r"taken over \(.*\.lock\.2 is newer than ours"):
        old.check()
    old.__exit__(None, None, None)  # releasing the lost lock frees nothing
    new.check()
    assert generations(registry)[".lock.2"]["state"] == "held"
    registry.set_alias("champion", None)  # a write under the new holder passes its fence
    new.__exit__(None, None, None)
    assert generations(registry)[".lock.2"]["state"] == "released"


def test_a_holder_whose_lease_runs_out_stops_before_writing(registry):
    registry.ensure_model("")
    registry.create_version("file:///nowhere", "", None, {}, "")
    with RegistryLock(registry, "promote --to champion"):
        registry.set_alias("challenger", "1")
        time.sleep(0.8)  # 0.2 s of the 1 s lease left: less than its margin
        with pytest.raises(LockLost, match=r"expires in 0\.[0-2] s"):
            registry.set_alias("champion", "1")
    assert registry.aliases() == {"challenger": "1"}


def test_a_stale_read_that_creates_an_old_generation_gives_it_up(registry, monkeypatch):
    """A process that read "no lock" long ago creates generation 1 after a newer one exists: it must
    see that, delete its own, and wait for the real holder."""
    RegistryLock(registry, "promote --to champion").__enter__()  # generation 1
    client = registry.client
    client.delete_registered_model(f"{registry.name}.lock.1")  # as if a later holder cleaned it up...
    client.create_registered_model(f"{registry.name}.lock.7", tags={"state": "held", "expires": "9e99"})
    stale = RegistryLock(registry, "rollback")
    real, reads = stale._generations, [lambda: {}]  # ...and its first read saw none
    monkeypatch.setattr(stale, "_generations", lambda: (reads.pop() if reads else real)())
    with pytest.raises(RegistryConflict, match="is held by"):
        stale.__enter__()
    assert list(generations(registry)) == [".lock.7"]


def holds(intervals: Path) -> list[dict]:
    return sorted(map(json.loads, intervals.read_text().splitlines()), key=lambda hold: hold["start"])


@pytest.mark.slow
def test_six_promotions_race_for_a_lock_left_by_a_killed_process(repos, mlflow_server, tmp_path):
    """A promoter is SIGKILLed holding the lock; six more start at once, with --expect-champion
    none. One takes the expired lock over, exactly one promotion wins, the other five exit 3, and
    no two processes ever hold the lock at the same time."""
    good, weak = repos["good"], repos["weak"]
    for repo in (good, weak):
        set_param(repo, "promote.lock_expiry_s", 6)
    imgclf(good, mlflow_server, "register")
    imgclf(weak, mlflow_server, "register")
    env = tool_env(good) | {"MLFLOW_TRACKING_URI": mlflow_server}
    intervals = tmp_path / "holds.jsonl"

    def child(*args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(CHILD), str(intervals), *args],
            cwd=good,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    go = tmp_path / "go"
    racers = [
        child("promote", str(go), "--version", str(1 + i % 2), "--expect-champion", "none", *PERMISSIVE)
        for i in range(6)
    ]
    for racer in racers:  # imported, waiting for `go`
        assert racer.stdout.readline() == "ready\n", racer.stderr.read()
    holder = child("hold")
    assert holder.stdout.readline() == "held\n", holder.stderr.read()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    killed_at = time.time()
    go.touch()  # all six at once, while the dead holder's lock has not expired yet
    done = [racer.communicate(timeout=300) for racer in racers]
    codes = [racer.returncode for racer in racers]
    assert sorted(codes) == [0, 3, 3, 3, 3, 3], done
    for (_, err), code in zip(done, codes, strict=True):
        assert code == 0 or "the champion moved: expected none" in err, err
    takeovers = sum("taking over the registry lock" in out for out, _ in done)
    assert takeovers == 1, done

    found = holds(intervals)
    found[0]["end"] = killed_at  # the killed holder: it held the lock until it died
    assert found[0]["pid"] == holder.pid
    overlaps = [
        (a, b)
        for a, b in itertools.combinations(found, 2)
        if max(a["start"], b["start"]) < min(a["end"], b["end"])
    ]
    print(
        f"\nrace: 1 killed holder + 6 processes, {len(found) - 1} of them held the lock, "
        f"{takeovers} takeover, {len(overlaps)} overlaps; "
        f"holds {[round(h['end'] - h['start'], 3) for h in found[1:]]} s"
    )
    assert overlaps == []
    assert found[1]["start"] >= found[0]["start"] + 6 - 1  # taken over only once it had expired
    winner = codes.index(0)
    assert aliases(mlflow_server, model_name(good)) == {"champion": str(1 + winner % 2)}
    history = imgclf(good, mlflow_server, "models", "--history", "--json").stdout.splitlines()
    assert [json.loads(line)["action"] for line in history] == ["promote"]


@pytest.mark.slow
def test_a_waiting_promoter_waits_for_the_critical_section_not_the_scoring(repos, mlflow_server, tmp_path):
    """While one promotion downloads and scores the champion, another one takes the lock at once;
    before, it waited for the whole scoring."""
    good, weak = repos["good"], repos["weak"]
    name = model_name(good)
    for repo in (good, weak):
        set_param(repo, "evaluate.latency_runs", 100000)  # a scoring that takes a few seconds
    imgclf(good, mlflow_server, "register")
    imgclf(good, mlflow_server, "promote")
    imgclf(weak, mlflow_server, "register")
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    client.set_model_version_tag(name, "1", "imgclf.test_sha256", "0" * 64)  # scored elsewhere
    env = tool_env(weak) | {"MLFLOW_TRACKING_URI": mlflow_server}
    figures = {}
    for mode, floor in (("new", "promote.min_value=0"), ("old", "promote.min_value=0.01")):
        intervals, go = tmp_path / f"{mode}.jsonl", tmp_path / f"{mode}.go"

        def child(*args: str, intervals=intervals) -> subprocess.Popen:
            command = [sys.executable, str(CHILD), str(intervals), *args]
            return subprocess.Popen(command, cwd=weak, env=env, stdout=subprocess.PIPE, text=True)

        waiter = child("wait", str(go))
        time.sleep(8)  # its imports done: it waits for `go`
        scorer = child("score", mode, str(go), "--version", "2", *PERMISSIVE[:2], floor)
        out, _ = scorer.communicate(timeout=300)
        assert scorer.returncode == 0, out
        waited = json.loads(waiter.communicate(timeout=300)[0])["waited_s"]
        scoring = json.loads(next(line for line in out.splitlines() if "scoring_s" in line))["scoring_s"]
        critical = max(
            h["end"] - h["start"] for h in holds(intervals) if h["purpose"] == "promote --to champion"
        )
        figures[mode] = {"waited_s": waited, "scoring_s": scoring, "critical_section_s": critical}
        imgclf(
            weak, mlflow_server, "rollback", "--reason", "measure again"
        )  # the champion back to version 1, scored elsewhere
    print(f"\nwait of a promoter while another scores the champion: {json.dumps(figures)}")
    assert figures["old"]["waited_s"] >= 0.8 * figures["old"]["scoring_s"]
    assert figures["new"]["waited_s"] <= figures["new"]["critical_section_s"] + 1.0
    assert figures["new"]["waited_s"] < figures["old"]["waited_s"] / 2
