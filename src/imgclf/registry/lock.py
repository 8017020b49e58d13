"""The registry lock: one holder at a time, across machines, kept in the MLflow store itself.

What the store makes atomic is creating a registered model: of processes racing to create one name,
exactly one wins (the name is the table's key, on sqlite and behind `mlflow server`; the others get
RESOURCE_ALREADY_EXISTS). The lock is therefore a sequence of registered models, its generations:
`<name>.lock.1`, `<name>.lock.2`, ... Whoever created the newest generation holds the lock, until it
tags it `state: released` or the time in its `expires` tag passes. To take a free or expired lock, a
process creates the next generation: of the processes that saw generation n free, exactly one
creates n + 1. Nothing is deleted on the strength of an earlier read: a holder deletes only the
generations older than its own, which nobody holds, and the newest is never deleted, so the numbers
only grow and a late creation of an old number can never be the newest (its creator sees a newer one
and gives up).

The store cannot refuse a write from a process whose lock was taken over, so the holder fences its
own writes: before each one (Registry.fence) it checks that its generation is still the newest and
that more than `margin_s` of its lease is left. A takeover waits until the lease has ended, so a
write that starts with `margin_s` left lands before anyone can take over. There is no renewal:
the slow work (downloads, scoring) is done before the lock is taken, and what is left inside is a
few requests. Holders on different machines compare `expires` with their own clocks: a clock skew
larger than `margin_s` would shorten the lease by as much.
"""

import contextlib
import os
import random
import socket
import time
import uuid

from imgclf.registry.client import Registry, RegistryConflict, actor, now_iso

GENERATION = ".lock."  # the lock's generations: "<name>.lock.<n>"
MARGIN_S = 5.0  # a holder stops writing this long before its lease ends (at most a quarter of it)


class LockLost(RegistryConflict):
    """The lock expired, or was taken over, before a write: nothing more was written. Run again."""


class RegistryLock:
    """`with RegistryLock(registry, "promote --to champion"):` holds the lock of `registry`'s model
    for the block, and fences the registry's writes meanwhile. RegistryConflict (exit 3) after
    `promote.lock_timeout_s` of waiting; a lock whose holder has not released it within
    `promote.lock_expiry_s` is taken over."""

    def __init__(self, registry: Registry, purpose: str):
        self.registry = registry
        self.purpose = purpose
        self.prefix = registry.name + GENERATION
        self.timeout_s = registry.config.promote.lock_timeout_s
        self.expiry_s = registry.config.promote.lock_expiry_s
        self.margin_s = min(MARGIN_S, self.expiry_s / 4)
        self.token = uuid.uuid4().hex
        self.generation: int | None = None  # ours, while held
        self.expires = 0.0  # our lease's end, time.time()

    # --- taking and giving back -----------------------------------------------------------

    def __enter__(self) -> "RegistryLock":
        deadline = time.monotonic() + self.timeout_s
        while True:
            generations = self._generations()
            newest = max(generations, default=0)
            top = generations.get(newest)
            if top is None or _released(top.tags) or _expired(top.tags):
                if self._create(newest + 1):
                    if self._newest() == newest + 1:
                        self._held(newest + 1, top)
                        return self
                    # Our read was stale: a newer generation was made (and an old number reused).
                    self._delete(newest + 1)
                continue  # lost the race to create it: read who won
            if time.monotonic() > deadline:
                tags = top.tags
                raise RegistryConflict(
                    f"the registry lock {top.name!r} is held by {tags.get('actor', '?')} "
                    f"(imgclf {tags.get('purpose', '?')}, since {tags.get('since', '?')}); waited "
                    f"{self.timeout_s:g} s: run again when that is done"
                )
            time.sleep(0.1 + random.random() * 0.3)  # jitter: waiting processes do not retry in step

    def __exit__(self, *exc) -> None:
        if self.registry.fence == self.check:
            self.registry.fence = lambda: None
        name = self._name(self.generation)
        # Our own generation only: marked free, not deleted (the newest is never deleted). Marking
        # one that was taken over changes nothing; it may be gone already.
        with contextlib.suppress(self.registry.MlflowException):
            self.registry.client.set_registered_model_tag(name, "released", now_iso())
            self.registry.client.set_registered_model_tag(name, "state", "released")
        self.generation = None

    def check(self) -> None:
        """LockLost unless this process still holds the lock, with more than margin_s of it left."""
        newest = self._newest()
        left = self.expires - time.time()  # after the request: the write comes after it
        if newest != self.generation:
            raise LockLost(
                f"the registry lock was taken over ({self._name(newest)} is newer than ours, "
                f"{self._name(self.generation)}, which expired after {self.expiry_s:g} s): stopped "
                "before writing; run again"
            )
        if left < self.margin_s:
            raise LockLost(
                f"the registry lock {self._name(self.generation)} expires in {max(left, 0):.1f} s "
                f"(promote.lock_expiry_s is {self.expiry_s:g}): stopped before writing; run again"
            )

    # --- internals -------------------------------------------------------------------------

    def _held(self, generation: int, replaced) -> None:
        self.generation = generation
        self.registry.fence = self.check
        if replaced is not None and not _released(replaced.tags):
            tags = replaced.tags
            print(
                f"imgclf: taking over the registry lock that {tags.get('actor', '?')} left "
                f"({tags.get('purpose', '?')}, since {tags.get('since', '?')}); it has expired"
            )
        for older in self._generations():
            if older < generation:
                self._delete(older)

    def _create(self, generation: int) -> bool:
        """Create `generation`; False if another process created it first."""
        self.expires = time.time() + self.expiry_s
        tags = {
            "state": "held",
            "holder": self.token,
            "actor": actor(),
            "host": f"{socket.gethostname()}:{os.getpid()}",
            "purpose": self.purpose,
            "since": now_iso(),
            "expires": f"{self.expires:.3f}",
        }
        description = (
            f"The lock of `{self.registry.name}`'s aliases, generation {generation}: {tags['actor']} "
            f"is running `imgclf {self.purpose}` (since {tags['since']}). Free when tagged "
            f"`state: released`, or {self.expiry_s:g} s after it was taken; the next one to take it "
            "creates the next generation and deletes this one."
        )
        try:
            self.registry.client.create_registered_model(
                self._name(generation), tags=tags, description=description
            )
            return True
        except self.registry.MlflowException as error:
            # RESOURCE_ALREADY_EXISTS, or the winner deleted it again before the store's lookup.
            if error.error_code in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                return False
            raise

    def _delete(self, generation: int) -> None:
        with contextlib.suppress(self.registry.MlflowException):  # another holder deleted it first
            self.registry.client.delete_registered_model(self._name(generation))

    def _newest(self) -> int:
        return max(self._generations(), default=0)

    def _generations(self) -> dict:
        """generation number -> RegisteredModel (with its tags), from one search of the store."""
        quoted = self.prefix.replace("'", "\\'")
        found, token = {}, None
        while True:
            page = self.registry.client.search_registered_models(
                f"name LIKE '{quoted}%'", max_results=1000, page_token=token
            )
            for model in page:
                number = model.name[len(self.prefix) :]
                # LIKE treats _ as a wildcard and may ignore case: keep this model's names only.
                if model.name.startswith(self.prefix) and number.isdigit():
                    found[int(number)] = model
            token = page.token
            if not token:
                return found

    def _name(self, generation: int | None) -> str:
        return f"{self.prefix}{generation}"


def _released(tags: dict) -> bool:
    return tags.get("state") == "released"


def _expired(tags: dict) -> bool:
    return float(tags.get("expires") or 0) < time.time()
