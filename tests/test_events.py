"""Events: their dict form names the kind."""

from __future__ import annotations

from orchestra.events import RunFinished


def test_event_to_dict_names_the_event_kind() -> None:
    """Event.to_dict() holds the fields plus the event's kind, without the outcome."""
    event = RunFinished(run_id="r", at=1.0, status="completed", steps=2)
    data = event.to_dict()
    assert data["event"] == "run_finished"
    assert data["steps"] == 2
    assert "outcome" not in data
