"""Pod status in Kubernetes: `ambient.istio.io/redirection` written through the pods/status subresource.

Why this module exists: users and tools (istioctl, kubectl) read a pod's enrollment from this annotation
(REFERENCE.md, "Enrollment and status"). Istio's field failure to beat is an annotation that says
`enabled` while the pod has no rules (istio#61182), so this writer never decides anything: the agent
publishes the reconciler's result — which comes from capture verified against the kernel and the
tunnel's acks (agent/enrollment.status_of) — and the writer only makes the API agree with it:

    enabled  -> "enabled"   (capture complete in the kernel and a tunnel acked the pod)
    pending  -> "pending"   (captured, fail closed, no tunnel serves it yet)
    failed, or no longer enrolled -> the annotation is removed

Writes go through pods/status (the RBAC the DaemonSet holds: patch on pods/status, nothing on pods) as
JSON merge patches that carry the pod's UID, so a pod recreated under the same name is never annotated
by mistake (the API server rejects the UID change). Failed writes are retried with backoff; a pod that is
gone (404) is forgotten.

What the API server holds is what this writer wrote, or, for a pod it has not written since it started,
what the agent's pod watch shows (`seen`): so a restarted agent removes an `enabled` an earlier run left
on a pod unenrolled meanwhile, and skips writes that would change nothing. Once the watch has shown a
write of ours, a later different value there is someone else's change (a hand edit, another tool): the
watch is believed again and the agent's value written back - up to MAX_SET_BACKS times for one value of
the agent's, then left with a warning (two controllers writing the annotation would patch forever). Watch
events come in order, so an event from before our write (still showing the old value) is never taken for
such a change. No resourceVersion comparison: they are opaque to clients.

What it deliberately does not do: no reading of pod state of its own (the agent passes what its watch
saw), no enrollment decisions, no status file (agent/status.py keeps writing that in every mode).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import kubernetes.client
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from nodeagent.agent.enrollment import Status
from nodeagent.inventory.kube import describe
from nodeagent.model import REDIRECTION_ANNOTATION

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
_VALUES = {Status.ENABLED: "enabled", Status.PENDING: "pending"}
# Another writer's change to a pod's annotation is undone this many times (while the agent's own value
# stays the same); then left, with a warning: two controllers fighting over it would patch forever.
MAX_SET_BACKS = 3


@dataclass(frozen=True, slots=True)
class PodAnnotation:
    namespace: str
    name: str
    value: str | None  # None: remove the annotation


def annotation_value(status: Status) -> str | None:
    return _VALUES.get(status)


class PodStatusWriter:
    def __init__(
        self,
        api: kubernetes.client.ApiClient,
        *,
        concurrency: int = 4,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
        request_timeout: float = 10.0,
    ) -> None:
        self._core = kubernetes.client.CoreV1Api(api)
        self._concurrency = concurrency
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._timeout = request_timeout
        self._desired: dict[str, PodAnnotation] = {}
        self._seen: Mapping[str, PodAnnotation] = MappingProxyType({})
        self.written: dict[str, PodAnnotation] = {}  # uid -> what the API server has (as far as we know)
        self._echoed: set[str] = set()  # uids whose last write the watch has shown since
        self._writing: set[str] = set()  # uids with a write in flight (the watch may show it before it returns)
        self._set_back: dict[str, int] = {}  # uid -> times someone else's change was undone (for this value)
        self._wake = asyncio.Event()
        self.error: str | None = None
        self.patches = 0

    def publish(
        self, pods: Mapping[str, tuple[str, str, Status]], seen: Mapping[str, PodAnnotation] = MappingProxyType({})
    ) -> None:
        """The agent's current view: uid -> (namespace, name, status). Pods absent lose the annotation.

        `seen`: uid -> the annotation as the pod watch shows it, for the pods whose annotation is the agent's
        to judge; it stands for what the API server has until this writer writes the pod.
        """
        desired = {uid: PodAnnotation(ns, name, annotation_value(status)) for uid, (ns, name, status) in pods.items()}
        for uid in [u for u in self._set_back if desired.get(u) != self._desired.get(u)]:
            del self._set_back[uid]  # the agent's own value changed: a new disagreement, if any, counts anew
        self._desired = desired
        self._seen = seen
        self._notice_changes_by_others(seen)
        self._wake.set()

    def _notice_changes_by_others(self, seen: Mapping[str, PodAnnotation]) -> None:
        for uid, shown in seen.items():
            ours = self.written.get(uid)
            if ours is None or uid in self._writing:
                continue
            if shown.value == ours.value:
                self._echoed.add(uid)
                continue
            if uid not in self._echoed:  # what the watch shows may predate our write
                continue
            # The watch showed our write, and now something else: someone else's change.
            times = self._set_back.get(uid, 0) + 1
            self._set_back[uid] = times
            if times > MAX_SET_BACKS:
                if times == MAX_SET_BACKS + 1:
                    log.warning(
                        "annotation %s of pod %s/%s keeps being changed to %r by someone else (another controller "
                        "writing it?); leaving it after setting it back %d times",
                        REDIRECTION_ANNOTATION, shown.namespace, shown.name, shown.value, MAX_SET_BACKS,
                    )  # fmt: skip
                continue
            log.info(
                "annotation %s of pod %s/%s was changed to %r by someone else; setting it back",
                REDIRECTION_ANNOTATION, shown.namespace, shown.name, shown.value,
            )  # fmt: skip
            del self.written[uid]
            self._echoed.discard(uid)

    def _todo(self) -> dict[str, PodAnnotation]:
        desired = dict(self._desired)
        known = {**self._seen, **self.written}  # our own writes are newer than what the watch showed
        for uid, current in known.items():  # pods the agent does not hold lose the annotation
            if uid not in desired and current.value is not None:
                desired[uid] = PodAnnotation(current.namespace, current.name, None)
        return {uid: a for uid, a in desired.items() if known.get(uid) != a}

    async def run(self) -> None:
        """The guarded task: write whatever differs, retry failures with backoff (until cancelled)."""
        delay = self._retry_initial
        slots = asyncio.Semaphore(self._concurrency)
        while True:
            await self._wake.wait()
            self._wake.clear()
            todo = self._todo()
            if not todo:
                continue
            results = await asyncio.gather(*(self._write(uid, a, slots) for uid, a in todo.items()))
            # Removals that are done need no memory once the watch no longer shows the pod (until then, what
            # it shows may predate the removal); pods still enrolled stay remembered.
            for uid, a in list(self.written.items()):
                if a.value is None and uid not in self._desired and uid not in self._seen:
                    del self.written[uid]
                    self._echoed.discard(uid)
                    self._set_back.pop(uid, None)
            if all(results):
                delay = self._retry_initial
                if self.error is not None:
                    log.info("pod status annotations are written again")
                    self.error = None
                self._wake.set()  # look again: the agent may have published while these were written
                continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._retry_max)
            self._wake.set()

    async def _write(self, uid: str, a: PodAnnotation, slots: asyncio.Semaphore) -> bool:
        body = {"metadata": {"uid": uid, "annotations": {REDIRECTION_ANNOTATION: a.value}}}
        async with slots:
            self._writing.add(uid)
            try:
                await asyncio.to_thread(
                    self._core.patch_namespaced_pod_status,
                    a.name,
                    a.namespace,
                    body,
                    _content_type=MERGE_PATCH,
                    _request_timeout=self._timeout,
                )
            except ApiException as exc:
                if exc.status in (404, 422) or _uid_mismatch(exc):  # gone, or recreated under the same name
                    log.info("pod %s/%s (uid %s) is gone; not annotating it", a.namespace, a.name, uid)
                    self.written[uid] = a
                    if a.value is None or exc.status == 404:
                        self._desired.pop(uid, None)
                    return True
                return self._failed(
                    a,
                    describe(
                        exc,
                        f"patching pods/status of {a.namespace}/{a.name}",
                        "patch on pods/status to this service account",
                    ),
                )
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                return self._failed(a, describe(exc, f"patching pods/status of {a.namespace}/{a.name}"))
            finally:
                self._writing.discard(uid)
        self.patches += 1
        self.written[uid] = a
        # The watch may have shown this write while it was in flight; if it has not, what it shows may
        # predate it, so nothing it shows counts as someone else's change until it shows this value.
        shown = self._seen.get(uid)
        if shown is not None and shown.value == a.value:
            self._echoed.add(uid)
        else:
            self._echoed.discard(uid)
        return True

    def _failed(self, a: PodAnnotation, problem: str) -> bool:
        if problem != self.error:
            log.error("%s; retrying with backoff (capture is unaffected)", problem)
            self.error = problem
        return False


def _uid_mismatch(exc: ApiException) -> bool:
    """A 409 from our UID precondition (the pod was recreated under its name), not a conflict to retry: the
    API server also answers 409 ("the object has been modified") when a patch keeps losing a race with
    other writers - the kubelet updates a starting pod's status just when it is enrolled."""
    return exc.status == 409 and "Precondition failed: UID" in str(exc.body or "")
