"""Rank-0 MLflow logging that never stops or slows training.

Every call only appends to an in-memory queue; one background thread creates (or reopens) the run and
sends the queue in order. When the tracking server cannot be reached, training goes on: the thread warns
once, keeps everything queued and retries every few seconds, so nothing is lost when the server comes
back (MLflow's system-metrics thread, which gives up at its first failed call, is restarted then). An
error that retrying cannot fix (401, 403, 404: a wrong token, a refused Host header, a wrong URL) is
reported once with the server's reason and nothing more is sent. Whatever is unsent when training ends
(after `flush_timeout_s`) is written atomically to `<run_dir>/mlflow_unsent.json`; the next invocation
(e.g. the resume) sends it first and deletes the file only once all of it has been sent.

Metric points are sent at most once per (key, step), the first one logged winning, within one request as
across requests: a reopened run starts from the newest step the server already has for each key, so the
steps a resume recomputes after its checkpoint are not logged a second time. A request that the server
committed but whose reply never came is sent again, which the store absorbs (it keeps one copy of an
identical metric point; params and tags take the same value again); a run's creation would not be, so a
retried creation finds the run it made by a token tag instead of making a second one (a logged model whose
reply was lost is logged again).
A run that ends with an exception is marked FAILED (KILLED for an interrupt).

Experiments deepspike creates are tagged as model-training experiments (`mlflow.experimentKind`), so the
MLflow UI opens them on the runs table and charts rather than the GenAI overview; `ui_links` gives the
addresses to print. The final and best models are logged as MLflow logged models (`trainer.logged_model`)
from the same queue, after the metrics of their step.

A resumed run reopens the MLflow run whose id was stored in the checkpoint. MLflow params are write-once,
so a resumed run logs only params that are new; a changed value is recorded in the tag
`resume.changed_params` instead of failing the run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from trainer.config import MlflowConfig

log = logging.getLogger(__name__)
_ILLEGAL = re.compile(r"[^0-9A-Za-z_\-./ ]")
_RETRY_S = 3.0
_PERMANENT = {401, 403, 404}
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
CREATE_TOKEN_TAG = "deepspike.create_token"


def ui_links(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> dict[str, str]:
    """Addresses in the MLflow UI's model-training view: the runs table, the charts comparing the runs,
    and (with run_id) the run itself. A database store has no UI of its own: the links then assume
    `mlflow ui --backend-store-uri <uri>` on its default address."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    runs = f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    links = {"runs": runs, "charts": runs + "&compareRunsMode=CHART"}
    if run_id:
        # Without the workflow type a run page opens in the GenAI view, whatever the experiment's kind.
        links["run"] = f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    return links


def metric_key(key: str) -> str:
    """MLflow accepts only alphanumerics, '_', '-', '.', '/' and ' ' in keys."""
    return _ILLEGAL.sub("_", key)


