"""The fault ledger: every fault test records what it injected and whether anything was lost; the
suite ends by printing the totals (and fails if any data was lost)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest


@dataclass
class Ledger:
    rows: list[tuple[str, bool, int]] = field(default_factory=list)

    def record(self, fault: str, survived: bool, data_lost: int = 0) -> None:
        self.rows.append((fault, survived, data_lost))


LEDGER = Ledger()


@pytest.fixture
def ledger() -> Ledger:
    return LEDGER


def pytest_terminal_summary(terminalreporter):
    if not LEDGER.rows:
        return
    write = terminalreporter.write_line
    write("")
    write("fault injection: fault | survived | data lost")
    for fault, survived, lost in LEDGER.rows:
        write(f"  {fault} | {'yes' if survived else 'NO'} | {lost}")
    injected = len(LEDGER.rows)
    survived = sum(1 for _, ok, _ in LEDGER.rows if ok)
    lost = sum(n for _, _, n in LEDGER.rows)
    write(f"faults injected: {injected}, survived: {survived}, data lost: {lost}")
