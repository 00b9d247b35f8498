"""One job runner for the WebUI tab, the HTTP API and the CLI: a FIFO queue worked by one thread
(trainings and evaluations alike),
each job run under the host's lock (A1111's ``queue_lock``: generations wait, the checkpoint
cannot be switched mid-training), with status, progress, stop-and-save and cancel."""
import errno
import itertools
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional

from .engine.errors import CharLoraError
from .engine.trainer import CancelToken

STATUSES = ("queued", "running", "done", "failed", "cancelled")


@dataclass
class Job:
    id: str
    name: str
    spec: object
    status: str = "queued"
    step: int = 0
    total_steps: int = 0
    loss: Optional[float] = None
    eta_seconds: Optional[float] = None
    peak_memory_mb: Optional[float] = None  # training memory beyond the loaded model (engine.memory)
    lora_name: Optional[str] = None
    lora_path: Optional[str] = None
    warnings: list = field(default_factory=list)
    error: Optional[str] = None
    created_at: float = field(default_factory=time.time)
    finished_at: Optional[float] = None
    cancel: CancelToken = field(default_factory=CancelToken)
    output_dir: Optional[str] = None
    task_id: Optional[str] = None          # the WebUI's progress-bar task id (tab only)
    loss_history: list = field(default_factory=list)
    preview: object = None                 # the latest preview picture (PIL), if previews are on
    kind: str = "train"                    # "train" or "evaluate"
    result: Optional[dict] = None          # an evaluation's grids, scores and pick

    def to_dict(self):
        return {"job_id": self.id, "kind": self.kind, "status": self.status, "step": self.step,
                "total_steps": self.total_steps, "loss": self.loss, "eta_seconds": self.eta_seconds,
                "peak_memory_mb": None if self.peak_memory_mb is None else round(self.peak_memory_mb, 1),
                "lora_name": self.lora_name, "lora_path": self.lora_path, "warnings": list(self.warnings),
                "error": self.error, "result": self.result}


class JobRunner:
    """``run(job)`` trains; it updates ``job.step`` etc. and returns the TrainResult."""

    def __init__(self, run: Callable, lock=None, keep=100):
        self._run, self._lock = run, lock
        self._jobs = OrderedDict()
        self._queue = []
        self._cv = threading.Condition()
        self._keep = keep
        self._counter = itertools.count(1)
        self._thread = None

    def submit(self, name, spec, **fields):
        job = Job(id=f"{next(self._counter)}-{uuid.uuid4().hex[:8]}", name=name, spec=spec, **fields)
        with self._cv:
            self._jobs[job.id] = job
            self._queue.append(job)
            self._trim()
            if self._thread is None:
                # A worker only while there is work: a thread that has run torch ops slows torch in every
                # other thread (the WebUI's generations) about 3x for as long as it lives (measured, CPU).
                self._thread = threading.Thread(target=self._work, name="charlora-jobs", daemon=True)
                self._thread.start()
        return job

    def get(self, job_id):
        return self._jobs.get(job_id)

    def list(self):
        return list(self._jobs.values())

    def stop(self, job_id, save=True):
        job = self._jobs.get(job_id)
        if job is None:
            return None
        with self._cv:
            if job.status == "queued":
                self._queue.remove(job)
                job.status, job.finished_at = "cancelled", time.time()
                return job
        job.cancel.stop(save=save)
        return job

    def wait(self, job_id, timeout=None):
        end = None if timeout is None else time.time() + timeout
        with self._cv:
            while self._jobs[job_id].status in ("queued", "running"):
                left = None if end is None else end - time.time()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def idle(self, timeout=None):
        """Wait until no worker thread is left (for tests and shutdown)."""
        with self._cv:
            return self._cv.wait_for(lambda: self._thread is None, timeout)

    def _trim(self):
        """Forget the oldest finished jobs beyond ``keep`` (a number, or a callable giving it); files stay."""
        keep = self._keep() if callable(self._keep) else self._keep
        done = [j for j in self._jobs.values() if j.status not in ("queued", "running")]
        for j in done[:max(0, len(self._jobs) - keep)]:
            self._jobs.pop(j.id, None)

    def _work(self):
        while True:
            with self._cv:
                if not self._queue:
                    self._thread = None
                    self._cv.notify_all()
                    return
                job = self._queue.pop(0)
                job.status = "running"
            try:
                if self._lock is not None:
                    with self._lock:
                        result = self._run(job)
                else:
                    result = self._run(job)
                job.status = {"done": "done", "stopped": "done", "cancelled": "cancelled"}[result.status]
                job.lora_path = getattr(result, "path", None) or job.lora_path
                if hasattr(result, "to_dict"):
                    job.result = result.to_dict()
                job.warnings += [w for w in result.warnings if w not in job.warnings]
            except CharLoraError as e:
                job.status, job.error = "failed", str(e)
            except Exception as e:  # an OOM or a bug: the job fails, the worker lives on
                job.status = "failed"
                job.error = f"{type(e).__name__}: {e}"
                if "out of memory" in str(e).lower():
                    job.error += " — try the Fast preset, a lower resolution or batch size, or gradient checkpointing"
                elif getattr(e, "errno", None) == errno.ENOSPC or "no space left on device" in str(e).lower():
                    job.error = f"the disk is full ({job.error}); free some space and train again"
                traceback.print_exc()
            finally:
                for heavy in ("images", "references"):  # the decoded pictures: a finished job keeps only its record
                    if isinstance(getattr(job.spec, heavy, None), list):
                        setattr(job.spec, heavy, [])
                job.finished_at = time.time()
                with self._cv:
                    self._cv.notify_all()
