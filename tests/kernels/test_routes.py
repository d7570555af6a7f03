"""Route choice by measurement: timed once per shape class, kept in memory and on disk per machine, forced by
``HF_PLUGINS_ROUTE``, robust to a damaged table."""

import json
import logging
import time

import pytest

from hf_plugins.kernels import _routes


@pytest.fixture
def table(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "routes.json"
    monkeypatch.setattr(_routes, "table_path", lambda: path)
    monkeypatch.delenv("HF_PLUGINS_ROUTE", raising=False)
    return path


def _runner(delays: dict[str, float]):
    """A route runner whose routes take ``delays`` seconds, and the list of routes it ran."""
    ran = []

    def run(route: str) -> None:
        ran.append(route)
        time.sleep(delays[route])

    return run, ran


def test_the_fastest_route_is_measured_once_and_saved(table):
    chooser = _routes.RouteChooser("op", ("slow", "fast"))
    run, ran = _runner({"slow": 0.004, "fast": 0.0})
    assert chooser.choose(("fp32", 8), run) == "fast"
    assert ran.count("slow") == ran.count("fast") == _routes.TIMED_RUNS + 1
    assert chooser.choose(("fp32", 8), run) == "fast" and len(ran) == 2 * (_routes.TIMED_RUNS + 1)
    saved = json.loads(table.read_text())
    assert saved == {_routes.machine_key(): {"op": {"('fp32', 8)": "fast"}}}
    # A new process (a fresh chooser) reads the table instead of timing.
    fresh, (run_again, ran_again) = _routes.RouteChooser("op", ("slow", "fast")), _runner({"slow": 0, "fast": 0})
    assert fresh.choose(("fp32", 8), run_again) == "fast" and ran_again == []


def test_another_machine_measures_anew_and_keeps_the_first(table, monkeypatch):
    run, _ = _runner({"a": 0.003, "b": 0.0})
    _routes.RouteChooser("op", ("a", "b")).choose("k", run)
    monkeypatch.setattr(_routes, "machine_key", lambda: "another machine")
    run, ran = _runner({"a": 0.0, "b": 0.003})
    assert _routes.RouteChooser("op", ("a", "b")).choose("k", run) == "a" and ran
    saved = json.loads(table.read_text())
    assert saved["another machine"]["op"]["k"] == "a" and len(saved) == 2


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"], ids=["broken-json", "not-an-object"])
def test_a_damaged_table_is_ignored_with_a_warning_and_rewritten(table, content, caplog):
    table.parent.mkdir(parents=True)
    table.write_text(content)
    run, ran = _runner({"a": 0.0, "b": 0.003})
    with caplog.at_level(logging.WARNING, logger=_routes.__name__):
        assert _routes.RouteChooser("op", ("a", "b")).choose("k", run) == "a"
    assert ran and "ignoring the" in caplog.text and "routes are measured again" in caplog.text
    assert json.loads(table.read_text())[_routes.machine_key()]["op"]["k"] == "a"


def test_a_saved_route_the_op_no_longer_has_is_measured_again(table):
    table.parent.mkdir(parents=True)
    table.write_text(json.dumps({_routes.machine_key(): {"op": {"k": "retired"}}}))
    run, ran = _runner({"a": 0.0, "b": 0.003})
    assert _routes.RouteChooser("op", ("a", "b")).choose("k", run) == "a" and ran


def test_the_environment_forces_a_route_of_ops_that_have_it(table, monkeypatch):
    run, ran = _runner({"a": 0.0, "b": 0.003})
    monkeypatch.setenv("HF_PLUGINS_ROUTE", "B")
    assert _routes.RouteChooser("op", ("a", "b")).choose("k", run) == "b" and ran == []
    monkeypatch.setenv("HF_PLUGINS_ROUTE", "onednn")  # a route this op lacks: measured as usual
    assert _routes.RouteChooser("op", ("a", "b")).choose("k", run) == "a" and ran
    assert not table.exists() or "b" not in json.loads(table.read_text())[_routes.machine_key()]["op"].values()


def test_an_unwritable_table_costs_only_the_saving(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(_routes, "table_path", lambda: blocker / "routes.json")  # its folder is a file
    monkeypatch.delenv("HF_PLUGINS_ROUTE", raising=False)
    run, _ = _runner({"a": 0.0, "b": 0.003})
    with caplog.at_level(logging.WARNING, logger=_routes.__name__):
        assert _routes.RouteChooser("op", ("a", "b")).choose("k", run) == "a"
    assert "could not save the route table" in caplog.text
