"""``loom train``: submit, watch, list and cancel training jobs on a running Loom server.

    loom train submit job.yaml --follow      # the job id, then a live progress bar
    loom train list --state running
    loom train status job-1f3c...            # --json for the raw job
    loom train logs job-1f3c... --follow
    loom train cancel job-1f3c...

Every command talks HTTP to ``--url`` (default http://127.0.0.1:8000) with the first key of
``LOOM_API_KEYS``, if any, as its bearer key. Exit status: 0 done (and, with ``--follow``,
the job succeeded); 2 the input was refused (a bad YAML file, a 400/413/422 answer, each field
error on its own line on stderr); 1 anything else (no server, 401, 404, 409, a job that
failed or was cancelled).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

from models.settings import LoomEnv
from training.spec import JobSpecInvalid, load_job_spec_yaml

DEFAULT_URL = "http://127.0.0.1:8000"
FINAL_STATES = ("succeeded", "failed", "cancelled")
EXIT_FAILED = 1
EXIT_REFUSED = 2
REFUSED_STATUSES = (400, 413, 422)  # the request itself was wrong: fix the input, not retry


class RequestFailed(Exception):
    """The server answered with an error (``status`` > 0), or could not be reached (0)."""

    def __init__(self, status: int, message: str, error: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error = error or {}


class JobsClient:
    """The ``/v1/jobs`` API over urllib: ``call`` returns (status, JSON) or raises
    ``RequestFailed``."""

    def __init__(self, base_url: str, *, api_key: str | None, timeout_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._timeout_s = timeout_s

    def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        url = self.base_url + path
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self._api_key:
            request.add_header("Authorization", f"Bearer {self._api_key}")
        try:
            with urllib.request.urlopen(request, timeout=self._timeout_s) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            raw = exc.read().decode(errors="replace")
            exc.close()
            try:
                error = json.loads(raw)["error"]
                message = error["message"] if isinstance(error, dict) else str(error)
            except (ValueError, KeyError, TypeError):
                error, message = {}, raw.strip() or exc.reason
            error = error if isinstance(error, dict) else {}
            raise RequestFailed(exc.code, message, error) from None
        except (urllib.error.URLError, OSError) as exc:
            raise RequestFailed(0, f"no Loom server at {self.base_url} ({exc})") from None


def report_failure(exc: RequestFailed) -> int:
    """Print why a request failed on stderr, one line per field error; the exit status."""
    code = exc.error.get("code")
    fields = exc.error.get("fields") or []
    if exc.status == 0:
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    label = f"{exc.status} {code}" if code else str(exc.status)
    if fields:
        print(f"error: the server refused the job spec ({label}):", file=sys.stderr)
        for field in fields:
            print(f"  {field['field'] or '<spec>'}: {field['message']}", file=sys.stderr)
    else:
        print(f"error: {exc.message} ({label})", file=sys.stderr)
    return EXIT_REFUSED if exc.status in REFUSED_STATUSES else EXIT_FAILED


# --- commands -------------------------------------------------------------------------------


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", default=DEFAULT_URL, help=f"server address (default {DEFAULT_URL})"
    )
    train = subparsers.add_parser("train", help="submit and watch training jobs")
    commands = train.add_subparsers(dest="train_command", metavar="COMMAND", required=True)

    submit = commands.add_parser("submit", parents=[common], help="submit a job spec (YAML)")
    submit.add_argument("file", type=Path, help="the job spec, a YAML file")
    submit.add_argument("--follow", action="store_true", help="show progress until it ends")
    submit.add_argument("--idempotency-key", default=None, help="resubmits return the same job")
    submit.add_argument("--job-id", default=None, help="choose the job's id")
    submit.add_argument(
        "--poll-interval-s", type=float, default=0.5, help="--follow's polling period"
    )
    submit.set_defaults(func=run_submit)

    listing = commands.add_parser("list", parents=[common], help="jobs, oldest first")
    listing.add_argument("--state", default=None, help="only jobs in this state")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(func=run_list)

    status = commands.add_parser("status", parents=[common], help="one job's state")
    status.add_argument("job_id")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=run_status)

    logs = commands.add_parser("logs", parents=[common], help="a job's log")
    logs.add_argument("job_id")
    logs.add_argument("--follow", action="store_true", help="keep printing until the job ends")
    logs.add_argument("--poll-interval-s", type=float, default=1.0, help="--follow's period")
    logs.set_defaults(func=run_logs)

    cancel = commands.add_parser("cancel", parents=[common], help="cancel a queued or running job")
    cancel.add_argument("job_id")
    cancel.set_defaults(func=run_cancel)


def client_for(args: argparse.Namespace) -> JobsClient:
    keys = LoomEnv.from_environ().api_keys
    return JobsClient(args.url, api_key=keys[0] if keys else None)


def run_submit(args: argparse.Namespace) -> int:
    try:
        raw = load_job_spec_yaml(args.file.read_text())
    except OSError as exc:
        print(f"error: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return EXIT_REFUSED
    except JobSpecInvalid as exc:
        print(f"error: {args.file} is not a job spec:", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error.field or '<spec>'}: {error.message}", file=sys.stderr)
        return EXIT_REFUSED
    if args.job_id is not None:
        raw["job_id"] = args.job_id
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    client = client_for(args)
    try:
        status, job = client.call("POST", "/v1/jobs", raw, headers)
    except RequestFailed as exc:
        return report_failure(exc)
    if status == 200:
        print(f"(an existing job: {job['id']} is {job['state']})", file=sys.stderr)
    print(job["id"], flush=True)
    if job.get("webhook_secret"):  # the one answer that shows it; stdout stays the id alone
        print(
            f"webhook secret (shown once; a receiver checks Loom-Signature with it): "
            f"{job['webhook_secret']}",
            file=sys.stderr,
        )
    if not args.follow:
        return 0
    return follow_job(client, job["id"], poll_interval_s=args.poll_interval_s)


def follow_job(client: JobsClient, job_id: str, *, poll_interval_s: float) -> int:
    """A progress bar on stderr, polling the job until it is final; 0 only if it succeeded."""
    from tqdm import tqdm  # only the follower draws; the other commands stay light

    # disable=None: a bar on a terminal, nothing in a pipe or a log (the summary still prints)
    with tqdm(total=100, unit="%", file=sys.stderr, disable=None, dynamic_ncols=True) as bar:
        while True:
            try:
                _, job = client.call("GET", f"/v1/jobs/{job_id}")
            except RequestFailed as exc:
                bar.close()
                return report_failure(exc)
            # progress is a fraction: 0.42 -> 42 of the bar's 100
            bar.n = round(job["progress"] * 100, 1)
            stage = f"/{job['stage']}" if job["stage"] else ""
            bar.set_description(f"{job['state']}{stage}", refresh=False)
            bar.set_postfix_str(metrics_text(job["metrics"]), refresh=True)
            if job["state"] in FINAL_STATES:
                break
            time.sleep(poll_interval_s)
    return report_final(job)


def report_final(job: dict[str, Any]) -> int:
    metrics = metrics_text(job["metrics"])
    if job["state"] == "succeeded":
        print(f"job {job['id']} succeeded" + (f": {metrics}" if metrics else ""), file=sys.stderr)
        return 0
    reason = f": {job['error']}" if job.get("error") else ""
    print(f"job {job['id']} {job['state']}{reason}", file=sys.stderr)
    return EXIT_FAILED


def metrics_text(metrics: dict[str, Any], max_items: int = 4) -> str:
    """``{"loss": 1.23456, "step": 40}`` -> ``"loss=1.235, step=40"``: numbers only, a few."""
    parts = []
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        parts.append(f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}")
    return ", ".join(parts[:max_items])


def run_list(args: argparse.Namespace) -> int:
    client = client_for(args)
    try:
        jobs = list_all_jobs(client, args.state)
    except RequestFailed as exc:
        return report_failure(exc)
    if args.json:
        print(json.dumps(jobs, indent=2))
        return 0
    print(f"{'ID':<38} {'NAME':<20} {'TRAINER':<8} {'STATE':<10} {'STAGE':<12} PROGRESS")
    for job in jobs:
        print(
            f"{job['id']:<38} {job['name'][:20]:<20} {job['trainer']:<8} {job['state']:<10} "
            f"{job['stage'] or '-':<12} {job['progress']:>7.0%}"
        )
    return 0


def list_all_jobs(
    client: JobsClient, state: str | None, *, page_size: int = 1000
) -> list[dict[str, Any]]:
    """Every job, page by page: ``GET /v1/jobs`` answers at most ``limit`` jobs and a
    ``next_cursor`` while more follow (``training.pagination``)."""
    query = {"limit": str(page_size), **({"state": state} if state else {})}
    jobs: list[dict[str, Any]] = []
    while True:
        _, listing = client.call("GET", "/v1/jobs?" + urllib.parse.urlencode(query))
        jobs.extend(listing["data"])
        cursor = listing.get("next_cursor")
        if not cursor:
            return jobs
        query["cursor"] = cursor


def run_status(args: argparse.Namespace) -> int:
    try:
        _, job = client_for(args).call("GET", f"/v1/jobs/{args.job_id}")
    except RequestFailed as exc:
        return report_failure(exc)
    if args.json:
        print(json.dumps(job, indent=2))
        return 0
    print(f"id:        {job['id']}")
    print(f"name:      {job['name']} ({job['trainer']})")
    print(f"state:     {job['state']}" + (f" in {job['stage']}" if job["stage"] else ""))
    print(f"progress:  {job['progress']:.0%}")
    for label, key in (("created:", "created_at"), ("started:", "started_at")):
        if job[key] is not None:
            print(f"{label:<10} {_clock_time(job[key], with_date=True)}")
    if job["finished_at"] is not None:
        print(f"{'finished:':<10} {_clock_time(job['finished_at'], with_date=True)}")
    if job["metrics"]:
        print(f"metrics:   {metrics_text(job['metrics'], max_items=100)}")
    if job["error"]:
        print(f"error:     {job['error']}")
    return 0


def run_logs(args: argparse.Namespace) -> int:
    client = client_for(args)
    after = 0
    try:
        while True:
            # the state before the lines: lines read after a final state include the last one
            state = client.call("GET", f"/v1/jobs/{args.job_id}")[1]["state"] if args.follow else ""
            _, page = client.call("GET", f"/v1/jobs/{args.job_id}/logs?after={after}")
            for line in page["data"]:
                stage = f" [{line['stage']}]" if line["stage"] else ""
                print(f"{_clock_time(line['time'])}{stage} {line['message']}", flush=True)
                after = line["seq"]
            if page["data"]:
                continue  # a full page may have more behind it
            if not args.follow or state in FINAL_STATES:
                return 0
            time.sleep(args.poll_interval_s)
    except RequestFailed as exc:
        return report_failure(exc)


def run_cancel(args: argparse.Namespace) -> int:
    try:
        _, job = client_for(args).call("POST", f"/v1/jobs/{args.job_id}/cancel")
    except RequestFailed as exc:
        return report_failure(exc)
    print(f"job {job['id']} {job['state']}")
    return 0


def _clock_time(epoch_s: float, *, with_date: bool = False) -> str:
    """Local time of day (and date): when a person reads it at their terminal."""
    return datetime.fromtimestamp(epoch_s).strftime(
        "%Y-%m-%d %H:%M:%S" if with_date else "%H:%M:%S"
    )
