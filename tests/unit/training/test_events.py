"""CloudEvents and SSE frames of job events: pure functions over plain values."""

from __future__ import annotations

import json

from training.events import cloud_event, rfc3339_utc, sse_message
from training.jobs import Job, JobEvent, JobId, JobState
from training.spec import parse_job_spec


def a_job(job_id: str = "job-7") -> Job:
    return Job(
        id=JobId(job_id),
        name="tiny-lm",
        spec=parse_job_spec({"name": "tiny-lm", "trainer": "lm"}),
        state=JobState.RUNNING,
        stage="train",
        priority=0,
        progress=0.5,
        metrics={},
        error=None,
        idempotency_key=None,
        created_at=1_000.0,
        updated_at=1_000.0,
        started_at=1_000.0,
        finished_at=None,
    )


def an_event(seq: int = 2, state: str = "running") -> JobEvent:
    return JobEvent(
        job_id=JobId("job-7"),
        seq=seq,
        type=f"loom.job.{state}",
        # 2025-11-27T10:15:02.250Z
        time=1_764_238_502.25,
        data={"state": state, "previous_state": "queued", "stage": "train"},
    )


def test_cloud_event_has_every_required_attribute_of_cloudevents_1_0() -> None:
    event = cloud_event(a_job(), an_event())
    assert event["specversion"] == "1.0"
    assert event["id"] == "job-7-2"
    assert event["source"] == "/v1/jobs/job-7"
    assert event["type"] == "loom.job.running"
    assert event["subject"] == "job-7"
    assert event["time"] == "2025-11-27T10:15:02.250Z"
    assert event["datacontenttype"] == "application/json"


def test_cloud_event_data_is_the_event_data_plus_job_name_trainer_and_seq() -> None:
    data = cloud_event(a_job(), an_event(seq=3))["data"]
    assert data == {
        "state": "running",
        "previous_state": "queued",
        "stage": "train",
        "job_name": "tiny-lm",
        "trainer": "lm",
        "seq": 3,
    }


def test_cloud_event_source_follows_the_prefix_given() -> None:
    event = cloud_event(a_job(), an_event(), source_prefix="/api/jobs/")
    assert event["source"] == "/api/jobs/job-7"


def test_rfc3339_utc_keeps_milliseconds_and_ends_in_z() -> None:
    assert rfc3339_utc(0.0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339_utc(1.0015) == "1970-01-01T00:00:01.001Z"


def test_sse_message_is_id_event_data_and_a_blank_line() -> None:
    event = cloud_event(a_job(), an_event(seq=4, state="failed"))
    event["data"]["error"] = "line one\nline two"  # a newline must not split the data line
    frame = sse_message(event).decode()
    assert frame.endswith("\n\n")
    lines = frame[:-2].split("\n")
    assert lines[0] == "id: 4"
    assert lines[1] == "event: loom.job.failed"
    assert lines[2].startswith("data: ")
    assert len(lines) == 3
    assert json.loads(lines[2].removeprefix("data: ")) == event
