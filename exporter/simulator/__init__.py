"""A simulator of the upstream import-status APIs, for the demo, tests and benchmarks."""

from exporter.simulator.app import (
    DEMO_CREDENTIALS,
    SIMULATOR,
    DemoCredentials,
    Fault,
    Simulator,
    create_app,
)
from exporter.simulator.scenarios import Phase, Scenarios, Script, demo_scenarios

__all__ = [
    "DEMO_CREDENTIALS",
    "SIMULATOR",
    "DemoCredentials",
    "Fault",
    "Phase",
    "Scenarios",
    "Script",
    "Simulator",
    "create_app",
    "demo_scenarios",
]
