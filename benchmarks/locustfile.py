"""Locust scenarios: one ``FastHttpUser`` class per load scenario in ``benchmarks.scenarios``.

Class names are ``Scenario.locust_class``: the scenario name in CamelCase plus ``User``
(``plain_get`` -> ``PlainGetUser``), and each task is tagged with the scenario name, so a
scenario runs alone by class or by tag::

    locust -f benchmarks/locustfile.py --headless -u 100 -r 100 -t 30s \\
        --host http://127.0.0.1:8080 --csv benchmarks/results/locust/plain_get \\
        --html benchmarks/results/locust/plain_get.html PlainGetUser

With no class named, Locust runs all of them as a mix. One Locust process tops out far below
the gateway (a few thousand requests/s per core); add ``--processes N`` or run distributed
(see benchmarks/README.md). Scenarios not built yet are listed in ``scenarios.PLANNED``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from locust import FastHttpUser, constant, tag, task

# Locust imports this file by path; make the ``benchmarks`` package importable from it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.scenarios import SCENARIOS, Scenario


def _user_class(scenario: Scenario) -> type[FastHttpUser]:
    method, path, body = scenario.method, scenario.path, scenario.body or None
    headers = scenario.request_headers()

    @tag(scenario.name)
    @task
    def request(self: FastHttpUser) -> None:
        with self.client.request(
            method, path, data=body, headers=headers, name=scenario.name, catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}")

    attrs: dict[str, Any] = {
        "__module__": __name__,
        "__doc__": scenario.title,
        "request": request,
        # Closed loop, like wrk: the next request as soon as the last one is answered.
        "wait_time": constant(0),
        "connection_timeout": 10.0,
        "network_timeout": 10.0,
    }
    return type(scenario.locust_class, (FastHttpUser,), attrs)


for _scenario in SCENARIOS:
    if _scenario.kind == "load" and _scenario.locust:
        globals()[_scenario.locust_class] = _user_class(_scenario)