class MlflowLogger:
    def __init__(self, cfg: MlflowConfig, experiment: str, run_name: str, run_id: str | None, spill: Path):
        # MLflow's HTTP client retries a refused connection for minutes; this thread does its own retrying.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.cfg, self.experiment, self.run_name, self._spill = cfg, experiment, run_name, spill
        self.uri = cfg.tracking_uri or mlflow.get_tracking_uri()
        self._client = MlflowClient(self.uri)
        self._ops: deque[list] = deque()
        self._run_id = run_id
        self.experiment_id: str | None = None
        if (leftover := _read_spill(spill)) is not None:
            self._run_id = self._run_id or leftover["run_id"]
            self._ops.extend(leftover["ops"])
            self._ops.append(["spill_sent"])  # the file goes only once everything before this is sent
        self._reopened = self._run_id is not None
        self._existing_params: dict[str, str] | None = None
        self._last_step: dict[str, int] = {}
        self._create_token: str | None = None  # set by the first attempt to create the run
        self._monitor = None
        self._warned = False
        self._refused: str | None = None
        self._closing = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="mlflow-logger", daemon=True)
        self._thread.start()

    @property
    def run_id(self) -> str | None:
        return self._run_id

    # ---- the training side: never blocks on the network -------------------------------------------
    def _push(self, op: list) -> None:
        with self._cv:
            self._ops.append(op)
            self._cv.notify()

    def log_params(self, params: dict[str, Any]) -> None:
        self._push(["params", {k: str(v)[:6000] for k, v in params.items()}])

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._push(["tags", {k: str(v) for k, v in tags.items()}])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._push(["metrics", [[metric_key(k), float(v), now, step] for k, v in metrics.items()]])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._push(["artifact", str(path), artifact_path])

    def log_model(self, name: str, model_file: Path, example_file: Path, config_file: Path) -> None:
        """A `trainer.export` file as an MLflow logged model, linked to its step's metrics."""
        self._push(["model", name, str(model_file), str(example_file), str(config_file)])

    def links(self) -> dict[str, str] | None:
        """`ui_links` of this run, once the background thread has created or reopened it."""
        if self.experiment_id is None:
            return None
        return ui_links(self.uri, self.experiment_id, self._run_id)

    def close(self, status: str = "FINISHED") -> bool:
        """Flush (waiting up to flush_timeout_s) and end the run. Returns False if items were spilled."""
        self._push(["terminate", status])
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(self.cfg.flush_timeout_s)
        with self._cv:
            left = [op for op in self._ops if op[0] != "spill_sent"]
            self._ops.clear()
        if not left:
            return True
        self._spill.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._spill.with_name(self._spill.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"run_id": self._run_id, "ops": left}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._spill)
        log.warning("MLflow at %s %s: %d unsent items saved to %s; the next run in this directory "
                    "sends them", self.uri, "refused them" if self._refused else "unreachable", len(left),
                    self._spill)
        return False

    # ---- the background thread --------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._ops and not self._closing:
                    self._cv.wait()
                if not self._ops or self._refused:
                    return
            try:
                self._ensure_run()
                self._send_queued()
            except Exception as e:  # the server or network; training must not notice
                if isinstance(e, MlflowException) and e.get_http_status_code() in _PERMANENT:
                    self._refused = str(e).splitlines()[0][:500]
                    log.error("MLflow at %s refused the run's data (HTTP %d): %s. Nothing more is sent; fix the "
                              "tracking URI or credentials and re-run: the unsent items are kept in %s",
                              self.uri, e.get_http_status_code(), self._refused, self._spill)
                    return
                if not self._warned:
                    log.warning("MLflow logging to %s failed (%s: %s); training continues, metrics are kept "
                                "and retried", self.uri, type(e).__name__, str(e).splitlines()[0][:200])
                    self._warned = True
                with self._cv:
                    self._cv.wait(_RETRY_S)

    def _ensure_run(self) -> None:
        if self._run_id is None:
            exp = self._client.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp else self._client.create_experiment(self.experiment,
                                                                                  tags=EXPERIMENT_KIND)
            if exp and "mlflow.experimentKind" not in exp.tags:  # made by an older deepspike or by hand
                self._client.set_experiment_tag(exp_id, *next(iter(EXPERIMENT_KIND.items())))
            self._run_id = self._create_run(exp_id)
        if self._existing_params is None:
            try:
                run = self._client.get_run(self._run_id)
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                # The checkpoint names a run this tracking store does not have (another store now).
                log.warning("MLflow run %s not found at %s; logging to a new run", self._run_id, self.uri)
                self._run_id, self._reopened = None, False
                return self._ensure_run()
            self._existing_params = dict(run.data.params)
            self.experiment_id = run.info.experiment_id
            self._last_step = {m.key: m.step for m in run.data.to_proto().metrics}
            if run.info.status != "RUNNING":
                self._client.update_run(self._run_id, status="RUNNING")
        thread = self._monitor._process if self._monitor is not None else None
        stopped = thread is not None and not thread.is_alive()
        if self.cfg.system_metrics and (self._monitor is None or stopped):
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # After an outage the old monitor has given up; a new one continues its step count.
            self._monitor = SystemMetricsMonitor(self._run_id, resume_logging=self._reopened or stopped,
                                                 tracking_uri=self.uri)
            self._monitor.start()

    def _create_run(self, experiment_id: str) -> str:
        """A new run, tagged with this logger's token. A create the server committed but whose reply was
        lost (a timeout, a dropped connection) is found by that tag on the retry instead of made again: the
        other requests are idempotent (the store keeps one copy of an identical metric point, params and
        tags may be sent again with the same value), a create is not."""
        if self._create_token is not None:
            found = self._client.search_runs([experiment_id], f"tags.`{CREATE_TOKEN_TAG}` = '{self._create_token}'",
                                             max_results=1)
            if found:
                return found[0].info.run_id
        self._create_token = uuid.uuid4().hex
        run = self._client.create_run(experiment_id, run_name=self.run_name,
                                      tags={CREATE_TOKEN_TAG: self._create_token})
        return run.info.run_id

    def _send_queued(self) -> None:
        while True:
            with self._cv:
                if not self._ops:
                    return
                op = self._ops[0]
                # Consecutive metric batches go out in one request (MLflow takes up to 1000 per call).
                batch = [op]
                if op[0] == "metrics":
                    n = len(op[1])
                    for nxt in list(self._ops)[1:]:
                        if nxt[0] != "metrics" or n + len(nxt[1]) > 1000:
                            break
                        batch.append(nxt)
                        n += len(nxt[1])
            self._send(batch)
            with self._cv:
                for _ in batch:
                    self._ops.popleft()

    def _send(self, batch: list[list]) -> None:
        kind = batch[0][0]
        c, rid = self._client, self._run_id
        if kind == "metrics":
            # The first point of a (key, step) wins, within the batch as across batches: a backed-up queue
            # can hold a rollback event and the recomputed log line of the same step.
            last, metrics = dict(self._last_step), []
            for op in batch:
                for k, v, ts, step in op[1]:
                    if step > last.get(k, -1):
                        metrics.append(Metric(k, v, ts, step))
                        last[k] = step
            if metrics:
                c.log_batch(rid, metrics=metrics)
            self._last_step = last
        elif kind == "params":
            self._send_params(batch[0][1])
        elif kind == "tags":
            tags = [RunTag(k, v) for k, v in batch[0][1].items()]
            for i in range(0, len(tags), 100):
                c.log_batch(rid, tags=tags[i:i + 100])
        elif kind == "artifact":
            _, path, artifact_path = batch[0]
            if Path(path).exists():
                c.log_artifact(rid, path, artifact_path)
            else:
                log.warning("MLflow artifact %s vanished before it could be uploaded; skipped", path)
        elif kind == "spill_sent":
            self._spill.unlink(missing_ok=True)
        elif kind == "model":
            from trainer.logged_model import log_exported_model  # torch + mlflow.pytorch, only at the end

            _, name, model_file, example_file, config_file = batch[0]
            # log_model talks to the global client and files the model under the active experiment
            mlflow.set_tracking_uri(self.uri)
            mlflow.set_experiment(experiment_id=self.experiment_id)
            model_id = log_exported_model(rid, name, model_file, example_file, config_file)
            log.info("MLflow logged model %r: models:/%s", name, model_id)
        elif kind == "terminate":
            if self._monitor is not None:
                self._monitor.finish()
                self._monitor = None
            c.set_terminated(rid, batch[0][1])

    def _send_params(self, params: dict[str, str]) -> None:
        existing = self._existing_params or {}
        new = {k: v for k, v in params.items() if k not in existing}
        changed = {k: f"{existing[k]} -> {v}" for k, v in params.items()
                   if k in existing and existing[k] != v}
        items = [Param(k, v) for k, v in new.items()]
        for i in range(0, len(items), 100):
            self._client.log_batch(self._run_id, params=items[i:i + 100])
        existing.update(new)
        if changed:
            self._client.set_tag(self._run_id, "resume.changed_params", json.dumps(changed)[:5000])


def _read_spill(spill: Path) -> dict | None:
    """The unsent items of an earlier invocation. A file that does not parse (written by hand, or by a
    deepspike older than the atomic write) is moved aside with an error, never silently dropped."""
    if not spill.is_file():
        return None
    try:
        leftover = json.loads(spill.read_text())
        if not isinstance(leftover.get("ops"), list):
            raise ValueError("no 'ops' list")
        return leftover
    except (ValueError, AttributeError) as e:
        aside = spill.with_name(f"{spill.name}.unreadable-{int(time.time())}")
        spill.rename(aside)
        log.error("MLflow spill file %s is unreadable (%s); kept as %s, not replayed", spill, e, aside)
        return None
