"""The host suite's junit report keeps its measurements without a warning.

tests/host records wall times as junit properties (record_property); the
deploy's last step (tasks/verify.py) writes them to reports/host-suite-<host>.xml.
Run here with the repository's own pytest configuration, as the deploy runs it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

REPO = Path(__file__).resolve().parents[2]

RECORDS = """
def test_records(record_property):
    record_property("wall_s", 1.5)
"""


def test_recorded_property_lands_in_the_report_and_pytest_does_not_warn(tmp_path):
    (tmp_path / "test_records.py").write_text(RECORDS)
    report = tmp_path / "report.xml"
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-c", str(REPO / "pyproject.toml"), "--rootdir", str(REPO), "-o", "addopts=",
         str(tmp_path / "test_records.py"),
         f"--junitxml={report}"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "PytestWarning" not in out.stdout + out.stderr, out.stdout
    props = {p.get("name"): p.get("value") for p in ElementTree.parse(report).iter("property")}
    assert props == {"wall_s": "1.5"}
